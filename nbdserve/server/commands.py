"""Carrying out one transmission request against the export's device."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable

from ..blockdev import BlockDevice, Extent
from ..nbd import (CONTEXT_BASE_ALLOCATION, BlockStatus, Command, CommandFlag, Errno, ErrorChunk, NoneChunk,
                   OffsetData, OffsetHole, Request, SimpleReply, StateFlag)
from .exports import nbd_errno

log = logging.getLogger("nbdserve.server")
Send = Callable[[object], Awaitable[None]]
MAX_DESCRIPTORS = 1 << 16    # proto.md: the server MAY return fewer descriptors than asked


async def execute(request: Request, device: BlockDevice, structured: bool,
                  contexts: dict[int, str], send: Send) -> None:
    """Perform ``request`` and send its complete reply; device errors become NBD errors."""
    for reply in await reply_events(request, device, structured, contexts):
        await send(reply)


async def reply_events(request: Request, device: BlockDevice, structured: bool,
                       contexts: dict[int, str]) -> list:
    """The reply events for ``request``, after performing it."""
    error, message = request.error, request.reason
    if not error:
        try:
            if request.command == Command.READ:
                return await _read(request, device, structured)
            if request.command == Command.BLOCK_STATUS:
                return await _block_status(request, device, contexts)
            await _perform(request, device)
        except Exception as exc:   # noqa: BLE001 - every failure becomes an NBD error reply
            error, message = nbd_errno(exc), str(exc)
            if not isinstance(exc, OSError):
                log.exception("request %s failed", request)
    if error and structured:
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


async def _read(request: Request, device: BlockDevice, structured: bool) -> list:
    cookie, offset, length = request.cookie, request.offset, request.length
    if not structured:
        return [SimpleReply(cookie, data=await device.pread(offset, length) if length else b"")]
    if length == 0:
        return [NoneChunk(cookie)]
    if request.flags & CommandFlag.DF:   # proto.md: "NBD_CMD_FLAG_DF": one content chunk
        return [OffsetData(cookie, offset, await device.pread(offset, length), done=True)]
    chunks = [c for c in await device.read_sparse(offset, length) if c.length]
    replies = [OffsetData(cookie, c.offset, c.data) if c.data is not None else OffsetHole(cookie, c.offset, c.length)
               for c in chunks]
    if not replies:
        return [NoneChunk(cookie)]
    replies[-1] = dataclasses.replace(replies[-1], done=True)
    return replies


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


async def _block_status(request: Request, device: BlockDevice, contexts: dict[int, str]) -> list:
    req_one = bool(request.flags & CommandFlag.REQ_ONE)
    extents = await collect_extents(device, request.offset, request.length, req_one)
    items = list(contexts.items())
    return [BlockStatus(request.cookie, context_id, descriptors(extents, name), done=i == len(items) - 1)
            for i, (context_id, name) in enumerate(items)]
