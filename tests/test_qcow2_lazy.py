"""Lazy refcounts: an image that qemu left dirty (qemu-iotests 039) is repaired on a read-write open."""

from __future__ import annotations

from nbdserve.qcow2 import Qcow2Image
from qemu_tools import check, create, qemu_img, qemu_io


async def test_dirty_lazy_refcounts_image_is_repaired_on_open(tmp_path):
    path = str(tmp_path / "lazy.qcow2")
    create(path, "64M", lazy_refcounts="on")
    # qemu-io's abort leaves the dirty bit set and the refcounts stale, as a crash would
    qemu_io(path, "write -P 0x5a 512 64k", "abort", check=False)
    before = qemu_img("check", path, check=False)
    assert before.returncode != 0, before.stdout       # stale refcounts: qemu-img sees errors

    img = Qcow2Image.open(path)
    assert await img.pread(512, 65536) == b"\x5a" * 65536
    await img.pwrite(1 << 20, b"\xa5" * 4096)
    await img.close()

    check(path)
    qemu_io(path, "read -P 0x5a 512 64k", "read -P 0xa5 1M 4k")
