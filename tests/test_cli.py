"""The ``nbdserve`` command, run as a real subprocess and spoken to with real NBD clients."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import NbdserveProcess, free_port, nbdserve_command


def run_cli(*args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(nbdserve_command() + [str(a) for a in args], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL, **kwargs)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert proc.returncode != 0
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("nbdserve: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0]


def qemu_io(uri: str, *commands: str) -> subprocess.CompletedProcess[str]:
    argv = ["qemu-io", "-f", "raw", uri]
    for c in commands:
        argv += ["-c", c]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def assert_write_refused(uri: str) -> None:
    """qemu-io refuses to open a read-only export for writing, or its write fails."""
    io = qemu_io(uri, "write -P 0xcd 0 4k")
    out = io.stdout + io.stderr
    assert io.returncode != 0, out
    assert "Permission denied" in out or "read-only" in out or "write failed" in out, out


@pytest.fixture
def raw_disk(tmp_path) -> Path:
    path = tmp_path / "disk.raw"
    path.write_bytes(b"\x00" * (3 << 20))
    return path


# -- serve ----------------------------------------------------------------------------------------

def test_serve_raw_read_write_sigterm(nbdserve, raw_disk):
    port = free_port()
    proc = nbdserve("serve", "-f", "raw", "-x", "disk", "-p", port, raw_disk)
    assert proc.uris == [f"nbd://127.0.0.1:{port}/disk"]

    io = qemu_io(proc.uri, "write -P 0xab 0 64k", "read -P 0xab 0 64k", "read -P 0 64k 64k")
    assert io.returncode == 0, io.stderr
    assert "Pattern verification failed" not in io.stdout

    info = subprocess.run(["nbdinfo", "--json", proc.uri], capture_output=True, text=True, timeout=60)
    assert info.returncode == 0, info.stderr
    exports = json.loads(info.stdout)["exports"]
    assert exports[0]["export-size"] == 3 << 20

    assert proc.stop() == 0
    # the write reached the file
    data = raw_disk.read_bytes()
    assert data[: 64 << 10] == b"\xab" * (64 << 10)
    assert data[64 << 10:] == bytes((3 << 20) - (64 << 10))


def test_serve_default_export_name_is_empty(nbdserve, raw_disk):
    port = free_port()
    proc = nbdserve("serve", "-f", "raw", "-p", port, raw_disk)
    assert proc.uris == [f"nbd://127.0.0.1:{port}/"]
    info = subprocess.run(["nbdinfo", "--json", proc.uri], capture_output=True, text=True, timeout=60)
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["exports"][0]["export-size"] == 3 << 20


def test_serve_read_only_refuses_writes(nbdserve, raw_disk):
    proc = nbdserve("serve", "-r", "-f", "raw", "-x", "ro", raw_disk)
    assert_write_refused(proc.uri)
    assert raw_disk.read_bytes()[:4096] == bytes(4096)


def test_serve_unix_socket(nbdserve, raw_disk, tmp_path):
    sock = tmp_path / "nbd.sock"
    proc = nbdserve("serve", "-f", "raw", "-x", "u", "-k", sock, raw_disk)
    assert proc.uris == [f"nbd+unix:///u?socket={sock}"]
    io = qemu_io(proc.uri, "write -P 0x11 1M 4k", "read -P 0x11 1M 4k")
    assert io.returncode == 0 and "Pattern verification failed" not in io.stdout, io.stdout + io.stderr


def test_serve_config_file(nbdserve, tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.raw").write_bytes(bytes(1 << 20))
    (tmp_path / "img" / "b.raw").write_bytes(bytes(2 << 20))
    port = free_port()
    conf = tmp_path / "srv.toml"
    conf.write_text(f'[server]\nport = {port}\n'
                    '[[export]]\nname = "a"\nimage = "img/a.raw"\nformat = "raw"\n'
                    '[[export]]\nname = "b"\nimage = "img/b.raw"\nformat = "raw"\nread_only = true\n')
    proc = nbdserve("serve", "--config", conf, expected_uris=2)
    assert proc.uris == [f"nbd://127.0.0.1:{port}/a", f"nbd://127.0.0.1:{port}/b"]
    sizes = []
    for uri in proc.uris:
        info = subprocess.run(["nbdinfo", "--json", uri], capture_output=True, text=True, timeout=60)
        assert info.returncode == 0, info.stderr
        sizes.append(json.loads(info.stdout)["exports"][0]["export-size"])
    assert sizes == [1 << 20, 2 << 20]


def test_sigint_exits_zero(raw_disk):
    proc = NbdserveProcess("serve", "-f", "raw", "-p", str(free_port()), str(raw_disk)).start()
    assert proc.stop(signal.SIGINT) == 0, proc.stderr


# -- refusals ----------------------------------------------------------------------------------

def test_missing_image(tmp_path):
    missing = tmp_path / "absent.raw"
    proc = run_cli("serve", "-p", free_port(), missing)
    assert proc.returncode == 1
    assert_one_line_error(proc, str(missing), "no such file")


def test_unusable_qcow2(tmp_path):
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb" + (9).to_bytes(4, "big") + bytes(504))   # qcow2 magic, version 9
    proc = run_cli("serve", "-p", free_port(), bad)
    assert proc.returncode == 1
    assert_one_line_error(proc, str(bad), "version")


def test_raw_file_served_as_qcow2(tmp_path, raw_disk):
    proc = run_cli("serve", "-f", "qcow2", "-p", free_port(), raw_disk)
    assert proc.returncode == 1
    assert_one_line_error(proc, str(raw_disk), "qcow2")


def test_verbose_logs_requests(raw_disk):
    with NbdserveProcess("serve", "-v", "-f", "raw", "-x", "v", "-p", str(free_port()), str(raw_disk)) as proc:
        subprocess.run(["qemu-io", "-f", "raw", "-r", proc.uri, "-c", "read 0 4k"], check=True,
                       capture_output=True, timeout=60)
        assert proc.stop() == 0
    assert "READ" in proc.stderr and "connected" in proc.stderr


def test_events_without_verbose(raw_disk):
    """Without -v: one line per connection event, none per request."""
    with NbdserveProcess("serve", "-f", "raw", "-x", "q", "-p", str(free_port()), str(raw_disk)) as proc:
        subprocess.run(["qemu-io", "-f", "raw", "-r", proc.uri, "-c", "read 0 4k"], check=True,
                       capture_output=True, timeout=60)
        assert proc.stop() == 0
    assert "connected" in proc.stderr and "disconnected" in proc.stderr
    assert "READ" not in proc.stderr


def test_bad_config(tmp_path):
    (tmp_path / "a.raw").write_bytes(bytes(4096))
    conf = tmp_path / "bad.toml"
    conf.write_text('[[export]]\nname = "a"\nimage = "a.raw"\nallocator = "foo"\n')
    proc = run_cli("serve", "--config", conf)
    assert proc.returncode == 2
    assert_one_line_error(proc, str(conf), 'export[0].allocator: expected "fixed" or "qemu-1.1.2" or "qemu-1.1.2+b7ab0fea", got "foo"')


def test_missing_config(tmp_path):
    proc = run_cli("serve", "--config", tmp_path / "absent.toml")
    assert proc.returncode == 2
    assert_one_line_error(proc, "absent.toml", "No such file")


def test_config_missing_image_file(tmp_path):
    conf = tmp_path / "c.toml"
    conf.write_text(f'[server]\nport = {free_port()}\n[[export]]\nimage = "gone.qcow2"\n')
    proc = run_cli("serve", "--config", conf)
    assert proc.returncode == 1
    assert_one_line_error(proc, str(tmp_path / "gone.qcow2"))


@pytest.mark.parametrize("args, fragment", [
    (["serve"], "IMAGE"),
    (["serve", "a.raw", "--config", "c.toml"], "not both"),
    (["serve", "--config", "c.toml", "-x", "n"], "-x"),
    (["serve", "-f", "vmdk", "a.raw"], "vmdk"),
    (["serve", "--allocator", "foo", "a.raw"], "foo"),
    (["serve", "--delay", "cow_read", "a.raw"], "EVENT=SECONDS"),
    (["serve", "--delay", "cow_read=-1", "a.raw"], "--delay.cow_read"),
    (["serve", "-p", "70000", "a.raw"], "70000"),
    (["serve", "--bogus", "a.raw"], "--bogus"),
    (["create", "-f", "raw", "x.raw", "12Q"], "12Q"),
    (["create", "-f", "raw", "-b", "base.raw", "x.raw", "1M"], "backing"),
    (["create", "-f", "raw", "x.raw"], "SIZE"),
    (["create", "-f", "qcow2", "-o", "cluster_size=3000", "x.qcow2", "1M"], "cluster_size"),
    (["create", "-f", "qcow2", "-o", "compat=2", "x.qcow2", "1M"], "compat"),
    (["create", "-f", "qcow2", "-o", "nope=1", "x.qcow2", "1M"], "nope"),
    ([], "COMMAND"),
])
def test_usage_errors(tmp_path, args, fragment):
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 2
    assert_one_line_error(proc, fragment)
    assert not (tmp_path / "x.raw").exists()


# -- create raw ----------------------------------------------------------------------------------

@pytest.mark.parametrize("size, expected", [
    ("4096", 4096), ("64k", 64 << 10), ("64K", 64 << 10), ("3M", 3 << 20), ("1.5M", 3 << 19),
    ("2G", 2 << 30), ("1T", 1 << 40),
])
def test_create_raw(tmp_path, size, expected):
    path = tmp_path / "new.raw"
    proc = run_cli("create", "-f", "raw", path, size)
    assert proc.returncode == 0, proc.stderr
    assert os.path.getsize(path) == expected
    if expected <= 3 << 20:
        assert path.read_bytes() == bytes(expected)


def test_create_raw_overwrites(tmp_path):
    path = tmp_path / "new.raw"
    path.write_bytes(b"\xff" * 8192)
    assert run_cli("create", "-f", "raw", path, "4k").returncode == 0
    assert path.read_bytes() == bytes(4096)


def test_create_raw_is_served(nbdserve, tmp_path):
    path = tmp_path / "made.raw"
    assert run_cli("create", "-f", "raw", path, "2M").returncode == 0
    proc = nbdserve("serve", "-f", "raw", "-x", "m", path)
    info = subprocess.run(["nbdinfo", "--json", proc.uri], capture_output=True, text=True, timeout=60)
    assert json.loads(info.stdout)["exports"][0]["export-size"] == 2 << 20


# -- demo ----------------------------------------------------------------------------------------

def expected_demo_base() -> bytes:
    """What conf/demo.toml's base image holds: 64 MiB, each MiB starting with a line naming it."""
    data = bytearray(64 << 20)
    for mib in range(64):
        line = f"nbdserve demo base image: MiB {mib}\n".encode()
        data[mib << 20: (mib << 20) + len(line)] = line
    return bytes(data)


