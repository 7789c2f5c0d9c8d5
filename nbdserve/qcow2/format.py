"""qcow2 on-disk structures, declared once with construct (qcow2.txt).

The construct declarations are the reference for every layout.  The per-request
paths (L1/L2/refcount lookups) use the plain integer masks and ``struct``
formats below, which are derived from (and checked against) the declarations
at import time.
"""

from __future__ import annotations

import struct

from construct import (BitsInteger, BitStruct, Const, Flag, Int8ub, Int16ub,
                       Int32ub, Int64ub, Padding, PaddedString, Struct)

from ..blockdev.probe import QCOW2_MAGIC


# qcow2.txt: "Header" (version 2 ends at byte 72; version 3 adds the rest)
HeaderV2 = Struct(
    "magic" / Const(QCOW2_MAGIC),
    "version" / Int32ub,
    "backing_file_offset" / Int64ub,
    "backing_file_size" / Int32ub,
    "cluster_bits" / Int32ub,
    "size" / Int64ub,
    "crypt_method" / Int32ub,
    "l1_size" / Int32ub,
    "l1_table_offset" / Int64ub,
    "refcount_table_offset" / Int64ub,
    "refcount_table_clusters" / Int32ub,
    "nb_snapshots" / Int32ub,
    "snapshots_offset" / Int64ub,
)
HeaderV3Extra = Struct(
    "incompatible_features" / Int64ub,
    "compatible_features" / Int64ub,
    "autoclear_features" / Int64ub,
    "refcount_order" / Int32ub,
    "header_length" / Int32ub,
)
# qcow2.txt: "Additional fields (version 3 and higher)": byte 104
CompressionTypeField = Struct("compression_type" / Int8ub)

HEADER_V2_SIZE = HeaderV2.sizeof()          # 72
HEADER_V3_SIZE = HEADER_V2_SIZE + HeaderV3Extra.sizeof()  # 104
HEADER_V3_WITH_COMPRESSION = 112            # 104 + compression_type + 7 padding bytes

# qcow2.txt: "incompatible_features"
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
# qcow2.txt: "compatible_features"
COMPAT_LAZY_REFCOUNTS = 1 << 0
# qcow2.txt: "autoclear_features"
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

COMPRESSION_DEFLATE = 0
COMPRESSION_ZSTD = 1

# qcow2.txt: "Header extensions"
ExtensionHeader = Struct("type" / Int32ub, "length" / Int32ub)
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_ENCRYPTION = 0x0537BE77
EXT_DATA_FILE = 0x44415441

FeatureNameEntry = Struct(
    "type" / Int8ub,       # 0 incompatible, 1 compatible, 2 autoclear
    "bit" / Int8ub,
    "name" / PaddedString(46, "ascii"),
)
BitmapsExtension = Struct(
    "nb_bitmaps" / Int32ub,
    Padding(4),
    "bitmap_directory_size" / Int64ub,
    "bitmap_directory_offset" / Int64ub,
)

# qcow2.txt: "Bitmaps": a bitmap directory entry's fixed part (extra data, then the name,
# follow; the entry is padded to 8 bytes) and a bitmap table entry
BitmapDirEntry = Struct(
    "bitmap_table_offset" / Int64ub,
    "bitmap_table_size" / Int32ub,
    "flags" / Int32ub,
    "type" / Int8ub,
    "granularity_bits" / Int8ub,
    "name_size" / Int16ub,
    "extra_data_size" / Int32ub,
)
BitmapTableEntry = BitStruct(
    "reserved_high" / BitsInteger(8),      # bits 56-63
    "cluster_offset" / BitsInteger(47),    # bits 9-55 (offset >> 9)
    "reserved_low" / BitsInteger(8),       # bits 1-8
    "all_ones" / Flag,                     # bit 0: with offset 0, every bit of the cluster is set
)
BME_FLAG_IN_USE = 1 << 0
BME_FLAG_AUTO = 1 << 1
BME_RESERVED_FLAGS = 0xFFFFFFFC
BT_DIRTY_TRACKING_BITMAP = 1

# qcow2.txt: "Snapshots": a snapshot table entry's fixed part (extra data, the id and the
# name follow; the entry is padded to 8 bytes)
SnapshotEntry = Struct(
    "l1_table_offset" / Int64ub,
    "l1_size" / Int32ub,
    "id_str_size" / Int16ub,
    "name_size" / Int16ub,
    "date_sec" / Int32ub,
    "date_nsec" / Int32ub,
    "vm_clock_nsec" / Int64ub,
    "vm_state_size" / Int32ub,
    "extra_data_size" / Int32ub,
)

# qcow2.txt: "Host cluster management" / "Cluster mapping".  Bit 63 first.
L1Entry = BitStruct(
    "copied" / Flag,                       # bit 63
    "reserved_high" / BitsInteger(7),      # bits 56-62
    "l2_offset" / BitsInteger(47),         # bits 9-55 (offset >> 9)
    "reserved_low" / BitsInteger(9),       # bits 0-8
)
L2Entry = BitStruct(
    "copied" / Flag,                       # bit 63
    "compressed" / Flag,                   # bit 62
    "reserved_high" / BitsInteger(6),      # bits 56-61
    "host_offset" / BitsInteger(47),       # bits 9-55 (offset >> 9)
    "reserved_low" / BitsInteger(8),       # bits 1-8
    "zero" / Flag,                         # bit 0
)
RefcountTableEntry = BitStruct(
    "refblock_offset" / BitsInteger(55),   # bits 9-63 (offset >> 9)
    "reserved" / BitsInteger(9),           # bits 0-8
)
# qcow2.txt: "Extended L2 Entries": the second 64 bits
SubclusterBitmap = BitStruct(
    "zero" / BitsInteger(32),              # bits 32-63: subcluster reads as zeros
    "allocated" / BitsInteger(32),         # bits 0-31: subcluster allocated
)
SUBCLUSTERS_PER_CLUSTER = 32


