"""Reference counts: the refcount table, cached refcount blocks, cluster allocation.

qcow2.txt: "Host cluster management".  With ``write_back`` (the ``fixed`` allocator)
refcount changes stay in their cached blocks until the next fsync of the image, which
writes them first (sync(): qemu's refcount block cache, which the L2 cache depends on);
so an increment is durable before any L2 or L1 entry pointing at the cluster is written,
and decrements are applied by the image only after the L2 entries that dropped the
reference are durable.  Without it (the qemu-1.1.2 modes, check's repairs) each update is
written through, one entry per pwrite.
"""

from __future__ import annotations

import errno
import os
import sys
from array import array
from collections import OrderedDict
from typing import Callable

from ..blockdev import fileio
from ..blockdev.fileio import pwrite_all
from . import format as fmt

_ARRAY_CODE = {8: "B", 16: "H", 32: "I", 64: "Q"}
_LITTLE = sys.byteorder == "little"
assert all(array(code).itemsize * 8 == bits for bits, code in _ARRAY_CODE.items())


def _decode(raw: bytes, bits: int) -> array:
    if bits >= 8:
        a = array(_ARRAY_CODE[bits], raw)
        if _LITTLE and bits > 8:
            a.byteswap()
        return a
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    # qcow2.txt: sub-byte refcounts are packed starting at the least significant bit
    return array("B", [(b >> (i * bits)) & mask for b in raw for i in range(per_byte)])


