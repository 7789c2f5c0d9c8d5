"""qcow2 persistent dirty bitmaps served as qemu:dirty-bitmap:NAME, against qemu.

Images get their bitmaps from ``qemu-img bitmap --add``; the same writes go through
nbdserve to one copy and through qemu-nbd to another.  What must hold: nbdinfo's map of
each bitmap from nbdserve equals qemu-nbd -B's (while served, and of the bitmaps each
stored at its clean close), both equal the granules the writes touched (derived from the
writes alone), qemu-img check finds the image clean, and a crash (kill -9) leaves the
bitmaps in use, as qemu reports and refuses them."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port

QEMU_NBD = shutil.which("qemu-nbd") or "qemu-nbd"
DROPIN = str(Path(sys.executable).parent / "nbdserve-qemu-nbd")
NBDSERVE = str(Path(sys.executable).parent / "nbdserve")
MiB = 1 << 20
SIZE = 8 * MiB
# (name, qemu-img bitmap --add options, granularity)
BITMAPS = [("b0", [], 64 << 10), ("b1", ["-g", "1M"], MiB), ("b2", ["--disable"], 64 << 10)]
# qemu-io commands over NBD, and the ranges each touches
WRITES = [("write -P 0x5a 100k 10k", 100 << 10, 10 << 10),
          ("discard 1M 128k", MiB, 128 << 10),
          ("write -z 3M 4k", 3 * MiB, 4 << 10),
          ("write -z 5M 1M", 5 * MiB, MiB),
          ("write -P 0x77 7228k 8k", 7228 << 10, 8 << 10)]


def run(*args, check=True, timeout=60) -> subprocess.CompletedProcess:
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert p.returncode == 0, (args, p.returncode, p.stdout, p.stderr)
    return p


def make_image(path: Path) -> Path:
    run("qemu-img", "create", "-q", "-f", "qcow2", path, str(SIZE))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 2M", path)
    for name, options, _ in BITMAPS:
        run("qemu-img", "bitmap", "--add", *options, path, name)
    return path


def expected_map(granularity: int, ranges: list[tuple[int, int]]) -> list[dict]:
    """nbdinfo --json --map of a bitmap that had exactly the granules of ``ranges`` set."""
    dirty = [False] * (-(-SIZE // granularity))
    for offset, length in ranges:
        for g in range(offset // granularity, (offset + length - 1) // granularity + 1):
            dirty[g] = True
    out: list[dict] = []
    for g, d in enumerate(dirty):
        n = min(granularity, SIZE - g * granularity)
        if out and out[-1]["type"] == int(d):
            out[-1]["length"] += n
        else:
            out.append({"offset": g * granularity, "length": n, "type": int(d),
                        "description": "dirty" if d else "clean"})
    return out


def bitmap_map(uri: str, name: str) -> list[dict]:
    return json.loads(run("nbdinfo", "--json", f"--map=qemu:dirty-bitmap:{name}", uri).stdout)


class QemuNbd:
    """qemu-nbd (or nbdserve-qemu-nbd) --fork on a Unix socket; SIGTERM closes it cleanly."""

    def __init__(self, program: str, tmp: Path, *args):
        self.sock = tmp / f"{Path(program).name}-{free_port()}.sock"
        self.pid_file = tmp / f"{self.sock.name}.pid"
        run(program, "--fork", "--pid-file", self.pid_file, "-t", "-k", self.sock, *args)
        self.pid = int(self.pid_file.read_text())
        self.uri = f"nbd+unix:///?socket={self.sock}"

    def stop(self, sig=signal.SIGTERM) -> None:
        os.kill(self.pid, sig)
        deadline = time.monotonic() + 20
        while Path(f"/proc/{self.pid}").exists() and "zombie" not in Path(f"/proc/{self.pid}/status").read_text():
            assert time.monotonic() < deadline, f"{self.pid} still running"
            time.sleep(0.05)


def info_bitmaps(path: Path) -> list[dict]:
    return json.loads(run("qemu-img", "info", "-U", "--output=json", path).stdout)[
        "format-specific"]["data"].get("bitmaps", [])


def qemu_io_nbd(uri: str) -> None:
    args = []
    for command, _, _ in WRITES:
        args += ["-c", command]
    run("qemu-io", "-f", "raw", *args, uri)


def test_dirty_bitmaps_as_qemu_nbd_serves_them(nbdserve, tmp_path):
    ours, theirs = make_image(tmp_path / "ours.qcow2"), make_image(tmp_path / "theirs.qcow2")
    bflags = [a for name, _, _ in BITMAPS for a in ("-B", name)]
    server = nbdserve("serve", "-f", "qcow2", *bflags, ours)
    qemu = QemuNbd(QEMU_NBD, tmp_path, "-f", "qcow2", "--discard=unmap", *bflags, theirs)
    # served read-write, every bitmap is in use on disk (qemu: qcow2_load_dirty_bitmaps)
    assert info_bitmaps(ours) == info_bitmaps(theirs)
    assert all("in-use" in b["flags"] for b in info_bitmaps(ours))
    qemu_io_nbd(server.uri)
    qemu_io_nbd(qemu.uri)
    touched = [(o, n) for _, o, n in WRITES]
    for name, _, granularity in BITMAPS:
        want = expected_map(granularity, touched if name != "b2" else [])   # b2 is disabled
        assert bitmap_map(server.uri, name) == bitmap_map(qemu.uri, name) == want, name
    contexts = [json.loads(run("nbdinfo", "--json", uri).stdout)["exports"][0]["contexts"]
                for uri in (server.uri, qemu.uri)]
    assert contexts[0] == ["base:allocation", "qemu:allocation-depth"] + [f"qemu:dirty-bitmap:{n}" for n, _, _ in BITMAPS]
    assert set(contexts[1]) <= set(contexts[0])   # qemu-nbd offers allocation-depth with -A only
    assert server.stop() == 0
    qemu.stop()
    # stored at the clean close as qemu stores them: flags, data, and a clean image
    assert info_bitmaps(ours) == info_bitmaps(theirs) == [
        {"flags": ["auto"], "name": "b0", "granularity": 64 << 10},
        {"flags": ["auto"], "name": "b1", "granularity": MiB},
        {"flags": [], "name": "b2", "granularity": 64 << 10}]
    for image in (ours, theirs):
        assert run("qemu-img", "check", image).returncode == 0
    for name, _, granularity in BITMAPS:
        views = []
        for image in (ours, theirs):
            q = QemuNbd(QEMU_NBD, tmp_path, "-r", "-f", "qcow2", "-B", name, image)
            views.append(bitmap_map(q.uri, name))
            q.stop()
        assert views[0] == views[1] == expected_map(granularity, touched if name != "b2" else []), name
    assert run("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", ours, theirs).returncode == 0


def test_bitmaps_accumulate_over_sessions_and_nbdserve_reads_what_qemu_stored(nbdserve, tmp_path):
    """A second session adds to what the first stored; a bitmap qemu-nbd updated and stored is
    served by nbdserve as qemu-nbd serves it (incremental backups from either agree)."""
    image = make_image(tmp_path / "a.qcow2")
    s = nbdserve("serve", "-f", "qcow2", "-B", "b0", image)
    run("qemu-io", "-f", "raw", "-c", "write 0 4k", s.uri)
    assert s.stop() == 0, s.stderr
    q = QemuNbd(QEMU_NBD, tmp_path, "-f", "qcow2", "-B", "b0", image)
    run("qemu-io", "-f", "raw", "-c", "write 6M 4k", q.uri)
    q.stop()
    s = nbdserve("serve", "-r", "-f", "qcow2", "-B", "b0", image)
    assert bitmap_map(s.uri, "b0") == expected_map(64 << 10, [(0, 4096), (6 * MiB, 4096)])
    assert s.stop() == 0, s.stderr
    q = QemuNbd(QEMU_NBD, tmp_path, "-r", "-f", "qcow2", "-B", "b0", image)
    assert bitmap_map(q.uri, "b0") == expected_map(64 << 10, [(0, 4096), (6 * MiB, 4096)])
    q.stop()
    run("qemu-img", "check", image)


def test_dropin_serves_bitmaps_as_qemu_nbd(tmp_path):
    maps = {}
    for program in (QEMU_NBD, DROPIN):
        image = make_image(tmp_path / f"{Path(program).name}.qcow2")
        q = QemuNbd(program, tmp_path, "-f", "qcow2", "--discard=unmap", "-B", "b1", image)
        qemu_io_nbd(q.uri)
        maps[program] = bitmap_map(q.uri, "b1")
        q.stop()
        q = QemuNbd(program, tmp_path, "-r", "-f", "qcow2", "-B", "b1", image)
        maps[program, "stored"] = bitmap_map(q.uri, "b1")
        q.stop()
    want = expected_map(MiB, [(o, n) for _, o, n in WRITES])
    assert maps[QEMU_NBD] == maps[DROPIN] == maps[QEMU_NBD, "stored"] == maps[DROPIN, "stored"] == want


def test_crash_leaves_bitmaps_in_use_and_untrusted_as_qemu(nbdserve, tmp_path):
    ours, theirs = make_image(tmp_path / "ours.qcow2"), make_image(tmp_path / "theirs.qcow2")
    s = nbdserve("serve", "-f", "qcow2", "-B", "b0", ours)
    run("qemu-io", "-f", "raw", "-c", "write 0 64k", s.uri)
    assert s.stop(signal.SIGKILL) == -signal.SIGKILL
    q = QemuNbd(QEMU_NBD, tmp_path, "-f", "qcow2", "-B", "b0", theirs)
    run("qemu-io", "-f", "raw", "-c", "write 0 64k", q.uri)
    q.stop(signal.SIGKILL)
    for image in (ours, theirs):
        # qemu-img and nbdserve report the same, byte for byte
        assert run(NBDSERVE, "info", image).stdout == \
            run("qemu-img", "info", image).stdout
        assert [b["flags"] for b in info_bitmaps(image)] == [["in-use", "auto"], ["in-use", "auto"], ["in-use"]]
        want = run("qemu-img", "check", "--output=json", image)
        got = run(NBDSERVE, "check", "--output", "json", image)
        assert json.loads(got.stdout) == json.loads(want.stdout)
        # neither server trusts such a bitmap
        p = run(QEMU_NBD, "-k", tmp_path / "x.sock", "-f", "qcow2", "-B", "b0", image, check=False)
        assert p.returncode == 1 and "Bitmap 'b0' is inconsistent and cannot be used" in p.stderr, p
        p = run(NBDSERVE, "serve", "-p", free_port(), "-f", "qcow2",
                "-B", "b0", image, check=False)
        assert p.returncode == 1 and p.stderr == "nbdserve: error: Bitmap 'b0' is inconsistent and cannot be used\n", p
    # opened and closed cleanly again, an in-use bitmap stays in use (qemu stores only consistent ones)
    s = nbdserve("serve", "-f", "qcow2", ours)
    run("qemu-io", "-f", "raw", "-c", "write 1M 4k", s.uri)
    assert s.stop() == 0, s.stderr
    q = QemuNbd(QEMU_NBD, tmp_path, "-f", "qcow2", theirs)
    run("qemu-io", "-f", "raw", "-c", "write 1M 4k", q.uri)
    q.stop()
    assert info_bitmaps(ours) == info_bitmaps(theirs)
    assert [b["flags"] for b in info_bitmaps(ours)] == [["in-use", "auto"], ["in-use", "auto"], ["in-use"]]
    run("qemu-img", "check", ours)


def test_unknown_bitmap_is_refused_and_leaves_the_image_closed(tmp_path):
    image = make_image(tmp_path / "a.qcow2")
    p = run(NBDSERVE, "serve", "-p", free_port(), "-B", "nosuch", image, check=False)
    assert p.returncode == 1 and p.stderr == "nbdserve: error: Bitmap 'nosuch' is not found\n", p
    assert [b["flags"] for b in info_bitmaps(image)] == [["auto"], ["auto"], []]   # not left in use
    raw = tmp_path / "r.raw"
    raw.write_bytes(bytes(MiB))
    p = run(NBDSERVE, "serve", "-p", free_port(), "-f", "raw", "-B", "b0", raw, check=False)
    assert p.returncode == 1 and p.stderr == "nbdserve: error: Bitmap 'b0' is not found\n", p


def test_info_and_check_print_bitmaps_as_qemu_img(tmp_path):
    image = make_image(tmp_path / "a.qcow2")
    assert run(NBDSERVE, "info", image).stdout == run("qemu-img", "info", image).stdout
    assert json.loads(run(NBDSERVE, "info", "--output", "json", image).stdout) == \
        json.loads(run("qemu-img", "info", "--output=json", image).stdout)
    assert run(NBDSERVE, "check", image).stdout == run("qemu-img", "check", image).stdout
    # a directory entry breaking qemu's constraints (granularity 2^40): neither opens the image
    bad = tmp_path / "bad.qcow2"
    shutil.copy(image, bad)
    data = bytearray(bad.read_bytes())
    offset = _directory_offset(data)
    data[offset + 17] = 40                   # the first entry's granularity_bits
    bad.write_bytes(bytes(data))
    want = run("qemu-img", "check", bad, check=False)
    assert want.returncode == 1 and "Bitmap 'b0' doesn't satisfy the constraints" in want.stderr
    for command in ("check", "info"):
        p = run(NBDSERVE, command, bad, check=False)
        assert p.returncode == 1 and p.stderr == f"nbdserve: error: {bad}: Bitmap 'b0' doesn't satisfy the constraints\n", p


def _directory_offset(data: bytes) -> int:
    """The bitmap directory's offset, from the bitmaps header extension (qcow2.txt)."""
    pos = struct.unpack_from(">I", data, 100)[0]    # header_length
    while True:
        kind, length = struct.unpack_from(">II", data, pos)
        if kind == 0x23852875:
            return struct.unpack_from(">Q", data, pos + 8 + 16)[0]
        assert kind != 0
        pos += 8 + (length + 7) // 8 * 8


