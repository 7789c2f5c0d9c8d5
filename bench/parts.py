"""The benchmark's parts: fio throughput (A/B alternating), memory, opening 1 TiB, check."""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from pathlib import Path

from common import (CHECK_TARGET_RATIO, OPEN_TARGET_S, REPO, RSS_TARGET_MIB, WORKLOADS, GiB, MiB,
                    allocated_bytes, log, make_allocated, make_fresh, run)
from servers import NbdKit, NbdServe, QemuNbd, Server

def fio(uri: str, rw: str, bs: str, iodepth: int, runtime: int, workdir: Path,
        numjobs: int = 1, time_based: bool = True) -> dict:
    out = workdir / "fio.json"
    out.unlink(missing_ok=True)
    cmd = ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}",
           f"--bs={bs}", f"--iodepth={iodepth}", "--size=1g", f"--runtime={runtime}",
           f"--numjobs={numjobs}", "--group_reporting",
           "--output-format=json", f"--output={out}"]
    if time_based:
        cmd.append("--time_based")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime + 60)
    if p.returncode != 0:
        raise RuntimeError(f"fio failed ({p.returncode}): {p.stderr.strip()[-400:]}")
    text = out.read_text()
    data = json.loads(text[text.index("{"):])
    job = data["jobs"][0]
    side = job["read"] if rw.endswith("read") else job["write"]
    return {
        "MiB/s": side["bw_bytes"] / MiB,
        "IOPS": side["iops"],
        "bytes": side["io_bytes"],
        "seconds": job["job_runtime"] / 1000,
        "errors": job.get("error", 0),
    }


def wanted(args, part: str) -> bool:
    return not args.only or any(part.startswith(o) for o in args.only)


