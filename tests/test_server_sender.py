"""ReplySender: replies leave in the order queued, whole, several per send, with backpressure."""

from __future__ import annotations

import os
import socket

import pytest
import trio

from nbdserve.server.sender import HIGH_WATER, ReplySender

MiB = 1 << 20


async def tcp_pair(sndbuf: int | None = None) -> tuple[trio.SocketStream, trio.SocketStream]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listeners[0].accept()
    await listeners[0].aclose()
    if sndbuf:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    return server, client


def replies(count: int, seed: int) -> list[list[bytes]]:
    """Reply-shaped buffer lists: a small header, then sometimes a large body."""
    out = []
    for i in range(count):
        header = seed.to_bytes(2, "big") + i.to_bytes(4, "big") + os.urandom(10)
        out.append([header, os.urandom(MiB + i)] if i % 3 == 0 else [header])
    return out


async def receive_exactly(stream, n: int, pause: float = 0.0) -> bytes:
    got = bytearray()
    while len(got) < n:
        chunk = await stream.receive_some(256 * 1024)
        assert chunk, f"stream ended after {len(got)} of {n} bytes"
        got += chunk
        if pause:
            await trio.sleep(pause)
    return bytes(got)


async def send_from_tasks(sender: ReplySender, all_replies: list[list[bytes]]) -> list[bytes]:
    """Each reply from its own task, as request tasks do; returns the bytes in queue order."""
    order: list[bytes] = []

    async def one(parts):
        order.append(b"".join(parts))
        sender.queue(parts)
        await sender.send()

    async with trio.open_nursery() as nursery:
        for parts in all_replies:
            nursery.start_soon(one, parts)
    return order


async def test_socket_path_partial_sends_keep_order_and_bytes():
    # a small send buffer and a slow reader force sendmsg(2) to take part of a batch at a time
    server, client = await tcp_pair(sndbuf=64 * 1024)
    sender = ReplySender(server)
    try:
        all_replies = replies(40, seed=1)
        total = sum(len(p) for parts in all_replies for p in parts)
        async with trio.open_nursery() as nursery:
            result = {}

            async def reader():
                result["bytes"] = await receive_exactly(client, total, pause=0.001)
            nursery.start_soon(reader)
            order = await send_from_tasks(sender, all_replies)
        assert result["bytes"] == b"".join(order)
        assert sender.queued == 0
    finally:
        sender.close()
        await server.aclose()
        await client.aclose()


async def test_stream_path_joins_a_batch_into_one_send():
    sent: list[bytes] = []

    class CountingStream(trio.abc.SendStream):
        async def send_all(self, data):
            sent.append(bytes(data))
            await trio.lowlevel.checkpoint()

        async def wait_send_all_might_not_block(self):
            pass

        async def aclose(self):
            pass

    sender = ReplySender(CountingStream())
    all_replies = [[i.to_bytes(16, "big")] for i in range(16)]   # 16 requests finishing together
    order = await send_from_tasks(sender, all_replies)
    assert b"".join(sent) == b"".join(order)
    assert len(sent) < len(all_replies) // 4, f"{len(sent)} sends for {len(all_replies)} replies"


async def test_backpressure_when_the_peer_does_not_read():
    server, client = await tcp_pair(sndbuf=64 * 1024)
    sender = ReplySender(server)
    finished = []
    try:
        async with trio.open_nursery() as nursery:
            async def one(i):
                sender.queue([os.urandom(MiB)])
                await sender.send()
                finished.append(i)
            for i in range(16):
                nursery.start_soon(one, i)
            await trio.sleep(0.5)   # the client reads nothing meanwhile
            blocked = 16 - len(finished)
            queued = sender.queued
            assert blocked > 0, "every send returned though the peer read nothing"
            assert queued > HIGH_WATER   # a request waits only while that much is still queued
            await receive_exactly(client, 16 * MiB)
        assert sorted(finished) == list(range(16))
    finally:
        sender.close()
        await server.aclose()
        await client.aclose()


async def test_lost_peer_is_a_broken_stream():
    server, client = await tcp_pair()
    sender = ReplySender(server)
    await client.aclose()
    try:
        with pytest.raises(trio.BrokenResourceError):
            for _ in range(64):   # the first sends may still be taken by the kernel
                sender.queue([os.urandom(MiB)])
                await sender.send()
        with pytest.raises(trio.BrokenResourceError):   # and stays broken
            await sender.send()
    finally:
        sender.close()
        await server.aclose()


async def test_cancelled_send_keeps_the_unsent_rest_in_order():
    """Shutdown cancels the reading loop while it may be sending: what the kernel had not
    taken stays queued, and the next send() delivers the stream whole."""
    server, client = await tcp_pair(sndbuf=64 * 1024)
    sender = ReplySender(server)
    try:
        all_replies = replies(12, seed=2)
        for parts in all_replies:
            sender.queue(parts)
        with trio.move_on_after(0.2) as scope:   # the peer reads nothing: the send blocks
            await sender.send()
        assert scope.cancelled_caught and sender.queued > 0
        expected = b"".join(b"".join(parts) for parts in all_replies)
        async with trio.open_nursery() as nursery:
            result = {}

            async def reader():
                result["bytes"] = await receive_exactly(client, len(expected))
            nursery.start_soon(reader)
            await sender.send()
        assert result["bytes"] == expected and sender.queued == 0
    finally:
        sender.close()
        await server.aclose()
        await client.aclose()