@pytest.mark.parametrize("seed", range(3))
def test_random_writes_dirty_what_qemu_dirties(nbdserve, tmp_path, seed):
    rnd = random.Random(seed)
    ours, theirs = make_image(tmp_path / "ours.qcow2"), make_image(tmp_path / "theirs.qcow2")
    commands = []
    for _ in range(12):
        offset, length = rnd.randrange(SIZE - 1), rnd.randrange(1, 300 << 10)
        length = min(length, SIZE - offset)
        commands.append(rnd.choice(["write", "write -z", "discard"]) + f" {offset} {length}")
    args = [a for c in commands for a in ("-c", c)]
    s = nbdserve("serve", "-f", "qcow2", "-B", "b0", ours)
    run("qemu-io", "-f", "raw", *args, s.uri)
    live = bitmap_map(s.uri, "b0")
    assert s.stop() == 0, s.stderr
    q = QemuNbd(QEMU_NBD, tmp_path, "-f", "qcow2", "--discard=unmap", "-B", "b0", theirs)
    run("qemu-io", "-f", "raw", *args, q.uri)
    assert bitmap_map(q.uri, "b0") == live
    q.stop()
    s = nbdserve("serve", "-r", "-f", "qcow2", "-B", "b0", ours)
    assert bitmap_map(s.uri, "b0") == live
    assert s.stop() == 0, s.stderr
    run("qemu-img", "check", ours)


