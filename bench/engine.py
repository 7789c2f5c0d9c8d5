"""Engine-level throughput of Qcow2Image, without NBD: 4 KiB and 1 MiB reads and writes.

    .venv/bin/python bench/engine.py [--size-mib 256] [--seconds 3]

"cached": the image file is in the page cache (just written); "uncached": the page
cache was dropped for the file first (posix_fadvise DONTNEED after fsync).
Writes go to a fresh image (allocating) and then again over it (in place).
Run by hand; prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time

import trio

from nbdserve.qcow2 import Qcow2Image
from nbdserve.qcow2.create import create_image


def drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


async def measure(label: str, op, size: int, block: int, seconds: float, sequential: bool) -> None:
    count = size // block
    rng = random.Random(1)
    done = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds and (not sequential or done < count):
        index = done % count if sequential else rng.randrange(count)
        await op(index * block, block)
        done += 1
    elapsed = time.perf_counter() - start
    print(f"{label:<34} {done / elapsed:10.0f} ops/s {done * block / elapsed / 2**20:9.1f} MiB/s")


async def main(size: int, seconds: float) -> None:
    folder = tempfile.mkdtemp(prefix="nbdserve-bench-")
    path = os.path.join(folder, "bench.qcow2")
    payload = {n: os.urandom(n) for n in (4096, 1 << 20)}
    for block, sequential in ((1 << 20, True), (4096, False)):
        kind = f"{'seq' if sequential else 'rand'} {block // 1024}K"
        create_image(path, size)
        img = Qcow2Image.open(path)
        write = lambda off, n: img.pwrite(off, payload[n])  # noqa: E731
        await measure(f"write {kind} (allocating)", write, size, block, seconds, sequential)
        await img.flush()
        await measure(f"write {kind} (in place)", write, size, block, seconds, sequential)
        await img.close()
        img = Qcow2Image.open(path, read_only=True)
        await measure(f"read {kind} (cached)", img.pread, size, block, seconds, sequential)
        await img.close()
        drop_cache(path)
        img = Qcow2Image.open(path, read_only=True)
        await measure(f"read {kind} (uncached)", img.pread, size, block, seconds, sequential)
        await img.close()
        os.unlink(path)
    os.rmdir(folder)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mib", type=int, default=256)
    p.add_argument("--seconds", type=float, default=3.0)
    a = p.parse_args()
    trio.run(main, a.size_mib << 20, a.seconds)
