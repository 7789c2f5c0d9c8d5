"""Crash consistency (issue 7): what a crash leaves passes ``qemu-img check`` and keeps every flushed write.

Two ways to crash the engine:

- Out of process: ``nbdserve serve`` under many concurrent libnbd writes, zero-writes and trims
  with periodic flushes and some FUA writes, killed with SIGKILL at seeded random moments (some
  rounds with ``--delay`` at blkdebug events to widen the windows).  Each crash is followed by a
  restart on the image it left, so later rounds also write over leaked clusters.
- In process: a Qcow2Image under the same kind of workload; at sampled firings of every blkdebug
  event the workload reaches, the image file is copied.  The engine writes with ``os.pwrite`` and
  keeps only L2 tables (write-back, lost in a crash) and decoded refcount blocks (written through)
  in memory, so the file at that instant is exactly what a kill -9 there would leave.  Events on
  async paths are also stopped at a breakpoint while the other requests run on, and the file is
  copied then.

Every crash state must pass ``qemu-img check`` (exit 0, or 3 for leaks; no corruption) and, read by
``qemu-img convert``, hold in each 4 KiB block a content the request history allows (:class:`History`).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trio.testing

from conftest import NbdserveProcess, free_port, import_libnbd
from nbdserve.qcow2 import Qcow2Image
from nbdserve.qcow2.events import ASYNC_EVENTS, EVENTS
from qemu_tools import check, check_no_corruption, convert_raw, create, qemu_io

BLOCK = 4096
ZERO_BLOCK = bytes(BLOCK)
INF = float("inf")
K, MiB = 1024, 1 << 20

# the backing file: constant patterns (never what a request writes) and a hole
BACKING_SIZE = 6 * MiB
BACKING_PATTERNS = [("0x11", 0, 3 * MiB), ("0x22", 4 * MiB, 2 * MiB)]


def block_pattern(ident: int, block: int) -> bytes:
    """The 4 KiB a request writes into ``block``: unique to the request and the block."""
    return struct.pack("<QQ", ident | 1 << 62, block) * (BLOCK // 16)


# ------------------------------------------------------------------ the model
@dataclass(eq=False)
class Op:
    """A write-like request over whole 4 KiB blocks; ``zero``: it leaves zeros."""

    ident: int
    first: int
    count: int
    zero: bool
    fua: bool
    issued: int
    acked: float = INF      # clock of the successful reply; INF: none (yet, or failed)

    def content(self, block: int) -> bytes:
        return ZERO_BLOCK if self.zero else block_pattern(self.ident, block)

    def data(self) -> bytes:
        return b"".join(self.content(b) for b in range(self.first, self.first + self.count))


class History:
    """Requests and flushes on one logical clock, and what each block may hold after a crash.

    A write is durable once it is acknowledged with FUA, or acknowledged before a flush was sent
    that then completed (proto.md: "NBD_CMD_FLUSH").  A write w is superseded in a block when a
    durable write d covering the block was sent after w was acknowledged.  After a crash a block
    may hold the content of any write covering it that is not superseded (sent, acknowledged or
    not), and its content from before the history only while no durable write covers it.
    """

    def __init__(self, first_ident: int = 1):
        self.clock = 0
        self.next_ident = first_ident
        self.ops: list[Op] = []
        self.flushes: list[list[float]] = []   # [sent, completed]

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    def issue(self, first: int, count: int, *, zero: bool = False, fua: bool = False) -> Op:
        op = Op(self.next_ident, first, count, zero, fua, self.tick())
        self.next_ident += 1
        self.ops.append(op)
        return op

    def ack(self, op: Op) -> None:
        op.acked = self.tick()

    def issue_flush(self) -> list[float]:
        flush = [self.tick(), INF]
        self.flushes.append(flush)
        return flush

    def flush_done(self, flush: list[float]) -> None:
        flush[1] = self.tick()

    def acceptable(self, upto: float = INF) -> dict[int, tuple[set[bytes], bool]]:
        """Block -> (contents allowed, whether the prior content is allowed), for every block a
        request sent by ``upto`` covers."""
        last_flush = max((sent for sent, done in self.flushes if done < INF and done <= upto), default=0)

        def acked(op: Op) -> float:
            return op.acked if op.acked <= upto else INF

        covering: dict[int, list[Op]] = {}
        for op in self.ops:
            if op.issued <= upto:
                for b in range(op.first, op.first + op.count):
                    covering.setdefault(b, []).append(op)
        out = {}
        for b, ops in covering.items():
            durable = [op.issued for op in ops if acked(op) < INF and (op.fua or acked(op) < last_flush)]
            newest_durable = max(durable, default=0)
            allowed = {op.content(b) for op in ops if acked(op) > newest_durable}
            out[b] = (allowed, not durable)
        return out

    def bad_blocks(self, image: bytes, prior: bytes, upto: float = INF) -> list[str]:
        """What the crashed image holds against what the history allows, one line per bad block."""
        assert len(image) == len(prior)
        allowed = self.acceptable(upto)
        by_content = {op.content(b): op for op in self.ops for b in range(op.first, op.first + op.count)
                      if not op.zero}
        bad = []
        for b in range(len(image) // BLOCK):
            got = image[b * BLOCK:(b + 1) * BLOCK]
            contents, prior_ok = allowed.get(b, (set(), True))
            if got in contents or (prior_ok and got == prior[b * BLOCK:(b + 1) * BLOCK]):
                continue
            op = by_content.get(got)
            what = (f"request {op.ident} (sent {op.issued}, acked {op.acked})" if op is not None
                    else "zeros" if got == ZERO_BLOCK else "the prior content"
                    if got == prior[b * BLOCK:(b + 1) * BLOCK] else f"unknown bytes {got[:16].hex()}")
            ops = ", ".join(f"{'zero' if op.zero else 'write'} {op.ident}{' fua' if op.fua else ''} "
                            f"[{op.issued}, {op.acked}]" for op in self.ops
                            if op.first <= b < op.first + op.count and op.issued <= upto)
            bad.append(f"block {b} ({b * BLOCK:#x}) holds {what}; allowed: {len(contents)} request "
                       f"contents{' or the prior content' if prior_ok else ''}; requests [sent, acked]: {ops}")
        return bad


def test_history_model_rejects_a_lost_flushed_write():
    """The model itself: a flushed write must be there, an unflushed one may be lost."""
    h = History()
    prior = bytes(2 * BLOCK)
    a = h.issue(0, 1)
    h.ack(a)
    flush = h.issue_flush()
    h.flush_done(flush)
    b = h.issue(1, 1)
    h.ack(b)                        # acknowledged, never flushed
    image = a.data() + prior[BLOCK:]
    assert h.bad_blocks(image, prior) == []
    assert h.bad_blocks(image[:BLOCK] + b.data(), prior) == []
    assert len(h.bad_blocks(prior, prior)) == 1              # a lost
    c = h.issue(0, 1)               # in flight over a: either may be there
    assert h.bad_blocks(c.data() + prior[BLOCK:], prior) == []
    assert h.bad_blocks(image, prior, upto=flush[0]) == []   # before the flush: a may be lost...
    assert h.bad_blocks(prior, prior, upto=flush[0]) == []
    unfinished = h.issue_flush()
    assert len(h.bad_blocks(prior, prior)) == 1              # (a flush not completed makes nothing durable)
    assert h.bad_blocks(c.data() + b.data(), prior) == []
    assert h.bad_blocks(c.data() + prior[BLOCK:], prior, upto=unfinished[0]) == []
    d = h.issue(0, 1, fua=True)
    h.ack(d)                        # ...and a FUA write supersedes a and c once acknowledged
    assert len(h.bad_blocks(image, prior)) == 1
    assert h.bad_blocks(d.data() + prior[BLOCK:], prior) == []


# ------------------------------------------------------------------ images and qemu
def make_backing(path: Path) -> bytes:
    """A qcow2 backing file written by qemu-io; returns its guest view."""
    create(path, BACKING_SIZE)
    qemu_io(path, *(f"write -P {p} {off} {n}" for p, off, n in BACKING_PATTERNS))
    view = bytearray(BACKING_SIZE)
    for p, off, n in BACKING_PATTERNS:
        view[off:off + n] = bytes([int(p, 16)]) * n
    return bytes(view)


def make_overlay(path: Path, backing: Path, size: int, **options) -> Path:
    create(path, size, backing=str(backing), **options)
    return path


def verify_crash_state(path: Path, history: History, prior: bytes, upto: float, tmpdir: Path,
                       label: str) -> tuple[dict, bytes]:
    """qemu-img check passes (leaks allowed), and qemu-img convert reads what the history allows."""
    report = check_no_corruption(path)
    image = convert_raw(path, tmpdir)
    bad = history.bad_blocks(image, prior, upto)
    flushes = [f for f in history.flushes if f[0] <= upto]
    assert not bad, f"{label}: {len(bad)} bad blocks:\n" + "\n".join(bad[:20]) + f"\nflushes: {flushes}"
    return report, image


# ------------------------------------------------------------------ out of process: kill -9
DISK_SIZE = 8 * MiB
REGION_BLOCKS = 7 * MiB // BLOCK     # requests land here: backing data, a backing hole, past its end
IN_FLIGHT = 48
ROUNDS = int(os.environ.get("NBDSERVE_CRASH_ROUNDS", "24"))
ROUNDS_PER_IMAGE = 4
DELAY_CHOICES = [(), ("cow_write=0.002",), ("write_aio=0.001", "l2_update=0.002"), ("cow_read=0.003",)]


def drive(uri: str, history: History, rng: random.Random, cluster_size: int,
          stop: threading.Event, counts: Counter) -> None:
    """Keep IN_FLIGHT requests going over one connection until the server dies or ``stop``."""
    nbd = import_libnbd()
    h = nbd.NBD()
    h.connect_uri(uri)
    cluster_blocks = max(1, cluster_size // BLOCK)

    def completion(thing, kind):
        def done(err):
            counts[kind + (" ok" if err.value == 0 else " failed")] += 1
            if err.value == 0:
                if kind == "flush":
                    history.flush_done(thing)
                else:
                    history.ack(thing)
            return 1
        return done

    try:
        while not stop.is_set():
            while h.aio_in_flight() < IN_FLIGHT:
                kind = rng.choices(["write", "fua", "zero", "trim", "flush"], [80, 5, 5, 5, 5])[0]
                first = rng.randrange(REGION_BLOCKS)
                count = min(REGION_BLOCKS - first, rng.choice([1, 1, 2, 4, 8, 16, 32, 64]))
                if kind == "flush":
                    flush = history.issue_flush()
                    h.aio_flush(completion(flush, kind))
                elif kind == "trim":
                    # qcow2 v3 drops whole clusters only; they then read as zeros
                    c0 = -(-first // cluster_blocks) * cluster_blocks
                    c1 = (first + count) // cluster_blocks * cluster_blocks
                    if c1 > c0:
                        op = history.issue(c0, c1 - c0, zero=True)
                        h.aio_trim(count * BLOCK, first * BLOCK, completion(op, kind))
                elif kind == "zero":
                    op = history.issue(first, count, zero=True)
                    h.aio_zero(count * BLOCK, first * BLOCK, completion(op, kind),
                               flags=rng.choice([0, nbd.CMD_FLAG_NO_HOLE]))
                else:
                    op = history.issue(first, count, fua=kind == "fua")
                    h.aio_pwrite(op.data(), first * BLOCK, completion(op, kind),
                                 flags=nbd.CMD_FLAG_FUA if kind == "fua" else 0)
            h.poll(100)
    except nbd.Error:
        pass    # the server is gone


def _crash_round(overlay: Path, history: History, prior: bytes, rng: random.Random, cluster_size: int,
                 delays: tuple[str, ...], tmpdir: Path, counts: Counter) -> tuple[dict, bytes, float]:
    args = ["serve", "-f", "qcow2", "-x", "disk", "-p", str(free_port()), str(overlay)]
    for d in delays:
        args += ["--delay", d]
    server = NbdserveProcess(*args).start()
    stop = threading.Event()
    client = threading.Thread(target=drive, args=(server.uri, history, rng, cluster_size, stop, counts))
    client.start()
    kill_after = rng.uniform(0.05, 1.0)
    time.sleep(kill_after)
    rc = server.stop(signal.SIGKILL)
    stop.set()
    client.join(timeout=30)
    assert not client.is_alive()
    assert rc == -signal.SIGKILL, (rc, server.stderr[-2000:])
    report, image = verify_crash_state(overlay, history, prior, INF, tmpdir,
                                      f"kill -9 after {kill_after:.3f} s, delays {delays}")
    return report, image, kill_after


@pytest.mark.slow
def test_kill_9_under_concurrent_writes(tmp_path):
    """ROUNDS kills at seeded random moments; every flushed or FUA write survives each."""
    rng = random.Random(int(os.environ.get("NBDSERVE_CRASH_SEED", "7")))
    backing_view = make_backing(tmp_path / "backing.qcow2")
    backing_view += bytes(DISK_SIZE - len(backing_view))
    counts: Counter = Counter()
    leaks = []
    ident = 1
    for r in range(ROUNDS):
        if r % ROUNDS_PER_IMAGE == 0:
            cluster_size = rng.choice([4 * K, 16 * K, 64 * K])
            overlay = make_overlay(tmp_path / f"overlay-{r}.qcow2", tmp_path / "backing.qcow2", DISK_SIZE,
                                   cluster_size=cluster_size)
            prior = backing_view
        history = History(first_ident=ident)
        delays = DELAY_CHOICES[r % len(DELAY_CHOICES)]
        report, prior, _ = _crash_round(overlay, history, prior, rng, cluster_size, delays, tmp_path, counts)
        ident = history.next_ident
        leaks.append(report.get("leaks", 0))
        assert any(op.acked == INF for op in history.ops), "nothing was in flight at the kill"
    print(f"\n{ROUNDS} kill -9 rounds, 0 corruptions; requests {dict(sorted(counts.items()))}; "
          f"leaked clusters per round {leaks}")
    # flushed writes were there to lose
    assert counts["flush ok"] >= ROUNDS and counts["write ok"] >= 10 * ROUNDS, counts


# ------------------------------------------------------------------ in process: every event
# (shape name, qemu-img create options, disk size, request region in blocks)
SHAPES = [
    ("64k-clusters", dict(cluster_size=64 * K), 8 * MiB, 7 * MiB // BLOCK),
    # 512-byte clusters with 64-bit refcounts: a refcount block covers 32 KiB and the first
    # refcount table 2 MiB, so the workload allocates refcount blocks and grows the table
    ("512-clusters-refcount64", dict(cluster_size=512, refcount_bits=64), 8 * MiB, 6 * MiB // BLOCK),
]
POSITIONS = {1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987}
TASKS = 6
OPS_PER_TASK = 25


async def _workload(img: Qcow2Image, history: History, rng: random.Random, region: int,
                    tasks: int = TASKS, ops_per_task: int = OPS_PER_TASK) -> None:
    """Concurrent writes (some FUA), zero-writes and discards, and a task that flushes."""
    cluster_blocks = max(1, img.cluster_size // BLOCK)
    done = 0

    async def requests(seed: int) -> None:
        nonlocal done
        r = random.Random(seed)
        for _ in range(ops_per_task):
            kind = r.choices(["write", "fua", "zero", "trim"], [80, 5, 8, 7])[0]
            first = r.randrange(region)
            sizes = [1, 1, 2, 4, 8, 16, 32] if kind in ("write", "fua") else [1, 4, 16, 32, 64]
            count = min(region - first, r.choice(sizes))
            if kind == "trim":
                c0 = -(-first // cluster_blocks) * cluster_blocks
                c1 = (first + count) // cluster_blocks * cluster_blocks
                if c1 <= c0:
                    continue
                op = history.issue(c0, c1 - c0, zero=True)
                await img.trim(first * BLOCK, count * BLOCK)
            elif kind == "zero":
                op = history.issue(first, count, zero=True)
                await img.zero(first * BLOCK, count * BLOCK, may_trim=r.random() < 0.5)
            else:
                op = history.issue(first, count, fua=kind == "fua")
                await img.pwrite(first * BLOCK, op.data(), fua=kind == "fua")
            history.ack(op)
        done += 1

    async def flusher() -> None:
        while done < tasks:
            await trio.sleep(rng.uniform(0.001, 0.01))
            flush = history.issue_flush()
            await img.flush()
            history.flush_done(flush)

    async with trio.open_nursery() as nursery:
        for i in range(tasks):
            nursery.start_soon(requests, rng.randrange(1 << 30))
        nursery.start_soon(flusher)


@dataclass
class Snapshot:
    label: str
    path: Path
    clock: int


async def _run_shape(tmp_path: Path, shape, seed: int, backing_view: bytes, *, hook_events: bool,
                     break_event: str | None = None) -> tuple[History, list[Snapshot], Counter, bytes]:
    name, options, size, region = shape
    rng = random.Random(seed)
    tag = f"{name}-{break_event or 'hooks'}"
    overlay = make_overlay(tmp_path / f"{tag}.qcow2", tmp_path / "backing.qcow2", size, **options)
    prior = backing_view + bytes(size - len(backing_view))
    img = Qcow2Image.open(str(overlay))
    history = History()
    snapshots: list[Snapshot] = []
    counts: Counter = Counter()

    def snapshot(label: str) -> None:
        path = tmp_path / f"{tag}-{len(snapshots)}.qcow2"
        shutil.copyfile(overlay, path)
        snapshots.append(Snapshot(label, path, history.tick()))

    def hook(event: str) -> None:
        counts[event] += 1
        if hook_events and counts[event] in POSITIONS:
            snapshot(f"{event} #{counts[event]}")

    img.events.hook = hook
    try:
        async with trio.open_nursery() as nursery:
            if break_event is not None:
                await nursery.start(_stop_at, img, break_event, snapshot, rng)
            # a flushed baseline, then the concurrent batch with small delays to interleave requests
            await _workload(img, history, rng, region, tasks=2, ops_per_task=15)
            flush = history.issue_flush()
            await img.flush()
            history.flush_done(flush)
            img.events.delays = {e: rng.choice([0, 0.0002, 0.001]) for e in ASYNC_EVENTS}
            await _workload(img, history, rng, region)
            nursery.cancel_scope.cancel()
        img.events.hook = None
    finally:
        await img.close()
    return history, snapshots, counts, prior


async def _stop_at(img: Qcow2Image, event: str, snapshot, rng: random.Random,
                   task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Stop the first few requests reaching ``event``; while one waits there, let the others run
    on for a moment, copy the file, resume it.  A breakpoint armed but never hit is removed."""
    for k in range(1, 4):
        tag = f"{event}-{k}"
        img.events.set_break(event, tag)
        if k == 1:
            task_status.started()       # armed before the first request
        try:
            await img.events.wait_break(tag)
            await trio.sleep(rng.uniform(0, 0.003))
            snapshot(f"break {event} #{k}")
        finally:
            img.events.remove_break(tag)    # resumes the request suspended there, if any


