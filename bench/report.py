"""The printed report: one row per figure with its target and met/MISSED."""

from __future__ import annotations

import statistics

def mark(ok) -> str:
    return "met" if ok else "MISSED"


def skipped(lines: list[str], title: str, part: dict) -> bool:
    """Report a part that did not run (--only, --quick, missing tool) as one line."""
    if "skipped" in part:
        lines.append(f"{title}: skipped -- {part['skipped']}")
    return "skipped" in part


def report(res: dict) -> str:
    L = []
    m = res["meta"]
    L.append(f"nbdserve benchmark  {m['date']}")
    L.append(f"machine: {m['machine']}")
    L.append(f"command: {m['command']}")
    L.append(f"code: {m['code']}")
    L.append(f"fio {m['fio']}, {m['qemu']}, runtime {m['runtime']} s, repeat {m['repeat']} "
             f"(A/B alternating), medians; 1 GiB images on {m['tmpfs']}")
    if res.get("nbdkit_note"):
        L.append(f"nbdkit skipped: {res['nbdkit_note']}")
    L.append("")
    hdr = f"{'workload':<20} {'unit':<6} {'nbdserve':>10} {'qemu-nbd':>10}"
    has_kit = any("nbdkit" in w["median"] for w in res["throughput"])
    if has_kit:
        hdr += f" {'nbdkit':>10}"
    hdr += f" {'ratio':>7} {'target':>8}  result"
    L.append(hdr)
    L.append("-" * len(hdr))
    for w in res["throughput"]:
        med = w["median"]
        cell = lambda k: f" {med[k]:>10.1f}" if k in med else f" {'-':>10}"  # noqa: E731
        row = f"{w['workload']:<20} {w['figure']:<6}" + cell("nbdserve") + cell("qemu-nbd")
        if has_kit:
            row += cell("nbdkit")
        ratio = f"{w['ratio']:>6.2f}x" if w["ratio"] is not None else f"{'n/a':>7}"
        if w["target_ratio"] is None:
            row += f" {ratio} {'-':>8}  (no target)"
        else:
            row += f" {ratio} {'>=' + format(w['target_ratio'], '.1f') + 'x':>8}  {mark(w['met'])}"
        L.append(row)
    for w in res["throughput"]:
        pcts = [r["allocating_writes_pct"] for r in w["runs"] if "allocating_writes_pct" in r]
        if pcts:
            by = {}
            for r in w["runs"]:
                if "allocating_writes_pct" in r:
                    by.setdefault(r["server"], []).append(r["allocating_writes_pct"])
            L.append(f"{w['workload']}: share of writes that allocated a cluster: " + ", ".join(
                f"{k} {statistics.median(v):.0f}%" for k, v in by.items()))
    L.append("")
    mem = res["memory"]
    if not skipped(L, "memory", mem):
        L.append(f"memory: nbdserve peak RSS (VmHWM) with 16 fio jobs x QD16 4K randread "
                 f"({mem['IOPS']:.0f} IOPS total, {mem['runtime_s']} s): {mem['peak_rss_mib']:.1f} MiB "
                 f"(idle {mem['rss_idle_mib']:.1f} MiB); target <= {mem['target_mib']} MiB: {mark(mem['met'])}")
    ob = res["open_1tib"]
    if not skipped(L, "1 TiB open", ob):
        n, q = ob["nbdserve"], ob["qemu-nbd"]
        L.append("1 TiB sparse qcow2, process start -> first 4K read returned (qemu-io over NBD):")
        L.append(f"  nbdserve {n['start_to_first_read_s']:.3f} s (start->listening {n['start_to_listen_s']:.3f} s, "
                 f"connect+read {n['listen_to_first_read_s']:.3f} s), RSS after {n['rss_after_mib']:.1f} MiB "
                 f"(peak {n['hwm_after_mib']:.1f} MiB); `nbdserve --help` alone takes {ob['nbdserve_help_s']:.3f} s")
        L.append(f"  qemu-nbd {q['start_to_first_read_s']:.3f} s (start->listening {q['start_to_listen_s']:.3f} s, "
                 f"connect+read {q['listen_to_first_read_s']:.3f} s)")
        L.append(f"  target < {ob['target_s']} s: {mark(ob['met'])} "
                 f"(excluding interpreter start-up: {mark(ob['met_excluding_startup'])})")
    ck = res["check"]
    if not skipped(L, "check (4 GiB allocated)", ck):
        L.append(f"check (4 GiB allocated): nbdserve {ck['nbdserve']['seconds']:.2f} s (rc {ck['nbdserve']['rc']}), "
                 f"qemu-img {ck['qemu-img']['seconds']:.2f} s -> {ck['ratio']:.2f}x; "
                 f"target <= {ck['target_ratio']:.0f}x: {mark(ck['met'])}")
        L.append(f"  (`python -m nbdserve --help` alone takes {ck['nbdserve_help_s']:.2f} s; check minus that "
                 f"start-up: {ck['ratio_excluding_startup']:.1f}x qemu-img)")
    L.append(f"wall time: {m['wall_s']:.0f} s")
    return "\n".join(L)
