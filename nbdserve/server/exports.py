"""Exports: one shared BlockDevice per export, its ExportInfo, and errno mapping."""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from ..blockdev import BlockDevice
from ..blockdev.chain import ChainPolicy
from ..blockdev.images import ImageError, open_image
from ..nbd import ExportInfo, TransmissionFlag as TF
from ..nbd.constants import CONTEXT_QEMU_ALLOCATION_DEPTH, CONTEXT_QEMU_DIRTY_BITMAP, Errno
from ..nbd.exports import ALL_CONTEXTS
from .settings import ExportSettings

if TYPE_CHECKING:
    from ..qcow2.bitmaps import DirtyBitmap


def export_info(name: str, device: BlockDevice, description: str = "", *,
                allocation_depth: bool = True, multi_conn: bool | None = None,
                bitmaps: tuple[str, ...] = ()) -> ExportInfo:
    """The transmission flags and contexts an export advertises, from the device's can_*
    (``multi_conn`` overrides can_multi_conn; ``allocation_depth`` False: base:allocation only;
    ``bitmaps``: a qemu:dirty-bitmap:NAME context each)."""
    flags = TF.HAS_FLAGS | TF.SEND_DF
    writable = device.can_write()
    if not writable:
        flags |= TF.READ_ONLY
    if device.can_flush():
        flags |= TF.SEND_FLUSH
    if writable and device.can_fua():
        flags |= TF.SEND_FUA
    if writable and device.can_trim():
        flags |= TF.SEND_TRIM
    if writable and device.can_zero():
        flags |= TF.SEND_WRITE_ZEROES
        if device.can_fast_zero():   # proto.md: FAST_ZERO only with WRITE_ZEROES
            flags |= TF.SEND_FAST_ZERO
    if device.can_cache():
        flags |= TF.SEND_CACHE
    if device.can_multi_conn() if multi_conn is None else multi_conn:
        flags |= TF.CAN_MULTI_CONN
    contexts = ALL_CONTEXTS if device.can_extents() else ()
    if not allocation_depth:
        contexts = tuple(c for c in contexts if c != CONTEXT_QEMU_ALLOCATION_DEPTH)
    contexts += tuple(CONTEXT_QEMU_DIRTY_BITMAP + b for b in bitmaps)
    return ExportInfo(name=name, size=device.size, flags=flags, description=description, meta_contexts=contexts)


@dataclass
class Export:
    settings: ExportSettings
    device: BlockDevice
    info: ExportInfo
    bitmaps: dict[str, DirtyBitmap] = field(default_factory=dict)   # context name -> bitmap
    image: BlockDevice | None = None   # the image under the filters (device without them)


async def open_export(settings: ExportSettings) -> Export:
    """Open the image (raises ImageError, the image closed again); every connection shares
    this device."""
    chain = ChainPolicy(backing_root=settings.backing_root, no_backing=settings.no_backing,
                        force_share=settings.force_share)
    device = open_image(settings.image, settings.format, read_only=settings.read_only,
                        allocator=settings.allocator, delays=settings.delays, snapshot=settings.snapshot,
                        chain=chain)
    try:
        return _export(settings, device)
    except BaseException:
        with trio.CancelScope(shield=True):   # a writable image's bitmaps are in use until closed
            await device.close()
        raise


def _export(settings: ExportSettings, device: BlockDevice) -> Export:
    if (settings.delays or settings.inject_errors) and blkdebug(device) is None:
        what = "delay" if settings.delays else "inject_error"
        raise ImageError(f"{settings.image}: {what} needs a qcow2 image ({RAW_HAS_NO_EVENTS})")
    if settings.inject_errors:
        _inject_errors(settings, device)
    bitmaps = _find_bitmaps(settings, device)
    image = device
    if settings.trace:
        start_trace(settings.image, image, settings.trace)
    if not settings.discard or settings.cache != "writeback" or settings.detect_zeroes != "off":
        from ..blockdev.qemu_options import QemuBlockOptions
        device = QemuBlockOptions(device, discard=settings.discard,
                                  writethrough=settings.cache in ("writethrough", "directsync"),
                                  no_flush=settings.cache == "unsafe", detect_zeroes=settings.detect_zeroes)
    if settings.offset:
        from ..blockdev.offset import OffsetDevice
        try:
            device = OffsetDevice(device, settings.offset)
        except OSError as e:
            raise ImageError(f"{settings.image}: {e.strerror}") from None
    return Export(settings, device, export_info(settings.name, device, settings.description,
                                              allocation_depth=settings.allocation_depth,
                                              multi_conn=settings.multi_conn, bitmaps=settings.bitmaps),
                  {CONTEXT_QEMU_DIRTY_BITMAP + b.name: b for b in bitmaps}, image)


