"""Open an image file as a BlockDevice, probing its format like qemu does, and qemu's guard
for raw images whose format was probed.

A raw image opened without a format must never be made to probe as another format: a
client that writes a qcow2 header naming a host file as backing file would read that
file after the next start (CVE-2008-2004).  qemu block/raw-format.c raw_co_pwritev:
when probing guessed raw, a write to the first 512 bytes whose result probes as another
format fails with EPERM.  ProbedRawFile does the same for writes, write-zeroes and trims.
"""

from __future__ import annotations

import errno
import logging
import os

from .base import BlockDevice
from .chain import OPEN_ANY, ChainError, ChainPolicy
from .lock import lock_mode
from .probe import FORMATS, PROBE_SIZE, probe_format, probe_head
from .raw import RawFile, pread_exact

__all__ = ["ImageError", "open_image", "probe_format"]
log = logging.getLogger("nbdserve.images")


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


class ImageError(Exception):
    """An image cannot be opened: the message names the flaw in one line."""


def open_image(path: str, fmt: str | None = None, *, read_only: bool = False,
               allocator: str = "fixed", delays: dict[str, float] | None = None,
               snapshot: str | None = None, chain: ChainPolicy = OPEN_ANY) -> BlockDevice:
    """Open ``path`` (and its backing chain) as a BlockDevice.

    ``allocator`` names the qcow2 AllocationPolicy (qcow2/policy.py ALLOCATORS);
    ``delays`` maps blkdebug event names to seconds of sleep (qcow2 only);
    ``snapshot``: serve that internal snapshot, read-only (qemu-nbd -l syntax, qcow2 only);
    ``chain`` limits the backing files and says whether to share the image (-U).
    Raises ImageError with a one-line reason for anything unusable.
    """
    if not os.path.exists(path):
        raise ImageError(f"{path}: no such file")
    read_only = read_only or chain.force_share
    probed = fmt is None
    fmt = fmt or probe_format(path)
    if fmt == "raw":
        if snapshot is not None:
            raise ImageError(f"{path}: a raw image has no internal snapshots")
        lock = lock_mode(read_only, chain.force_share, raw=True)
        try:
            if probed and not read_only:
                # qemu raw_open(): printed once, when probing guessed raw for a writable image
                log.warning("warning: " + PROBED_RAW_WARNING.format(path))
                return ProbedRawFile(path, lock=lock)
            return RawFile(path, read_only=read_only, lock=lock)
        except OSError as e:
            raise ImageError(f"{path}: {e.strerror}") from None
    if fmt == "qcow2":
        from ..qcow2 import Qcow2Image, Qcow2Error
        try:
            if snapshot is not None:
                from ..qcow2.snapshot import snapshot_l1
                return Qcow2Image.open(path, read_only=True, allocator=allocator, delays=delays,
                                       snapshot_l1=snapshot_l1(path, snapshot), chain=chain)
            return Qcow2Image.open(path, read_only=read_only, allocator=allocator, delays=delays,
                                   chain=chain)
        except (Qcow2Error, ChainError) as e:
            raise ImageError(f"{path}: {e}") from None
        except OSError as e:
            raise ImageError(f"{path}: {e.strerror}") from None
    raise ImageError(f"{path}: unknown format {fmt!r} (expected {' or '.join(FORMATS)})")
