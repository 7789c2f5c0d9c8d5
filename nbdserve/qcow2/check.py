"""Consistency check and repair of a qcow2 image, like ``qemu-img check [-r leaks|all]``.

The algorithm follows qemu's block/qcow2-refcount.c (qcow2_check_refcounts):

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
corrupt bits.  As qemu-img does, a repair is followed by a fresh check whose
result is reported, with the numbers of fixed corruptions and leaks.

The loops over table entries decode with ``array``/``struct`` (the masks in
format.py come from the construct declarations), never with construct.
"""

from __future__ import annotations

import errno
import itertools
import operator
import os
import struct
import sys
from array import array
from dataclasses import dataclass, field

from ..blockdev.fileio import pwrite_all
from . import format as fmt
from .bitmaps import bitmaps_extension, check_table_entry, read_directory
from .errors import Qcow2Error
from .header import MAX_L1_BYTES, Qcow2Header, read_header
from .l2cache import decode_table, encode_table

FIX_LEAKS = 1
FIX_ERRORS = 2
_REPAIR_MODES = {None: 0, "leaks": FIX_LEAKS, "all": FIX_LEAKS | FIX_ERRORS}

# qcow2.txt: "Snapshot table entry" fixed part (matches fmt.SnapshotEntry up to extra_data)
_SNAPSHOT_FIXED = struct.Struct(">QIHHIIQII")
MAX_SNAPSHOT_EXTRA_DATA = 1024      # qemu: QCOW_MAX_SNAPSHOT_EXTRA_DATA
MAX_SNAPSHOTS_SIZE = 64 << 20       # qemu: QCOW_MAX_SNAPSHOTS_SIZE
_LITTLE = sys.byteorder == "little"


@dataclass
class CheckResult:
    filename: str
    format: str = "qcow2"
    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    failed: str | None = None          # qemu: "Check failed: ..." (the check itself stopped)
    messages: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """qemu-img check: 0 clean, 1 check errors (or failure), 2 corruptions, 3 leaks only."""
        if self.failed or self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0

    def to_json(self) -> dict:
        """The keys of ``qemu-img check --output=json`` (optional ones only when nonzero)."""
        out: dict = {}
        if self.image_end_offset:
            out["image-end-offset"] = self.image_end_offset
        for key, value in (("total-clusters", self.total_clusters),):
            if value:
                out[key] = value
        out["check-errors"] = self.check_errors
        for key, value in (("corruptions", self.corruptions), ("leaks", self.leaks),
                           ("corruptions-fixed", self.corruptions_fixed),
                           ("leaks-fixed", self.leaks_fixed),
                           ("allocated-clusters", self.allocated_clusters),
                           ("fragmented-clusters", self.fragmented_clusters),
                           ("compressed-clusters", self.compressed_clusters)):
            if value:
                out[key] = value
        out["filename"] = self.filename
        out["format"] = self.format
        return out

    def human(self) -> str:
        """The summary qemu-img check prints on stdout."""
        lines: list[str] = []
        if not (self.corruptions or self.leaks or self.check_errors):
            lines.append("No errors were found on the image.")
        else:
            if self.corruptions:
                lines += ["", f"{self.corruptions} errors were found on the image.",
                          "Data may be corrupted, or further writes to the image may corrupt it."]
            if self.leaks:
                lines += ["", f"{self.leaks} leaked clusters were found on the image.",
                          "This means waste of disk space, but no harm to data."]
            if self.check_errors:
                lines += ["", f"{self.check_errors} internal errors have occurred during the check."]
        if self.total_clusters and self.allocated_clusters:
            a = self.allocated_clusters
            lines.append(f"{a}/{self.total_clusters} = {a * 100.0 / self.total_clusters:0.2f}% allocated, "
                         f"{self.fragmented_clusters * 100.0 / a:0.2f}% fragmented, "
                         f"{self.compressed_clusters * 100.0 / a:0.2f}% compressed clusters")
        if self.image_end_offset:
            lines.append(f"Image end offset: {self.image_end_offset}")
        return "\n".join(lines) + "\n"


@dataclass
class SnapshotInfo:
    """One entry of the snapshot table (qcow2.txt: "Snapshot table entry")."""

    id_str: str
    name: str
    l1_table_offset: int
    l1_size: int
    date_sec: int = 0
    date_nsec: int = 0
    vm_clock_nsec: int = 0
    vm_state_size: int = 0
    icount: int | None = None