def _find_bitmaps(settings: ExportSettings, device: BlockDevice) -> list[DirtyBitmap]:
    """qemu nbd/server.c nbd_export_create(): each -B bitmap, looked for down the backing
    chain; an inconsistent one (left in use by a crash) is refused, with qemu's messages."""
    if settings.bitmaps and settings.offset:
        raise ImageError(f"{settings.image}: dirty bitmaps cannot be served with an offset")
    found = []
    for name in settings.bitmaps:
        layer, bm = device, None
        while layer is not None and bm is None:
            bitmaps = getattr(layer, "bitmaps", None)
            bm = bitmaps.by_name.get(name) if bitmaps is not None else None
            layer = getattr(layer, "backing", None)
        if bm is None:
            raise ImageError(f"Bitmap '{name}' is not found")
        if bm.inconsistent:
            raise ImageError(f"Bitmap '{name}' is inconsistent and cannot be used")
        found.append(bm)
    return found


RAW_HAS_NO_EVENTS = "a raw file has no blkdebug events"
RAW_HAS_NO_TRACE = "a raw file has no cluster allocations to trace"


def start_trace(name: str, image: BlockDevice, path: str) -> None:
    """Trace the qcow2 engine's allocations into ``path`` (qcow2/trace.py), replacing a trace
    already on.  ImageError for a raw file or a file that cannot be opened."""
    if not hasattr(image, "trace"):
        raise ImageError(f"{name}: trace needs a qcow2 image ({RAW_HAS_NO_TRACE})")
    from ..qcow2.trace import AllocationTrace
    try:
        trace = AllocationTrace(path)
    except OSError as e:
        raise ImageError(f"{name}: trace file {path}: {e.strerror}") from None
    stop_trace(image)
    image.trace = trace


def stop_trace(image: BlockDevice) -> None:
    old = getattr(image, "trace", None)
    if old is not None:
        image.trace = None
        old.close()


def blkdebug(device: BlockDevice):
    """The qcow2 engine's events (qcow2/events.py BlkDebug) of a device; None for a raw file."""
    return getattr(device, "events", None)


def _inject_errors(settings: ExportSettings, device: BlockDevice) -> None:
    """qemu blkdebug's [inject-error] (qemu-iotests 026): the engine's events fail with an errno."""
    events = blkdebug(device)
    for event, (err, once) in settings.inject_errors.items():
        try:
            events.inject_error(event, err, once)
        except ValueError as e:   # an unknown event name
            raise ImageError(f"{settings.image}: {e}") from None


_NBD_ERRNO = {
    errno.EPERM: Errno.EPERM, errno.EROFS: Errno.EPERM, errno.EACCES: Errno.EPERM,
    errno.EIO: Errno.EIO, errno.ENOMEM: Errno.ENOMEM, errno.EINVAL: Errno.EINVAL,
    errno.ENOSPC: Errno.ENOSPC, errno.EDQUOT: Errno.ENOSPC, errno.EFBIG: Errno.ENOSPC,
    errno.EOVERFLOW: Errno.EOVERFLOW, errno.ENOTSUP: Errno.ENOTSUP, errno.ESHUTDOWN: Errno.ESHUTDOWN,
}


def nbd_errno(exc: BaseException) -> Errno:
    """NBD error for an exception from a device (proto.md: "Error values"); EIO if unknown."""
    if isinstance(exc, OSError):
        return _NBD_ERRNO.get(exc.errno, Errno.EIO)
    return Errno.EIO
