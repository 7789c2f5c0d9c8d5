"""Persistent dirty bitmaps (qcow2.txt: "Bitmaps"; qemu: block/qcow2-bitmap.c).

The one parser of the bitmap directory (``read_directory``, used by check/ and
inspect.py too) and ``PersistentBitmaps``, which follows qemu's life cycle of a
qcow2 image's bitmaps:

- open (qcow2_load_dirty_bitmaps): every bitmap is loaded; one flagged in-use was
  not stored cleanly (a crash) and is *inconsistent*: kept, never served nor stored.
  Opened read-write, the others get the in-use flag on disk at once
  (update_ext_header_and_dir_in_place), so a crash leaves them untrusted;
- while served: every write, discard and write-zeroes sets the bits of the
  granules it touches in the enabled (auto) bitmaps, in memory;
- clean close (qcow2_store_persistent_dirty_bitmaps): each consistent bitmap is
  written to new clusters (a cluster of the bitmap with no bit set is not stored),
  a new directory without the in-use flags replaces the old one, and the old
  tables and directory are freed.

In memory a bitmap is its serialized form (qemu's hbitmap serialization: granule
i is bit i % 8 of byte i // 8), so loading and storing copy clusters as they are.
"""

from __future__ import annotations

import os
import re
from array import array
from dataclasses import dataclass

from ..blockdev import fileio
from . import format as fmt
from .errors import Qcow2Error
from .l2cache import decode_table, encode_table

MAX_BITMAPS = 65535                  # qemu: QCOW2_MAX_BITMAPS
MAX_DIRECTORY_SIZE = 1024 * 1024 * 1024 // 16   # qemu: QCOW2_MAX_BITMAP_DIRECTORY_SIZE (64 MiB)
MAX_TABLE_SIZE = 0x8000000           # qemu: BME_MAX_TABLE_SIZE
MAX_PHYS_SIZE = 0x20000000           # qemu: BME_MAX_PHYS_SIZE
MIN_GRANULARITY_BITS, MAX_GRANULARITY_BITS = 9, 31
MAX_NAME_SIZE = 1023

_NONZERO = re.compile(b"[^\x00]")
_NOT_FF = re.compile(b"[^\xff]")


@dataclass
class BitmapDirEntry:
    """One bitmap directory entry (fmt.BitmapDirEntry and its name)."""

    table_offset: int
    table_size: int
    flags: int
    type: int
    granularity_bits: int
    name: str
    extra_data_size: int = 0

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits

    def encode(self) -> bytes:
        name = self.name.encode()
        raw = fmt.BITMAP_DIR_ENTRY_STRUCT.pack(self.table_offset, self.table_size, self.flags, self.type,
                                               self.granularity_bits, len(name), 0) + name
        return raw.ljust((len(raw) + 7) & ~7, b"\0")


def bitmaps_extension(h) -> tuple[int, int, int] | None:
    """(nb_bitmaps, directory size, directory offset) of the header's bitmaps extension, or
    None when there is none or the autoclear bit says a program that does not know bitmaps
    wrote the image since (qemu: qcow2_read_extensions: "all bitmaps are now considered
    inconsistent", and ignored)."""
    if h.bitmaps_extension is None or not h.autoclear_features & fmt.AUTOCLEAR_BITMAPS:
        return None
    raw = h.bitmaps_extension.ljust(fmt.BITMAPS_EXT_STRUCT.size, b"\0")
    return fmt.BITMAPS_EXT_STRUCT.unpack_from(raw)


