"""Encoding of transmission replies, checked against the requests in flight
(proto.md: "Simple reply message", "Structured reply chunk message"; with extended
headers, "Extended reply chunk message": every reply is chunks with the 32-byte header,
a SimpleReply event going out as an NBD_REPLY_TYPE_NONE or ERROR chunk)."""

from __future__ import annotations

from . import wire
from .constants import (EXTENDED_REPLY_MAGIC, MAX_STRING, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC, ChunkType,
                        Command, ReplyFlag)
from .errors import LocalProtocolError
from .events import BlockStatus, ErrorChunk, NoneChunk, OffsetData, OffsetHole, SimpleReply

_SIMPLE = wire.SIMPLE_REPLY_HEADER
_CHUNK = wire.CHUNK_HEADER
_OFFSET_DATA_HEADER = wire.OFFSET_DATA_HEADER
_OFFSET = wire.OFFSET_DATA_PREFIX
_DESCRIPTOR = wire.DESCRIPTOR
_EXT_HEADER = wire.EXTENDED_REPLY_HEADER
_EXT_DESCRIPTOR = wire.EXT_DESCRIPTOR
# enum members used for every reply, as module constants (Python 3.11 reads an enum member
# off its class through a descriptor, ~50 ns a time)
_READ, _OFFSET_DATA, _DONE = Command.READ, ChunkType.OFFSET_DATA, ReplyFlag.DONE


class ReplyEncoder:
    def __init__(self, structured: bool, extended: bool = False):
        self.structured = structured or extended
        self.extended = extended
        self._compact_chunks = structured and not extended   # 20-byte chunk headers
        self._in_flight: dict[int, tuple[int, int, int]] = {}   # cookie -> (command, length, offset)
        self._again: dict[int, list[tuple[int, int, int]]] = {}   # a cookie reused while in flight: the later ones

    def expect(self, cookie: int, command: int, length: int, offset: int = 0) -> None:
        if cookie in self._in_flight:
            self._again.setdefault(cookie, []).append((command, length, offset))
        else:
            self._in_flight[cookie] = (command, length, offset)

    def _request(self, cookie: int) -> tuple[int, int, int]:
        request = self._in_flight.get(cookie)
        if request is None:
            raise LocalProtocolError(f"cookie {cookie:#x} is not in flight")
        return request

    def _finish(self, cookie: int) -> None:
        again = self._again.get(cookie)
        if again:
            self._in_flight[cookie] = again.pop(0)
            if not again:
                del self._again[cookie]
        else:
            del self._in_flight[cookie]

    def encode_parts(self, event) -> list:
        """The reply as buffers to send in order (read data is not copied: scatter-gather)."""
        command, length, offset = self._request(event.cookie)
        kind = type(event)
        if kind is OffsetData and self._compact_chunks:   # most replies: one header for chunk and offset
            _check_offset_data(event, command)
            if event.done:
                self._finish(event.cookie)
            data = event.data
            return [_OFFSET_DATA_HEADER.pack(STRUCTURED_REPLY_MAGIC, _DONE if event.done else 0, _OFFSET_DATA,
                                             event.cookie, len(data) + _OFFSET.size, event.offset), data]
        if kind is SimpleReply:
            if not self.extended:
                return self._simple(event, command, length)
            if event.data:   # proto.md: "a simple reply MUST NOT be used"; its data needs OffsetData
                raise LocalProtocolError("extended headers: a read's data goes in OFFSET_DATA chunks")
            event = ErrorChunk(event.cookie, event.error) if event.error else NoneChunk(event.cookie)
        if not self.structured:
            raise LocalProtocolError("structured replies were not negotiated")
        encoder = _CHUNK_ENCODERS.get(type(event))
        if encoder is None:
            raise LocalProtocolError(f"not a reply event: {event!r}")
        chunk_type, payload, done = encoder(event, command, self.extended)
        parts = payload if isinstance(payload, list) else [payload]   # joined once: no extra copy of read data
        if done:
            self._finish(event.cookie)
        flags = ReplyFlag.DONE if done else 0
        if self.extended:
            header = _EXT_HEADER.pack(EXTENDED_REPLY_MAGIC, flags, chunk_type, event.cookie, offset,
                                      sum(map(len, parts)))
        else:
            header = _CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, chunk_type, event.cookie, sum(map(len, parts)))
        return [header, *parts]

    def _simple(self, event: SimpleReply, command: int, length: int) -> list:
        if self.structured and command == _READ:
            raise LocalProtocolError("NBD_CMD_READ needs a structured reply")   # proto.md: MUST NOT
        if event.data and (command != _READ or event.error):
            raise LocalProtocolError("only a successful NBD_CMD_READ carries data")
        if command == _READ and not event.error and len(event.data) != length:
            raise LocalProtocolError(f"read reply of {len(event.data)} bytes for {length} requested")
        self._finish(event.cookie)
        header = _SIMPLE.pack(SIMPLE_REPLY_MAGIC, event.error, event.cookie)
        return [header, event.data] if event.data else [header]


