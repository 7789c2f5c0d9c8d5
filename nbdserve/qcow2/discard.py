"""Discard and write-zeroes (qemu: qcow2_co_pdiscard / qcow2_co_pwrite_zeroes and, for the
qemu-1.1.2 modes, 1.1.x's qcow2_discard_clusters / qcow2_zero_clusters)."""

from __future__ import annotations

import errno

from . import format as fmt
from .mapping import EXTL2_ALL_ZERO

ZERO_WRITE_PIECE = 32 << 20


class ClusterDiscard:
    """Qcow2Image's discard and zero paths (a mixin)."""

    def _zero_entry(self) -> tuple[int, int]:
        if self.extended_l2:
            return 0, EXTL2_ALL_ZERO
        return fmt.QCOW_OFLAG_ZERO, 0

    async def _set_clusters(self, first: int, last: int, new_for, cause: str) -> None:
        """Rewrite the L2 entries of guest clusters [first, last) with ``new_for(entry, bitmap)``
        (None: leave as is); queues the freed host clusters.  Lock held."""
        c = first
        while c < last:
            pos = c << self.cluster_bits
            l1_index = pos >> self.l1_shift
            span_end = min(last, (l1_index + 1) << self.l2_bits)
            table = self._l2_table_for(l1_index)
            changes = []
            for cc in range(c, span_end):
                idx = cc & (self.l2_entries - 1)
                entry, bitmap = self._entry(table, idx) if table is not None else (0, 0)
                new = new_for(entry, bitmap)
                if new is not None and new != (entry, bitmap):
                    changes.append((idx, entry, new))
            if changes:
                # the event first: the table must not leave the cache between lookup and change
                await self.events.fire("l2_update")
                table, _ = await self._get_cluster_table(pos)
                for idx, _, new in changes:
                    old, oldbm = self._entry(table, idx)
                    self._set_entry(table, idx, *new)
                    if old & fmt.L2E_OFFSET_MASK and (new[0] & fmt.L2E_OFFSET_MASK) != (old & fmt.L2E_OFFSET_MASK):
                        self._free_entry(old, cause)
                    elif old & fmt.QCOW_OFLAG_COMPRESSED:
                        self._free_entry(old, cause)
                self.l2cache.mark_dirty(self._l2_offset(pos))
            c = span_end

    def _aligned_part(self, offset: int, length: int) -> tuple[int, int]:
        cs = self.cluster_size
        first = (offset + cs - 1) >> self.cluster_bits
        end = offset + length
        # the tail of an image whose size is not cluster-aligned counts as whole
        last = ((end + cs - 1) if end == self.size else end) >> self.cluster_bits
        return first, max(first, last)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """qemu: qcow2_co_pdiscard(): whole clusters only; v3 reads zeros, v2 the backing file."""
        self._check_writable(offset, length)
        self.bitmaps.mark(offset, length)
        if self.policy.follows_1_1:
            await self._discard_1_1(offset, length)
            if fua:
                await self.flush()
            return
        first, last = self._aligned_part(offset, length)

        def discarded(entry, bitmap):
            allocated = bool(entry & (fmt.L2E_OFFSET_MASK | fmt.QCOW_OFLAG_COMPRESSED))
            if not allocated and self.backing is None:
                return None
            if self.version >= 3:
                return self._zero_entry()
            return (0, 0)

        async with self.lock:
            # an allocating write in flight would point L2 at its new cluster after us, with
            # the copy-on-write it made of the cluster's old content (as zero() does, wait)
            await self._wait_in_flight(first, last)
            await self._set_clusters(first, last, discarded, "discard")
        if fua:
            await self.flush()

    async def zero(self, offset: int, length: int, *, may_trim: bool = False,
                   fua: bool = False, fast: bool = False) -> None:
        self._check_writable(offset, length)
        self.bitmaps.mark(offset, length)
        if self.policy.follows_1_1:
            await self._zero_1_1(offset, length, fast)
            if fua:
                await self.flush()
            return
        if self.version < 3:
            if fast:
                raise OSError(errno.ENOTSUP, "qcow2 v2 has no zero clusters")
            return await super().zero(offset, length, fua=fua)
        first, last = self._aligned_part(offset, length)
        head_end = min(offset + length, first << self.cluster_bits)
        tail_start = max(head_end, last << self.cluster_bits)
        partial = [(offset, head_end - offset), (tail_start, offset + length - tail_start)]
        partial = [(o, n) for o, n in partial if n > 0]
        nonzero = [(o, n) for o, n in partial if any(await self.pread(o, n))]
        if fast and nonzero:
            raise OSError(errno.ENOTSUP, "unaligned zeroing would need a write")
        for o, n in nonzero:
            await self.pwrite(o, bytes(n))

        zero_entry = self._zero_entry()

        def zeroed(entry, bitmap):
            if not may_trim and self._keepable(entry, bitmap):
                # NO_HOLE: keep the allocation, flag it zero (qemu: QCOW2_SUBCLUSTER_ZERO_ALLOC;
                # extended L2: the host offset stays, every subcluster reads zeros)
                return (entry, EXTL2_ALL_ZERO) if self.extended_l2 else (entry | fmt.QCOW_OFLAG_ZERO, 0)
            return zero_entry

        if last > first:
            async with self.lock:
                await self._wait_in_flight(first, last)
                await self._set_clusters(first, last, zeroed, "zero")
        if fua:
            await self.flush()

    async def _wait_in_flight(self, first: int, last: int) -> None:
        """Let allocations in flight over [first, last) finish before their entries change."""
        while True:
            for m in self.cluster_allocs:
                s = m.offset >> self.cluster_bits
                if s < last and s + m.nb_clusters > first:
                    await self._unlocked(m.done.wait)
                    break
            else:
                return

    # -- qemu 1.1.x, for the qemu-1.1.2 modes
    async def _discard_1_1(self, offset: int, length: int) -> None:
        """1.1 qcow2_co_discard() -> qcow2_discard_clusters(): start rounded up, end down (also at
        the disk's end); an allocated entry becomes 0 (so an overlay reads its backing file
        again, even on v3) and its clusters are freed at once.  No wait for allocations in
        flight."""
        cs = self.cluster_size
        start = -(-offset // cs) * cs
        end = (offset + length) & ~(cs - 1)
        if start >= end:
            return

        def discarded(entry: int) -> int | None:
            return None if not entry & fmt.L2E_OFFSET_MASK else 0

        async with self.lock:
            await self._rewrite_l2_1_1(start, (end - start) >> self.cluster_bits, discarded, "discard")

    async def _zero_1_1(self, offset: int, length: int, fast: bool) -> None:
        """1.1 qcow2_co_write_zeroes(): a request not aligned to clusters, or any on a v2 image
        (-ENOTSUP), is written as zeros through the write path (block.c
        bdrv_co_do_write_zeroes' bounce buffer); else every entry gets the zero flag, keeping
        its allocation, and a compressed one is freed (qcow2_zero_clusters)."""
        cs = self.cluster_size
        if offset % cs or length % cs or self.version < 3:
            if fast:
                raise OSError(errno.ENOTSUP, "qemu 1.1 writes this zeroing as data")
            pos, end = offset, offset + length
            while pos < end:   # in 32 MiB pieces (cluster-aligned cuts) rather than one buffer
                n = min(end, (pos | (ZERO_WRITE_PIECE - 1)) + 1) - pos
                await self.pwrite(pos, bytes(n))
                pos += n
            return

        def zeroed(entry: int) -> int:
            return fmt.QCOW_OFLAG_ZERO if entry & fmt.QCOW_OFLAG_COMPRESSED else entry | fmt.QCOW_OFLAG_ZERO

        async with self.lock:
            await self._rewrite_l2_1_1(offset, length >> self.cluster_bits, zeroed, "zero")

    async def _rewrite_l2_1_1(self, offset: int, nb_clusters: int, new_entry, cause: str) -> None:
        """1.1 discard_single_l2() / zero_single_l2() over each L2 table in turn:
        get_cluster_table() allocates a missing table; ``new_entry(old)`` gives the new entry
        (None: unchanged); the old entry's clusters are freed right after it changed."""
        while nb_clusters > 0:
            table, l2_index = await self._get_cluster_table(offset)
            n = min(nb_clusters, self.l2_entries - l2_index)
            for i in range(l2_index, l2_index + n):
                old = table[i]
                new = new_entry(old)
                if new is None:
                    continue
                self.l2cache.mark_dirty(self._l2_offset(offset))
                table[i] = new
                if new & fmt.L2E_OFFSET_MASK != old & fmt.L2E_OFFSET_MASK:
                    self._free_entry(old, cause)
            nb_clusters -= n
            offset += n << self.cluster_bits