def test_demo_chain_is_created(tmp_path):
    from nbdserve.demo import make_demo_chain

    make_demo_chain(tmp_path / "demo")
    base, top = tmp_path / "demo" / "base.qcow2", tmp_path / "demo" / "top.qcow2"
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", top], capture_output=True,
                                     text=True, check=True).stdout)
    assert info["format"] == "qcow2"
    assert info["backing-filename"] == "base.qcow2" and info["backing-filename-format"] == "qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "raw", base, tmp_path / "base.raw"], check=True)
    subprocess.run(["qemu-img", "convert", "-O", "raw", top, tmp_path / "top.raw"], check=True)
    want = expected_demo_base()
    assert (tmp_path / "base.raw").read_bytes() == want
    want_top = bytearray(want)
    want_top[4 << 20: (4 << 20) + (64 << 10)] = b"T" * (64 << 10)
    assert (tmp_path / "top.raw").read_bytes() == want_top
    # a second run keeps the existing images
    mtime = top.stat().st_mtime_ns
    make_demo_chain(tmp_path / "demo")
    assert top.stat().st_mtime_ns == mtime


def test_demo_serves_the_chain(nbdserve, tmp_path):
    conf = tmp_path / "demo.toml"
    conf.write_text((Path(__file__).resolve().parent.parent / "conf" / "demo.toml").read_text())
    port = free_port()
    proc = nbdserve("demo", "--config", conf, "--port", port, expected_uris=2)
    assert proc.uris == [f"nbd://127.0.0.1:{port}/base", f"nbd://127.0.0.1:{port}/top"]
    subprocess.run(["nbdcopy", proc.uris[0], tmp_path / "base.out"], check=True, timeout=120)
    subprocess.run(["nbdcopy", proc.uris[1], tmp_path / "top.out"], check=True, timeout=120)
    want = expected_demo_base()
    assert (tmp_path / "base.out").read_bytes() == want
    want_top = bytearray(want)
    want_top[4 << 20: (4 << 20) + (64 << 10)] = b"T" * (64 << 10)
    assert (tmp_path / "top.out").read_bytes() == want_top
    # base is read-only, top takes writes
    assert_write_refused(proc.uris[0])
    io = qemu_io(proc.uris[1], "write -P 0x42 8M 64k", "read -P 0x42 8M 64k")
    assert io.returncode == 0 and "Pattern verification failed" not in io.stdout, io.stdout + io.stderr