@pytest.mark.slow
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
async def test_crash_at_every_blkdebug_event(tmp_path, shape):
    """The image file as it is at sampled firings of every event the workload reaches (and while
    a request waits at a breakpoint on each async one) is a consistent crash state."""
    backing_view = make_backing(tmp_path / "backing.qcow2")
    history, snapshots, counts, prior = await _run_shape(tmp_path, shape, 1, backing_view, hook_events=True)
    reached = [e for e in EVENTS if counts[e]]
    runs = [(history, snapshots, prior)]
    for i, event in enumerate(e for e in reached if e in ASYNC_EVENTS):
        h, snaps, _, p = await _run_shape(tmp_path, shape, 100 + i, backing_view, hook_events=False,
                                          break_event=event)
        assert snaps, f"breakpoint at {event} never hit"
        runs.append((h, snaps, p))
    points = 0
    for h, snaps, p in runs:
        for snap in snaps:
            verify_crash_state(snap.path, h, p, snap.clock, tmp_path, f"{shape[0]}: crash at {snap.label}")
            snap.path.unlink()
            points += 1
    print(f"\n{shape[0]}: {points} crash points, 0 corruptions; events reached "
          f"{dict((e, counts[e]) for e in reached)}; not reached {[e for e in EVENTS if not counts[e]]}")
    # the workload must reach the allocator's events, or this test shows nothing
    for event in ("cluster_alloc", "write_aio", "l2_update", "refblock_update", "flush_to_disk", "cluster_free"):
        assert counts[event], f"{event} never fired"
    if shape[0].startswith("512"):
        for event in ("refblock_alloc", "refblock_alloc_hookup", "reftable_grow", "refblock_alloc_switch_table"):
            assert counts[event], f"{event} never fired"
    else:
        for event in ("cow_read", "cow_write", "read_backing_aio", "l2_alloc_write", "l1_update"):
            assert counts[event], f"{event} never fired"


