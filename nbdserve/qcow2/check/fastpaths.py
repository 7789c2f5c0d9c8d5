"""The check's loops that run without a Python loop over table entries.

Each has a plain twin in tests/test_fast_paths.py that says the same thing entry by entry,
and a hypothesis test that feeds both the same inputs.
"""

from __future__ import annotations

import sys
from array import array

from .. import format as fmt
from ..l2cache import encode_table

_LITTLE = sys.byteorder == "little"


def decode_refblock(raw: bytes, bits: int) -> array:
    """A refcount block as array('Q'), whatever its entry width.

    Entries of 8 bits and more are widened by moving each byte of the big-endian entries
    into its place in the native 64-bit ones (strided slices, no loop over the entries)."""
    if bits < 8:
        from ..refcount import _decode
        return array("Q", _decode(raw, bits))
    width = bits >> 3
    out = bytearray(len(raw) // width * 8)
    for j in range(width):
        significance = width - 1 - j            # byte j of a big-endian entry
        out[significance if _LITTLE else 7 - significance::8] = raw[j::width]
    return array("Q", out)


def narrow_refblock(raw: bytes, bits: int) -> bytes | None:
    """A refcount block's entries one byte each (the form of computed.py's counts), or None if
    an entry is 255 or more.

    Entries of 8 bits and more: the low byte of each big-endian entry, the others all zero
    (strided slices, no loop over the entries)."""
    if bits < 8:
        from ..refcount import _decode
        return _decode(raw, bits).tobytes()
    width = bits >> 3
    low = raw[width - 1::width]
    if b"\xff" in low:
        return None
    for j in range(width - 1):
        if raw[j::width].count(0) != len(low):
            return None
    return low


def widen(narrow: bytes, width: int, byteorder: str) -> bytearray:
    """Each byte of ``narrow`` as an integer of ``width`` bytes (the inverse of
    narrow_refblock for ``byteorder`` "big"), by one strided slice."""
    out = bytearray(len(narrow) * width)
    out[width - 1 if byteorder == "big" else 0::width] = narrow
    return out


class ContiguousRuns:
    """Finds L2 tables of ``entries`` entries that map one run of contiguous clusters."""

    def __init__(self, cluster_size: int, entries: int):
        self.cs = cluster_size
        # the big-endian integer whose 64-bit digits are i*cs, for a whole table
        self._steps = int.from_bytes(encode_table(array("Q", range(0, entries * cluster_size,
                                                                   cluster_size))), "big")

    def find(self, raw: bytes, file_len: int) -> tuple[int, int]:
        """(first entry, m) if the L2 table ``raw`` holds m standard entries with the same flags
        (COPIED or none) mapping contiguous, aligned clusters inside a file of ``file_len``
        bytes, then zeros only (m = 0: a table of zeros); (0, -1) otherwise."""
        m = (len(raw.rstrip(b"\0")) + 7) >> 3
        if not m:
            return 0, 0
        first = int.from_bytes(raw[:8], "big")
        flags, off = first & ~fmt.L2E_OFFSET_MASK, first & fmt.L2E_OFFSET_MASK
        if flags not in (0, fmt.QCOW_OFLAG_COPIED) or not off or off & (self.cs - 1):
            return 0, -1
        if off + (m - 1) * self.cs >= file_len:
            return 0, -1
        # raw[:8m] == [first + i*cs for i in range(m)]: as one big-endian integer whose 64-bit
        # digits are the entries, less the digits i*cs, it must have the digits first (no
        # borrow: digit 0 is first >= cs while the steps' is 0)
        n = len(raw) // 8
        steps = self._steps if m == n else self._steps >> 64 * (n - m)
        if (int.from_bytes(raw[:8 * m], "big") - steps).to_bytes(8 * m, "big") != raw[:8] * m:
            return 0, -1
        return first, m
