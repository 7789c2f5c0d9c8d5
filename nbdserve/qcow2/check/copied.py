"""The COPIED flags of the active L1 and L2 entries against the stored refcounts (qemu:
check_oflag_copied(): set iff the refcount is 1)."""

from __future__ import annotations

import itertools
from array import array

from ...blockdev.fileio import pwrite_all
from .. import format as fmt
from ..l2cache import decode_table, encode_table
from .fastpaths import ContiguousRuns
from .result import FIX_ERRORS, FIX_LEAKS, CheckResult
from .stored import StoredRefcounts


class ActiveRuns:
    """What ContiguousRuns.find said of the L2 table of each active L1 entry, while counting
    (length -1: not a run, or not looked at)."""

    def __init__(self, l1_size: int):
        self.first = array("Q", [0]) * l1_size
        self.length = array("l", [-1]) * l1_size

    def get(self, i: int) -> tuple[int, int] | None:
        if i < len(self.length) and self.length[i] >= 0:
            return self.first[i], self.length[i]
        return None


def check_oflag_copied(fd: int, h, read, stored: StoredRefcounts, runs: ContiguousRuns,
                       active_runs: ActiveRuns, res: CheckResult, fix: int) -> None:
    """qemu: check_oflag_copied(); ``read(n, offset)`` reads zeros past the end of the file.
    The tables ``active_runs`` knows are not read again (they are unchanged since)."""
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
    rewritten: set[int] = set()         # L2 tables changed here: active_runs is stale for them
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
        run, raw = None if l2_offset in rewritten else active_runs.get(i), None
        if run is None and words == 1:
            raw = read(h.cluster_size, l2_offset)
            run = runs.find(raw, stored.file_len)
        if words == 1 and copied_fast(run, stored):
            continue
        table = decode_table(raw if raw is not None else read(h.cluster_size, l2_offset))
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
            rewritten.add(l2_offset)
            res.corruptions -= dirty
            res.corruptions_fixed += dirty


def copied_fast(run: tuple[int, int], stored: StoredRefcounts) -> bool:
    """True if every entry of an L2 table is known right about COPIED without a Python
    loop, given what ContiguousRuns.find said of it: a table of zeros, or one contiguous run
    whose clusters all have the stored refcount 1 if COPIED is set, none if not."""
    first, m = run
    if m <= 0:
        return m == 0
    return stored.all_one((first & fmt.L2E_OFFSET_MASK) >> stored.cluster_bits, m,
                          bool(first & fmt.QCOW_OFLAG_COPIED))