def compressed_descriptor(cluster_bits: int):
    """qcow2.txt: "Compressed Clusters Descriptor": x = 62 - (cluster_bits - 8)."""
    x = 62 - (cluster_bits - 8)
    return BitStruct(
        "copied" / Flag,                               # bit 63 (always 0)
        "compressed" / Flag,                           # bit 62
        "additional_sectors" / BitsInteger(62 - x),    # bits x..61
        "host_offset" / BitsInteger(x),                # bits 0..x-1
    )


def _mask(decl, **fields) -> int:
    """Build an entry with the given fields at their maximum and read back the integer."""
    values = {name: 0 for name in (sc.name for sc in decl.subcon.subcons if sc.name)}
    values.update(fields)
    return int.from_bytes(decl.build(values), "big")


# Masks for the hot paths, derived from the declarations above.
L1E_OFFSET_MASK = _mask(L1Entry, l2_offset=(1 << 47) - 1)
L1E_RESERVED_MASK = _mask(L1Entry, reserved_high=0x7F, reserved_low=0x1FF)
L2E_OFFSET_MASK = _mask(L2Entry, host_offset=(1 << 47) - 1)
L2E_RESERVED_MASK = _mask(L2Entry, reserved_high=0x3F, reserved_low=0xFF)
REFT_OFFSET_MASK = _mask(RefcountTableEntry, refblock_offset=(1 << 55) - 1)
REFT_RESERVED_MASK = _mask(RefcountTableEntry, reserved=0x1FF)
QCOW_OFLAG_COPIED = _mask(L2Entry, copied=True)
QCOW_OFLAG_COMPRESSED = _mask(L2Entry, compressed=True)
QCOW_OFLAG_ZERO = _mask(L2Entry, zero=True)
assert L1E_OFFSET_MASK == L2E_OFFSET_MASK == 0x00FFFFFFFFFFFE00
assert QCOW_OFLAG_COPIED == 1 << 63 and QCOW_OFLAG_COMPRESSED == 1 << 62 and QCOW_OFLAG_ZERO == 1
assert REFT_OFFSET_MASK == 0xFFFFFFFFFFFFFE00
BME_TABLE_ENTRY_OFFSET_MASK = _mask(BitmapTableEntry, cluster_offset=(1 << 47) - 1)
BME_TABLE_ENTRY_RESERVED_MASK = _mask(BitmapTableEntry, reserved_high=0xFF, reserved_low=0xFF)
BME_TABLE_ENTRY_FLAG_ALL_ONES = _mask(BitmapTableEntry, all_ones=True)
assert BME_TABLE_ENTRY_OFFSET_MASK == 0x00FFFFFFFFFFFE00 and BME_TABLE_ENTRY_RESERVED_MASK == 0xFF000000000001FE
SUBCLUSTER_ALLOC_MASK = _mask(SubclusterBitmap, allocated=0xFFFFFFFF)
SUBCLUSTER_ZERO_MASK = _mask(SubclusterBitmap, zero=0xFFFFFFFF)
assert SUBCLUSTER_ALLOC_MASK == 0xFFFFFFFF


def compressed_masks(cluster_bits: int) -> tuple[int, int, int]:
    """(offset mask, sector-count shift, sector-count mask) of a compressed descriptor."""
    decl = compressed_descriptor(cluster_bits)
    x = 62 - (cluster_bits - 8)
    offset_mask = _mask(decl, host_offset=(1 << x) - 1)
    count_mask = _mask(decl, additional_sectors=(1 << (62 - x)) - 1) >> x
    return offset_mask, x, count_mask


# struct formats for the hot paths; sizes checked against the declarations.
HEADER_V2_STRUCT = struct.Struct(">4sIQIIQIIQQIIQ")
HEADER_V3_STRUCT = struct.Struct(">QQQII")
assert HEADER_V2_STRUCT.size == HeaderV2.sizeof() and HEADER_V3_STRUCT.size == HeaderV3Extra.sizeof()
BITMAP_DIR_ENTRY_STRUCT = struct.Struct(">QIIBBHI")
assert BITMAP_DIR_ENTRY_STRUCT.size == BitmapDirEntry.sizeof()
SNAPSHOT_ENTRY_STRUCT = struct.Struct(">QIHHIIQII")
assert SNAPSHOT_ENTRY_STRUCT.size == SnapshotEntry.sizeof()
BITMAPS_EXT_STRUCT = struct.Struct(">I4xQQ")
assert BITMAPS_EXT_STRUCT.size == BitmapsExtension.sizeof()
U64 = struct.Struct(">Q")
assert U64.size == L1Entry.sizeof() == L2Entry.sizeof() == RefcountTableEntry.sizeof()

# Header field offsets used for in-place updates (qcow2.txt: "Header").
OFFSET_L1_SIZE = 36
OFFSET_L1_TABLE = 40
OFFSET_REFCOUNT_TABLE = 48
OFFSET_INCOMPATIBLE = 72
OFFSET_AUTOCLEAR = 88
assert HeaderV2.subcons[7].name == "l1_size"
