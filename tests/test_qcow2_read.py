"""Reading: images made by qemu-img/qemu-io read back byte-identical to ``qemu-img convert -O raw``,
and ``extents()`` agrees with ``qemu-img map``."""

from __future__ import annotations

import os
import random

import pytest

from nbdserve.qcow2 import Qcow2Error, Qcow2Image

from qemu_tools import (convert_raw, create, pattern, qemu_img, qemu_io, qemu_map, read_all,
                        shape_ids)

K, M = 1024, 1024 * 1024


def scribble(path, size: int, cs: int, seed: int, *, sub: int | None = None, n: int = 14) -> None:
    """Fill an image with qemu-io: patterned writes (some unaligned), zero writes and discards."""
    rnd = random.Random(seed)
    cmds = []
    for i in range(n):
        off = rnd.randrange(0, size - 512) & ~511
        if i % 4 == 3:
            off += rnd.randrange(1, 511)                    # byte-unaligned write
        length = min(rnd.randrange(1, 2 * cs + 1024), size - off)
        cmds.append(f"write -P {0x11 + i} {off} {length}")
    for _ in range(3):
        off = rnd.randrange(0, size // cs) * cs
        length = min(rnd.randrange(1, 3) * cs, size - off)
        cmds.append(f"write -z {off} {length}")
        off = rnd.randrange(0, size // cs) * cs
        cmds.append(f"discard {off} {min(cs * rnd.randrange(1, 3), size - off)}")
    if sub:
        # extended L2: single subclusters written, zeroed and discarded
        for j in range(6):
            off = rnd.randrange(0, size // sub) * sub
            cmds.append(f"write -P {0xa0 + j} {off} {sub}")
            cmds.append(f"write -z {rnd.randrange(0, size // sub) * sub} {sub}")
    cmds.append(f"write -P 0xee {size - 700} 700")           # the very end of a ragged image
    qemu_io(path, *cmds)


async def assert_reads_like_qemu(path, tmp_path) -> bytes:
    expected = convert_raw(path, tmp_path)
    img = Qcow2Image.open(str(path), read_only=True)
    try:
        assert img.size == len(expected)
        got = await read_all(img)
        assert got == expected
        # unaligned reads across cluster boundaries
        rnd = random.Random(len(expected))
        for _ in range(20):
            off = rnd.randrange(0, len(expected))
            n = rnd.randrange(0, min(len(expected) - off, 3 * img.cluster_size) + 1)
            assert await img.pread(off, n) == expected[off:off + n]
        # read_sparse covers the range and agrees
        joined = bytearray()
        for c in await img.read_sparse(0, len(expected)):
            assert c.offset == len(joined)
            joined += bytes(c.length) if c.data is None else c.data
        assert joined == expected
    finally:
        await img.close()
    return expected


SHAPES = [
    # compat, cluster_size, refcount_bits, extras
    ("0.10", 512, 16, {}),
    ("0.10", 65536, 16, {}),
    ("1.1", 512, 1, {}),
    ("1.1", 4096, 2, {}),
    ("1.1", 4096, 4, {}),
    ("1.1", 65536, 8, {}),
    ("1.1", 65536, 16, {}),
    ("1.1", 65536, 32, {}),
    ("1.1", 4096, 64, {}),
    ("1.1", 2 * M, 16, {}),
    ("1.1", 65536, 16, {"lazy_refcounts": "on"}),
    ("1.1", 65536, 16, {"extended_l2": "on"}),
    ("1.1", 32768, 64, {"extended_l2": "on"}),
]


@pytest.mark.parametrize("compat,cs,rb,extra", SHAPES,
                         ids=shape_ids(SHAPES))
async def test_read_shapes(tmp_path, compat, cs, rb, extra):
    # a size that is not a multiple of the cluster size, spanning several L2 tables for small clusters
    size = max(6 * cs, 384 * K) + 1536
    path = create(tmp_path / "img.qcow2", size, compat=compat, cluster_size=cs, refcount_bits=rb, **extra)
    sub = cs // 32 if extra.get("extended_l2") else None
    scribble(path, size, cs, seed=cs * 131 + rb, sub=sub)
    expected = await assert_reads_like_qemu(path, tmp_path)
    assert any(expected)


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
@pytest.mark.parametrize("cs", [4096, 65536])
async def test_read_compressed(tmp_path, ctype, cs):
    size = 2 * M + 4096
    raw = bytearray(size)
    for i in range(0, size, 3 * cs):
        chunk = bytes([i // cs & 0xff]) * 128 + pattern(i, 64) * (cs // 64 - 2)   # compressible
        raw[i:i + cs] = chunk[:size - i]
    raw[5 * cs:6 * cs] = pattern(7, cs)                                           # incompressible
    assert len(raw) == size
    src = tmp_path / "src.raw"
    src.write_bytes(bytes(raw))
    dst = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype},cluster_size={cs}",
             str(src), str(dst))
    # qemu-img map gives no host offset for compressed clusters
    assert any(m["data"] and "offset" not in m for m in qemu_map(dst))
    expected = await assert_reads_like_qemu(dst, tmp_path)
    assert expected == bytes(raw)


async def test_read_compressed_then_partly_overwritten_by_qemu(tmp_path):
    src = tmp_path / "src.raw"
    src.write_bytes((b"compressible " * 100000)[:M])
    dst = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", str(src), str(dst))
    qemu_io(dst, "write -P 0x5a 70000 1000", "write -z 200k 64k", "discard 512k 64k")
    await assert_reads_like_qemu(dst, tmp_path)


async def test_backing_chain_depth_4_relative_paths(tmp_path):
    """raw <- qcow2 v2 <- qcow2 v3 (512 B clusters) <- qcow2 v3, made with relative names from
    another working directory; read through the chain from here."""
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    size = 1 * M
    (d / "sub" / "base.raw").write_bytes(pattern(1, size))
    create(d / "sub" / "mid.qcow2", size, cwd=d / "sub", backing="base.raw", backing_fmt="raw", compat="0.10")
    create(d / "mid2.qcow2", size, cwd=d, backing="sub/mid.qcow2", compat="1.1", cluster_size=512)
    create(d / "top.qcow2", size, cwd=d, backing="mid2.qcow2", cluster_size=4096)
    qemu_io(d / "sub" / "mid.qcow2", "write -P 0x21 64k 100k", "write -P 0x22 900k 4k")
    qemu_io(d / "mid2.qcow2", "write -P 0x31 100k 3000", "write -z 300k 64k", "discard 900k 4k")
    qemu_io(d / "top.qcow2", "write -P 0x41 0 4096", "write -P 0x42 320k 10k", "write -z 500k 8k")
    old = os.getcwd()
    os.chdir(tmp_path)          # neither the images' folder nor the folder they were made in
    try:
        expected = await assert_reads_like_qemu(d / "top.qcow2", tmp_path)
    finally:
        os.chdir(old)
    assert expected[200 * K:201 * K] == pattern(1, size)[200 * K:201 * K]


async def test_backing_shorter_than_overlay(tmp_path):
    base = create(tmp_path / "base.qcow2", 200 * K, cluster_size=4096)
    qemu_io(base, f"write -P 0x77 0 {200 * K}")
    top = create(tmp_path / "top.qcow2", 1 * M + 512, backing="base.qcow2", cluster_size=65536)
    qemu_io(top, "write -P 0x55 900k 1k")
    expected = await assert_reads_like_qemu(top, tmp_path)
    assert expected[:200 * K] == b"\x77" * (200 * K)
    assert not any(expected[200 * K:900 * K])
    img = Qcow2Image.open(top, read_only=True)
    try:
        # a read straddling the end of the backing file
        assert await img.pread(190 * K, 20 * K) == b"\x77" * (10 * K) + bytes(10 * K)
    finally:
        await img.close()


async def test_backing_format_extension_honoured(tmp_path):
    """A raw backing file whose bytes start with the qcow2 magic: the backing format
    extension says raw, so it must be read raw, not probed."""
    data = bytearray(pattern(3, 256 * K))
    data[:4] = b"QFI\xfb"
    (tmp_path / "base.img").write_bytes(data)
    top = create(tmp_path / "top.qcow2", 256 * K, backing="base.img", backing_fmt="raw")
    qemu_io(top, "write -P 0x66 64k 64k")
    expected = await assert_reads_like_qemu(top, tmp_path)
    assert expected[:64 * K] == bytes(data[:64 * K])


async def test_backing_loop_is_an_error(tmp_path):
    create(tmp_path / "a.qcow2", M)
    create(tmp_path / "b.qcow2", M, backing="a.qcow2")
    qemu_img("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", str(tmp_path / "a.qcow2"))
    with pytest.raises(Qcow2Error, match="(?i)loop"):
        Qcow2Image.open(str(tmp_path / "b.qcow2"), read_only=True)


async def test_missing_backing_is_an_error(tmp_path):
    create(tmp_path / "base.qcow2", M)
    create(tmp_path / "top.qcow2", M, backing="base.qcow2")
    os.unlink(tmp_path / "base.qcow2")
    with pytest.raises(Qcow2Error, match="base.qcow2.*No such file"):
        Qcow2Image.open(str(tmp_path / "top.qcow2"), read_only=True)


# ------------------------------------------------------------------ extents vs qemu-img map

def qemu_runs(path) -> list[tuple[int, int, bool, bool, int]]:
    """qemu-img map as (start, length, data, zero, depth in our numbering): qemu's depth counts
    from 0 at the top and present=false means allocated nowhere (our depth 0)."""
    runs = []
    for m in qemu_map(path):
        depth = m["depth"] + 1 if m["present"] else 0
        runs.append((m["start"], m["length"], m["data"], m["zero"], depth))
    return merge(runs)


def merge(runs):
    out = []
    for r in runs:
        if r[1] == 0:
            continue
        if out and out[-1][2:] == r[2:] and out[-1][0] + out[-1][1] == r[0]:
            out[-1] = (out[-1][0], out[-1][1] + r[1], *r[2:])
        else:
            out.append(r)
    return out


async def our_runs(img) -> list[tuple[int, int, bool, bool, int]]:
    runs, pos = [], 0
    while pos < img.size:
        ext = await img.extents(pos, img.size - pos)
        assert ext and all(e.length > 0 for e in ext)
        for e in ext:
            runs.append((pos, e.length, e.data, e.zero, e.depth))
            pos += e.length
    assert pos == img.size
    return merge(runs)


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
async def test_extents_match_qemu_img_map(tmp_path, compat):
    base = create(tmp_path / "base.qcow2", 2 * M, cluster_size=65536, compat=compat)
    qemu_io(base, "write -P 1 0 256k", "write -P 2 1M 64k", "write -z 1536k 128k" if compat == "1.1"
            else "write -P 3 1536k 128k")
    mid = create(tmp_path / "mid.qcow2", 3 * M, backing="base.qcow2", compat=compat, cluster_size=65536)
    qemu_io(mid, "write -P 4 128k 64k", "write -P 5 2M 64k", "write -P 6 1M 64k")
    if compat == "1.1":
        qemu_io(mid, "write -z 192k 64k", "discard 1M 64k")
    top = create(tmp_path / "top.qcow2", 3 * M, backing="mid.qcow2", compat=compat, cluster_size=65536)
    qemu_io(top, "write -P 7 0 64k", "write -P 8 2560k 64k")
    if compat == "1.1":
        qemu_io(top, "write -z 2M 64k")
    img = Qcow2Image.open(str(top), read_only=True)
    try:
        ours = per_cluster(await our_runs(img), 65536)
    finally:
        await img.close()
    theirs = per_cluster(qemu_runs(top), 65536)
    assert [o[:4] for o in ours] == [t[:4] for t in theirs]
    for o, t in zip(ours, theirs):
        if t[4]:
            assert o[4] == t[4], (o, t)
        else:
            # qemu-img map: allocated nowhere.  Extent.depth follows NBD qemu:allocation-depth,
            # where a range past a backing file's end counts in that backing layer (checked
            # against qemu-nbd in test_server_chain.py); either way it reads as zeros.
            assert o[3] and not o[2], (o, t)


def per_cluster(runs, cs):
    """Split (start, length, ...) runs into cluster-sized ones, for a comparison by cluster."""
    out = []
    for start, length, *rest in runs:
        for pos in range(start, start + length, cs):
            out.append((pos, min(cs, start + length - pos), *rest))
    return out


async def test_extents_compressed_and_extended_l2(tmp_path):
    src = tmp_path / "src.raw"
    src.write_bytes(b"a" * (128 * K) + bytes(128 * K) + pattern(5, 64 * K))
    c = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", str(src), str(c))
    x = create(tmp_path / "x.qcow2", M, extended_l2="on", cluster_size=65536)
    qemu_io(x, "write -P 1 0 2k", "write -z 8k 2k", "write -P 2 64k 64k", "write -P 3 200k 4k")
    for path in (c, x):
        img = Qcow2Image.open(str(path), read_only=True)
        try:
            assert await our_runs(img) == qemu_runs(path)
        finally:
            await img.close()
