"""Choosing an internal snapshot to serve, as qemu-nbd ``-l`` / ``--load-snapshot`` does."""

from __future__ import annotations

import os

from .check import SnapshotInfo, read_snapshot_table
from .errors import Qcow2Error
from .header import read_header

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
