"""Guest -> host cluster mapping: the lookup half of qemu's block/qcow2-cluster.c.

qcow2.txt: "Cluster mapping".  A guest range maps to MappedRuns of one ClusterKind
each; host-contiguous DATA runs are merged.
"""

from __future__ import annotations

from array import array
from enum import IntEnum
from typing import NamedTuple

from . import format as fmt


class ClusterKind(IntEnum):
    """What a guest range reads from (qcow2.txt: "L2 entries", "Extended L2 Entries")."""

    UNALLOCATED = 0   # the backing file, or zeros
    ZERO = 1
    DATA = 2
    COMPRESSED = 3


UNALLOCATED, ZERO, DATA, COMPRESSED = ClusterKind


class MappedRun(NamedTuple):
    """A guest range of one kind; ``host``: the host offset of DATA, the L2 entry of
    COMPRESSED (one cluster per run), else 0."""

    kind: ClusterKind
    offset: int
    length: int
    host: int
EXTL2_ALL_ALLOCATED = fmt.SUBCLUSTER_ALLOC_MASK
EXTL2_ALL_ZERO = fmt.SUBCLUSTER_ZERO_MASK
# _keepable() of a standard L2 entry with a host offset, as one mask test (qcow2.txt "L2
# entries": COPIED, not compressed, not zero): entry & IN_PLACE_FLAGS == QCOW_OFLAG_COPIED
IN_PLACE_FLAGS = fmt.QCOW_OFLAG_COPIED | fmt.QCOW_OFLAG_COMPRESSED | fmt.QCOW_OFLAG_ZERO


class ClusterMapping:
    """Qcow2Image's L1/L2 lookups (a mixin: the image holds the tables and the cache)."""

    def _l2_table_for(self, l1_index: int) -> array | None:
        if l1_index >= len(self.l1):
            return None
        l2_off = self.l1[l1_index] & fmt.L1E_OFFSET_MASK
        if not l2_off:
            return None
        if l2_off & (self.cluster_size - 1):
            raise self._corruption(f"L2 table offset {l2_off:#x} unaligned (L1 index {l1_index})")
        try:
            return self.l2cache.get(l2_off)
        except OSError as e:
            raise self._corruption(str(e)) from None

    def _classify(self, entry: int, bitmap: int, sub: int) -> ClusterKind:
        if entry & fmt.QCOW_OFLAG_COMPRESSED:
            return COMPRESSED
        if self.extended_l2:
            if bitmap & (1 << (32 + sub)):
                return ZERO
            if bitmap & (1 << sub):
                return DATA
            return UNALLOCATED
        if entry & fmt.QCOW_OFLAG_ZERO:
            if self.version < 3:   # qemu: "Zero cluster entry found in pre-v3 image"
                raise self._corruption(f"zero cluster entry {entry:#x} in a version 2 image")
            return ZERO
        return DATA if entry & fmt.L2E_OFFSET_MASK else UNALLOCATED

    def _map(self, offset: int, length: int) -> list[MappedRun]:
        """The runs of a guest range, in order."""
        runs: list[MappedRun] = []
        end = offset + length
        pos = offset
        unit = self.subcluster_size
        cmask = self.cluster_size - 1
        words = self.l2_entry_words
        while pos < end:
            l1_index = pos >> self.l1_shift
            table = self._l2_table_for(l1_index)
            table_end = min(end, (l1_index + 1) << self.l1_shift)
            if table is None:
                self._add_run(runs, UNALLOCATED, pos, table_end - pos, 0)
                pos = table_end
                continue
            while pos < table_end:
                idx = (pos >> self.cluster_bits) & (self.l2_entries - 1)
                entry = table[idx * words]
                bitmap = table[idx * words + 1] if words == 2 else 0
                in_cluster = pos & cmask
                sub = in_cluster // unit
                kind = self._classify(entry, bitmap, sub)
                if kind == COMPRESSED:
                    n = min(table_end, (pos | cmask) + 1) - pos
                    runs.append(MappedRun(COMPRESSED, pos, n, entry))
                    pos += n
                    continue
                n = min(table_end - pos, unit - (pos % unit))
                host = 0
                if kind == DATA:
                    cluster_host = entry & fmt.L2E_OFFSET_MASK
                    if cluster_host & cmask:
                        raise self._corruption(f"data cluster offset {cluster_host:#x} unaligned")
                    host = cluster_host + in_cluster
                self._add_run(runs, kind, pos, n, host)
                pos += n
        return runs

    @staticmethod
    def _add_run(runs: list[MappedRun], kind: ClusterKind, pos: int, n: int, host: int) -> None:
        if runs:
            last = runs[-1]
            if last.kind == kind and kind != COMPRESSED and (kind != DATA or last.host + last.length == host):
                runs[-1] = MappedRun(kind, last.offset, last.length + n, last.host)
                return
        runs.append(MappedRun(kind, pos, n, host))

    def _keepable(self, entry: int, bitmap: int) -> bool:
        """Allocated, COPIED, plain data: written in place (qemu: QCOW_OFLAG_COPIED)."""
        if not entry & fmt.QCOW_OFLAG_COPIED or entry & fmt.QCOW_OFLAG_COMPRESSED:
            return False
        if not entry & fmt.L2E_OFFSET_MASK:
            return False
        if self.extended_l2:
            return bitmap == EXTL2_ALL_ALLOCATED
        return not entry & fmt.QCOW_OFLAG_ZERO

    def _entry(self, table: array, idx: int) -> tuple[int, int]:
        if self.extended_l2:
            return table[2 * idx], table[2 * idx + 1]
        return table[idx], 0

    def _set_entry(self, table: array, idx: int, entry: int, bitmap: int = 0) -> None:
        if self.extended_l2:
            table[2 * idx] = entry
            table[2 * idx + 1] = bitmap
        else:
            table[idx] = entry

    def _l2_offset(self, pos: int) -> int:
        return self.l1[pos >> self.l1_shift] & fmt.L1E_OFFSET_MASK

    def _reads_as_zeros(self, offset: int, length: int) -> bool:
        """True when the mapping alone shows the range reads as zeros (zero clusters, or
        unallocated with nothing below)."""
        backing_size = self.backing.size if self.backing is not None else 0
        return all(kind == ZERO or (kind == UNALLOCATED and pos >= backing_size)
                   for kind, pos, _, _ in self._map(offset, length)) if length else True
