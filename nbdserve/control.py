"""The control socket's protocol (``nbdserve serve --control SOCKET``), sans I/O, and a
plain-socket client for ``nbdserve ctl`` (no Trio: the client starts fast).

One JSON object per line each way.  A request names a command and its arguments::

    {"cmd": "break", "event": "cow_write", "tag": "A"}
    {"cmd": "wait-break", "tag": "A", "timeout": 10}
    {"cmd": "inject-error", "event": "write_aio", "errno": "ENOSPC", "once": true, "export": "disk"}

and gets one reply, in order: ``{"ok": true}`` or ``{"ok": false, "error": "unknown tag 'B'"}``.
The server side is nbdserve/server/control.py.
"""

from __future__ import annotations

import json
import math
import socket

MAX_LINE = 64 * 1024        # bytes in one request line, newline included

# command -> (required arguments, optional arguments); every command also takes "export"
COMMANDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "break": (("event", "tag"), ()),
    "wait-break": (("tag",), ("timeout",)),
    "resume": (("tag",), ()),
    "remove-break": (("tag",), ()),
    "delay": (("event", "seconds"), ()),
    "inject-error": (("event", "errno"), ("once",)),
    "clear": ((), ()),
    "trace": (("state",), ("file",)),
}


class ControlError(Exception):
    """A refused request (its reply's "error"), or a broken conversation."""


def _is_seconds(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value >= 0)


_CHECKS = {   # argument -> (test, what it must be)
    "event": (lambda v: isinstance(v, str), "a string"),
    "tag": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "export": (lambda v: isinstance(v, str), "a string"),
    "seconds": (_is_seconds, "a non-negative number of seconds"),
    "timeout": (_is_seconds, "a non-negative number of seconds"),
    "errno": (lambda v: (isinstance(v, str) and v != "") or (isinstance(v, int) and not isinstance(v, bool)),
              "an errno name like ENOSPC or its number"),
    "once": (lambda v: isinstance(v, bool), "true or false"),
    "state": (lambda v: v in ("on", "off"), '"on" or "off"'),
    "file": (lambda v: isinstance(v, str) and v != "", "a non-empty string (a path)"),
}


def encode(message: dict) -> bytes:
    """One line of the protocol."""
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def parse_request(line: bytes) -> dict:
    """A request line -> its dict, checked; ControlError says what is wrong with it."""
    try:
        request = json.loads(line)
    except (UnicodeDecodeError, ValueError):
        raise ControlError(f"not a JSON object: {_excerpt(line)}") from None
    if not isinstance(request, dict):
        raise ControlError(f"not a JSON object: {_excerpt(line)}")
    cmd = request.get("cmd")
    if cmd not in COMMANDS:
        raise ControlError(f"unknown command {cmd!r}; expected one of: {', '.join(COMMANDS)}"
                           if "cmd" in request else 'missing "cmd"')
    required, optional = COMMANDS[cmd]
    for key in required:
        if key not in request:
            raise ControlError(f"{cmd}: missing {key!r}")
    for key, value in request.items():
        if key == "cmd":
            continue
        if key not in required + optional + ("export",):
            raise ControlError(f"{cmd}: unknown key {key!r} (expected: {', '.join(required + optional + ('export',))})")
        test, what = _CHECKS[key]
        if not test(value):
            raise ControlError(f"{cmd}: {key!r} must be {what}, got {json.dumps(value)}")
    return request


def _excerpt(line: bytes) -> str:
    text = line.decode("utf-8", "backslashreplace").strip()
    return repr(text if len(text) <= 60 else text[:57] + "...")


def reply_ok(**extra) -> dict:
    return {"ok": True, **extra}


def reply_error(message: str) -> dict:
    return {"ok": False, "error": message}


def parse_reply(line: bytes) -> dict:
    """A reply line -> its dict; ControlError with the server's message if it refused."""
    try:
        reply = json.loads(line)
    except (UnicodeDecodeError, ValueError):
        raise ControlError(f"the server's reply is not JSON: {_excerpt(line)}") from None
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise ControlError(f"the server's reply has no \"ok\": {_excerpt(line)}")
    if not reply["ok"]:
        raise ControlError(str(reply.get("error", "refused")))
    return reply


class ControlClient:
    """A blocking connection to a control socket: ``request("break", event=..., tag=...)``."""

    def __init__(self, path: str):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(path)
        except OSError as e:
            self.sock.close()
            raise ControlError(f"cannot connect to {path}: {e.strerror or e} "
                               "(is nbdserve serve --control running there?)") from None
        self._file = self.sock.makefile("rb")

    def request(self, cmd: str, **arguments) -> dict:
        message = {"cmd": cmd, **{k: v for k, v in arguments.items() if v is not None}}
        try:
            self.sock.sendall(encode(message))
            line = self._file.readline(MAX_LINE)
        except OSError as e:
            raise ControlError(f"{self.path}: {e.strerror or e}") from None
        if not line.endswith(b"\n"):
            raise ControlError(f"{self.path}: the server closed the connection without a reply")
        return parse_reply(line)

    def close(self) -> None:
        self._file.close()
        self.sock.close()

    def __enter__(self) -> "ControlClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
