"""The qcow2 engine: formats (format.py), header validation, refcounts, L2 cache,
allocation policies and the Qcow2Image block device.

Names are imported on first use, so that ``nbdserve check`` does not pay for
Trio and the write path at start-up.
"""

from .._lazy import lazy_getattr

_EXPORTS = {
    "Qcow2Error": ".errors",
    "Qcow2Image": ".image",
    "AllocationPolicy": ".policy",
    "FixedAllocator": ".policy",
    "Qemu112Allocator": ".policy",
}
__all__ = list(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
