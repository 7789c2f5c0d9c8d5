"""nbdserve.qcow2.check against real qemu-img check, on images made by qemu-img/qemu-io.

Clean images of several shapes must check clean with the same numbers as
qemu-img; images damaged by patching bytes must give the same exit code and
counts as qemu-img; our repairs must leave an image that qemu-img finds clean.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from nbdserve.qcow2 import format as fmt
from nbdserve.qcow2.check import check_image
from nbdserve.qcow2.header import read_header



def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


def make(path, size: str, *, opts: str = "", backing: str | None = None) -> str:
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if opts:
        cmd += ["-o", opts]
    if backing:
        cmd += ["-b", backing, "-F", "qcow2"]
    subprocess.run(cmd + [str(path), size], check=True)
    return str(path)


def qio(path: str, *commands: str) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for c in commands:
        args += ["-c", c]
    out = subprocess.run(args + [path], capture_output=True, text=True, check=True)
    assert "error" not in out.stdout.lower() + out.stderr.lower(), out


def qemu_check(path: str, *extra: str) -> tuple[int, dict]:
    p = run("qemu-img", "check", "--output=json", *extra, path)
    return p.returncode, json.loads(p.stdout)


def assert_same_as_qemu(path: str) -> dict:
    rc, theirs = qemu_check(path)
    ours = check_image(path)
    assert ours.to_json() == theirs, ours.messages
    assert ours.exit_code == rc
    return theirs


# ---------------------------------------------------------------- clean images

def _clean_default(tmp_path):
    p = make(tmp_path / "a.qcow2", "64M")
    qio(p, "write -P 1 0 100k", "write -P 2 8M 1M", "write -P 3 32M 64k")
    return p


def _clean_v2(tmp_path):
    p = make(tmp_path / "v2.qcow2", "64M", opts="compat=0.10")
    qio(p, "write -P 1 0 1M", "write -P 2 40M 300k")
    return p


def _clean_512(tmp_path):
    # 512-byte clusters: an L2 table covers 32 KiB, so this writes into dozens of tables
    p = make(tmp_path / "small.qcow2", "4M", opts="cluster_size=512")
    qio(p, "write -P 1 0 200k", "write -P 2 1M 64k", "write -P 3 3M 5k", "write -P 4 100k 10k")
    return p


def _refbits(bits: int):
    def maker(tmp_path):
        p = make(tmp_path / f"r{bits}.qcow2", "64M", opts=f"refcount_bits={bits}")
        qio(p, "write -P 1 0 1M", "write -P 2 20M 2M")
        return p
    maker.__name__ = f"_clean_refbits{bits}"
    return maker


_clean_refbits1, _clean_refbits64 = _refbits(1), _refbits(64)


def _clean_compressed(tmp_path):
    p = make(tmp_path / "c.qcow2", "64M")
    qio(p, "write -c -P 1 0 64k", "write -c -P 2 64k 64k", "write -c -P 3 1M 64k", "write -P 4 2M 128k")
    return p


def _clean_snapshots(tmp_path):
    p = make(tmp_path / "s.qcow2", "64M")
    qio(p, "write -P 1 0 1M")
    subprocess.run(["qemu-img", "snapshot", "-c", "one", p], check=True)
    qio(p, "write -P 2 64k 64k", "write -P 3 10M 64k")
    subprocess.run(["qemu-img", "snapshot", "-c", "two", p], check=True)
    qio(p, "write -P 4 0 64k")
    return p


def _clean_overlay(tmp_path):
    base = make(tmp_path / "base.qcow2", "64M")
    qio(base, "write -P 1 0 4M")
    top = make(tmp_path / "top.qcow2", "64M", backing=base)
    qio(top, "write -P 2 1M 64k", "write -P 3 30M 100k")
    return top


def _clean_lazy_extl2(tmp_path):
    p = make(tmp_path / "x.qcow2", "64M", opts="extended_l2=on,cluster_size=64k")
    qio(p, "write -P 1 0 4k", "write -P 2 1M 128k", "write -z 2M 64k")
    return p


CLEAN = [_clean_default, _clean_v2, _clean_512, _clean_refbits1, _clean_refbits64,
         _clean_compressed, _clean_snapshots, _clean_overlay, _clean_lazy_extl2]


@pytest.mark.parametrize("maker", CLEAN, ids=lambda f: f.__name__[7:])
def test_clean_images_match_qemu(tmp_path, maker):
    path = maker(tmp_path)
    theirs = assert_same_as_qemu(path)
    assert "corruptions" not in theirs and "leaks" not in theirs
    res = check_image(path)
    assert res.exit_code == 0 and not res.messages
    assert res.human().startswith("No errors were found on the image.\n")


def test_human_summary_matches_qemu(tmp_path):
    path = _clean_compressed(tmp_path)
    assert check_image(path).human() == run("qemu-img", "check", path).stdout


def test_not_qcow2_raises(tmp_path):
    p = tmp_path / "raw.img"
    p.write_bytes(bytes(65536))
    with pytest.raises(Exception, match="not in qcow2 format"):
        check_image(str(p))


# ---------------------------------------------------------------- damage helpers

def refcount_entry(path: str, cluster: int) -> tuple[int, int]:
    """(file offset, byte width) of the 16-bit refcount of ``cluster``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        h = read_header(fd)
        assert h.refcount_order == 4
        per_block = h.cluster_size // 2
        ti = cluster // per_block
        entry = int.from_bytes(os.pread(fd, 8, h.refcount_table_offset + ti * 8), "big")
        return (entry & fmt.REFT_OFFSET_MASK) + (cluster % per_block) * 2, 2
    finally:
        os.close(fd)


