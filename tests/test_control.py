"""The control socket (``serve --control SOCKET``) and ``nbdserve ctl``: blkdebug breakpoints,
delays and injected errors of a running server, driven while qemu-io talks NBD to it.

Every outcome is what qemu-io prints (the bytes a write left, the errno it got, whether it
finished) or what ``nbdserve ctl`` exits with; a request stopped at a breakpoint is seen as a
qemu-io process that has not finished, and finishes after ``resume``.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from contextlib import contextmanager

import pytest

from conftest import NbdserveProcess, free_port, nbdserve_command
from qemu_tools import QEMU_IO, check, check_no_corruption, create, qemu_io

K = 1024
EVENTS_THAT_CAN_STOP = ("cluster_alloc, cow_read, cow_write, flush_to_disk, flush_to_os, l1_update, "
                        "l2_alloc_write, l2_update, read_backing_aio, write_aio")
WAIT = "60"      # wait-break's --timeout where a request does reach the breakpoint: only a hang ends it


def ctl(sock, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*nbdserve_command(), "ctl", str(sock), *args], capture_output=True, text=True,
                          timeout=120)


def ctl_ok(sock, *args: str) -> None:
    p = ctl(sock, *args)
    assert p.returncode == 0 and p.stdout == p.stderr == "", (args, p.returncode, p.stdout, p.stderr)


def ctl_refused(sock, *args: str, status: int = 1) -> str:
    """``nbdserve ctl`` must fail with one ``nbdserve: error:`` line; that line."""
    p = ctl(sock, *args)
    lines = p.stderr.splitlines()
    assert p.returncode == status and len(lines) == 1 and lines[0].startswith("nbdserve: error: "), \
        (args, p.returncode, p.stderr)
    return lines[0]


def io(uri: str, *commands: str) -> str:
    """qemu-io over NBD (the export is raw to the client); fails on any failed command."""
    return qemu_io(uri, *commands, fmt="raw")


@contextmanager
def background_io(uri: str, *commands: str):
    """qemu-io running while the test goes on; ``finish()`` waits for it and gives its output."""
    args = [QEMU_IO, "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    proc = subprocess.Popen(args + [uri], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def finish() -> str:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
        return out
    proc.finish = finish
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def served(tmp_path, nbdserve):
    """A fresh 64 KiB-cluster qcow2 image with 0x11 at 1M..1M+64K, served with a control socket:
    (server, control socket, image)."""
    image = create(tmp_path / "disk.qcow2", "4M")
    qemu_io(image, "write -P 0x11 1M 64k")
    sock = tmp_path / "control.sock"
    server = nbdserve("serve", "-x", "disk", "--control", sock, image)
    return server, sock, image


# ------------------------------------------------------------------ breakpoints
def test_break_stops_a_cow_write_while_other_clients_are_served(served):
    """break cow_write A; an allocating unaligned write (its tail COW reaches cow_write) from one
    qemu-io; wait-break returns; another qemu-io reads the write's range and the rest of the disk
    meanwhile; the first one finishes only after resume, with its bytes in place."""
    server, sock, image = served
    ctl_ok(sock, "break", "cow_write", "A")
    with background_io(server.uri, "write -P 0x5a 4k 8k") as writer:
        ctl_ok(sock, "wait-break", "A", "--timeout", WAIT)
        out = io(server.uri, "read 0 64k", "read -P 0x11 1M 64k")
        assert "read 65536/65536 bytes at offset 0\n" in out and "at offset 1048576" in out
        assert writer.poll() is None            # still stopped at cow_write
        ctl_ok(sock, "resume", "A")
        assert "wrote 8192/8192 bytes at offset 4096" in writer.finish()
    io(server.uri, "read -P 0 0 4k", "read -P 0x5a 4k 8k", "read -P 0 12k 52k", "read -P 0x11 1M 64k")
    ctl_refused(sock, "resume", "A")            # a breakpoint stops one request, then it is gone
    assert server.stop() == 0
    check(image)


def test_several_control_clients_wait_for_one_breakpoint(served):
    """Two ``ctl wait-break`` clients at once, and a third that arms and resumes: both return."""
    server, sock, _ = served
    ctl_ok(sock, "break", "write_aio", "W")
    cmd = [*nbdserve_command(), "ctl", str(sock), "wait-break", "W", "--timeout", WAIT]
    waiters = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        with background_io(server.uri, "write -P 0x33 2M 64k") as writer:
            for w in waiters:
                _, err = w.communicate(timeout=120)
                assert w.returncode == 0, err
            assert writer.poll() is None
            ctl_ok(sock, "resume", "W")
            writer.finish()
    finally:
        for w in waiters:
            if w.poll() is None:
                w.kill()
    io(server.uri, "read -P 0x33 2M 64k")


def test_remove_break_and_clear_resume_what_is_suspended(served):
    server, sock, _ = served
    for cluster, ending in ((1, ("remove-break", "A")), (2, ("clear",))):
        ctl_ok(sock, "break", "cow_write", "A")   # each time a fresh cluster: a write with a COW
        with background_io(server.uri, f"write -P 0x44 {cluster * 64 + 4}k 4k") as writer:
            ctl_ok(sock, "wait-break", "A", "--timeout", WAIT)
            ctl_ok(sock, *ending)
            writer.finish()
        assert "unknown tag 'A'" in ctl_refused(sock, "wait-break", "A")
    # a breakpoint removed before anything reached it stops nothing
    ctl_ok(sock, "break", "cow_write", "B")
    ctl_ok(sock, "remove-break", "B")
    io(server.uri, "write -P 0x45 196k 4k", "read -P 0x45 196k 4k", "read -P 0x44 68k 4k", "read -P 0x44 132k 4k")


def test_breakpoint_refusals(served):
    server, sock, _ = served
    assert ctl_refused(sock, "break", "no_such", "A") == (
        "nbdserve: error: ctl break: unknown blkdebug event 'no_such'; known: l1_update, "
        "l1_grow_alloc_table, l1_grow_write_table, l1_grow_activate_table, l2_load, l2_update, "
        "l2_alloc_cow_read, l2_alloc_write, read_aio, read_backing_aio, read_compressed, write_aio, "
        "cow_read, cow_write, reftable_grow, refblock_load, refblock_update, refblock_update_part, refblock_alloc, "
        "refblock_alloc_hookup, refblock_alloc_write, refblock_alloc_write_table, "
        "refblock_alloc_switch_table, cluster_alloc, cluster_free, flush_to_os, flush_to_disk")
    assert ctl_refused(sock, "break", "cluster_free", "A") == (
        "nbdserve: error: ctl break: blkdebug event 'cluster_free' cannot stop at a breakpoint: it fires "
        f"inside a synchronous metadata update; events that can: {EVENTS_THAT_CAN_STOP}")
    assert "'read_aio' cannot stop at a breakpoint: it is never fired" in ctl_refused(sock, "break", "read_aio", "A")
    assert ctl_refused(sock, "resume", "B") == "nbdserve: error: ctl resume: unknown tag 'B'"
    assert ctl_refused(sock, "remove-break", "B") == "nbdserve: error: ctl remove-break: unknown tag 'B'"
    assert ctl_refused(sock, "wait-break", "B") == "nbdserve: error: ctl wait-break: unknown tag 'B'"
    ctl_ok(sock, "break", "cow_write", "A")
    assert "tag 'A' is in use" in ctl_refused(sock, "break", "cow_read", "A")
    assert "'cow_write' already has a breakpoint ('A')" in ctl_refused(sock, "break", "cow_write", "C")
    assert "no request is suspended at 'A'" in ctl_refused(sock, "resume", "A")
    # nothing reaches cow_write: the wait ends with its timeout, and the breakpoint stays armed
    assert ctl_refused(sock, "wait-break", "A", "--timeout", "0.2") == (
        "nbdserve: error: ctl wait-break: timed out after 0.2 s: no request reached breakpoint 'A'")
    ctl_ok(sock, "remove-break", "A")
    io(server.uri, "write -P 0x12 8k 4k", "read -P 0x12 8k 4k")   # the server served on throughout


# ------------------------------------------------------------------ delays
def test_delay_accepts_only_events_a_request_waits_at(served):
    server, sock, _ = served
    assert ctl_refused(sock, "delay", "l2_load", "1") == (
        "nbdserve: error: ctl delay: blkdebug event 'l2_load' cannot be delayed: it fires inside a "
        f"synchronous metadata update; events that can: {EVENTS_THAT_CAN_STOP}")
    ctl_ok(sock, "delay", "cow_read", "0.001")
    ctl_ok(sock, "delay", "cow_read", "0")      # removed
    assert "invalid float value" in ctl_refused(sock, "delay", "cow_read", "soon", status=2)
    io(server.uri, "write -P 0x13 20k 4k", "read -P 0x13 20k 4k")


@pytest.mark.parametrize("args, message", [
    (["--delay", "cluster_free=1"], "serve: --delay.cluster_free: blkdebug event 'cluster_free' cannot be "
                                    f"delayed: it fires inside a synchronous metadata update; events that can: "
                                    f"{EVENTS_THAT_CAN_STOP}"),
    (["--delay", "read_aio=1"], "serve: --delay.read_aio: blkdebug event 'read_aio' cannot be delayed: "
                                "it is never fired"),
    (["--delay", "no_such=1"], "serve: --delay.no_such: unknown blkdebug event 'no_such'"),
])
def test_startup_delay_on_an_event_that_cannot_wait_is_refused(tmp_path, args, message):
    image = create(tmp_path / "d.qcow2", "1M")
    p = subprocess.run([*nbdserve_command(), "serve", "-p", str(free_port()), *args, image],
                       capture_output=True, text=True, timeout=30)
    lines = p.stderr.splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"nbdserve: error: {message}"), p.stderr


def test_config_delay_on_a_sync_event_is_refused(tmp_path):
    create(tmp_path / "d.qcow2", "1M")
    conf = tmp_path / "n.toml"
    conf.write_text('[[export]]\nimage = "d.qcow2"\ndelay = { refblock_update = 0.5 }\n')
    p = subprocess.run([*nbdserve_command(), "serve", "--config", str(conf)], capture_output=True, text=True,
                       timeout=30)
    assert p.returncode == 2 and p.stderr.startswith(
        f"nbdserve: error: {conf}: export[0].delay.refblock_update: blkdebug event 'refblock_update' "
        "cannot be delayed"), p.stderr


# ------------------------------------------------------------------ injected errors
def test_inject_error_fails_the_clients_write_with_that_errno(served):
    server, sock, image = served
    ctl_ok(sock, "inject-error", "write_aio", "ENOSPC", "once")
    out = qemu_io(server.uri, "write -P 0x21 24k 4k", "write -P 0x21 24k 4k", fmt="raw", check=False)
    assert out.count("write failed: No space left on device") == 1, out     # once
    assert out.count("wrote 4096/4096 bytes at offset 24576") == 1, out
    ctl_ok(sock, "inject-error", "write_aio", "5")                          # EIO by number, every time
    out = qemu_io(server.uri, "write -P 0x22 28k 4k", "write -P 0x22 28k 4k", fmt="raw", check=False)
    assert out.count("write failed: Input/output error") == 2, out
    ctl_ok(sock, "clear")
    io(server.uri, "write -P 0x23 28k 4k", "read -P 0x23 28k 4k", "read -P 0x21 24k 4k")
    assert "unknown errno 'EBOGUS'" in ctl_refused(sock, "inject-error", "write_aio", "EBOGUS")
    assert "unknown blkdebug event 'nope'" in ctl_refused(sock, "inject-error", "nope", "EIO")
    assert "invalid choice: 'twice'" in ctl_refused(sock, "inject-error", "write_aio", "EIO", "twice", status=2)
    assert server.stop() == 0
    check_no_corruption(image)       # a write failed after its allocation: a leak at most, as in qemu


# ------------------------------------------------------------------ exports, sockets, garbage
def test_exports_are_named_when_there_are_several(tmp_path, nbdserve):
    create(tmp_path / "a.qcow2", "1M")
    (tmp_path / "b.raw").write_bytes(bytes(1 << 20))
    conf = tmp_path / "n.toml"
    conf.write_text(f'[server]\nport = {free_port()}\ncontrol = "ctl.sock"\n'
                    '[[export]]\nname = "a"\nimage = "a.qcow2"\n'
                    '[[export]]\nname = "b"\nimage = "b.raw"\n')
    server = nbdserve("serve", "--config", conf)
    sock = tmp_path / "ctl.sock"            # relative to the config file's folder
    assert ctl_refused(sock, "clear") == (
        "nbdserve: error: ctl clear: several exports ('a', 'b'): name one with \"export\"")
    assert ctl_refused(sock, "clear", "--export", "c") == (
        "nbdserve: error: ctl clear: no export named 'c' (exports: 'a', 'b')")
    assert ctl_refused(sock, "--export", "b", "break", "cow_write", "A") == (
        "nbdserve: error: ctl break: export 'b' serves a raw file: a raw file has no blkdebug events")
    ctl_ok(sock, "break", "cow_write", "A", "--export", "a")
    ctl_ok(sock, "--export", "a", "remove-break", "A")
    assert server.stop() == 0
    assert not sock.exists()                # removed on exit, like -k's socket


def test_no_server_at_the_socket(tmp_path):
    assert ctl_refused(tmp_path / "none.sock", "clear") == (
        f"nbdserve: error: ctl clear: cannot connect to {tmp_path / 'none.sock'}: No such file or directory "
        "(is nbdserve serve --control running there?)")
    plain = tmp_path / "plain.sock"
    with socket.socket(socket.AF_UNIX) as s:   # a socket nobody accepts on any more
        s.bind(str(plain))
    assert "Connection refused" in ctl_refused(plain, "clear")


def test_garbage_gets_an_error_line_and_the_server_serves_on(served):
    server, sock, _ = served
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock))
        f = s.makefile("rb")
        for line, error in [
            (b"hello\n", "not a JSON object: 'hello'"),
            (b"\xff\xfe\n", "not a JSON object: '\\\\xff\\\\xfe'"),
            (b"[1, 2]\n", "not a JSON object: '[1, 2]'"),
            (b'{"tag": "A"}\n', 'missing "cmd"'),
            (b'{"cmd": "explode"}\n', "unknown command 'explode'; expected one of: break, wait-break, resume, "
                                      "remove-break, delay, inject-error, clear, trace"),
            (b'{"cmd": "break", "event": "cow_write"}\n', "break: missing 'tag'"),
            (b'{"cmd": "break", "event": "cow_write", "tag": 7}\n', "break: 'tag' must be a non-empty string, got 7"),
            (b'{"cmd": "delay", "event": "cow_write", "seconds": -1}\n',
             "delay: 'seconds' must be a non-negative number of seconds, got -1"),
            (b'{"cmd": "clear", "force": true}\n', "clear: unknown key 'force' (expected: export)"),
        ]:
            s.sendall(line)
            reply = json.loads(f.readline())
            assert reply == {"ok": False, "error": error}, line
        io(server.uri, "write -P 0x14 36k 4k", "read -P 0x14 36k 4k")
        s.sendall(b'{"cmd": "clear"}\n')                      # the same client, still answered
        assert json.loads(f.readline()) == {"ok": True}
        s.sendall(b"x" * (70 * K))                            # no newline in sight: refused, closed
        assert json.loads(f.readline()) == {"ok": False, "error": "line longer than 65536 bytes"}
        assert f.readline() == b""
    io(server.uri, "read -P 0x14 36k 4k")


def test_ctl_loads_no_trio(served):
    """``nbdserve ctl`` is a plain socket client: neither Trio nor the server nor the engine."""
    _, sock, _ = served
    code = ("import sys\n"
            "from nbdserve.cli import main\n"
            "rc = main(['ctl', sys.argv[1], 'clear'])\n"
            "print(*sys.modules, file=sys.stderr)\n"
            "sys.exit(rc)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(sock)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    unwanted = ("trio", "nbdserve.server", "nbdserve.qcow2", "nbdserve.config", "nbdserve.reproduce")
    loaded = proc.stderr.split()
    assert [m for m in loaded if m in unwanted or m.startswith(tuple(u + "." for u in unwanted))] == []


def test_control_with_config_is_refused_on_the_command_line(tmp_path):
    conf = tmp_path / "n.toml"
    conf.write_text('[[export]]\nimage = "x.qcow2"\n')
    p = subprocess.run([*nbdserve_command(), "serve", "--config", str(conf), "--control", "c.sock"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "--control cannot be combined with --config" in p.stderr, p.stderr


def test_shutdown_resumes_a_suspended_request(tmp_path):
    """SIGTERM while a write is stopped at a breakpoint: it is resumed, finishes, and the image
    is flushed and clean."""
    image = create(tmp_path / "disk.qcow2", "4M")
    sock = tmp_path / "control.sock"
    server = NbdserveProcess("serve", "-x", "disk", "-p", str(free_port()), "--control", str(sock), image).start()
    try:
        ctl_ok(sock, "break", "cow_write", "A")
        with background_io(server.uri, "write -P 0x66 4k 4k") as writer:
            ctl_ok(sock, "wait-break", "A", "--timeout", WAIT)
            assert server.stop() == 0
            assert "wrote 4096/4096 bytes at offset 4096" in writer.finish()
    finally:
        if server.proc.poll() is None:
            server.stop()
    check(image)
    qemu_io(image, "read -P 0x66 4k 4k", "read -P 0 8k 56k")