def test_port_in_use(tmp_path, raw_disk):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_cli("serve", "-f", "raw", "-p", port, raw_disk)
    assert proc.returncode == 1
    assert_one_line_error(proc)
    assert "in use" in proc.stderr.lower()


# -- create qcow2 (the engine's create_image behind the CLI) ------------------------------------

def qemu_img_info(path) -> dict:
    out = subprocess.run(["qemu-img", "info", "--output=json", path], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out)


def test_create_qcow2_options(tmp_path):
    path = tmp_path / "new.qcow2"
    proc = run_cli("create", "-f", "qcow2", "-o", "cluster_size=4k,compat=1.1",
                   "-o", "refcount_bits=8,lazy_refcounts=on", path, "16M")
    assert proc.returncode == 0, proc.stderr
    info = qemu_img_info(path)
    assert info["format"] == "qcow2" and info["virtual-size"] == 16 << 20
    assert info["cluster-size"] == 4096
    spec = info["format-specific"]["data"]
    assert (spec["compat"], spec["refcount-bits"], spec["lazy-refcounts"]) == ("1.1", 8, True)
    assert subprocess.run(["qemu-img", "check", path], capture_output=True).returncode == 0


def test_create_qcow2_extended_l2_zstd(tmp_path):
    path = tmp_path / "x.qcow2"
    proc = run_cli("create", "-f", "qcow2", "-o", "extended_l2=on,compression_type=zstd", path, "1G")
    assert proc.returncode == 0, proc.stderr
    spec = qemu_img_info(path)["format-specific"]["data"]
    assert (spec["extended-l2"], spec["compression-type"]) == (True, "zstd")
    assert subprocess.run(["qemu-img", "check", path], capture_output=True).returncode == 0


