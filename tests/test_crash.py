"""Crash consistency (issue 7): what a crash leaves passes ``qemu-img check`` and keeps every flushed write."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from nbdserve.qcow2 import Qcow2Image
from qemu_tools import check, check_no_corruption, convert_raw, create, needs_qemu, qemu_io

pytestmark = needs_qemu

K, MiB = 1024, 1 << 20


# ------------------------------------------------------------------ found by the crash tests
@pytest.mark.parametrize("request_kind", ["trim", "zero"])
async def test_discard_is_not_undone_by_a_concurrent_cow(tmp_path, request_kind):
    """A write of 4 KiB at 8 KiB into an unallocated 64 KiB cluster copies the rest of the cluster
    from the backing file into a new cluster, and points L2 at it afterwards.  A discard (or a
    write-zeroes) of the whole cluster completing in between must not be undone by that copy:
    0..8K were only ever discarded, so they read zeros, not the backing file's 0x22.
    (Found by a kill -9 crash test: a flushed discard came back as backing data.)"""
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
