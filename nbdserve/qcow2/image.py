"""Qcow2Image: a qcow2 file (and its backing chain) as a BlockDevice.

Concurrency follows qemu's coroutine model: one ``lock`` (qemu's ``s->lock``)
guards metadata; it is released around data I/O and copy-on-write, which is
where other requests interleave.  The write path is a model of qemu 1.1.x's
``qcow2_co_writev`` / ``qcow2_alloc_cluster_offset`` /
``qcow2_alloc_cluster_link_l2`` with the in-flight allocation list
(``cluster_allocs``); the AllocationPolicy decides ``avail_sectors``.

Durability (flush): data and refcount increments are written through; L2 and
L1 changes are cached and written at flush only after an fsync made the data
they point at durable; freed clusters return to the free pool only after the
L2 entries that dropped them are durable.  A crash therefore leaks clusters at
worst, and never leaves metadata pointing at unwritten or reused clusters.
"""

from __future__ import annotations

import errno
import os
from array import array
from dataclasses import dataclass, field

import trio

from ..blockdev import FILE_SLICE_MIN, BlockDevice, Extent, FileSlice, ReadChunk, check_range
from ..blockdev.chain import OPEN_ANY, ChainPolicy
from ..blockdev.fileio import host_runs, pwrite_all
from ..blockdev.lock import lock_image, lock_mode
from ..blockdev.probe import probe_format
from . import format as fmt
from .comutex import CoMutex
from .compress import decompress_cluster
from .errors import Qcow2Error
from .events import BlkDebug
from .header import Qcow2Header, read_header
from .holes import metadata_preallocation
from .l2cache import L2Cache, decode_table, encode_table
from .policy import AllocationPolicy, policy_by_name
from .refcount import CorruptRefcounts, Refcounts

# segment kinds of the guest -> host mapping
UNALLOCATED, ZERO, DATA, COMPRESSED = range(4)
MAX_CHAIN_DEPTH = 256
THREADED_WRITE = 256 * 1024   # data writes this large run in a worker thread, beside the event loop
L2_CACHE_BYTES = 32 << 20
EXTL2_ALL_ALLOCATED = fmt.SUBCLUSTER_ALLOC_MASK
EXTL2_ALL_ZERO = fmt.SUBCLUSTER_ZERO_MASK


@dataclass(eq=False)
class L2Meta:
    """An allocation in flight (qemu: QCowL2Meta), in bytes."""

    offset: int            # guest offset of the first new cluster
    alloc_offset: int      # host offset of the first new cluster
    n_start: int           # bytes before the write in the first new cluster (head COW)
    nb_clusters: int
    nb_available: int      # MIN(requested, avail): where the tail COW is computed from
    fresh: bool = False    # the new clusters lie past anything the file ever held: they read as zeros
    done: trio.Event = field(default_factory=trio.Event)


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


@dataclass(slots=True)
class _BackingRange:
    """Part of a sparse read that the backing file answers."""

    pos: int
    length: int


