"""A corrupted file's culprits through ext4's block map (nbdserve/reproduce/filemap.py).

An ext4 base holding one file of 0x55 bytes, and qemu-iotests 047 played over NBD against
its overlay under qemu-1.1.2 in a free part of the disk, with the file's first two whole
clusters in the role of 047's ``write -P 0x55 1M 128k`` (rewritten with the bytes they hold),
on the whole disk and in a partition at sector 63 (as the Debian guest's):
the stale tail COW of ``write -P 0x77 R 480k`` lands in the file's first whole cluster, from
32K to its end. debugfs reads the file back from the converted overlay, and the culprits name
exactly those blocks.
"""

from __future__ import annotations

import subprocess

import pytest

from nbdserve.reproduce.filemap import file_culprits
from qemu_tools import create, qemu_img, qemu_io

K = 1024
CS = 64 * K
R = 56 << 20          # a free part of the 64 MiB file system (no journal: nothing else lives there)


def blocks(raw, path) -> list[int]:
    p = subprocess.run(["debugfs", "-R", f"blocks /{path}", str(raw)], capture_output=True, text=True, check=True)
    return [int(b) for b in p.stdout.split()]


def dump(raw, path, out) -> bytes:
    subprocess.run(["debugfs", "-R", f"dump /{path} {out}", str(raw)], capture_output=True, check=True)
    return out.read_bytes()


@pytest.mark.parametrize("fs_offset", [0, 63 * 512], ids=["whole-disk", "partition-at-sector-63"])
async def test_stale_tail_cow_into_a_file(nbdserve, tmp_path, fs_offset):
    tree = tmp_path / "tree" / "d"
    tree.mkdir(parents=True)
    (tree / "f").write_bytes(b"\x55" * (1 << 20))
    fs = tmp_path / "fs.raw"
    with open(fs, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-O", "^has_journal", "-d", str(tmp_path / "tree"),
                    str(fs)], check=True, capture_output=True)
    file_blocks = blocks(fs, "d/f")
    assert len(file_blocks) == 256
    raw = tmp_path / "disk.raw"                 # the file system from byte fs_offset on
    with open(raw, "wb") as f:
        f.truncate(fs_offset + (65 << 20))
        f.seek(fs_offset)
        f.write(fs.read_bytes())
    # guest byte -> (fs block) of the file; the first two whole clusters that hold only its bytes
    owned = set(file_blocks)
    c = next(g for g in range(0, 64 << 20, CS)
             if all((g + i - fs_offset) // 4096 in owned for i in range(0, 2 * CS, 512)))
    assert R > fs_offset + max(file_blocks) * 4096
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(tmp_path / "base.qcow2"))
    top = create(tmp_path / "top.qcow2", str(fs_offset + (65 << 20)), backing="base.qcow2", backing_fmt="qcow2")
    trace = tmp_path / "trace.jsonl"
    server = nbdserve("serve", top, "-x", "top", "--allocator", "qemu-1.1.2", "--trace", trace)
    qemu_io(server.uri, f"write -P 0x66 {R} 320k", f"write {R + 320 * K} 128k", f"write -P 0x55 {c} 128k",
            f"write -P 0x88 {R + 448 * K} 128k", f"discard {R + 320 * K} 128k", "aio_flush",
            f"write -P 0x77 {R} 480k", fmt="raw")
    assert server.stop() == 0

    # the file read back by debugfs: 0x88 exactly where guest c+32K..c+64K lies in it
    out = tmp_path / "overlay.raw"
    qemu_img("convert", "-O", "raw", top, str(out))
    part = tmp_path / "overlay-fs.raw"
    with open(out, "rb") as f:
        f.seek(fs_offset)
        part.write_bytes(f.read(64 << 20))
    content = dump(part, "d/f", tmp_path / "f.out")
    expected = bytearray(b"\x55" * (1 << 20))
    for i, b in enumerate(file_blocks):
        for j in range(4096):
            if c + 32 * K <= fs_offset + b * 4096 + j < c + CS:
                expected[i * 4096 + j] = 0x88
    assert content == expected

    lines = await file_culprits(top, str(trace), ["d/f"], CS, str(tmp_path), fs_offset=fs_offset)
    fs_byte = c + 32 * K - fs_offset
    first, last = fs_byte // 4096, (fs_byte + 32 * K - 1) // 4096
    in_file = file_blocks.index(first) * 4096 + fs_byte % 4096
    [line] = lines["d/f"]
    assert line.startswith(f"bytes {in_file:#x}+32K (fs blocks {first}..{last}) = guest {c + 32 * K:#x}+32K: "
                           f"stale tail COW of the write at {R:#x}+480K (keep 5, new 2, case (a)), copied from guest "
                           f"{R + 480 * K:#x}, landed in host cluster "), line
    assert line.endswith(f"(guest {c:#x}..)")
