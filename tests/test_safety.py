"""Issue 13, parts 1 to 4: a client cannot read host files, two writers never share an image,
and protocol corners keep the client's intent.  Real nbdserve processes, real qemu-img /
qemu-io / qemu-nbd / nbdinfo and python3-libnbd on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess

import pytest

from conftest import free_port, import_libnbd, nbdserve_command
from test_nbd_core import IHAVEOPT, NBDMAGIC, OPT, info_payload, option

MiB = 1 << 20
SECRET = b"host secret: never for clients\n" * 4096     # ~128 KiB


def sh(*args, check=True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kw)
    if check:
        assert r.returncode == 0, (args, r.stdout[-2000:], r.stderr[-2000:])
    return r


def serve_fails(*args) -> subprocess.CompletedProcess:
    """``nbdserve serve ARGS`` that must refuse to start: exit 1, one error line."""
    r = subprocess.run(nbdserve_command() + ["serve", "-p", str(free_port()), *map(str, args)],
                       capture_output=True, text=True, timeout=60)
    lines = r.stderr.splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("nbdserve: error: "), (r.returncode, r.stderr)
    return r


def connect(uri: str):
    nbd = import_libnbd()
    h = nbd.NBD()
    h.connect_uri(uri)
    return nbd, h


def nbd_errno(fn, *args, **kw) -> int | None:
    """The errno a libnbd call failed with, None if it succeeded."""
    nbd = import_libnbd()
    try:
        fn(*args, **kw)
    except nbd.Error as e:
        return e.errno
    return None


# ------------------------------------------------------------------ 1. probing guessed raw

WARNING = re.compile(r"Image format was not specified for '(.*)' and probing guessed raw\. "
                     r"Automatically detecting the format is dangerous for raw images, write operations "
                     r"on block 0 will be restricted\. Specify the 'raw' format explicitly to remove the restrictions\.")


def evil_qcow2(tmp_path, secret) -> bytes:
    """The bytes of a qcow2 image naming ``secret`` as its raw backing file."""
    evil = tmp_path / "evil.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", secret, "-F", "raw", evil, "64M")
    return evil.read_bytes()


def test_probed_raw_refuses_the_qcow2_header_attack(tmp_path, nbdserve):
    disk, secret = tmp_path / "disk.img", tmp_path / "secret.bin"
    secret.write_bytes(SECRET)
    with open(disk, "wb") as f:
        f.truncate(64 * MiB)
    header = evil_qcow2(tmp_path, secret)
    for attempt in range(2):   # the same command, before and after a restart
        server = nbdserve("serve", disk, "-x", "d")
        nbd, h = connect(server.uri)
        assert nbd_errno(h.pwrite, header, 0) == "EPERM"
        assert nbd_errno(h.pwrite, header[:512], 0) == "EPERM"
        assert nbd_errno(h.pwrite, b"QFI\xfb", 0) == "EPERM"    # the magic alone, partial sector
        h.pwrite(b"an MBR-like sector\0" * 20, 0)                   # raw data in sector 0 is fine
        h.pwrite(header, 4096)                                      # and the header anywhere else
        everything = b"".join(h.pread(16 * MiB, off) for off in range(0, 64 * MiB, 16 * MiB))
        assert SECRET[:64] not in everything
        h.shutdown()
        assert server.stop() == 0
        assert len(WARNING.findall(server.stderr)) == 1, server.stderr
        assert WARNING.search(server.stderr).group(1) == str(disk)
    assert sh("qemu-img", "info", "--output=json", disk).stdout.count('"format": "raw"') == 1


def test_format_raw_lifts_the_restriction(tmp_path, nbdserve):
    """-f raw: the same write goes through, and the next probing start really would read
    the host file (which is what the restriction prevents)."""
    disk, secret = tmp_path / "disk.img", tmp_path / "secret.bin"
    secret.write_bytes(SECRET)
    with open(disk, "wb") as f:
        f.truncate(64 * MiB)
    header = evil_qcow2(tmp_path, secret)
    server = nbdserve("serve", "-f", "raw", disk)
    _, h = connect(server.uri)
    h.pwrite(header, 0)
    h.shutdown()
    assert server.stop() == 0 and not WARNING.search(server.stderr)
    server = nbdserve("serve", "-r", disk)   # probed: now qcow2 backed by the secret
    _, h = connect(server.uri)
    assert h.pread(len(SECRET), 0) == SECRET
    h.shutdown()


def test_read_only_probed_raw_has_no_warning(tmp_path, nbdserve):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(MiB))
    server = nbdserve("serve", "-r", disk)
    assert server.stop() == 0 and not WARNING.search(server.stderr)


QEMU_FORMATS = [("qcow", []), ("qcow2", []), ("qed", []), ("vdi", []), ("vmdk", []),
                ("vmdk", ["-o", "subformat=monolithicFlat"]), ("vpc", []), ("vhdx", []), ("parallels", [])]


@pytest.mark.parametrize("fmt,opts", QEMU_FORMATS, ids=[f + "".join(o[1:]) for f, o in QEMU_FORMATS])
def test_probed_raw_refuses_every_format_qemu_probes(tmp_path, nbdserve, fmt, opts):
    """Sector 0 of an image qemu-img creates, which qemu-img info probes as that format."""
    image = tmp_path / f"x.{fmt}"
    sh("qemu-img", "create", "-q", "-f", fmt, *opts, image, "1M")
    assert json.loads(sh("qemu-img", "info", "--output=json", image).stdout)["format"] == fmt
    sector0 = image.read_bytes()[:512].ljust(512, b"\0")
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(MiB))
    server = nbdserve("serve", disk)
    _, h = connect(server.uri)
    assert nbd_errno(h.pwrite, sector0, 0) == "EPERM"
    assert nbd_errno(h.pwrite, sector0 + bytes(4096), 0) == "EPERM"
    h.shutdown()
    assert disk.read_bytes() == bytes(MiB)


def test_probed_raw_zero_and_trim_cannot_make_a_signature(tmp_path, nbdserve):
    """b"QEDX": zeroing byte 3 would leave qed's magic "QED\\0" (qemu bdrv_qed_probe)."""
    nbd = import_libnbd()
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"QEDX" + bytes(MiB - 4))
    server = nbdserve("serve", disk)
    _, h = connect(server.uri)
    assert nbd_errno(h.zero, 1, 3) == "EPERM"
    assert nbd_errno(h.zero, 1, 3, nbd.CMD_FLAG_NO_HOLE) == "EPERM"
    assert nbd_errno(h.trim, 1, 3) == "EPERM"
    h.zero(4096, 4096)            # outside sector 0: fine
    h.zero(1, 0)                  # "\0EDX": still raw
    h.shutdown()
    assert disk.read_bytes()[:4] == b"\0EDX"


