"""The demo backing chain that ``nbdserve demo`` serves (conf/demo.toml): base.qcow2 with a
text line at each MiB, top.qcow2 on top of it, made with nbdserve's own qcow2 engine."""

from __future__ import annotations

import os
from pathlib import Path

DEMO_SIZE = 64 << 20


def demo_base_bytes(size: int) -> bytearray:
    """Recognisable content: every MiB starts with a line naming it."""
    data = bytearray(size)
    for mib in range(size >> 20):
        line = f"nbdserve demo base image: MiB {mib}\n".encode()
        data[mib << 20: (mib << 20) + len(line)] = line
    return data


async def _write_qcow2(path: Path, writes: list[tuple[int, bytes]]) -> None:
    from .qcow2 import Qcow2Image
    image = Qcow2Image.open(str(path))
    try:
        for offset, data in writes:
            await image.pwrite(offset, data)
        await image.flush()
    finally:
        await image.close()


def make_demo_chain(folder: Path) -> None:
    """base.qcow2 (text lines at each MiB) and top.qcow2 on top of it (0x54 'T' at 4M..4M+64k)
    in ``folder``; images already there are kept.  Raises OSError or Qcow2Error."""
    import trio

    from .qcow2.create import create_image

    folder.mkdir(parents=True, exist_ok=True)
    base, top = folder / "base.qcow2", folder / "top.qcow2"
    if not base.exists():
        part = folder / "base.qcow2.part"
        create_image(str(part), DEMO_SIZE)
        content = demo_base_bytes(DEMO_SIZE)
        trio.run(_write_qcow2, part, [(mib << 20, bytes(content[mib << 20: (mib << 20) + 4096]))
                                      for mib in range(DEMO_SIZE >> 20)])
        os.replace(part, base)
    if not top.exists():
        part = folder / "top.qcow2.part"
        create_image(str(part), DEMO_SIZE, backing="base.qcow2", backing_format="qcow2")
        trio.run(_write_qcow2, part, [(4 << 20, b"T" * (64 << 10))])
        os.replace(part, top)