def bitmap_bytes(disk_size: int, granularity_bits: int) -> int:
    """Bytes of a bitmap's serialization: whole 64-bit words (qemu: hbitmap serialization)."""
    bits = -(-disk_size >> granularity_bits)
    return -(-bits // 64) * 8


def _check_entry(e: BitmapDirEntry, cluster_size: int, disk_size: int) -> bool:
    """qemu: check_dir_entry()."""
    if (e.table_size == 0 or e.table_offset == 0 or e.table_offset % cluster_size
            or e.table_size > MAX_TABLE_SIZE or not MIN_GRANULARITY_BITS <= e.granularity_bits <= MAX_GRANULARITY_BITS
            or e.flags & fmt.BME_RESERVED_FLAGS or len(e.name.encode()) > MAX_NAME_SIZE
            or e.type != fmt.BT_DIRTY_TRACKING_BITMAP):
        return False
    phys = e.table_size * cluster_size
    if phys > MAX_PHYS_SIZE:
        return False
    # an in-use bitmap may have a table too small (saved badly after a resize)
    return bool(e.flags & fmt.BME_FLAG_IN_USE) or disk_size <= (phys * 8) << e.granularity_bits


def read_directory(fd: int, h) -> list[BitmapDirEntry]:
    """qemu: bitmap_list_load(): the bitmap directory, checked; Qcow2Error with qemu's
    message when it is broken.  An image without (valid) bitmaps extension has none."""
    ext = bitmaps_extension(h)
    if ext is None or ext[0] == 0:
        return []
    nb, size, offset = ext
    if size == 0:
        raise Qcow2Error("Requested bitmap directory size is zero")
    if size > MAX_DIRECTORY_SIZE:
        raise Qcow2Error("Requested bitmap directory size is too big")
    raw = os.pread(fd, size, offset)
    if len(raw) < size:
        raise Qcow2Error("Failed to read bitmap directory")
    entries: list[BitmapDirEntry] = []
    pos = 0
    fixed = fmt.BITMAP_DIR_ENTRY_STRUCT
    while pos < size:
        if pos + fixed.size > size:
            raise Qcow2Error("Broken bitmap directory")
        if len(entries) + 1 > nb:
            raise Qcow2Error("More bitmaps found than specified in header extension")
        (table_offset, table_size, flags, type_, gran, name_size, extra) = fixed.unpack_from(raw, pos)
        end = pos + ((fixed.size + name_size + extra + 7) & ~7)
        if end > size:
            raise Qcow2Error("Broken bitmap directory")
        name_at = pos + fixed.size + extra
        name = raw[name_at:name_at + name_size].decode("utf-8", "replace")
        if extra:
            raise Qcow2Error("Bitmap extra data is not supported")
        e = BitmapDirEntry(table_offset, table_size, flags, type_, gran, name, extra)
        if not _check_entry(e, h.cluster_size, h.size):
            raise Qcow2Error(f"Bitmap '{name}' doesn't satisfy the constraints")
        entries.append(e)
        pos = end
    if len(entries) != nb:
        raise Qcow2Error("Less bitmaps found than specified in header extension")
    return entries


def check_table_entry(entry: int, cluster_size: int) -> bool:
    """qemu: check_table_entry()."""
    if entry & fmt.BME_TABLE_ENTRY_RESERVED_MASK:
        return False
    off = entry & fmt.BME_TABLE_ENTRY_OFFSET_MASK
    return not off or not (entry & fmt.BME_TABLE_ENTRY_FLAG_ALL_ONES or off % cluster_size)


def referenced_regions(h, directory: list[BitmapDirEntry], read) -> tuple[list[tuple[int, int]], int]:
    """qemu: qcow2_check_bitmaps_refcounts(): the (offset, size) of what the bitmaps hold (the
    directory; each bitmap table and the clusters its entries name) and the number of table
    entries check_table_entry() refuses (corruptions).  ``read(n, offset)`` reads a table."""
    if not directory:
        return [], 0
    _, size, offset = bitmaps_extension(h)
    regions, bad = [(offset, size)], 0
    for e in directory:
        regions.append((e.table_offset, e.table_size * 8))
        for entry in decode_table(read(e.table_size * 8, e.table_offset)):
            if not check_table_entry(entry, h.cluster_size):
                bad += 1
            elif entry & fmt.BME_TABLE_ENTRY_OFFSET_MASK:
                regions.append((entry & fmt.BME_TABLE_ENTRY_OFFSET_MASK, h.cluster_size))
    return regions, bad


def read_table(fd: int, e: BitmapDirEntry) -> array:
    """The bitmap table of entry ``e`` (unchecked entries)."""
    return decode_table(os.pread(fd, e.table_size * 8, e.table_offset))


def info_flags(flags: int) -> list[str]:
    """qemu: get_bitmap_info_flags()."""
    return [name for bit, name in ((fmt.BME_FLAG_IN_USE, "in-use"), (fmt.BME_FLAG_AUTO, "auto")) if flags & bit]


class DirtyBitmap:
    """One bitmap in memory (qemu's BdrvDirtyBitmap of a persistent bitmap)."""

    def __init__(self, entry: BitmapDirEntry, disk_size: int):
        self.name = entry.name
        self.granularity_bits = entry.granularity_bits
        self.granularity = entry.granularity
        self.disk_size = disk_size
        self.enabled = bool(entry.flags & fmt.BME_FLAG_AUTO)
        self.inconsistent = bool(entry.flags & fmt.BME_FLAG_IN_USE)
        self.nbits = -(-disk_size >> self.granularity_bits)
        self.bits = bytearray(bitmap_bytes(disk_size, self.granularity_bits))

    # -------------------------------------------------------------- bits
    def _set_bits(self, first: int, last: int) -> None:
        """Set granules [first, last)."""
        bits = self.bits
        while first < last and first & 7:
            bits[first >> 3] |= 1 << (first & 7)
            first += 1
        full_end = last & ~7
        if first < full_end:
            bits[first >> 3:full_end >> 3] = b"\xff" * ((full_end - first) >> 3)
            first = full_end
        while first < last:
            bits[first >> 3] |= 1 << (first & 7)
            first += 1

    def mark(self, offset: int, length: int) -> None:
        """qemu: bdrv_set_dirty(): every granule [offset, offset + length) touches."""
        if length > 0:
            g = self.granularity_bits
            self._set_bits(offset >> g, min(self.nbits, ((offset + length - 1) >> g) + 1))

    def _get(self, i: int) -> bool:
        return bool(self.bits[i >> 3] >> (i & 7) & 1)

    def _next(self, i: int, dirty: bool) -> int:
        """The first granule >= i that is dirty (or clean), or nbits."""
        bits, n = self.bits, self.nbits
        while i < n and i & 7:
            if self._get(i) == dirty:
                return i
            i += 1
        if i >= n:
            return n
        m = (_NONZERO if dirty else _NOT_FF).search(bits, i >> 3)
        if m is None:
            return n
        i = m.start() << 3
        while i < n and self._get(i) != dirty:
            i += 1
        return min(i, n)

    def runs(self, offset: int, length: int, max_runs: int) -> list[tuple[int, bool]]:
        """(length, dirty) runs over [offset, offset + length), at most ``max_runs``
        (qemu nbd/server.c: bitmap_to_extents())."""
        g = self.granularity_bits
        out: list[tuple[int, bool]] = []
        pos, end = offset, offset + length
        while pos < end and len(out) < max_runs:
            dirty = self._get(pos >> g)
            nxt = self._next((pos >> g) + 1, not dirty) << g
            n = min(end, nxt) - pos
            out.append((n, dirty))
            pos += n
        return out

    def clear_tail(self) -> None:
        """Bits past the last granule stay clear (a stored cluster may carry any)."""
        for i in range(self.nbits, len(self.bits) * 8):
            self.bits[i >> 3] &= ~(1 << (i & 7))

    # ---------------------------------------------------- load and store
    def load(self, fd: int, table: array, cluster_size: int) -> None:
        """qemu: load_bitmap_data()."""
        for i, entry in enumerate(table):
            start = i * cluster_size
            if start >= len(self.bits):
                break
            off = entry & fmt.BME_TABLE_ENTRY_OFFSET_MASK
            n = min(cluster_size, len(self.bits) - start)
            if off:
                self.bits[start:start + n] = os.pread(fd, n, off).ljust(n, b"\0")
            elif entry & fmt.BME_TABLE_ENTRY_FLAG_ALL_ONES:
                self.bits[start:start + n] = b"\xff" * n
        self.clear_tail()

    def table_size(self, cluster_size: int) -> int:
        return -(-len(self.bits) // cluster_size)

    def clusters(self, cluster_size: int):
        """(index, bytes of the cluster) of every bitmap cluster with a bit set (qemu:
        store_bitmap_data() skips the others: their table entry stays 0)."""
        for i in range(self.table_size(cluster_size)):
            chunk = self.bits[i * cluster_size:(i + 1) * cluster_size]
            if _NONZERO.search(chunk):
                yield i, bytes(chunk).ljust(cluster_size, b"\0")


class PersistentBitmaps:
    """The bitmaps of one open Qcow2Image (``img.bitmaps``)."""

    def __init__(self, img):
        self.img = img
        self.entries: list[BitmapDirEntry] = []
        self.by_name: dict[str, DirtyBitmap] = {}
        self.tracking: list[DirtyBitmap] = []    # enabled and consistent: writes mark them
        # the qemu-1.1.2 modes act as 1.1.2 did: it knew no bitmaps, and dropped them
        self.maintained = img.version >= 3 and not img.policy.follows_1_1
        if not self.maintained:
            return
        self.entries = read_directory(img.fd, img.header)
        for e in self.entries:
            bm = DirtyBitmap(e, img.size)
            if not bm.inconsistent:   # qemu: load_bitmap() skips an in-use bitmap's data
                table = read_table(img.fd, e)
                if not all(check_table_entry(t, img.cluster_size) for t in table):
                    raise Qcow2Error(f"Could not read bitmap_table table from image for bitmap "
                                     f"'{e.name}': Invalid argument")
                bm.load(img.fd, table, img.cluster_size)
            self.by_name[e.name] = bm
        if not img.read_only:
            self.tracking = [bm for bm in self.by_name.values() if bm.enabled and not bm.inconsistent]

    def mark(self, offset: int, length: int) -> None:
        """A write, discard or write-zeroes of [offset, offset + length)."""
        for bm in self.tracking:
            bm.mark(offset, length)

    # ----------------------------------------------------------- on disk
    def _write_autoclear(self, bits: int) -> None:
        img = self.img
        img.header.autoclear_features = bits
        fileio.pwrite_all(img.fd, fmt.U64.pack(bits), fmt.OFFSET_AUTOCLEAR)
        img.refcounts.sync()

    def _write_extension(self, nb: int, size: int, offset: int) -> None:
        img = self.img
        raw = fmt.BITMAPS_EXT_STRUCT.pack(nb, size, offset)
        fileio.pwrite_all(img.fd, raw, img.header.bitmaps_extension_offset)
        img.header.bitmaps_extension = raw

    def mark_in_use(self) -> None:
        """qemu: qcow2_load_dirty_bitmaps() on a writable image: the consistent bitmaps get the
        in-use flag in place (update_ext_header_and_dir_in_place: the autoclear bit is
        dropped while the directory changes)."""
        if not self.entries or all(e.flags & fmt.BME_FLAG_IN_USE for e in self.entries):
            return
        for e in self.entries:
            e.flags |= fmt.BME_FLAG_IN_USE
        _, size, offset = bitmaps_extension(self.img.header)
        bits = self.img.header.autoclear_features
        self._write_autoclear(bits & ~fmt.AUTOCLEAR_BITMAPS)
        fileio.pwrite_all(self.img.fd, b"".join(e.encode() for e in self.entries), offset)
        self.img.refcounts.sync()
        self._write_autoclear(bits)

    def store(self) -> None:
        """qemu: qcow2_store_persistent_dirty_bitmaps() at a clean close of a writable image;
        the caller flushes afterwards (the freed clusters)."""
        img = self.img
        if img.read_only or not self.entries:
            return
        cs = img.cluster_size
        drop: list[BitmapDirEntry] = []
        new_entries: list[BitmapDirEntry] = []
        for e in self.entries:
            bm = self.by_name[e.name]
            if bm.inconsistent:
                new_entries.append(e)       # left as it is, in use: nobody may trust it
                continue
            drop.append(e)
            new_entries.append(self._store_bitmap(bm, e))
        # qemu: update_ext_header_and_dir(): a new directory, then the header points at it
        _, old_size, old_offset = bitmaps_extension(img.header)
        directory = b"".join(e.encode() for e in new_entries)
        dir_offset, _ = img._alloc(-(-len(directory) // cs))
        fileio.pwrite_all(img.fd, directory, dir_offset)
        img.refcounts.sync()
        self._write_extension(len(new_entries), len(directory), dir_offset)
        self._write_autoclear(img.header.autoclear_features | fmt.AUTOCLEAR_BITMAPS)
        img._free_clusters(old_offset & ~(cs - 1), -(-(old_offset % cs + old_size) // cs) * cs, "bitmap")
        for e in drop:   # qemu: free_bitmap_clusters()
            for entry in read_table(img.fd, e):
                off = entry & fmt.BME_TABLE_ENTRY_OFFSET_MASK
                if off and check_table_entry(entry, cs):
                    img._free_clusters(off, cs, "bitmap")
            img._free_clusters(e.table_offset, -(-e.table_size * 8 // cs) * cs, "bitmap")
        self.entries = new_entries

    def _store_bitmap(self, bm: DirtyBitmap, old: BitmapDirEntry) -> BitmapDirEntry:
        """qemu: store_bitmap(): data clusters, then the table, in new clusters."""
        img = self.img
        cs = img.cluster_size
        table = array("Q", bytes(8 * bm.table_size(cs)))
        for i, data in bm.clusters(cs):
            off, _ = img._alloc(1)
            fileio.pwrite_all(img.fd, data, off)
            table[i] = off
        raw = encode_table(table)
        table_offset, _ = img._alloc(-(-len(raw) // cs))
        fileio.pwrite_all(img.fd, raw, table_offset)
        return BitmapDirEntry(table_offset, len(table), fmt.BME_FLAG_AUTO if bm.enabled else 0,
                              fmt.BT_DIRTY_TRACKING_BITMAP, bm.granularity_bits, bm.name)
