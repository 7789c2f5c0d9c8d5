"""Culprits: each bad guest range, the host cluster holding it, and the write that put the bytes
there last (an allocation's own data, its head or tail COW, or a write into kept clusters),
from the run's allocation trace (qcow2/trace.py) and ``qemu-img map`` of the overlay.
"""

from __future__ import annotations

from dataclasses import dataclass

# the allocation keys ``reproduce --json`` gives (qcow2/trace.py has the full records)
ALLOCATION_KEYS = ("guest_offset", "n_start", "n_end", "keep_clusters", "nb_clusters", "host_offset",
                   "avail_sectors", "avail_sectors_fixed", "nb_available", "head_cow", "tail_cow", "case_a")
COW_KEYS = ("guest_offset", "host_offset", "length")


def offset_text(n: int) -> str:
    return f"{n:#x}" if n else "0"


def size_text(n: int) -> str:
    for unit, shift in (("M", 20), ("K", 10)):
        if n and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def allocations_of(trace: list[dict]) -> list[dict]:
    """The trace's allocation records in allocation order, each with ALLOCATION_KEYS only."""
    out = []
    for r in sorted((r for r in trace if r["event"] == "alloc"), key=lambda r: r["index"]):
        a = {k: r[k] for k in ALLOCATION_KEYS}
        for which in ("head_cow", "tail_cow"):
            if a[which] is not None:
                a[which] = {k: a[which][k] for k in COW_KEYS}
        out.append(a)
    return out


@dataclass
class HostWrite:
    seq: int
    host: int
    length: int
    guest: int
    allocation: int | None      # index into allocations_of(); None: a write into kept clusters
    by: str                     # "data", "head_cow", "tail_cow" (of the allocation), "write"


def host_writes(trace: list[dict]) -> list[HostWrite]:
    writes = []
    allocs = sorted((r for r in trace if r["event"] == "alloc"), key=lambda r: r["index"])
    for i, r in enumerate(allocs):
        d = r["data"]
        writes.append(HostWrite(d["seq"], d["host_offset"], d["length"], d["guest_offset"], i, "data"))
        for cow in ("head_cow", "tail_cow"):
            c = r[cow]
            if c is not None:
                writes.append(HostWrite(c["seq"], c["host_offset"], c["length"], c["guest_offset"], i, cow))
    for r in trace:
        if r["event"] == "write":
            writes.append(HostWrite(r["seq"], r["host_offset"], r["length"], r["guest_offset"], None, "write"))
    return writes


def host_map(qemu_img_map: list[dict]) -> list[tuple[int, int, int]]:
    """(guest start, length, host offset) of the data the overlay itself holds."""
    return [(e["start"], e["length"], e["offset"]) for e in qemu_img_map
            if e.get("data") and e.get("depth") == 0 and "offset" in e]


def _host_of(mapping, guest: int) -> tuple[int | None, int]:
    """(host offset of ``guest`` or None, bytes from there the answer holds for)."""
    for start, length, host in mapping:
        if start <= guest < start + length:
            return host + guest - start, start + length - guest
    later = [s for s, _, _ in mapping if s > guest]
    return None, (min(later) - guest) if later else 1 << 62


def _paint(lo: int, hi: int, hits: list[HostWrite]) -> list[tuple[int, int, HostWrite | None]]:
    """[lo, hi) of the host file cut by which write put its bytes there last (``hits`` newest first)."""
    if lo >= hi:
        return []
    for i, w in enumerate(hits):
        a, b = max(lo, w.host), min(hi, w.host + w.length)
        if a < b:
            return _paint(lo, a, hits[i + 1:]) + [(a, b - a, w)] + _paint(b, hi, hits[i + 1:])
    return [(lo, hi - lo, None)]


def find_culprits(bad_ranges, trace: list[dict], qemu_img_map: list[dict], cluster_size: int) -> list[dict]:
    """Per bad range piece (cut at clusters and where the last writer changes, joined again
    where the culprit and host run on):
    ``guest_offset``, ``length``, ``host_offset`` (None: not in the overlay), ``allocation``
    (index into allocations_of(trace), or None) and ``by``: what wrote there last, "data"
    (the allocation's own write), "head_cow", "tail_cow", "write" (into kept clusters, no
    allocation) or None (nothing this run traced)."""
    mapping = host_map(qemu_img_map)
    writes = host_writes(trace)
    out: list[dict] = []
    for offset, length in bad_ranges:
        pos, end = offset, offset + length
        while pos < end:
            host, run = _host_of(mapping, pos)
            n = min(end, (pos | (cluster_size - 1)) + 1, pos + run) - pos
            if host is None:
                parts = [(pos, n, None, None)]
            else:
                hits = sorted((w for w in writes if w.host < host + n and host < w.host + w.length),
                              key=lambda w: -w.seq)
                parts = [(pos + a - host, m, a, w) for a, m, w in _paint(host, host + n, hits)]
            for g, m, h, last in parts:
                piece = {"guest_offset": g, "length": m, "allocation": last.allocation if last else None,
                         "host_offset": h, "by": last.by if last else None}
                prev = out[-1] if out else None
                if (prev and prev["guest_offset"] + prev["length"] == g and prev["allocation"] == piece["allocation"]
                        and prev["by"] == piece["by"] and prev["host_offset"] is not None and h is not None
                        and prev["host_offset"] + prev["length"] == h):
                    prev["length"] += m
                else:
                    out.append(piece)
            pos += n
    return out


def describe_culprit(c: dict, allocations: list[dict], trace: list[dict], cluster_size: int) -> str:
    """One line: the bad range, and the write that last put bytes there."""
    head = f"{offset_text(c['guest_offset'])}+{size_text(c['length'])}"
    host = c["host_offset"]
    if host is None:
        return f"{head}: not allocated in the overlay (reads the backing file or zeros)"
    cluster = host & ~(cluster_size - 1)
    landed = f"host cluster {cluster:#x}  (guest {offset_text(c['guest_offset'] & ~(cluster_size - 1))}..)"
    if c["by"] is None:
        return f"{head}: no write of this run reached {landed}"
    if c["by"] == "write":
        return f"{head}: a write into kept clusters, in {landed}"
    a = allocations[c["allocation"]]
    full = sorted((r for r in trace if r["event"] == "alloc"), key=lambda r: r["index"])[c["allocation"]]
    write = (f"the write at {offset_text(full['guest_offset'])}+{size_text(full['length'])} "
             f"(keep {a['keep_clusters']}, new {a['nb_clusters']}{', case (a)' if a['case_a'] else ''})")
    if c["by"] == "data":
        return f"{head}: data of {write}, in {landed}"
    cow = a[c["by"]]
    source = cow["guest_offset"] + host - cow["host_offset"]
    new_end = a["host_offset"] + a["nb_clusters"] * cluster_size
    stale = "stale " if not a["host_offset"] <= host < new_end else ""
    return f"{head}: {stale}{c['by'][:4]} COW of {write}, copied from guest {offset_text(source)}, landed in {landed}"