# ------------------------------------------------------------------ 2. backing files

@pytest.fixture
def tree(tmp_path):
    """root/base.raw, root/top.qcow2 (-> base.raw), out/secret.raw, and hostile overlays in root."""
    root, out = tmp_path / "root", tmp_path / "out"
    root.mkdir()
    out.mkdir()
    (root / "base.raw").write_bytes(b"B" * MiB)
    (out / "secret.raw").write_bytes(SECRET[:MiB].ljust(MiB, b"\0"))
    (root / "link.raw").symlink_to(out / "secret.raw")

    def overlay(name, backing, fmt="raw"):
        sh("qemu-img", "create", "-q", "-u", "-f", "qcow2", "-b", backing, "-F", fmt, root / name, "1M")
        return root / name

    overlay("top.qcow2", "base.raw")
    overlay("dotdot.qcow2", "../out/secret.raw")
    overlay("abs.qcow2", str(out / "secret.raw"))
    overlay("link.qcow2", "link.raw")
    overlay("mid.qcow2", "dotdot.qcow2", "qcow2")         # inside, but its own backing is not
    return root, out, overlay


def test_backing_root_allows_a_chain_inside(tree, nbdserve):
    root, _, _ = tree
    server = nbdserve("serve", "-r", "--backing-root", root, root / "top.qcow2")
    _, h = connect(server.uri)
    assert h.pread(4096, 0) == b"B" * 4096
    h.shutdown()


@pytest.mark.parametrize("name", ["dotdot.qcow2", "abs.qcow2", "link.qcow2", "mid.qcow2"])
def test_backing_root_refuses_files_outside(tree, name):
    root, out, _ = tree
    line = serve_fails("-r", "--backing-root", root, root / name).stderr
    assert "outside --backing-root" in line and str(out / "secret.raw") in line, line
    assert os.path.realpath(root) in line