def throughput(args, tmp: Path, alloc: Path, servers: list[type[Server]],
               nbdkit_ok: bool) -> list[dict]:
    results = []
    for wname, rw, bs, qd, kind, figure, target in WORKLOADS:
        if not wanted(args, wname):
            continue
        per: dict[str, list[float]] = {}
        runs: list[dict] = []
        order = [s for s in servers if s is not NbdKit or (kind == "alloc" and nbdkit_ok)]
        for rep in range(args.repeat):
            for cls in order:
                if kind.startswith("alloc"):
                    image = alloc
                    time_based = True
                else:
                    # A fresh image per run, so every write allocates. Not time based:
                    # fio stops after 1 GiB (one pass, each block written once -- the
                    # random map makes randwrite touch each block at most once) or at
                    # the runtime, whichever comes first.
                    image = tmp / "fresh.qcow2"
                    make_fresh(image)
                    time_based = False
                try:
                    with cls(image, read_only=(kind == "alloc")) as s:
                        r = fio(s.uri, rw, bs, qd, args.runtime, tmp, time_based=time_based)
                except Exception as e:  # noqa: BLE001 - record it, keep benchmarking the rest
                    log(f"{wname:<20} run {rep + 1}/{args.repeat} {cls.name:<9} FAILED: {e}")
                    runs.append({"server": cls.name, "repeat": rep + 1, "failed": str(e)[:500]})
                    continue
                extra = ""
                if kind == "fresh":
                    # How many of the writes allocated a cluster (the rest overwrote one
                    # allocated earlier in the same run): a faster server overwrites more.
                    alloc_bytes = allocated_bytes(image)
                    r["allocated_mib"] = alloc_bytes / MiB
                    if bs == "4k":   # qemu-img create's default cluster size is 64 KiB
                        clusters = alloc_bytes // (64 * 1024)
                        r["allocating_writes_pct"] = 100 * clusters / max(1, r["bytes"] // 4096)
                        extra = f", {r['allocating_writes_pct']:.0f}% of writes allocated"
                log(f"{wname:<20} run {rep + 1}/{args.repeat} {cls.name:<9} "
                    f"{r['MiB/s']:8.1f} MiB/s {r['IOPS']:9.0f} IOPS ({r['seconds']:.1f} s{extra})")
                per.setdefault(cls.name, []).append(r[figure])
                runs.append({"server": cls.name, "repeat": rep + 1, **r})
        med = {k: statistics.median(v) for k, v in per.items()}
        ratio = med["nbdserve"] / med["qemu-nbd"] if med.get("qemu-nbd") and "nbdserve" in med else None
        results.append({
            "workload": wname, "figure": figure, "target_ratio": target,
            "median": med, "ratio": ratio,
            "met": None if target is None else ratio is not None and ratio >= target, "runs": runs,
        })
    return results


def memory(args, alloc: Path, tmp: Path) -> dict:
    rt = max(3, min(args.runtime, 5))
    with NbdServe(alloc, read_only=True) as s:
        before = s.status()
        r = fio(s.uri, "randread", "4k", 16, rt, tmp, numjobs=16)
        after = s.status()
    hwm = after["VmHWM"] / 1024
    log(f"16 jobs x QD16: {r['IOPS']:.0f} IOPS, nbdserve VmHWM {hwm:.1f} MiB")
    return {
        "jobs": 16, "iodepth": 16, "runtime_s": rt, "IOPS": r["IOPS"],
        "rss_idle_mib": before["VmRSS"] / 1024, "peak_rss_mib": hwm,
        "target_mib": RSS_TARGET_MIB, "met": hwm <= RSS_TARGET_MIB,
    }


def open_big(tmp: Path) -> dict:
    big = tmp / "big.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(big), "1T"])
    out: dict = {"image": "1 TiB sparse qcow2"}
    for cls in (NbdServe, QemuNbd):
        s = cls(big)
        t0 = time.perf_counter()
        s.start()
        try:
            t_listen = time.perf_counter()
            run(["qemu-io", "-f", "raw", s.uri, "-c", "read -P 0 0 4k"], timeout=30)
            t_read = time.perf_counter()
            st = s.status() if isinstance(s, NbdServe) else {}
        finally:
            s.stop()
        out[cls.name] = {
            "start_to_listen_s": t_listen - t0,
            "listen_to_first_read_s": t_read - t_listen,
            "start_to_first_read_s": t_read - t0,
        }
        if st:
            out[cls.name].update(rss_after_mib=st["VmRSS"] / 1024,
                                 hwm_after_mib=st["VmHWM"] / 1024)
        log(f"1 TiB open {cls.name}: first read {t_read - t0:.3f} s after start")
    # Baseline: the interpreter start-up and imports alone (no image, no socket).
    t0 = time.perf_counter()
    run([str(REPO / ".venv/bin/nbdserve"), "--help"])
    out["nbdserve_help_s"] = time.perf_counter() - t0
    n = out["nbdserve"]
    out["target_s"] = OPEN_TARGET_S
    out["met"] = n["start_to_first_read_s"] < OPEN_TARGET_S
    out["met_excluding_startup"] = n["listen_to_first_read_s"] < OPEN_TARGET_S
    return out


def check(args, tmp: Path) -> dict:
    if args.quick:
        return {"skipped": "--quick"}
    img = tmp / "check4g.qcow2"
    log("creating 4 GiB fully allocated image for check")
    make_allocated(img, 4 * GiB)
    res = {}
    for name, cmd in (
        ("qemu-img", ["qemu-img", "check", "-f", "qcow2", str(img)]),
        ("nbdserve", [str(REPO / ".venv/bin/python"), "-m", "nbdserve", "check", str(img)]),
    ):
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            times.append(time.perf_counter() - t0)
        res[name] = {"seconds": min(times), "rc": p.returncode,
                     "output_tail": (p.stdout + p.stderr).strip()[-300:]}
        log(f"check {name}: {min(times):.3f} s rc={p.returncode}")
    img.unlink()
    # Baseline: `python -m nbdserve --help`, i.e. interpreter start-up and imports.
    base = []
    for _ in range(2):
        t0 = time.perf_counter()
        run([str(REPO / ".venv/bin/python"), "-m", "nbdserve", "--help"], cwd=REPO)
        base.append(time.perf_counter() - t0)
    res["nbdserve_help_s"] = min(base)
    ratio = res["nbdserve"]["seconds"] / res["qemu-img"]["seconds"]
    res["ratio_excluding_startup"] = (max(0.0, res["nbdserve"]["seconds"] - min(base))
                                      / res["qemu-img"]["seconds"])
    res.update(ratio=ratio, target_ratio=CHECK_TARGET_RATIO,
               met=ratio <= CHECK_TARGET_RATIO and res["nbdserve"]["rc"] == 0)
    return res