# ------------------------------------------------------------------ found by the crash tests
@pytest.mark.parametrize("request_kind", ["trim", "zero"])
async def test_discard_is_not_undone_by_a_concurrent_cow(tmp_path, request_kind):
    """A write of 4 KiB at 8 KiB into an unallocated 64 KiB cluster copies the rest of the cluster
    from the backing file into a new cluster, and points L2 at it afterwards.  A discard (or a
    write-zeroes) of the whole cluster completing in between must not be undone by that copy:
    0..8K were only ever discarded, so they read zeros, not the backing file's 0x22.
    (Found by test_kill_9_under_concurrent_writes: a flushed discard came back as backing data.)"""
    backing = tmp_path / "backing.qcow2"
    create(backing, 1 * MiB)
    qemu_io(backing, "write -P 0x22 0 64k")
    overlay = create(tmp_path / "overlay.qcow2", 1 * MiB, backing=str(backing), cluster_size=64 * K)
    img = Qcow2Image.open(overlay)
    try:
        img.events.set_break("cow_write", "A")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(img.pwrite, 8 * K, b"\x77" * (4 * K))
            await img.events.wait_break("A")        # the write sits between allocation and L2 update

            async def discard():
                if request_kind == "trim":
                    await img.trim(0, 64 * K)
                else:
                    await img.zero(0, 64 * K, may_trim=True)
            nursery.start_soon(discard)
            await trio.testing.wait_all_tasks_blocked()
            img.events.resume("A")
        await img.flush()
    finally:
        await img.close()
    check(overlay)
    head = convert_raw(overlay, tmp_path)[:8 * K]
    assert head == bytes(8 * K), f"0..8K read {head[:4].hex()}..., not zeros"


