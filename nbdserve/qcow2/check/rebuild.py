"""``qemu-img check -r all``'s last resort: new refcount structures from the computed refcounts."""

from __future__ import annotations

import os
from array import array

from ...blockdev.fileio import pwrite_all
from .. import format as fmt
from ..l2cache import encode_table


def rebuild_refcount_structure(fd: int, h, computed: array) -> None:
    """qemu: rebuild_refcount_structure(): new refcount blocks and table holding ``computed``
    (the refcount of every cluster, capped at the entry width's maximum when written).

    The new structures take free clusters (first fit on the computed refcounts, growing the
    file if needed); the header is switched to the new table after everything is durable and
    ``h`` updated.  The old structures are left behind as leaks, which the caller frees.
    """
    from ..refcount import _encode   # the engine's refcount block encoding (only repairs need it)
    ref = array("Q", computed)
    cb, cs = h.cluster_bits, h.cluster_size
    refbits = 1 << h.refcount_order
    refmax = (1 << refbits) - 1
    bb = cb + 3 - h.refcount_order
    B = 1 << bb
    free_hint = 0

    def alloc(count: int) -> int:
        nonlocal free_hint
        c, run = free_hint, 0
        while run < count:
            if c >= len(ref) or ref[c] == 0:
                run += 1
            else:
                run = 0
            c += 1
        start = c - count
        if c > len(ref):
            ref.extend(array("Q", [0]) * (c - len(ref)))
        for k in range(start, c):
            ref[k] = 1
        if count == 1 and start == free_hint:
            free_hint = start + 1
        return start

    blocks: dict[int, int] = {}
    table_start, table_clusters = -1, 0
    while True:
        changed = False
        for ti in range((len(ref) + B - 1) >> bb):
            if ti in blocks:
                continue
            part = ref[ti << bb:(ti + 1) << bb]
            if part.count(0) != len(part):
                blocks[ti] = alloc(1)
                changed = True
        need = max(1, (((max(blocks) + 1) * 8) + cs - 1) // cs)
        if need > table_clusters:
            if table_start >= 0:
                for k in range(table_start, table_start + table_clusters):
                    ref[k] = 0
            table_start, table_clusters = alloc(need), need
            changed = True
        if not changed:
            break
    table = array("Q", [0]) * (table_clusters * cs // 8)
    for ti, c in blocks.items():
        table[ti] = c << cb
        part = ref[ti << bb:(ti + 1) << bb]
        part.extend(array("Q", [0]) * (B - len(part)))
        if max(part) > refmax:
            part = array("Q", (min(v, refmax) for v in part))
        pwrite_all(fd, _encode(part, refbits), c << cb)
    pwrite_all(fd, encode_table(table), table_start << cb)
    os.fsync(fd)
    pwrite_all(fd, fmt.U64.pack(table_start << cb) + table_clusters.to_bytes(4, "big"),
               fmt.OFFSET_REFCOUNT_TABLE)
    os.fsync(fd)
    h.refcount_table_offset = table_start << cb
    h.refcount_table_clusters = table_clusters
