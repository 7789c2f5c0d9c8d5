"""The block-device layer: one small interface shared by every layer (nbdkit's plugin/filter API)."""

from .base import BlockDevice, Extent, ReadChunk, check_range
from .raw import RawFile

__all__ = ["BlockDevice", "Extent", "ReadChunk", "RawFile", "check_range"]