def test_bitmap_runs_follow_the_marked_granules():
    """DirtyBitmap.mark/runs against a list of booleans, over granule and byte boundaries."""
    from nbdserve.qcow2 import format as fmt
    from nbdserve.qcow2.bitmaps import BitmapDirEntry, DirtyBitmap
    rnd = random.Random(5)
    for _ in range(200):
        gbits = rnd.choice([9, 12, 16])
        size = rnd.randrange(1, 300) << gbits
        size -= rnd.randrange(0, 1 << gbits) if size > (1 << gbits) else 0
        bm = DirtyBitmap(BitmapDirEntry(0, 1, fmt.BME_FLAG_AUTO, 1, gbits, "x"), size)
        model = [False] * (-(-size >> gbits))
        for _ in range(rnd.randrange(6)):
            o = rnd.randrange(size)
            n = rnd.randrange(1, size - o + 1)
            bm.mark(o, n)
            for g in range(o >> gbits, ((o + n - 1) >> gbits) + 1):
                model[g] = True
        o = rnd.randrange(size)
        n = rnd.randrange(1, size - o + 1)
        want, pos = [], o
        while pos < o + n:
            d = model[pos >> gbits]
            end = min(o + n, ((pos >> gbits) + 1) << gbits)
            if want and want[-1][1] == d:
                want[-1] = (want[-1][0] + end - pos, d)
            else:
                want.append((end - pos, d))
            pos = end
        assert bm.runs(o, n, 1 << 20) == want
        assert bm.runs(o, n, 1) == want[:1]


