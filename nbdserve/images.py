"""Open an image file as a BlockDevice, probing its format like qemu does."""

from __future__ import annotations

import logging
import os

from .blockdev import BlockDevice, RawFile
from .blockdev.chain import OPEN_ANY, ChainError, ChainPolicy
from .blockdev.lock import lock_mode
from .blockdev.probe import PROBED_RAW_WARNING, ProbedRawFile, probe_format

__all__ = ["ImageError", "open_image", "probe_format"]
log = logging.getLogger("nbdserve.images")


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
        from .qcow2 import Qcow2Image, Qcow2Error
        try:
            if snapshot is not None:
                from .qcow2.snapshot import snapshot_l1
                return Qcow2Image.open(path, read_only=True, allocator=allocator, delays=delays,
                                       snapshot_l1=snapshot_l1(path, snapshot), chain=chain)
            return Qcow2Image.open(path, read_only=read_only, allocator=allocator, delays=delays,
                                   chain=chain)
        except (Qcow2Error, ChainError) as e:
            raise ImageError(f"{path}: {e}") from None
        except OSError as e:
            raise ImageError(f"{path}: {e.strerror}") from None
    raise ImageError(f"{path}: unknown format {fmt!r} (expected qcow2 or raw)")
