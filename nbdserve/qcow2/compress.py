"""Compressed clusters (qcow2.txt: "Compressed Clusters Descriptor", compression_type)."""

from __future__ import annotations

import errno
import zlib

import zstandard

from . import format as fmt


def decompress_cluster(data: bytes, cluster_size: int, compression_type: int) -> bytes:
    """Inflate one compressed cluster; raise EIO on a malformed stream."""
    try:
        if compression_type == fmt.COMPRESSION_DEFLATE:
            d = zlib.decompressobj(-15)             # raw deflate (qemu writes a 4 KiB window)
            out = d.decompress(data, cluster_size)
        else:
            d = zstandard.ZstdDecompressor().decompressobj()
            out = d.decompress(data)[:cluster_size]
    except (zlib.error, zstandard.ZstdError) as e:
        raise OSError(errno.EIO, f"corrupt compressed cluster: {e}") from None
    if len(out) < cluster_size:
        raise OSError(errno.EIO, f"compressed cluster inflates to {len(out)} bytes, not {cluster_size}")
    return out

