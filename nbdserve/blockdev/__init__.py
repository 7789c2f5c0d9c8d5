"""The block-device layer: one small interface shared by every layer (nbdkit's plugin/filter API).

Names are imported on first use, as in nbdserve.qcow2: ``nbdserve check`` needs
fileio.pwrite_all, not Trio (which RawFile's flush brings in).
"""

from .._lazy import lazy_getattr

_EXPORTS = {
    "BlockDevice": ".base",
    "Extent": ".base",
    "FILE_SLICE_MIN": ".base",
    "FileSlice": ".base",
    "materialize": ".base",
    "ReadChunk": ".base",
    "check_range": ".base",
    "RawFile": ".raw",
}
__all__ = list(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
