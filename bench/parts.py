"""The benchmark's parts: throughput with fio and nbdcopy (A/B alternating), memory, opening 1 TiB, check."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (CHAIN_DEPTH, CHECK_BIG_RSS_MIB, CHECK_BIG_TARGET_RATIO, CLUSTER, CPU_TARGET_RATIO,
                    OPEN_TARGET_S, REPO, RSS_TARGET_MIB, WORKLOADS, GiB, MiB, Workload, allocated_bytes,
                    log, make_allocated, make_chain, make_fresh, make_pattern_file, run)
from servers import NbdKit, NbdServe, QemuNbd, Server

TIME = "/usr/bin/time"   # GNU time (Debian: time): a command's own peak RSS

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


def nbdcopy(w: Workload, uri: str, source: Path | None, runtime: int, size: int = GiB) -> dict:
    """Copies with nbdcopy: export -> null: again and again for `runtime` seconds (w.rw
    "read"), or `source` -> export once (w.rw "write"); MiB/s over the copies' wall time."""
    cmd = ["nbdcopy", f"--connections={w.conns}", f"--request-size={parse_size(w.bs)}",
           f"--requests={w.iodepth}"]
    cmd += [uri, "null:"] if w.rw == "read" else [str(source), uri]
    copies, seconds = 0, 0.0
    while copies == 0 or (w.rw == "read" and seconds < runtime):
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime + 120)
        seconds += time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(f"nbdcopy failed ({p.returncode}): {p.stderr.strip()[-400:]}")
        copies += 1
    moved = copies * size
    return {"MiB/s": moved / seconds / MiB, "IOPS": moved / parse_size(w.bs) / seconds,
            "bytes": moved, "seconds": seconds, "copies": copies}


def parse_size(text: str) -> int:
    return int(text[:-1]) * {"k": 1024, "m": MiB}[text[-1]]


GROUP_ALIASES = {"single": ("single", "cpu"), "nbdcopy": ("nbdcopy", "multi")}


def wanted(args, part: str, group: str | None = None) -> bool:
    """--only takes a part's name start, or a row group: single (alias cpu), multi (4 and 16
    connections with fio, and nbdcopy's rows), nbdcopy, tls, chain."""
    groups = GROUP_ALIASES.get(group, (group,))
    return not args.only or any(part.startswith(o) or o in groups for o in args.only)


class Images:
    """The images and files of the throughput rows, each made on first use."""

    def __init__(self, tmp: Path, alloc: Path):
        self.tmp, self.alloc = tmp, alloc
        self._chain = self._source = self._pki = None

    def for_run(self, w: Workload) -> Path:
        """The image one run serves; fresh and inplace images are made anew for every run."""
        if w.image in ("alloc", "alloc-rw"):
            return self.alloc
        if w.image == "chain":
            if self._chain is None:
                log(f"creating a {CHAIN_DEPTH}-deep qcow2 chain (1 GiB, layer i holds clusters i mod {CHAIN_DEPTH})")
                self._chain = self.tmp / "chain" / "top.qcow2"
                self._chain.parent.mkdir()
                make_chain(self._chain)
            return self._chain
        image = self.tmp / f"{w.image}.qcow2"
        if w.image == "fresh":
            make_fresh(image)
        else:   # inplace: a plain copy of the allocated image, every cluster already there
            image.unlink(missing_ok=True)
            shutil.copyfile(self.alloc, image)
        os.sync()   # the copy's writeback and the old image's release happen before the run, not in it
        return image

    def source(self) -> Path:
        """A 1 GiB raw file of data for nbdcopy file -> export."""
        if self._source is None:
            self._source = self.tmp / "source.raw"
            make_pattern_file(self._source)
        return self._source

    def pki(self):
        """A throwaway CA, server and client certificates (tests/tlscerts.py)."""
        if self._pki is None:
            sys.path.insert(0, str(REPO / "tests"))
            from tlscerts import make_pki
            (self.tmp / "pki").mkdir()
            self._pki = make_pki(self.tmp / "pki")
        return self._pki


