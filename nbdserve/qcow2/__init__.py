"""The qcow2 engine: formats (format.py), header validation, refcounts, L2 cache,
allocation policies and the Qcow2Image block device.

Names are imported on first use, so that ``nbdserve check`` does not pay for
Trio and the write path at start-up.
"""

from importlib import import_module

_EXPORTS = {
    "Qcow2Error": ".errors",
    "Qcow2Image": ".image",
    "AllocationPolicy": ".policy",
    "FixedAllocator": ".policy",
    "Qemu112Allocator": ".policy",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
