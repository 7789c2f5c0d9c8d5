"""Lazy refcounts: an image that qemu left dirty (qemu-iotests 039) is repaired on a read-write open."""

from __future__ import annotations

import subprocess

from nbdserve.qcow2 import Qcow2Image


def run(*argv, check=False):
    return subprocess.run(argv, capture_output=True, text=True, check=check)


async def test_dirty_lazy_refcounts_image_is_repaired_on_open(tmp_path):
    path = str(tmp_path / "lazy.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", path, "64M", check=True)
    # qemu-io's abort leaves the dirty bit set and the refcounts stale, as a crash would
    run("qemu-io", "-c", "write -P 0x5a 512 64k", "-c", "abort", path)
    before = run("qemu-img", "check", path)
    assert before.returncode != 0, before.stdout       # stale refcounts: qemu-img sees errors

    img = Qcow2Image.open(path)
    assert await img.pread(512, 65536) == b"\x5a" * 65536
    await img.pwrite(1 << 20, b"\xa5" * 4096)
    await img.close()

    after = run("qemu-img", "check", path)
    assert after.returncode == 0, after.stdout
    reads = run("qemu-io", "-c", "read -P 0x5a 512 64k", "-c", "read -P 0xa5 1M 4k", path)
    assert "Pattern verification failed" not in reads.stdout and reads.returncode == 0
