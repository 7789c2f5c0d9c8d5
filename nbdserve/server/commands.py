"""Carrying out one transmission request against the export's device."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING

from ..blockdev import BlockDevice, Extent, ReadChunk, materialize
from ..nbd import (CONTEXT_BASE_ALLOCATION, BlockStatus, Command, CommandFlag, Errno, ErrorChunk, NoneChunk,
                   OffsetData, OffsetHole, Request, SimpleReply, StateFlag)
from .exports import nbd_errno

if TYPE_CHECKING:
    from ..qcow2.bitmaps import DirtyBitmap

log = logging.getLogger("nbdserve.server")
Send = Callable[[object], Awaitable[None]]
Bitmaps = dict[str, "DirtyBitmap"]
MAX_DESCRIPTORS = 1 << 16    # proto.md: the server MAY return fewer descriptors than asked
# plain ints for the per-request flag tests (IntFlag's & builds a new flag, 0.4 us), and
# enum members as module constants (Python 3.11 reads one off its class through a descriptor)
_FUA, _DF = int(CommandFlag.FUA), int(CommandFlag.DF)
_READ, _WRITE = Command.READ, Command.WRITE


@dataclasses.dataclass
class Refusals:
    """The requests of one connection refused for breaking proto.md, logged as one line when
    it ends (not one line each: a client can send millions)."""

    count: int = 0
    first: str = ""

    def add(self, request: Request) -> None:
        if not self.count:
            self.first = f"{getattr(request.command, 'name', request.command)}: {request.reason}"
        self.count += 1

    def summary(self) -> str:
        return f"refused {self.count} request{'s' if self.count > 1 else ''}, the first {self.first}"


# Set by the transport for each connection; request tasks inherit it.
CONNECTION_REFUSALS: ContextVar[Refusals | None] = ContextVar("connection_refusals", default=None)


async def execute(request: Request, device: BlockDevice, structured: bool,
                  contexts: dict[int, str], send: Send, bitmaps: Bitmaps | None = None) -> None:
    """Perform ``request`` and send its complete reply; device errors become NBD errors."""
    for reply in await reply_events(request, device, structured, contexts, bitmaps):
        await send(reply)


async def reply_events(request: Request, device: BlockDevice, structured: bool,
                       contexts: dict[int, str], bitmaps: Bitmaps | None = None) -> list:
    """The reply events for ``request``, after performing it (``bitmaps``: the export's
    dirty bitmaps by context name)."""
    if request.error:
        if (refusals := CONNECTION_REFUSALS.get()) is not None:
            refusals.add(request)
        return _error_replies(request, request.error, request.reason, structured)
    try:
        if request.command == Command.READ:
            chunks = await device.read_sparse(request.offset, request.length) if request.length else []
            return read_replies(request, chunks, structured)
        if request.command == Command.BLOCK_STATUS:
            return await _block_status(request, device, contexts, bitmaps or {})
        await _perform(request, device)
    except Exception as exc:   # noqa: BLE001 - every failure becomes an NBD error reply
        return _failed(request, exc, structured)
    return [SimpleReply(request.cookie)]


def replies_now(request: Request, device: BlockDevice, structured: bool, file_slices: bool = False) -> list | None:
    """The reply events for a READ or WRITE the device performs without waiting, or None:
    the request needs a task of its own (see BlockDevice.read_sparse_now/pwrite_now).
    ``file_slices``: read data may be FileSlices (the sender can send them)."""
    if request.error or not request.length:
        return None
    try:
        if request.command == _READ:
            chunks = device.read_sparse_now(request.offset, request.length, file_slices)
            return None if chunks is None else read_replies(request, chunks, structured)
        if request.command == _WRITE and not int(request.flags) & _FUA:
            return [SimpleReply(request.cookie)] if device.pwrite_now(request.offset, request.data) else None
    except Exception as exc:   # noqa: BLE001 - every failure becomes an NBD error reply
        return _failed(request, exc, structured)
    return None


def _failed(request: Request, exc: Exception, structured: bool) -> list:
    if not isinstance(exc, OSError):
        log.exception("request %s failed", request)
    return _error_replies(request, nbd_errno(exc), str(exc), structured)


def _error_replies(request: Request, error: Errno, message: str, structured: bool) -> list:
    if structured:
        return [ErrorChunk(request.cookie, error, message)]
    return [SimpleReply(request.cookie, error)]


async def _perform(request: Request, device: BlockDevice) -> None:
    fua = bool(request.flags & CommandFlag.FUA)
    command, offset, length = request.command, request.offset, request.length
    if command == Command.FLUSH:
        await device.flush()
    elif length == 0:
        return   # proto.md: length 0 is unspecified; succeed without touching the device
    elif command == Command.WRITE:
        await device.pwrite(offset, request.data, fua=fua)
    elif command == Command.TRIM:
        await device.trim(offset, length, fua=fua)
    elif command == Command.WRITE_ZEROES:
        await device.zero(offset, length, may_trim=not request.flags & CommandFlag.NO_HOLE, fua=fua,
                          fast=bool(request.flags & CommandFlag.FAST_ZERO))
    elif command == Command.CACHE:
        await device.cache(offset, length)
    else:
        raise OSError(Errno.EINVAL, f"unhandled command {command}")


def read_replies(request: Request, chunks: list[ReadChunk], structured: bool) -> list:
    """Replies carrying a read's chunks: data and holes as structured chunks, or one
    contiguous buffer for a simple reply or NBD_CMD_FLAG_DF."""
    if structured and len(chunks) == 1 and chunks[0].data is not None and chunks[0].length == request.length:
        # all data in one piece, the most common read: one chunk, with or without DF
        return [OffsetData(request.cookie, request.offset, chunks[0].data, done=True)]
    return read_replies_plain(request, chunks, structured)


def read_replies_plain(request: Request, chunks: list[ReadChunk], structured: bool) -> list:
    """read_replies() for any chunks (its twin, tests/test_fast_paths.py)."""
    cookie, offset, length = request.cookie, request.offset, request.length
    chunks = [c for c in chunks if c.length]
    if structured and not chunks:
        return [NoneChunk(cookie)]
    if not structured or int(request.flags) & _DF:   # proto.md: "NBD_CMD_FLAG_DF": one chunk
        data = _contiguous(offset, length, chunks)
        return [OffsetData(cookie, offset, data, done=True) if structured else SimpleReply(cookie, data=data)]
    last = len(chunks) - 1
    return [OffsetData(cookie, c.offset, c.data, done=i == last) if c.data is not None
            else OffsetHole(cookie, c.offset, c.length, done=i == last) for i, c in enumerate(chunks)]


def _contiguous(offset: int, length: int, chunks: list[ReadChunk]):
    if len(chunks) == 1 and chunks[0].data is not None and chunks[0].length == length:
        return chunks[0].data
    buf = bytearray(length)
    for c in chunks:
        if c.data is not None:
            buf[c.offset - offset:c.offset - offset + c.length] = materialize(c.data)
    return buf


async def collect_extents(device: BlockDevice, offset: int, length: int, req_one: bool) -> list[Extent]:
    """Extents covering [offset, offset+length), clipped to it (just the first with REQ_ONE)."""
    extents: list[Extent] = []
    pos, end = offset, offset + length
    while pos < end and len(extents) < MAX_DESCRIPTORS:
        got = [e for e in await device.extents(pos, end - pos) if e.length > 0]
        if not got:
            break
        for extent in got:
            n = min(extent.length, end - pos)
            extents.append(Extent(n, extent.data, extent.zero, extent.depth))
            pos += n
            if pos >= end or req_one:
                break
        if req_one:
            break
    if not extents:
        raise OSError(Errno.EIO, "device returned no extents")
    return extents


def descriptors(extents: list[Extent], context: str) -> list[tuple[int, int]]:
    """(length, flags) descriptors for one context, adjacent equal ones merged."""
    out: list[tuple[int, int]] = []
    for extent in extents:
        if context == CONTEXT_BASE_ALLOCATION:
            flags = (0 if extent.data else StateFlag.HOLE) | (StateFlag.ZERO if extent.zero else 0)
        else:   # qemu:allocation-depth
            flags = extent.depth
        if out and out[-1][1] == flags:
            out[-1] = (out[-1][0] + extent.length, flags)
        else:
            out.append((extent.length, int(flags)))
    return out


def bitmap_descriptors(bitmap: DirtyBitmap, offset: int, length: int, req_one: bool) -> list[tuple[int, int]]:
    """qemu:dirty-bitmap:NAME descriptors (qemu nbd/server.c: bitmap_to_extents())."""
    runs = bitmap.runs(offset, length, 1 if req_one else MAX_DESCRIPTORS)
    return [(n, StateFlag.DIRTY if dirty else 0) for n, dirty in runs]


async def _block_status(request: Request, device: BlockDevice, contexts: dict[int, str],
                        bitmaps: Bitmaps) -> list:
    req_one = bool(request.flags & CommandFlag.REQ_ONE)
    extents = None
    out = []
    for i, (context_id, name) in enumerate(contexts.items()):
        if name in bitmaps:
            descs = bitmap_descriptors(bitmaps[name], request.offset, request.length, req_one)
        else:
            if extents is None:
                extents = await collect_extents(device, request.offset, request.length, req_one)
            descs = descriptors(extents, name)
        out.append(BlockStatus(request.cookie, context_id, descs, done=i == len(contexts) - 1))
    return out
