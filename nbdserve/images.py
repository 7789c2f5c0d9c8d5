"""Open an image file as a BlockDevice, probing its format like qemu does."""

from __future__ import annotations

import os

from .blockdev import BlockDevice, RawFile

QCOW2_MAGIC = b"QFI\xfb"


class ImageError(Exception):
    """An image cannot be opened: the message names the flaw in one line."""


def probe_format(path: str) -> str:
    """'qcow2' when the file starts with the qcow2 magic, else 'raw'."""
    with open(path, "rb") as f:
        return "qcow2" if f.read(4) == QCOW2_MAGIC else "raw"


def open_image(path: str, fmt: str | None = None, *, read_only: bool = False,
               allocator: str = "fixed", delays: dict[str, float] | None = None,
               snapshot: str | None = None) -> BlockDevice:
    """Open ``path`` (and its backing chain) as a BlockDevice.

    ``allocator`` names the qcow2 AllocationPolicy ("fixed" or "qemu-1.1.2");
    ``delays`` maps blkdebug event names to seconds of sleep (qcow2 only).
    ``snapshot``: serve that internal snapshot, read-only (qemu-nbd -l syntax, qcow2 only).
    Raises ImageError with a one-line reason for anything unusable.
    """
    if not os.path.exists(path):
        raise ImageError(f"{path}: no such file")
    fmt = fmt or probe_format(path)
    if fmt == "raw":
        if snapshot is not None:
            raise ImageError(f"{path}: a raw image has no internal snapshots")
        try:
            return RawFile(path, read_only=read_only)
        except OSError as e:
            raise ImageError(f"{path}: {e.strerror}") from None
    if fmt == "qcow2":
        from .qcow2 import Qcow2Image, Qcow2Error
        try:
            if snapshot is not None:
                from .qcow2.snapshot import snapshot_l1
                return Qcow2Image.open(path, read_only=True, allocator=allocator, delays=delays,
                                       snapshot_l1=snapshot_l1(path, snapshot))
            return Qcow2Image.open(path, read_only=read_only, allocator=allocator, delays=delays)
        except Qcow2Error as e:
            raise ImageError(f"{path}: {e}") from None
        except OSError as e:
            raise ImageError(f"{path}: {e.strerror}") from None
    raise ImageError(f"{path}: unknown format {fmt!r} (expected qcow2 or raw)")
