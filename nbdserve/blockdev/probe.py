"""Which format a file is: qemu's probes (each driver's bdrv_probe), the qcow2 magic, and
a file's virtual size.  No Trio here: ``nbdserve info`` and ``create`` read these alone."""

from __future__ import annotations

import os
import re

QCOW2_MAGIC = b"QFI\xfb"     # qcow2.txt: "Byte 0 - 3: magic", QCOW_MAGIC in qemu
FORMATS = ("qcow2", "raw")    # the formats nbdserve opens (images.open_image)
PROBE_SIZE = 512      # qemu BLOCK_PROBE_BUF_SIZE

# Sector-0 signatures of the formats qemu probes (each driver's bdrv_probe).
_PREFIXES = {
    QCOW2_MAGIC: "qcow2",                      # qcow2_probe, qcow_probe (version 1)
    b"QED\0": "qed",                           # bdrv_qed_probe
    b"KDMV": "vmdk", b"COWD": "vmdk",          # vmdk_probe: VMDK4_MAGIC, VMDK3_MAGIC
    b"conectix": "vpc",                        # vpc_probe
    b"vhdxfile": "vhdx",                       # vhdx_probe
    b"LUKS\xba\xbe": "luks",                   # qcrypto_block_luks_has_format
    b"WithoutFreeSpace": "parallels", b"WithouFreSpacExt": "parallels",   # parallels_probe
    b"Bochs Virtual HD Image": "bochs",        # bochs_probe
    b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop": "cloop",                  # cloop_probe
}
_VDI_SIGNATURE = (64, b"\x7f\x10\xda\xbe")    # vdi_probe: 0xbeda107f little-endian at 64
_VMDK_TEXT = re.compile(rb"(?:#[^\n]*\n| *\r?\n)*version=[123]\r?\n")   # vmdk_probe's descriptor


def probe_head(head: bytes) -> str:
    """The format qemu would probe from a file's first bytes; 'raw' when none matches."""
    for prefix, name in _PREFIXES.items():
        if head.startswith(prefix):
            return name
    at, signature = _VDI_SIGNATURE
    if head[at:at + len(signature)] == signature:
        return "vdi"
    if _VMDK_TEXT.match(head):
        return "vmdk"
    return "raw"


def probe_format(path: str) -> str:
    """'qcow2' when the file starts with the qcow2 magic, else 'raw': the formats nbdserve opens."""
    with open(path, "rb") as f:
        return "qcow2" if f.read(len(QCOW2_MAGIC)) == QCOW2_MAGIC else "raw"


def virtual_size(path: str, fmt: str | None = None) -> int:
    """The size a guest sees of the image at ``path``: a qcow2 header's size field (qcow2.txt:
    bytes 24..31), else the file size; ``fmt`` None: probed."""
    with open(path, "rb") as f:
        if (fmt or probe_format(path)) == "qcow2":
            f.seek(24)
            return int.from_bytes(f.read(8), "big")
        return os.fstat(f.fileno()).st_size