def test_bitmap_of_a_backing_file_is_served_as_qemu_nbd_serves_it(nbdserve, tmp_path):
    """qemu-nbd -B looks for the bitmap down the backing chain (nbd_export_create)."""
    base = make_image(tmp_path / "base.qcow2")
    run("qemu-io", "-f", "qcow2", "-c", "write 5M 4k", base)      # qemu dirties and stores b0
    top = tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    s = nbdserve("serve", "-r", "-f", "qcow2", "-B", "b0", top)
    ours = bitmap_map(s.uri, "b0")
    assert s.stop() == 0, s.stderr
    q = QemuNbd(QEMU_NBD, tmp_path, "-r", "-f", "qcow2", "-B", "b0", top)
    assert bitmap_map(q.uri, "b0") == ours == expected_map(64 << 10, [(5 * MiB, 4096)])
    q.stop()


def test_bitmap_and_extended_headers_flags_are_refused_with_config(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(f'[server]\nextended_headers = false\n[[export]]\nimage = "{tmp_path / "a.qcow2"}"\n'
                      'bitmaps = ["b0"]\n')
    for flag in (["-B", "b0"], ["--no-extended-headers"]):
        p = run(NBDSERVE, "serve", "--config", config, *flag, check=False)
        assert p.returncode == 2 and p.stderr == (f"nbdserve: error: serve: {flag[0]} cannot be combined with "
                                                  "--config (set them in the config file)\n"), p
