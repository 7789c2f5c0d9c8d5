"""Qcow2Image: a qcow2 file (and its backing chain) as a BlockDevice.

The class is split as qemu splits block/qcow2*.c: this module opens the image and
its backing chain, reads, flushes and closes; mapping.py looks clusters up
(qcow2-cluster.c's lookup half), alloc.py is the write path (its allocation
half), discard.py discards and zeroes, refcount.py and l2cache.py hold the
refcounts and the L2 table cache.

Concurrency follows qemu's coroutine model: one ``lock`` (qemu's ``s->lock``)
guards metadata; it is released around data I/O and copy-on-write, which is
where other requests interleave (``fixed`` keeps it around small I/O when no event
is armed, and then answers allocating writes without a task: alloc.py _keeps_lock,
_allocate_now).

Durability (flush): data is written through; refcount changes (``fixed``; the
qemu-1.1.2 modes write increments through), L2 and L1 changes are cached; a flush
writes the refcounts, fsyncs, and only then writes the L2 and L1 changes that point
at the data, now durable; with ``fixed``, freed clusters return to the free pool
only after the L2 entries that dropped them are durable.  A crash therefore
leaks clusters at worst, and never leaves metadata pointing at unwritten or
reused clusters.  The qemu-1.1.2 modes free at once, as 1.1.x did (the next
allocation may take the clusters), and write the decrement after the L2 change.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

import trio

from ..blockdev import FILE_SLICE_MIN, BlockDevice, Extent, FileSlice, ReadChunk, check_range
from ..blockdev import fileio
from ..blockdev.chain import OPEN_ANY, ChainPolicy
from ..blockdev.fileio import host_runs
from ..blockdev.lock import lock_image, lock_mode
from ..blockdev.probe import probe_format
from . import format as fmt
from .alloc import L2Meta, ClusterAllocation
from .bitmaps import PersistentBitmaps
from .comutex import CoMutex
from .compress import decompress_cluster
from .errors import Qcow2Error
from .discard import ClusterDiscard
from .events import BlkDebug
from .header import Qcow2Header, read_header
from .holes import metadata_preallocation
from .l2cache import L2Cache, decode_table
from .mapping import COMPRESSED, DATA, UNALLOCATED, ZERO, ClusterMapping
from .policy import AllocationPolicy, policy_by_name
from .refcount import Refcounts, Refcounts11
from .trace import AllocationTrace

MAX_CHAIN_DEPTH = 256
L2_CACHE_BYTES = 32 << 20



def _repair_if_dirty(path: str) -> None:
    """qemu: a lazy-refcounts image left dirty is repaired (check -r all) when opened read-write."""
    fd = os.open(path, os.O_RDONLY)
    try:
        dirty = read_header(fd).incompatible_features & fmt.INCOMPAT_DIRTY
    finally:
        os.close(fd)
    if dirty:
        from .check import check_image
        result = check_image(path, repair="all")
        if result.failed or result.corruptions or result.check_errors:
            raise Qcow2Error(f"Image is dirty and its repair left {result.corruptions} corruptions, "
                             f"{result.check_errors} check errors")


# L2 entry flags the one-cluster read leaves to the general path (qcow2.txt: "L2 entries")
_NOT_PLAIN = fmt.QCOW_OFLAG_COMPRESSED | fmt.QCOW_OFLAG_ZERO


@dataclass(slots=True)
class _BackingRange:
    """Part of a sparse read that the backing file answers."""

    pos: int
    length: int


class Qcow2Image(ClusterMapping, ClusterAllocation, ClusterDiscard, BlockDevice):
    # ------------------------------------------------------------------ open
    @classmethod
    def open(cls, path: str, *, read_only: bool = False, allocator: str = "fixed",
             delays: dict[str, float] | None = None, snapshot_l1: tuple[int, int] | None = None,
             chain: ChainPolicy = OPEN_ANY, _seen: tuple[str, ...] = ()) -> "Qcow2Image":
        """``snapshot_l1`` (offset, entries): read through that L1 table, an internal
        snapshot's, instead of the active one (read-only; see nbdserve.qcow2.snapshot).
        ``chain``: the rules the backing files must follow (blockdev/chain.py)."""
        real = os.path.realpath(path)
        if real in _seen:
            raise Qcow2Error(f"Backing chain loop: {' -> '.join(_seen + (real,))}")
        if len(_seen) >= MAX_CHAIN_DEPTH:
            raise Qcow2Error(f"Backing chain deeper than {MAX_CHAIN_DEPTH}")
        try:
            policy = policy_by_name(allocator)
            events = BlkDebug(delays)
        except ValueError as e:
            raise Qcow2Error(str(e)) from None
        fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR)
        try:
            lock_image(fd, path, *lock_mode(read_only, chain.force_share))
            if not read_only:
                _repair_if_dirty(path)
            header = read_header(fd)
            img = cls(path, fd, header, read_only=read_only, policy=policy, events=events)
            if snapshot_l1 is not None:
                img._use_snapshot_l1(*snapshot_l1)
            img._open_backing(_seen + (real,), chain)
            img._start_writing()
            return img
        except BaseException:
            os.close(fd)
            raise

    def __init__(self, path: str, fd: int, header: Qcow2Header, *, read_only: bool,
                 policy: AllocationPolicy, events: BlkDebug):
        self.path = path
        self.fd = fd
        self.header = header
        self.read_only = read_only
        self.policy = policy
        self.events = events
        self.size = header.size
        self.version = header.version
        self.cluster_bits = header.cluster_bits
        self.cluster_size = cs = header.cluster_size
        self.extended_l2 = header.extended_l2
        self.l2_entry_words = 2 if self.extended_l2 else 1
        self.l2_entries = cs // header.l2_entry_size
        self.l2_bits = self.l2_entries.bit_length() - 1
        self.l1_shift = self.cluster_bits + self.l2_bits
        self.subcluster_size = cs // fmt.SUBCLUSTERS_PER_CLUSTER if self.extended_l2 else cs
        self.compressed_offset_mask, self.compressed_shift, self.compressed_count_mask = \
            fmt.compressed_masks(self.cluster_bits)
        self.corrupt = bool(header.incompatible_features & fmt.INCOMPAT_CORRUPT)
        if self.corrupt and not read_only:
            raise Qcow2Error("Image is marked corrupt; it can be opened read-only only "
                             "(repair it with 'nbdserve check -r all')")
        raw_l1 = os.pread(fd, header.l1_size * 8, header.l1_table_offset)
        self.l1 = decode_table(raw_l1)
        self.l1_dirty: set[int] = set()
        raw_rt = os.pread(fd, header.refcount_table_clusters * cs, header.refcount_table_offset)
        refcounts = Refcounts11 if policy.follows_1_1 else Refcounts
        self.refcounts = refcounts(fd, self.cluster_bits, header.refcount_order,
                                  list(decode_table(raw_rt)), header.refcount_table_offset,
                                  self.events.fire_sync, self._refcount_table_moved)
        self.refcounts.write_back = not policy.follows_1_1
        self.l2cache = L2Cache(fd, cs, L2_CACHE_BYTES // cs, self._write_back_metadata_sync)
        self.lock = CoMutex()
        self.cluster_allocs: list[L2Meta] = []
        self.pending_free: list[tuple[int, int]] = []   # fixed: (host offset, bytes) freed at next flush
        self.writes_in_flight: list[tuple[int, int]] = []   # (host offset, bytes) written unlocked
        self.trace: AllocationTrace | None = None   # the allocation trace (trace.py), when on
        self.backing: BlockDevice | None = None
        self._compressed_cache: tuple[int, bytes] | None = None
        self._dirty_bit_set = False
        self.metadata_preallocated: bool | None = None   # holes.metadata_preallocation() decides it
        # a read-only image's file does not change while served: its data may go out as FileSlices
        self._file_size = os.fstat(fd).st_size if read_only else 0
        self.bitmaps = PersistentBitmaps(self)

    def _use_snapshot_l1(self, offset: int, entries: int) -> None:
        """qemu: qcow2_snapshot_load_tmp(): switch to a snapshot's L1 table, read-only; the
        virtual size stays the active one's (clusters past the table read as unallocated)."""
        if not self.read_only:
            raise Qcow2Error("An internal snapshot can only be loaded read-only")
        raw = os.pread(self.fd, entries * 8, offset)
        if offset % self.cluster_size or len(raw) != entries * 8:   # qcow2_validate_table()
            raise Qcow2Error(f"Snapshot L1 table at {offset:#x} ({entries} entries) is invalid")
        self.l1 = decode_table(raw)

    def _open_backing(self, seen: tuple[str, ...], chain: ChainPolicy) -> None:
        name = self.header.backing_file
        if not name:
            return
        full = chain.backing_path(self.path, name)   # qemu's naming, and the operator's limits
        if not os.path.exists(full):
            raise Qcow2Error(f"Could not open backing file {full}: No such file or directory")
        fmt_name = self.header.backing_format or probe_format(full)
        if fmt_name == "qcow2":
            try:
                self.backing = Qcow2Image.open(full, read_only=True, chain=chain, _seen=seen)
            except Qcow2Error as e:
                raise Qcow2Error(f"backing file {full}: {e}") from None
        elif fmt_name == "raw":
            from ..blockdev import RawFile
            self.backing = RawFile(full, read_only=True, lock=lock_mode(True, raw=True, backing=True))
        else:
            raise Qcow2Error(f"Unsupported backing format {fmt_name!r} of {full}")

    def _start_writing(self) -> None:
        if self.read_only:
            return
        h = self.header
        self.refcounts.end_cluster = (os.fstat(self.fd).st_size + self.cluster_size - 1) >> self.cluster_bits
        kept = fmt.AUTOCLEAR_BITMAPS if self.bitmaps.maintained else 0
        if self.version >= 3 and h.autoclear_features & ~kept:
            # qcow2.txt: a writer that does not maintain an autoclear feature clears its bit
            # before the first write, so nobody trusts what it no longer describes
            h.autoclear_features &= kept
            fileio.pwrite_all(self.fd, fmt.U64.pack(h.autoclear_features), fmt.OFFSET_AUTOCLEAR)
            self.refcounts.sync()
        self.bitmaps.mark_in_use()
        if h.compatible_features & fmt.COMPAT_LAZY_REFCOUNTS:
            # qcow2.txt: the dirty bit is set while refcounts may be stale
            self._write_incompatible(h.incompatible_features | fmt.INCOMPAT_DIRTY)
            self._dirty_bit_set = True

    def _write_incompatible(self, bits: int) -> None:
        if self.version < 3:
            return
        self.header.incompatible_features = bits
        fileio.pwrite_all(self.fd, fmt.U64.pack(bits), fmt.OFFSET_INCOMPATIBLE)
        self.refcounts.sync()

    def _refcount_table_moved(self, offset: int, clusters: int) -> None:
        fileio.pwrite_all(self.fd, fmt.U64.pack(offset) + clusters.to_bytes(4, "big"), fmt.OFFSET_REFCOUNT_TABLE)
        self.refcounts.sync()
        self.header.refcount_table_offset = offset
        self.header.refcount_table_clusters = clusters

    # ------------------------------------------------------- capabilities
    def can_trim(self):
        return self.can_write()

    def can_fast_zero(self):
        return self.can_write() and self.version >= 3

    # --------------------------------------------------------- corruption
    def _corruption(self, message: str) -> OSError:
        """qemu: qcow2_signal_corruption(): mark the image corrupt, fail the request."""
        if not self.corrupt:
            self.corrupt = True
            if not self.read_only and self.version >= 3:
                try:
                    self._write_incompatible(self.header.incompatible_features | fmt.INCOMPAT_CORRUPT)
                except OSError:
                    pass
        return OSError(errno.EIO, f"{self.path}: corrupt image: {message}")

    # --------------------------------------------------------------- read
    async def pread(self, offset: int, length: int) -> bytearray:
        check_range(self.size, offset, length)
        buf = bytearray(length)
        await self._read_into(offset, memoryview(buf))
        return buf

    async def _read_into(self, offset: int, mv: memoryview) -> None:
        """Read the guest view into a zero-filled buffer."""
        for kind, pos, n, host in self._map(offset, len(mv)):
            dst = mv[pos - offset:pos - offset + n]
            if kind == DATA:
                self._pread_host(host, dst)
            elif kind == UNALLOCATED:
                await self._read_backing(pos, dst)
            elif kind == COMPRESSED:
                dst[:] = self._read_compressed(host)[pos & (self.cluster_size - 1):][:n]

    def _pread_host(self, host: int, dst: memoryview) -> None:
        got = os.preadv(self.fd, [dst], host)
        if got < len(dst):
            # a short last cluster reads as zeros; a cluster starting at or past the end is corruption
            # (dst may span several host-contiguous clusters and start anywhere in the first)
            last_cluster = (host + len(dst) - 1) & ~(self.cluster_size - 1)
            if last_cluster >= os.fstat(self.fd).st_size:
                raise self._corruption(f"data cluster at {last_cluster:#x} lies past the end of the file")
            dst[got:] = bytes(len(dst) - got)

    async def _read_backing(self, pos: int, dst: memoryview) -> None:
        if self.backing is None:
            return
        n = min(len(dst), max(0, self.backing.size - pos))
        if n > 0:
            await self.events.fire("read_backing_aio")
            dst[:n] = await self.backing.pread(pos, n)

    def _read_compressed(self, entry: int) -> bytes:
        if self._compressed_cache and self._compressed_cache[0] == entry:
            return self._compressed_cache[1]
        self.events.fire_sync("read_compressed")
        host = entry & self.compressed_offset_mask
        nb_sectors = ((entry >> self.compressed_shift) & self.compressed_count_mask) + 1
        csize = nb_sectors * 512 - (host & 511)
        raw = os.pread(self.fd, csize, host)
        if not raw:
            raise self._corruption(f"compressed cluster at {host:#x} lies past the end of the file")
        data = decompress_cluster(raw, self.cluster_size, self.header.compression_type)
        self._compressed_cache = (entry, data)
        return data

    async def read_sparse(self, offset: int, length: int) -> list[ReadChunk]:
        chunks: list[ReadChunk] = []
        for piece in self._read_plan(offset, length):
            if isinstance(piece, ReadChunk):
                chunks.append(piece)
            else:
                chunks.extend(await self.backing.read_sparse(piece.pos, piece.length))
        return chunks

    def read_sparse_now(self, offset: int, length: int, file_slices: bool = False) -> list[ReadChunk] | None:
        """read_sparse() in one synchronous pass, or None when it would wait: a backing
        layer that must, or armed blkdebug events.  Data is read with pread(2) at once, as
        RawFile does: the page cache answers faster than a hand-off to a worker thread
        (bench/README.md), at the price of a read that misses it holding up the event loop.
        With ``file_slices``, a read-only image gives its data runs as FileSlices instead
        (sent later with sendfile(2): its file does not change meanwhile)."""
        check_range(self.size, offset, length)
        layer = self
        while length:   # a read inside one cluster, down the chain in one loop (the common small read)
            if layer.events.armed:
                return None
            cmask = layer.cluster_size - 1
            table = layer._l2_table_for(offset >> layer.l1_shift)
            entry = table[(offset >> layer.cluster_bits) & (layer.l2_entries - 1)] if table is not None else 0
            if ((offset & cmask) + length > layer.cluster_size or layer.extended_l2
                    or entry & _NOT_PLAIN or entry & fmt.L2E_OFFSET_MASK & cmask):
                return layer._read_sparse_now_plain(offset, length, file_slices)
            if entry & fmt.L2E_OFFSET_MASK:
                host = (entry & fmt.L2E_OFFSET_MASK) + (offset & cmask)
                if file_slices and layer.read_only and length >= FILE_SLICE_MIN and host + length <= layer._file_size:
                    return [ReadChunk(offset, length, FileSlice(layer.fd, host, length))]
                return [layer._data_chunk(host, offset, length)]
            below = layer.backing
            if below is None or offset >= below.size:
                return [ReadChunk(offset, length, None)]
            if type(below) is not Qcow2Image or offset + length > below.size:
                return layer._read_sparse_now_plain(offset, length, file_slices)
            layer = below
        return []

    def _read_sparse_now_plain(self, offset: int, length: int, file_slices: bool = False) -> list[ReadChunk] | None:
        """read_sparse_now() for any range, layer by layer (the plain twin of its one-cluster loop)."""
        if self.events.armed:
            return None
        chunks: list[ReadChunk] = []
        for piece in self._read_plan(offset, length, file_slices and self.read_only):
            if isinstance(piece, ReadChunk):
                chunks.append(piece)
                continue
            below = (self.backing._read_sparse_now_plain if type(self.backing) is Qcow2Image
                     else self.backing.read_sparse_now)(piece.pos, piece.length, file_slices)
            if below is None:
                return None
            chunks.extend(below)
        return chunks

    def _read_plan(self, offset: int, length: int, file_slices: bool = False) -> list[ReadChunk | _BackingRange]:
        """A sparse read's pieces: the chunks of this layer, read now (or as FileSlices of a
        read-only image), and the ranges left to the backing file."""
        check_range(self.size, offset, length)
        pieces: list[ReadChunk | _BackingRange] = []
        backing_size = self.backing.size if self.backing is not None else 0
        for kind, pos, n, host in self._map(offset, length):
            if kind == DATA:
                if file_slices and n >= FILE_SLICE_MIN and host + n <= self._file_size:
                    pieces.append(ReadChunk(pos, n, FileSlice(self.fd, host, n)))
                else:
                    pieces.append(self._data_chunk(host, pos, n))
            elif kind == COMPRESSED:
                pieces.append(ReadChunk(pos, n, self._read_compressed(host)[pos & (self.cluster_size - 1):][:n]))
            else:
                inside = min(n, max(0, backing_size - pos)) if kind == UNALLOCATED else 0
                if inside:
                    pieces.append(_BackingRange(pos, inside))
                if inside < n:
                    pieces.append(ReadChunk(pos + inside, n - inside, None))
        return pieces

    def _data_chunk(self, host: int, pos: int, n: int) -> ReadChunk:
        data = os.pread(self.fd, n, host)   # not zero-filled first, unlike a bytearray
        if len(data) < n:   # past the end of the file: zeros, or corruption (see _pread_host)
            buf = bytearray(n)
            self._pread_host(host, memoryview(buf))
            data = buf
        return ReadChunk(pos, n, data)

    async def extents(self, offset: int, length: int) -> list[Extent]:
        check_range(self.size, offset, length)
        out: list[Extent] = []
        for kind, pos, n, host in self._map(offset, min(length, 1 << 32)):
            if kind == DATA and metadata_preallocation(self):   # qemu: BDRV_BLOCK_RECURSE
                out.extend(Extent(m, data=True, zero=hole, depth=1) for m, hole in host_runs(self.fd, host, n))
            elif kind in (DATA, COMPRESSED):
                out.append(Extent(n, data=True, zero=False, depth=1))
            elif kind == ZERO:
                out.append(Extent(n, data=False, zero=True, depth=1))
            else:
                inside = 0 if self.backing is None else min(n, max(0, self.backing.size - pos))
                done = 0
                while done < inside:
                    for e in await self.backing.extents(pos + done, inside - done):
                        out.append(Extent(e.length, e.data, e.zero, e.depth + 1 if e.depth else 0))
                        done += e.length
                if inside < n:
                    # qemu: past a backing file's end reads zeros "allocated" in that backing
                    # layer (BDRV_BLOCK_EOF); with no backing file it is unallocated
                    depth = 0 if self.backing is None else 2
                    out.append(Extent(n - inside, data=False, zero=True, depth=depth))
        return out

    async def cache(self, offset, length):
        check_range(self.size, offset, length)

    # ------------------------------------------------------ write helpers
    def _check_writable(self, offset: int, length: int) -> None:
        if self.read_only:
            raise OSError(errno.EPERM, "image is read-only")
        check_range(self.size, offset, length)
        if self.corrupt:
            raise OSError(errno.EIO, f"{self.path}: image is marked corrupt; writes are refused")

    async def _unlocked(self, fn, *args):
        """Run an awaitable with s->lock released (qemu: qemu_co_mutex_unlock around I/O)."""
        self.lock.release()
        try:
            return await fn(*args)
        finally:
            if not self.lock.try_acquire():   # a shielded wait only when it is held (CancelScope costs)
                with trio.CancelScope(shield=True):
                    await self.lock.acquire()

    # ------------------------------------------------------------- flush
    async def flush(self) -> None:
        if self.read_only:
            return
        async with self.lock:
            await self.events.fire("flush_to_os")
            await self.events.fire("flush_to_disk")
            self.refcounts.write_dirty()   # before the L2 and L1 changes that point at the clusters
            await trio.to_thread.run_sync(fileio.fsync, self.fd)
            if self.l2cache.dirty or self.l1_dirty:
                self._write_tables()
                await trio.to_thread.run_sync(fileio.fsync, self.fd)
            if self.refcounts.unwritten:   # 1.1: the refcount cache after the L2 cache
                self.refcounts.write_unwritten()
                await trio.to_thread.run_sync(fileio.fsync, self.fd)
            self._apply_pending_frees()
            self.refcounts.write_dirty()   # the decrements: their L2 changes are durable now

    def _write_tables(self) -> None:
        """Dirty L2 tables, then the L1 entries pointing at them (one fsync between)."""
        if self.l2cache.dirty:
            self.l2cache.write_dirty()
            if self.l1_dirty:
                self.refcounts.sync()
        if self.l1_dirty:
            off = self.header.l1_table_offset
            for i in sorted(self.l1_dirty):
                fileio.pwrite_all(self.fd, fmt.U64.pack(self.l1[i]), off + i * 8)
            self.l1_dirty.clear()

    def _write_back_metadata_sync(self) -> None:
        """Cache pressure: make data durable, then write every dirty table (and after them
        the decrements they made possible)."""
        self.refcounts.sync()
        self._write_tables()
        if self.refcounts.unwritten:
            self.refcounts.sync()
            self.refcounts.write_unwritten()

    def _apply_pending_frees(self) -> None:
        frees, self.pending_free = self.pending_free, []
        for host, nbytes in frees:
            if any(h < host + nbytes and host < h + n for h, n in self.writes_in_flight):
                # a write that found this cluster before it was dropped has yet to land: free
                # it at a later flush, or the write would land in the cluster's next owner
                self.pending_free.append((host, nbytes))
                continue
            self.events.fire_sync("cluster_free")
            self.refcounts.change(host, nbytes, -1)
            self.l2cache.drop(host)

    async def close(self) -> None:
        if self.fd < 0:
            return
        try:
            if not self.read_only:
                await self.flush()
                if self.bitmaps.entries:   # qemu: qcow2_inactivate() stores them, then flushes
                    self.bitmaps.store()
                    await self.flush()
                if self._dirty_bit_set:
                    self._write_incompatible(self.header.incompatible_features & ~fmt.INCOMPAT_DIRTY)
        finally:
            os.close(self.fd)
            self.fd = -1
            if self.trace is not None:
                self.trace.close()
            if self.backing is not None:
                await self.backing.close()
