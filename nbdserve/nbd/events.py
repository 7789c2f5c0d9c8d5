"""Events the core emits (client to us) and the reply events the app sends."""

from __future__ import annotations

from dataclasses import dataclass, field

from .constants import Command, CommandFlag, Errno
from .exports import ExportInfo


class _NeedData:
    def __repr__(self):
        return "NEED_DATA"


NEED_DATA = _NeedData()
"""Sentinel from ``next_event``: feed more bytes with ``receive_data``."""


# -- events from the client

@dataclass(frozen=True)
class Negotiated:
    """Option haggling is over: transmission starts on ``export``."""

    export: ExportInfo
    flags: int                       # transmission flags as sent to the client
    structured_replies: bool         # replies are chunks: structured replies or extended headers
    meta_contexts: dict[int, str]    # selected context id -> name
    options: tuple[str, ...]         # option names seen, in order (for logging)
    tls: bool = False                # negotiated (and transmission runs) over TLS
    extended_headers: bool = False   # 32-byte request and reply headers, 64-bit lengths


@dataclass(frozen=True)
class StartTLS:
    """The client sent NBD_OPT_STARTTLS and the core queued NBD_REP_ACK.  The
    transport must send ``data_to_send()`` (the ACK) in the clear, run the TLS
    handshake as the server on the same stream, then call ``tls_started()``;
    every byte after that, both ways, goes through TLS (proto.md: "FORCEDTLS mode").
    If the handshake fails the session is over: close the connection."""


# The per-request events are plain slotted dataclasses, not frozen ones: a frozen
# dataclass's __init__ sets each field through object.__setattr__ (five times the cost,
# once per request); nobody changes an event once it is made.
@dataclass(slots=True)
class Request:
    """One transmission request.  ``error`` nonzero: the app must reply with that
    error without touching the device (the core has discarded any payload)."""

    cookie: int
    command: Command | int
    flags: CommandFlag
    offset: int
    length: int
    data: bytes | None = None        # the payload of a valid NBD_CMD_WRITE
    error: Errno = Errno.OK
    reason: str = ""                 # why ``error`` was set, for the error message


@dataclass(frozen=True)
class Disconnect:
    """The session ends: "disc" (NBD_CMD_DISC), "abort" (NBD_OPT_ABORT), "eof"
    (the peer closed at a message boundary), or "unknown export" (EXPORT_NAME).
    Send ``data_to_send()`` first, then close."""

    reason: str


# -- replies, for ``ServerConnection.send``

@dataclass(slots=True)
class SimpleReply:
    cookie: int
    error: Errno | int = Errno.OK
    data: bytes | bytearray | memoryview = b""


@dataclass(slots=True)
class OffsetData:
    cookie: int
    offset: int
    data: bytes | bytearray | memoryview
    done: bool = False


@dataclass(slots=True)
class OffsetHole:
    cookie: int
    offset: int
    length: int
    done: bool = False


@dataclass(slots=True)
class BlockStatus:
    cookie: int
    context_id: int
    descriptors: list[tuple[int, int]] = field(default_factory=list)   # (length, flags)
    done: bool = False


@dataclass(slots=True)
class ErrorChunk:
    """NBD_REPLY_TYPE_ERROR, or ERROR_OFFSET when ``offset`` is given."""

    cookie: int
    error: Errno | int
    message: str = ""
    offset: int | None = None
    done: bool = True


@dataclass(slots=True)
class NoneChunk:
    """NBD_REPLY_TYPE_NONE: always the final chunk."""

    cookie: int
