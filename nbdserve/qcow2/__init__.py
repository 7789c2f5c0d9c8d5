"""The qcow2 engine: formats (format.py), header validation, refcounts, L2 cache,
allocation policies and the Qcow2Image block device."""

from .errors import Qcow2Error
from .image import Qcow2Image
from .policy import AllocationPolicy, FixedAllocator, Qemu112Allocator

__all__ = ["Qcow2Error", "Qcow2Image", "AllocationPolicy", "FixedAllocator", "Qemu112Allocator"]
