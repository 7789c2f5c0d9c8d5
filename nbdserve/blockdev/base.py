"""The block-device interface every layer implements (after nbdkit's plugin API).

protocol -> export -> Qcow2Image -> backing BlockDevice -> RawFile.

Errors are ``OSError`` with an errno (EIO, ENOSPC, EPERM, EINVAL, ENOTSUP); the
NBD layer maps the errno onto the wire.  Ranges are checked at every boundary
with :func:`check_range`.
"""

from __future__ import annotations

import abc
import errno
import os
from dataclasses import dataclass


@dataclass(slots=True)
class Extent:
    """A run of bytes with one allocation status.

    ``data``: the bytes are stored somewhere in the chain (NBD base:allocation
    clears HOLE).  ``zero``: the bytes read as zero (sets ZERO).  ``depth``:
    qemu:allocation-depth: 0 nowhere in the chain, 1 this layer, 2 its backing
    file, and so on.
    """

    length: int
    data: bool
    zero: bool
    depth: int


@dataclass(slots=True)
class ReadChunk:
    """Part of a sparse read: ``data`` is None where the range reads as zeros."""

    offset: int
    length: int
    data: bytes | bytearray | memoryview | FileSlice | None


FILE_SLICE_MIN = 64 * 1024   # smaller reads are read at once: their replies batch into one sendmsg(2)


@dataclass(frozen=True, slots=True)
class FileSlice:
    """Read data left in the page cache: ``length`` bytes at ``offset`` of a file that does
    not change while it is served (a read-only layer).  A plain TCP connection sends it
    with sendfile(2), so the bytes are never copied into the server; anywhere else they
    are read first (``read()``)."""

    fd: int
    offset: int
    length: int

    def __len__(self) -> int:
        return self.length

    def read(self) -> bytes:
        data = os.pread(self.fd, self.length, self.offset)
        if len(data) != self.length:   # the layer checked the file's size when it made the slice
            raise OSError(errno.EIO, f"file shrank under a read-only layer at {self.offset + len(data)}")
        return data

    def after(self, n: int) -> FileSlice:
        """What is left once ``n`` bytes were sent."""
        return FileSlice(self.fd, self.offset + n, self.length - n)


def materialize(data):
    """``data`` as a buffer: a FileSlice is read, anything else is returned as it is."""
    return data.read() if type(data) is FileSlice else data


def check_range(size: int, offset: int, length: int) -> None:
    """Raise EINVAL unless 0 <= offset and offset + length <= size."""
    if offset < 0 or length < 0 or offset + length > size:
        raise OSError(errno.EINVAL, f"range {offset}+{length} outside device of {size} bytes")


class BlockDevice(abc.ABC):
    """A byte-addressed device of ``size`` bytes.  Every I/O method is async.

    The contract a layer follows:

    - must: ``size``, ``read_only`` and ``pread``;
    - may: ``read_sparse`` (zero runs as ``ReadChunk(data=None)``), ``pwrite``, ``trim``,
      ``zero``, ``flush``, ``cache``, ``extents`` and ``close``, each with the ``can_*``
      that announces it (the NBD transmission flags come from ``can_*`` only); every
      range is checked with :func:`check_range`; failures are ``OSError`` with an errno;
    - may, as pure optimisations the transport uses when offered (the results must be
      exactly those of the async methods): ``read_sparse_now`` / ``pwrite_now``, answering
      at once or saying "not now" (None / False), never waiting;
      and ``FileSlice`` data in ``read_sparse_now(file_slices=True)``, only for bytes of a
      file that cannot change while served (a read-only layer).
    """

    size: int
    read_only: bool = False

    # -- capabilities (nbdkit's can_*); NBD transmission flags derive from these
    def can_write(self) -> bool:
        return not self.read_only

    def can_flush(self) -> bool:
        return True

    def can_fua(self) -> bool:
        return self.can_write()

    def can_trim(self) -> bool:
        return False

    def can_zero(self) -> bool:
        return self.can_write()

    def can_fast_zero(self) -> bool:
        return False

    def can_cache(self) -> bool:
        return True

    def can_extents(self) -> bool:
        return True

    def can_multi_conn(self) -> bool:
        """True when one shared instance serves every connection (flush covers all)."""
        return True

    # -- I/O
    @abc.abstractmethod
    async def pread(self, offset: int, length: int) -> bytes | bytearray:
        """Read ``length`` bytes at ``offset``."""

    async def read_sparse(self, offset: int, length: int) -> list[ReadChunk]:
        """Read, telling zero runs apart (for NBD structured OFFSET_HOLE replies)."""
        return [ReadChunk(offset, length, await self.pread(offset, length))]

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        raise OSError(errno.EPERM, "device is read-only")

    # -- the synchronous fast path: the transport answers these inline, without a task
    def read_sparse_now(self, offset: int, length: int, file_slices: bool = False) -> list[ReadChunk] | None:
        """read_sparse() if it can finish without waiting for anything (cached metadata, no
        backing read that must wait, no debug events armed); None: call read_sparse().
        ``file_slices``: the caller can send FileSlice data (read-only layers may give it)."""
        return None

    def pwrite_now(self, offset: int, data: bytes | bytearray | memoryview) -> bool:
        """Write now if that needs no waiting; False: nothing was written, call pwrite()."""
        return False

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        raise OSError(errno.ENOTSUP, "trim not supported")

    async def zero(self, offset: int, length: int, *, may_trim: bool = False,
                   fua: bool = False, fast: bool = False) -> None:
        """Make the range read as zeros.  ``fast``: fail with ENOTSUP rather than write zeros slowly."""
        if fast:
            raise OSError(errno.ENOTSUP, "fast zero not supported")
        step = 1 << 20
        pos, end = offset, offset + length
        while pos < end:
            n = min(step, end - pos)
            await self.pwrite(pos, bytes(n))
            pos += n
        if fua:
            await self.flush()

    async def flush(self) -> None:
        return None

    async def cache(self, offset: int, length: int) -> None:
        """Prefetch a range (NBD_CMD_CACHE); advisory."""
        return None

    async def extents(self, offset: int, length: int) -> list[Extent]:
        """Allocation status from ``offset``; may cover less than ``length`` but at least one byte."""
        return [Extent(length, data=True, zero=False, depth=1)]

    async def close(self) -> None:
        return None