def read_snapshot_table(fd: int, h: Qcow2Header) -> tuple[list[SnapshotInfo], int]:
    """The snapshots of the image and the size in bytes of the snapshot table."""
    snaps: list[SnapshotInfo] = []
    pos = h.snapshots_offset
    for _ in range(h.nb_snapshots):
        fixed = os.pread(fd, _SNAPSHOT_FIXED.size, pos)
        if len(fixed) < _SNAPSHOT_FIXED.size:
            raise Qcow2Error(f"Snapshot table entry at {pos:#x} lies past the end of the file")
        (l1_off, l1_size, id_len, name_len, date_sec, date_nsec, vm_clock, vm_state,
         extra_len) = _SNAPSHOT_FIXED.unpack(fixed)
        if extra_len > MAX_SNAPSHOT_EXTRA_DATA:   # qemu: qcow2_do_read_snapshots()
            raise Qcow2Error(f"Too much extra metadata in snapshot table entry at {pos:#x}: {extra_len} bytes")
        pos += _SNAPSHOT_FIXED.size
        rest = os.pread(fd, extra_len + id_len + name_len, pos)
        pos = (pos + extra_len + id_len + name_len + 7) & ~7
        if pos - h.snapshots_offset > MAX_SNAPSHOTS_SIZE:
            raise Qcow2Error(f"Snapshot table is too big: more than {MAX_SNAPSHOTS_SIZE} bytes")
        extra, names = rest[:extra_len], rest[extra_len:]
        # qcow2.txt: optional extra data: vm_state_size_large, disk_size, icount
        if len(extra) >= 8:
            vm_state = int.from_bytes(extra[0:8], "big")
        icount = int.from_bytes(extra[16:24], "big") if len(extra) >= 24 else None
        snaps.append(SnapshotInfo(names[:id_len].decode("utf-8", "replace"),
                                  names[id_len:id_len + name_len].decode("utf-8", "replace"),
                                  l1_off, l1_size, date_sec, date_nsec, vm_clock, vm_state,
                                  None if icount == (1 << 64) - 1 else icount))
    return snaps, pos - h.snapshots_offset


