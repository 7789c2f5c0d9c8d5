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


def ratio_cells(ratio, target, sense: str, met) -> str:
    """The ratio, target and result columns ("(no target)" when target is None)."""
    text = f" {ratio:>6.2f}x" if ratio is not None else f" {'n/a':>7}"
    if target is None:
        return text + f" {'-':>8}  (no target)"
    return text + f" {sense + format(target, '.1f') + 'x':>8}  {mark(met)}"


def check_figures(ck: dict) -> str:
    return ", ".join(f"{k} {ck[k]['seconds']:.2f} s, {ck[k]['peak_rss_mib']:.1f} MiB (rc {ck[k]['rc']})"
                     for k in ("nbdserve", "qemu-img"))


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
    W = 34
    hdr = f"{'workload':<{W}} {'unit':<6} {'nbdserve':>10} {'qemu-nbd':>10}"
    has_kit = any("nbdkit" in w["median"] for w in res["throughput"])
    if has_kit:
        hdr += f" {'nbdkit':>10}"
    hdr += f" {'ratio':>7} {'target':>8}  result"
    L.append(hdr)
    L.append("-" * len(hdr))
    for w in res["throughput"]:
        med = w["median"]
        cell = lambda k: f" {med[k]:>10.1f}" if k in med else f" {'-':>10}"  # noqa: E731
        row = f"{w['workload']:<{W}} {w['figure']:<6}" + cell("nbdserve") + cell("qemu-nbd")
        if has_kit:
            row += cell("nbdkit")
        L.append(row + ratio_cells(w["ratio"], w["target_ratio"], ">=", w["met"]))
    for w in res["throughput"]:
        by: dict[str, list[float]] = {}
        for r in w["runs"]:
            if "allocating_writes_pct" in r:
                by.setdefault(r["server"], []).append(r["allocating_writes_pct"])
        if by:
            L.append(f"{w['workload']}: share of writes that allocated a cluster: " + ", ".join(
                f"{k} {statistics.median(v):.0f}%" for k, v in by.items()))
    failed = [(w["workload"], r["server"]) for w in res["throughput"] for r in w["runs"] if "failed" in r]
    if failed:
        L.append("FAILED runs (see stderr): " + ", ".join(f"{n} {s}" for n, s in failed))
    if res["throughput"]:
        L.append("multi-connection rows: qemu-nbd -e 0; every other row: qemu-nbd's default (-e 1)")
        L.append("")
        L.append("server CPU seconds (utime+stime, /proc/PID/stat) per GiB moved, medians:")
        hdr = f"{'workload':<{W}} {'unit':<6} {'nbdserve':>10} {'qemu-nbd':>10} {'ratio':>7} {'target':>8}  result"
        L.append(hdr)
        L.append("-" * len(hdr))
        for w in res["throughput"]:
            med = w["cpu_s_per_gib"]
            cell = lambda k: f" {med[k]:>10.3f}" if k in med else f" {'-':>10}"  # noqa: E731
            L.append(f"{w['workload']:<{W}} {'s/GiB':<6}" + cell("nbdserve") + cell("qemu-nbd")
                     + ratio_cells(w["cpu_ratio"], w["cpu_target_ratio"], "<=", w["cpu_met"]))
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
    ck = res["check_1tib"]
    if not skipped(L, "check (1 TiB, metadata preallocated)", ck):
        L.append("check (1 TiB, metadata preallocated: 16 Mi L2 entries), best time / highest peak RSS "
                 "(time -f %M):")
        L.append(f"  {check_figures(ck)}")
        L.append(f"  time: {ck['ratio']:.2f}x qemu-img's, target <= {ck['target_ratio']:.1f}x: {mark(ck['time_met'])}; "
                 f"nbdserve peak RSS {ck['nbdserve']['peak_rss_mib']:.1f} MiB, target <= {ck['target_rss_mib']} MiB: "
                 f"{mark(ck['rss_met'])}")
    ck = res["check_4gib"]
    if not skipped(L, "check (4 GiB allocated)", ck):
        L.append(f"check (4 GiB allocated, no target): {check_figures(ck)} -> {ck['ratio']:.2f}x")
        L.append(f"  (`python -m nbdserve --help` alone takes {ck['nbdserve_help_s']:.2f} s; check minus that "
                 f"start-up: {ck['ratio_excluding_startup']:.1f}x qemu-img)")
    L.append(f"wall time: {m['wall_s']:.0f} s")
    return "\n".join(L)
