"""Read-only layers answer reads with FileSlices sent by sendfile(2): what clients read
must be what qemu reads from the same chain, through every kind of read reply."""

from __future__ import annotations

import os
import random
import socket

import pytest

from conftest import import_libnbd
import trio

from nbdserve.blockdev import FILE_SLICE_MIN, FileSlice, RawFile
from nbdserve.server.settings import ExportSettings
from nbdserve.qcow2 import Qcow2Image
from nbdserve.server.sender import ReplySender
from nbdhelpers import MiB, make_raw, run, start_server

nbd = import_libnbd()

SIZE = 48 * MiB


def chain(tmp_path) -> tuple[str, str, bytes]:
    """base.raw (sparse, random regions) <- top.qcow2 (64 KiB clusters, its own writes at
    odd offsets); returns (top, a writable copy of top, qemu's view of the chain)."""
    rng = random.Random(6)
    regions = {off: rng.randbytes(n) for off, n in ((0, 3 * MiB), (5 * MiB + 4096, 7 * MiB),
                                                      (20 * MiB, 64 * 1024 - 1), (40 * MiB - 100, 8 * MiB + 100))}
    base = make_raw(tmp_path / "base.raw", SIZE, regions)
    top = str(tmp_path / "top.qcow2")
    qemu = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536",
            "-b", base, "-F", "raw", top]
    assert os.spawnvp(os.P_WAIT, qemu[0], qemu) == 0
    writes = " ".join(f"-c 'write -P {p} {o} {n}'" for p, o, n in
                      ((0x11, MiB + 512, 3 * MiB), (0x22, 9 * MiB, 64 * 1024), (0x33, 30 * MiB, 6 * MiB + 3)))
    assert os.system(f"qemu-io -f qcow2 {writes} {top} >/dev/null") == 0
    copy = str(tmp_path / "top-rw.qcow2")
    assert os.system(f"cp {top} {copy}") == 0
    reference = str(tmp_path / "reference.raw")
    assert os.system(f"qemu-img convert -O raw {top} {reference}") == 0
    with open(reference, "rb") as f:
        return top, copy, f.read()


async def test_read_only_layers_give_file_slices_writable_ones_do_not(tmp_path):
    top, copy, expected = chain(tmp_path)
    ro, rw = Qcow2Image.open(top, read_only=True), Qcow2Image.open(copy)
    try:
        for img in (ro, rw):
            chunks = img.read_sparse_now(0, SIZE, file_slices=True)
            got = bytearray()
            for c in chunks:
                got += bytes(c.length) if c.data is None else (
                    c.data.read() if isinstance(c.data, FileSlice) else bytes(c.data))
            assert bytes(got) == expected
            own = [c for c in chunks if isinstance(c.data, FileSlice) and c.data.fd == img.fd]
            below = [c for c in chunks if isinstance(c.data, FileSlice) and c.data.fd != img.fd]
            assert below, "the backing file (read-only) gives slices"
            assert bool(own) == img.read_only   # a writable layer's data can change after the read
            assert all(c.length >= FILE_SLICE_MIN for c in own + below)
        # without the caller asking, never
        assert not any(isinstance(c.data, FileSlice) for c in ro.read_sparse_now(0, SIZE))
    finally:
        await ro.close()
        await rw.close()


def read_all(uri: str, request: int, *, structured: bool = True, df: bool = False,
             in_flight: int = 16) -> bytes:
    """The whole export in ``request``-byte reads, ``in_flight`` at a time (libnbd aio)."""
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    h.connect_uri(uri)
    try:
        assert h.get_structured_replies_negotiated() == structured
        size = h.get_size()
        out = bytearray(size)
        chunks = []

        def chunk(data, offset, status, error):
            chunks.append(len(data))
            out[offset:offset + len(data)] = bytes(len(data)) if status == nbd.READ_HOLE else data
            return 0
        pending = []
        offsets = list(range(0, size, request))
        random.Random(request).shuffle(offsets)
        while offsets or pending:
            while offsets and len(pending) < in_flight:
                off = offsets.pop()
                buf = nbd.Buffer(min(request, size - off))
                if structured:
                    cookie = h.aio_pread_structured(buf, off, chunk, flags=nbd.CMD_FLAG_DF if df else 0)
                else:
                    cookie = h.aio_pread(buf, off)
                pending.append((cookie, off, buf))
            h.poll(-1)
            still = []
            for cookie, off, buf in pending:
                if not h.aio_command_completed(cookie):
                    still.append((cookie, off, buf))
                elif not structured:
                    out[off:off + len(buf.to_bytearray())] = buf.to_bytearray()
            pending = still
        if df:   # proto.md: "NBD_CMD_FLAG_DF": the data of a read in one chunk
            assert len(chunks) == len(range(0, size, request))
        return bytes(out)
    finally:
        h.shutdown()


