#!/usr/bin/env python3
"""Differential comparison of the qemu-1.1.2 modes with real qemu 1.1.2 (run by hand).

For each random sequential qemu-io script: an image made by qemu-img 1.1.2 (empty, over a
qcow2 backing file, or holding compressed clusters from ``convert -c``) is copied twice; qemu-io 1.1.2 runs the script on one copy
as a file, the installed qemu-io runs it over NBD against ``nbdserve serve --allocator
MODE`` on the other; then the guest bytes (``qemu-img convert``) and the guest-to-host
map (``qemu-img map --output=json``, offsets included) of the two must be equal, and
neither qemu-io may report a failed command.

qemu 1.1.2 is not part of this project: build ``qemu-img`` and ``qemu-io`` from the
qemu-kvm-1.1.2 tag yourself (issue 12 says how) and pass their folder, e.g.

    .venv/bin/python bench/compare_qemu112.py --qemu112 /path/to/qemu-kvm-1.1.2 \\
        --allocator qemu-1.1.2 --scripts 100 --seed 1

(``--qemu112 DIR/b7ab0fea --allocator qemu-1.1.2+b7ab0fea`` for the fixed twin).  Prints
one line per mismatch and a summary by shape; exit status 1 when any script differed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections import Counter

K = 1024
M = 1024 * K
DISK = 64 * M
CLUSTER_SIZES = (512, 4 * K, 64 * K, 2 * M)


def run(*argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_script(rnd: random.Random, cluster_size: int, n: int) -> list[str]:
    """Sequential writes, partial and whole clusters, discards and zero writes, packed into a
    few MiB so that clusters are kept, freed and allocated next to each other."""
    span = min(DISK, max(64 * cluster_size, 4 * M))
    sector = 512
    cmds = []
    for _ in range(n):
        k = rnd.random()
        unit = rnd.choice((sector, cluster_size, cluster_size // 2 or sector, 4 * K))
        unit = max(sector, unit - unit % sector)
        off = rnd.randrange(0, span // unit) * unit
        length = unit * rnd.randint(1, 12)
        if rnd.random() < 0.3:
            off += rnd.randrange(0, 8) * sector
        length = min(length, DISK - off)
        if length <= 0:
            continue
        if k < 0.72:
            cmds.append(f"write -P {rnd.randrange(1, 256):#x} {off} {length}")
        elif k < 0.9:
            cmds.append(f"discard {off} {length}")
        else:
            cmds.append(f"write -z {off} {length}")
    return cmds


def qemu_io_args(cmds: list[str]) -> list[str]:
    out = []
    for c in cmds:
        out += ["-c", c]
    return out


def guest_md5(qemu_img: str, path: str, tmp: str) -> str:
    raw = os.path.join(tmp, "guest.raw")
    run(qemu_img, "convert", "-O", "raw", path, raw)
    with open(raw, "rb") as f:
        digest = hashlib.md5(f.read()).hexdigest()
    os.unlink(raw)
    return digest


def host_map(qemu_img: str, path: str) -> list[dict]:
    return json.loads(run(qemu_img, "map", "--output=json", path).stdout)


def serve_and_run(nbdserve: list[str], image: str, allocator: str, cmds: list[str], qemu_io: str) -> str:
    port = free_port()
    srv = subprocess.Popen([*nbdserve, "serve", image, "-f", "qcow2", "-x", "d", "-p", str(port),
                            "--allocator", allocator], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    try:
        line = srv.stdout.readline()
        if "serving" not in line:
            raise RuntimeError(f"nbdserve did not start: {line!r} {srv.stderr.read()}")
        out = subprocess.run([qemu_io, "-f", "raw", f"nbd://127.0.0.1:{port}/d", *qemu_io_args(cmds)],
                             capture_output=True, text=True, timeout=120)
        return out.stdout + out.stderr
    finally:
        srv.send_signal(signal.SIGTERM)
        srv.wait(timeout=30)


def compare_one(args, rnd: random.Random, tmp: str, index: int) -> tuple[str, list[str], bool]:
    cs = rnd.choice(CLUSTER_SIZES)
    compat = rnd.choice(("0.10", "1.1"))
    start = rnd.choice(("empty", "backing", "compressed"))
    backing = start == "backing"
    shape = f"cluster={cs} compat={compat} start={start}"
    q112_img, q112_io = os.path.join(args.qemu112, "qemu-img"), os.path.join(args.qemu112, "qemu-io")
    d = os.path.join(tmp, str(index))
    os.makedirs(d)
    opts = f"cluster_size={cs},compat={compat}"
    create = [q112_img, "create", "-f", "qcow2", "-o", opts]
    if backing:
        base = os.path.join(d, "base.qcow2")
        run(*create, base, str(DISK))
        fill = [f"write -P {rnd.randrange(1, 256):#x} {o * M} {M}" for o in range(0, 4) if rnd.random() < 0.7]
        if fill:
            run(q112_io, *qemu_io_args(fill), base)
        run(*create[:-2], "-o", f"{opts},backing_file=base.qcow2", os.path.join(d, "img.qcow2"), cwd=d)
    elif start == "compressed":   # qemu-img 1.1.2 convert -c of a patterned raw disk
        raw = os.path.join(d, "src.raw")
        with open(raw, "wb") as f:
            f.truncate(DISK)
        fill = [f"write -P {rnd.randrange(1, 256):#x} {o * 256 * K} {256 * K}" for o in range(0, 16)
                if rnd.random() < 0.6]
        if fill:
            run(q112_io, *qemu_io_args(fill), raw)
        run(q112_img, "convert", "-c", "-O", "qcow2", "-o", opts, raw, os.path.join(d, "img.qcow2"))
        os.unlink(raw)
    else:
        run(*create, os.path.join(d, "img.qcow2"), str(DISK))
    a, b = os.path.join(d, "a.qcow2"), os.path.join(d, "b.qcow2")
    shutil.copy(os.path.join(d, "img.qcow2"), a)
    shutil.copy(os.path.join(d, "img.qcow2"), b)
    cmds = random_script(rnd, cs, rnd.randint(4, args.max_commands))
    done_a = subprocess.run([q112_io, *qemu_io_args(cmds), a], capture_output=True, text=True, check=True)
    out_b = serve_and_run(args.nbdserve, b, args.allocator, cmds, args.qemu_io)
    # a command that failed on both sides would leave equal images: every command must succeed
    failures = [f"{side}: {line}" for side, out in (("1.1.2", done_a.stdout + done_a.stderr), ("nbdserve", out_b))
                for line in out.splitlines() if "failed" in line]
    same_bytes = guest_md5(args.qemu_img, a, d) == guest_md5(args.qemu_img, b, d)
    map_a, map_b = host_map(args.qemu_img, a), host_map(args.qemu_img, b)
    same_map = map_a == map_b
    check = subprocess.run([args.qemu_img, "check", b], capture_output=True, text=True)
    check_a = subprocess.run([args.qemu_img, "check", a], capture_output=True, text=True)
    ok = same_bytes and same_map and check.returncode == check_a.returncode and not failures
    if not ok:
        print(f"MISMATCH #{index} {shape}: bytes {'same' if same_bytes else 'DIFFER'}, "
              f"map {'same' if same_map else 'DIFFERS'}, qemu-img check 1.1.2 copy {check_a.returncode} "
              f"nbdserve copy {check.returncode}", flush=True)
        print("   script: " + "; ".join(cmds), flush=True)
        for line in failures[:4]:
            print(f"   qemu-io {line}", flush=True)
        if not same_map:
            diff = [(x, y) for x, y in zip(map_a, map_b) if x != y][:3]
            print(f"   first map differences (1.1.2, nbdserve): {diff}", flush=True)
        if args.keep:
            print(f"   kept in {d}", flush=True)
    if ok or not args.keep:
        shutil.rmtree(d)
    return shape, cmds, ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--qemu112", required=True, help="folder holding qemu 1.1.2's qemu-img and qemu-io")
    ap.add_argument("--allocator", default="qemu-1.1.2")
    ap.add_argument("--scripts", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-commands", type=int, default=24)
    ap.add_argument("--qemu-io", default="qemu-io", help="the client over NBD (default: the installed one)")
    ap.add_argument("--qemu-img", default="qemu-img", help="reads both results (default: the installed one)")
    ap.add_argument("--nbdserve", default=f"{sys.executable} -m nbdserve")
    ap.add_argument("--keep", action="store_true", help="keep the images of mismatching scripts")
    args = ap.parse_args()
    args.nbdserve = args.nbdserve.split()
    rnd = random.Random(args.seed)
    tmp = tempfile.mkdtemp(prefix="compare-qemu112-")
    total, bad = Counter(), Counter()
    for i in range(args.scripts):
        shape, _, ok = compare_one(args, rnd, tmp, i)
        total[shape] += 1
        bad[shape] += not ok
    print(f"\n{args.allocator} against {args.qemu112}: {sum(total.values()) - sum(bad.values())} of "
          f"{sum(total.values())} scripts ended with the same guest bytes and host map")
    for shape in sorted(total):
        print(f"  {shape:45} {total[shape] - bad[shape]:3} of {total[shape]:3} same")
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if sum(bad.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
