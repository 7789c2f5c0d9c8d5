"""What every part of the benchmark shares: the repo, the workloads and targets, running
commands, free ports and the images (bench/README.md)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
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
