"""``qemu-img info`` and ``qemu-img map`` for qcow2 images: same JSON shapes, same human text.

``image_info`` reads the header only (like qemu-img info, which does not open
the backing file).  ``image_map`` opens the image and its backing chain
read-only and walks the guest -> host mapping of each layer; data clusters are
refined with the host file's holes (SEEK_DATA/SEEK_HOLE), as qemu does.
"""

from __future__ import annotations

import math
import os
import time

import trio

from ..blockdev.chain import OPEN_ANY, ChainPolicy, full_backing_filename
from ..blockdev.fileio import host_runs
from ..blockdev.probe import probe_format
from . import format as fmt
from .bitmaps import info_flags, read_directory
from .header import read_header
from .holes import metadata_preallocation
from .image import MAX_CHAIN_DEPTH, Qcow2Image
from .mapping import COMPRESSED, DATA, UNALLOCATED, ZERO
from .snapshot import read_snapshot_table

_COMPRESSION_NAMES = {fmt.COMPRESSION_DEFLATE: "zlib", fmt.COMPRESSION_ZSTD: "zstd"}


def size_to_str(value: int) -> str:
    """qemu's size_to_str(): "64 MiB", "196 KiB", "0 B"."""
    _, exp = math.frexp(value / (1000.0 / 1024.0))
    i = int((exp - 1) / 10)                       # C division truncates toward zero
    suffix = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"][i]
    return "%0.3g %sB" % (value / (1 << (i * 10)), suffix)


# ---------------------------------------------------------------------- info

def image_info(path: str) -> dict:
    """The dict ``qemu-img info --output=json`` prints for a qcow2 image."""
    fd = os.open(path, os.O_RDONLY)
    try:
        h = read_header(fd)
        st = os.fstat(fd)
        snapshots, _ = read_snapshot_table(fd, h)
        bitmaps = read_directory(fd, h)   # qemu-img info opens the image: a broken directory fails
    finally:
        os.close(fd)
    info: dict = {}
    if h.backing_file is not None and h.backing_format:
        info["backing-filename-format"] = h.backing_format
    if snapshots:
        info["snapshots"] = [{
            **({"icount": sn.icount} if sn.icount is not None else {}),
            "vm-clock-nsec": sn.vm_clock_nsec % 1_000_000_000,
            "name": sn.name,
            "date-sec": sn.date_sec,
            "date-nsec": sn.date_nsec,
            "vm-clock-sec": sn.vm_clock_nsec // 1_000_000_000,
            "id": sn.id_str,
            "vm-state-size": sn.vm_state_size,
        } for sn in snapshots]
    info["virtual-size"] = h.size
    info["filename"] = path
    info["cluster-size"] = h.cluster_size
    info["format"] = "qcow2"
    info["actual-size"] = st.st_blocks * 512
    data: dict = {"compat": "0.10" if h.version == 2 else "1.1",
                  "compression-type": _COMPRESSION_NAMES.get(h.compression_type, str(h.compression_type))}
    if h.version >= 3:
        data["lazy-refcounts"] = bool(h.compatible_features & fmt.COMPAT_LAZY_REFCOUNTS)
    if bitmaps:   # qemu: qcow2_get_bitmap_info_list()
        data["bitmaps"] = [{"flags": info_flags(b.flags), "name": b.name, "granularity": b.granularity}
                           for b in bitmaps]
    data["refcount-bits"] = 1 << h.refcount_order
    if h.version >= 3:
        data["corrupt"] = bool(h.incompatible_features & fmt.INCOMPAT_CORRUPT)
        data["extended-l2"] = h.extended_l2
    info["format-specific"] = {"type": "qcow2", "data": data}
    if h.backing_file is not None:
        info["full-backing-filename"] = full_backing_filename(path, h.backing_file)
        info["backing-filename"] = h.backing_file
    info["dirty-flag"] = bool(h.incompatible_features & fmt.INCOMPAT_DIRTY)
    return info