def _encode(values, bits: int) -> bytes:
    """A refcount block's on-disk bytes (the inverse of _decode)."""
    if bits >= 8:
        out = array(_ARRAY_CODE[bits], values)
        if _LITTLE and bits > 8:
            out.byteswap()
        return out.tobytes()
    per_byte = 8 // bits
    raw = bytearray(len(values) // per_byte)
    for i, v in enumerate(values):
        if v:
            raw[i // per_byte] |= v << ((i % per_byte) * bits)
    return bytes(raw)


class CorruptRefcounts(OSError):
    """The refcounts would hand out a cluster that holds fixed metadata."""


class Refcounts:
    """The refcount table and a bounded cache of decoded refcount blocks."""

    def __init__(self, fd: int, cluster_bits: int, refcount_order: int, table: list[int],
                 table_offset: int, on_event: Callable[[str], None],
                 on_table_moved: Callable[[int, int], None] = lambda offset, clusters: None,
                 max_cached_blocks: int = 256):
        self.fd = fd
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.bits = 1 << refcount_order
        self.max_refcount = (1 << self.bits) - 1
        self.block_entries_bits = cluster_bits + 3 - refcount_order
        self.block_entries = 1 << self.block_entries_bits
        self.table = table
        self.table_offset = table_offset
        self.blocks: OrderedDict[int, array] = OrderedDict()
        self.max_cached_blocks = max_cached_blocks
        self.free_cluster_index = 0
        self.end_cluster = 0           # one past the highest cluster ever allocated here
        self.on_event = on_event
        self.on_table_moved = on_table_moved   # header update once a grown table is durable
        self.unwritten: set[int] = set()   # clusters whose decrement is not on disk yet (see change)
        self.write_back = False            # changes wait in their blocks for sync() (see module doc)
        self.dirty_blocks: set[int] = set()   # refcount table indexes of blocks sync() must write

    # -- reading
    def _block(self, ti: int) -> array | None:
        blk = self.blocks.get(ti)
        if blk is not None:
            self.blocks.move_to_end(ti)
            return blk
        if ti >= len(self.table):
            return None
        off = self.table[ti] & fmt.REFT_OFFSET_MASK
        if not off:
            return None
        if off & (self.cluster_size - 1) or off >= 1 << 63:   # qemu: "Refblock offset ... unaligned"; off_t
            raise OSError(errno.EIO, f"refcount block offset {off:#x} invalid (refcount table index {ti})")
        self.on_event("refblock_load")
        raw = os.pread(self.fd, self.cluster_size, off)
        if len(raw) < self.cluster_size:
            raise OSError(errno.EIO, f"refcount block at {off:#x} lies past the end of the file")
        blk = _decode(raw, self.bits)
        self.blocks[ti] = blk
        if len(self.blocks) > self.max_cached_blocks:
            self._evict()
        return blk

    def _evict(self) -> None:
        """Drop the least recently used block that holds no unwritten refcount."""
        pinned = {c >> self.block_entries_bits for c in self.unwritten} | self.dirty_blocks
        for ti in self.blocks:
            if ti not in pinned:
                del self.blocks[ti]
                return

    def get(self, cluster: int) -> int:
        blk = self._block(cluster >> self.block_entries_bits)
        return 0 if blk is None else blk[cluster & (self.block_entries - 1)]

    # -- writing
    def _write_entry(self, ti: int, blk: array, index: int) -> None:
        base = self.table[ti] & fmt.REFT_OFFSET_MASK
        if self.bits >= 8:
            nbytes = self.bits // 8
            fileio.pwrite_all(self.fd, blk[index].to_bytes(nbytes, "big"), base + index * nbytes)
        else:
            per_byte = 8 // self.bits
            first = index - index % per_byte
            byte = 0
            for i in range(per_byte):
                byte |= blk[first + i] << (i * self.bits)
            fileio.pwrite_all(self.fd, bytes([byte]), base + first // per_byte)

    def set(self, cluster: int, value: int, write: bool = True) -> None:
        """Write one refcount; the refcount block must exist (see ensure_blocks).  With
        ``write`` False the change is made in memory only and written by write_unwritten()."""
        if not 0 <= value <= self.max_refcount:
            raise OSError(errno.ERANGE if value > 0 else errno.EIO,
                          f"refcount of cluster {cluster} out of range: {value}")
        ti = cluster >> self.block_entries_bits
        blk = self._block(ti)
        assert blk is not None, "refcount block missing"
        index = cluster & (self.block_entries - 1)
        blk[index] = value
        self.on_event("refblock_update")
        if write and self.write_back:
            self.dirty_blocks.add(ti)
        elif write:
            self._write_entry(ti, blk, index)
            self.unwritten.discard(cluster)
        else:
            self.unwritten.add(cluster)
        if value == 0 and cluster < self.free_cluster_index:
            self.free_cluster_index = cluster

    def change(self, offset: int, nbytes: int, delta: int, write: bool = True) -> None:
        """Add ``delta`` to the refcounts of the clusters the byte range touches.  A decrement
        with ``write`` False is in force at once (the clusters can be allocated again) but
        reaches the disk only with write_unwritten(): qemu 1.1's refcount cache depends on
        the L2 cache for decrements (update_refcount: qcow2_cache_set_dependency)."""
        first = offset >> self.cluster_bits
        last = (offset + nbytes - 1) >> self.cluster_bits
        if delta > 0:
            self.ensure_blocks(first, last + 1)
        for c in range(first, last + 1):
            self.set(c, self.get(c) + delta, write or delta > 0)
        if delta > 0:
            self.end_cluster = max(self.end_cluster, last + 1)

    def write_dirty(self) -> None:
        """Write the blocks write_back left changed (whole blocks, in table order)."""
        for ti in sorted(self.dirty_blocks):
            self._write_block(self.table[ti] & fmt.REFT_OFFSET_MASK, self.blocks[ti], "refblock_update_part")   # qemu: qcow2_cache_entry_flush()
        self.dirty_blocks.clear()

    def sync(self) -> None:
        """fsync the image, the refcount changes still cached written first."""
        if self.dirty_blocks:
            self.write_dirty()
        fileio.fsync(self.fd)

    def write_unwritten(self) -> None:
        """Write the refcounts change(write=False) left in memory only."""
        for c in sorted(self.unwritten):
            ti = c >> self.block_entries_bits
            self._write_entry(ti, self._block(ti), c & (self.block_entries - 1))
        self.unwritten.clear()

    # -- allocation (qemu: alloc_clusters_noref, qcow2_alloc_clusters_at)
    def find_free(self, n: int) -> int:
        """First fit from free_cluster_index: the first cluster of a free run of ``n``."""
        c = self.free_cluster_index
        run = 0
        while run < n:
            if self.get(c) == 0:
                self.check_not_fixed_metadata(c)
                run += 1
            else:
                run = 0
            c += 1
        return c - n

    def check_not_fixed_metadata(self, cluster: int) -> None:
        """The header and the refcount table are always in use: counted free, the refcounts are
        corrupt and handing them out would overwrite them (qemu: qcow2_pre_write_overlap_check)."""
        offset = cluster << self.cluster_bits
        if cluster == 0 or self.table_offset <= offset < self.table_offset + len(self.table) * 8:
            raise CorruptRefcounts(errno.EIO, f"refcount of cluster {offset:#x} ("
                                   f"{'the header' if cluster == 0 else 'the refcount table'}) is 0: "
                                   "the refcounts are corrupt")

    def alloc(self, n: int) -> int:
        """Allocate ``n`` contiguous clusters; returns the host offset."""
        while True:
            start = self.find_free(n)
            if self.ensure_blocks(start, start + n):
                continue  # a new refcount block may have taken one of them: search again
            self.on_event("cluster_alloc")
            for c in range(start, start + n):
                self.set(c, 1)
            self.free_cluster_index = start + n
            self.end_cluster = max(self.end_cluster, start + n)
            return start << self.cluster_bits

    def alloc_at(self, offset: int, n: int) -> int:
        """Allocate up to ``n`` clusters starting exactly at ``offset``; returns how many."""
        first = offset >> self.cluster_bits
        count = 0
        while count < n and self.get(first + count) == 0:
            self.check_not_fixed_metadata(first + count)
            count += 1
        if count == 0:
            return 0
        if self.ensure_blocks(first, first + count):
            return self.alloc_at(offset, n)
        self.on_event("cluster_alloc")
        for c in range(first, first + count):
            self.set(c, 1)
        self.end_cluster = max(self.end_cluster, first + count)
        return count

    def ensure_blocks(self, first: int, end: int) -> bool:
        """Make sure clusters [first, end) have refcount blocks.  True if any was created."""
        created = False
        ti = first >> self.block_entries_bits
        last_ti = (end - 1) >> self.block_entries_bits
        while ti <= last_ti:
            if ti < len(self.table) and self.table[ti] & fmt.REFT_OFFSET_MASK:
                ti += 1
                continue
            self._create_block(ti)
            created = True
        return created

    def _create_block(self, ti: int) -> None:
        """Allocate the refcount block for table index ``ti`` (qemu: alloc_refcount_block)."""
        if ti >= len(self.table):
            self._grow_table(ti)
            return
        self.on_event("refblock_alloc")
        r = self.find_free(1)
        rti = r >> self.block_entries_bits
        blk = _decode(bytes(self.cluster_size), self.bits)
        if rti == ti:
            blk[r & (self.block_entries - 1)] = 1      # the block describes itself
        elif rti < len(self.table) and self.table[rti] & fmt.REFT_OFFSET_MASK:
            self.set(r, 1)
        else:
            self._create_block(rti)                    # its own block first; caller retries
            return
        self._write_block(r << self.cluster_bits, blk)
        self.sync()                              # the block before the table entry
        self.on_event("refblock_alloc_hookup")
        self.table[ti] = r << self.cluster_bits
        fileio.pwrite_all(self.fd, fmt.U64.pack(self.table[ti]), self.table_offset + ti * 8)
        self.blocks[ti] = blk
        self.end_cluster = max(self.end_cluster, r + 1)

    def _write_block(self, offset: int, blk: array, event: str = "refblock_alloc_write") -> None:
        self.on_event(event)
        pwrite_all(self.fd, _encode(blk, self.bits), offset)

    def _grow_table(self, min_ti: int) -> None:
        """Move the refcount table to the end of the image, bigger (qemu: refcount table growth).

        The new table and the refcount blocks that describe it are placed past
        everything allocated, written, made durable, and only then hooked into
        the header.
        """
        self.on_event("reftable_grow")
        cs = self.cluster_size
        file_clusters = (os.fstat(self.fd).st_size + cs - 1) >> self.cluster_bits
        start = max(file_clusters, self.end_cluster)
        entries = max(min_ti + 1, len(self.table) * 2, cs // 8)
        while True:
            entries = (entries * 8 + cs - 1) // cs * cs // 8
            tclusters = entries * 8 // cs
            nblocks = 0
            while True:
                end = start + tclusters + nblocks
                missing = [t for t in range(start >> self.block_entries_bits,
                                            ((end - 1) >> self.block_entries_bits) + 1)
                           if t >= len(self.table) or not self.table[t] & fmt.REFT_OFFSET_MASK]
                if len(missing) <= nblocks:
                    break
                nblocks = len(missing)
            if not missing or max(missing) < entries:
                break
            entries = max(missing) + 1
        end = start + tclusters + nblocks
        new_table = list(self.table) + [0] * (entries - len(self.table))
        new_blocks: dict[int, array] = {}
        for i, t in enumerate(missing):
            new_table[t] = (start + tclusters + i) << self.cluster_bits
            new_blocks[t] = _decode(bytes(cs), self.bits)
        # refcounts of the new table and blocks: in the new blocks, or set through old ones
        old_covered = []
        for c in range(start, end):
            t = c >> self.block_entries_bits
            if t in new_blocks:
                new_blocks[t][c & (self.block_entries - 1)] = 1
            else:
                old_covered.append(c)
        for t, blk in new_blocks.items():
            self._write_block(new_table[t], blk)
        for c in old_covered:
            self.set(c, 1)
        raw = b"".join(fmt.U64.pack(e) for e in new_table)
        self.on_event("refblock_alloc_write_table")
        pwrite_all(self.fd, raw, start << self.cluster_bits)
        self.sync()
        old_offset, old_clusters = self.table_offset, (len(self.table) * 8 + cs - 1) // cs
        self.on_event("refblock_alloc_switch_table")
        self.on_table_moved(start << self.cluster_bits, tclusters)
        self.table = new_table
        self.table_offset = start << self.cluster_bits
        self.blocks.update(new_blocks)
        self.end_cluster = max(self.end_cluster, end)
        # the old table is unreferenced once the header switch is durable
        self.change(old_offset, old_clusters * cs, -1)


class Refcounts11(Refcounts):
    """Cluster and refcount block allocation as qemu 1.1.x places them (qcow2-refcount.c:
    alloc_clusters_noref, qcow2_alloc_clusters, qcow2_alloc_clusters_at, update_refcount,
    alloc_refcount_block), for the qemu-1.1.2 modes: where a new refcount block or a grown
    refcount table lands decides which host clusters data gets afterwards.  qemu 1.1 knows
    16-bit refcounts only."""

    def _noref(self, n: int) -> int:
        """1.1 alloc_clusters_noref(): first fit, advancing free_cluster_index past the run."""
        i = 0
        while i < n:
            c = self.free_cluster_index
            self.free_cluster_index += 1
            if self.get(c) != 0:
                i = 0
            else:
                self.check_not_fixed_metadata(c)
                i += 1
        return self.free_cluster_index - n

    def alloc(self, n: int) -> int:
        """1.1 qcow2_alloc_clusters()."""
        self.on_event("cluster_alloc")
        start = self._noref(n)
        self._increment(start, n)
        return start << self.cluster_bits

    def alloc_at(self, offset: int, n: int) -> int:
        """1.1 qcow2_alloc_clusters_at(): up to ``n`` free clusters from ``offset``; a refcount
        block it needs is placed after them (free_cluster_index is moved there meanwhile)."""
        first = offset >> self.cluster_bits
        index = first
        count = 0
        while count < n:
            refcount = self.get(index)
            index += 1
            if refcount != 0:
                break
            self.check_not_fixed_metadata(index - 1)
            count += 1
        if count:
            old_free = self.free_cluster_index
            self.free_cluster_index = index + count    # sic (1.1.2)
            self._increment(first, count)
            self.free_cluster_index = old_free
        return count

    def change(self, offset: int, nbytes: int, delta: int, write: bool = True) -> None:
        if delta <= 0:
            return super().change(offset, nbytes, delta, write)
        first = offset >> self.cluster_bits
        last = (offset + nbytes - 1) >> self.cluster_bits
        self._increment(first, last - first + 1)

    def _increment(self, first: int, count: int) -> None:
        """1.1 update_refcount(+1): each cluster's refcount block is allocated when reached."""
        ti = -1
        for c in range(first, first + count):
            if c >> self.block_entries_bits != ti:
                ti = c >> self.block_entries_bits
                self._alloc_block(c)
            self.set(c, self.get(c) + 1)
        self.end_cluster = max(self.end_cluster, first + count)

    def _alloc_block(self, cluster: int) -> None:
        """1.1 alloc_refcount_block()."""
        ti = cluster >> self.block_entries_bits
        if ti < len(self.table) and self.table[ti] & fmt.REFT_OFFSET_MASK:
            return
        self.on_event("refblock_alloc")
        new_block = self._noref(1)
        if new_block >> self.block_entries_bits == ti:      # in_same_refcount_block()
            blk = _decode(bytes(self.cluster_size), self.bits)
            blk[new_block & (self.block_entries - 1)] = 1    # the block describes itself
        else:
            self._increment(new_block, 1)                    # described elsewhere
            blk = _decode(bytes(self.cluster_size), self.bits)
        self._write_block(new_block << self.cluster_bits, blk)
        self.sync()
        self.end_cluster = max(self.end_cluster, new_block + 1)
        if ti < len(self.table):
            self.on_event("refblock_alloc_hookup")
            self.table[ti] = new_block << self.cluster_bits
            fileio.pwrite_all(self.fd, fmt.U64.pack(self.table[ti]), self.table_offset + ti * 8)
            self.sync()
            self.blocks[ti] = blk
            return
        self._grow_table_11(ti, new_block, blk)

    def _next_table_size(self, min_size: int) -> int:
        """1.1 next_refcount_table_size(): in entries, grown by half until it fits."""
        shift = self.cluster_bits - 3
        min_clusters = (min_size >> shift) + 1
        clusters = max(1, len(self.table) >> shift)
        while min_clusters > clusters:
            clusters = (clusters * 3 + 1) // 2
        return clusters << shift

    def _grow_table_11(self, ti: int, new_block: int, blk: array) -> None:
        """1.1 alloc_refcount_block(), second half: new refcount blocks describing themselves and
        a bigger table after them, placed at the first refcount block range past
        free_cluster_index; then the header switch; then the old table is freed."""
        self.on_event("reftable_grow")
        cs, rbc = self.cluster_size, self.block_entries
        blocks_used = -(-self.free_cluster_index // rbc)
        table_size = self._next_table_size(blocks_used + 1)
        while True:
            table_clusters = -(-table_size // cs)     # sic (1.1.2): size_to_clusters(s, table_size)
            blocks_clusters = 1 + -(-table_clusters // rbc)
            meta_clusters = table_clusters + blocks_clusters
            last_size = table_size
            table_size = self._next_table_size(blocks_used + -(-meta_clusters // rbc))
            if table_size == last_size:
                break
        meta = blocks_used * rbc
        table_offset = (meta + blocks_clusters) * cs
        new_table = list(self.table) + [0] * (table_size - len(self.table))
        new_table[ti] = new_block << self.cluster_bits
        for i in range(blocks_clusters):
            new_table[blocks_used + i] = (meta + i) * cs
        table_clusters = -(-table_size * 8 // cs)
        new_blocks = _decode(bytes(blocks_clusters * cs), self.bits)
        for i in range(table_clusters + blocks_clusters):
            new_blocks[i] = 1
        self.on_event("refblock_alloc_write")
        pwrite_all(self.fd, _encode(new_blocks, self.bits), meta * cs)
        self.sync()
        self.on_event("refblock_alloc_write_table")
        pwrite_all(self.fd, b"".join(fmt.U64.pack(e) for e in new_table), table_offset)
        self.sync()
        self.on_event("refblock_alloc_switch_table")
        self.on_table_moved(table_offset, table_clusters)
        old_offset, old_entries = self.table_offset, len(self.table)
        self.table = new_table
        self.table_offset = table_offset
        for i in range(blocks_clusters):
            self.blocks[blocks_used + i] = new_blocks[i * rbc:(i + 1) * rbc]
        self.blocks[ti] = blk
        self.end_cluster = max(self.end_cluster, meta + blocks_clusters + table_clusters)
        old_free = self.free_cluster_index      # "we must not change free_cluster_index"
        self.change(old_offset, old_entries * 8, -1, write=False)
        self.free_cluster_index = old_free