def _check_offset_data(event: OffsetData, command) -> None:
    if command != _READ or not event.data:
        raise LocalProtocolError("OFFSET_DATA needs a READ and at least one byte")


def _offset_data(event: OffsetData, command, extended):
    """NBD_REPLY_TYPE_OFFSET_DATA (encode_parts packs the compact header's case itself)."""
    _check_offset_data(event, command)
    return ChunkType.OFFSET_DATA, [_OFFSET.pack(event.offset), event.data], event.done


def _offset_hole(event: OffsetHole, command, extended):
    if command != Command.READ or event.length <= 0:
        raise LocalProtocolError("OFFSET_HOLE needs a READ and a nonzero length")
    return ChunkType.OFFSET_HOLE, wire.OffsetHole.build(dict(offset=event.offset, size=event.length)), event.done


def _block_status(event: BlockStatus, command, extended):
    """NBD_REPLY_TYPE_BLOCK_STATUS, or with extended headers BLOCK_STATUS_EXT (64-bit
    lengths and flags, and the descriptor count)."""
    if command != Command.BLOCK_STATUS or not event.descriptors:
        raise LocalProtocolError("BLOCK_STATUS needs a BLOCK_STATUS request and a descriptor")
    if extended:
        payload = (event.context_id.to_bytes(4, "big") + len(event.descriptors).to_bytes(4, "big")
                   + b"".join(_EXT_DESCRIPTOR.pack(n, f) for n, f in event.descriptors))
        return ChunkType.BLOCK_STATUS_EXT, payload, event.done
    if any(n >= 1 << 32 for n, _ in event.descriptors):
        raise LocalProtocolError("a BLOCK_STATUS descriptor longer than 32 bits needs extended headers")
    payload = event.context_id.to_bytes(4, "big") + b"".join(_DESCRIPTOR.pack(n, f) for n, f in event.descriptors)
    return ChunkType.BLOCK_STATUS, payload, event.done


def _error(event: ErrorChunk, command, extended):
    if not event.error:
        raise LocalProtocolError("an error chunk needs a nonzero error")
    message = event.message.encode()[:MAX_STRING].decode(errors="ignore")
    if event.offset is None:
        return ChunkType.ERROR, wire.ErrorPayload.build(dict(error=event.error, message=message)), event.done
    payload = wire.ErrorOffsetPayload.build(dict(error=event.error, message=message, offset=event.offset))
    return ChunkType.ERROR_OFFSET, payload, event.done


def _none(event: NoneChunk, command, extended):
    return ChunkType.NONE, b"", True


_CHUNK_ENCODERS = {OffsetData: _offset_data, OffsetHole: _offset_hole, BlockStatus: _block_status,
                   ErrorChunk: _error, NoneChunk: _none}
