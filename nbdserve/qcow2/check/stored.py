"""The refcounts the image stores, as the check reads (and a repair writes) them."""

from __future__ import annotations

from array import array

from .. import format as fmt
from ..l2cache import decode_table
from .fastpaths import decode_refblock


class StoredRefcounts:
    """The refcount table and its decoded blocks; ``read(n, offset)`` reads zeros past the
    end of the file (qemu's file driver), ``file_len`` is the file's size."""

    def __init__(self, fd: int, h, read, file_len: int):
        self.fd, self.h, self.read, self.file_len = fd, h, read, file_len
        self.cs, self.cluster_bits = h.cluster_size, h.cluster_bits
        self.refbits = 1 << h.refcount_order
        self.block_bits = h.cluster_bits + 3 - h.refcount_order
        self.block_entries = 1 << self.block_bits
        self.table = decode_table(read(h.refcount_table_clusters * self.cs, h.refcount_table_offset))
        self.blocks: dict[int, array | None] = {}
        self.zero_block = array("Q", [0]) * self.block_entries
        self._ones = array("Q", [1]) * self.block_entries
        self._writer = None

    def block(self, ti: int) -> array | None:
        """Decoded refcount block ti; None when the table entry is unaligned (an EIO in qemu)."""
        try:
            return self.blocks[ti]
        except KeyError:
            pass
        entry = self.table[ti] if ti < len(self.table) else 0
        off = entry & fmt.REFT_OFFSET_MASK
        if not off:
            blk = self.zero_block
        elif off & (self.cs - 1):
            blk = None
        elif off >= self.file_len:
            blk = self.zero_block
        else:
            blk = decode_refblock(self.read(self.cs, off), self.refbits)
        self.blocks[ti] = blk
        return blk

    def get(self, cluster: int) -> int | None:
        blk = self.block(cluster >> self.block_bits)
        return None if blk is None else blk[cluster & (self.block_entries - 1)]

    def set(self, cluster: int, value: int) -> None:
        """Write one refcount in place (its refcount block exists: stored value > 0 or a block)."""
        if self._writer is None:
            from ..refcount import Refcounts
            self._writer = Refcounts(self.fd, self.h.cluster_bits, self.h.refcount_order, list(self.table),
                                     self.h.refcount_table_offset, lambda event: None)
        self._writer.set(cluster, value)
        self.block(cluster >> self.block_bits)[cluster & (self.block_entries - 1)] = value

    def all_ones(self, k: int, m: int) -> bool:
        """True if clusters k .. k+m-1 all have the stored refcount 1 (slices, not a loop over
        the entries); False too where a refcount block is broken."""
        end = k + m
        bb, B = self.block_bits, self.block_entries
        while k < end:
            blk = self.block(k >> bb)
            if blk is None:
                return False
            a = k & (B - 1)
            b = min(B, a + end - k)
            if blk[a:b] != self._ones[:b - a]:
                return False
            k += b - a
        return True
