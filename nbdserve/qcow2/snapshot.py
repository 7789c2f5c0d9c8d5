"""Internal snapshots: the snapshot table (qcow2.txt: "Snapshots"; qemu:
qcow2_read_snapshots()) and choosing one to serve, as qemu-nbd ``-l`` /
``--load-snapshot`` does."""

from __future__ import annotations

import os
from dataclasses import dataclass

from . import format as fmt
from .errors import Qcow2Error
from .header import Qcow2Header, read_header

MAX_SNAPSHOT_EXTRA_DATA = 1024      # qemu: QCOW_MAX_SNAPSHOT_EXTRA_DATA
MAX_SNAPSHOTS_SIZE = 64 << 20       # qemu: QCOW_MAX_SNAPSHOTS_SIZE
ENTRY = fmt.SNAPSHOT_ENTRY_STRUCT


@dataclass
class SnapshotInfo:
    """One entry of the snapshot table (qcow2.txt: "Snapshot table entry")."""

    id_str: str
    name: str
    l1_table_offset: int
    l1_size: int
    date_sec: int = 0
    date_nsec: int = 0
    vm_clock_nsec: int = 0
    vm_state_size: int = 0
    icount: int | None = None


def read_snapshot_table(fd: int, h: Qcow2Header) -> tuple[list[SnapshotInfo], int]:
    """The snapshots of the image and the size in bytes of the snapshot table (qemu:
    qcow2_do_read_snapshots())."""
    snaps: list[SnapshotInfo] = []
    pos = h.snapshots_offset
    for _ in range(h.nb_snapshots):
        fixed = os.pread(fd, ENTRY.size, pos)
        if len(fixed) < ENTRY.size:
            raise Qcow2Error(f"Snapshot table entry at {pos:#x} lies past the end of the file")
        (l1_off, l1_size, id_len, name_len, date_sec, date_nsec, vm_clock, vm_state,
         extra_len) = ENTRY.unpack(fixed)
        if extra_len > MAX_SNAPSHOT_EXTRA_DATA:
            raise Qcow2Error(f"Too much extra metadata in snapshot table entry at {pos:#x}: {extra_len} bytes")
        pos += ENTRY.size
        rest = os.pread(fd, extra_len + id_len + name_len, pos)
        pos = (pos + extra_len + id_len + name_len + 7) & ~7
        if pos - h.snapshots_offset > MAX_SNAPSHOTS_SIZE:
            raise Qcow2Error(f"Snapshot table is too big: more than {MAX_SNAPSHOTS_SIZE} bytes")
        extra, names = rest[:extra_len], rest[extra_len:]
        # qcow2.txt: optional extra data: vm_state_size_large, disk_size, icount
        if len(extra) >= 8:
            vm_state = int.from_bytes(extra[0:8], "big")
        icount = int.from_bytes(extra[16:24], "big") if len(extra) >= 24 else None
        snaps.append(SnapshotInfo(names[:id_len].decode("utf-8", "replace"),
                                  names[id_len:id_len + name_len].decode("utf-8", "replace"),
                                  l1_off, l1_size, date_sec, date_nsec, vm_clock, vm_state,
                                  None if icount == (1 << 64) - 1 else icount))
    return snaps, pos - h.snapshots_offset


SNAPSHOT_OPT_BASE = "snapshot."   # qemu-nbd.c: -l snapshot.id=ID,snapshot.name=NAME


def parse_load_snapshot(text: str) -> tuple[str | None, str | None, bool]:
    """qemu-nbd's -l argument -> (id, name, either): ``snapshot.id=ID[,snapshot.name=NAME]``
    (both must match when both are given), or ``ID_OR_NAME`` (``either``: by id first, then by
    name, bdrv_snapshot_load_tmp_by_id_or_name())."""
    if not text.startswith(SNAPSHOT_OPT_BASE):
        return text, text, True
    fields: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or key not in ("snapshot.id", "snapshot.name") or key in fields:
            raise ValueError(f"-l {text!r}: expected snapshot.id=ID and/or snapshot.name=NAME")
        fields[key] = value
    return fields.get("snapshot.id"), fields.get("snapshot.name"), False


def find_snapshot(snapshots: list[SnapshotInfo], id_str: str | None, name: str | None,
                  either: bool = False) -> SnapshotInfo:
    """qemu: find_snapshot_by_id_and_name() (block/snapshot.c)."""
    if either:
        for wanted in ((id_str, None), (None, name)):
            try:
                return find_snapshot(snapshots, *wanted)
            except Qcow2Error:
                pass
        raise Qcow2Error(f"Can't find snapshot {id_str!r}")
    for sn in snapshots:
        if (id_str is None or sn.id_str == id_str) and (name is None or sn.name == name):
            return sn
    raise Qcow2Error("Can't find snapshot " + " ".join(f"{k}={v!r}" for k, v in (("id", id_str), ("name", name))
                                                         if v is not None))


def snapshot_l1(path: str, spec: str) -> tuple[int, int]:
    """The (L1 offset, entries) of the snapshot of ``path`` that qemu-nbd ``-l SPEC`` loads."""
    try:
        id_str, name, either = parse_load_snapshot(spec)
    except ValueError as e:
        raise Qcow2Error(str(e)) from None
    fd = os.open(path, os.O_RDONLY)
    try:
        snapshots, _ = read_snapshot_table(fd, read_header(fd))
    finally:
        os.close(fd)
    sn = find_snapshot(snapshots, id_str, name, either)
    return sn.l1_table_offset, sn.l1_size
