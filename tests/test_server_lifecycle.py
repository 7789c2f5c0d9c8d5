"""The server as a process: SIGTERM stops it cleanly; and qcow2 exports when the engine exists."""

from __future__ import annotations

import signal
import subprocess
import sys

import trio

from nbdserve.server.settings import ExportSettings
from nbdhelpers import MiB, file_bytes, libnbd_handle, make_raw, run, start_server

SERVE_SCRIPT = """
import sys, trio
from nbdserve.server.settings import ExportSettings, ServerSettings
from nbdserve.server import run_server

async def main():
    config = ServerSettings(exports=[ExportSettings("d", sys.argv[1], "raw")], port=0)
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(run_server, config)
        print(bound[0][1], flush=True)

trio.run(main)
"""


async def test_sigterm_finishes_and_returns(tmp_path):
    disk = make_raw(tmp_path / "d.raw", MiB, {})
    proc = await trio.lowlevel.open_process([sys.executable, "-c", SERVE_SCRIPT, disk],
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = b""
        while not line.endswith(b"\n"):
            chunk = await proc.stdout.receive_some(64)
            assert chunk, "server exited before listening"
            line += chunk
        port = int(line)
        h = await trio.to_thread.run_sync(libnbd_handle, f"nbd://127.0.0.1:{port}/d")
        await trio.to_thread.run_sync(h.pwrite, b"persisted", 4096)
        proc.send_signal(signal.SIGTERM)
        assert await proc.wait() == 0
        stderr = b""
        while chunk := await proc.stderr.receive_some(65536):
            stderr += chunk
    finally:
        if proc.returncode is None:
            proc.kill()
    assert b"shutting down" in stderr and b"stopped" in stderr
    assert file_bytes(disk, 4096, 9) == b"persisted"
    del h


async def test_qcow2_export_reads_like_qemu(tmp_path, nursery):
    raw = make_raw(tmp_path / "src.raw", 16 * MiB, {MiB: b"\x5a" * 65536, 9 * MiB: b"qcow2!" * 100})
    image = str(tmp_path / "img.qcow2")
    await run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, image)
    server = await start_server(nursery, [ExportSettings("q", image, "qcow2")])
    await run("qemu-img", "compare", "-f", "raw", server.uri("q"), "-F", "raw", raw)
    out = (await run("qemu-io", "-f", "raw", server.uri("q"), "-c", "write -P 0x77 2M 64k",
                     "-c", "read -P 0x77 2M 64k", "-c", "read -P 0x5a 1M 64k")).stdout.decode()
    assert "Pattern verification failed" not in out


def test_an_exiting_server_leaves_a_newer_servers_socket(nbdserve, tmp_path):
    """qemu-iotests' _stop_nbd_server: kill the server, remove its socket, start the next on
    the same path at once.  The old one, still exiting, must not remove the new one's socket."""
    import subprocess
    disk = tmp_path / "d.raw"
    disk.write_bytes(bytes(1 << 20))
    sock = tmp_path / "nbd.sock"
    old = nbdserve("serve", "-f", "raw", "-x", "d", "-k", str(sock), str(disk), "-r")
    sock.unlink()
    new = nbdserve("serve", "-f", "raw", "-x", "d", "-k", str(sock), str(disk), "-r")
    assert old.stop() == 0
    assert sock.exists()
    out = subprocess.run(["nbdinfo", "--size", new.uri], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == str(1 << 20), out
