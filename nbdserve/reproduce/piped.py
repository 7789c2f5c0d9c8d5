"""One qemu-io process fed its commands through a pipe, as qemu-iotests feed it, with
qemu-io's blkdebug commands (break, wait_break, resume, remove_break) sent to the
server's control socket instead: over NBD they could not reach the server's events.

qemu-io prints an AIO request's completion ("wrote 491520/491520 bytes at offset 0")
whenever it happens; run with ``stdbuf -oL`` its stdout is line-buffered, so each such
line arrives when qemu-io prints it, not at the next prompt's flush.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

import trio

from ..server.control import ControlConnection
from .model import parse_size

PROMPT = b"qemu-io> "
BLKDEBUG_COMMANDS = ("break", "wait_break", "resume", "remove_break")
# qemu-io's aio_read_done()/aio_write_done() (and the sync commands): "wrote N/N bytes at offset O"
_COMPLETION = re.compile(r"^(wrote|read) (\d+)/(\d+) bytes at offset (\d+)$")
_AIO_FAILED = re.compile(r"^(aio_write|aio_read) failed: ")
_AIO_VERB = {"aio_write": "wrote", "aio_read": "read"}
_FAILED = re.compile(r"^\w+ failed: ")     # qemu-io's "write failed: Input/output error" and the like


class QemuIoClosed(Exception):
    """qemu-io exited while something still waited for its output."""


class QemuIoPipe:
    """A running ``qemu-io`` reading commands from its stdin; :meth:`run` sends one and
    returns the lines it printed up to the next prompt."""

    def __init__(self, process: trio.Process):
        self.process = process
        self.lines: list[str] = []       # every output line so far
        self.prompts = 0
        self.pending_aio: list[tuple[str, int, int]] = []   # (verb, length, offset) not yet completed
        self.eof = False
        self._changed = trio.Event()

    @classmethod
    @asynccontextmanager
    async def open(cls, target: str, fmt: str = "raw"):
        argv = ["stdbuf", "-oL", "qemu-io", "-f", fmt, target]
        async with trio.open_nursery() as nursery:
            process = await nursery.start(partial(trio.run_process, argv, stdin=subprocess.PIPE,
                                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                  check=False))
            pipe = cls(process)
            nursery.start_soon(pipe._read)
            try:
                await pipe._until(lambda: pipe.prompts >= 1)
                yield pipe
            finally:
                with trio.CancelScope(shield=True):
                    await pipe.process.stdin.aclose()    # end of input: qemu-io quits
                    await pipe.process.wait()

    async def _read(self) -> None:
        buffer = b""
        while True:
            data = await self.process.stdout.receive_some(65536)
            if not data:
                self.eof = True
                self._notify()
                return
            buffer += data
            while True:
                if buffer.startswith(PROMPT):
                    buffer = buffer[len(PROMPT):]
                    self.prompts += 1
                elif PROMPT.startswith(buffer):
                    break                           # a prompt's beginning, or nothing
                elif b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    self._line(line.decode(errors="replace"))
                else:
                    break
            self._notify()

    def _line(self, line: str) -> None:
        self.lines.append(line)
        m = _COMPLETION.match(line)
        if m and m[2] == m[3]:
            done = (m[1], int(m[2]), int(m[4]))
            if done in self.pending_aio:
                self.pending_aio.remove(done)
            return
        m = _AIO_FAILED.match(line)
        if m:
            verb = _AIO_VERB[m[1]]
            for i, (v, _, _) in enumerate(self.pending_aio):
                if v == verb:
                    del self.pending_aio[i]
                    break

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _until(self, condition) -> None:
        while not condition():
            if self.eof:
                raise QemuIoClosed(f"qemu-io exited; its output: {self.lines}")
            await self._changed.wait()

    async def run(self, command: str) -> list[str]:
        """Send ``command``; the lines printed until qemu-io prompts again (an aio_ command
        prompts at once: its completion comes later, see :meth:`aio_idle`)."""
        argv = shlex.split(command)
        if argv[0] in _AIO_VERB:
            args = [a for a in argv[1:] if not a.startswith("-")]
            if "-P" in argv:   # the pattern's value is an argument too
                args.remove(argv[argv.index("-P") + 1])
            self.pending_aio.append((_AIO_VERB[argv[0]], parse_size(args[1]), parse_size(args[0])))
        first, prompts = len(self.lines), self.prompts
        await self.process.stdin.send_all(command.encode() + b"\n")
        await self._until(lambda: self.prompts > prompts)
        return self.lines[first:]

    async def aio_idle(self) -> None:
        """Returns once every aio_read/aio_write sent has completed (or failed)."""
        await self._until(lambda: not self.pending_aio)


async def _first(*functions) -> int:
    """Run the async functions side by side; the index of the first to return (the others
    are cancelled).  The first exception raised is raised, unwrapped."""
    outcome: list = []
    async with trio.open_nursery() as nursery:
        for i, function in enumerate(functions):
            async def race(i=i, function=function):
                try:
                    await function()
                    result = i
                except Exception as e:   # noqa: BLE001 - re-raised below
                    result = e
                if not outcome:
                    outcome.append(result)
                nursery.cancel_scope.cancel()
            nursery.start_soon(race)
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    return outcome[0]


@dataclass
class ScriptRun:
    outputs: list[tuple[str, list[str]]]   # each qemu-io command, the lines it printed up to its prompt
    hit: dict[str, bool]                   # per tag: a request stopped at that breakpoint
    transcript: list[str]                  # qemu-io's output, with blkdebug's lines where qemu-io prints them


async def run_script(target: str, control: str, commands: tuple[str, ...] | list[str],
                     export: str | None = None) -> ScriptRun:
    """Kevin Wolf's way: ``commands`` into one qemu-io through a pipe, line by line, its
    blkdebug commands through the control socket.  ``wait_break TAG`` returns once a request
    is suspended there, or once no AIO request is left that could reach it (with the fixed
    allocator cow_write is never reached and the aio_write completes); ``resume TAG`` of a
    breakpoint never hit removes it.  The transcript has qemu's blkdebug lines ("blkdebug:
    Suspended request 'A'", "blkdebug: Resuming request 'A'", block/blkdebug.c) where qemu-io
    run on a blkdebug: image prints them.  A command that fails ("write failed: ...",
    "aio_write failed: ...") raises RuntimeError."""
    hit: dict[str, bool] = {}
    where = {} if export is None else {"export": export}
    outputs: list[tuple[str, list[str]]] = []
    async with await ControlConnection.connect(control) as ctl, QemuIoPipe.open(target) as qemu_io:
        for command in commands:
            argv = shlex.split(command)
            op = argv[0]
            if op == "break":
                await ctl.request("break", event=argv[1], tag=argv[2], **where)
                hit[argv[2]] = False
            elif op == "wait_break":
                tag = argv[1]
                async with await ControlConnection.connect(control) as waiter:
                    first = await _first(partial(waiter.request, "wait-break", tag=tag, **where),
                                         qemu_io.aio_idle)
                hit[tag] = first == 0
                if hit[tag]:
                    qemu_io.lines.append(f"blkdebug: Suspended request '{tag}'")
            elif op == "resume":
                if hit.get(argv[1]):
                    qemu_io.lines.append(f"blkdebug: Resuming request '{argv[1]}'")
                await ctl.request("resume" if hit.get(argv[1]) else "remove-break", tag=argv[1], **where)
            elif op == "remove_break":
                await ctl.request("remove-break", tag=argv[1], **where)
            else:
                outputs.append((command, await qemu_io.run(command)))
            failed = [line for line in qemu_io.lines if _FAILED.match(line)]
            if failed:
                raise RuntimeError(f"qemu-io {command!r}: {failed[0]}")
    return ScriptRun(outputs, hit, qemu_io.lines)
