"""The control socket (``--control SOCKET``): blkdebug breakpoints, delays and injected
errors of the exports' qcow2 engines, set while the server serves NBD.

qemu-io's ``break`` / ``wait_break`` / ``resume`` / ``remove_break`` reach qemu's own
blkdebug driver only; over NBD the engine's events (qcow2/events.py) are reached here.
Protocol: nbdserve/control.py; one task per client, requests answered in order.
"""

from __future__ import annotations

import logging

import trio

from ..control import MAX_LINE, ControlError, encode, parse_reply, parse_request, reply_error, reply_ok
from ..blockdev.images import ImageError
from ..qcow2.events import parse_errno
from .exports import RAW_HAS_NO_EVENTS, Export, blkdebug, start_trace, stop_trace

log = logging.getLogger("nbdserve.server")


class LineReceiver:
    """Lines of at most MAX_LINE bytes from a Trio stream."""

    def __init__(self, stream: trio.abc.ReceiveStream):
        self.stream = stream
        self.buffer = bytearray()

    async def receive_line(self) -> bytes | None:
        """The next line without its newline (a last one may lack it); None at the end."""
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                line = bytes(self.buffer[:end])
                del self.buffer[:end + 1]
                return line
            if len(self.buffer) >= MAX_LINE:
                raise ControlError(f"line longer than {MAX_LINE} bytes")
            data = await self.stream.receive_some(MAX_LINE)
            if not data:
                line, self.buffer = bytes(self.buffer), bytearray()
                return line or None
            self.buffer += data


class ControlConnection:
    """A client of the control socket on Trio (nbdserve reproduce); nbdserve ctl uses
    control.ControlClient, a plain socket."""

    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        self.lines = LineReceiver(stream)

    @classmethod
    async def connect(cls, path: str) -> "ControlConnection":
        return cls(await trio.open_unix_socket(path))

    async def request(self, cmd: str, **arguments) -> dict:
        """Send one request; its reply, or ControlError with the server's refusal."""
        await self.stream.send_all(encode({"cmd": cmd, **arguments}))
        line = await self.lines.receive_line()
        if line is None:
            raise ControlError("the server closed the control connection without a reply")
        return parse_reply(line)

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def __aenter__(self) -> "ControlConnection":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


class Control:
    def __init__(self, exports: dict[str, Export]):
        self.exports = exports

    async def handle(self, stream: trio.SocketStream) -> None:
        """One client: a reply line per request line, until it hangs up."""
        lines = LineReceiver(stream)
        try:
            async with stream:
                while True:
                    try:
                        line = await lines.receive_line()
                    except ControlError as e:   # too long: no way to find where the next one starts
                        await stream.send_all(encode(reply_error(str(e))))
                        await stream.send_eof()
                        while await stream.receive_some(MAX_LINE):
                            pass                # until it hangs up: closing on unread data resets the reply
                        return
                    if line is None:
                        return
                    if line.strip():
                        await stream.send_all(encode(await self.answer(line)))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass   # the client left; what it asked for stays done

    async def answer(self, line: bytes) -> dict:
        try:
            request = parse_request(line)
            return await self.execute(request)
        except (ControlError, ValueError) as e:
            return reply_error(str(e))
        except Exception as e:   # noqa: BLE001 - a client's request never stops the server
            log.exception("control: %r failed", line)
            return reply_error(f"internal error: {e}")

    def _export(self, request: dict) -> Export:
        name = request.get("export")
        if name is None:
            if len(self.exports) != 1:
                names = ", ".join(repr(n) for n in self.exports)
                raise ControlError(f"several exports ({names}): name one with \"export\"")
            name = next(iter(self.exports))
        export = self.exports.get(name)
        if export is None:
            raise ControlError(f"no export named {name!r} (exports: {', '.join(repr(n) for n in self.exports)})")
        return export

    def _events(self, request: dict):
        export = self._export(request)
        events = blkdebug(export.device)
        if events is None:
            raise ControlError(f"export {export.settings.name!r} serves a raw file: {RAW_HAS_NO_EVENTS}")
        return events

    def _trace(self, request: dict) -> None:
        """``trace on [file]``: the allocation trace into ``file`` (default: the export's
        ``trace`` setting); ``trace off``: stop it, closing its file."""
        export = self._export(request)
        if request["state"] == "off":
            stop_trace(export.image)
            return
        path = request.get("file") or export.settings.trace
        if path is None:
            raise ControlError(f"export {export.settings.name!r} has no trace file: "
                               "give one (trace on FILE) or serve with --trace FILE")
        try:
            start_trace(f"export {export.settings.name!r}", export.image, path)
        except ImageError as e:
            raise ControlError(str(e)) from None

    async def execute(self, request: dict) -> dict:
        """Carry out a checked request (control.parse_request); ValueError/ControlError refuse it."""
        if request["cmd"] == "trace":
            self._trace(request)
            return reply_ok()
        cmd, events = request["cmd"], self._events(request)
        if cmd == "break":
            events.set_break(request["event"], request["tag"])
        elif cmd == "wait-break":
            timeout = request.get("timeout", float("inf"))
            with trio.move_on_after(timeout) as scope:
                await events.wait_break(request["tag"])
            if scope.cancelled_caught:
                raise ControlError(f"timed out after {timeout:g} s: no request reached breakpoint "
                                   f"{request['tag']!r}")
        elif cmd == "resume":
            events.resume(request["tag"])
        elif cmd == "remove-break":
            events.remove_break(request["tag"])
        elif cmd == "delay":
            events.set_delay(request["event"], float(request["seconds"]))
        elif cmd == "inject-error":
            number = parse_errno(request["errno"])
            if number is None:
                raise ControlError(f"unknown errno {request['errno']!r} "
                                   "(expected a name like EIO or ENOSPC, or its number)")
            events.inject_error(request["event"], number, request.get("once", False))
        elif cmd == "clear":
            events.clear()
        return reply_ok()


def release_breakpoints(exports: dict[str, Export]) -> None:
    """Shutting down: resume every request suspended at a breakpoint, so it can finish."""
    for export in exports.values():
        events = blkdebug(export.device)
        if events is not None:
            events.remove_breaks()
