"""Per-command checks with Python libnbd (in worker threads) against the in-process server."""

from __future__ import annotations

import os

import pytest

from conftest import import_libnbd
import trio

from nbdserve.server.settings import ExportSettings
from nbdhelpers import MiB, file_bytes, libnbd_handle, make_raw, run, start_server

nbd = import_libnbd()

SIZE = 64 * MiB
DATA = os.urandom(MiB)          # at 8 MiB; the rest of the disk is a hole


@pytest.fixture
async def served(tmp_path, nursery):
    disk = make_raw(tmp_path / "disk.raw", SIZE, {8 * MiB: DATA})
    ro = make_raw(tmp_path / "ro.raw", MiB, {0: b"ro"})
    server = await start_server(nursery, [ExportSettings("disk", disk, "raw"),
                                          ExportSettings("ro", ro, "raw", read_only=True)], max_connections=100)
    server.disk = disk
    return server


def in_thread(fn, *args):
    return trio.to_thread.run_sync(fn, *args)


async def test_flags_advertised(served):
    def check():
        h = libnbd_handle(served.uri("disk"), "base:allocation")
        try:
            assert h.get_size() == SIZE
            assert (h.can_flush(), h.can_fua(), h.can_trim(), h.can_zero(), h.can_fast_zero(), h.can_df(),
                    h.can_multi_conn(), h.can_cache(), h.is_read_only()) == (1, 1, 1, 1, 1, 1, 1, 1, 0)
            assert h.can_meta_context("base:allocation") and h.get_structured_replies_negotiated()
        finally:
            h.shutdown()
    await in_thread(check)


async def test_structured_read_reports_holes(served):
    def read():
        h = libnbd_handle(served.uri("disk"))
        chunks = []

        def chunk(buf, offset, status, error):
            chunks.append((offset, len(buf), status, bytes(buf)))
            return 0
        h.pread_structured(4 * MiB, 6 * MiB, chunk)   # 6..10 MiB: hole, data at 8..9, hole
        h.shutdown()
        return chunks
    chunks = sorted(await in_thread(read))
    # The chunks tile 6..10 MiB exactly; holes read as zeros.
    image = bytearray()
    for offset, length, status, data in chunks:
        assert offset == 6 * MiB + len(image) and status in (nbd.READ_HOLE, nbd.READ_DATA)
        image += bytes(length) if status == nbd.READ_HOLE else data
    assert bytes(image) == bytes(2 * MiB) + DATA + bytes(MiB)
    # the file's holes travel as OFFSET_HOLE chunks
    assert (6 * MiB, 2 * MiB, nbd.READ_HOLE) in [(o, n, s) for o, n, s, _ in chunks]
    assert (9 * MiB, MiB, nbd.READ_HOLE) in [(o, n, s) for o, n, s, _ in chunks]


async def test_block_status_both_contexts(served):
    def status(flags=0):
        h = libnbd_handle(served.uri("disk"), "base:allocation", "qemu:allocation-depth")
        got = {}

        def cb(context, offset, entries, err):
            got[context] = list(zip(entries[::2], entries[1::2]))
            return 0
        h.block_status(16 * MiB, 0, cb, flags)
        h.shutdown()
        return got
    got = await in_thread(status)
    assert got["base:allocation"] == [(8 * MiB, 3), (MiB, 0), (7 * MiB, 3)]
    assert got["qemu:allocation-depth"] == [(16 * MiB, 1)]      # a raw file: all local
    one = await in_thread(status, nbd.CMD_FLAG_REQ_ONE)
    assert one["base:allocation"] == [(8 * MiB, 3)]


async def test_error_codes(served):
    def errors():
        found = {}
        h = libnbd_handle(served.uri("disk"), strict=False)
        for name, call in (("read past end", lambda: h.pread(512, SIZE)),
                           ("trim past end", lambda: h.trim(512, SIZE)),
                           ("write past end", lambda: h.pwrite(b"x" * 512, SIZE))):
            with pytest.raises(nbd.Error) as e:
                call()
            found[name] = e.value.errno
        h.shutdown()
        r = libnbd_handle(served.uri("ro"), strict=False)
        for name, call in (("write read-only", lambda: r.pwrite(b"x", 0)), ("trim read-only", lambda: r.trim(1, 0))):
            with pytest.raises(nbd.Error) as e:
                call()
            found[name] = e.value.errno
        assert r.pread(2, 0) == b"ro"
        r.shutdown()
        return found
    assert await in_thread(errors) == {"read past end": "EINVAL", "trim past end": "EINVAL",
                                       "write past end": "ENOSPC", "write read-only": "EPERM",
                                       "trim read-only": "EPERM"}


