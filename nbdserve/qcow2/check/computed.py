"""The refcount every cluster should have, as the check counts it from the metadata.

One byte per cluster (qemu's check keeps one refcount_bits-wide entry per cluster): a 1 TiB
image of 64 KiB clusters takes 16 MiB.  Counts of 255 and more, rare (a cluster shared by
255 snapshots, or counted past refcount_bits' maximum), live in a side table: their byte
holds 255.
"""

from __future__ import annotations

import re
import sys
from array import array

from .fastpaths import widen

BIG = 255                                        # the byte of a count kept in .big
_PLUS_ONE = bytes(range(1, 256)) + b"\xff"       # bytes.translate: every byte below 254 + 1


class ComputedRefcounts:
    """The computed refcount of each cluster of the file (indexable, like a list of ints)."""

    def __init__(self, clusters: int):
        self.low = array("B", [0]) * clusters
        self.big: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.low)

    def grow(self, clusters: int) -> None:
        """At least ``clusters`` clusters, the new ones at 0."""
        if clusters > len(self.low):
            self.low.extend(array("B", [0]) * (clusters - len(self.low)))

    def __getitem__(self, k: int) -> int:
        v = self.low[k]
        return self.big[k] if v == BIG else v

    def __setitem__(self, k: int, value: int) -> None:
        if value < BIG:
            self.low[k] = value
            self.big.pop(k, None)
        else:
            self.low[k] = BIG
            self.big[k] = value

    def add_one(self, k: int) -> None:
        v = self.low[k]
        if v < BIG - 1:
            self.low[k] = v + 1
        else:
            self[k] = self[k] + 1

    def add_limited(self, first: int, end: int, limit: int) -> list[int]:
        """+1 to clusters first .. end-1 except those already at ``limit``: their list (qemu:
        qcow2_inc_refcounts_imrt's "overflow")."""
        refused = []
        low = self.low
        for k in range(first, end):
            v = low[k]
            if v == BIG:
                v = self.big[k]
            if v >= limit:
                refused.append(k)
            elif v < BIG - 1:
                low[k] = v + 1
            else:
                self[k] = v + 1
        return refused

    def add_run(self, k: int, m: int) -> None:
        """+1 to clusters k .. k+m-1, without a Python loop unless a count leaves the byte range."""
        raw = self.low[k:k + m].tobytes()
        if b"\xfe" in raw or b"\xff" in raw:           # +1 takes them out of the byte range
            for i in range(k, k + m):
                self.add_one(i)
        else:
            self.low[k:k + m] = array("B", raw.translate(_PLUS_ONE))

    def above(self, limit: int) -> list[int]:
        """The clusters whose count is above ``limit``, in order."""
        if limit >= BIG - 1:
            return sorted(k for k, v in self.big.items() if v > limit)
        high = re.compile(b"[" + re.escape(bytes([limit + 1])) + b"-\xff]")
        return [m.start() for m in high.finditer(memoryview(self.low))]

    def values(self, first: int, end: int) -> array:
        """The counts of clusters first .. end-1 as array('Q')."""
        out = array("Q", widen(self.low[first:end].tobytes(), 8, sys.byteorder))
        if self.big:
            for m in re.finditer(b"\xff", self.low[first:end].tobytes()):
                out[m.start()] = self.big[first + m.start()]
        return out

    def used_end(self, first: int, end: int) -> int:
        """One past the last cluster of first .. end-1 with a nonzero count (first if none)."""
        return first + len(self.low[first:end].tobytes().rstrip(b"\0"))
