"""blkdebug-style events in the qcow2 engine (qemu: block/blkdebug.c, BLKDBG_* names).

An event can be delayed (``--delay cow_write=0.5``), stop at a breakpoint until
resumed (qemu-io's ``break`` / ``wait_break`` / ``resume`` / ``remove_break``, here
through the control socket, nbdserve/server/control.py), fail with an errno
(qemu-iotests 026 style injection), or call a hook (crash tests).  Events on
async paths are awaited with :meth:`BlkDebug.fire`; events inside synchronous
metadata updates use :meth:`BlkDebug.fire_sync`, which supports everything but
delays and breakpoints.
"""

from __future__ import annotations

import errno as errno_mod
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import trio

# qemu's BlkdebugEvent names used by this engine
EVENTS = (
    "l1_update", "l1_grow_alloc_table", "l1_grow_write_table", "l1_grow_activate_table",
    "l2_load", "l2_update", "l2_alloc_cow_read", "l2_alloc_write",
    "read_aio", "read_backing_aio", "read_compressed", "write_aio",
    "cow_read", "cow_write",
    "reftable_grow", "refblock_load", "refblock_update", "refblock_update_part", "refblock_alloc",
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
# process-wide: called with the name of every event any image fires (tests/test_power_cut.py
# marks where each falls in the stream of file writes); unlike ``hook``, arms no slow path
observers: list[Callable[[str], None]] = []


def check_event(name: str) -> None:
    """ValueError unless ``name`` is one of EVENTS."""
    if name not in EVENTS:
        raise ValueError(f"unknown blkdebug event {name!r}; known: {', '.join(EVENTS)}")


def check_suspendable(name: str, what: str = "be delayed") -> None:
    """ValueError unless ``name`` is an event a request can wait at (ASYNC_EVENTS):
    ``what`` is "be delayed" or "stop at a breakpoint", for the message."""
    check_event(name)
    if name not in ASYNC_EVENTS:
        where = ("is never fired" if name == "read_aio"
                 else "fires inside a synchronous metadata update")
        raise ValueError(f"blkdebug event {name!r} cannot {what}: it {where}; "
                         f"events that can: {', '.join(sorted(ASYNC_EVENTS))}")


_ERRNO_BY_NAME = {name: number for number, name in errno_mod.errorcode.items()}


def parse_errno(text: str | int) -> int | None:
    """An errno to inject (qemu blkdebug's errno=), given as a name (``"ENOSPC"``, any case) or a number; None if it is neither."""
    if isinstance(text, int) and not isinstance(text, bool):
        number = text
    elif isinstance(text, str):
        number = int(text) if text.isdigit() else _ERRNO_BY_NAME.get(text.upper())
    else:
        return None
    return number if number in errno_mod.errorcode else None

@dataclass
class _Breakpoint:
    event: str
    tag: str
    hit: trio.Event = field(default_factory=trio.Event)       # a request is suspended here
    resumed: trio.Event = field(default_factory=trio.Event)   # resumed or removed


@dataclass
class _Injection:
    errno: int
    once: bool


class BlkDebug:
    def __init__(self, delays: dict[str, float] | None = None):
        for name in delays or {}:
            check_suspendable(name)
        self.delays = dict(delays or {})
        self.counts: Counter[str] = Counter()
        self._breakpoints: dict[str, _Breakpoint] = {}   # event -> armed breakpoint
        self._by_tag: dict[str, _Breakpoint] = {}        # tag -> armed or suspended breakpoint
        self._injections: dict[str, _Injection] = {}
        self.hook: Callable[[str], None] | None = None

    # -- control (tests, the control socket)
    def _tagged(self, tag: str) -> _Breakpoint:
        try:
            return self._by_tag[tag]
        except KeyError:
            raise ValueError(f"unknown tag {tag!r}") from None

    def set_break(self, event: str, tag: str) -> None:
        """qemu-io ``break EVENT TAG``: the next request reaching EVENT stops there (once)."""
        check_suspendable(event, "stop at a breakpoint")
        if tag in self._by_tag:
            raise ValueError(f"tag {tag!r} is in use (breakpoint at {self._by_tag[tag].event})")
        if event in self._breakpoints:
            raise ValueError(f"event {event!r} already has a breakpoint ({self._breakpoints[event].tag!r})")
        bp = _Breakpoint(event, tag)
        self._breakpoints[event] = bp
        self._by_tag[tag] = bp

    async def wait_break(self, tag: str) -> None:
        """qemu-io ``wait_break TAG``: returns once a request is suspended at TAG;
        ValueError if TAG is unknown or is removed (remove_break, clear) first."""
        bp = self._tagged(tag)
        async with trio.open_nursery() as nursery:
            async def watch(event: trio.Event) -> None:
                await event.wait()
                nursery.cancel_scope.cancel()
            nursery.start_soon(watch, bp.hit)
            nursery.start_soon(watch, bp.resumed)
        if not bp.hit.is_set():
            raise ValueError(f"breakpoint {tag!r} was removed before a request reached it")

    def suspended(self, tag: str) -> bool:
        """True while a request is stopped at TAG's breakpoint."""
        bp = self._by_tag.get(tag)
        return bp is not None and bp.hit.is_set()

    def resume(self, tag: str) -> None:
        """qemu-io ``resume TAG``: continue the request suspended at TAG."""
        bp = self._tagged(tag)
        if not bp.hit.is_set():
            raise ValueError(f"no request is suspended at {tag!r} (armed at {bp.event}; "
                             "remove-break removes it)")
        del self._by_tag[tag]
        bp.resumed.set()

    def remove_break(self, tag: str) -> None:
        """qemu-io ``remove_break TAG``: disarm TAG, resuming a request suspended there."""
        bp = self._tagged(tag)
        del self._by_tag[tag]
        if self._breakpoints.get(bp.event) is bp:
            del self._breakpoints[bp.event]
        bp.resumed.set()

    def set_delay(self, event: str, seconds: float) -> None:
        """Sleep ``seconds`` at every firing of EVENT; 0 removes the delay."""
        check_suspendable(event)
        if seconds:
            self.delays[event] = seconds
        else:
            self.delays.pop(event, None)

    def inject_error(self, event: str, err: int = errno_mod.EIO, once: bool = True) -> None:
        check_event(event)
        self._injections[event] = _Injection(err, once)

    def remove_breaks(self) -> None:
        """Every breakpoint goes; the requests suspended at them go on."""
        for tag in list(self._by_tag):
            self.remove_break(tag)

    def clear(self) -> None:
        """Every breakpoint (resuming what is suspended), delay and injected error goes."""
        self.remove_breaks()
        self.delays.clear()
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
        for observer in observers:
            observer(event)
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
            try:
                await bp.resumed.wait()
            finally:   # resumed, or the request was cancelled while suspended
                if self._by_tag.get(bp.tag) is bp:
                    del self._by_tag[bp.tag]
