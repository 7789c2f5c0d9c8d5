#!/usr/bin/env python3
"""Side-by-side benchmark: nbdserve vs qemu-nbd (and nbdkit when it can read qcow2).

Run by hand (never by CI or pytest):

    .venv/bin/python bench/run.py [--repeat N] [--runtime S] [--quick] [--json FILE]

See bench/README.md for what it measures and prints.  It needs qemu-img, qemu-io,
qemu-nbd, fio (with its nbd engine) and nbdinfo; nbdkit is optional.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXPORT = "bench"
GiB = 1 << 30
MiB = 1 << 20

# Issue 6 targets: minimum ratio nbdserve / qemu-nbd.
WORKLOADS = [
    # name, fio rw, bs, iodepth, image kind, figure, target ratio
    ("seq read 1M QD8", "read", "1m", 8, "alloc", "MiB/s", 1.0),
    # the same reads from a writable export (no target): nbdserve sends a read-only layer's
    # data with sendfile(2), a writable layer's is read into memory first
    ("seq read 1M QD8 rw", "read", "1m", 8, "alloc-rw", "MiB/s", None),
    ("rand read 4K QD16", "randread", "4k", 16, "alloc", "IOPS", 0.6),
    ("seq write 1M QD8", "write", "1m", 8, "fresh", "MiB/s", 0.8),
    ("rand write 4K QD16", "randwrite", "4k", 16, "fresh", "IOPS", 0.5),
]
RSS_TARGET_MIB = 64
OPEN_TARGET_S = 0.5
CHECK_TARGET_RATIO = 3.0


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- images

def make_allocated(path: Path, size: int) -> None:
    """A qcow2 of `size` bytes with every cluster allocated (pattern 0x5a)."""
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)])
    chunk = 256 * MiB
    cmds: list[str] = []
    for off in range(0, size, chunk):
        cmds += ["-c", f"write -q -P 0x5a {off} {min(chunk, size - off)}"]
    run(["qemu-io", "-f", "qcow2", *cmds, str(path)])


def allocated_bytes(path: Path) -> int:
    """Guest bytes backed by data clusters in a qcow2 (qemu-img map)."""
    m = json.loads(run(["qemu-img", "map", "-f", "qcow2", "--output=json", str(path)]).stdout)
    return sum(e["length"] for e in m if e.get("data"))


def make_fresh(path: Path, size: int = GiB) -> None:
    path.unlink(missing_ok=True)
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)])


# ---------------------------------------------------------------- servers

class Server:
    """One server process serving one image on 127.0.0.1:port/EXPORT."""

    name = "?"

    def __init__(self, image: Path, read_only: bool = False):
        self.image = image
        self.read_only = read_only
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0
        self.ready_at = 0.0

    @property
    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/{EXPORT}"

    def argv(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> "Server":
        self.started_at = time.perf_counter()
        self.proc = subprocess.Popen(
            self.argv(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.wait_ready()
        self.ready_at = time.perf_counter()
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        # Poll with a plain TCP connect (a negotiation-less connection is harmless).
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.proc.stderr.read()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"{self.name} did not listen within {timeout}s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class NbdServe(Server):
    name = "nbdserve"

    def argv(self):
        a = [str(REPO / ".venv/bin/nbdserve"), "serve", "-f", "qcow2", "-x", EXPORT,
             "-p", str(self.port), "-b", "127.0.0.1"]
        if self.read_only:
            a.append("-r")
        return a + [str(self.image)]

    def wait_ready(self, timeout: float = 20.0) -> None:
        # nbdserve prints "nbdserve: serving nbd://..." once it listens.
        line = self.proc.stdout.readline()
        if "serving" not in line:
            self.proc.wait(timeout=5)
            raise RuntimeError(f"nbdserve did not start: {line!r} {self.proc.stderr.read()}")

    def status(self) -> dict[str, int]:
        """VmHWM / VmRSS of the server process in KiB."""
        out = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, val = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(val.split()[0])
        return out


class QemuNbd(Server):
    name = "qemu-nbd"

    def argv(self):
        a = ["qemu-nbd", "-f", "qcow2", "-x", EXPORT, "-p", str(self.port),
             "-b", "127.0.0.1", "-t"]
        if self.read_only:
            a.append("-r")
        return a + [str(self.image)]


class NbdKit(Server):
    name = "nbdkit"

    def argv(self):
        return ["nbdkit", "-f", "-r", "-i", "127.0.0.1", "-p", str(self.port),
                "-e", EXPORT, "--filter=qcow2dec", "file", str(self.image)]


def nbdkit_note(image: Path) -> str | None:
    """None if nbdkit can serve this qcow2 (qcow2dec filter), else why not."""
    if not shutil.which("nbdkit"):
        return "nbdkit not installed"
    try:
        with NbdKit(image, read_only=True) as s:
            run(["qemu-io", "-f", "raw", s.uri, "-c", "read -P 0x5a 0 64k"], timeout=20)
    except Exception as e:  # noqa: BLE001 - any failure means "skip nbdkit"
        ver = subprocess.run(["nbdkit", "--version"], capture_output=True, text=True).stdout.strip()
        if "cannot open filter" in str(e):
            return f"{ver} has no qcow2dec filter, so it cannot serve qcow2 here"
        return f"{ver} --filter=qcow2dec failed: {str(e).strip()[:200]}"
    return None


# ---------------------------------------------------------------- fio

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


# ---------------------------------------------------------------- sections

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


def has_check() -> bool:
    p = subprocess.run([str(REPO / ".venv/bin/python"), "-m", "nbdserve", "--help"],
                       capture_output=True, text=True, cwd=REPO)
    return any(line.split()[:1] == ["check"] for line in p.stdout.splitlines())


def check(args, tmp: Path) -> dict:
    if args.quick:
        return {"skipped": "--quick"}
    if not has_check():
        return {"skipped": "`python -m nbdserve check` does not exist (yet)"}
    img = tmp / "check4g.qcow2"
    log("creating 4 GiB fully allocated image for check")
    make_allocated(img, 4 * GiB)
    res = {}
    for name, cmd in (
        ("qemu-img", ["qemu-img", "check", "-f", "qcow2", str(img)]),
        ("nbdserve", [str(REPO / ".venv/bin/python"), "-m", "nbdserve", "check", str(img)]),
    ):
        times = []
        for _ in range(1 if args.quick else 2):
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


# ---------------------------------------------------------------- report

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
        L.append(f"1 TiB sparse qcow2, process start -> first 4K read returned (qemu-io over NBD):")
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


def code_state() -> str:
    """The nbdserve code being measured: HEAD plus any uncommitted change under nbdserve/."""
    try:
        head = run(["git", "-C", str(REPO), "log", "-1", "--format=%h %cI"]).stdout.strip()
        dirty = run(["git", "-C", str(REPO), "status", "--porcelain", "--", "nbdserve"]).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    dirty = [line[3:] for line in dirty if line.strip()]
    return head + (f" + uncommitted changes in {', '.join(dirty)}" if dirty else " (clean nbdserve/)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=2, help="A/B runs per server and workload (default 2)")
    ap.add_argument("--runtime", type=int, default=6, help="seconds per fio run (default 6)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 repeat, 3 s runs, no 4 GiB check")
    ap.add_argument("--json", metavar="FILE", help="also write all figures to FILE")
    ap.add_argument("--tmpdir", metavar="DIR", help="where to create images (default: system temp dir)")
    ap.add_argument("--only", metavar="PART", action="append", default=[],
                    help="run only this part (repeatable): a workload name's start such as "
                         "'seq read' or 'rand write', or 'memory', 'open', 'check'")
    args = ap.parse_args()
    if args.quick:
        args.repeat, args.runtime = 1, 3

    for tool in ("qemu-img", "qemu-io", "qemu-nbd", "fio"):
        if not shutil.which(tool):
            sys.exit(f"bench: {tool} is required")

    t_start = time.perf_counter()
    code_before = code_state()
    log(f"{args.repeat} repeat(s), {args.runtime} s per fio run")
    with tempfile.TemporaryDirectory(prefix="nbdserve-bench-", dir=args.tmpdir) as d:
        tmp = Path(d)
        fstype = subprocess.run(["stat", "-f", "-c", "%T", d], capture_output=True, text=True).stdout.strip()
        log(f"creating 1 GiB allocated qcow2 in {tmp}")
        alloc = tmp / "alloc.qcow2"
        make_allocated(alloc, GiB)
        note = nbdkit_note(alloc)
        if note:
            log(f"nbdkit skipped: {note}")
        res: dict = {"nbdkit_note": note}
        res["throughput"] = throughput(args, tmp, alloc, [NbdServe, QemuNbd, NbdKit], note is None)
        res["memory"] = memory(args, alloc, tmp) if wanted(args, "memory") else {"skipped": "--only"}
        res["open_1tib"] = open_big(tmp) if wanted(args, "open") else {"skipped": "--only"}
        res["check"] = check(args, tmp) if wanted(args, "check") else {"skipped": "--only"}
        log("removing images")

    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    res["meta"] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{os.cpu_count()} CPUs ({cpu}), {mem_kib / 1024 / 1024:.0f} GiB RAM, "
                   f"Linux {platform.release()}, Python {platform.python_version()}",
        "command": " ".join(["bench/run.py", *sys.argv[1:]]),
        "fio": run(["fio", "--version"]).stdout.strip(),
        "qemu": run(["qemu-nbd", "--version"]).stdout.splitlines()[0].strip(),
        "code": code_before if code_state().split()[0] == code_before.split()[0]
        else f"HEAD CHANGED DURING THE RUN: {code_before} -> {code_state()}",
        "runtime": args.runtime, "repeat": args.repeat, "tmpfs": fstype,
        "wall_s": time.perf_counter() - t_start,
    }
    text = report(res)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
