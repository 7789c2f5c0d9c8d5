"""``qemu-img check -r all``'s last resort: new refcount structures from the computed refcounts."""

from __future__ import annotations

import os
import re
from array import array

from ...blockdev.fileio import pwrite_all
from .. import format as fmt
from ..l2cache import encode_table
from .computed import ComputedRefcounts
from .fastpaths import widen

_FREE = re.compile(rb"\x00")


def rebuild_refcount_structure(fd: int, h, computed: ComputedRefcounts) -> None:
    """qemu: rebuild_refcount_structure(): new refcount blocks and table holding ``computed``
    (the refcount of every cluster, capped at the entry width's maximum when written), which
    gets the clusters of the new structures too.

    The new structures take free clusters (first fit on the computed refcounts, growing the
    file if needed); the header is switched to the new table after everything is durable and
    ``h`` updated.  The old structures are left behind as leaks, which the caller frees.
    """
    from ..refcount import _encode   # the engine's refcount block encoding (only repairs need it)
    ref = computed
    low = ref.low
    cb, cs = h.cluster_bits, h.cluster_size
    refbits = 1 << h.refcount_order
    refmax = (1 << refbits) - 1
    bb = cb + 3 - h.refcount_order
    B = 1 << bb
    free_hint = 0

    def alloc(count: int) -> int:
        """qemu: alloc_clusters_imrt(): the first run of ``count`` free clusters from
        free_hint, the first free cluster (past the end everything is free), now in use."""
        nonlocal free_hint
        run = re.compile(rb"\x00{%d}" % count).search(memoryview(low), free_hint)
        if run:
            start = run.start()
        else:                           # the free clusters at the end, and more past it
            start = len(low)
            while start > free_hint and low[start - 1] == 0:
                start -= 1
        ref.grow(start + count)
        low[start:start + count] = array("B", [1]) * count
        free = _FREE.search(memoryview(low), free_hint)
        free_hint = free.start() if free else len(low)
        return start

    blocks: dict[int, int] = {}
    table_start, table_clusters = -1, 0
    while True:
        changed = False
        for ti in range((len(ref) + B - 1) >> bb):
            if ti in blocks:
                continue
            if low[ti << bb:(ti + 1) << bb].tobytes().strip(b"\0"):
                blocks[ti] = alloc(1)
                changed = True
        need = max(1, (((max(blocks) + 1) * 8) + cs - 1) // cs)
        if need > table_clusters:
            if table_start >= 0:
                low[table_start:table_start + table_clusters] = array("B", [0]) * table_clusters
                free_hint = min(free_hint, table_start)
            table_start, table_clusters = alloc(need), need
            changed = True
        if not changed:
            break
    table = array("Q", [0]) * (table_clusters * cs // 8)
    for ti, c in blocks.items():
        table[ti] = c << cb
        first, end = ti << bb, min(len(ref), (ti + 1) << bb)
        narrow = low[first:end].tobytes()
        narrow += bytes(B - len(narrow))
        if refbits >= 8 and b"\xff" not in narrow:
            block = widen(narrow, refbits >> 3, "big")
        else:
            part = ref.values(first, end)
            part.extend(array("Q", [0]) * (B - len(part)))
            if max(part) > refmax:
                part = array("Q", (min(v, refmax) for v in part))
            block = _encode(part, refbits)
        pwrite_all(fd, block, c << cb)
    pwrite_all(fd, encode_table(table), table_start << cb)
    os.fsync(fd)
    pwrite_all(fd, fmt.U64.pack(table_start << cb) + table_clusters.to_bytes(4, "big"),
               fmt.OFFSET_REFCOUNT_TABLE)
    os.fsync(fd)
    h.refcount_table_offset = table_start << cb
    h.refcount_table_clusters = table_clusters
