"""The qemu-1.1.2 modes do what qemu 1.1.2's qcow2 driver did, over NBD from real clients.

Each expectation below is derived from qemu-kvm-1.1.2's block/qcow2-cluster.c,
qcow2-refcount.c and block.c (the function is named in each test), never from
nbdserve's own output; each was also seen with a hand-built qemu-io 1.1.2 on a file
(bench/compare_qemu112.py does that comparison for random scripts).  The images are
read back with Debian's qemu-img (map, check, convert).
"""

from __future__ import annotations

import json
import struct

import pytest

from qemu_tools import create, qemu_io, qemu_map, run

K = 1024
M = 1024 * K
MODES = ["qemu-1.1.2", "qemu-1.1.2+b7ab0fea"]


def over_nbd(nbdserve, image, allocator, *commands) -> str:
    """One qemu-io process over NBD against ``nbdserve serve --allocator``; the server stops
    (SIGTERM: flush and close) before the caller looks at the image."""
    srv = nbdserve("serve", str(image), "-f", "qcow2", "-x", "d", "--allocator", allocator)
    args = ["qemu-io", "-f", "raw", srv.uri]
    for c in commands:
        args += ["-c", c]
    out = run(args, check=False).stdout     # qemu-io exits 1 when a pattern check fails
    assert srv.stop() == 0
    return out


def host_of(path, guest: int) -> int | None:
    """The host offset qemu-img map gives for guest offset ``guest`` (None: not in this file)."""
    for e in qemu_map(path):
        if e["start"] <= guest < e["start"] + e["length"]:
            return e["offset"] + guest - e["start"] if e["data"] and "offset" in e and e["depth"] == 0 else None
    raise AssertionError(f"{guest:#x} not mapped")


def check_json(path) -> dict:
    p = run(["qemu-img", "check", "--output=json", str(path)], check=False)
    report = json.loads(p.stdout)
    report["exit"] = p.returncode
    return report


@pytest.mark.parametrize("allocator", MODES + ["fixed"])
async def test_iotest_047_one_process(nbdserve, tmp_path, allocator):
    """qemu-iotests 047 as qemu runs it: one qemu-io process.  qemu's client writes with FUA,
    so no NBD flush follows the discard; 1.1's discard_single_l2() frees the clusters at once
    (qcow2_free_any_clusters), the 0x77 write keeps guest 0..320K and takes the freed host
    clusters right after them (qcow2_alloc_clusters_at), and only 1.1.2's avail_sectors
    sends the tail COW into the next host cluster, guest 1M's."""
    img = create(tmp_path / "t.qcow2", "64M")
    out = over_nbd(nbdserve, img, allocator,
                   "write -P 0x66 0 320k", "write 320k 128k", "write -P 0x55 1M 128k",
                   "write -P 0x88 448k 128k", "discard 320k 128k", "aio_flush",
                   "write -P 0x77 0 480k", "aio_flush",
                   "read -P 0x77 0 480k", "read -P 0x88 480k 96k", "read -P 0x55 1M 128k")
    failures = out.count("Pattern verification failed")
    if allocator == "qemu-1.1.2":
        assert failures == 1 and "Pattern verification failed at offset 1048576" in out
        # 1M+32K..1M+64K holds guest 480K..512K's 0x88: the stale tail COW
        qemu_io(img, "read -P 0x55 1M 32k", "read -P 0x88 1056k 32k", "read -P 0x55 1088k 64k")
    else:
        assert failures == 0, out
    # the kept clusters and the reused ones are host-contiguous (fixed too: the frees are
    # applied at the close's flush only, so there the freed clusters are not reused)
    h0 = host_of(img, 0)
    if allocator in MODES:
        assert host_of(img, 320 * K) == h0 + 320 * K
    else:
        assert host_of(img, 320 * K) != h0 + 320 * K
    assert check_json(img)["exit"] == 0


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
@pytest.mark.parametrize("allocator", MODES + ["fixed"])
async def test_discard_shows_the_backing_file_again(nbdserve, tmp_path, allocator, compat):
    """1.1 discard_single_l2() sets the entry to 0, also on compat=1.1 images (1.1.2 has no
    zero-flag discard): the overlay reads its backing file there again.  ``fixed`` on v3
    leaves a zero cluster (reads zeros), as qemu >= 1.2 does."""
    base = create(tmp_path / "base.qcow2", "8M", compat=compat)
    qemu_io(base, "write -P 0x11 0 1M")
    top = create(tmp_path / "top.qcow2", "8M", backing="base.qcow2", cwd=tmp_path, compat=compat)
    out = over_nbd(nbdserve, top, allocator, "write -P 0x22 0 256k", "discard 64k 128k",
                   "read -P 0x22 0 64k", "read -P 0x22 192k 64k")
    assert "Pattern verification failed" not in out
    reads_zeros = allocator == "fixed" and compat == "1.1"
    qemu_io(top, f"read -P {0 if reads_zeros else 0x11} 64k 128k")
    assert check_json(top)["exit"] == 0


