#!/usr/bin/env python3
"""Side-by-side benchmark: nbdserve vs qemu-nbd (and nbdkit when it can read qcow2), issue 19's rows.

Run by hand (never by CI or pytest):

    .venv/bin/python bench/run.py [--repeat N] [--runtime S] [--quick] [--json FILE]

See bench/README.md for what it measures and prints.  It needs qemu-img, qemu-io,
qemu-nbd, fio (with its nbd engine), nbdcopy, nbdinfo and openssl; nbdkit is optional.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, GiB, log, make_allocated, run
from parts import check_big, check_small, memory, open_big, throughput, wanted
from report import report
from servers import NbdKit, NbdServe, QemuNbd, nbdkit_note

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
                    help="run only this part (repeatable): a row's name start such as "
                         "'seq read', '4 conn' or 'check 1T'; a group: single, multi, nbdcopy, tls, "
                         "chain, cpu (= single); or 'memory', 'open', 'check'")
    args = ap.parse_args()
    if args.quick:
        args.repeat, args.runtime = 1, 3

    for tool in ("qemu-img", "qemu-io", "qemu-nbd", "fio", "nbdcopy", "openssl"):
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
        res["check_1tib"] = check_big(args, tmp) if wanted(args, "check 1T") else {"skipped": "--only"}
        res["check_4gib"] = check_small(args, tmp) if wanted(args, "check 4G") else {"skipped": "--only"}
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
