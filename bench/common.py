"""What every part of the benchmark shares: the repo, the workloads and targets, running
commands, free ports and the images (bench/README.md)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXPORT = "bench"
GiB = 1 << 30
MiB = 1 << 20

@dataclass(frozen=True)
class Workload:
    """One throughput row: a client driving both servers the same way (bench/README.md)."""

    name: str
    group: str            # single, multi, nbdcopy, tls, chain: what --only GROUP selects
    image: str            # alloc (read-only), alloc-rw, fresh, inplace (writable copy of alloc), chain
    figure: str           # MiB/s or IOPS: the figure the ratio compares
    target: float | None  # minimum ratio nbdserve / qemu-nbd; None: reported without target
    rw: str = "read"      # fio --rw; nbdcopy: read (export -> null:) or write (file -> export)
    bs: str = "1m"        # fio --bs; nbdcopy --request-size
    iodepth: int = 8      # fio --iodepth; nbdcopy --requests
    conns: int = 1        # fio --numjobs (one connection each); nbdcopy --connections
    client: str = "fio"   # fio or nbdcopy
    tls: bool = False     # x509 TLS (nbds://)
    min_repeat: int = 1   # runs per server at least, whatever --repeat says (a short, noisy row)

    @property
    def writable(self) -> bool:
        return self.image in ("alloc-rw", "fresh", "inplace")

    @property
    def qemu_shared(self) -> int | None:
        """qemu-nbd -e: 0 (unlimited) for the multi-connection rows, else its default (1)."""
        return 0 if self.conns > 1 else None


# Issue 19 targets (the single-connection rows were issue 6's, now >= 1.2x).
WORKLOADS = [
    Workload("seq read 1M QD8", "single", "alloc", "MiB/s", 1.2, "read", "1m", 8),
    # the same reads from a writable export (no target): nbdserve sends a read-only layer's
    # data with sendfile(2), a writable layer's is read into memory first
    Workload("seq read 1M QD8 rw", "single", "alloc-rw", "MiB/s", None, "read", "1m", 8),
    Workload("rand read 4K QD16", "single", "alloc", "IOPS", 1.2, "randread", "4k", 16),
    # writes into a fresh image stop after one pass over it (0.5-6 s), and how long the file
    # system takes to allocate 1 GiB of new blocks varies from run to run on either server
    # (here 460-2550 MiB/s for nbdserve's 1 MiB writes, 530-1140 for qemu-nbd's): 5 runs each
    Workload("seq write 1M QD8", "single", "fresh", "MiB/s", 1.2, "write", "1m", 8, min_repeat=5),
    Workload("rand write 4K QD16", "single", "fresh", "IOPS", 1.2, "randwrite", "4k", 16, min_repeat=5),
    *(w for n in (4, 16) for w in (
        Workload(f"{n} conn seq read 1M QD8", "multi", "alloc", "MiB/s", 1.0, "read", "1m", 8, n),
        Workload(f"{n} conn rand read 4K QD16", "multi", "alloc", "IOPS", 1.0, "randread", "4k", 16, n),
        Workload(f"{n} conn rand write 4K QD16 inplace", "multi", "inplace", "IOPS", 1.0,
                 "randwrite", "4k", 16, n))),
    # nbdcopy's defaults (256 KiB requests, 64 in flight per connection), 4 connections
    Workload("nbdcopy 4 conn export->null", "nbdcopy", "alloc", "MiB/s", 1.0, "read", "256k", 64, 4,
             client="nbdcopy"),
    # one copy of 1 GiB into a fresh image takes 1-2 s, mostly the file system's allocation
    # of new blocks, which varies from copy to copy on either server (0.3-1.4 GiB/s): 5 runs each
    Workload("nbdcopy 4 conn file->export", "nbdcopy", "fresh", "MiB/s", 1.0, "write", "256k", 64, 4,
             client="nbdcopy", min_repeat=5),
    # fio's nbd engine cannot be given a TLS certificates folder, nbdcopy can: 1 MiB
    # reads, 8 in flight, one connection, like "seq read 1M QD8"
    Workload("tls nbdcopy read 1M QD8", "tls", "alloc", "MiB/s", 1.0, "read", "1m", 8, client="nbdcopy",
             tls=True),
    Workload("chain16 seq read 1M QD8", "chain", "chain", "MiB/s", 1.0, "read", "1m", 8),
    Workload("chain16 rand read 4K QD16", "chain", "chain", "IOPS", 1.0, "randread", "4k", 16),
]
CPU_TARGET_RATIO = 1.0      # server CPU seconds per GiB: nbdserve / qemu-nbd at most this
RSS_TARGET_MIB = 64
OPEN_TARGET_S = 0.5
CHECK_BIG_TARGET_RATIO = 1.0  # nbdserve check time / qemu-img check time, 1 TiB metadata-preallocated
CHECK_BIG_RSS_MIB = 64
CHAIN_DEPTH = 16
CLUSTER = 64 * 1024           # qemu-img create's default cluster size


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


def make_chain(top: Path, depth: int = CHAIN_DEPTH, size: int = GiB) -> None:
    """A `depth`-deep qcow2 chain (base + depth-1 overlays, each `qemu-img create -b prev
    -F qcow2`) ending in `top`; layer i (0 = base) holds the 64 KiB clusters i, i+depth,
    i+2*depth, ... with pattern 0x10+i, so each layer holds 1/depth of the data and every
    1 MiB read (16 clusters) reaches into every layer."""
    prev = None
    for i in range(depth):
        layer = top if i == depth - 1 else top.with_name(f"{top.stem}-{i:02d}.qcow2")
        backing = ["-b", str(prev), "-F", "qcow2"] if prev else []
        run(["qemu-img", "create", "-q", "-f", "qcow2", *backing, str(layer), str(size)])
        cmds: list[str] = []
        for off in range(i * CLUSTER, size, depth * CLUSTER):
            cmds += ["-c", f"write -q -P {0x10 + i:#x} {off} {CLUSTER}"]
        run(["qemu-io", "-t", "unsafe", "-f", "qcow2", *cmds, str(layer)])
        prev = layer


def make_pattern_file(path: Path, size: int = GiB) -> None:
    """A raw file of `size` bytes of 0x5a (no holes, no zero blocks for nbdcopy to skip)."""
    block = b"\x5a" * (4 * MiB)
    with open(path, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())   # its writeback must not run into the timed copies
