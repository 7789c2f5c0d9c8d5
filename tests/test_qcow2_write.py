"""Writing: the engine writes, closes, and qemu checks the result (``qemu-img check`` exit 0,
``qemu-img compare`` against a raw reference the test maintains, qemu-io pattern reads)."""

from __future__ import annotations

import json
import os
import random
import struct

import pytest
import trio

from nbdserve.qcow2 import Qcow2Image

from conftest import import_libnbd
from qemu_tools import (RawReference, check, compare, convert_raw, create, info, pattern,
                        qemu_img, qemu_io, qemu_map, read_all, shape_ids)

K, M = 1024, 1024 * 1024


class Mirror:
    """The engine image and a bytearray of what it must read, changed together."""

    def __init__(self, img: Qcow2Image, expected: bytes | bytearray, backing: bytes | None = None):
        self.img = img
        self.ref = bytearray(expected)
        assert len(self.ref) == img.size
        # what a cluster reads when it is dropped from this layer (v2 discard)
        self.under = (bytes(backing[:img.size]) + bytes(max(0, img.size - len(backing)))
                      if backing is not None else bytes(img.size))

    async def write(self, off: int, data: bytes) -> None:
        await self.img.pwrite(off, data)
        self.ref[off:off + len(data)] = data

    async def zero(self, off: int, n: int, **kw) -> None:
        await self.img.zero(off, n, **kw)
        self.ref[off:off + n] = bytes(n)

    def whole_clusters(self, off: int, n: int) -> tuple[int, int]:
        cs = self.img.cluster_size
        first = -(-off // cs) * cs
        end = off + n
        last = self.img.size if end == self.img.size else end // cs * cs
        return first, max(first, last)

    async def trim(self, off: int, n: int) -> None:
        """qcow2 discards whole clusters only: v3 makes them read zeros, v2 the backing file."""
        await self.img.trim(off, n)
        a, b = self.whole_clusters(off, n)
        self.ref[a:b] = bytes(b - a) if self.img.version >= 3 else self.under[a:b]

    async def verify(self) -> None:
        assert await read_all(self.img) == bytes(self.ref)


async def close_and_check(m: Mirror, path, tmp_path) -> None:
    await m.img.close()
    check(path)
    ref = RawReference(tmp_path / "reference.raw", len(m.ref), bytes(m.ref))
    compare(path, ref.path)


async def random_ops(m: Mirror, seed: int, n: int, *, max_len: int, discard: bool = True) -> None:
    rnd = random.Random(seed)
    size, cs = m.img.size, m.img.cluster_size
    for i in range(n):
        off = rnd.randrange(0, size)
        length = min(rnd.randrange(1, max_len), size - off)
        op = rnd.random()
        if op < 0.7:
            await m.write(off, pattern(seed * 1000 + i, length))
        elif op < 0.85 and discard:
            await m.trim(off, length)
        else:
            await m.zero(off, length, may_trim=rnd.random() < 0.5)
        if rnd.random() < 0.15:
            await m.img.flush()
    await m.verify()


SHAPES = [
    ("1.1", 65536, 16, {}),
    ("0.10", 65536, 16, {}),
    ("1.1", 512, 16, {}),
    ("1.1", 512, 1, {}),
    ("1.1", 4096, 64, {}),
    ("1.1", 2 * M, 16, {}),
    ("1.1", 65536, 16, {"extended_l2": "on"}),
]


@pytest.mark.parametrize("compat,cs,rb,extra", SHAPES,
                         ids=shape_ids(SHAPES))
async def test_random_writes(tmp_path, compat, cs, rb, extra):
    size = max(8 * cs, 512 * K) + 1536               # ragged end, several L2 tables at 512 B
    path = create(tmp_path / "img.qcow2", size, compat=compat, cluster_size=cs, refcount_bits=rb, **extra)
    m = Mirror(Qcow2Image.open(path), bytes(size))
    await random_ops(m, seed=cs + rb, n=60, max_len=3 * cs + 777)
    # a write that spans an L2 boundary
    l2_span = cs * (cs // (16 if extra.get("extended_l2") else 8))
    if l2_span < size:
        await m.write(l2_span - 1000, pattern(99, 3000))
    await m.write(size - 1000, b"\x5e" * 1000)
    await close_and_check(m, path, tmp_path)
    qemu_io(path, f"read -P 0x5e {size - 1000} 1000")


@pytest.mark.parametrize("rb,written", [(1, 3 * M), (16, 9 * M), (64, 5 * M)])
async def test_refcount_block_allocation_and_table_growth(tmp_path, rb, written):
    """512-byte clusters: one refcount block covers 512*8/rb clusters and the one-cluster refcount
    table 64 blocks (rb=16: 8 MiB of file, rb=64: 2 MiB); writing past that allocates many refcount
    blocks and grows the table (twice for rb=64)."""
    size = 12 * M
    path = create(tmp_path / "img.qcow2", size, cluster_size=512, refcount_bits=rb)
    rt_before = struct.unpack_from(">QI", open(path, "rb").read(60), 48)
    m = Mirror(Qcow2Image.open(path), bytes(size))
    for i, off in enumerate(range(0, written, 256 * K)):
        await m.write(off, pattern(i, 256 * K))
    await m.write(10 * M + 100, b"\x5f" * 70000)
    await m.img.flush()
    await m.trim(M, 512 * K)
    await m.write(11 * M, pattern(51, 10000))
    await m.verify()
    await close_and_check(m, path, tmp_path)
    rt_after = struct.unpack_from(">QI", open(path, "rb").read(60), 48)
    if rb >= 16:
        assert rt_after[1] > rt_before[1], "the refcount table should have moved and grown"
    qemu_io(path, f"read -P 0x5f {10 * M + 100} 70000", f"read -P 0 {M} {512 * K}")


async def test_pattern_writes_read_by_qemu_io(tmp_path):
    path = create(tmp_path / "img.qcow2", 4 * M, cluster_size=4096)
    img = Qcow2Image.open(path)
    await img.pwrite(1000, b"\xab" * 10000)
    await img.pwrite(3 * M - 7, b"\xcd" * 70000)
    await img.close()
    check(path)
    qemu_io(path, "read -P 0xab 1000 10000", "read -P 0 0 1000", "read -P 0 11000 4000",
            f"read -P 0xcd {3 * M - 7} 70000")


@pytest.mark.parametrize("backing_kind", ["qcow2", "raw"])
async def test_overlay_cow_reads_backing(tmp_path, backing_kind):
    size = 2 * M
    base_data = pattern(7, size)
    if backing_kind == "raw":
        (tmp_path / "base.img").write_bytes(base_data)
        base = "base.img"
    else:
        base = "base.qcow2"
        create(tmp_path / base, size, cluster_size=4096)
        (tmp_path / "b.raw").write_bytes(base_data)
        qemu_img("convert", "-n", "-f", "raw", "-O", "qcow2", str(tmp_path / "b.raw"), str(tmp_path / base))
    top = create(tmp_path / "top.qcow2", size, backing=base, backing_fmt=backing_kind, cluster_size=65536)
    m = Mirror(Qcow2Image.open(top), base_data, backing=base_data)
    await m.write(100, b"\x01" * 10)                    # head and tail COW from the backing file
    await m.write(65536 * 3 - 5, b"\x02" * 10)           # across a cluster boundary
    await random_ops(m, seed=5, n=40, max_len=150000)
    await close_and_check(m, top, tmp_path)


async def test_overlay_larger_than_backing(tmp_path):
    (tmp_path / "base.img").write_bytes(pattern(8, 100 * K))
    top = create(tmp_path / "top.qcow2", M, backing="base.img", backing_fmt="raw", cluster_size=65536)
    m = Mirror(Qcow2Image.open(top), pattern(8, 100 * K) + bytes(M - 100 * K), backing=pattern(8, 100 * K))
    await m.write(98 * K, b"\x09" * 100)                 # COW tail crosses the backing file's end
    await m.write(500 * K, b"\x0a" * 100)
    await m.verify()
    await close_and_check(m, top, tmp_path)


async def test_compressed_clusters_overwritten(tmp_path):
    src = tmp_path / "src.raw"
    data = bytearray((b"squeeze me " * 200000)[:2 * M])
    src.write_bytes(data)
    path = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", str(src), str(path))
    m = Mirror(Qcow2Image.open(str(path)), data)
    await m.write(70000, b"\x11" * 1000)                  # partial: COW from the compressed cluster
    await m.write(65536 * 4, b"\x12" * 65536)             # whole cluster replaced
    await m.write(65536 * 6 - 100, b"\x13" * 200)         # straddling two compressed clusters
    await m.trim(65536 * 10, 65536 * 2)
    await m.zero(65536 * 14, 65536, may_trim=False)
    await m.zero(65536 * 16 + 5, 65536 + 100)
    await m.verify()
    await close_and_check(m, path, tmp_path)


async def test_discard_v2_reads_backing_v3_reads_zero(tmp_path):
    base_data = pattern(9, M)
    (tmp_path / "base.img").write_bytes(base_data)
    for compat in ("0.10", "1.1"):
        top = create(tmp_path / f"top-{compat}.qcow2", M, backing="base.img", backing_fmt="raw",
                     compat=compat, cluster_size=4096)
        m = Mirror(Qcow2Image.open(top), base_data, backing=base_data)
        await m.write(0, pattern(10, 256 * K))
        await m.img.flush()
        await m.trim(4096 * 3 + 100, 4096 * 10)            # partial clusters at the edges stay
        await m.trim(512 * K, 64 * K)                       # never written here
        await m.verify()
        expect = bytes(4096 * 9) if compat == "1.1" else base_data[4096 * 4:4096 * 13]
        assert await m.img.pread(4096 * 4, 4096 * 9) == expect
        await close_and_check(m, top, tmp_path)


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
async def test_freed_clusters_reused_after_flush(tmp_path, compat):
    path = create(tmp_path / "img.qcow2", 16 * M, compat=compat, cluster_size=65536)
    m = Mirror(Qcow2Image.open(path), bytes(16 * M))
    await m.write(0, pattern(1, 4 * M))
    await m.img.flush()
    grown = os.stat(path).st_size
    await m.trim(0, 4 * M)
    await m.img.flush()
    await m.write(8 * M, pattern(2, 4 * M))
    await m.img.flush()
    # the new data went into the freed clusters; at most a new L2 table was added
    assert os.stat(path).st_size <= grown + 65536
    await m.verify()
    await close_and_check(m, path, tmp_path)


@pytest.mark.parametrize("may_trim", [False, True])
@pytest.mark.parametrize("with_backing", [False, True])
async def test_write_zeroes(tmp_path, may_trim, with_backing):
    base_data = pattern(11, 2 * M)
    (tmp_path / "base.img").write_bytes(base_data)
    kw = dict(backing="base.img", backing_fmt="raw") if with_backing else {}
    path = create(tmp_path / "img.qcow2", 2 * M, cluster_size=65536, **kw)
    m = Mirror(Qcow2Image.open(path), base_data if with_backing else bytes(2 * M),
               backing=base_data if with_backing else None)
    await m.write(0, pattern(12, M))
    await m.zero(100, 300000, may_trim=may_trim)                     # partial head and tail
    await m.zero(M - 65536, 3 * 65536, may_trim=may_trim)             # allocated and not
    await m.zero(2 * M - 65536, 65536, may_trim=may_trim)
    await m.img.flush()
    await m.write(65536 * 2 + 1, b"\x33" * 5)                         # into a zeroed cluster
    await m.verify()
    await close_and_check(m, path, tmp_path)
    if not may_trim:
        # NO_HOLE: the whole zeroed clusters inside the written range keep a host offset
        zeroed = [e for e in qemu_map(path) if e["zero"] and e["start"] >= 65536 * 3
                  and e["start"] < 4 * 65536 and e["depth"] == 0]
        assert zeroed and all("offset" in e for e in zeroed)


async def test_write_zeroes_v2_writes_zeros(tmp_path):
    path = create(tmp_path / "img.qcow2", M, compat="0.10", cluster_size=4096)
    m = Mirror(Qcow2Image.open(path), bytes(M))
    await m.write(0, pattern(13, M))
    await m.zero(5000, 300000)
    with pytest.raises(OSError):
        await m.img.zero(0, 4096, fast=True)
    await m.verify()
    await close_and_check(m, path, tmp_path)


async def test_lazy_refcounts_dirty_bit(tmp_path):
    path = create(tmp_path / "img.qcow2", 4 * M, lazy_refcounts="on")

    def incompatible() -> int:
        with open(path, "rb") as f:
            return struct.unpack_from(">Q", f.read(80), 72)[0]

    assert incompatible() & 1 == 0
    m = Mirror(Qcow2Image.open(path), bytes(4 * M))
    await m.write(12345, pattern(14, 300000))
    await m.img.flush()
    assert incompatible() & 1, "dirty bit must be set while lazy refcounts may be stale"
    await m.write(3 * M, pattern(15, 1000))
    await m.verify()
    await close_and_check(m, path, tmp_path)
    assert incompatible() & 1 == 0
    assert info(path)["format-specific"]["data"]["lazy-refcounts"] is True


async def test_reopen_and_continue(tmp_path):
    """Metadata written by one session is what the next one finds."""
    path = create(tmp_path / "img.qcow2", 2 * M, cluster_size=512)
    m = Mirror(Qcow2Image.open(path), bytes(2 * M))
    await random_ops(m, seed=21, n=30, max_len=20000)
    await m.img.close()
    check(path)
    m.img = Qcow2Image.open(path)
    await m.verify()
    await random_ops(m, seed=22, n=30, max_len=20000)
    await close_and_check(m, path, tmp_path)
    assert convert_raw(path, tmp_path) == bytes(m.ref)


# ------------------------------------------------------------------ qemu-iotests 047

async def iotest_047(path, allocator: str) -> None:
    img = Qcow2Image.open(path, allocator=allocator)
    await img.pwrite(0, b"\x66" * (320 * K))
    await img.pwrite(320 * K, b"\xcd" * (128 * K))
    await img.pwrite(M, b"\x55" * (128 * K))
    await img.pwrite(448 * K, b"\x88" * (128 * K))
    await img.trim(320 * K, 128 * K)
    await img.flush()
    await img.pwrite(0, b"\x77" * (480 * K))
    await img.flush()
    await img.close()


async def test_iotest_047_fixed(tmp_path):
    path = create(tmp_path / "img.qcow2", 128 * M)
    await iotest_047(path, "fixed")
    check(path)
    qemu_io(path, "read -P 0x77 0 480k", "read -P 0x88 480k 96k", "read -P 0x55 1M 128k")


async def test_iotest_047_qemu_112_corrupts(tmp_path):
    path = create(tmp_path / "img.qcow2", 128 * M)
    await iotest_047(path, "qemu-1.1.2")
    qemu_io(path, "read -P 0x77 0 480k", "read -P 0x88 480k 96k", "read -P 0x55 1M 32k",
            "read -P 0x88 1056k 32k", "read -P 0x55 1088k 64k")
    img = Qcow2Image.open(path, read_only=True)
    try:
        assert await img.pread(M + 32 * K, 32 * K) == b"\x88" * (32 * K)
    finally:
        await img.close()


async def test_writes_after_internal_snapshot(tmp_path):
    """qemu-img snapshot leaves L1/L2 entries without COPIED (refcount 2): writes must copy the
    L2 table and the data clusters, and the snapshot must still read what it read before."""
    path = create(tmp_path / "img.qcow2", 2 * M, cluster_size=4096)
    base = pattern(30, 2 * M)
    (tmp_path / "b.raw").write_bytes(base)
    qemu_img("convert", "-n", "-f", "raw", "-O", "qcow2", str(tmp_path / "b.raw"), path)
    qemu_img("snapshot", "-c", "s1", path)
    m = Mirror(Qcow2Image.open(path), base)
    await random_ops(m, seed=31, n=40, max_len=40000)
    await close_and_check(m, path, tmp_path)
    snap = tmp_path / "snap.raw"
    qemu_img("convert", "-l", "snapshot.name=s1", "-O", "raw", path, str(snap))
    assert snap.read_bytes() == base


async def test_qemu112_writer_clears_bitmaps_autoclear_bit(tmp_path):
    """qcow2.txt: a program that does not update persistent dirty bitmaps must clear the bitmaps
    autoclear bit before writing; otherwise qemu trusts a bitmap that misses our writes (and an
    incremental backup silently skips them).  The qemu-1.1.2 modes are such a program, as qemu
    1.1.2 was (the fixed allocator keeps bitmaps up to date: tests/test_bitmaps.py)."""
    path = create(tmp_path / "img.qcow2", M)
    qemu_img("bitmap", "--add", path, "b0")

    def autoclear() -> int:
        with open(path, "rb") as f:
            return struct.unpack_from(">Q", f.read(96), 88)[0]

    assert autoclear() & 1
    img = Qcow2Image.open(path, read_only=True)
    await img.close()
    assert autoclear() & 1, "a read-only open must leave the image alone"
    img = Qcow2Image.open(path, allocator="qemu-1.1.2")
    await img.pwrite(0, b"\x42" * 65536)
    await img.close()
    assert autoclear() & 1 == 0
    # qemu now ignores the stale bitmap ("a program lacking bitmap support modified this file");
    # its clusters are leaked, which qemu calls harmless: no corruption
    assert "bitmaps" not in info(path)["format-specific"]["data"]
    p = qemu_img("check", "--output=json", path, check=False)
    assert p.returncode in (0, 3), p.stdout + p.stderr
    assert json.loads(p.stdout).get("corruptions", 0) == 0
    qemu_io(path, "read -P 0x42 0 64k")


@pytest.mark.parametrize("seed", range(4))
async def test_l2_cache_pressure_concurrent(tmp_path, monkeypatch, seed):
    """A 4-table L2 cache over a 512-byte-cluster image (32 L2 tables): tables are evicted and
    written back constantly while concurrent writes, zeroes and reads (blkdebug delays make them
    interleave) change them; nothing may be lost."""
    import nbdserve.qcow2.image as image_mod
    monkeypatch.setattr(image_mod, "L2_CACHE_BYTES", 4 * 512)     # the cache size knob
    size = M
    path = create(tmp_path / "img.qcow2", size, cluster_size=512)
    delays = {e: 1e-4 for e in ("write_aio", "cow_read", "l2_update", "l1_update", "l2_alloc_write")}
    img = Qcow2Image.open(path, delays=delays)
    m = Mirror(img, bytes(size))
    rnd = random.Random(seed)

    async def op(i: int, off: int, n: int) -> None:
        k = rnd.random()
        if k < 0.6:
            await m.write(off, pattern(seed * 1000 + i, n))
        elif k < 0.8:
            await m.zero(off, n, may_trim=rnd.random() < 0.5)
        else:
            assert await img.pread(off, n) == m.ref[off:off + n]

    for r in range(25):
        points = sorted(rnd.sample(range(size), 8))
        async with trio.open_nursery() as nursery:
            for j in range(4):
                nursery.start_soon(op, r * 10 + j, points[2 * j], points[2 * j + 1] - points[2 * j])
        if rnd.random() < 0.2:
            await img.flush()
    await m.verify()
    await close_and_check(m, path, tmp_path)


@pytest.mark.parametrize("seed", range(6))
async def test_concurrent_overlapping_writes_lose_nothing(tmp_path, seed):
    """Overlapping writes in flight together (qemu-iotests 046 territory): the order is not
    defined, but every byte some write covered must hold one of those writes' bytes (a stale
    copy-on-write would bring back the old contents), and the metadata must check clean."""
    cs = 4096 if seed % 2 else 65536
    size = 24 * cs
    path = create(tmp_path / "img.qcow2", size, cluster_size=cs)
    original = pattern(seed, size)
    (tmp_path / "o.raw").write_bytes(original)
    if seed % 3:
        qemu_img("convert", "-n", "-f", "raw", "-O", "qcow2", str(tmp_path / "o.raw"), path)
    else:
        original = bytes(size)
    delays = {e: 2e-4 for e in ("write_aio", "cow_read", "cow_write", "l2_update")}
    img = Qcow2Image.open(path, delays=delays)
    rnd = random.Random(seed)
    before = original
    for r in range(8):
        writes = []
        for k in range(5):
            off = rnd.randrange(0, size - 1)
            n = rnd.randrange(1, min(size - off, 3 * cs))
            writes.append((off, n, 1 + (r * 5 + k) % 254))
        async with trio.open_nursery() as nursery:
            for off, n, fill in writes:
                nursery.start_soon(img.pwrite, off, bytes([fill]) * n)
        got = await img.pread(0, size)
        bounds = sorted({0, size} | {o for o, _, _ in writes} | {o + n for o, n, _ in writes})
        for a, b in zip(bounds, bounds[1:]):
            fills = {f for o, n, f in writes if o <= a and b <= o + n}
            if fills:
                assert set(got[a:b]) <= fills, f"round {r}: a write to [{a}, {b}) was lost"
            else:
                assert got[a:b] == before[a:b], f"round {r}: [{a}, {b}) changed unwritten"
        before = bytes(got)
    await img.close()
    check(path)


async def test_extended_l2_subclusters_from_qemu_then_partial_writes(tmp_path):
    """qemu leaves clusters with some subclusters allocated, some zero, some falling through to
    the backing file; engine writes into them copy the guest view of the rest."""
    base = pattern(40, M)
    (tmp_path / "base.img").write_bytes(base)
    path = create(tmp_path / "img.qcow2", M, backing="base.img", backing_fmt="raw",
                  extended_l2="on", cluster_size=65536)
    qemu_io(path, "write -P 0x61 2k 2k", "write -z 8k 4k", "write -P 0x62 66k 1k",
            "write -z 130k 2k", "write -P 0x63 200k 64k")
    m = Mirror(Qcow2Image.open(path), convert_raw(path, tmp_path), backing=base)
    await m.write(40 * K + 3, b"\x71" * 100)          # same cluster as the subclusters above
    await m.write(64 * K + 500, b"\x72" * 70000)       # across two partly allocated clusters
    await m.zero(129 * K, 3 * K)
    await m.trim(192 * K, 64 * K)
    await m.verify()
    await close_and_check(m, path, tmp_path)


@pytest.mark.parametrize("extended_l2", ["off", "on"])
def test_write_zeroes_no_hole_keeps_the_allocation(nbdserve, tmp_path, extended_l2):
    """proto.md: NBD_CMD_FLAG_NO_HOLE "the server MUST NOT" deallocate; qemu keeps the host
    cluster and flags it zero (QCOW2_SUBCLUSTER_ZERO_ALLOC), with and without extended L2.
    The same zeroing by qemu-io (write -z without -u: no unmap) on a twin image must give
    the same map, host offsets aside."""
    nbd = import_libnbd()
    ours = create(tmp_path / "ours.qcow2", "4M", extended_l2=extended_l2)
    theirs = create(tmp_path / "theirs.qcow2", "4M", extended_l2=extended_l2)
    for path in (ours, theirs):
        qemu_io(path, "write -P 0x5a 0 1M")
    qemu_io(theirs, "write -z 64k 512k")
    srv = nbdserve("serve", ours, "-f", "qcow2", "-x", "d")
    h = nbd.NBD()
    h.connect_uri(srv.uri)
    h.zero(512 * 1024, 64 * 1024, flags=nbd.CMD_FLAG_NO_HOLE)    # count, offset
    h.shutdown()
    assert srv.stop() == 0

    def shape(path):
        return [(e["start"], e["length"], e["zero"], e["data"], "offset" in e) for e in qemu_map(path)]
    assert shape(ours) == shape(theirs)
    assert any(e["zero"] and "offset" in e for e in qemu_map(ours))
    qemu_io(ours, "read -P 0x5a 0 64k", "read -P 0 64k 512k", "read -P 0x5a 576k 448k")
    check(ours)


def test_small_writes_allocate_fresh_clusters_whole_as_qemu_does(nbdserve, tmp_path):
    """qemu 7: handle_alloc_space(): a write into a fresh cluster whose copy-on-write regions
    read as zeros zeroes the new cluster whole with fallocate(2) (ZERO_RANGE: unwritten blocks
    on ext4), so the small writes that land in it later find its blocks allocated.  The same
    writes through nbdserve (qemu-io over NBD) and by qemu-io on a twin image leave files of
    the same size holding the same number of blocks; a whole-cluster write allocates no more."""
    cmds = ["write -P 0x5a 4k 4k", "write -P 0x5b 200k 8k", "write -P 0x5c 1M 64k", "write -P 0x5d 2047k 1k"]
    ours = create(tmp_path / "ours.qcow2", "4M")
    theirs = create(tmp_path / "theirs.qcow2", "4M")
    before = os.stat(ours).st_blocks
    qemu_io(theirs, *cmds)
    srv = nbdserve("serve", ours, "-f", "qcow2", "-x", "d")
    qemu_io(srv.uri, *cmds, fmt="raw")
    assert srv.stop() == 0
    a, b = os.stat(ours), os.stat(theirs)
    assert (a.st_size, a.st_blocks) == (b.st_size, b.st_blocks)
    # four data clusters (three of them with COW around the write) and one L2 table, 64 KiB each,
    # at least: the fresh clusters are not left with holes around what was written
    assert (a.st_blocks - before) * 512 >= 5 * 64 * K
    qemu_io(ours, "read -P 0x5a 4k 4k", "read -P 0 8k 192k", "read -P 0x5b 200k 8k", "read -P 0x5c 1M 64k",
            "read -P 0x5d 2047k 1k", "read -P 0 0 4k")
    check(ours)
