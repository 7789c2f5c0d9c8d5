"""The block-device layer: one small interface shared by every layer (nbdkit's plugin/filter API).

Names are imported on first use, as in nbdserve.qcow2: ``nbdserve check`` needs
fileio.pwrite_all, not Trio (which RawFile's flush brings in).
"""

from importlib import import_module

_EXPORTS = {
    "BlockDevice": ".base",
    "Extent": ".base",
    "ReadChunk": ".base",
    "check_range": ".base",
    "RawFile": ".raw",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