class Qcow2Image(BlockDevice):
    # ------------------------------------------------------------------ open
    @classmethod
    def open(cls, path: str, *, read_only: bool = False, allocator: str = "fixed",
             delays: dict[str, float] | None = None, chain: ChainPolicy = OPEN_ANY,
             _seen: tuple[str, ...] = ()) -> "Qcow2Image":
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
        self.refcounts = Refcounts(fd, self.cluster_bits, header.refcount_order,
                                   list(decode_table(raw_rt)), header.refcount_table_offset,
                                   self.events.fire_sync, self._refcount_table_moved)
        self.l2cache = L2Cache(fd, cs, L2_CACHE_BYTES // cs, self._write_back_metadata_sync)
        self.lock = CoMutex()
        self.cluster_allocs: list[L2Meta] = []
        self.pending_free: list[tuple[int, int]] = []   # (host offset, bytes) freed at next flush
        self.writes_in_flight: list[tuple[int, int]] = []   # (host offset, bytes) written unlocked
        self.backing: BlockDevice | None = None
        self._compressed_cache: tuple[int, bytes] | None = None
        self._dirty_bit_set = False
        # a read-only image's file does not change while served: its data may go out as FileSlices
        self._file_size = os.fstat(fd).st_size if read_only else 0

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
        if self.version >= 3 and h.autoclear_features:
            # qcow2.txt: a writer that does not maintain an autoclear feature (persistent dirty
            # bitmaps) clears its bit before the first write, so nobody trusts stale bitmaps
            h.autoclear_features = 0
            os.pwrite(self.fd, fmt.U64.pack(0), fmt.OFFSET_AUTOCLEAR)
            os.fsync(self.fd)
        if h.compatible_features & fmt.COMPAT_LAZY_REFCOUNTS:
            # qcow2.txt: the dirty bit is set while refcounts may be stale
            self._write_incompatible(h.incompatible_features | fmt.INCOMPAT_DIRTY)
            self._dirty_bit_set = True

    def _write_incompatible(self, bits: int) -> None:
        if self.version < 3:
            return
        self.header.incompatible_features = bits
        os.pwrite(self.fd, fmt.U64.pack(bits), fmt.OFFSET_INCOMPATIBLE)
        os.fsync(self.fd)

    def _refcount_table_moved(self, offset: int, clusters: int) -> None:
        os.pwrite(self.fd, fmt.U64.pack(offset) + clusters.to_bytes(4, "big"), fmt.OFFSET_REFCOUNT_TABLE)
        os.fsync(self.fd)
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

    # ------------------------------------------------------------ mapping
    def _l2_table_for(self, l1_index: int) -> array | None:
        if l1_index >= len(self.l1):
            return None
        l2_off = self.l1[l1_index] & fmt.L1E_OFFSET_MASK
        if not l2_off:
            return None
        if l2_off & (self.cluster_size - 1):
            raise self._corruption(f"L2 table offset {l2_off:#x} unaligned (L1 index {l1_index})")
        try:
            return self.l2cache.get(l2_off)
        except OSError as e:
            raise self._corruption(str(e)) from None

    def _classify(self, entry: int, bitmap: int, sub: int) -> int:
        if entry & fmt.QCOW_OFLAG_COMPRESSED:
            return COMPRESSED
        if self.extended_l2:
            if bitmap & (1 << (32 + sub)):
                return ZERO
            if bitmap & (1 << sub):
                return DATA
            return UNALLOCATED
        if entry & fmt.QCOW_OFLAG_ZERO:
            if self.version < 3:   # qemu: "Zero cluster entry found in pre-v3 image"
                raise self._corruption(f"zero cluster entry {entry:#x} in a version 2 image")
            return ZERO
        return DATA if entry & fmt.L2E_OFFSET_MASK else UNALLOCATED

    def _map(self, offset: int, length: int) -> list[list[int]]:
        """Guest range -> [kind, guest offset, length, host offset or compressed entry] runs."""
        runs: list[list[int]] = []
        end = offset + length
        pos = offset
        unit = self.subcluster_size
        cmask = self.cluster_size - 1
        words = self.l2_entry_words
        while pos < end:
            l1_index = pos >> self.l1_shift
            table = self._l2_table_for(l1_index)
            table_end = min(end, (l1_index + 1) << self.l1_shift)
            if table is None:
                self._add_run(runs, UNALLOCATED, pos, table_end - pos, 0)
                pos = table_end
                continue
            while pos < table_end:
                idx = (pos >> self.cluster_bits) & (self.l2_entries - 1)
                entry = table[idx * words]
                bitmap = table[idx * words + 1] if words == 2 else 0
                in_cluster = pos & cmask
                sub = in_cluster // unit
                kind = self._classify(entry, bitmap, sub)
                if kind == COMPRESSED:
                    n = min(table_end, (pos | cmask) + 1) - pos
                    runs.append([COMPRESSED, pos, n, entry])
                    pos += n
                    continue
                n = min(table_end - pos, unit - (pos % unit))
                host = 0
                if kind == DATA:
                    cluster_host = entry & fmt.L2E_OFFSET_MASK
                    if cluster_host & cmask:
                        raise self._corruption(f"data cluster offset {cluster_host:#x} unaligned")
                    host = cluster_host + in_cluster
                self._add_run(runs, kind, pos, n, host)
                pos += n
        return runs

    @staticmethod
    def _add_run(runs, kind, pos, n, host):
        if runs:
            last = runs[-1]
            if last[0] == kind and kind != COMPRESSED and (kind != DATA or last[3] + last[2] == host):
                last[2] += n
                return
        runs.append([kind, pos, n, host])

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
        if self.events.armed:
            return None
        chunks: list[ReadChunk] = []
        for piece in self._read_plan(offset, length, file_slices and self.read_only):
            if isinstance(piece, ReadChunk):
                chunks.append(piece)
                continue
            below = self.backing.read_sparse_now(piece.pos, piece.length, file_slices)
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

    def pwrite_now(self, offset: int, data) -> bool:
        """Write in place when every cluster touched is allocated and COPIED (qemu 1.1: the
        "keep" clusters of qcow2_alloc_cluster_offset(), which need no metadata change).
        Only when no request holds the lock and no blkdebug event is armed, so the
        allocator's interleavings are exactly those of pwrite()."""
        if (self.events.armed or self.lock.locked() or self.read_only or self.corrupt
                or len(data) >= THREADED_WRITE):
            return False
        check_range(self.size, offset, len(data))
        cmask = self.cluster_size - 1
        runs: list[list[int]] = []   # [host, start in data, length]
        pos, end = offset, offset + len(data)
        while pos < end:
            l1_index = pos >> self.l1_shift
            if l1_index >= len(self.l1) or not self.l1[l1_index] & fmt.QCOW_OFLAG_COPIED:
                return False
            table = self._l2_table_for(l1_index)
            if table is None:
                return False
            entry, bitmap = self._entry(table, (pos >> self.cluster_bits) & (self.l2_entries - 1))
            if not self._keepable(entry, bitmap):
                return False
            host = (entry & fmt.L2E_OFFSET_MASK) + (pos & cmask)
            n = min(end, (pos | cmask) + 1) - pos
            if runs and runs[-1][0] + runs[-1][2] == host:
                runs[-1][2] += n
            else:
                runs.append([host, pos - offset, n])
            pos += n
        mv = memoryview(data).cast("B")
        self.events.fire_sync("write_aio")
        for host, start, n in runs:
            pwrite_all(self.fd, mv[start:start + n], host)
        return True

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

    def _keepable(self, entry: int, bitmap: int) -> bool:
        """Allocated, COPIED, plain data: written in place (qemu: QCOW_OFLAG_COPIED)."""
        if not entry & fmt.QCOW_OFLAG_COPIED or entry & fmt.QCOW_OFLAG_COMPRESSED:
            return False
        if not entry & fmt.L2E_OFFSET_MASK:
            return False
        if self.extended_l2:
            return bitmap == EXTL2_ALL_ALLOCATED
        return not entry & fmt.QCOW_OFLAG_ZERO

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
            self.pending_free.append((old_off, self.cluster_size))
        # a reader may have evicted the new table while the events above slept (cache pressure
        # writes it back first): return the cache's copy, never an orphan the caller would
        # change in vain
        table = self._l2_table_for(l1_index)
        return table, (pos >> self.cluster_bits) & (self.l2_entries - 1)

    def _entry(self, table: array, idx: int) -> tuple[int, int]:
        if self.extended_l2:
            return table[2 * idx], table[2 * idx + 1]
        return table[idx], 0

    def _set_entry(self, table: array, idx: int, entry: int, bitmap: int = 0) -> None:
        if self.extended_l2:
            table[2 * idx] = entry
            table[2 * idx + 1] = bitmap
        else:
            table[idx] = entry

    def _free_entry(self, entry: int) -> None:
        """Queue the host cluster(s) an old L2 entry referenced (qemu: qcow2_free_any_clusters)."""
        if entry & fmt.QCOW_OFLAG_COMPRESSED:
            host = entry & self.compressed_offset_mask
            nb = ((entry >> self.compressed_shift) & self.compressed_count_mask) + 1
            first = host & ~(self.cluster_size - 1)
            last = (host + nb * 512 - (host & 511) - 1) & ~(self.cluster_size - 1)
            self.pending_free.append((first, last - first + self.cluster_size))
        elif entry & fmt.L2E_OFFSET_MASK:
            self.pending_free.append((entry & fmt.L2E_OFFSET_MASK, self.cluster_size))

    # ------------------------------------------------------------- write
    async def pwrite(self, offset: int, data, fua: bool = False) -> None:
        self._check_writable(offset, len(data))
        mv = memoryview(data).cast("B")
        done = 0
        async with self.lock:
            while done < len(mv):
                host, n, meta = await self._alloc_cluster_offset(offset + done, len(mv) - done)
                try:
                    span = (host, n)
                    self.writes_in_flight.append(span)
                    try:
                        await self._unlocked(self._write_data, host, mv[done:done + n])
                    finally:
                        self.writes_in_flight.remove(span)
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
                              fresh=alloc_host >> self.cluster_bits >= never_used)
                self.cluster_allocs.append(meta)
            covered = min((keep + nb_clusters) * cs, n_end) - n_start
            host = (cluster_offset if keep else alloc_host) + n_start
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
        """qemu 1.1: count_cow_clusters(): up to the next COPIED cluster; a compressed one alone."""
        first, _ = self._entry(table, idx)
        if first & fmt.QCOW_OFLAG_COMPRESSED:
            return 1
        i = 0
        while i < n:
            entry, bitmap = self._entry(table, idx + i)
            if self._keepable(entry, bitmap) or entry & fmt.QCOW_OFLAG_COMPRESSED:
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

    async def _link_l2(self, m: L2Meta) -> None:
        """qemu 1.1: qcow2_alloc_cluster_link_l2(): COW head and tail, then point L2 at the new clusters."""
        cs = self.cluster_size
        start = m.offset & ~(cs - 1)
        # zeros need not be written into clusters that never held data (qemu 7: handle_alloc_space)
        alloc_end = m.alloc_offset + m.nb_clusters * cs if m.fresh else 0
        if m.n_start:
            await self._copy_range(start, m.alloc_offset, 0, m.n_start, alloc_end)
        if m.nb_available & (cs - 1):
            end = m.nb_available & ~(cs - 1)
            await self._copy_range(start + end, m.alloc_offset + end, m.nb_available - end, cs, alloc_end)
        await self.events.fire("l2_update")
        table, l2_index = await self._get_cluster_table(m.offset)
        bitmap = EXTL2_ALL_ALLOCATED if self.extended_l2 else 0
        for i in range(m.nb_clusters):
            old, _ = self._entry(table, l2_index + i)
            self._set_entry(table, l2_index + i, (m.alloc_offset + i * cs) | fmt.QCOW_OFLAG_COPIED, bitmap)
            self._free_entry(old)
        self.l2cache.mark_dirty(self._l2_offset(m.offset))

    def _l2_offset(self, pos: int) -> int:
        return self.l1[pos >> self.l1_shift] & fmt.L1E_OFFSET_MASK

    async def _copy_range(self, guest_start: int, host_start: int, n_start: int, n_end: int,
                          fresh_end: int = 0) -> None:
        """qemu 1.1: copy_sectors(): read the guest view, write it to the new host location.
        Zeros bound for fresh clusters (below ``fresh_end``) are not written."""
        if n_end <= n_start:
            return
        await self._unlocked(self._copy_unlocked, guest_start, host_start, n_start, n_end, fresh_end)

    async def _copy_unlocked(self, guest_start, host_start, n_start, n_end, fresh_end):
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

    def _reads_as_zeros(self, offset: int, length: int) -> bool:
        """True when the mapping alone shows the range reads as zeros (zero clusters, or
        unallocated with nothing below)."""
        backing_size = self.backing.size if self.backing is not None else 0
        return all(kind == ZERO or (kind == UNALLOCATED and pos >= backing_size)
                   for kind, pos, _, _ in self._map(offset, length)) if length else True

    def _run_dependent_requests(self, m: L2Meta) -> None:
        if m in self.cluster_allocs:
            self.cluster_allocs.remove(m)
        m.done.set()

    # ----------------------------------------------------- discard / zero
    def _zero_entry(self) -> tuple[int, int]:
        if self.extended_l2:
            return 0, EXTL2_ALL_ZERO
        return fmt.QCOW_OFLAG_ZERO, 0

    async def _set_clusters(self, first: int, last: int, new_for) -> None:
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
                        self._free_entry(old)
                    elif old & fmt.QCOW_OFLAG_COMPRESSED:
                        self._free_entry(old)
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
            await self._set_clusters(first, last, discarded)
        if fua:
            await self.flush()

    async def zero(self, offset: int, length: int, *, may_trim: bool = False,
                   fua: bool = False, fast: bool = False) -> None:
        self._check_writable(offset, length)
        cs = self.cluster_size
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
            if not may_trim and self._keepable(entry, bitmap) and not self.extended_l2:
                # NO_HOLE: keep the allocation, flag it zero (qemu: QCOW2_SUBCLUSTER_ZERO_ALLOC)
                return (entry | fmt.QCOW_OFLAG_ZERO, 0)
            return zero_entry

        if last > first:
            async with self.lock:
                await self._wait_in_flight(first, last)
                await self._set_clusters(first, last, zeroed)
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

    # ------------------------------------------------------------- flush
    async def flush(self) -> None:
        if self.read_only:
            return
        async with self.lock:
            await self.events.fire("flush_to_os")
            await self.events.fire("flush_to_disk")
            await trio.to_thread.run_sync(os.fsync, self.fd)
            if self.l2cache.dirty or self.l1_dirty:
                self._write_tables()
                await trio.to_thread.run_sync(os.fsync, self.fd)
            self._apply_pending_frees()

    def _write_tables(self) -> None:
        """Dirty L2 tables, then the L1 entries pointing at them (one fsync between)."""
        if self.l2cache.dirty:
            self.l2cache.write_dirty()
            if self.l1_dirty:
                os.fsync(self.fd)
        if self.l1_dirty:
            off = self.header.l1_table_offset
            for i in sorted(self.l1_dirty):
                os.pwrite(self.fd, fmt.U64.pack(self.l1[i]), off + i * 8)
            self.l1_dirty.clear()

    def _write_back_metadata_sync(self) -> None:
        """Cache pressure: make data durable, then write every dirty table."""
        os.fsync(self.fd)
        self._write_tables()

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
                if self._dirty_bit_set:
                    self._write_incompatible(self.header.incompatible_features & ~fmt.INCOMPAT_DIRTY)
        finally:
            os.close(self.fd)
            self.fd = -1
            if self.backing is not None:
                await self.backing.close()
