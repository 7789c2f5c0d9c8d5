"""blkdebug-style events in the qcow2 engine (qemu: block/blkdebug.c, BLKDBG_* names).

An event can be delayed (``--delay cow_write=0.5``), stop at a breakpoint until
resumed (qemu-io's ``break`` / ``wait_break`` / ``resume``), fail with an errno
(qemu-iotests 026 style injection), or call a hook (crash tests).  Events on
async paths are awaited with :meth:`BlkDebug.fire`; events inside synchronous
metadata updates use :meth:`BlkDebug.fire_sync`, which supports everything but
delays and breakpoints.
"""

from __future__ import annotations

import errno as errno_mod
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import trio

# qemu's BlkdebugEvent names used by this engine
EVENTS = (
    "l1_update", "l1_grow_alloc_table", "l1_grow_write_table", "l1_grow_activate_table",
    "l2_load", "l2_update", "l2_alloc_cow_read", "l2_alloc_write",
    "read_aio", "read_backing_aio", "read_compressed", "write_aio",
    "cow_read", "cow_write",
    "reftable_grow", "refblock_load", "refblock_update", "refblock_alloc",
    "refblock_alloc_hookup", "refblock_alloc_write", "refblock_alloc_write_table",
    "refblock_alloc_switch_table",
    "cluster_alloc", "cluster_free", "flush_to_os", "flush_to_disk",
)
# the events fired with ``await fire()``: only these can sleep or stop at a breakpoint
# (read_aio is never fired; read_compressed and cluster_free fire inside synchronous code)
ASYNC_EVENTS = frozenset({
    "l1_update", "l2_update", "l2_alloc_write", "read_backing_aio",
    "write_aio", "cow_read", "cow_write", "cluster_alloc", "flush_to_os", "flush_to_disk",
})


@dataclass
class _Breakpoint:
    tag: str
    hit: trio.Event
    resumed: trio.Event


@dataclass
class _Injection:
    errno: int
    once: bool


class BlkDebug:
    def __init__(self, delays: dict[str, float] | None = None):
        for name in delays or {}:
            self._check_name(name)
        self.delays = dict(delays or {})
        self.counts: Counter[str] = Counter()
        self._breakpoints: dict[str, _Breakpoint] = {}   # event -> armed breakpoint
        self._by_tag: dict[str, _Breakpoint] = {}
        self._injections: dict[str, _Injection] = {}
        self.hook: Callable[[str], None] | None = None

    @staticmethod
    def _check_name(name: str) -> None:
        if name not in EVENTS:
            raise ValueError(f"unknown blkdebug event {name!r}; known: {', '.join(EVENTS)}")

    # -- control (tests, CLI)
    def set_break(self, event: str, tag: str) -> None:
        """qemu-io ``break EVENT TAG``: the next request reaching EVENT stops there."""
        self._check_name(event)
        if event not in ASYNC_EVENTS:
            raise ValueError(f"event {event!r} is inside a metadata update and cannot stop")
        bp = _Breakpoint(tag, trio.Event(), trio.Event())
        self._breakpoints[event] = bp
        self._by_tag[tag] = bp

    async def wait_break(self, tag: str) -> None:
        """qemu-io ``wait_break TAG``."""
        await self._by_tag[tag].hit.wait()

    def resume(self, tag: str) -> None:
        """qemu-io ``resume TAG``."""
        self._by_tag.pop(tag).resumed.set()

    def inject_error(self, event: str, err: int = errno_mod.EIO, once: bool = True) -> None:
        self._check_name(event)
        self._injections[event] = _Injection(err, once)

    def clear_errors(self) -> None:
        self._injections.clear()

    @property
    def armed(self) -> bool:
        """True when an event may sleep, stop or fail: the engine then takes no synchronous shortcut."""
        return bool(self.delays or self._breakpoints or self._injections or self.hook)

    # -- firing
    def fire_sync(self, event: str) -> None:
        self.counts[event] += 1
        if self.hook is not None:
            self.hook(event)
        inj = self._injections.get(event)
        if inj is not None:
            if inj.once:
                del self._injections[event]
            raise OSError(inj.errno, f"injected error at {event}")

    async def fire(self, event: str) -> None:
        self.fire_sync(event)
        delay = self.delays.get(event)
        if delay:
            await trio.sleep(delay)
        bp = self._breakpoints.pop(event, None)
        if bp is not None:
            bp.hit.set()
            await bp.resumed.wait()