def test_create_qcow2_refused_by_engine(tmp_path):
    # qcow2 v2 (compat=0.10) has no refcount widths other than 16 bits
    proc = run_cli("create", "-f", "qcow2", "-o", "compat=0.10,refcount_bits=8", tmp_path / "x.qcow2", "1M")
    assert proc.returncode == 1
    assert_one_line_error(proc, "compat")


def test_create_qcow2_backing_size_from_backing(tmp_path):
    (tmp_path / "base.raw").write_bytes(bytes(3 << 20))
    proc = run_cli("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", tmp_path / "top.qcow2")
    assert proc.returncode == 0, proc.stderr
    info = qemu_img_info(tmp_path / "top.qcow2")
    assert info["virtual-size"] == 3 << 20
    assert info["backing-filename"] == "base.raw" and info["backing-filename-format"] == "raw"
    assert info["cluster-size"] == 65536
    assert info["format-specific"]["data"]["compat"] == "1.1"


# -- start-up -------------------------------------------------------------------------------------

def test_check_loads_only_what_it_runs(tmp_path):
    """``nbdserve check`` parses its flags without what the other commands need (the config
    module and tomllib, logging, Trio, the server, the reproduce scenarios): at start-up they
    would cost more than the check of a 4 GiB image."""
    path = tmp_path / "a.qcow2"
    assert run_cli("create", "-f", "qcow2", path, "64M").returncode == 0
    code = ("import sys\n"
            "from nbdserve.cli import main\n"
            "rc = main(['check', sys.argv[1]])\n"
            "print(*sys.modules, file=sys.stderr)\n"
            "sys.exit(rc)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("No errors were found on the image.")
    unwanted = ("nbdserve.config", "tomllib", "logging", "trio", "nbdserve.server", "nbdserve.reproduce")
    loaded = proc.stderr.split()
    assert [m for m in loaded if m in unwanted or m.startswith(tuple(u + "." for u in unwanted))] == []


def test_serve_port_zero_binds_a_free_port_and_names_it(nbdserve, tmp_path):
    """-p 0: the kernel picks the port; the serving line gives the port actually bound."""
    disk = tmp_path / "d.raw"
    disk.write_bytes(bytes(1 << 20))
    proc = nbdserve("serve", "-f", "raw", "-x", "d", "-p", "0", str(disk))
    port = int(proc.uri.split(":")[2].split("/")[0])
    assert port != 0
    out = subprocess.run(["nbdinfo", "--size", proc.uri], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(1 << 20)
