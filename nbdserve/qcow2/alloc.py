"""Cluster allocation for writes: the allocation half of qemu's block/qcow2-cluster.c.

A model of qemu 1.1.x ``qcow2_co_writev`` -> ``qcow2_alloc_cluster_offset`` ->
``qcow2_alloc_cluster_link_l2`` with the in-flight allocation list
(``cluster_allocs``, qemu's ``s->cluster_allocs``); the AllocationPolicy decides
``avail_sectors`` and the other places where qemu 1.1.2 and its successors differ.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

import trio

from ..blockdev import check_range
from ..blockdev.fileio import pwrite_all, zero_allocated
from . import format as fmt
from .mapping import EXTL2_ALL_ALLOCATED, IN_PLACE_FLAGS
from .refcount import CorruptRefcounts

THREADED_WRITE = 2 << 20   # data writes this large run in a worker thread; smaller ones at once, as reads do


@dataclass(eq=False)
class L2Meta:
    """An allocation in flight (qemu: QCowL2Meta), in bytes."""

    offset: int            # guest offset of the first new cluster
    alloc_offset: int      # host offset of the first new cluster
    n_start: int           # bytes before the write in the first new cluster (head COW)
    nb_clusters: int
    nb_available: int      # MIN(requested, avail): where the tail COW is computed from
    fresh: bool = False    # the new clusters lie past anything the file ever held: they read as zeros
    record: dict | None = None   # its allocation trace record (trace.py), when tracing
    done: trio.Event = field(default_factory=trio.Event)


class ClusterAllocation:
    """Qcow2Image's write path (a mixin)."""

    def _alloc(self, n: int, at: int = 0) -> tuple[int, int]:
        """(host offset, clusters) of new clusters: ``n`` anywhere, or up to ``n`` exactly ``at``.
        Refcounts broken so that they would hand out the header, the refcount table or the
        active L1 table are corruption (qemu: qcow2_pre_write_overlap_check)."""
        try:
            host, count = (at, self.refcounts.alloc_at(at, n)) if at else (self.refcounts.alloc(n), n)
        except CorruptRefcounts as e:
            raise self._corruption(e.strerror) from None
        l1_start = self.header.l1_table_offset
        if count and host < l1_start + len(self.l1) * 8 and l1_start < host + count * self.cluster_size:
            raise self._corruption(f"refcount of the active L1 table at {l1_start:#x} is 0: the refcounts are corrupt")
        return host, count

    async def _get_cluster_table(self, pos: int) -> tuple[array, int]:
        """qemu: get_cluster_table(): the L2 table for ``pos``, allocated or copied if needed."""
        l1_index = pos >> self.l1_shift
        l1e = self.l1[l1_index]
        if l1e & fmt.QCOW_OFLAG_COPIED and l1e & fmt.L1E_OFFSET_MASK:
            table = self._l2_table_for(l1_index)
            return table, (pos >> self.cluster_bits) & (self.l2_entries - 1)
        old_off = l1e & fmt.L1E_OFFSET_MASK
        old = self._l2_table_for(l1_index) if old_off else None
        new_off, _ = self._alloc(1)
        table = array("Q", old) if old is not None else array("Q", bytes(self.cluster_size))
        await self.events.fire("l2_alloc_write")
        # the table is new: it reaches the disk at flush, before the L1 entry pointing at it
        self.l2cache.put(new_off, table, dirty=True)
        await self.events.fire("l1_update")
        self.l1[l1_index] = new_off | fmt.QCOW_OFLAG_COPIED
        self.l1_dirty.add(l1_index)
        if old_off:
            self._free_clusters(old_off, self.cluster_size, "l2_table")
        # a reader may have evicted the new table while the events above slept (cache pressure
        # writes it back first): return the cache's copy, never an orphan the caller would
        # change in vain
        table = self._l2_table_for(l1_index)
        return table, (pos >> self.cluster_bits) & (self.l2_entries - 1)

    def _free_entry(self, entry: int, cause: str = "replaced") -> None:
        """Free the host cluster(s) an old L2 entry referenced (qemu: qcow2_free_any_clusters;
        1.1's frees nothing for a zero cluster, even one that kept its allocation: a leak)."""
        if entry & fmt.QCOW_OFLAG_COMPRESSED:
            host = entry & self.compressed_offset_mask
            nb = ((entry >> self.compressed_shift) & self.compressed_count_mask) + 1
            first = host & ~(self.cluster_size - 1)
            last = (host + nb * 512 - (host & 511) - 1) & ~(self.cluster_size - 1)
            self._free_clusters(first, last - first + self.cluster_size, cause)
        elif entry & fmt.QCOW_OFLAG_ZERO and self.policy.follows_1_1:
            return
        elif entry & fmt.L2E_OFFSET_MASK:
            self._free_clusters(entry & fmt.L2E_OFFSET_MASK, self.cluster_size, cause)

    def _free_clusters(self, host: int, nbytes: int, cause: str) -> None:
        """qemu 1.1: qcow2_free_clusters() at once, so the very next allocation can take them
        (their refcount reaches the disk after the L2 change, at flush).  ``fixed``: queued,
        and freed at the flush that made the L2 change durable (image.flush)."""
        if self.trace is not None:
            self.trace.free(cause, host, nbytes, deferred=not self.policy.follows_1_1)
        if not self.policy.follows_1_1:
            self.pending_free.append((host, nbytes))
            return
        self.events.fire_sync("cluster_free")
        self.refcounts.change(host, nbytes, -1, write=False)
        self.l2cache.drop(host)

    def pwrite_now(self, offset: int, data) -> bool:
        """Write in place when every cluster touched is allocated and COPIED (qemu 1.1: the
        "keep" clusters of qcow2_alloc_cluster_offset(), which need no metadata change),
        else allocate at once where that cannot wait (_allocate_now).
        Only when no request holds the lock and no blkdebug event is armed, so the
        allocator's interleavings are exactly those of pwrite()."""
        length = len(data)
        if (self.events.armed or self.lock.locked() or self.read_only or self.corrupt
                or length >= THREADED_WRITE):
            return False
        check_range(self.size, offset, length)
        cmask = self.cluster_size - 1
        if (offset & cmask) + length <= self.cluster_size and not self.extended_l2:
            # inside one cluster, the common small write: one L2 entry to test (_keepable, inline)
            l1_index = offset >> self.l1_shift
            if l1_index < len(self.l1) and self.l1[l1_index] & fmt.QCOW_OFLAG_COPIED:
                table = self._l2_table_for(l1_index)
                entry = table[(offset >> self.cluster_bits) & (self.l2_entries - 1)] if table is not None else 0
                if entry & IN_PLACE_FLAGS == fmt.QCOW_OFLAG_COPIED and entry & fmt.L2E_OFFSET_MASK:
                    self._write_in_place(offset, data, [((entry & fmt.L2E_OFFSET_MASK) + (offset & cmask), 0, length)])
                    return True
            return self._allocate_now(offset, data)
        runs: list[list[int]] = []   # [host, start in data, length]
        pos, end = offset, offset + length
        while pos < end:
            l1_index = pos >> self.l1_shift
            if l1_index >= len(self.l1) or not self.l1[l1_index] & fmt.QCOW_OFLAG_COPIED:
                return self._allocate_now(offset, data)
            table = self._l2_table_for(l1_index)
            if table is None:
                return self._allocate_now(offset, data)
            entry, bitmap = self._entry(table, (pos >> self.cluster_bits) & (self.l2_entries - 1))
            if not self._keepable(entry, bitmap):
                return self._allocate_now(offset, data)
            host = (entry & fmt.L2E_OFFSET_MASK) + (pos & cmask)
            n = min(end, (pos | cmask) + 1) - pos
            if runs and runs[-1][0] + runs[-1][2] == host:
                runs[-1][2] += n
            else:
                runs.append([host, pos - offset, n])
            pos += n
        self._write_in_place(offset, data, runs)
        return True

    def _write_in_place(self, offset: int, data, runs) -> None:
        """Write ``data`` at guest ``offset`` into kept clusters: (host, start in data, length) runs."""
        self.bitmaps.mark(offset, len(data))
        self.events.fire_sync("write_aio")
        mv = memoryview(data).cast("B") if len(runs) > 1 else None   # one run is all of the data
        for host, start, n in runs:
            pwrite_all(self.fd, data if mv is None else mv[start:start + n], host)
            if self.trace is not None:
                self.trace.write(offset + start, host, n)

    def _allocate_now(self, offset: int, data) -> bool:
        """Run pwrite() to its end here when it cannot suspend: ``fixed`` (the qemu-1.1.2
        modes keep qemu's unlock points, where other requests interleave), no backing file
        (copy-on-write reads nothing that could wait), no allocation in flight to wait for;
        pwrite_now() made sure the lock is free, no event is armed and the write is small
        (its data and copy-on-write are written with the lock held: _keeps_lock)."""
        if self.policy.follows_1_1 or self.backing is not None or self.cluster_allocs:
            return False
        coro = self.pwrite(offset, data)
        try:
            coro.send(None)
        except StopIteration:
            return True
        coro.close()
        raise AssertionError("an allocating write run at once tried to suspend")

    async def pwrite(self, offset: int, data, fua: bool = False) -> None:
        self._check_writable(offset, len(data))
        mv = memoryview(data).cast("B")
        self.bitmaps.mark(offset, len(mv))
        done = 0
        async with self.lock:
            while done < len(mv):
                host, n, meta = await self._alloc_cluster_offset(offset + done, len(mv) - done)
                try:
                    if meta is not None and meta.fresh:
                        self._allocate_space(meta)
                    if self._keeps_lock(n):
                        self.events.fire_sync("write_aio")
                        pwrite_all(self.fd, mv[done:done + n], host)
                    else:
                        span = (host, n)
                        self.writes_in_flight.append(span)
                        try:
                            await self._unlocked(self._write_data, host, mv[done:done + n])
                        finally:
                            self.writes_in_flight.remove(span)
                    if self.trace is not None:
                        if meta is None:
                            self.trace.write(offset + done, host, n)
                        elif meta.record is not None:
                            self.trace.data_written(meta.record)
                    if meta is not None:
                        await self._link_l2(meta)
                finally:
                    if meta is not None:
                        self._run_dependent_requests(meta)
                done += n
        if fua:
            await self.flush()

    async def _write_data(self, host: int, chunk: memoryview) -> None:
        await self.events.fire("write_aio")
        if len(chunk) >= THREADED_WRITE:   # s->lock is not held: other requests go on meanwhile
            await trio.to_thread.run_sync(pwrite_all, self.fd, chunk, host)
        else:
            pwrite_all(self.fd, chunk, host)

    async def _alloc_cluster_offset(self, pos: int, remaining: int) -> tuple[int, int, L2Meta | None]:
        """qemu 1.1: qcow2_alloc_cluster_offset().  Returns (host offset of ``pos``,
        bytes this round covers, the in-flight allocation or None)."""
        cs = self.cluster_size
        while True:  # again:
            table, l2_index = await self._get_cluster_table(pos)
            n_start = pos & (cs - 1)
            n_end = n_start + remaining
            nb_clusters = min((n_end + cs - 1) // cs, self.l2_entries - l2_index)
            entry, bitmap = self._entry(table, l2_index)
            keep = 0
            cluster_offset = 0
            if self._keepable(entry, bitmap):
                cluster_offset = entry & fmt.L2E_OFFSET_MASK
                keep = self._count_contiguous(table, l2_index, nb_clusters, cluster_offset)
                nb_clusters -= keep
            if nb_clusters == 0:
                return cluster_offset + n_start, min(keep * cs, n_end) - n_start, None
            nb_clusters = self._count_cow_clusters(table, l2_index + keep, nb_clusters)
            guest_alloc = (pos & ~(cs - 1)) + keep * cs
            alloc_host = cluster_offset + keep * cs if keep else 0
            if nb_clusters:   # none: the next cluster is COPIED but not host-contiguous
                nb_clusters, wait_on = self._handle_dependencies(guest_alloc, nb_clusters)
                if wait_on is not None:
                    await self._unlocked(wait_on.done.wait)
                    continue  # recheck the free/allocated clusters
            never_used = self.refcounts.end_cluster
            if nb_clusters:
                if alloc_host == 0:
                    await self.events.fire("cluster_alloc")
                    alloc_host, _ = self._alloc(nb_clusters)
                else:
                    _, nb_clusters = self._alloc(nb_clusters, at=alloc_host)
            meta = None
            if nb_clusters:
                requested = n_end - keep * cs
                avail = self.policy.avail_bytes(keep, nb_clusters, cs)
                meta = L2Meta(offset=guest_alloc, alloc_offset=alloc_host,
                              n_start=0 if keep else n_start, nb_clusters=nb_clusters,
                              nb_available=min(requested, avail),
                              fresh=(alloc_host >> self.cluster_bits >= never_used
                                     and not self.policy.follows_1_1))
                # 1.1: QLIST_INSERT_HEAD, so handle_dependencies() meets the newest first
                self.cluster_allocs.insert(0, meta)
            covered = min((keep + nb_clusters) * cs, n_end) - n_start
            host = (cluster_offset if keep else alloc_host) + n_start
            if meta is not None and self.trace is not None:
                meta.record = self.trace.allocation(pos, remaining, cs, n_start, n_end, keep, nb_clusters,
                                                    cluster_offset, alloc_host, meta.nb_available,
                                                    covered, host)
            return host, covered, meta

    def _count_contiguous(self, table: array, idx: int, n: int, first_host: int) -> int:
        """qemu: count_contiguous_clusters() over COPIED, host-contiguous clusters."""
        i = 0
        while i < n:
            entry, bitmap = self._entry(table, idx + i)
            if not self._keepable(entry, bitmap) or entry & fmt.L2E_OFFSET_MASK != first_host + i * self.cluster_size:
                break
            i += 1
        return i

    def _count_cow_clusters(self, table: array, idx: int, n: int) -> int:
        """qemu 1.1: count_cow_clusters(): up to the next COPIED cluster; a compressed first
        cluster alone.  1.1 runs on through later compressed clusters; ``fixed`` stops there."""
        first, _ = self._entry(table, idx)
        if first & fmt.QCOW_OFLAG_COMPRESSED:
            return 1
        stop_at_compressed = not self.policy.follows_1_1
        i = 0
        while i < n:
            entry, bitmap = self._entry(table, idx + i)
            if self._keepable(entry, bitmap) or (stop_at_compressed and entry & fmt.QCOW_OFLAG_COMPRESSED):
                break
            i += 1
        return i

    def _handle_dependencies(self, guest_offset: int, nb_clusters: int) -> tuple[int, L2Meta | None]:
        """qemu 1.1: handle_dependencies(); touching ranges count as overlapping."""
        start = guest_offset >> self.cluster_bits
        end = start + nb_clusters
        for old in self.cluster_allocs:
            old_start = old.offset >> self.cluster_bits
            old_end = old_start + old.nb_clusters
            if end < old_start or start > old_end:
                continue
            nb_clusters = old_start - start if start < old_start else 0
            if nb_clusters == 0:
                return 0, old
            end = start + nb_clusters
        return nb_clusters, None

    def _allocate_space(self, m: L2Meta) -> None:
        """qemu 7: handle_alloc_space(): when an allocation's copy-on-write regions read as
        zeros (is_zero_cow), its new clusters are zeroed whole with fallocate(2) ZERO_RANGE
        before the data goes in.  Fresh clusters read as zeros already and their COW zeros
        are not written (_copy): this allocates the file's blocks in one call, so the small
        writes landing in the cluster later find them allocated, not holes the file system
        fills one write at a time (a 4 KiB pwrite on ext4 here: 2.7 us against 4.5-11 us
        into a hole).  Where the file system can do neither, the clusters stay holes."""
        cs = self.cluster_size
        start = m.offset & ~(cs - 1)
        tail = m.nb_available
        if not m.n_start and not tail & (cs - 1):
            return   # the write covers the clusters whole: no copy-on-write
        tail_length = max(0, min(m.nb_clusters * cs, self.size - start) - tail)
        if self._reads_as_zeros(start, m.n_start) and self._reads_as_zeros(start + tail, tail_length):
            zero_allocated(self.fd, m.alloc_offset, m.nb_clusters * cs)

    async def _link_l2(self, m: L2Meta) -> None:
        """qemu 1.1: qcow2_alloc_cluster_link_l2(): COW head and tail, then point L2 at the new clusters."""
        cs = self.cluster_size
        start = m.offset & ~(cs - 1)
        # zeros need not be written into clusters that never held data (qemu 7: handle_alloc_space)
        alloc_end = m.alloc_offset + m.nb_clusters * cs if m.fresh else 0
        if m.n_start:
            copied = await self._copy_range(start, m.alloc_offset, 0, m.n_start, alloc_end)
            if m.record is not None and self.trace is not None and copied:
                self.trace.cow(m.record, "head_cow", start, m.alloc_offset, copied)
        if m.nb_available & (cs - 1):
            end = m.nb_available & ~(cs - 1)
            copied = await self._copy_range(start + end, m.alloc_offset + end, m.nb_available - end, cs, alloc_end)
            if m.record is not None and self.trace is not None and copied:
                self.trace.cow(m.record, "tail_cow", start + m.nb_available, m.alloc_offset + m.nb_available, copied)
        await self.events.fire("l2_update")
        table, l2_index = await self._get_cluster_table(m.offset)
        bitmap = EXTL2_ALL_ALLOCATED if self.extended_l2 else 0
        for i in range(m.nb_clusters):
            old, _ = self._entry(table, l2_index + i)
            self._set_entry(table, l2_index + i, (m.alloc_offset + i * cs) | fmt.QCOW_OFLAG_COPIED, bitmap)
            self._free_entry(old)
        self.l2cache.mark_dirty(self._l2_offset(m.offset))
        if m.record is not None and self.trace is not None:
            self.trace.done(m.record)

    async def _copy_range(self, guest_start: int, host_start: int, n_start: int, n_end: int,
                          fresh_end: int = 0) -> int:
        """qemu 1.1: copy_sectors(): read the guest view, write it to the new host location.
        Zeros bound for fresh clusters (below ``fresh_end``) are not written.  1.1 copies
        only up to the end of the disk.  Returns the bytes copied."""
        if self.policy.follows_1_1:
            n_end = min(n_end, self.size - guest_start)
        if n_end <= n_start:
            return 0
        if self._keeps_lock(n_end - n_start):
            await self._copy(guest_start, host_start, n_start, n_end, fresh_end)
        else:
            await self._unlocked(self._copy, guest_start, host_start, n_start, n_end, fresh_end)
        return n_end - n_start

    def _keeps_lock(self, nbytes: int) -> bool:
        """``fixed`` with no event armed: I/O this small does not sleep, so releasing s->lock
        around it would only hand the lock to the next waiting request and back.  The
        qemu-1.1.2 modes keep qemu's unlock points: other requests interleave there."""
        return nbytes < THREADED_WRITE and not self.policy.follows_1_1 and not self.events.armed

    async def _copy(self, guest_start, host_start, n_start, n_end, fresh_end):
        await self.events.fire("cow_read")
        lo = guest_start + n_start
        inside = max(0, min(n_end - n_start, self.size - lo))
        fresh = host_start + n_end <= fresh_end
        if fresh and self._reads_as_zeros(lo, inside):   # no buffer to fill and scan
            await self.events.fire("cow_write")
            return
        buf = bytearray(n_end - n_start)
        if inside:
            await self._read_into(lo, memoryview(buf)[:inside])
        await self.events.fire("cow_write")
        if fresh and buf.count(0) == len(buf):
            return
        pwrite_all(self.fd, buf, host_start + n_start)

    def _run_dependent_requests(self, m: L2Meta) -> None:
        if m in self.cluster_allocs:
            self.cluster_allocs.remove(m)
        m.done.set()