def l2_entry_location(path: str, guest: int) -> tuple[int, int]:
    """(file offset of the L2 entry for ``guest``, its value)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        h = read_header(fd)
        cs = h.cluster_size
        l1_index = guest // (cs * (cs // 8))
        l1e = int.from_bytes(os.pread(fd, 8, h.l1_table_offset + l1_index * 8), "big")
        where = (l1e & fmt.L1E_OFFSET_MASK) + ((guest // cs) % (cs // 8)) * 8
        return where, int.from_bytes(os.pread(fd, 8, where), "big")
    finally:
        os.close(fd)


def patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def damaged_leak(tmp_path) -> str:
    """A freed data cluster (inside the file) gets refcount 1 again."""
    p = make(tmp_path / "leak.qcow2", "64M")
    qio(p, "write -P 1 0 256k", "write -P 2 1M 64k", "discard 64k 64k")
    _, l2e0 = l2_entry_location(p, 0)
    freed = ((l2e0 & fmt.L2E_OFFSET_MASK) >> 16) + 1    # the data cluster that held guest 64k
    assert freed * 65536 < os.path.getsize(p)
    off, width = refcount_entry(p, freed)
    assert int.from_bytes(open(p, "rb").read()[off:off + width], "big") == 0
    patch(p, off, (1).to_bytes(width, "big"))
    return p


def damaged_refcount_zero(tmp_path) -> str:
    """The refcount of a used data cluster is zeroed."""
    p = make(tmp_path / "zero.qcow2", "64M")
    qio(p, "write -P 7 0 256k", "write -P 8 5M 64k")
    _, l2e = l2_entry_location(p, 128 * 1024)
    off, width = refcount_entry(p, (l2e & fmt.L2E_OFFSET_MASK) >> 16)
    patch(p, off, bytes(width))
    return p


def damaged_copied(tmp_path) -> str:
    """An L2 entry of a cluster with refcount 1 loses its COPIED flag."""
    p = make(tmp_path / "copied.qcow2", "64M")
    qio(p, "write -P 5 0 256k")
    where, l2e = l2_entry_location(p, 64 * 1024)
    assert l2e & fmt.QCOW_OFLAG_COPIED
    patch(p, where, (l2e & ~fmt.QCOW_OFLAG_COPIED).to_bytes(8, "big"))
    return p


def damaged_l2_past_eof(tmp_path) -> str:
    """The active L1 entry points at an L2 table far past the end of the file."""
    p = make(tmp_path / "eof.qcow2", "64M")
    qio(p, "write -P 5 0 256k")
    fd = os.open(p, os.O_RDONLY)
    h = read_header(fd)
    os.close(fd)
    beyond = (os.path.getsize(p) // 65536 + 10) * 65536
    patch(p, h.l1_table_offset, (fmt.QCOW_OFLAG_COPIED | beyond).to_bytes(8, "big"))
    return p


def damaged_reserved_bits(tmp_path) -> str:
    p = make(tmp_path / "reserved.qcow2", "64M")
    qio(p, "write -P 5 0 128k")
    where, l2e = l2_entry_location(p, 0)
    patch(p, where, (l2e | (1 << 57)).to_bytes(8, "big"))
    return p


DAMAGED = {
    "leak": (damaged_leak, 3),
    "refcount_zero": (damaged_refcount_zero, 2),
    "copied": (damaged_copied, 2),
    "l2_past_eof": (damaged_l2_past_eof, 2),
    "reserved_bits": (damaged_reserved_bits, 2),
}


@pytest.mark.parametrize("name", list(DAMAGED))
def test_damaged_images_match_qemu(tmp_path, name):
    maker, expected_rc = DAMAGED[name]
    path = maker(tmp_path)
    rc, theirs = qemu_check(path)
    assert rc == expected_rc, theirs
    ours = check_image(path)
    assert ours.exit_code == rc
    assert ours.to_json() == theirs, ours.messages


def test_leak_messages(tmp_path):
    path = damaged_leak(tmp_path)
    res = check_image(path)
    assert res.leaks == 1 and res.corruptions == 0
    assert any(m.startswith("Leaked cluster ") and m.endswith("refcount=1 reference=0") for m in res.messages)
    qemu_stderr = run("qemu-img", "check", path).stderr
    assert [m for m in res.messages if m.startswith("Leaked")] == \
        [line for line in qemu_stderr.splitlines() if line.startswith("Leaked")]


def test_corruption_messages(tmp_path):
    path = damaged_refcount_zero(tmp_path)
    res = check_image(path)
    qemu_stderr = run("qemu-img", "check", path).stderr.splitlines()
    assert res.messages == [line for line in qemu_stderr if line.startswith("ERROR")]
    assert any(m.startswith("ERROR cluster ") and m.endswith("refcount=0 reference=1") for m in res.messages)


def test_repair_leaks(tmp_path):
    path = damaged_leak(tmp_path)
    res = check_image(path, repair="leaks")
    assert res.leaks_fixed == 1 and res.leaks == 0 and res.exit_code == 0
    assert res.to_json()["leaks-fixed"] == 1
    rc, theirs = qemu_check(path)
    assert rc == 0 and "leaks" not in theirs
    qio(path, "read -P 1 0 64k", "read -P 0 64k 64k", "read -P 1 128k 128k", "read -P 2 1M 64k")


def test_repair_leaks_refuses_needed_rebuild(tmp_path):
    path = damaged_refcount_zero(tmp_path)
    before = open(path, "rb").read()
    res = check_image(path, repair="leaks")
    assert res.exit_code == 1 and res.check_errors == 1
    assert "ERROR need to rebuild refcount structures" in res.messages
    assert open(path, "rb").read() == before
    assert run("qemu-img", "check", "-r", "leaks", path).returncode == 1


def test_repair_all_rebuilds_refcounts(tmp_path):
    path = damaged_refcount_zero(tmp_path)
    res = check_image(path, repair="all")
    assert res.exit_code == 0, res.messages
    assert res.corruptions_fixed >= 1
    rc, theirs = qemu_check(path)
    assert rc == 0, theirs
    assert check_image(path).exit_code == 0
    qio(path, "read -P 7 0 256k", "read -P 8 5M 64k", "read -P 0 256k 1M")


def test_repair_all_fixes_copied(tmp_path):
    path = damaged_copied(tmp_path)
    res = check_image(path, repair="all")
    assert res.corruptions_fixed == 1 and res.exit_code == 0
    assert qemu_check(path)[0] == 0
    qio(path, "read -P 5 0 256k")


def test_repair_all_of_lazy_refcounts_clears_dirty_bit(tmp_path):
    p = make(tmp_path / "lazy.qcow2", "64M", opts="lazy_refcounts=on")
    qio(p, "write -P 3 0 1M")
    # a crash after writes with lazy refcounts: dirty bit set, one refcount missing
    fd = os.open(p, os.O_RDONLY)
    h = read_header(fd)
    os.close(fd)
    patch(p, fmt.OFFSET_INCOMPATIBLE, (h.incompatible_features | fmt.INCOMPAT_DIRTY).to_bytes(8, "big"))
    _, l2e = l2_entry_location(p, 0)
    off, width = refcount_entry(p, (l2e & fmt.L2E_OFFSET_MASK) >> 16)
    patch(p, off, bytes(width))
    assert check_image(p).exit_code == 2
    res = check_image(p, repair="all")
    assert res.exit_code == 0, res.messages
    fd = os.open(p, os.O_RDONLY)
    assert not read_header(fd).incompatible_features & fmt.INCOMPAT_DIRTY
    os.close(fd)
    info = json.loads(run("qemu-img", "info", "--output=json", p).stdout)
    assert info["dirty-flag"] is False
    assert qemu_check(p)[0] == 0
    qio(p, "read -P 3 0 1M")


def drop_first_refblock(path: str) -> None:
    """Zero refcount table entry 0: every cluster it described now has refcount 0."""
    fd = os.open(path, os.O_RDONLY)
    h = read_header(fd)
    os.close(fd)
    patch(path, h.refcount_table_offset, bytes(8))


@pytest.mark.parametrize("maker", CLEAN, ids=lambda f: f.__name__[7:])
def test_repair_all_rebuilds_lost_refcount_block(tmp_path, maker):
    path = maker(tmp_path)
    pristine = str(tmp_path / "pristine.qcow2")
    shutil.copy(path, pristine)
    drop_first_refblock(path)
    rc, theirs = qemu_check(path)
    ours = check_image(path)
    assert ours.exit_code == rc == 2
    assert ours.to_json() == theirs
    res = check_image(path, repair="all")
    assert res.exit_code == 0, res.messages
    assert "Rebuilding refcount structure" in res.messages
    rc, theirs = qemu_check(path)
    assert rc == 0, theirs
    compare = run("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", pristine, path)
    assert compare.returncode == 0, compare.stdout + compare.stderr
    # the image stays usable for writes by qemu
    qio(path, "write -P 9 512 128k", "read -P 9 512 128k")
    assert qemu_check(path)[0] == 0


def test_refcount_overflow_like_qemu(tmp_path):
    """With refcount_bits=1, a second reference to a cluster is an overflow, counted once."""
    p = make(tmp_path / "r1.qcow2", "64M", opts="refcount_bits=1")
    qio(p, "write -P 1 0 128k")
    where0, e0 = l2_entry_location(p, 0)
    patch(p, where0 + 8, e0.to_bytes(8, "big"))       # guest cluster 1 -> guest cluster 0's host cluster
    rc, theirs = qemu_check(p)
    ours = check_image(p)
    assert (ours.exit_code, ours.to_json()) == (rc, theirs)
    assert any(m.startswith("ERROR: overflow cluster offset=") for m in ours.messages)


def test_refcount_overflow_through_shared_l2_table_like_qemu(tmp_path):
    """Two L1 entries share a sequentially allocated L2 table, so each of its data clusters is
    counted twice at once (the contiguous-table path): with refcount_bits=1, an overflow each."""
    p = make(tmp_path / "r1.qcow2", "1G", opts="refcount_bits=1")
    qio(p, "write -P 1 0 1M")
    fd = os.open(p, os.O_RDONLY)
    try:
        h = read_header(fd)
        l1e0 = os.pread(fd, 8, h.l1_table_offset)
    finally:
        os.close(fd)
    patch(p, h.l1_table_offset + 8, l1e0)        # guest 512M.. -> the L2 table of guest 0..
    rc, theirs = qemu_check(p)
    ours = check_image(p)
    assert (ours.exit_code, ours.to_json()) == (rc, theirs)
    overflows = [m for m in ours.messages if m.startswith("ERROR: overflow cluster offset=")]
    assert len(overflows) == theirs["corruptions"] == 1 + 16     # the L2 table and its 16 clusters


# ------------------------------------------------- the command's output, byte for byte

CHECK_CLI = [sys.executable, "-m", "nbdserve", "check"]


@pytest.mark.parametrize("maker", CLEAN + [m for m, _ in DAMAGED.values()],
                         ids=lambda f: f.__name__.lstrip("_"))
def test_command_output_is_qemus(tmp_path, maker):
    """``nbdserve check`` prints what ``qemu-img check`` prints, human and JSON (whose keys
    qemu-img prints in its QDict's order), with the same exit status."""
    path = maker(tmp_path)
    for output in ("human", "json"):
        theirs = run("qemu-img", "check", f"--output={output}", path)
        ours = subprocess.run([*CHECK_CLI, f"--output={output}", path], capture_output=True, text=True)
        assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout), output
