"""Log records as one line each: what a client chose (export names, option payloads, TLS
names) cannot start a line of its own, rewrite one (\\r), or hide one (terminal escapes)."""

from __future__ import annotations

import logging

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_line(text: str) -> str:
    """``text`` with control and other unprintable characters (C0, DEL, C1, bidi overrides,
    lone surrogates) written as Python escapes (repr() already wrote those it quotes)."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ch.isprintable():
            out.append(ch)
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000
                       else f"\\U{code:08x}")
    return "".join(out)


class OneLineFormatter(logging.Formatter):
    """``nbdserve: MESSAGE`` with the message escaped (a traceback, added after, keeps its lines)."""

    def __init__(self) -> None:
        super().__init__("nbdserve: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_line(record.message)
        return super().formatMessage(record)
