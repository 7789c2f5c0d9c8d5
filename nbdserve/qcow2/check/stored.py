"""The refcounts the image stores, as the check reads (and a repair writes) them.

Blocks are read when asked for and a few kept (the check walks them in order), one byte per
entry where every entry fits (fastpaths.narrow_refblock), else as array('Q').
"""

from __future__ import annotations

from array import array
from collections import OrderedDict

from .. import format as fmt
from ..l2cache import decode_table
from .fastpaths import decode_refblock, narrow_refblock

CACHED_BLOCKS = 16


class StoredRefcounts:
    """The refcount table and its blocks; ``read(n, offset)`` reads zeros past the end of the
    file (qemu's file driver), ``file_len`` is the file's size."""

    def __init__(self, fd: int, h, read, file_len: int):
        self.fd, self.h, self.read, self.file_len = fd, h, read, file_len
        self.cs, self.cluster_bits = h.cluster_size, h.cluster_bits
        self.refbits = 1 << h.refcount_order
        self.block_bits = h.cluster_bits + 3 - h.refcount_order
        self.block_entries = 1 << self.block_bits
        self.table = decode_table(read(h.refcount_table_clusters * self.cs, h.refcount_table_offset))
        self._cache: OrderedDict[int, bytes | array | None] = OrderedDict()
        self._zero_raw = bytes(self.cs)
        self._ones = bytes([1]) * self.block_entries, array("Q", [1]) * self.block_entries
        self._writer = None

    def raw(self, ti: int) -> bytes | None:
        """The bytes of refcount block ti (zeros where there is none); None when the table
        entry is unaligned (an EIO in qemu)."""
        entry = self.table[ti] if ti < len(self.table) else 0
        off = entry & fmt.REFT_OFFSET_MASK
        if off & (self.cs - 1):
            return None
        if not off or off >= self.file_len:
            return self._zero_raw
        return self.read(self.cs, off)

    def block(self, ti: int) -> bytes | array | None:
        """Refcount block ti's entries (indexable ints); None as for raw()."""
        cache = self._cache
        try:
            cache.move_to_end(ti)
            return cache[ti]
        except KeyError:
            pass
        raw = self.raw(ti)
        blk = None if raw is None else narrow_refblock(raw, self.refbits)
        if blk is None and raw is not None:
            blk = decode_refblock(raw, self.refbits)
        cache[ti] = blk
        if len(cache) > CACHED_BLOCKS:
            cache.popitem(last=False)
        return blk

    def get(self, cluster: int) -> int | None:
        blk = self.block(cluster >> self.block_bits)
        return None if blk is None else blk[cluster & (self.block_entries - 1)]

    def set(self, cluster: int, value: int) -> None:
        """Write one refcount in place (its refcount block exists: stored value > 0 or a block)."""
        if self._writer is None:
            from ..refcount import Refcounts
            self._writer = Refcounts(self.fd, self.h.cluster_bits, self.h.refcount_order, list(self.table),
                                     self.h.refcount_table_offset, lambda event: None,
                                     max_cached_blocks=CACHED_BLOCKS)
        self._writer.set(cluster, value)
        self._cache.pop(cluster >> self.block_bits, None)

    def all_one(self, k: int, m: int, one: bool = True) -> bool:
        """True if clusters k .. k+m-1 all have the stored refcount 1 (``one`` False: none
        has), by slices, not a loop over the entries; False too where a block is broken."""
        end = k + m
        bb, B = self.block_bits, self.block_entries
        while k < end:
            blk = self.block(k >> bb)
            if blk is None:
                return False
            a = k & (B - 1)
            b = min(B, a + end - k)
            part = blk[a:b]
            if (part != self._ones[isinstance(blk, array)][:b - a]) if one else 1 in part:
                return False
            k += b - a
        return True
