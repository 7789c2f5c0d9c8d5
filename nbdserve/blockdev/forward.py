"""ForwardingDevice: a layer on top of another BlockDevice that passes everything through
(nbdkit's filter with no callbacks); filters override what they change."""

from __future__ import annotations

from .base import BlockDevice, Extent, ReadChunk


class ForwardingDevice(BlockDevice):
    def __init__(self, inner: BlockDevice):
        self.inner = inner
        self.size = inner.size
        self.read_only = inner.read_only

    def can_write(self) -> bool:
        return self.inner.can_write()

    def can_flush(self) -> bool:
        return self.inner.can_flush()

    def can_fua(self) -> bool:
        return self.inner.can_fua()

    def can_trim(self) -> bool:
        return self.inner.can_trim()

    def can_zero(self) -> bool:
        return self.inner.can_zero()

    def can_fast_zero(self) -> bool:
        return self.inner.can_fast_zero()

    def can_cache(self) -> bool:
        return self.inner.can_cache()

    def can_extents(self) -> bool:
        return self.inner.can_extents()

    def can_multi_conn(self) -> bool:
        return self.inner.can_multi_conn()

    async def pread(self, offset: int, length: int) -> bytes | bytearray:
        return await self.inner.pread(offset, length)

    async def read_sparse(self, offset: int, length: int) -> list[ReadChunk]:
        return await self.inner.read_sparse(offset, length)

    def read_sparse_now(self, offset: int, length: int, file_slices: bool = False) -> list[ReadChunk] | None:
        return self.inner.read_sparse_now(offset, length, file_slices)

    async def pwrite(self, offset: int, data, fua: bool = False) -> None:
        await self.inner.pwrite(offset, data, fua)

    def pwrite_now(self, offset: int, data) -> bool:
        return self.inner.pwrite_now(offset, data)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self.inner.trim(offset, length, fua)

    async def zero(self, offset: int, length: int, *, may_trim: bool = False,
                   fua: bool = False, fast: bool = False) -> None:
        await self.inner.zero(offset, length, may_trim=may_trim, fua=fua, fast=fast)

    async def flush(self) -> None:
        await self.inner.flush()

    async def cache(self, offset: int, length: int) -> None:
        await self.inner.cache(offset, length)

    async def extents(self, offset: int, length: int) -> list[Extent]:
        return await self.inner.extents(offset, length)

    async def close(self) -> None:
        await self.inner.close()