@pytest.mark.parametrize("mode", ["structured", "df", "simple"])
async def test_clients_read_what_qemu_reads(tmp_path, nursery, mode):
    top, copy, expected = chain(tmp_path)
    served = await start_server(nursery, [ExportSettings("ro", top, "qcow2", read_only=True),
                                          ExportSettings("rw", copy, "qcow2")])
    for name in ("ro", "rw"):
        for request in (4096, 3 * MiB + 512, 32 * MiB):
            got = await trio.to_thread.run_sync(lambda: read_all(
                served.uri(name), request, structured=mode != "simple", df=mode == "df"))
            assert got == expected, (name, request, mode)


async def test_nbdcopy_and_qemu_img_compare(tmp_path, nursery):
    top, _, expected = chain(tmp_path)
    served = await start_server(nursery, [ExportSettings("ro", top, "qcow2", read_only=True)])
    out = tmp_path / "copy.raw"
    await run("nbdcopy", "--connections=4", "--requests=16", served.uri("ro"), str(out))
    assert out.read_bytes() == expected
    await run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", served.uri("ro"), top)


async def tcp_pair(sndbuf: int) -> tuple[trio.SocketStream, trio.SocketStream]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    client = await trio.open_tcp_stream("127.0.0.1", listeners[0].socket.getsockname()[1])
    server = await listeners[0].accept()
    await listeners[0].aclose()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    return server, client


async def receive_exactly(stream, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        chunk = await stream.receive_some(256 * 1024)
        assert chunk, f"stream ended after {len(got)} of {n} bytes"
        got += chunk
        await trio.sleep(0.001)
    return bytes(got)


async def test_sender_interleaves_buffers_and_slices_through_partial_sends(tmp_path):
    path = tmp_path / "data"
    content = os.urandom(8 * MiB)
    path.write_bytes(content)
    raw = RawFile(str(path), read_only=True)
    server, client = await tcp_pair(sndbuf=64 * 1024)   # sendfile/sendmsg take part at a time
    sender = ReplySender(server)
    rng = random.Random(3)
    parts, expected = [], bytearray()
    for i in range(24):
        header = i.to_bytes(4, "big") * 4
        off, n = rng.randrange(0, 7 * MiB), rng.choice([1, 4096, 65536, MiB + 7])
        parts.append([header, FileSlice(raw.fd, off, n)] if i % 2 else [header, os.urandom(n)])
        expected += header + (content[off:off + n] if i % 2 else parts[-1][1])
    try:
        async with trio.open_nursery() as nursery:
            result = {}

            async def reader():
                result["bytes"] = await receive_exactly(client, len(expected))
            nursery.start_soon(reader)
            for reply in parts:
                sender.queue(reply)
                await sender.send()
        assert result["bytes"] == bytes(expected) and sender.queued == 0
    finally:
        sender.close()
        await server.aclose()
        await client.aclose()
        await raw.close()


async def test_a_slice_of_a_file_that_shrank_breaks_the_connection(tmp_path):
    """The reply header has announced the bytes: the connection must drop, not send zeros."""
    path = tmp_path / "data"
    path.write_bytes(os.urandom(MiB))
    raw = RawFile(str(path), read_only=True)
    server, client = await tcp_pair(sndbuf=1 << 20)
    sender = ReplySender(server)
    try:
        os.truncate(path, 4096)
        sender.queue([b"header", FileSlice(raw.fd, 0, MiB)])
        with pytest.raises(trio.BrokenResourceError):
            await sender.send()
    finally:
        sender.close()
        await server.aclose()
        await client.aclose()
        await raw.close()
