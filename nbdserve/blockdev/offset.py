"""OffsetDevice: a device seen from ``offset`` on (qemu's raw driver ``offset=`` option,
which qemu-nbd ``--offset`` puts on top of the image: qemu-nbd.c, ``dev_offset``)."""

from __future__ import annotations

import errno

from .base import BlockDevice, Extent, ReadChunk, check_range
from .forward import ForwardingDevice


class OffsetDevice(ForwardingDevice):
    """The bytes of ``inner`` from ``offset`` to its end."""

    def __init__(self, inner: BlockDevice, offset: int):
        if not 0 <= offset <= inner.size:
            raise OSError(errno.EINVAL, f"offset {offset} is beyond the image's {inner.size} bytes")
        super().__init__(inner)
        self.offset = offset
        self.size = inner.size - offset

    def _shift(self, chunks: list[ReadChunk] | None) -> list[ReadChunk] | None:
        if chunks is None:
            return None
        return [ReadChunk(c.offset - self.offset, c.length, c.data) for c in chunks]

    async def pread(self, offset: int, length: int) -> bytes | bytearray:
        check_range(self.size, offset, length)
        return await self.inner.pread(offset + self.offset, length)

    async def read_sparse(self, offset: int, length: int) -> list[ReadChunk]:
        check_range(self.size, offset, length)
        return self._shift(await self.inner.read_sparse(offset + self.offset, length))

    def read_sparse_now(self, offset: int, length: int, file_slices: bool = False) -> list[ReadChunk] | None:
        check_range(self.size, offset, length)
        return self._shift(self.inner.read_sparse_now(offset + self.offset, length, file_slices))

    async def pwrite(self, offset: int, data, fua: bool = False) -> None:
        check_range(self.size, offset, len(data))
        await self.inner.pwrite(offset + self.offset, data, fua)

    def pwrite_now(self, offset: int, data) -> bool:
        check_range(self.size, offset, len(data))
        return self.inner.pwrite_now(offset + self.offset, data)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        check_range(self.size, offset, length)
        await self.inner.trim(offset + self.offset, length, fua)

    async def zero(self, offset: int, length: int, *, may_trim: bool = False,
                   fua: bool = False, fast: bool = False) -> None:
        check_range(self.size, offset, length)
        await self.inner.zero(offset + self.offset, length, may_trim=may_trim, fua=fua, fast=fast)

    async def cache(self, offset: int, length: int) -> None:
        check_range(self.size, offset, length)
        await self.inner.cache(offset + self.offset, length)

    async def extents(self, offset: int, length: int) -> list[Extent]:
        check_range(self.size, offset, length)
        return await self.inner.extents(offset + self.offset, length)
