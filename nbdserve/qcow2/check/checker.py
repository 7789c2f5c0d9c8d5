"""The checker: qemu's block/qcow2-refcount.c (qcow2_check_refcounts) for one image.

1. compute the reference count every host cluster should have from the
   metadata: header cluster, active and snapshot L1 tables, L2 tables, data
   and compressed clusters, snapshot table, refcount table, refcount blocks,
   bitmap directory and bitmap tables;
2. compare with the stored refcounts: stored < computed is a corruption
   (``ERROR cluster N ...``), stored > computed a leak (``Leaked cluster N ...``);
3. check the COPIED flags of the active L1 and L2 entries against the stored
   refcounts (set iff the refcount is 1).

Repair: ``leaks`` lowers leaked refcounts; ``all`` also raises too-low ones,
rebuilds the refcount structure when a referenced cluster has no refcount (or
a refcount block is broken), fixes COPIED flags and clears the dirty and
corrupt bits.

The loops over table entries decode with ``array``/``struct`` (the masks in
format.py come from the construct declarations), never with construct; the
common tables take the fast paths of fastpaths.py.
"""

from __future__ import annotations

import errno
import itertools
import os

from ...blockdev.fileio import pwrite_all
from .. import format as fmt
from ..bitmaps import read_directory, referenced_regions
from ..header import MAX_L1_BYTES, Qcow2Header, read_header
from ..l2cache import decode_table
from ..snapshot import read_snapshot_table
from .computed import BIG, ComputedRefcounts
from .copied import ActiveRuns, check_oflag_copied
from .fastpaths import ContiguousRuns, decode_refblock, narrow_refblock
from .rebuild import rebuild_refcount_structure
from .result import COUNTS, FIX_ERRORS, FIX_LEAKS, CheckResult
from .stored import StoredRefcounts

CHUNK = 256             # entries compare() compares as one slice where a block differs