async def test_fua_write_zero_trim_flush(served):
    payload = os.urandom(64 * 1024)

    def io():
        h = libnbd_handle(served.uri("disk"))
        h.pwrite(payload, 20 * MiB, nbd.CMD_FLAG_FUA)
        h.zero(4096, 20 * MiB, nbd.CMD_FLAG_FUA)
        h.trim(4096, 20 * MiB + 8192)
        h.flush()
        back = h.pread(len(payload), 20 * MiB)
        h.shutdown()
        return back
    back = await in_thread(io)
    expected = bytes(4096) + payload[4096:8192] + bytes(4096) + payload[12288:]
    assert back == expected
    assert file_bytes(served.disk, 20 * MiB, len(payload)) == expected


async def test_many_concurrent_requests(served):
    def many():
        h = libnbd_handle(served.uri("disk"))
        blocks = {i: os.urandom(4096) for i in range(256)}
        for i, data in blocks.items():
            h.aio_pwrite(data, 32 * MiB + i * 4096)
        while h.aio_in_flight() > 0:
            h.poll(-1)
        buffers = {i: nbd.Buffer(4096) for i in blocks}
        cookies = [h.aio_pread(buffers[i], 32 * MiB + i * 4096) for i in blocks]
        while h.aio_in_flight() > 0:
            h.poll(-1)
        for cookie in cookies:
            assert h.aio_command_completed(cookie)
        h.shutdown()
        return all(buffers[i].to_bytearray() == blocks[i] for i in blocks)
    assert await in_thread(many)


async def test_64_clients_at_once(served):
    limiter = trio.CapacityLimiter(64)
    handles = []

    def connect():
        handles.append(libnbd_handle(served.uri("disk")))

    async with trio.open_nursery() as nursery:
        for _ in range(64):
            nursery.start_soon(lambda: trio.to_thread.run_sync(connect, limiter=limiter))
    assert len(handles) == 64   # all connected together

    def use(i, h):
        h.pwrite(bytes([i]) * 4096, 40 * MiB + i * 4096)
        h.flush()

    async with trio.open_nursery() as nursery:
        for i, h in enumerate(handles):
            nursery.start_soon(lambda i=i, h=h: trio.to_thread.run_sync(use, i, h, limiter=limiter))
    reader = handles[0]
    data = await in_thread(reader.pread, 64 * 4096, 40 * MiB)   # CAN_MULTI_CONN: all visible
    assert data == b"".join(bytes([i]) * 4096 for i in range(64))
    for h in handles:
        await in_thread(h.shutdown)


async def test_connection_limit_and_handshake_timeout(tmp_path, nursery):
    disk = make_raw(tmp_path / "d.raw", MiB, {})
    server = await start_server(nursery, [ExportSettings("d", disk, "raw")], max_connections=1,
                                handshake_timeout=1.0)
    first = await trio.open_tcp_stream("127.0.0.1", server.port)
    assert len(await first.receive_some(18)) > 0            # its session exists
    refused = await run("nbdinfo", server.uri("d"), check=False)
    assert refused.returncode != 0
    while await first.receive_some(100):                     # the handshake timeout closes it
        pass
    await first.aclose()
    await run("nbdinfo", server.uri("d"))


async def test_graceful_shutdown(tmp_path):
    from nbdserve.server import run_server
    from nbdserve.server.settings import ServerSettings
    disk = make_raw(tmp_path / "g.raw", MiB, {})
    stop = trio.Event()
    config = ServerSettings(exports=[ExportSettings("g", disk, "raw")], port=0)
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(lambda task_status: run_server(config, task_status=task_status, shutdown=stop))
        h = await in_thread(libnbd_handle, f"nbd://127.0.0.1:{bound[0][1]}/g")
        await in_thread(h.pwrite, b"kept", 0)
        stop.set()   # run_server returns once the connection's requests are done
    assert file_bytes(disk, 0, 4) == b"kept"
    del h   # closes the client handle
