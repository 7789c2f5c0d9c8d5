"""The server in-process, driven by real NBD clients (nbdinfo, nbdcopy, qemu-io,
qemu-img, fio, libnbd) on a raw image made for each test."""

from __future__ import annotations

import json
import os

import pytest
import trio

from nbdserve.server.settings import ExportSettings
from nbdhelpers import (MiB, file_bytes, free_port, libnbd_handle, make_raw, run, same_files,
                        start_server)

SIZE = 256 * MiB
DATA_A = bytes([0xAB]) * MiB                     # at 4 MiB
DATA_B = os.urandom(64 * 1024)                   # at 100 MiB
REGIONS = {4 * MiB: DATA_A, 100 * MiB: DATA_B}
RO_DATA = b"read-only!" * 1000



@pytest.fixture
async def served(tmp_path, nursery):
    disk = make_raw(tmp_path / "disk.raw", SIZE, REGIONS)
    ro = make_raw(tmp_path / "ro.raw", 16 * MiB, {0: RO_DATA})
    server = await start_server(nursery, [
        ExportSettings("disk", disk, "raw", description="the test disk"),
        ExportSettings("ro", ro, "raw", read_only=True),
    ])
    server.disk, server.ro = disk, ro
    return server


async def test_nbdinfo_json_flags_and_sizes(served):
    info = json.loads((await run("nbdinfo", "--json", served.uri("disk"))).stdout)
    (export,) = info["exports"]
    assert export["export-size"] == SIZE
    assert export["description"] == "the test disk"
    assert set(export["contexts"]) == {"base:allocation", "qemu:allocation-depth"}
    assert not export["is_read_only"]
    for can in ("can_flush", "can_fua", "can_trim", "can_zero", "can_df", "can_multi_conn", "can_cache"):
        assert export[can], can
    ro = json.loads((await run("nbdinfo", "--json", served.uri("ro"))).stdout)["exports"][0]
    assert ro["is_read_only"] and ro["export-size"] == 16 * MiB
    assert not ro["can_trim"] and not ro["can_zero"] and not ro["can_fua"]


async def test_nbdinfo_list(served):
    out = (await run("nbdinfo", "--list", "--json", served.uri(""))).stdout
    names = {e["export-name"] for e in json.loads(out)["exports"]}
    assert names == {"disk", "ro"}


async def _map(uri: str, context: str = "base:allocation") -> list:
    out = (await run("nbdinfo", "--json", f"--map={context}", uri)).stdout
    return [(e["offset"], e["length"], e["type"]) for e in json.loads(out)]


async def test_maps_equal_qemu_nbd(served, tmp_path):
    port = free_port()
    pidfile = tmp_path / "qemu-nbd.pid"
    await run("qemu-nbd", "-f", "raw", "-x", "disk", "-p", str(port), "-b", "127.0.0.1", "-t", "-r", "-A",
              "--fork", f"--pid-file={pidfile}", served.disk)
    try:
        reference = f"nbd://127.0.0.1:{port}/disk"
        for context in ("base:allocation", "qemu:allocation-depth"):
            assert await _map(served.uri("disk"), context) == await _map(reference, context), context
    finally:
        os.kill(int(pidfile.read_text()), 15)
    ours = await _map(served.uri("disk"))
    # The data regions we wrote are data (type 0); what lies between is hole+zero (3).
    assert (4 * MiB, MiB, 0) in ours and ours[0] == (0, 4 * MiB, 3)


async def test_qemu_io_patterns(served):
    out = (await run("qemu-io", "-f", "raw", served.uri("disk"), "-c", "write -P 0x55 1M 128k",
                     "-c", "read -P 0x55 1M 128k", "-c", "read -P 0xab 4M 1M", "-c", "write -z 4M 64k",
                     "-c", "read -P 0 4M 64k", "-c", "read -P 0xab 4160k 960k")).stdout.decode()
    assert "Pattern verification failed" not in out
    assert file_bytes(served.disk, MiB, 128 * 1024) == b"\x55" * 128 * 1024
    assert file_bytes(served.disk, 4 * MiB, 64 * 1024) == bytes(64 * 1024)
    bad = (await run("qemu-io", "-f", "raw", served.uri("disk"), "-c", "read -P 0x66 1M 4k",
                     check=False)).stdout.decode()
    assert "Pattern verification failed" in bad    # the check itself works


async def test_qemu_img_compare_and_convert(served, tmp_path):
    await run("qemu-img", "compare", "-f", "raw", served.uri("disk"), "-F", "raw", served.disk)
    out = tmp_path / "converted.raw"
    await run("qemu-img", "convert", "-f", "raw", "-O", "raw", served.uri("disk"), str(out))
    assert same_files(out, served.disk)
    other = make_raw(tmp_path / "other.raw", SIZE, {5 * MiB: b"x"})
    assert (await run("qemu-img", "compare", "-f", "raw", served.uri("disk"), "-F", "raw", other,
                      check=False)).returncode == 1


async def test_nbdcopy_both_ways(served, tmp_path):
    out = tmp_path / "out.raw"
    await run("nbdcopy", served.uri("disk"), str(out))
    assert same_files(out, served.disk)
    src = make_raw(tmp_path / "src.raw", SIZE, {0: os.urandom(3 * MiB), 200 * MiB + 512: os.urandom(MiB)})
    await run("nbdcopy", src, served.uri("disk"))
    assert same_files(src, served.disk)


async def test_fio_verify(served):
    await run("fio", "--name=verify", "--ioengine=nbd", f"--uri={served.uri('disk')}", "--rw=randwrite",
              "--bs=4k", "--iodepth=16", "--size=16m", "--verify=crc32c", "--do_verify=1", "--verify_state_save=0")


async def test_broken_clients_do_not_stop_the_server(served):
    for payload in (b"", b"\0\0\0\x03", b"\0\0\0\x03" + b"garbage" * 10, b"\xff\xff\xff\xff"):
        stream = await trio.open_tcp_stream("127.0.0.1", served.port)
        await stream.receive_some(18)
        if payload:
            await stream.send_all(payload)
        await stream.aclose()
    # A client that quits mid-transmission without NBD_CMD_DISC, like fio's probe.
    def quit_rudely():
        h = libnbd_handle(served.uri("disk"))
        import nbd
        h.aio_pread(nbd.Buffer(4096), 0)
        del h   # nbd_close: drops the socket without NBD_CMD_DISC
    await trio.to_thread.run_sync(quit_rudely)
    await run("nbdinfo", served.uri("disk"))