class Checker:
    """One pass of the check over the image at ``path`` (opened read-write for a repair)."""

    def __init__(self, path: str, writable: bool):
        self.path = path
        self.fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        try:
            self.h: Qcow2Header = read_header(self.fd)
            self._setup()
        except BaseException:
            os.close(self.fd)
            raise

    def close(self) -> None:
        os.close(self.fd)
        self.ref = None     # at once: self.stored reads through self._pread, a cycle the GC frees late

    def _setup(self) -> None:
        h = self.h
        self.cb = h.cluster_bits
        self.cs = h.cluster_size
        self.file_len = os.fstat(self.fd).st_size
        self.extl2 = h.extended_l2
        self.l2_bytes = self.cs                                   # l2_size * entry size
        self.refbits = 1 << h.refcount_order
        self.refmax = (1 << self.refbits) - 1
        self.coff_mask, self.cshift, self.ccount_mask = fmt.compressed_masks(self.cb)
        self.stored = StoredRefcounts(self.fd, h, self._pread, self.file_len)
        self.block_bits, self.block_entries = self.stored.block_bits, self.stored.block_entries
        self.snapshots, self.snapshots_size = read_snapshot_table(self.fd, self.h)
        self.bitmaps = read_directory(self.fd, h)   # qemu opens the image: a broken directory fails
        n = self.cs // 8                                          # entries of an L2 table
        self.runs = ContiguousRuns(self.cs, n)

    def _pread(self, n: int, offset: int) -> bytes:
        """qemu's file driver reads zeros past the end of the file."""
        raw = os.pread(self.fd, n, offset) if offset < self.file_len else b""
        return raw if len(raw) == n else raw + bytes(n - len(raw))

    # -------------------------------------------------- reference counting
    def _msg(self, text: str) -> None:
        self.res.messages.append(text)

    def _inc(self, offset: int, size: int) -> None:
        """qemu: qcow2_inc_refcounts_imrt()."""
        if size <= 0:
            return
        if offset + size - self.file_len >= self.cs:
            self._msg("ERROR: counting reference for region exceeding the end of the file by one "
                      f"cluster or more: offset {offset:#x} size {size:#x}")
            self.res.corruptions += 1
            return
        last = (offset + size - 1) >> self.cb
        self.ref.grow(last + 1)
        for k in self.ref.add_limited(offset >> self.cb, last + 1, self.refmax):
            self._overflow(k)

    def _overflow(self, cluster: int) -> None:
        self._msg(f"ERROR: overflow cluster offset={cluster << self.cb:#x}")
        self._msg("Use qemu-img amend to increase the refcount entry width or qemu-img convert to "
                  "create a clean copy if the image cannot be opened for writing")
        self.res.corruptions += 1

    def _check_l2(self, l2_offset: int, frag: bool, fix: int = 0) -> tuple[int, int] | None:
        """qemu: check_refcounts_l2(); returns the table's run if ContiguousRuns.find took it."""
        raw = self._pread(self.l2_bytes, l2_offset)
        if not self.extl2:
            run = self.runs.find(raw, self.file_len)
            if run[1] >= 0:
                self._count_run(run, frag)
                return run
        self._check_l2_entries(raw, l2_offset, frag, fix)
        return None

    def _check_l2_entries(self, raw: bytes, l2_offset: int, frag: bool, fix: int) -> None:
        """check_refcounts_l2() entry by entry, for any table (the reference of _count_run)."""
        res = self.res
        self._may_exceed_refmax = True      # the loop below counts without the refcount_bits limit
        table = decode_table(raw)
        if self.extl2:
            entries, bitmaps = table[0::2], table[1::2]
        else:
            entries, bitmaps = table, None
        ref = self.ref
        low = ref.low
        cb, cs, cmask = self.cb, self.cs, self.cs - 1
        file_len = self.file_len
        COMPRESSED, COPIED, ZERO = fmt.QCOW_OFLAG_COMPRESSED, fmt.QCOW_OFLAG_COPIED, fmt.QCOW_OFLAG_ZERO
        OMASK, RESERVED = fmt.L2E_OFFSET_MASK, fmt.L2E_RESERVED_MASK
        extl2 = self.extl2
        allocated = fragmented = compressed = 0
        next_contiguous = 0
        for i, e in enumerate(entries):
            if not e:
                if extl2 and bitmaps[i] & fmt.SUBCLUSTER_ALLOC_MASK:
                    res.corruptions += 1
                    self._msg("ERROR: Unallocated cluster has non-zero subcluster allocation map")
                continue
            if e & COMPRESSED:
                if e & COPIED:
                    self._msg(f"ERROR: coffset={e & self.coff_mask:#x}: copied flag must never be set "
                              "for compressed clusters")
                    e &= ~COPIED
                    res.corruptions += 1
                if extl2 and bitmaps[i]:
                    self._msg(f"ERROR compressed cluster {i} with non-zero subcluster allocation "
                              f"bitmap, entry={e:#x}")
                    res.corruptions += 1
                    continue
                coff = e & self.coff_mask
                csize = (((e >> self.cshift) & self.ccount_mask) + 1) * 512 - (coff & 511)
                self._inc(coff, csize)
                if frag:
                    allocated += 1
                    compressed += 1
                    fragmented += 1
                continue
            if e & RESERVED:
                self._msg(f"ERROR found l2 entry with reserved bits set: {e:x}")
                res.corruptions += 1
            off = e & OMASK
            if not off:
                # ZERO_PLAIN or UNALLOCATED
                if extl2 and bitmaps[i] & fmt.SUBCLUSTER_ALLOC_MASK:
                    res.corruptions += 1
                    self._msg("ERROR: Unallocated cluster has non-zero subcluster allocation map")
                continue
            if extl2:
                bm = bitmaps[i]
                if (bm >> 32) & bm:
                    res.corruptions += 1
                    self._msg(f"ERROR offset={off:x}: Allocated cluster has corrupted subcluster "
                              "allocation bitmap")
            if off & cmask:
                res.corruptions += 1
                has_data = (bitmaps[i] & fmt.SUBCLUSTER_ALLOC_MASK) if extl2 else not e & ZERO
                if has_data:
                    self._msg(f"ERROR offset={off:x}: Data cluster is not properly aligned; "
                              "L2 entry corrupted.")
                else:
                    self._msg(f"{'Repairing' if fix & FIX_ERRORS else 'ERROR'} offset={off:x}: "
                              "Preallocated cluster is not properly aligned; L2 entry corrupted.")
                    if fix & FIX_ERRORS:
                        # qemu: make it an unallocated zero cluster, written through at once
                        new = 0 if extl2 else ZERO
                        pwrite_all(self.fd, fmt.U64.pack(new), l2_offset + i * 8 * (2 if extl2 else 1))
                        os.fsync(self.fd)
                        res.corruptions -= 1
                        res.corruptions_fixed += 1
                        continue
            if frag:
                allocated += 1
                if next_contiguous and off != next_contiguous:
                    fragmented += 1
                next_contiguous = off + cs
            if off & cmask:
                self._inc(off, cs)
            elif off >= file_len:
                self._inc(off, cs)              # reports the reference past the end
            else:
                k = off >> cb
                v = low[k]
                if v < BIG - 1:
                    low[k] = v + 1
                else:
                    ref.add_one(k)
        res.allocated_clusters += allocated
        res.fragmented_clusters += fragmented
        res.compressed_clusters += compressed

    def _count_run(self, run: tuple[int, int], frag: bool) -> None:
        """check_refcounts_l2() for a table that ContiguousRuns.find took (a table of zeros,
        or a sequentially allocated one) without a Python loop."""
        first, m = run
        if m:
            self.ref.add_run((first & fmt.L2E_OFFSET_MASK) >> self.cb, m)
            self._may_exceed_refmax = True
            if frag:
                self.res.allocated_clusters += m

    def _check_l1(self, l1_offset: int, l1_size: int, frag: bool, fix: int = 0) -> None:
        """qemu: check_refcounts_l1()."""
        if not l1_size:
            return
        self._inc(l1_offset, l1_size * 8)
        l1 = decode_table(self._pread(l1_size * 8, l1_offset))
        cs = self.cs
        if frag:        # the active L1: the runs check_oflag_copied need not read again
            self.active_runs = runs = ActiveRuns(l1_size)
        for i, e in itertools.compress(enumerate(l1), l1):     # the nonzero entries
            if e & fmt.L1E_RESERVED_MASK:
                self._msg(f"ERROR found L1 entry with reserved bits set: {e:x}")
                self.res.corruptions += 1
            l2_offset = e & fmt.L1E_OFFSET_MASK
            self._inc(l2_offset, cs)
            if l2_offset & (cs - 1):
                self._msg(f"ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; "
                          "L1 entry corrupted")
                self.res.corruptions += 1
            run = self._check_l2(l2_offset, frag, fix)
            if frag and run:
                runs.first[i], runs.length[i] = run

    def _check_bitmaps(self) -> None:
        """qemu: qcow2_check_bitmaps_refcounts() (the directory was read at open)."""
        regions, bad = referenced_regions(self.h, self.bitmaps, self._pread)
        self.res.corruptions += bad
        for offset, size in regions:
            self._inc(offset, size)

    def _check_refblocks(self, fix: int) -> bool:
        """qemu: check_refblocks(); True if the refcount structure must be rebuilt."""
        rebuild = False
        res = self.res
        for i, entry in itertools.compress(enumerate(self.stored.table), self.stored.table):
            off = entry & fmt.REFT_OFFSET_MASK
            cluster = off >> self.cb
            if entry & fmt.REFT_RESERVED_MASK:
                self._msg(f"ERROR refcount table entry {i} has reserved bits set")
                res.corruptions += 1
                rebuild = True
                continue
            if off & (self.cs - 1):
                self._msg(f"ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted")
                res.corruptions += 1
                rebuild = True
                continue
            if cluster >= len(self.ref):
                res.corruptions += 1
                self._msg(f"{'Repairing' if fix & FIX_ERRORS else 'ERROR'} refcount block {i} is outside image")
                rebuild = True
                continue
            if off:
                self._inc(off, self.cs)
                if self.ref[cluster] != 1:
                    self._msg(f"ERROR refcount block {i} refcount={self.ref[cluster]}")
                    res.corruptions += 1
                    rebuild = True
        return rebuild

    def calculate(self, fix: int) -> bool:
        """qemu: calculate_refcounts(); fills self.ref, returns the rebuild flag."""
        h = self.h
        cs = self.cs
        self.start_counting()
        self.active_runs = ActiveRuns(0)
        self._inc(0, cs)
        self._check_l1(h.l1_table_offset, h.l1_size, True, fix)
        for sn in self.snapshots:
            if sn.l1_table_offset & (cs - 1):
                self._msg(f"ERROR snapshot {sn.id_str} ({sn.name}) l1_offset={sn.l1_table_offset:#x}: "
                          "L1 table is not cluster aligned; snapshot table entry corrupted")
                self.res.corruptions += 1
                continue
            if sn.l1_size > MAX_L1_BYTES // 8:
                self._msg(f"ERROR snapshot {sn.id_str} ({sn.name}) l1_size={sn.l1_size:#x}: "
                          "L1 table is too large; snapshot table entry corrupted")
                self.res.corruptions += 1
                continue
            self._check_l1(sn.l1_table_offset, sn.l1_size, False, fix)
        self._inc(h.snapshots_offset, self.snapshots_size)
        self._inc(h.refcount_table_offset, h.refcount_table_clusters * cs)
        self._check_bitmaps()
        self.end_counting()
        return self._check_refblocks(fix)

    def start_counting(self) -> None:
        """Every computed refcount 0."""
        self.ref = None                     # (the old counts go first: one set in memory at a time)
        self.ref = ComputedRefcounts((self.file_len + self.cs - 1) >> self.cb)
        self._may_exceed_refmax = False     # set where a reference is counted without the limit

    def end_counting(self) -> None:
        """qemu refuses each increment past the maximum: report those the loops made."""
        if not self._may_exceed_refmax:
            return
        for k in self.ref.above(self.refmax):
            for _ in range(self.ref[k] - self.refmax):
                self._overflow(k)
            self.ref[k] = self.refmax

    # -------------------------------------------------------- comparing
    def compare(self, fix: int) -> tuple[bool, int]:
        """qemu: compare_refcounts(); returns (rebuild, highest cluster in use)."""
        res = self.res
        ref = self.ref
        n = len(ref)
        B = self.block_entries
        rebuild = False
        highest = 0
        refbits = self.refbits
        for ti in range((n + B - 1) >> self.block_bits):
            first = ti << self.block_bits
            end = min(n, first + B)
            raw = self.stored.raw(ti)
            if raw is None:
                for i in range(first, end):
                    self._msg(f"Can't get refcount for cluster {i}: Input/output error")
                    res.check_errors += 1
                    if ref[i]:
                        highest = i
                continue
            # one byte per entry on both sides if they fit (a computed 255 is in ref.big)
            narrow = narrow_refblock(raw, refbits)
            want = ref.low[first:end].tobytes()
            if narrow is not None and b"\xff" not in want:
                have = narrow[:end - first]
            else:
                have, want = decode_refblock(raw, refbits)[:end - first], ref.values(first, end)
            # the block as one slice, or slices of CHUNK entries: the entries that differ are few
            step = B if have == want else CHUNK
            for a in range(0, end - first, step):
                b = min(end - first, a + step)
                if have[a:b] == want[a:b]:
                    used_end = ref.used_end(first + a, first + b)
                    if used_end > first + a:
                        highest = used_end - 1
                    continue
                for j in range(a, b):
                    r1, r2 = have[j], want[j]
                    if r1 or r2:
                        highest = first + j
                    if r1 == r2:
                        continue
                    i = first + j
                    fixed = None
                    if r1 == 0:
                        rebuild = True
                    elif r1 > r2 and fix & FIX_LEAKS:
                        fixed = "leaks_fixed"
                    elif r1 < r2 and fix & FIX_ERRORS:
                        fixed = "corruptions_fixed"
                    word = "Repairing" if fixed else "ERROR" if r1 < r2 else "Leaked"
                    self._msg(f"{word} cluster {i} refcount={r1} reference={r2}")
                    if fixed:
                        try:
                            self.stored.set(i, r2)
                        except OSError:
                            pass
                        else:
                            setattr(res, fixed, getattr(res, fixed) + 1)
                            continue
                    if r1 < r2:
                        res.corruptions += 1
                    else:
                        res.leaks += 1
        return rebuild, highest

    # --------------------------------------------------------- COPIED
    # -------------------------------------------------------- the check
    def run(self, fix: int) -> CheckResult:
        """qemu: qcow2_check_refcounts() plus the dirty/corrupt bit handling of qcow2_co_check."""
        self.res = res = CheckResult(self.path)
        cs = self.cs
        res.total_clusters = (self.h.size + cs - 1) >> self.cb
        rebuild = self.calculate(fix)
        saved = res.counts()
        rebuild2, highest = self.compare(0)
        rebuild = rebuild or rebuild2
        if rebuild and fix & FIX_ERRORS:
            old = res.counts()
            self._msg("Rebuilding refcount structure")
            rebuild_refcount_structure(self.fd, self.h, self.ref)
            self.file_len = os.fstat(self.fd).st_size
            self.stored = StoredRefcounts(self.fd, self.h, self._pread, self.file_len)
            res.set_counts(saved)
            res.corruptions = res.leaks = 0
            keep_msgs = res.messages
            res.allocated_clusters = res.fragmented_clusters = res.compressed_clusters = 0
            self.calculate(0)
            after = res.counts()
            # the old refcount structures are leaked now: free them
            res.set_counts(dict.fromkeys(COUNTS, 0))
            _, highest = self.compare(FIX_LEAKS)
            fresh_leaks = res.leaks
            res.set_counts(after)
            res.messages = keep_msgs
            if res.corruptions < old["corruptions"]:
                res.corruptions_fixed += old["corruptions"] - res.corruptions
            if res.leaks < old["leaks"]:
                res.leaks_fixed += old["leaks"] - res.leaks
            res.leaks += fresh_leaks
        elif fix:
            if rebuild:
                self._msg("ERROR need to rebuild refcount structures")
                res.check_errors += 1
                res.failed = os.strerror(errno.EIO)
                return res
            if res.leaks or res.corruptions:
                res.set_counts(saved)
                _, highest = self.compare(fix)
        check_oflag_copied(self.fd, self.h, self._pread, self.stored, self.runs, self.active_runs,
                           self.res, fix)
        res.image_end_offset = (highest + 1) * cs
        if fix and not res.check_errors and not res.corruptions and self.h.version >= 3:
            bits = self.h.incompatible_features & ~(fmt.INCOMPAT_DIRTY | fmt.INCOMPAT_CORRUPT)
            if bits != self.h.incompatible_features:
                os.fsync(self.fd)
                pwrite_all(self.fd, fmt.U64.pack(bits), fmt.OFFSET_INCOMPATIBLE)
                self.h.incompatible_features = bits
        if fix:
            os.fsync(self.fd)
        return res