@pytest.mark.parametrize("allocator", MODES + ["fixed"])
async def test_discard_rounds_the_end_down_at_the_disk_end(nbdserve, tmp_path, allocator):
    """1.1 qcow2_discard_clusters(): the start is rounded up and the end down, even where the
    range ends at the end of a disk whose last cluster is partial: 1.1 keeps that cluster.
    ``fixed`` counts a partial last cluster as whole, as qemu >= 2.x does."""
    img = create(tmp_path / "t.qcow2", str(1 * M + 32 * K))
    over_nbd(nbdserve, img, allocator, "write -P 0x33 0 1056k", f"discard 960k {96 * K}")
    qemu_io(img, "read -P 0 960k 64k", f"read -P {0x33 if allocator in MODES else 0} 1024k 32k")


@pytest.mark.parametrize("allocator", MODES)
async def test_zero_write_keeps_the_allocation_and_a_later_write_leaks_it(nbdserve, tmp_path, allocator):
    """1.1 zero_single_l2(): an aligned write-zeroes ORs the zero flag into the entry and keeps
    the cluster; a later write sees a ZERO cluster (not kept: count_contiguous_clusters stops
    at QCOW_OFLAG_ZERO), allocates a new one, and qcow2_free_any_clusters() frees nothing for
    a QCOW2_CLUSTER_ZERO entry: the old cluster leaks (qemu-io 1.1.2 does the same)."""
    img = create(tmp_path / "t.qcow2", "8M", compat="1.1")
    over_nbd(nbdserve, img, allocator, "write -P 0x11 0 64k", "write -z 0 64k")
    [e] = [e for e in qemu_map(img) if e["start"] == 0]
    assert e["zero"] and "offset" in e            # zero flag, allocation kept
    over_nbd(nbdserve, img, allocator, "write -P 0x22 0 4k")
    qemu_io(img, "read -P 0x22 0 4k", "read -P 0 4k 60k")
    report = check_json(img)
    assert report["exit"] == 3 and report["leaks"] == 1 and report.get("corruptions", 0) == 0


@pytest.mark.parametrize("allocator", MODES)
async def test_unaligned_zero_write_is_written_as_data(nbdserve, tmp_path, allocator):
    """1.1 qcow2_co_write_zeroes() refuses requests not aligned to clusters (-ENOTSUP) and
    block.c writes a buffer of zeros instead: the range becomes allocated data."""
    img = create(tmp_path / "t.qcow2", "8M", compat="1.1")
    over_nbd(nbdserve, img, allocator, "write -z 4k 64k")
    data = [e for e in qemu_map(img) if e["data"]]
    assert [(e["start"], e["length"]) for e in data] == [(0, 128 * K)]
    qemu_io(img, "read -P 0 0 128k")


def refcount_table(path) -> list[int]:
    """The refcount table, read from the file with the qcow2.txt header layout (not nbdserve's)."""
    with open(path, "rb") as f:
        header = f.read(104)
        cluster_bits, = struct.unpack(">I", header[20:24])
        offset, clusters = struct.unpack(">QI", header[48:60])
        f.seek(offset)
        raw = f.read(clusters << cluster_bits)
    return list(struct.unpack(f">{len(raw) // 8}Q", raw))


@pytest.mark.parametrize("allocator", MODES + ["fixed"])
async def test_new_refcount_block_follows_the_clusters_it_counts(nbdserve, tmp_path, allocator):
    """512-byte clusters, 16-bit refcounts: one refcount block covers 256 clusters.  A 256K
    write allocates an L2 table and 64 data clusters per round.  In 1.1,
    alloc_clusters_noref() moves free_cluster_index past the whole run it found before
    update_refcount() counts it, and the block for clusters 256.. is allocated when counting
    reaches cluster 256: from free_cluster_index, i.e. right after the run holding cluster
    256 (qemu-io 1.1.2: refcount table [2, 295, 556] on this image).  ``fixed`` searches
    again after placing the block, which lands first, at the run's start."""
    img = create(tmp_path / "t.qcow2", "64M", cluster_size=512)
    over_nbd(nbdserve, img, allocator, "write -P 0x44 0 256k")
    table = refcount_table(img)
    runs = [(e["offset"], e["offset"] + e["length"]) for e in qemu_map(img) if e["data"]]
    [(start, end)] = [(s, e) for s, e in runs if s <= 256 * 512 < e]
    if allocator in MODES:
        assert table[1] == end
    else:
        assert table[1] == start - 512
    qemu_io(img, "read -P 0x44 0 256k")
    assert check_json(img)["exit"] == 0
