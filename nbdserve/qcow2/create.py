"""Create qcow2 images like ``qemu-img create -f qcow2`` (layout: header, refcount
table, refcount block(s), L1 table, as qemu lays them out)."""

from __future__ import annotations

import os

from ..blockdev.fileio import pwrite_all
from . import format as fmt
from .errors import Qcow2Error
from .header import l1_entries_needed

# qemu's feature name table (qcow2.txt: "Feature name table")
FEATURE_NAMES = [
    (0, 0, "dirty bit"), (0, 1, "corrupt bit"), (0, 2, "external data file"),
    (0, 3, "compression type"), (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"), (2, 0, "bitmaps"), (2, 1, "raw external data"),
]


def _extension(ext_type: int, data: bytes) -> bytes:
    pad = (-len(data)) % 8
    return fmt.ExtensionHeader.build({"type": ext_type, "length": len(data)}) + data + bytes(pad)


def create_image(path: str, size: int, *, cluster_size: int = 65536, compat: str = "1.1",
                 refcount_bits: int = 16, lazy_refcounts: bool = False,
                 backing: str | None = None, backing_format: str | None = None,
                 extended_l2: bool = False, compression_type: str = "zlib") -> None:
    if cluster_size & (cluster_size - 1) or not 512 <= cluster_size <= 2 << 20:
        raise Qcow2Error(f"Cluster size must be a power of two between 512 and 2048k: {cluster_size}")
    if compat not in ("0.10", "1.1", "v2", "v3"):
        raise Qcow2Error(f"Invalid compatibility level: {compat!r}")
    version = 2 if compat in ("0.10", "v2") else 3
    if refcount_bits & (refcount_bits - 1) or not 1 <= refcount_bits <= 64:
        raise Qcow2Error(f"Refcount width must be a power of two and may not exceed 64 bits: {refcount_bits}")
    if version == 2 and refcount_bits != 16:
        raise Qcow2Error("Different refcount widths than 16 bits require compatibility level 1.1 or above")
    if version == 2 and (lazy_refcounts or extended_l2):
        raise Qcow2Error("Lazy refcounts and extended L2 entries require compatibility level 1.1 or above")
    if compression_type not in ("zlib", "zstd"):
        raise Qcow2Error(f"Unknown compression type {compression_type!r}")
    if size < 0 or size % 512:
        raise Qcow2Error(f"Image size must be a multiple of 512 bytes: {size}")
    if backing_format and not backing:
        raise Qcow2Error("Backing format given without a backing file")
    cluster_bits = cluster_size.bit_length() - 1
    if extended_l2 and cluster_bits < 14:
        raise Qcow2Error("Extended L2 entries need a cluster size of at least 16k")
    refcount_order = refcount_bits.bit_length() - 1
    entry_size = 16 if extended_l2 else 8
    l1_size = l1_entries_needed(size, cluster_bits, entry_size)
    if l1_size * 8 > 32 << 20:
        raise Qcow2Error(f"Image size too big for cluster size {cluster_size}: {size}")
    cs = cluster_size
    l1_clusters = (l1_size * 8 + cs - 1) // cs
    per_block = cs * 8 // refcount_bits
    rt_clusters, rb_clusters = 1, 1
    while True:
        total = 1 + rt_clusters + rb_clusters + l1_clusters
        rb_need = (total + per_block - 1) // per_block
        rt_need = max(1, (rb_need * 8 + cs - 1) // cs)
        if (rb_need, rt_need) == (rb_clusters, rt_clusters):
            break
        rb_clusters, rt_clusters = rb_need, rt_need
    rt_offset = cs
    rb_offset = rt_offset + rt_clusters * cs
    l1_offset = rb_offset + rb_clusters * cs
    total = 1 + rt_clusters + rb_clusters + l1_clusters

    compression = 1 if compression_type == "zstd" else 0
    incompatible = (fmt.INCOMPAT_EXTL2 if extended_l2 else 0) | (fmt.INCOMPAT_COMPRESSION if compression else 0)
    header_length = fmt.HEADER_V3_WITH_COMPRESSION if version == 3 else fmt.HEADER_V2_SIZE
    exts = b""
    if backing_format:
        exts += _extension(fmt.EXT_BACKING_FORMAT, backing_format.encode())
    if version == 3:
        table = b"".join(fmt.FeatureNameEntry.build({"type": t, "bit": b, "name": n}) for t, b, n in FEATURE_NAMES)
        exts += _extension(fmt.EXT_FEATURE_TABLE, table)
    exts += _extension(fmt.EXT_END, b"")
    backing_bytes = backing.encode() if backing else b""
    backing_offset = header_length + len(exts) if backing else 0
    if backing_offset + len(backing_bytes) > cs or len(backing_bytes) > 1023:
        raise Qcow2Error("Backing file name too long for the header cluster")

    head = fmt.HeaderV2.build(dict(
        version=version, backing_file_offset=backing_offset, backing_file_size=len(backing_bytes),
        cluster_bits=cluster_bits, size=size, crypt_method=0, l1_size=l1_size,
        l1_table_offset=l1_offset, refcount_table_offset=rt_offset,
        refcount_table_clusters=rt_clusters, nb_snapshots=0, snapshots_offset=0))
    if version == 3:
        head += fmt.HeaderV3Extra.build(dict(
            incompatible_features=incompatible,
            compatible_features=fmt.COMPAT_LAZY_REFCOUNTS if lazy_refcounts else 0,
            autoclear_features=0, refcount_order=refcount_order, header_length=header_length))
        head += fmt.CompressionTypeField.build({"compression_type": compression}) + bytes(7)
    head += exts + backing_bytes

    reftable = b"".join(fmt.U64.pack(rb_offset + i * cs) for i in range(rb_clusters))
    refblocks = _refblocks_with_ones(total, rb_clusters * cs, refcount_bits)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        pwrite_all(fd, head, 0)
        pwrite_all(fd, reftable, rt_offset)
        pwrite_all(fd, refblocks, rb_offset)
        os.ftruncate(fd, l1_offset + l1_clusters * cs)
        os.fsync(fd)
    finally:
        os.close(fd)


def _refblocks_with_ones(count: int, nbytes: int, bits: int) -> bytes:
    """Refcount blocks in which the first ``count`` clusters have refcount 1."""
    raw = bytearray(nbytes)
    if bits >= 8:
        width = bits // 8
        for i in range(count):
            raw[i * width + width - 1] = 1
    else:
        per_byte = 8 // bits
        for i in range(count):
            raw[i // per_byte] |= 1 << ((i % per_byte) * bits)
    return bytes(raw)
