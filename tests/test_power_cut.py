"""A power cut, not just kill -9: the files a crash of the machine could leave behind.

kill -9 keeps the kernel's page cache, so it never loses a write that was not fsynced.
Here every write and fsync of the qcow2 engine (nbdserve/blockdev/fileio.py, the one
seam they go through) is recorded while python3-libnbd drives a real in-process server
with writes (some FUA), flushes, trims and write-zeroes.  A crash point is a place in
that stream (each blkdebug event's place, and seeded ones); the file it leaves is what
the last completed fsync made durable, plus some of the writes after it: none, all, a
random subset, or a random subset of their 512-byte sectors (torn writes).  For each:

- ``qemu-img check`` finds no corruption (leaks are allowed); a lazy-refcounts image is
  first repaired with ``check -r all``, as qemu repairs a dirty one when opening it;
- every write acknowledged as durable (FUA, or completed before a completed FLUSH) reads
  back, or a later write's data does;
- no sector reads data that no write issued before the crash put there.

The guest bytes are read by ``qemu-img convert``.  Every written sector carries (write id,
guest offset), so its origin is known.  NBDSERVE_POWER_CUT_STATES (default 40) sets the
crash states per image shape; thousands by hand.
"""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import threading
import zlib

import pytest
import trio

from nbdserve.blockdev import fileio
from nbdserve.server.settings import ExportSettings
from nbdserve.qcow2 import events as blkdebug_events
from nbdhelpers import libnbd_handle, start_server
from qemu_tools import create

K = 1024
SECTOR = 512
SIZE = 2 << 20
STATES = int(os.environ.get("NBDSERVE_POWER_CUT_STATES", "40"))

# (compat, cluster size, lazy refcounts)
SHAPES = [("0.10", 512, "off"), ("0.10", 64 * K, "off"), ("1.1", 512, "off"), ("1.1", 64 * K, "off"),
          ("1.1", 512, "on"), ("1.1", 64 * K, "on")]


class Recorder:
    """fileio/blkdebug observer: the image file's writes, fsyncs and the engine's events, plus
    the client's acknowledgements, in the order they happened."""

    def __init__(self, path: str):
        self.ino = os.stat(path).st_ino
        self.lock = threading.Lock()
        self.stream: list[tuple] = []      # ("w", offset, data) | ("s", writes) | ("e", name) | ("a", op, upto, fua)
        self.writes = 0

    def _ours(self, fd: int) -> bool:
        return os.fstat(fd).st_ino == self.ino

    def wrote(self, fd, offset, data):
        if self._ours(fd):
            with self.lock:
                self.stream.append(("w", offset, data))
                self.writes += 1

    def writes_seen(self):
        with self.lock:
            return self.writes

    def synced(self, fd, writes_before):
        if self._ours(fd):
            with self.lock:
                self.stream.append(("s", writes_before))

    def event(self, name):
        with self.lock:
            self.stream.append(("e", name))

    def ack(self, op: int, durable_upto: int | None = None, fua: bool = False):
        """Op ``op`` completed (durable itself with ``fua``); every op up to ``durable_upto``
        is durable now (a completed flush)."""
        with self.lock:
            self.stream.append(("a", op, durable_upto, fua))


