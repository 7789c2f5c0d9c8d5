"""The COPIED flags of the active L1 and L2 entries against the stored refcounts (qemu:
check_oflag_copied(): set iff the refcount is 1)."""

from __future__ import annotations

import itertools

from ...blockdev.fileio import pwrite_all
from .. import format as fmt
from ..l2cache import decode_table, encode_table
from .fastpaths import ContiguousRuns
from .result import FIX_ERRORS, FIX_LEAKS, CheckResult
from .stored import StoredRefcounts


def check_oflag_copied(fd: int, h, read, stored: StoredRefcounts, runs: ContiguousRuns,
                       res: CheckResult, fix: int) -> None:
    """qemu: check_oflag_copied(); ``read(n, offset)`` reads zeros past the end of the file."""
    if fix & FIX_ERRORS:
        repair = True
    elif fix & FIX_LEAKS:
        repair = not res.check_errors and not res.corruptions and not res.leaks
    else:
        repair = False
    cb = h.cluster_bits
    COPIED, COMPRESSED = fmt.QCOW_OFLAG_COPIED, fmt.QCOW_OFLAG_COMPRESSED
    OMASK = fmt.L2E_OFFSET_MASK
    bb, bmask = stored.block_bits, stored.block_entries - 1
    words = 2 if h.extended_l2 else 1
    l1 = decode_table(read(h.l1_size * 8, h.l1_table_offset))
    word = "Repairing" if repair else "ERROR"
    for i, l1e in itertools.compress(enumerate(l1), l1):   # the nonzero entries
        l2_offset = l1e & fmt.L1E_OFFSET_MASK
        if not l2_offset:
            continue
        rc = stored.get(l2_offset >> cb)
        if rc is None:
            continue
        if (rc == 1) != bool(l1e & COPIED):
            res.corruptions += 1
            res.messages.append(f"{word} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1e:x} refcount={rc}")
            if repair:
                new = l1e | COPIED if rc == 1 else l1e & ~COPIED
                pwrite_all(fd, fmt.U64.pack(new), h.l1_table_offset + i * 8)
                res.corruptions -= 1
                res.corruptions_fixed += 1
        raw = read(h.cluster_size, l2_offset)
        if words == 1 and copied_fast(raw, runs, stored):
            continue
        table = decode_table(raw)
        dirty = 0
        cur_ti, blk = -1, None
        for j in range(0, len(table), words):
            e = table[j]
            if e & COMPRESSED:
                continue
            off = e & OMASK
            if not off:
                continue                        # ZERO_PLAIN or UNALLOCATED
            k = off >> cb
            ti = k >> bb
            if ti != cur_ti:
                cur_ti, blk = ti, stored.block(ti)
            if blk is None:
                continue
            rc = blk[k & bmask]
            if (rc == 1) != bool(e & COPIED):
                res.corruptions += 1
                res.messages.append(f"{word} OFLAG_COPIED data cluster: l2_entry={e:x} refcount={rc}")
                if repair:
                    table[j] = e | COPIED if rc == 1 else e & ~COPIED
                    dirty += 1
        if dirty:
            pwrite_all(fd, encode_table(table), l2_offset)
            res.corruptions -= dirty
            res.corruptions_fixed += dirty


def copied_fast(raw: bytes, runs: ContiguousRuns, stored: StoredRefcounts) -> bool:
    """True if every entry of the L2 table ``raw`` is known right about COPIED without a
    Python loop: a table of zeros, or one contiguous run with COPIED set whose clusters
    all have the stored refcount 1."""
    first, m = runs.find(raw, stored.file_len)
    if m <= 0:
        return m == 0
    if first & ~fmt.L2E_OFFSET_MASK != fmt.QCOW_OFLAG_COPIED:
        return False
    return stored.all_ones((first & fmt.L2E_OFFSET_MASK) >> stored.cluster_bits, m)
