"""nbdserve check/info/map (nbdserve.cli.image and nbdserve.qcow2.inspect) against qemu-img.

The subcommands are registered with ``add_subcommands`` on a parser of the
tests' own, so they are exercised exactly as nbdserve's CLI dispatches them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess

import pytest

from nbdserve.cli.image import add_subcommands
from nbdserve.qcow2.inspect import format_info_human, format_map_human, format_map_json, image_info, image_map



def cli(capsys, *argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="nbdserve")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    rc = args.func(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def qemu(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", *argv], capture_output=True, text=True)


def qio(path: str, *commands: str) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for c in commands:
        args += ["-c", c]
    subprocess.run(args + [path], capture_output=True, check=True)


@pytest.fixture
def chain(tmp_path, monkeypatch):
    """base (32M, data + a zero cluster) <- top (64M: data, compressed, zero, a snapshot);
    relative names, run from tmp_path like a user in that folder."""
    monkeypatch.chdir(tmp_path)
    os.mkdir("ch")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "ch/base.qcow2", "32M"], check=True)
    qio("ch/base.qcow2", "write -P 1 0 4M", "write -z 5M 64k", "write -P 9 20M 100k")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                    "ch/top.qcow2", "64M"], check=True)
    qio("ch/top.qcow2", "write -P 2 1M 64k", "write -P 3 3M 64k", "write -z 2M 64k")
    subprocess.run(["qemu-img", "snapshot", "-c", "s1", "ch/top.qcow2"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "top.qcow2", "-F", "qcow2",
                    "ch/comp.qcow2", "64M"], check=True)
    qio("ch/comp.qcow2", "write -c -P 4 0 128k", "write -P 5 40M 64k")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10,cluster_size=4096",
                    "v2.qcow2", "8M"], check=True)
    qio("v2.qcow2", "write -P 6 4k 40k")
    return ["ch/base.qcow2", "ch/top.qcow2", "ch/comp.qcow2", "v2.qcow2"]


def test_info_json_matches_qemu(chain):
    for path in chain:
        assert image_info(path) == json.loads(qemu("info", "--output=json", path).stdout), path


def test_info_human_matches_qemu(chain):
    for path in chain:
        assert format_info_human(image_info(path)) == qemu("info", path).stdout, path


def test_info_cli(chain, capsys):
    rc, out, _ = cli(capsys, "info", "--output", "json", "ch/top.qcow2")
    assert rc == 0
    info = json.loads(out)
    assert info["backing-filename"] == "base.qcow2"
    assert info["full-backing-filename"] == "ch/base.qcow2"
    assert [s["name"] for s in info["snapshots"]] == ["s1"]
    rc, out, _ = cli(capsys, "info", "ch/top.qcow2")
    assert rc == 0 and out == qemu("info", "ch/top.qcow2").stdout


def test_map_json_matches_qemu(chain):
    for path in chain:
        theirs = qemu("map", "--output=json", path).stdout
        assert format_map_json(image_map(path)) == theirs, path
        assert image_map(path) == json.loads(theirs)


def test_map_human_matches_qemu(chain):
    for path in chain:
        p = qemu("map", path)
        text, error = format_map_human(path)
        assert text == p.stdout, path
        assert (error is not None) == (p.returncode != 0)
        if error:
            assert error in p.stderr


def test_map_cli(chain, capsys):
    rc, out, _ = cli(capsys, "map", "--output=json", "ch/top.qcow2")
    assert rc == 0 and out == qemu("map", "--output=json", "ch/top.qcow2").stdout
    rc, out, err = cli(capsys, "map", "ch/comp.qcow2")
    assert rc == 1 and "compressed clusters" in err
    rc, out, _ = cli(capsys, "map", "ch/top.qcow2")
    assert rc == 0 and out == qemu("map", "ch/top.qcow2").stdout


def test_check_cli_clean(chain, capsys):
    for path in chain:
        rc, out, err = cli(capsys, "check", "--output=json", path)
        theirs = qemu("check", "--output=json", path)
        assert (rc, json.loads(out)) == (theirs.returncode, json.loads(theirs.stdout))
        rc, out, err = cli(capsys, "check", path)
        assert (rc, out, err) == (0, qemu("check", path).stdout, "")


def _leak(path: str) -> None:
    """Bump the refcount of a free cluster inside the file (16-bit refcounts, 64k clusters)."""
    from nbdserve.qcow2 import format as fmt
    from nbdserve.qcow2.header import read_header
    qio(path, "write -P 1 0 192k", "discard 64k 64k")
    fd = os.open(path, os.O_RDWR)
    try:
        h = read_header(fd)
        l1e = int.from_bytes(os.pread(fd, 8, h.l1_table_offset), "big")
        l2e = int.from_bytes(os.pread(fd, 8, (l1e & fmt.L1E_OFFSET_MASK)), "big")
        freed = ((l2e & fmt.L2E_OFFSET_MASK) >> 16) + 1
        block = int.from_bytes(os.pread(fd, 8, h.refcount_table_offset), "big")
        os.pwrite(fd, (1).to_bytes(2, "big"), block + freed * 2)
    finally:
        os.close(fd)


def test_check_cli_leak_and_repair(tmp_path, capsys):
    path = str(tmp_path / "leak.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, "16M"], check=True)
    _leak(path)
    rc, out, err = cli(capsys, "check", path)
    theirs = qemu("check", path)
    assert rc == theirs.returncode == 3
    assert out == theirs.stdout
    assert err == theirs.stderr
    rc, out, err = cli(capsys, "check", "-r", "leaks", "--output", "json", path)
    assert rc == 0
    assert json.loads(out)["leaks-fixed"] == 1 and "leaks" not in json.loads(out)
    assert qemu("check", path).returncode == 0


def test_check_cli_repair_human(tmp_path, capsys):
    path = str(tmp_path / "leak.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, "16M"], check=True)
    _leak(path)
    copy = str(tmp_path / "copy.qcow2")
    shutil.copy(path, copy)
    rc, out, _ = cli(capsys, "check", "-r", "all", path)
    theirs = qemu("check", "-r", "all", copy)
    assert rc == theirs.returncode == 0
    assert out == theirs.stdout.replace(copy, path)


@pytest.mark.parametrize("command", ["check", "info", "map"])
def test_bad_files(tmp_path, capsys, command):
    raw = tmp_path / "raw.img"
    raw.write_bytes(b"\0" * 4096)
    rc, out, err = cli(capsys, command, str(raw))
    assert rc == 1 and out == ""
    assert err.count("\n") == 1 and "not in qcow2 format" in err
    rc, out, err = cli(capsys, command, str(tmp_path / "missing.qcow2"))
    assert rc == 1 and out == "" and err.count("\n") == 1 and "No such file" in err


def test_map_raw_backing_matches_qemu(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open("base.raw", "wb") as f:
        f.truncate(8 << 20)
        f.seek(1 << 20)
        f.write(b"hello")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
                    "top.qcow2", "16M"], check=True)
    qio("top.qcow2", "write -P 2 3M 64k")
    assert format_map_json(image_map("top.qcow2")) == qemu("map", "--output=json", "top.qcow2").stdout
    assert format_map_human("top.qcow2") == (qemu("map", "top.qcow2").stdout, None)


def test_check_cli_leaks_repair_that_needs_rebuild(tmp_path, capsys):
    """-r leaks cannot fix a missing refcount: the check stops, no summary, exit 1 (as qemu-img)."""
    from nbdserve.qcow2 import format as fmt
    from nbdserve.qcow2.header import read_header
    path = str(tmp_path / "zero.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, "16M"], check=True)
    qio(path, "write -P 1 0 64k")
    fd = os.open(path, os.O_RDWR)
    h = read_header(fd)
    l1e = int.from_bytes(os.pread(fd, 8, h.l1_table_offset), "big")
    l2e = int.from_bytes(os.pread(fd, 8, l1e & fmt.L1E_OFFSET_MASK), "big")
    block = int.from_bytes(os.pread(fd, 8, h.refcount_table_offset), "big")
    os.pwrite(fd, bytes(2), block + ((l2e & fmt.L2E_OFFSET_MASK) >> 16) * 2)
    os.close(fd)
    copy = str(tmp_path / "copy.qcow2")
    shutil.copy(path, copy)
    theirs = qemu("check", "-r", "leaks", copy)
    rc, out, err = cli(capsys, "check", "-r", "leaks", path)
    assert rc == theirs.returncode == 1
    assert out == theirs.stdout == ""
    assert err.replace("nbdserve:", "qemu-img:") == theirs.stderr
