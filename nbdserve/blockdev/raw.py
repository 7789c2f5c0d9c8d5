"""A raw file as a block device: the bottom of every chain."""

from __future__ import annotations

import errno
import os

import trio

from .base import FILE_SLICE_MIN, BlockDevice, Extent, FileSlice, ReadChunk, check_range
from .fileio import host_runs, punch_hole, pwrite_all, zero_allocated
from .lock import lock_image, lock_mode


def pread_exact(fd: int, offset: int, length: int) -> bytes:
    """pread that reads zeros past the end of the file, never short."""
    data = os.pread(fd, length, offset)
    if len(data) < length:
        data += bytes(length - len(data))
    return data


class RawFile(BlockDevice):
    """A plain file.  Reads are synchronous preads: the page cache answers them
    faster than a thread hand-off would; fsync runs in a worker thread."""

    def __init__(self, path: str, read_only: bool = False, *, lock: tuple[int, int] | None = None):
        """``lock``: qemu's (perm, shared) to take on the file (lock.lock_mode), by default
        those of a read-only or writable image."""
        self.path = path
        self.read_only = read_only
        self.fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR)
        try:
            lock_image(self.fd, path, *(lock or lock_mode(read_only, raw=True)))
        except BaseException:
            os.close(self.fd)
            raise
        self.size = os.fstat(self.fd).st_size

    def can_trim(self) -> bool:
        return self.can_write()

    def can_fast_zero(self) -> bool:
        return self.can_write()

    async def pread(self, offset: int, length: int) -> bytes:
        check_range(self.size, offset, length)
        return pread_exact(self.fd, offset, length)

    async def read_sparse(self, offset, length):
        return self.read_sparse_now(offset, length)

    def read_sparse_now(self, offset, length, file_slices=False):
        """Holes of the file (SEEK_HOLE) come back as zero chunks; data of a read-only file
        as FileSlices when the caller takes them."""
        check_range(self.size, offset, length)
        slices = file_slices and self.read_only
        chunks: list[ReadChunk] = []
        pos, end = offset, offset + length
        while pos < end:
            extent = self._extent(pos, end - pos)
            n = extent.length
            if not extent.data:
                data = None
            elif slices and n >= FILE_SLICE_MIN:   # read-only: the file keeps the size it had at open
                data = FileSlice(self.fd, pos, n)
            else:
                data = pread_exact(self.fd, pos, n)
            chunks.append(ReadChunk(pos, n, data))
            pos += n
        return chunks

    async def pwrite(self, offset, data, fua=False):
        self.pwrite_now(offset, data)
        if fua:
            await self.flush()

    def pwrite_now(self, offset, data):
        if self.read_only:
            raise OSError(errno.EPERM, "device is read-only")
        check_range(self.size, offset, len(data))
        pwrite_all(self.fd, data, offset)
        return True

    async def trim(self, offset, length, fua=False):
        if self.read_only:
            raise OSError(errno.EPERM, "device is read-only")
        check_range(self.size, offset, length)
        punch_hole(self.fd, offset, length)
        if fua:
            await self.flush()

    async def zero(self, offset, length, *, may_trim=False, fua=False, fast=False):
        if self.read_only:
            raise OSError(errno.EPERM, "device is read-only")
        check_range(self.size, offset, length)
        if may_trim:
            # A punched hole reads as zeros on every Linux file system that supports it.
            punch_hole(self.fd, offset, length)
        elif not zero_allocated(self.fd, offset, length):   # NBD_CMD_FLAG_NO_HOLE: keep it allocated
            await super().zero(offset, length, fast=fast)
        if fua:
            await self.flush()

    async def flush(self):
        if not self.read_only:
            await trio.to_thread.run_sync(os.fsync, self.fd)

    async def extents(self, offset, length):
        return [self._extent(offset, length)]

    def _extent(self, offset: int, length: int) -> Extent:
        check_range(self.size, offset, length)
        n, hole = next(host_runs(self.fd, offset, length))
        return Extent(n, data=not hole, zero=hole, depth=1)

    async def close(self):
        if self.fd >= 0:
            if not self.read_only:
                await self.flush()
            os.close(self.fd)
            self.fd = -1