def one_run(w: Workload, cls: type[Server], image: Path, images: Images, args, tmp: Path) -> dict:
    """Start a server for `w`, drive it, stop it; the figures and the server's CPU seconds."""
    pki = images.pki() if w.tls else None
    with cls(image, read_only=not w.writable, shared=w.qemu_shared, tls_dir=pki and pki.server) as s:
        cpu0 = s.cpu_seconds()
        if w.client == "nbdcopy":
            uri = s.uri + (f"?tls-certificates={pki.client}" if pki else "")
            r = nbdcopy(w, uri, images.source() if w.rw == "write" else None, args.runtime)
        else:
            # A fresh image is not written time based: fio stops after 1 GiB (one pass, each
            # block written once -- the random map makes randwrite touch each block at most
            # once) or at the runtime, whichever comes first.
            r = fio(s.uri, w.rw, w.bs, w.iodepth, args.runtime, tmp, numjobs=w.conns,
                    time_based=w.image != "fresh")
        r["cpu_s"] = s.cpu_seconds() - cpu0
    r["cpu_s_per_gib"] = r["cpu_s"] / (r["bytes"] / GiB) if r["bytes"] else None
    return r


def throughput(args, tmp: Path, alloc: Path, servers: list[type[Server]],
               nbdkit_ok: bool) -> list[dict]:
    results = []
    images = Images(tmp, alloc)
    for w in WORKLOADS:
        if not wanted(args, w.name, w.group):
            continue
        per: dict[str, list[float]] = {}
        cpu: dict[str, list[float]] = {}
        runs: list[dict] = []
        order = [s for s in servers if s is not NbdKit or (w.image == "alloc" and w.group == "single" and nbdkit_ok)]
        if w.client == "nbdcopy" and w.rw == "write":
            images.source()   # made (and synced) before the first timed run, not during it
        repeat = max(args.repeat, w.min_repeat)
        for rep in range(repeat):
            for cls in order:
                try:
                    image = images.for_run(w)
                    r = one_run(w, cls, image, images, args, tmp)
                except Exception as e:  # noqa: BLE001 - record it, keep benchmarking the rest
                    log(f"{w.name:<34} run {rep + 1}/{repeat} {cls.name:<9} FAILED: {e}")
                    runs.append({"server": cls.name, "repeat": rep + 1, "failed": str(e)[:500]})
                    continue
                finally:
                    if w.writable:
                        os.sync()   # the next run starts without this one's dirty pages to write back
                extra = ""
                if w.image == "fresh":
                    # How many of the writes allocated a cluster (the rest overwrote one
                    # allocated earlier in the same run): a faster server overwrites more.
                    alloc_bytes = allocated_bytes(image)
                    r["allocated_mib"] = alloc_bytes / MiB
                    if w.bs == "4k":
                        r["allocating_writes_pct"] = 100 * (alloc_bytes // CLUSTER) / max(1, r["bytes"] // 4096)
                        extra = f", {r['allocating_writes_pct']:.0f}% of writes allocated"
                log(f"{w.name:<34} run {rep + 1}/{repeat} {cls.name:<9} "
                    f"{r['MiB/s']:8.1f} MiB/s {r['IOPS']:9.0f} IOPS ({r['seconds']:.1f} s, "
                    f"server CPU {r['cpu_s']:.2f} s{extra})")
                per.setdefault(cls.name, []).append(r[w.figure])
                if r["cpu_s_per_gib"] is not None:
                    cpu.setdefault(cls.name, []).append(r["cpu_s_per_gib"])
                runs.append({"server": cls.name, "repeat": rep + 1, **r})
        med = {k: statistics.median(v) for k, v in per.items()}
        cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
        ratio = med["nbdserve"] / med["qemu-nbd"] if med.get("qemu-nbd") and "nbdserve" in med else None
        cpu_ratio = (cpu_med["nbdserve"] / cpu_med["qemu-nbd"]
                     if cpu_med.get("qemu-nbd") and "nbdserve" in cpu_med else None)
        results.append({
            "workload": w.name, "group": w.group, "figure": w.figure, "target_ratio": w.target,
            "qemu_nbd_shared": w.qemu_shared,
            "median": med, "ratio": ratio,
            "met": None if w.target is None else ratio is not None and ratio >= w.target,
            "cpu_s_per_gib": cpu_med, "cpu_ratio": cpu_ratio, "cpu_target_ratio": CPU_TARGET_RATIO,
            "cpu_met": cpu_ratio is not None and cpu_ratio <= CPU_TARGET_RATIO,
            "runs": runs,
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


def checked(cmd: list[str]) -> dict:
    """Run a check command: wall seconds, rc, and the peak RSS of just that command, as GNU
    time(1) reports it (%M).  Not os.wait4's ru_maxrss of our own child: Linux carries a
    forked child's high-water mark through exec, so that figure is at least this Python
    process's RSS at the fork."""
    with tempfile.TemporaryFile("w+") as out, tempfile.NamedTemporaryFile("r") as rss:
        t0 = time.perf_counter()
        p = subprocess.run([TIME, "-q", "-o", rss.name, "-f", "%M", *cmd], stdout=out,
                           stderr=subprocess.STDOUT, cwd=REPO)
        seconds = time.perf_counter() - t0
        out.seek(0)
        tail = out.read().strip()[-300:]
        peak_kib = int(rss.read().split()[-1])
    return {"seconds": seconds, "rc": p.returncode, "peak_rss_mib": peak_kib / 1024,
            "output_tail": tail}


def check_both(img: Path, runs: int, label: str) -> dict:
    """nbdserve check and qemu-img check alternating, `runs` each: the best time, the
    highest peak RSS, the last rc."""
    cmds = {"nbdserve": [str(REPO / ".venv/bin/python"), "-m", "nbdserve", "check", str(img)],
            "qemu-img": ["qemu-img", "check", "-f", "qcow2", str(img)]}
    res: dict = {name: [] for name in cmds}
    for _ in range(runs):
        for name, cmd in cmds.items():
            r = checked(cmd)
            log(f"check {label} {name}: {r['seconds']:.3f} s, peak RSS {r['peak_rss_mib']:.1f} MiB, rc {r['rc']}")
            res[name].append(r)
    for name, rs in res.items():
        res[name] = {"seconds": min(r["seconds"] for r in rs), "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
                     "rc": rs[-1]["rc"], "output_tail": rs[-1]["output_tail"], "runs": rs}
    res["ratio"] = res["nbdserve"]["seconds"] / res["qemu-img"]["seconds"]
    return res


def check_big(args, tmp: Path) -> dict:
    """check on a 1 TiB qcow2 whose metadata is all preallocated (16 Mi L2 entries)."""
    img = tmp / "check1t.qcow2"
    log("creating 1 TiB metadata-preallocated image for check")
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", str(img), "1T"])
    res = check_both(img, args.repeat, "1 TiB")
    img.unlink()
    n = res["nbdserve"]
    res.update(target_ratio=CHECK_BIG_TARGET_RATIO, target_rss_mib=CHECK_BIG_RSS_MIB,
               time_met=res["ratio"] <= CHECK_BIG_TARGET_RATIO and n["rc"] == 0,
               rss_met=n["peak_rss_mib"] <= CHECK_BIG_RSS_MIB and n["rc"] == 0)
    return res


def check_small(args, tmp: Path) -> dict:
    """check on a fully allocated 4 GiB qcow2, no target: Python's start-up bounds it (issue 19)."""
    if args.quick:
        return {"skipped": "--quick"}
    img = tmp / "check4g.qcow2"
    log("creating 4 GiB fully allocated image for check")
    make_allocated(img, 4 * GiB)
    res = check_both(img, 2, "4 GiB")
    img.unlink()
    # Baseline: `python -m nbdserve --help`, i.e. interpreter start-up and imports.
    res["nbdserve_help_s"] = min(checked([str(REPO / ".venv/bin/python"), "-m", "nbdserve", "--help"])["seconds"]
                                 for _ in range(2))
    res["ratio_excluding_startup"] = (max(0.0, res["nbdserve"]["seconds"] - res["nbdserve_help_s"])
                                      / res["qemu-img"]["seconds"])
    return res