async def test_a_freed_cluster_is_not_reused_under_a_write_in_flight(tmp_path):
    """A write in place into a cluster finds its host cluster, then writes with s->lock released
    (a breakpoint here; a worker thread for large writes).  A discard of that cluster and a flush
    meanwhile free the host cluster; the next allocation must not get it while the old write is
    still to land there, or that write overwrites the new owner's data (guest 512K, written and
    flushed by a request that never overlapped the others)."""
    overlay = create(tmp_path / "disk.qcow2", 1 * MiB, cluster_size=64 * K)
    img = Qcow2Image.open(overlay)
    try:
        await img.pwrite(0, b"\x11" * (64 * K))
        await img.flush()
        img.events.set_break("write_aio", "W")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(img.pwrite, 0, b"\x99" * (64 * K))
            await img.events.wait_break("W")
            await img.trim(0, 64 * K)
            await img.flush()
            await img.pwrite(512 * K, b"\x55" * (64 * K))
            await img.flush()
            img.events.resume("W")
        await img.flush()
    finally:
        await img.close()
    check_no_corruption(overlay)
    data = convert_raw(overlay, tmp_path)
    assert data[512 * K:576 * K] == b"\x55" * (64 * K), f"guest 512K reads {data[512 * K:512 * K + 4].hex()}..."
