"""QemuBlockOptions: what qemu's block layer makes of qemu-nbd's ``--cache``, ``--discard``
and ``--detect-zeroes`` (block/io.c), as a filter on top of the image.

- discard ignored (qemu's default; ``--discard=ignore|off``): without BDRV_O_UNMAP,
  bdrv_co_pdiscard() succeeds doing nothing, and write-zeroes never unmaps
  (BDRV_REQ_MAY_UNMAP is dropped).
- writethrough (``--cache=writethrough|directsync``): blk_set_enable_write_cache(false),
  every write completes only once it is on stable storage (FUA).
- no flush (``--cache=unsafe``, BDRV_O_NO_FLUSH): flush requests succeed doing nothing.
- detect-zeroes ``on``: a write whose buffer is all zeros becomes a write-zeroes
  (bdrv_aligned_pwritev, BDRV_REQ_ZERO_WRITE); ``unmap``: one that may unmap too.
"""

from __future__ import annotations

from .base import BlockDevice
from .forward import ForwardingDevice


def _all_zero(data) -> bool:
    return bytes(data).count(0) == len(data)


class QemuBlockOptions(ForwardingDevice):
    def __init__(self, inner: BlockDevice, *, discard: bool = False, writethrough: bool = False,
                 no_flush: bool = False, detect_zeroes: str = "off"):
        super().__init__(inner)
        self.discard, self.writethrough, self.no_flush = discard, writethrough, no_flush
        self.detect_zeroes = detect_zeroes

    def can_trim(self) -> bool:
        return self.can_write()   # qemu advertises trim on every writable export

    async def pwrite(self, offset: int, data, fua: bool = False) -> None:
        fua = fua or self.writethrough
        if self.detect_zeroes != "off" and _all_zero(data):
            await self.zero(offset, len(data), may_trim=self.detect_zeroes == "unmap", fua=fua)
            return
        await self.inner.pwrite(offset, data, fua)

    def pwrite_now(self, offset: int, data) -> bool:
        if self.writethrough or self.detect_zeroes != "off":
            return False
        return self.inner.pwrite_now(offset, data)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        if self.discard and self.inner.can_trim():
            await self.inner.trim(offset, length, fua or self.writethrough)
        elif fua or self.writethrough:
            await self.flush()

    async def zero(self, offset: int, length: int, *, may_trim: bool = False,
                   fua: bool = False, fast: bool = False) -> None:
        await self.inner.zero(offset, length, may_trim=may_trim and self.discard,
                              fua=fua or self.writethrough, fast=fast)

    async def flush(self) -> None:
        if not self.no_flush:
            await self.inner.flush()
