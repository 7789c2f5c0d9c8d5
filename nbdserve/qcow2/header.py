"""Read and validate a qcow2 header and its extensions (qcow2.txt: "Header", "Header extensions").

Every field is checked before it is used, so a hostile file gives a Qcow2Error
naming the flaw instead of a traceback, a hang or a huge allocation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..blockdev.probe import QCOW2_MAGIC
from . import format as fmt
from .errors import Qcow2Error

MAX_L1_BYTES = 32 << 20          # qemu: QCOW_MAX_L1_SIZE
MAX_REFTABLE_BYTES = 8 << 20     # qemu: QCOW_MAX_REFTABLE_SIZE
MAX_SNAPSHOTS = 65536            # qemu: QCOW_MAX_SNAPSHOTS
MAX_BACKING_NAME = 1023


@dataclass
class Qcow2Header:
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = fmt.HEADER_V2_SIZE
    compression_type: int = fmt.COMPRESSION_DEFLATE
    backing_file: str | None = None
    backing_format: str | None = None
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)
    extensions: list[tuple[int, bytes]] = field(default_factory=list)  # unknown ones, kept verbatim
    bitmaps_extension: bytes | None = None
    bitmaps_extension_offset: int = 0   # where its data lies in the file (rewritten in place)
    data_file: str | None = None

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & fmt.INCOMPAT_EXTL2)

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8


def l1_entries_needed(size: int, cluster_bits: int, l2_entry_size: int = 8) -> int:
    """qemu: size_to_l1()."""
    l2_coverage = (1 << cluster_bits) * ((1 << cluster_bits) // l2_entry_size)
    return (size + l2_coverage - 1) // l2_coverage


def _feature_list(bits: int, table: dict[tuple[int, int], str], kind: int) -> str:
    names = []
    for bit in range(64):
        if bits & (1 << bit):
            names.append(table.get((kind, bit), f"Unknown incompatible feature: {1 << bit:x}"))
    return ", ".join(names)


def read_header(fd: int) -> Qcow2Header:
    """Parse and validate the header of the qcow2 file open at ``fd``."""
    file_size = os.fstat(fd).st_size
    raw = os.pread(fd, fmt.HEADER_V3_WITH_COMPRESSION, 0)
    if len(raw) < 8 or raw[:4] != QCOW2_MAGIC:
        raise Qcow2Error("Image is not in qcow2 format (bad magic)")
    version = int.from_bytes(raw[4:8], "big")
    if version not in (2, 3):
        raise Qcow2Error(f"Unsupported qcow2 version {version}")
    need = fmt.HEADER_V2_SIZE if version == 2 else fmt.HEADER_V3_SIZE
    if len(raw) < need:
        raise Qcow2Error(f"Truncated header: {len(raw)} bytes, version {version} needs {need}")
    v2 = fmt.HEADER_V2_STRUCT.unpack_from(raw, 0)
    h = Qcow2Header(*v2[1:])
    if version == 2:
        h.refcount_order = 4
    else:
        (h.incompatible_features, h.compatible_features, h.autoclear_features,
         h.refcount_order, h.header_length) = fmt.HEADER_V3_STRUCT.unpack_from(raw, fmt.HEADER_V2_SIZE)
    _validate(h, file_size)
    h.size &= ~511   # qemu: bs->total_sectors = header.size / BDRV_SECTOR_SIZE (a partial sector is not seen)
    if version == 3 and h.header_length > fmt.HEADER_V3_SIZE:
        h.compression_type = raw[fmt.HEADER_V3_SIZE] if len(raw) > fmt.HEADER_V3_SIZE else 0
    _read_extensions(fd, h, file_size)
    _validate_features(h)
    return h


def _validate(h: Qcow2Header, file_size: int) -> None:
    if not 9 <= h.cluster_bits <= 21:
        raise Qcow2Error(f"Unsupported cluster size: 2^{h.cluster_bits} (cluster_bits must be 9..21)")
    cs = h.cluster_size
    if h.version == 3:
        if h.header_length < fmt.HEADER_V3_SIZE:
            raise Qcow2Error(f"qcow2 header too short: header_length {h.header_length} < 104")
        if h.header_length > cs:
            raise Qcow2Error(f"qcow2 header exceeds cluster size: header_length {h.header_length}")
        if h.header_length % 8 and h.header_length > fmt.HEADER_V3_SIZE:
            raise Qcow2Error(f"qcow2 header_length {h.header_length} is not a multiple of 8")
    if h.refcount_order > 6:
        raise Qcow2Error(f"Reference count entry width too large: refcount_order {h.refcount_order} > 6")
    if h.crypt_method:
        raise Qcow2Error(f"Unsupported encryption method {h.crypt_method}")
    if h.size > (1 << 63) - 1:
        raise Qcow2Error(f"Image size too big: {h.size}")
    l2_entry = 16 if (h.version == 3 and h.incompatible_features & fmt.INCOMPAT_EXTL2) else 8
    needed = l1_entries_needed(h.size, h.cluster_bits, l2_entry)
    if needed * 8 > MAX_L1_BYTES:
        raise Qcow2Error(f"Image size too big: {h.size} bytes would need an L1 table of {needed * 8} bytes")
    if h.l1_size * 8 > MAX_L1_BYTES:
        raise Qcow2Error(f"Active L1 table too large: {h.l1_size} entries")
    if h.l1_size < needed:
        raise Qcow2Error(f"L1 table is too small: {h.l1_size} entries, {needed} needed for {h.size} bytes")
    _validate_table(h.l1_table_offset, h.l1_size * 8, cs, file_size, "L1 table")
    if h.refcount_table_clusters == 0:
        raise Qcow2Error("Image does not contain a reference count table")
    if h.refcount_table_clusters * cs > MAX_REFTABLE_BYTES:
        raise Qcow2Error(f"Reference count table too large: {h.refcount_table_clusters} clusters")
    _validate_table(h.refcount_table_offset, h.refcount_table_clusters * cs, cs, file_size,
                    "Reference count table")
    if h.nb_snapshots > MAX_SNAPSHOTS:
        raise Qcow2Error(f"Too many snapshots: {h.nb_snapshots}")
    if h.nb_snapshots and (h.snapshots_offset % cs or h.snapshots_offset >= file_size):
        raise Qcow2Error(f"Snapshot table offset invalid: {h.snapshots_offset:#x}")
    if h.backing_file_offset:
        if h.backing_file_size > MAX_BACKING_NAME or h.backing_file_size > cs - min(h.backing_file_offset, cs):
            raise Qcow2Error(f"Backing file name too long: {h.backing_file_size} bytes")
        if h.backing_file_offset + h.backing_file_size > min(cs, file_size):
            raise Qcow2Error(f"Backing file name outside the header cluster: offset {h.backing_file_offset:#x}")


def _validate_table(offset: int, nbytes: int, cs: int, file_size: int, what: str) -> None:
    if offset % cs:
        raise Qcow2Error(f"{what} offset invalid: {offset:#x} is not cluster-aligned")
    if nbytes and (offset == 0 or offset + nbytes > file_size):
        raise Qcow2Error(f"{what} offset invalid: {offset:#x}+{nbytes} lies outside the file ({file_size} bytes)")


def _read_extensions(fd: int, h: Qcow2Header, file_size: int) -> None:
    cs = h.cluster_size
    end = h.backing_file_offset if h.backing_file_offset else cs
    end = min(end, cs, file_size)
    pos = h.header_length if h.version == 3 else fmt.HEADER_V2_SIZE
    blob = os.pread(fd, max(0, end - pos), pos)
    off = 0
    while off + 8 <= len(blob):
        ext_type = int.from_bytes(blob[off:off + 4], "big")
        length = int.from_bytes(blob[off + 4:off + 8], "big")
        off += 8
        if length > len(blob) - off:   # qemu checks this before the end marker too
            raise Qcow2Error(f"Header extension {ext_type:#x} too large: {length} bytes")
        if ext_type == fmt.EXT_END:
            break
        data = bytes(blob[off:off + length])
        off += (length + 7) & ~7
        if ext_type == fmt.EXT_BACKING_FORMAT:
            h.backing_format = data.decode("ascii", "replace").rstrip("\0")
        elif ext_type == fmt.EXT_FEATURE_TABLE:
            for i in range(0, length - length % 48, 48):
                # fmt.FeatureNameEntry, unpacked by hand: a hostile name need not be ASCII
                kind, bit, name = data[i], data[i + 1], data[i + 2:i + 48]
                h.feature_names[(kind, bit)] = name.rstrip(b"\0").decode("ascii", "replace")
        elif ext_type == fmt.EXT_BITMAPS:
            h.bitmaps_extension = data
            h.bitmaps_extension_offset = pos + off - ((length + 7) & ~7)
        elif ext_type == fmt.EXT_DATA_FILE:
            h.data_file = data.decode("utf-8", "replace")
        elif ext_type == fmt.EXT_ENCRYPTION:
            raise Qcow2Error("Encrypted images are not supported")
        else:
            h.extensions.append((ext_type, data))
    if h.backing_file_offset:
        name = os.pread(fd, h.backing_file_size, h.backing_file_offset)
        h.backing_file = name.decode("utf-8", "surrogateescape")


def _validate_features(h: Qcow2Header) -> None:
    unknown = h.incompatible_features & ~fmt.INCOMPAT_KNOWN
    if unknown:
        raise Qcow2Error("Unsupported IMPORTANT feature(s): " + _feature_list(unknown, h.feature_names, 0))
    if h.incompatible_features & fmt.INCOMPAT_DATA_FILE:
        raise Qcow2Error("External data files are not supported")
    if h.compression_type not in (fmt.COMPRESSION_DEFLATE, fmt.COMPRESSION_ZSTD):
        raise Qcow2Error(f"Unknown compression type {h.compression_type}")
    if bool(h.compression_type) != bool(h.incompatible_features & fmt.INCOMPAT_COMPRESSION):
        raise Qcow2Error("Compression type and its incompatible feature bit disagree")
    if h.extended_l2 and h.cluster_bits < 14:
        raise Qcow2Error("Extended L2 entries need a cluster size of at least 16 KiB")