def _decode_refblock(raw: bytes, bits: int) -> array:
    """A refcount block as array('Q'), whatever its entry width.

    Entries of 8 bits and more are widened by moving each byte of the big-endian entries
    into its place in the native 64-bit ones (strided slices, no loop over the entries)."""
    if bits < 8:
        from .refcount import _decode
        return array("Q", _decode(raw, bits))
    width = bits >> 3
    out = bytearray(len(raw) // width * 8)
    for j in range(width):
        significance = width - 1 - j            # byte j of a big-endian entry
        out[significance if _LITTLE else 7 - significance::8] = raw[j::width]
    return array("Q", out)


class _Checker:
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

    # ------------------------------------------------------------ setup
    def _setup(self) -> None:
        h = self.h
        self.cb = h.cluster_bits
        self.cs = h.cluster_size
        self.file_len = os.fstat(self.fd).st_size
        self.extl2 = h.extended_l2
        self.l2_bytes = self.cs                                   # l2_size * entry size
        self.refbits = 1 << h.refcount_order
        self.refmax = (1 << self.refbits) - 1
        self.block_bits = self.cb + 3 - h.refcount_order
        self.block_entries = 1 << self.block_bits
        self.coff_mask, self.cshift, self.ccount_mask = fmt.compressed_masks(self.cb)
        self._load_reftable()
        self.snapshots, self.snapshots_size = read_snapshot_table(self.fd, self.h)
        self.bitmaps = read_directory(self.fd, h)   # qemu opens the image: a broken directory fails
        n = self.cs // 8                                          # entries of an L2 table
        self._zeros = array("Q", bytes(8 * n))                    # to compare slices with
        self._ones = array("Q", [1]) * n
        self._run_ints: tuple[int, int] | None = None             # see _contiguous_run

    def _pread(self, n: int, offset: int) -> bytes:
        """qemu's file driver reads zeros past the end of the file."""
        raw = os.pread(self.fd, n, offset) if offset < self.file_len else b""
        return raw if len(raw) == n else raw + bytes(n - len(raw))

    def _load_reftable(self) -> None:
        h = self.h
        self.reftable = decode_table(self._pread(h.refcount_table_clusters * self.cs,
                                                 h.refcount_table_offset))
        self.blocks: dict[int, array | None] = {}
        self.zero_block = array("Q", [0]) * self.block_entries

    # ------------------------------------------------- stored refcounts
    def _block(self, ti: int) -> array | None:
        """Decoded refcount block ti; None when the table entry is unaligned (an EIO in qemu)."""
        try:
            return self.blocks[ti]
        except KeyError:
            pass
        entry = self.reftable[ti] if ti < len(self.reftable) else 0
        off = entry & fmt.REFT_OFFSET_MASK
        if not off:
            blk = self.zero_block
        elif off & (self.cs - 1):
            blk = None
        elif off >= self.file_len:
            blk = self.zero_block
        else:
            blk = _decode_refblock(self._pread(self.cs, off), self.refbits)
        self.blocks[ti] = blk
        return blk

    def stored(self, cluster: int) -> int | None:
        blk = self._block(cluster >> self.block_bits)
        return None if blk is None else blk[cluster & (self.block_entries - 1)]

    def _set_stored(self, cluster: int, value: int) -> None:
        """Write one refcount in place (its refcount block exists: stored value > 0 or a block)."""
        if not hasattr(self, "_writer"):
            from .refcount import Refcounts
            self._writer = Refcounts(self.fd, self.cb, self.h.refcount_order, list(self.reftable),
                                     self.h.refcount_table_offset, lambda event: None)
        self._writer.set(cluster, value)
        self._block(cluster >> self.block_bits)[cluster & (self.block_entries - 1)] = value

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
        ref = self.ref
        last = (offset + size - 1) >> self.cb
        if last >= len(ref):
            ref.extend(array("Q", [0]) * (last + 1 - len(ref)))
        refmax = self.refmax
        for k in range(offset >> self.cb, last + 1):
            if ref[k] >= refmax:
                self._overflow(k)
            else:
                ref[k] += 1

    def _overflow(self, cluster: int) -> None:
        self._msg(f"ERROR: overflow cluster offset={cluster << self.cb:#x}")
        self._msg("Use qemu-img amend to increase the refcount entry width or qemu-img convert to "
                  "create a clean copy if the image cannot be opened for writing")
        self.res.corruptions += 1

    def _check_l2(self, l2_offset: int, frag: bool, fix: int = 0) -> None:
        """qemu: check_refcounts_l2()."""
        res = self.res
        raw = self._pread(self.l2_bytes, l2_offset)
        if not self.extl2 and self._l2_fast(raw, frag):
            return
        self._may_exceed_refmax = True      # the loop below counts without the refcount_bits limit
        table = decode_table(raw)
        if self.extl2:
            entries, bitmaps = table[0::2], table[1::2]
        else:
            entries, bitmaps = table, None
        ref = self.ref
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
                ref[off >> cb] += 1
        res.allocated_clusters += allocated
        res.fragmented_clusters += fragmented
        res.compressed_clusters += compressed

    def _contiguous_run(self, raw: bytes) -> tuple[int, int]:
        """(first entry, m) if the L2 table ``raw`` holds m standard entries with the same flags
        (COPIED or none) mapping contiguous, aligned clusters inside the file, then zeros only
        (m = 0: a table of zeros); (0, -1) otherwise.  Decided without a loop over the entries."""
        m = (len(raw.rstrip(b"\0")) + 7) >> 3
        if not m:
            return 0, 0
        first = int.from_bytes(raw[:8], "big")
        flags, off = first & ~fmt.L2E_OFFSET_MASK, first & fmt.L2E_OFFSET_MASK
        if flags not in (0, fmt.QCOW_OFLAG_COPIED) or not off or off & (self.cs - 1):
            return 0, -1
        if off + (m - 1) * self.cs >= self.file_len:
            return 0, -1
        # raw[:8m] == [first + i*cs for i in range(m)], compared as one big-endian integer whose
        # 64-bit digits are the entries: ones and steps have digits 1 and i*cs for a whole table
        n = len(raw) // 8
        if self._run_ints is None:
            steps = array("Q", range(0, n * self.cs, self.cs))
            self._run_ints = (int.from_bytes(encode_table(self._ones), "big"),
                              int.from_bytes(encode_table(steps), "big"))
        ones, steps = self._run_ints
        if m < n:                           # keep the digits of entries 0..m-1
            ones, steps = ones >> 64 * (n - m), steps >> 64 * (n - m)
        if int.from_bytes(raw[:8 * m], "big") != first * ones + steps:
            return 0, -1
        return first, m

    def _l2_fast(self, raw: bytes, frag: bool) -> bool:
        """The common cases of _check_l2 (a table of zeros, or a sequentially allocated one)
        without a Python loop."""
        first, m = self._contiguous_run(raw)
        if m <= 0:
            return m == 0
        k0 = (first & fmt.L2E_OFFSET_MASK) >> self.cb
        ref = self.ref
        part = ref[k0:k0 + m]
        if part == self._zeros[:m]:
            ref[k0:k0 + m] = self._ones[:m]
        else:
            ref[k0:k0 + m] = array("Q", map(operator.add, part, itertools.repeat(1, m)))
            self._may_exceed_refmax = True
        if frag:
            self.res.allocated_clusters += m
        return True

    def _check_l1(self, l1_offset: int, l1_size: int, frag: bool, fix: int = 0) -> None:
        """qemu: check_refcounts_l1()."""
        if not l1_size:
            return
        self._inc(l1_offset, l1_size * 8)
        l1 = decode_table(self._pread(l1_size * 8, l1_offset))
        cs = self.cs
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
            self._check_l2(l2_offset, frag, fix)

    def _check_bitmaps(self) -> None:
        """qemu: qcow2_check_bitmaps_refcounts() (the directory was read at open)."""
        if not self.bitmaps:
            return
        _, size, offset = bitmaps_extension(self.h)
        self._inc(offset, size)
        for e in self.bitmaps:
            self._inc(e.table_offset, e.table_size * 8)
            for entry in decode_table(self._pread(e.table_size * 8, e.table_offset)):
                if not check_table_entry(entry, self.cs):
                    self.res.corruptions += 1
                elif entry & fmt.BME_TABLE_ENTRY_OFFSET_MASK:
                    self._inc(entry & fmt.BME_TABLE_ENTRY_OFFSET_MASK, self.cs)

    def _check_refblocks(self, fix: int) -> bool:
        """qemu: check_refblocks(); True if the refcount structure must be rebuilt."""
        rebuild = False
        res = self.res
        for i, entry in itertools.compress(enumerate(self.reftable), self.reftable):
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
        self.ref = array("Q", [0]) * ((self.file_len + cs - 1) >> self.cb)
        self._may_exceed_refmax = False     # set where a reference is counted without the limit
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
        ref = self.ref
        # qemu refuses each increment past the maximum
        if self._may_exceed_refmax and ref and max(ref) > self.refmax:
            for k, v in enumerate(ref):
                if v > self.refmax:
                    for _ in range(v - self.refmax):
                        self._overflow(k)
                    ref[k] = self.refmax
        return self._check_refblocks(fix)

    # -------------------------------------------------------- comparing
    def compare(self, fix: int) -> tuple[bool, int]:
        """qemu: compare_refcounts(); returns (rebuild, highest cluster in use)."""
        res = self.res
        ref = self.ref
        n = len(ref)
        B = self.block_entries
        rebuild = False
        highest = 0
        for ti in range((n + B - 1) >> self.block_bits):
            first = ti << self.block_bits
            end = min(n, first + B)
            want = ref[first:end]
            blk = self._block(ti)
            if blk is None:
                for i in range(first, end):
                    self._msg(f"Can't get refcount for cluster {i}: Input/output error")
                    res.check_errors += 1
                    if ref[i]:
                        highest = i
                continue
            have = blk[:end - first]
            if have == want:
                used = len(want.tobytes().rstrip(b"\0"))
                if used:
                    highest = first + (used - 1) // 8
                continue
            for j in range(end - first):
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
                        self._set_stored(i, r2)
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
    def check_copied(self, fix: int) -> None:
        """qemu: check_oflag_copied(), against the stored refcounts."""
        res = self.res
        if fix & FIX_ERRORS:
            repair = True
        elif fix & FIX_LEAKS:
            repair = not res.check_errors and not res.corruptions and not res.leaks
        else:
            repair = False
        h = self.h
        cb = self.cb
        COPIED, COMPRESSED = fmt.QCOW_OFLAG_COPIED, fmt.QCOW_OFLAG_COMPRESSED
        OMASK = fmt.L2E_OFFSET_MASK
        bb, bmask = self.block_bits, self.block_entries - 1
        words = 2 if self.extl2 else 1
        l1 = decode_table(self._pread(h.l1_size * 8, h.l1_table_offset))
        word = "Repairing" if repair else "ERROR"
        for i, l1e in itertools.compress(enumerate(l1), l1):   # the nonzero entries
            l2_offset = l1e & fmt.L1E_OFFSET_MASK
            if not l2_offset:
                continue
            rc = self.stored(l2_offset >> cb)
            if rc is None:
                continue
            if (rc == 1) != bool(l1e & COPIED):
                res.corruptions += 1
                self._msg(f"{word} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1e:x} refcount={rc}")
                if repair:
                    new = l1e | COPIED if rc == 1 else l1e & ~COPIED
                    pwrite_all(self.fd, fmt.U64.pack(new), h.l1_table_offset + i * 8)
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
            raw = self._pread(self.l2_bytes, l2_offset)
            if words == 1 and self._copied_fast(raw):
                continue
            table = decode_table(raw)
            dirty = 0
            cur_ti, blk = -1, None
            for j in range(0, len(table), words):
                e = table[j]
                if e & COMPRESSED:
                    continue
                off = e & OMASK
                if not off:
                    continue                        # ZERO_PLAIN or UNALLOCATED
                k = off >> cb
                ti = k >> bb
                if ti != cur_ti:
                    cur_ti, blk = ti, self._block(ti)
                if blk is None:
                    continue
                rc = blk[k & bmask]
                if (rc == 1) != bool(e & COPIED):
                    res.corruptions += 1
                    self._msg(f"{word} OFLAG_COPIED data cluster: l2_entry={e:x} refcount={rc}")
                    if repair:
                        table[j] = e | COPIED if rc == 1 else e & ~COPIED
                        dirty += 1
            if dirty:
                pwrite_all(self.fd, encode_table(table), l2_offset)
                res.corruptions -= dirty
                res.corruptions_fixed += dirty

    def _copied_fast(self, raw: bytes) -> bool:
        """True if every entry of an L2 table is known right about COPIED without a Python loop."""
        first, m = self._contiguous_run(raw)
        if m <= 0:
            return m == 0
        if first & ~fmt.L2E_OFFSET_MASK != fmt.QCOW_OFLAG_COPIED:
            return False
        k = (first & fmt.L2E_OFFSET_MASK) >> self.cb
        end = k + m
        bb, B = self.block_bits, self.block_entries
        while k < end:
            blk = self._block(k >> bb)
            if blk is None:
                return False
            a = k & (B - 1)
            b = min(B, a + end - k)
            if blk[a:b] != self._ones[:b - a]:
                return False
            k += b - a
        return True

    # -------------------------------------------------------- rebuilding
    def rebuild_refcounts(self) -> None:
        """qemu: rebuild_refcount_structure(): new refcount blocks and table from self.ref.

        The new structures take free clusters (first fit on the computed
        refcounts, growing the file if needed); the header is switched to the
        new table after everything is durable.  The old structures are left
        behind as leaks, which the caller frees.
        """
        from .refcount import _encode   # the engine's refcount block encoding (only repairs need it)
        ref = array("Q", self.ref)
        cs, B, bb = self.cs, self.block_entries, self.block_bits
        free_hint = 0

        def alloc(count: int) -> int:
            nonlocal free_hint
            c, run = free_hint, 0
            while run < count:
                if c >= len(ref) or ref[c] == 0:
                    run += 1
                else:
                    run = 0
                c += 1
            start = c - count
            if c > len(ref):
                ref.extend(array("Q", [0]) * (c - len(ref)))
            for k in range(start, c):
                ref[k] = 1
            if count == 1 and start == free_hint:
                free_hint = start + 1
            return start

        blocks: dict[int, int] = {}
        table_start, table_clusters = -1, 0
        while True:
            changed = False
            for ti in range((len(ref) + B - 1) >> bb):
                if ti in blocks:
                    continue
                part = ref[ti << bb:(ti + 1) << bb]
                if part.count(0) != len(part):
                    blocks[ti] = alloc(1)
                    changed = True
            need = max(1, (((max(blocks) + 1) * 8) + cs - 1) // cs)
            if need > table_clusters:
                if table_start >= 0:
                    for k in range(table_start, table_start + table_clusters):
                        ref[k] = 0
                table_start, table_clusters = alloc(need), need
                changed = True
            if not changed:
                break
        table = array("Q", [0]) * (table_clusters * cs // 8)
        for ti, c in blocks.items():
            table[ti] = c << self.cb
            part = ref[ti << bb:(ti + 1) << bb]
            part.extend(array("Q", [0]) * (B - len(part)))
            if max(part) > self.refmax:
                part = array("Q", (min(v, self.refmax) for v in part))
            pwrite_all(self.fd, _encode(part, self.refbits), c << self.cb)
        pwrite_all(self.fd, encode_table(table), table_start << self.cb)
        os.fsync(self.fd)
        pwrite_all(self.fd, fmt.U64.pack(table_start << self.cb) + table_clusters.to_bytes(4, "big"),
                  fmt.OFFSET_REFCOUNT_TABLE)
        os.fsync(self.fd)
        self.h.refcount_table_offset = table_start << self.cb
        self.h.refcount_table_clusters = table_clusters
        self.file_len = os.fstat(self.fd).st_size
        self._load_reftable()
        if hasattr(self, "_writer"):
            del self._writer

    # -------------------------------------------------------- the check
    def run(self, fix: int) -> CheckResult:
        """qemu: qcow2_check_refcounts() plus the dirty/corrupt bit handling of qcow2_co_check."""
        self.res = res = CheckResult(self.path)
        cs = self.cs
        res.total_clusters = (self.h.size + cs - 1) >> self.cb
        rebuild = self.calculate(fix)
        saved = _copy_counts(res)
        rebuild2, highest = self.compare(0)
        rebuild = rebuild or rebuild2
        if rebuild and fix & FIX_ERRORS:
            old = _copy_counts(res)
            self._msg("Rebuilding refcount structure")
            self.rebuild_refcounts()
            for name in _COUNTS:
                setattr(res, name, getattr(saved, name))
            res.corruptions = res.leaks = 0
            keep_msgs = res.messages
            res.allocated_clusters = res.fragmented_clusters = res.compressed_clusters = 0
            self.calculate(0)
            after = _copy_counts(res)
            # the old refcount structures are leaked now: free them
            for name in _COUNTS:
                setattr(res, name, 0)
            _, highest = self.compare(FIX_LEAKS)
            fresh_leaks = res.leaks
            for name in _COUNTS:
                setattr(res, name, getattr(after, name))
            res.messages = keep_msgs
            if res.corruptions < old.corruptions:
                res.corruptions_fixed += old.corruptions - res.corruptions
            if res.leaks < old.leaks:
                res.leaks_fixed += old.leaks - res.leaks
            res.leaks += fresh_leaks
        elif fix:
            if rebuild:
                self._msg("ERROR need to rebuild refcount structures")
                res.check_errors += 1
                res.failed = os.strerror(errno.EIO)
                return res
            if res.leaks or res.corruptions:
                for name in _COUNTS:
                    setattr(res, name, getattr(saved, name))
                _, highest = self.compare(fix)
        self.check_copied(fix)
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


_COUNTS = ("corruptions", "leaks", "check_errors", "corruptions_fixed", "leaks_fixed",
           "allocated_clusters", "fragmented_clusters", "compressed_clusters")


def _copy_counts(res: CheckResult) -> CheckResult:
    c = CheckResult(res.filename)
    for name in _COUNTS:
        setattr(c, name, getattr(res, name))
    return c


def check_image(path: str, repair: str | None = None) -> CheckResult:
    """Check (and with ``repair`` "leaks" or "all", repair) the qcow2 image at ``path``.

    Raises Qcow2Error or OSError if the image cannot be opened at all.  After a
    repair the image is checked again and that result is returned, carrying
    the numbers of fixed corruptions and leaks (like qemu-img check -r).
    """
    if repair not in _REPAIR_MODES:
        raise ValueError(f"repair must be None, 'leaks' or 'all', not {repair!r}")
    fix = _REPAIR_MODES[repair]
    checker = _Checker(path, writable=bool(fix))
    try:
        res = checker.run(fix)
    finally:
        checker.close()
    if res.failed or not (res.corruptions_fixed or res.leaks_fixed):
        return res
    messages = res.messages
    checker = _Checker(path, writable=False)
    try:
        again = checker.run(0)
    finally:
        checker.close()
    again.corruptions_fixed = res.corruptions_fixed
    again.leaks_fixed = res.leaks_fixed
    again.messages = messages + again.messages
    return again