def raw_info(path: str) -> dict:
    """The dict ``qemu-img info --output=json`` prints for a raw file."""
    st = os.stat(path)
    return {"virtual-size": st.st_size, "filename": path, "format": "raw",
            "actual-size": st.st_blocks * 512, "dirty-flag": False}


def chain_info(path: str, fmt: str | None = None, chain: ChainPolicy = OPEN_ANY) -> list[dict]:
    """``qemu-img info --backing-chain --output=json``: every layer, as the engine resolves it
    (ChainError where ``chain`` refuses a backing file)."""
    infos: list[dict] = []
    while path is not None and len(infos) <= MAX_CHAIN_DEPTH:
        info = image_info(path) if (fmt or probe_format(path)) == "qcow2" else raw_info(path)
        infos.append(info)
        path, fmt = None, None
        if "backing-filename" in info:
            path = chain.backing_path(info["filename"], info["backing-filename"])
            fmt = info.get("backing-filename-format")
    return infos


def _snapshot_line(sn: dict | None) -> str:
    """qemu: bdrv_snapshot_dump()."""
    if sn is None:
        return "%-10s%-17s%8s%20s%13s%11s" % ("ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT")
    date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sn["date-sec"]))
    secs = sn["vm-clock-sec"]
    clock = "%02d:%02d:%02d.%03d" % (secs // 3600, (secs // 60) % 60, secs % 60,
                                     sn["vm-clock-nsec"] // 1_000_000 % 1000)
    icount = str(sn["icount"]) if "icount" in sn else ""
    return "%-9s %-16s %8s%20s%13s%11s" % (sn["id"], sn["name"], size_to_str(sn["vm-state-size"]),
                                           date, clock, icount)


def format_info_human(info: dict) -> str:
    """qemu: bdrv_image_info_dump()."""
    lines = [f"image: {info['filename']}",
             f"file format: {info['format']}",
             f"virtual size: {size_to_str(info['virtual-size'])} ({info['virtual-size']} bytes)",
             f"disk size: {size_to_str(info['actual-size'])}"]
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if info.get("dirty-flag"):
        lines.append("cleanly shut down: no")
    if "backing-filename" in info:
        line = f"backing file: {info['backing-filename']}"
        if info["full-backing-filename"] != info["backing-filename"]:
            line += f" (actual path: {info['full-backing-filename']})"
        lines.append(line)
        if "backing-filename-format" in info:
            lines.append(f"backing file format: {info['backing-filename-format']}")
    if info.get("snapshots"):
        lines.append("Snapshot list:")
        lines.append(_snapshot_line(None))
        lines += [_snapshot_line(sn) for sn in info["snapshots"]]
    if "format-specific" not in info:
        return "\n".join(lines) + "\n"
    lines.append("Format specific information:")
    _dump(1, info["format-specific"]["data"], lines)
    return "\n".join(lines) + "\n"


def _dump(indent: int, value, lines: list[str]) -> None:
    """qemu block/qapi.c: dump_qdict() / dump_qlist(): keys with dashes as spaces, list
    items as [i], composite values on the lines below, four spaces per level."""
    items = ((k.replace("-", " "), v) for k, v in value.items()) if isinstance(value, dict) \
        else ((f"[{i}]", v) for i, v in enumerate(value))
    for key, v in items:
        if isinstance(v, (dict, list)):
            lines.append(f"{' ' * 4 * indent}{key}:")
            _dump(indent + 1, v, lines)
        else:
            text = ("true" if v else "false") if isinstance(v, bool) else v
            lines.append(f"{' ' * 4 * indent}{key}: {text}")


# ----------------------------------------------------------------------- map

def _layer_entries(dev, start: int, length: int, depth: int, out: list[dict]) -> None:
    """Map entries of [start, start + length) seen from layer ``dev`` at ``depth``."""
    if not isinstance(dev, Qcow2Image):
        # a raw layer: its bytes are the file's bytes
        for n, hole in host_runs(dev.fd, start, length):
            out.append(_entry(start, n, depth, True, hole, not hole, start, dev.path))
            start += n
        return
    prealloc = metadata_preallocation(dev)
    for kind, pos, n, host in dev._map(start, length):
        if kind == DATA and not prealloc:
            out.append(_entry(pos, n, depth, True, False, True, host, dev.path))
        elif kind == DATA:
            for m, hole in host_runs(dev.fd, host, n):
                out.append(_entry(pos, m, depth, True, hole, True, host, dev.path))
                pos += m
                host += m
        elif kind == COMPRESSED:
            out.append(_entry(pos, n, depth, True, False, True))
        elif kind == ZERO:
            out.append(_entry(pos, n, depth, True, True, False))
        else:
            assert kind == UNALLOCATED
            inside = 0 if dev.backing is None else min(n, max(0, dev.backing.size - pos))
            if inside:
                _layer_entries(dev.backing, pos, inside, depth + 1, out)
            if inside < n:
                # qemu: past the backing file's end (or without one) the layer reads zeros
                out.append(_entry(pos + inside, n - inside, depth, False, True, False))


def _entry(start, length, depth, present, zero, data, offset=None, filename=None) -> dict:
    e = {"start": start, "length": length, "depth": depth, "present": present, "zero": zero, "data": data}
    if offset is not None:
        e["offset"] = offset
        e["filename"] = filename
    return e


def _mergeable(a: dict, b: dict) -> bool:
    """qemu-img.c: entry_mergeable()."""
    for key in ("zero", "data", "depth", "present", "filename"):
        if a.get(key) != b.get(key):
            return False
    if ("offset" in a) != ("offset" in b):
        return False
    return "offset" not in a or a["offset"] + a["length"] == b["offset"]


def _merge(entries: list[dict]) -> list[dict]:
    out: list[dict] = []
    for e in entries:
        if out and _mergeable(out[-1], e):
            out[-1]["length"] += e["length"]
        else:
            out.append(dict(e))
    return out


def _map_entries(path: str) -> list[dict]:
    img = Qcow2Image.open(path, read_only=True)
    try:
        raw: list[dict] = []
        # qemu does a run at most 2 GiB - 512 at a time, but merges them back
        _layer_entries(img, 0, img.size, 0, raw)
        return _merge(raw)
    finally:
        trio.run(img.close)


def image_map(path: str) -> list[dict]:
    """The list ``qemu-img map --output=json`` prints for the image and its backing chain."""
    return [{k: v for k, v in e.items() if k != "filename"} for e in _map_entries(path)]


def format_map_json(entries: list[dict]) -> str:
    """qemu-img map --output=json, byte for byte."""
    lines = []
    for e in entries:
        text = ('{ "start": %d, "length": %d, "depth": %d, "present": %s, "zero": %s, "data": %s'
                % (e["start"], e["length"], e["depth"], _b(e["present"]), _b(e["zero"]), _b(e["data"])))
        if "offset" in e:
            text += ', "offset": %d' % e["offset"]
        lines.append(text + "}")
    return "[" + ",\n".join(lines) + "]\n"


def _b(v: bool) -> str:
    return "true" if v else "false"


def _hex(v: int) -> str:
    return "%-16s" % ("0" if v == 0 else "%#x" % v)


def format_map_human(path: str) -> tuple[str, str | None]:
    """qemu-img map (human): the data runs with their host offsets and files.

    Returns (text, error): like qemu-img, the runs before a compressed
    cluster (which has no host offset to show) are printed, then the error.
    """
    flat = []
    for e in _map_entries(path):
        # this format ignores the distinction between zero, ZERO and ZERO|DATA
        if not e["data"] or e["zero"]:
            e = e | {"data": False, "zero": True}
        flat.append(e)
    lines = ["%-16s%-16s%-16s%s" % ("Offset", "Length", "Mapped to", "File")]
    error = None
    for e in _merge(flat):
        if e["data"] and "offset" not in e:
            error = "File contains external, encrypted or compressed clusters."
            break
        if e["data"] and not e["zero"]:
            lines.append(_hex(e["start"]) + _hex(e["length"]) + _hex(e["offset"]) + e["filename"])
    return "\n".join(lines) + "\n", error