def test_backing_root_from_the_config_file(tree, tmp_path):
    root, _, _ = tree
    conf = tmp_path / "c.toml"
    conf.write_text(f'[server]\nport = {free_port()}\n[[export]]\nname = "x"\nimage = "root/link.qcow2"\n'
                    'read_only = true\nbacking_root = "root"\n')
    r = subprocess.run(nbdserve_command() + ["serve", "--config", conf], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "outside --backing-root" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_no_backing(tree, nbdserve):
    root, _, _ = tree
    line = serve_fails("-r", "--no-backing", root / "top.qcow2").stderr
    assert "--no-backing" in line and "base.raw" in line
    server = nbdserve("serve", "-r", "--no-backing", root / "base.raw")   # no backing file: served
    server.stop()


@pytest.mark.parametrize("name", ["nbd://127.0.0.1:10809/disk", 'json:{"driver": "raw", "file": '
                                  '{"driver": "file", "filename": "/etc/passwd"}}',
                                  "http://127.0.0.1/disk.img", "file:/etc/passwd"])
def test_protocol_backing_names_are_refused(tmp_path, name):
    top = tmp_path / "top.qcow2"
    sh("qemu-img", "create", "-q", "-u", "-f", "qcow2", "-b", name, "-F", "raw", top, "1M")
    line = serve_fails("-r", top).stderr
    assert "qemu protocol syntax" in line and name.split(":")[0] + ":" in line, line


def test_info_prints_the_resolved_chain_like_qemu_img(tree):
    root, _, overlay = tree
    overlay("top2.qcow2", "top.qcow2", "qcow2")
    for output in ("human", "json"):
        ours = sh(*nbdserve_command(), "info", "--backing-chain", "--output", output, "top2.qcow2", cwd=root).stdout
        qemu = sh("qemu-img", "info", "--backing-chain", f"--output={output}", "top2.qcow2", cwd=root).stdout
        assert (json.loads(ours) if output == "json" else ours) == (json.loads(qemu) if output == "json" else qemu)
    r = sh(*nbdserve_command(), "info", "--backing-chain", "--backing-root", root / "sub", "top2.qcow2",
           cwd=root, check=False)
    assert r.returncode == 1 and "outside --backing-root" in r.stderr and r.stderr.count("\n") == 1, r.stderr


# ------------------------------------------------------------------ 3. qemu's image locks

class QemuIo:
    """An interactive qemu-io holding an image open until closed.  It reads one line per
    wake-up of its event loop, so commands go one at a time, each answered by a prompt."""

    PROMPT = "qemu-io> "

    def __init__(self, *args):
        self.proc = subprocess.Popen(["stdbuf", "-o0", "qemu-io", *map(str, args)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)
        self._until_prompt()
        assert "read 1/1 bytes" in self.run("read 0 1"), "qemu-io did not open the image"

    def _until_prompt(self) -> str:
        out = b""
        while not out.endswith(self.PROMPT.encode()):
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            assert chunk, "qemu-io exited: " + out.decode()
            out += chunk
        return out.decode()[:-len(self.PROMPT)]

    def run(self, command: str) -> str:
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        return self._until_prompt()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(30)


def lock_bytes(path) -> list[tuple[str, int, int]]:
    """The OFD locks on ``path`` (proc(5) /proc/locks): (type, start, end), sorted."""
    ino = os.stat(path).st_ino
    locks = []
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if fields[1] == "OFDLCK" and int(fields[5].split(":")[2]) == ino:
                locks.append((fields[3], int(fields[6]), int(fields[7])))
    return sorted(locks)


@pytest.fixture
def chain(tmp_path):
    sh("qemu-img", "create", "-q", "-f", "raw", tmp_path / "base.raw", "4M")
    sh("qemu-io", "-f", "raw", "-c", "write -P 0x42 0 1M", tmp_path / "base.raw")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", tmp_path / "mid.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", tmp_path / "top.qcow2")
    return tmp_path


@pytest.mark.parametrize("flags", [[], ["-r"]], ids=["rw", "ro"])
def test_locks_are_the_bytes_qemu_nbd_takes(chain, nbdserve, flags):
    files = [chain / n for n in ("top.qcow2", "mid.qcow2", "base.raw")]
    port = free_port()
    qemu = subprocess.Popen(["qemu-nbd", "-t", "-f", "qcow2", "-p", str(port), *flags, chain / "top.qcow2"])
    try:
        for _ in range(100):
            if subprocess.run(["nbdinfo", "--size", f"nbd://127.0.0.1:{port}"], capture_output=True).returncode == 0:
                break
        expected = [lock_bytes(f) for f in files]
    finally:
        qemu.terminate()
        qemu.wait(30)
    assert expected[0] and expected[2]
    server = nbdserve("serve", *flags, chain / "top.qcow2")
    assert [lock_bytes(f) for f in files] == expected
    server.stop()
    assert [lock_bytes(f) for f in files] == [[], [], []]


def test_serve_fails_on_an_image_qemu_io_writes(chain):
    qio = QemuIo("-f", "qcow2", chain / "top.qcow2")
    try:
        line = serve_fails(chain / "top.qcow2").stderr
        assert 'Failed to get "write" lock' in line and \
               f"Is another process using the image [{chain / 'top.qcow2'}]?" in line, line
        line = serve_fails("-r", chain / "top.qcow2").stderr      # read-only refuses a writer too
        assert 'Failed to get shared "write" lock' in line, line
    finally:
        qio.close()


def test_qemu_img_sees_the_lock_of_a_writable_export(chain, nbdserve):
    top = chain / "top.qcow2"
    server = nbdserve("serve", top)
    r = sh("qemu-img", "info", top, check=False)
    assert r.returncode != 0 and 'Failed to get shared "write" lock' in r.stderr, r.stderr
    assert sh("qemu-img", "info", "-U", "--output=json", top).stdout
    r = sh("qemu-io", "-f", "qcow2", "-c", "read 0 512", top, check=False)
    assert 'Failed to get "write" lock' in r.stdout + r.stderr
    server.stop()
    sh("qemu-img", "info", top)     # released with the server


def test_read_only_export_shares_reading(chain, nbdserve):
    top = chain / "top.qcow2"
    server = nbdserve("serve", "-r", top)
    sh("qemu-img", "info", top)
    sh("qemu-io", "-r", "-f", "qcow2", "-c", "read -P 0x42 0 1M", top)
    r = sh("qemu-io", "-f", "qcow2", "-c", "write 0 512", top, check=False)
    assert 'Failed to get "write" lock' in r.stdout + r.stderr
    server.stop()


@pytest.mark.parametrize("flag", ["-U", "--force-share"])
def test_force_share_serves_beside_a_writer(chain, nbdserve, flag):
    top = chain / "top.qcow2"
    qio = QemuIo("-f", "qcow2", top)
    try:
        qio.run("write -P 0x77 1M 64k")
        qio.run("flush")
        server = nbdserve("serve", flag, top)
        nbd, h = connect(server.uri)
        assert h.is_read_only()
        assert h.pread(65536, MiB) == b"\x77" * 65536
        assert "wrote" in qio.run("write -P 0x78 2M 4k")      # the writer keeps writing
        h.shutdown()
        server.stop()
    finally:
        qio.close()


# ------------------------------------------------------------------ 4. protocol corners

def blocks(path) -> int:
    return os.stat(path).st_blocks * 512


def test_write_zeroes_no_hole_keeps_the_range_allocated(tmp_path, nbdserve):
    nbd = import_libnbd()
    disk = tmp_path / "disk.raw"
    sh("qemu-img", "create", "-q", "-f", "raw", disk, "8M")
    sh("qemu-io", "-f", "raw", "-c", "write -P 0x55 0 4M", disk)
    server = nbdserve("serve", "-f", "raw", disk)
    _, h = connect(server.uri)
    before = blocks(disk)
    h.zero(MiB, 0, nbd.CMD_FLAG_NO_HOLE)
    h.flush()
    assert blocks(disk) == before                      # still allocated
    h.zero(MiB, 6 * MiB, nbd.CMD_FLAG_NO_HOLE)         # a hole, zeroed with NO_HOLE: allocated now
    h.flush()
    assert blocks(disk) == before + MiB
    assert h.pread(MiB, 0) == bytes(MiB) and h.pread(MiB, 6 * MiB) == bytes(MiB)
    h.zero(MiB, 2 * MiB)                               # without NO_HOLE: may punch
    h.flush()
    assert blocks(disk) == before
    with open(disk, "rb") as f:
        assert os.lseek(f.fileno(), 2 * MiB, os.SEEK_HOLE) == 2 * MiB
    h.shutdown()
    assert sh("qemu-img", "compare", "-f", "raw", "-F", "raw", disk, disk).returncode == 0


def nbdinfo_maps(uri) -> tuple[str, str]:
    return (sh("nbdinfo", "--map", uri).stdout, sh("nbdinfo", "--map=qemu:allocation-depth", uri).stdout)


def qemu_nbd_maps(path, fmt) -> tuple[str, str]:
    port = free_port()
    proc = subprocess.Popen(["qemu-nbd", "-t", "-r", "-A", "-f", fmt, "-p", str(port), path])
    try:
        for _ in range(200):
            if subprocess.run(["nbdinfo", "--size", f"nbd://127.0.0.1:{port}"], capture_output=True).returncode == 0:
                break
        return nbdinfo_maps(f"nbd://127.0.0.1:{port}")
    finally:
        proc.terminate()
        proc.wait(30)


def test_block_status_matches_qemu_nbd_on_sparse_copies(tmp_path, nbdserve):
    """The issue's case: an overlay qemu-io wrote with a partial last cluster, copied with
    cp --sparse=always (the zero tail of that cluster becomes a hole of the file); its
    backing file, a sparse qcow2 copy too; and a sparse raw file."""
    orig = tmp_path / "orig"
    orig.mkdir()
    sh("qemu-img", "create", "-q", "-f", "raw", orig / "raw.img", "64M")
    sh("qemu-io", "-f", "raw", "-c", "write -P 0x11 1M 100k", "-c", "write -z 1124k 64k",
       "-c", "write -P 0 3M 1M", orig / "raw.img")
    sh("qemu-img", "create", "-q", "-f", "qcow2", orig / "base.qcow2", "64M")
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x22 0 200k", "-c", "write -P 0 8M 192k", orig / "base.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", orig / "top.qcow2")
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0xab 30M 100k", orig / "top.qcow2")
    for name in ("raw.img", "base.qcow2", "top.qcow2"):
        sh("cp", "--sparse=always", orig / name, tmp_path / name)
    for name, fmt in (("top.qcow2", "qcow2"), ("base.qcow2", "qcow2"), ("raw.img", "raw")):
        expected = qemu_nbd_maps(tmp_path / name, fmt)
        server = nbdserve("serve", "-r", "-f", fmt, tmp_path / name)
        assert nbdinfo_maps(server.uri) == expected, name
        server.stop()
    assert " zero\n" in expected[0] or "2  zero" in qemu_nbd_maps(tmp_path / "top.qcow2", "qcow2")[0]


# -- log lines: client strings cannot forge or hide a line

def _raw_handshake(port: int, *options: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        greeting = b""
        while len(greeting) < 18:
            greeting += s.recv(18 - len(greeting))
        assert struct.unpack(">QQ", greeting[:16]) == (NBDMAGIC, IHAVEOPT)
        s.sendall(struct.pack(">I", 3) + b"".join(options))
        try:
            while s.recv(65536):
                pass
        except (ConnectionResetError, TimeoutError):
            pass


FORGED = "x\nnbdserve: 10.0.0.1:1: export 'root', flags 0x0\r\x1b[2K\x1b]0;title\x07\u202e\x9b"


def test_client_strings_reach_the_log_escaped(tmp_path, nbdserve):
    disk = tmp_path / "d.raw"
    disk.write_bytes(bytes(MiB))
    server = nbdserve("serve", "-f", "raw", disk, "-x", "d")
    port = int(server.uri.rsplit(":", 1)[1].split("/")[0])
    name = FORGED.encode()
    _raw_handshake(port, option(OPT["GO"], info_payload(FORGED)), option(OPT["ABORT"]))
    _raw_handshake(port, option(OPT["LIST"], name), option(OPT["ABORT"]))
    _raw_handshake(port, option(OPT["EXPORT_NAME"], name))
    _raw_handshake(port, option(OPT["EXPORT_NAME"], b"\xff\n\x1b[31m"))    # not UTF-8
    _raw_handshake(port, option(0x7777, name), option(OPT["ABORT"]))
    assert server.stop() == 0
    lines = server.stderr.split("\n")
    assert lines[-1] == ""
    for line in lines[:-1]:
        assert line.startswith("nbdserve: ") and line.isprintable(), repr(line)
    assert not any(line.startswith("nbdserve: 10.0.0.1") for line in lines)
    assert "\\x1b[2K" in server.stderr      # the offending name is there, escaped
