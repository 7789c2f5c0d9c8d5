"""Format probing, and qemu's guard for raw images whose format was probed.

A raw image opened without a format must never be made to probe as another format: a
client that writes a qcow2 header naming a host file as backing file would read that
file after the next start (CVE-2008-2004).  qemu block/raw-format.c raw_co_pwritev:
when probing guessed raw, a write to the first 512 bytes whose result probes as another
format fails with EPERM.  ProbedRawFile does the same for writes, write-zeroes and trims.
"""

from __future__ import annotations

import errno
import os
import re

from .raw import RawFile, pread_exact

QCOW2_MAGIC = b"QFI\xfb"
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


PROBED_RAW_WARNING = ("Image format was not specified for '{}' and probing guessed raw. "
                      "Automatically detecting the format is dangerous for raw images, write "
                      "operations on block 0 will be restricted. Specify the 'raw' format "
                      "explicitly to remove the restrictions.")   # qemu raw_open()'s warning


class ProbedRawFile(RawFile):
    """A writable raw file whose format was probed: sector 0 must keep probing as raw."""

    def _check_sector0(self, offset: int, data) -> None:
        """EPERM if writing ``data`` (None: zeros of ``len``) at ``offset`` makes sector 0 probe as non-raw."""
        if offset >= PROBE_SIZE or not len(data):
            return
        head = bytearray(pread_exact(self.fd, 0, min(PROBE_SIZE, self.size)))
        n = min(len(data), len(head) - offset)
        head[offset:offset + n] = memoryview(data).cast("B")[:n]
        fmt = probe_head(bytes(head))
        if fmt != "raw":
            raise OSError(errno.EPERM, f"write would make the probed-raw image {self.path} "
                                       f"probe as {fmt}; refused (serve it with -f raw)")

    def pwrite_now(self, offset, data):
        self._check_sector0(offset, data)
        return super().pwrite_now(offset, data)

    async def trim(self, offset, length, fua=False):
        self._check_sector0(offset, bytes(min(length, PROBE_SIZE)))
        await super().trim(offset, length, fua)

    async def zero(self, offset, length, *, may_trim=False, fua=False, fast=False):
        self._check_sector0(offset, bytes(min(length, PROBE_SIZE)))
        await super().zero(offset, length, may_trim=may_trim, fua=fua, fast=fast)