def sector_pattern(op: int, offset: int, length: int) -> bytes:
    """Write ``op``'s bytes: each sector says (op + 1, its guest offset)."""
    return b"".join(struct.pack(">QQ", op + 1, o) * (SECTOR // 16) for o in range(offset, offset + length, SECTOR))


def random_ops(rnd: random.Random, cluster_size: int) -> list[tuple]:
    ops = []
    for _ in range(36):
        k = rnd.random()
        unit = rnd.choice((SECTOR, 4 * K, cluster_size))
        off = rnd.randrange(0, SIZE // unit) * unit
        length = min(SIZE - off, unit * rnd.randint(1, 6))
        if k < 0.55:
            ops.append(("write", off, length, rnd.random() < 0.25))      # (kind, offset, length, fua)
        elif k < 0.7:
            ops.append(("flush", 0, 0, False))
        elif k < 0.82:
            ops.append(("trim", off, length, False))
        else:
            ops.append(("zero", off, length, rnd.random() < 0.5))        # may_trim
    ops.append(("flush", 0, 0, False))
    return ops


def drive(uri: str, ops: list[tuple], rec: Recorder) -> None:
    """The client, one request at a time (in a worker thread)."""
    import nbd
    h = libnbd_handle(uri)
    last_flushed = None
    for i, (kind, off, length, flag) in enumerate(ops):
        if kind == "write":
            h.pwrite(sector_pattern(i, off, length), off, nbd.CMD_FLAG_FUA if flag else 0)
            rec.ack(i, fua=flag)
        elif kind == "flush":
            h.flush()
            last_flushed = i
            rec.ack(i, durable_upto=last_flushed)
        elif kind == "trim":
            h.trim(length, off)
            rec.ack(i)
        else:
            h.zero(length, off, 0 if flag else nbd.CMD_FLAG_NO_HOLE)
            rec.ack(i)
    h.shutdown()


def crash_file(initial: bytes, stream: list[tuple], k: int, how: str, rnd: random.Random) -> bytearray:
    """The image file a power cut at stream position ``k`` may leave."""
    writes = [e for e in stream[:k] if e[0] == "w"]
    durable = 0
    for e in stream[:k]:
        if e[0] == "s":
            durable = max(durable, e[1])
    f = bytearray(initial)

    def put(offset, data):
        if offset + len(data) > len(f):
            f.extend(bytes(offset + len(data) - len(f)))
        f[offset:offset + len(data)] = data

    for _, offset, data in writes[:durable]:
        put(offset, data)
    for _, offset, data in writes[durable:]:
        if how == "none" or (how in ("subset", "torn") and rnd.random() < 0.5):
            continue
        if how == "torn" and len(data) > SECTOR:
            for s in range(0, len(data), SECTOR):     # sector-atomic, no more
                if rnd.random() < 0.5:
                    put(offset + s, data[s:s + SECTOR])
            continue
        put(offset, data)
    return f


def expectations(ops: list[tuple], stream: list[tuple], k: int) -> tuple[set[int], int]:
    """(ops durable at ``k``, ops issued before ``k``: their count)."""
    durable: set[int] = set()
    done = -1
    for e in stream[:k]:
        if e[0] == "a":
            _, done, upto, fua = e
            if upto is not None:
                durable.update(i for i in range(upto + 1) if ops[i][0] != "flush")
            if fua:
                durable.add(done)
    return durable, done + 2          # the op after the last acknowledged one may be under way


def covering_ops(ops: list[tuple]) -> list[list[int]]:
    """Per sector, the ops (but flushes) whose range covers it, in order."""
    cover: list[list[int]] = [[] for _ in range(SIZE // SECTOR)]
    for i, (kind, off, n, _) in enumerate(ops):
        if kind != "flush":
            for s in range(off // SECTOR, (off + n) // SECTOR):
                cover[s].append(i)
    return cover


def verify(guest: bytes, ops: list[tuple], cover: list[list[int]], durable: set[int], issued: int) -> list[str]:
    """Trims are hints (proto.md: the server may ignore them): they promise no zeros, but
    zeros after one are no loss."""
    problems = []
    for s in range(0, SIZE, SECTOR):
        got = guest[s:s + SECTOR]
        covering = [i for i in cover[s // SECTOR] if i < issued]
        if got == bytes(SECTOR):
            origin = None                       # zeros: the initial content, a trim or a zeroing
        else:
            op, offset = struct.unpack(">QQ", got[:16])
            origin = op - 1
            if got != sector_pattern(origin, s, SECTOR) or offset != s or origin not in covering \
                    or ops[origin][0] != "write":
                problems.append(f"sector {s:#x} holds data never written there ({got[:16].hex()})")
                continue
        for d in durable.intersection(covering):
            kind = ops[d][0]
            if kind == "trim":
                continue
            later = [i for i in covering if i > d]
            ok = origin == d or origin in later or (origin is None and (kind in ("trim", "zero") or any(
                ops[i][0] in ("trim", "zero") for i in later)))
            if not ok:
                problems.append(f"sector {s:#x}: durable op {d} {ops[d][:3]} lost (reads {origin})")
    return problems


def qemu_img_verdict(path: str, lazy: bool) -> dict:
    if lazy:
        subprocess.run(["qemu-img", "check", "-r", "all", path], capture_output=True, text=True)
    p = subprocess.run(["qemu-img", "check", "--output=json", path], capture_output=True, text=True)
    report = json.loads(p.stdout) if p.stdout.strip().startswith("{") else {}
    report["exit"] = p.returncode
    return report


@pytest.mark.parametrize("shape", SHAPES, ids=[f"compat{c}-{cs}-lazy{lz}" for c, cs, lz in SHAPES])
async def test_power_cut(tmp_path, shape):
    compat, cluster_size, lazy = shape
    seed = zlib.crc32(repr(shape).encode())
    rnd = random.Random(seed)
    opts = {"compat": compat, "cluster_size": cluster_size}
    if compat == "1.1":
        opts["lazy_refcounts"] = lazy
    image = create(tmp_path / "img.qcow2", SIZE, **opts)
    initial = open(image, "rb").read()
    ops = random_ops(rnd, cluster_size)
    rec = Recorder(image)
    fileio.observers.append(rec)
    blkdebug_events.observers.append(rec.event)
    try:
        async with trio.open_nursery() as nursery:
            served = await start_server(nursery, [ExportSettings("d", image, "qcow2")])
            await trio.to_thread.run_sync(drive, served.uri("d"), ops, rec)
            nursery.cancel_scope.cancel()
    finally:
        fileio.observers.remove(rec)
        blkdebug_events.observers.remove(rec.event)
    stream = rec.stream
    assert sum(e[0] == "w" for e in stream) > 20 and sum(e[0] == "s" for e in stream) > 3

    events_at = sorted({i + 1 for i, e in enumerate(stream) if e[0] == "e"})
    points = rnd.sample(events_at, min(len(events_at), STATES // 2))
    points += [rnd.randrange(1, len(stream) + 1) for _ in range(STATES - len(points))]
    cover = covering_ops(ops)
    failures = []
    crash_path = str(tmp_path / "crash.qcow2")
    raw_path = str(tmp_path / "crash.raw")
    for n, k in enumerate(points):
        how = ("none", "all", "subset", "torn")[n % 4]
        with open(crash_path, "wb") as f:
            f.write(crash_file(initial, stream, k, how, rnd))
        verdict = qemu_img_verdict(crash_path, lazy == "on")
        if verdict["exit"] not in (0, 3) or verdict.get("corruptions") or verdict.get("check-errors"):
            failures.append(f"point {k} ({how}): qemu-img check {verdict}")
            continue
        subprocess.run(["qemu-img", "convert", "-O", "raw", crash_path, raw_path], check=True)
        guest = open(raw_path, "rb").read()
        durable, issued = expectations(ops, stream, k)
        problems = verify(guest, ops, cover, durable, issued)
        if problems:
            failures.append(f"point {k} ({how}): " + "; ".join(problems[:3]))
    assert not failures, f"{len(failures)} of {len(points)} crash states failed:\n" + "\n".join(failures[:10])
