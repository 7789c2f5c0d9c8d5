"""The culprits of a guest run's corrupted files: each file's blocks through ext4's block map
(``debugfs -R "blocks PATH"`` on the overlay converted to raw), then through the overlay's
``qemu-img map`` and the run's allocation trace to the write that last put bytes there.

Which of a file's blocks are bad is not known (the guest only says its md5sum differs); the
suspects are the blocks a COW last wrote while outside its allocation's new clusters (a
stale COW), the only way the qemu-1.1.2 model writes bytes where they do not belong.
"""

from __future__ import annotations

import json
import os
import re
import struct

import trio

from ..qcow2.trace import read_trace
from .culprits import allocations_of, describe_culprit, find_culprits, offset_text, size_text

EXT4_SUPER = 1024          # the superblock's offset in the file system
EXT4_MAGIC = 0xEF53


def ext4_block_size(raw: str, fs_offset: int = 0) -> int:
    """s_log_block_size of the ext4 file system ``raw`` holds from byte ``fs_offset``."""
    with open(raw, "rb") as f:
        f.seek(fs_offset + EXT4_SUPER)
        sb = f.read(64)
    log, = struct.unpack_from("<I", sb, 24)
    magic, = struct.unpack_from("<H", sb, 56)
    if magic != EXT4_MAGIC:
        raise ValueError(f"{raw}: no ext4 file system at byte {fs_offset}")
    return 1024 << log


_EXTENT = re.compile(r"\((\d+)(?:-(\d+))?\):(\d+)(?:-(\d+))?")   # (file blocks):fs blocks; not (ETB0) or (IND)


async def file_blocks(raw: str, path: str, fs_offset: int = 0) -> list[int] | None:
    """File system block numbers of ``path``'s data (from the file system's root), in file
    order (holes left out), from debugfs ``stat``'s EXTENTS (or BLOCKS) list, which also names
    the extent tree's own blocks, unlike the data's; None when the file system no longer has it.
    A file system from byte ``fs_offset`` on (a partition) is opened as e2fsprogs' "FILE?offset=N"."""
    device = f"{raw}?offset={fs_offset}" if fs_offset else raw
    quoted = path.lstrip("/").replace("\\", "\\\\").replace('"', '\\"')
    r = await trio.run_process(["debugfs", "-R", f'stat "/{quoted}"', device],
                               capture_stdout=True, capture_stderr=True, check=False)
    text, err = r.stdout.decode(), r.stderr.decode()
    if "File not found" in err:
        return None
    marker = max(text.rfind("EXTENTS:"), text.rfind("BLOCKS:"))
    if r.returncode or marker < 0:
        raise RuntimeError(f"debugfs stat /{path.lstrip('/')}: {' '.join(err.split()[-8:]) or 'no block list'}")
    blocks: list[tuple[int, int]] = []
    for first, last, start, _ in _EXTENT.findall(text[marker:]):
        count = int(last or first) - int(first) + 1
        blocks += [(int(first) + i, int(start) + i) for i in range(count)]
    return [b for _, b in sorted(blocks)]


def stale_cow(c: dict, allocations: list[dict], cluster_size: int) -> bool:
    if c["by"] not in ("head_cow", "tail_cow"):
        return False
    a = allocations[c["allocation"]]
    return not a["host_offset"] <= c["host_offset"] < a["host_offset"] + a["nb_clusters"] * cluster_size


async def file_culprits(image: str, trace_path: str, paths: list[str], cluster_size: int,
                        workdir: str, fs_offset: int = 0) -> dict[str, list[str] | None]:
    """path -> one line per run of its bytes that a stale COW wrote last ("bytes OFFSET+LENGTH
    (fs blocks A..B) = guest ..."; none: an empty list; None: the file was removed after its
    check, as the guest removes packages).  A file debugfs cannot reach because its directory's
    block fails its checksum (the corruption hit the directory) is answered by that directory's
    own blocks.  ``fs_offset``: the byte of the disk where the file system starts (its partition's)."""
    raw = os.path.join(workdir, "overlay.raw")
    await trio.run_process(["qemu-img", "convert", "-O", "raw", image, raw], capture_stdout=True,
                           capture_stderr=True)
    try:
        mapped = await trio.run_process(["qemu-img", "map", "--output=json", image], capture_stdout=True)
        host_map = json.loads(mapped.stdout)
        trace = read_trace(trace_path)
        allocations = allocations_of(trace)
        bs = ext4_block_size(raw, fs_offset)

        def stale_lines(blocks: list[int], prefix: str = "") -> list[str]:
            index = {b: i for i, b in enumerate(blocks)}   # fs block -> its block in the file
            lines = []
            for c in find_culprits([(fs_offset + b * bs, bs) for b in blocks], trace, host_map, cluster_size):
                if stale_cow(c, allocations, cluster_size):
                    fs_byte = c["guest_offset"] - fs_offset
                    first, last = fs_byte // bs, (fs_byte + c["length"] - 1) // bs
                    in_file = index[first] * bs + fs_byte % bs
                    blocks_text = f"block {first}" if last == first else f"blocks {first}..{last}"
                    lines.append(f"{prefix}bytes {offset_text(in_file)}+{size_text(c['length'])} (fs {blocks_text})"
                                 f" = guest " + describe_culprit(c, allocations, trace, cluster_size))
            return lines

        out: dict[str, list[str] | None] = {}
        for path in paths:
            try:
                blocks = await file_blocks(raw, path, fs_offset)
            except RuntimeError as e:   # e.g. metadata the corruption hit: one file, not the run
                parent = os.path.dirname(path.rstrip("/"))
                if "checksum does not match directory block" not in str(e) or parent in ("", "/"):
                    out[path] = [f"not mapped: {e}"]
                    continue
                try:
                    found = await file_blocks(raw, parent, fs_offset)
                except RuntimeError:
                    out[path] = [f"not mapped: {e}"]
                    continue
                out[path] = stale_lines(found or [], f"its directory {parent} (a bad checksum): ")
                continue
            out[path] = None if blocks is None else stale_lines(blocks)
        return out
    finally:
        os.unlink(raw)
