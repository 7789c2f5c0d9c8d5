"""Hostile clients against a real server (issue 7): every kind of abuse the issue lists, several
rounds each, from raw sockets speaking bytes built from proto.md, while a well-behaved libnbd
client reads and rewrites a known pattern the whole time.

For every offending connection the server must stay up, answer what the spec says it must
(option errors, EINVAL/ENOSPC, ERR["UNSUP"], ERR["TOO_BIG"]) or close, log exactly one line naming
the offence (and no traceback), and not grow its memory with lengths the client announced.
``pytest -s`` prints the table of kinds, rounds and peak memory growth.
"""

from __future__ import annotations

import logging
import random
import re
import struct
import threading
import time
from collections import defaultdict
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from nbdserve.server.settings import ExportSettings
from nbdhelpers import MiB, libnbd_handle, make_raw, run, start_server
from test_nbd_core import (ACK, BS, CACHE, CHUNK_MAGIC, DISC, EINVAL, ENOSPC, ERR, FLUSH, IHAVEOPT, NBDMAGIC, OPT, READ,
                           REPLY_MAGIC, REQ_MAGIC, SIMPLE_MAGIC, TRIM, WRITE, WZ, info_payload, meta_payload, option,
                           request)
from test_nbd_core import INFO as REP_INFO

SIZE = 8 * MiB                   # the "disk" export, filled with PATTERN
BIG = 8 << 30                    # the sparse "big" export: room for 4 GiB requests inside it
PATTERN = random.Random(2012).randbytes(SIZE)
HANDSHAKE_TIMEOUT = 2.0
IO_TIMEOUT = 10.0
CHUNK_OFFSET_DATA, CHUNK_OFFSET_HOLE, CHUNK_ERROR = 1, 2, 2**15 + 1
JUNK = bytes(range(256)) * 1024  # 256 KiB, reused so that the test itself allocates nothing big


# -- memory of this process (the server runs in it): peak RSS since the last reset
def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise AssertionError(f"{field_name} not in /proc/self/status")


class PeakGrowth:
    """Peak RSS growth across a block, in MiB (proc(5): writing 5 to clear_refs resets VmHWM)."""

    def __enter__(self):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.before = _status_kib("VmRSS")
        return self

    def __exit__(self, *exc):
        self.mib = (_status_kib("VmHWM") - self.before) / 1024


# -- the server's log, indexed by peer
class PeerLog(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.by_peer: dict[str, list[tuple[int, str, bool]]] = defaultdict(list)

    def emit(self, record: logging.LogRecord) -> None:
        peer, _, rest = record.getMessage().partition(": ")
        self.by_peer[peer].append((record.levelno, rest, record.exc_info is not None))

    def _first_connection(self, peer: str) -> list[tuple[int, str, bool]]:
        """The peer's lines up to where a later connection from the same client port starts."""
        entries = self.by_peer[peer]
        later = next((i for i, (_, rest, _) in enumerate(entries) if i and rest == "connected"), len(entries))
        return entries[:later]

    async def verdict(self, peer: str, offence: str, end: str = "disconnected") -> str:
        """Wait for the connection's ``end`` line; exactly one line must match ``offence``.
        The connection's lines are then taken off the peer's list: a later connection may get
        the same client port, and its lines are its own."""
        with trio.fail_after(IO_TIMEOUT):
            while not any(rest == end for _, rest, _ in self._first_connection(peer)):
                await trio.sleep(0.005)
        lines = self._first_connection(peer)
        del self.by_peer[peer][:len(lines)]
        assert not any(exc for _, _, exc in lines), f"traceback logged for {peer}: {lines}"
        assert all(level < logging.ERROR for level, _, _ in lines), lines
        named = [rest for _, rest, _ in lines if re.search(offence, rest)]
        assert len(named) == 1, f"{peer}: expected one line matching {offence!r}, got {lines}"
        assert len(lines) <= 6, f"{peer}: too many lines for one offender: {lines}"
        return named[0]


# -- a raw client
class Client:
    """One TCP connection speaking bytes built from proto.md (hostile on purpose)."""

    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        self.pending = bytearray()
        self.peer = "127.0.0.1:%d" % stream.socket.getsockname()[1]
        self.structured = False

    @classmethod
    async def connect(cls, port: int) -> "Client":
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def send(self, data: bytes) -> None:
        """Send, ignoring a server that already hung up (a hostile client does not care)."""
        try:
            await self.stream.send_all(data)
        except trio.BrokenResourceError:
            pass

    async def send_eof(self) -> None:
        try:
            await self.stream.send_eof()
        except (trio.BrokenResourceError, OSError):
            pass

    async def recv(self, n: int) -> bytes:
        with trio.fail_after(IO_TIMEOUT):
            while len(self.pending) < n:
                chunk = await self.stream.receive_some(1 << 20)
                if not chunk:
                    raise EOFError(f"{self.peer}: closed after {len(self.pending)} of {n} bytes")
                self.pending += chunk
        out = bytes(self.pending[:n])
        del self.pending[:n]
        return out

    async def until_closed(self) -> int:
        """Read until the server closes; the number of bytes it sent meanwhile."""
        got = len(self.pending)
        self.pending.clear()
        with trio.fail_after(IO_TIMEOUT):
            while True:
                try:
                    chunk = await self.stream.receive_some(1 << 20)
                except trio.BrokenResourceError:   # reset: closed with our data unread
                    return got
                if not chunk:
                    return got
                got += len(chunk)

    async def close(self) -> None:
        await trio.aclose_forcefully(self.stream)

    # -- handshake
    async def greeting(self) -> None:
        magic, ihaveopt, flags = struct.unpack(">QQH", await self.recv(18))
        assert (magic, ihaveopt) == (NBDMAGIC, IHAVEOPT) and flags & 1

    async def option_reply(self) -> tuple[int, int, bytes]:
        magic, opt, rtype, length = struct.unpack(">QIII", await self.recv(20))
        assert magic == REPLY_MAGIC
        return opt, rtype, await self.recv(length)

    async def negotiate(self, export: str = "disk", structured: bool = True, contexts: tuple = ()) -> int:
        """Flags, STRUCTURED_REPLY, SET_META_CONTEXT, GO; the export size."""
        await self.greeting()
        await self.send(struct.pack(">I", 3))
        return await self.go(export, structured, contexts)

    async def go(self, export: str = "disk", structured: bool = True, contexts: tuple = ()) -> int:
        self.structured = structured
        if structured:
            await self.send(option(OPT["STRUCTURED_REPLY"]))
            assert (await self.option_reply())[1] == ACK
        if contexts:
            await self.send(option(OPT["SET_META_CONTEXT"], meta_payload(export, *contexts)))
            while (await self.option_reply())[1] != ACK:
                pass
        await self.send(option(OPT["GO"], info_payload(export)))
        size = None
        while True:
            _, rtype, data = await self.option_reply()
            if rtype == ACK:
                return size
            assert rtype == REP_INFO, rtype
            if struct.unpack(">H", data[:2])[0] == 0:    # NBD_INFO_EXPORT
                size = struct.unpack(">Q", data[2:10])[0]

    # -- transmission
    async def reply(self, length: int = 0) -> tuple[int, bytes]:
        """(error, data) of the next reply; ``length``: the data a successful simple READ carries."""
        if not self.structured:
            magic, error, _ = struct.unpack(">IIQ", await self.recv(16))
            assert magic == SIMPLE_MAGIC
            return error, (await self.recv(length) if length and not error else b"")
        error, data, base = 0, {}, None
        while True:
            magic, flags, ctype, _, n = struct.unpack(">IHHQI", await self.recv(20))
            assert magic == CHUNK_MAGIC
            payload = await self.recv(n)
            if ctype == CHUNK_OFFSET_DATA:
                data[struct.unpack(">Q", payload[:8])[0]] = payload[8:]
            elif ctype == CHUNK_OFFSET_HOLE:
                offset, size = struct.unpack(">QI", payload)
                data[offset] = bytes(size)
            elif ctype == CHUNK_ERROR:
                error = struct.unpack(">I", payload[:4])[0]
            if flags & 1:
                break
        if data:
            base = min(data)
        return error, b"".join(data[k] for k in sorted(data)) if base is not None else b""

    async def read(self, offset: int, length: int, cookie: int = 1) -> bytes:
        await self.send(request(READ, offset, length, cookie=cookie))
        error, data = await self.reply(length)
        assert error == 0, error
        return data


# -- the well-behaved client, in a thread: random reads, and writes of the bytes already there
@dataclass
class GoodClient:
    uri: str
    stop: threading.Event = field(default_factory=threading.Event)
    ops: int = 0
    mismatches: list = field(default_factory=list)
    longest_wait: float = 0.0

    def run(self) -> None:
        h = libnbd_handle(self.uri)
        rnd = random.Random(1)
        last = time.monotonic()
        try:
            while not self.stop.is_set():
                offset = rnd.randrange(0, SIZE - 65536)
                n = rnd.choice((512, 4096, 65536))
                if rnd.random() < 0.25:
                    h.pwrite(PATTERN[offset:offset + n], offset)
                if h.pread(n, offset) != PATTERN[offset:offset + n]:
                    self.mismatches.append((offset, n))
                now = time.monotonic()
                self.longest_wait = max(self.longest_wait, now - last)
                last = now
                self.ops += 1
            h.flush()
        finally:
            h.shutdown()


# -- the abuse, one kind per method; each round returns (client, offence pattern[, end line])
@dataclass
class Kind:
    name: str
    rounds: int
    growth_limit_mib: float
    offenders: int = 0
    growth_mib: float = 0.0
    seconds: float = 0.0


class Abuse:
    def __init__(self, port: int, log: PeerLog):
        self.port, self.log = port, log

    async def connect(self) -> Client:
        return await Client.connect(self.port)

    async def random_bytes(self, r: int):
        """Seeded random bytes of random length: as the client flags, after valid flags, or
        in place of requests."""
        rnd = random.Random(r)
        junk = rnd.randbytes(rnd.randrange(0, 4097))
        c = await self.connect()
        where = r % 3
        if where == 2:
            await c.negotiate(structured=bool(r & 1))
        else:
            await c.greeting()
            if where == 1:
                await c.send(struct.pack(">I", 3))
        await c.send(junk)
        await c.send_eof()
        await c.until_closed()
        if where == 2:   # in place of a 28-byte request header
            if not junk:
                return [(c, "^client closed without NBD_CMD_DISC$")]
            if len(junk) < 28:
                return [(c, rf"^dropping connection: connection closed with {28 - len(junk)} more bytes due$")]
            return [(c, "^dropping connection: bad request magic")]
        return [(c, r"protocol error: (unknown client flags|bad option magic|connection closed)"
                 r"|closed during handshake \(eof\)")]

    HANDSHAKE = (struct.pack(">I", 3) + option(OPT["STRUCTURED_REPLY"])
                 + option(OPT["GO"], info_payload("disk")))

    async def truncated_handshake(self, cut: int):
        """The client's side of the handshake cut at every byte position, then EOF."""
        c = await self.connect()
        await c.greeting()
        await c.send(self.HANDSHAKE[:cut])
        await c.send_eof()
        await c.until_closed()
        # flags (4 bytes), the STRUCTURED_REPLY option (16), the GO option header (16), its payload
        if cut == len(self.HANDSHAKE):
            return [(c, "^client closed without NBD_CMD_DISC$")]
        if cut in (0, 4, 20):
            return [(c, r"^closed during handshake \(eof\)$")]
        due = (4 - cut if cut < 4 else 20 - cut if cut < 20 else 36 - cut if cut < 36
               else len(self.HANDSHAKE) - cut)   # from the header: the GO payload's length
        return [(c, rf"^protocol error: connection closed with {due} more bytes due$")]

    async def unknown_client_flags(self, r: int):
        """proto.md: the server MUST close if it does not recognise the client's flags."""
        bit = 2 + r % 30
        c = await self.connect()
        await c.greeting()
        await c.send(struct.pack(">I", 3 | 1 << bit))
        assert await c.until_closed() == 0, "nothing may follow the greeting"
        return [(c, rf"^protocol error: unknown client flags {1 << bit:#x}$")]

    async def bad_option_magic(self, r: int):
        magic = [0, NBDMAGIC, REQ_MAGIC, IHAVEOPT ^ 1, IHAVEOPT ^ 1 << 63][r % 5] if r < 5 \
            else random.Random(r).getrandbits(64)
        c = await self.connect()
        await c.greeting()
        await c.send(struct.pack(">I", 3) + struct.pack(">QII", magic, OPT["GO"], 0))
        assert await c.until_closed() == 0
        return [(c, rf"^protocol error: bad option magic {magic:#x}$")]

    async def bad_request_magic(self, r: int):
        magic = [0, SIMPLE_MAGIC, CHUNK_MAGIC, REQ_MAGIC ^ 1][r % 4] if r < 4 else random.Random(r).getrandbits(32)
        c = await self.connect()
        await c.negotiate(structured=bool(r & 1))
        assert await c.read(4096, 4096) == PATTERN[4096:8192]
        await c.send(struct.pack(">IHHQQI", magic, 0, READ, 2, 0, 512))
        assert await c.until_closed() == 0
        return [(c, rf"^dropping connection: bad request magic {magic:#x}$")]

    # (option, announced length, bytes actually sent): sent in full -> NBD_REP_ERR["TOO_BIG"] and the
    # session goes on; EXPORT_NAME cannot be answered with an error -> closed at once; a 4 GiB
    # option cut short -> closed at EOF
    BIG_OPTIONS = [(OPT["LIST"], 65537, 65537), (OPT["GO"], MiB, MiB), (4242, 16 * MiB, 16 * MiB),
                   (OPT["EXPORT_NAME"], 2**31, 0), (OPT["EXPORT_NAME"], 2**32 - 1, 0),
                   (OPT["GO"], 2**32 - 1, 8 * MiB), (OPT["LIST"], 2**31, 8 * MiB)]

    async def big_option(self, r: int):
        opt, length, sent = self.BIG_OPTIONS[r % len(self.BIG_OPTIONS)]
        c = await self.connect()
        await c.greeting()
        await c.send(struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, opt, length))
        for pos in range(0, sent, len(JUNK)):
            await c.send(JUNK[:min(len(JUNK), sent - pos)])
        if opt == OPT["EXPORT_NAME"]:
            assert await c.until_closed() == 0
            return [(c, rf"^protocol error: NBD_OPT_EXPORT_NAME of {length} bytes$")]
        if sent < length:
            await c.send_eof()
            assert await c.until_closed() == 0
            return [(c, rf"^protocol error: connection closed with {length - sent} more bytes due$")]
        assert await c.option_reply() == (opt, ERR["TOO_BIG"], b"option data too long")
        await c.go()                                  # the session goes on
        assert await c.read(0, 65536) == PATTERN[:65536]
        await c.send(request(DISC))
        names = {OPT["LIST"]: "LIST", OPT["GO"]: "GO"}
        return [(c, rf"options {names.get(opt, f'OPTION_{opt}')},STRUCTURED_REPLY,GO$")]

    async def unknown_options(self, r: int):
        """Options proto.md does not define: each gets NBD_REP_ERR["UNSUP"], the session goes on."""
        rnd = random.Random(r)
        numbers = [0, 12, 13, 99, 2**31 - 1, 2**31, 2**32 - 1] + [rnd.randrange(12, 2**32) for _ in range(3)]
        c = await self.connect()
        await c.greeting()
        await c.send(struct.pack(">I", 3))
        for number in numbers:
            await c.send(option(number, rnd.randbytes(rnd.randrange(0, 1025))))
            opt, rtype, _ = await c.option_reply()
            assert (opt, rtype) == (number, ERR["UNSUP"])
        await c.go()
        assert await c.read(SIZE - 4096, 4096) == PATTERN[-4096:]
        await c.send(request(DISC))
        listed = ",".join(f"OPTION_{n}" for n in numbers)
        return [(c, rf"options {listed},STRUCTURED_REPLY,GO$")]

    async def past_the_end(self, r: int):
        """proto.md "Error values": ENOSPC for a write beyond the end, EINVAL for a read, trim
        (and the other commands) beyond it."""
        structured = r % 2 == 0
        c = await self.connect()
        size = await c.negotiate(structured=structured, contexts=("base:allocation",) if structured else ())
        assert size == SIZE
        cases = [(READ, size - 512, 1024, EINVAL), (READ, size, 1, EINVAL), (READ, 2**64 - 1, 1, EINVAL),
                 (WRITE, size - 512, 1024, ENOSPC), (WRITE, 2**63, 512, ENOSPC),
                 (WZ, size - 4096, 8192, ENOSPC), (TRIM, size - 4096, 8192, EINVAL),
                 (CACHE, size, 4096, EINVAL)]
        if structured:
            cases.append((BS, size - 4096, 8192, EINVAL))
        for cookie, (cmd, offset, length, expected) in enumerate(cases, 1):
            payload = b"\xee" * length if cmd == WRITE else b""
            await c.send(request(cmd, offset, length, cookie=cookie, data=payload))
            error, _ = await c.reply()
            assert error == expected, (cmd, offset, length, error)
        assert await c.read(size - 65536, 65536) == PATTERN[-65536:]   # the refused write wrote nothing
        await c.send(request(DISC))
        return [(c, rf"refused {len(cases)} requests")]

    async def unknown_commands(self, r: int):
        """proto.md: EINVAL for an unknown command, and for a flag the command does not take."""
        c = await self.connect()
        await c.negotiate(structured=r % 2 == 0)
        bad = [request(t, 0, 512, cookie=t) for t in (8, 9, 10, 100, 0x7FFF, 0xFFFF)]
        bad += [request(READ, 0, 512, flags=0x8000, cookie=1), request(READ, 0, 512, flags=1 << 6, cookie=2),
                request(WRITE, 0, 512, flags=0x40, cookie=3, data=PATTERN[:512])]
        for message in bad:
            await c.send(message)
            assert (await c.reply())[0] == EINVAL
        assert await c.read(0, 512) == PATTERN[:512]
        await c.send(request(DISC))
        return [(c, rf"refused {len(bad)} requests")]

    async def huge_write(self, r: int):
        """A write that announces 4 GiB - 1: refused at once (ENOSPC past the end of "disk",
        EINVAL above the maximum block size inside "big"); its payload is skipped, not stored."""
        export, expected = [("disk", ENOSPC), ("big", EINVAL)][r % 2]
        c = await self.connect()
        await c.negotiate(export=export, structured=r % 4 < 2)
        await c.send(request(WRITE, 0, 2**32 - 1))
        assert (await c.reply())[0] == expected, "the error comes before any payload"
        sent = 8 * MiB
        for _ in range(sent // len(JUNK)):
            await c.send(JUNK)
        await c.close()
        return [(c, rf"connection closed with {2**32 - 1 - sent} more bytes due$")]

    async def vanish_mid_request(self, r: int):
        """A 64 KiB write cut anywhere in its header or payload: nothing of it may land."""
        rnd = random.Random(r)
        offset = rnd.randrange(0, SIZE - 65536)
        message = request(WRITE, offset, 65536, data=b"\xee" * 65536)
        cut = rnd.randrange(1, 28) if r % 3 == 0 else rnd.randrange(28, len(message))
        c = await self.connect()
        await c.negotiate(structured=bool(r & 1))
        await c.send(message[:cut])
        await c.close()
        due = 28 - cut if cut < 28 else len(message) - cut
        return [(c, rf"connection closed with {due} more bytes due$")]

    async def pipelined_then_vanish(self, r: int):
        """Hundreds of requests (reads, writes of the bytes already there, flushes) sent at
        once, then the client closes without reading a reply."""
        rnd = random.Random(r)
        c = await self.connect()
        await c.negotiate(structured=bool(r & 1))
        batch = []
        for cookie in range(300):
            offset = rnd.randrange(0, SIZE - MiB)
            kind = rnd.random()
            if kind < 0.6:
                batch.append(request(READ, offset, rnd.randrange(1, MiB), cookie=cookie))
            elif kind < 0.95:
                batch.append(request(WRITE, offset, 4096, cookie=cookie, data=PATTERN[offset:offset + 4096]))
            else:
                batch.append(request(FLUSH, cookie=cookie))
        with trio.move_on_after(0.5):    # the server stops reading once its replies back up
            await c.send(b"".join(batch))
        await c.close()
        return [(c, "^(client closed without NBD_CMD_DISC|dropping connection: .*|connection lost: .*)$")]

    async def big_reads_unread(self, r: int):
        """64 reads of 32 MiB (the advertised maximum) pipelined on the sparse "big" export and
        their replies never read: 2 GiB announced; what the server holds must stay bounded."""
        c = await self.connect()
        await c.negotiate(export="big", structured=bool(r & 1))
        await c.send(b"".join(request(READ, i * 32 * MiB, 32 * MiB, cookie=i) for i in range(64)))
        await trio.sleep(1.0)            # let the server do all it will do with them
        await c.close()
        return [(c, "^(client closed without NBD_CMD_DISC|dropping connection: .*|connection lost: .*)$")]


async def run_kind(kind: Kind, method, log: PeerLog) -> None:
    start = time.monotonic()
    with PeakGrowth() as growth:
        for r in range(kind.rounds):
            for client, offence, *end in await method(r):
                await log.verdict(client.peer, offence, *end)
                kind.offenders += 1
    kind.growth_mib = growth.mib
    kind.seconds = time.monotonic() - start


def check_table(table: list[Kind], good: GoodClient) -> None:
    print(f"\n{'abuse kind':36} {'rounds':>6} {'offenders':>9} {'peak growth':>12} {'time':>6}")
    for kind in table:
        print(f"{kind.name:36} {kind.rounds:6} {kind.offenders:9} {kind.growth_mib:8.1f} MiB {kind.seconds:5.1f}s")
    print(f"well-behaved client meanwhile: {good.ops} reads/writes verified, longest wait {good.longest_wait:.2f} s")
    for kind in table:
        assert kind.offenders >= kind.rounds, kind
        assert kind.growth_mib < kind.growth_limit_mib, kind


@asynccontextmanager
async def abused_server(tmp_path):
    """A server with the "disk" and "big" exports, its log by peer, and the well-behaved
    client running throughout; on the way out the disk must still hold exactly the pattern."""
    disk = make_raw(tmp_path / "disk.raw", SIZE, {0: PATTERN})
    reference = make_raw(tmp_path / "reference.raw", SIZE, {0: PATTERN})
    big = make_raw(tmp_path / "big.raw", BIG, {})
    log = PeerLog()
    nbd_logger = logging.getLogger("nbdserve")
    old_level = nbd_logger.level
    nbd_logger.addHandler(log)
    nbd_logger.setLevel(logging.INFO)
    try:
        async with trio.open_nursery() as nursery:
            served = await start_server(nursery, [ExportSettings("disk", disk, "raw"), ExportSettings("big", big, "raw")],
                                        handshake_timeout=HANDSHAKE_TIMEOUT)
            good = GoodClient(served.uri("disk"))
            good_done = trio.Event()

            async def run_good():
                try:
                    await trio.to_thread.run_sync(good.run)
                finally:
                    good_done.set()

            nursery.start_soon(run_good)
            try:
                yield served, log, good
            finally:
                good.stop.set()
                with trio.move_on_after(IO_TIMEOUT):
                    await good_done.wait()
            assert good_done.is_set(), "the well-behaved client hung"
            # the server is still up, and the disk holds exactly the pattern
            await run("qemu-img", "compare", "-f", "raw", "-F", "raw", served.uri("disk"), reference)
            nursery.cancel_scope.cancel()
    finally:
        nbd_logger.removeHandler(log)
        nbd_logger.setLevel(old_level)
    assert not good.mismatches, good.mismatches[:5]
    assert good.ops > 100
    assert good.longest_wait < 3.0, "the well-behaved client was starved"


SMALL = 16   # MiB of peak memory growth allowed where a client only announced a length


async def test_hostile_clients(tmp_path):
    async with abused_server(tmp_path) as (served, log, good):
        abuse = Abuse(served.port, log)
        table = []
        for kind, method in [
            (Kind("random bytes", 60, SMALL), abuse.random_bytes),
            (Kind("truncated handshake (every byte)", len(Abuse.HANDSHAKE) + 1, SMALL), abuse.truncated_handshake),
            (Kind("unknown client flags", 30, SMALL), abuse.unknown_client_flags),
            (Kind("bad option magic", 10, SMALL), abuse.bad_option_magic),
            (Kind("bad request magic", 10, SMALL), abuse.bad_request_magic),
            (Kind("option length 64K+1..4G-1", 2 * len(Abuse.BIG_OPTIONS), SMALL), abuse.big_option),
            (Kind("unknown options (10 each)", 10, SMALL), abuse.unknown_options),
            (Kind("requests past the end", 10, SMALL), abuse.past_the_end),
            (Kind("unknown commands and flags", 10, SMALL), abuse.unknown_commands),
            (Kind("write announcing 4 GiB", 4, SMALL), abuse.huge_write),
            (Kind("vanish mid-request", 30, SMALL), abuse.vanish_mid_request),
        ]:
            await run_kind(kind, method, log)
            table.append(kind)
        idle = Kind("idle mid-handshake (500, timeout)", 1, 64)
        start = time.monotonic()
        with PeakGrowth() as growth:
            idle.offenders = await idle_connections(served.port, log, 500)
        idle.growth_mib, idle.seconds = growth.mib, time.monotonic() - start
        limit = Kind("beyond max_connections=50", 1, SMALL)
        start = time.monotonic()
        with PeakGrowth() as growth:
            limit.offenders = await connection_limit(tmp_path, log, 50, 20)
        limit.growth_mib, limit.seconds = growth.mib, time.monotonic() - start
        table += [idle, limit]
    check_table(table, good)


async def test_clients_vanishing_with_requests_in_flight(tmp_path):
    """The server survives, keeps the data, bounds its memory and logs one line per client."""
    async with abused_server(tmp_path) as (served, log, good):
        abuse = Abuse(served.port, log)
        # what the server may hold: its send queue (sender.HIGH_WATER) and the requests in flight
        table = [Kind("300 pipelined (~90 MiB), then vanish", 6, 48), Kind("64 x 32 MiB reads never read", 2, 96)]
        await run_kind(table[0], abuse.pipelined_then_vanish, log)
        await run_kind(table[1], abuse.big_reads_unread, log)
    check_table(table, good)


async def idle_connections(port: int, log: PeerLog, count: int) -> int:
    """``count`` connections that stop mid-handshake (after the greeting, inside the client
    flags, inside a 4 GiB option): the handshake timeout must close every one."""
    clients: list[Client] = []
    for i in range(count):
        c = await Client.connect(port)
        await c.greeting()
        if i % 10 == 1:
            await c.send(b"\x00\x00")
        elif i % 10 == 2:
            await c.send(struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, OPT["LIST"], 2**32 - 1) + JUNK[:4096])
        clients.append(c)
    start = trio.current_time()

    async def closed(c: Client) -> None:
        await c.until_closed()
        assert trio.current_time() - start < HANDSHAKE_TIMEOUT + 3

    async with trio.open_nursery() as nursery:
        for c in clients:
            nursery.start_soon(closed, c)
    for c in clients:
        await log.verdict(c.peer, rf"^handshake timed out after {HANDSHAKE_TIMEOUT} s$")
    return count


async def connection_limit(tmp_path, log: PeerLog, limit: int, excess: int) -> int:
    """A server with max_connections=limit: ``limit`` idle clients fill it; ``excess`` more are
    closed without a greeting (one line each); once the idle ones time out, clients get in."""
    disk = make_raw(tmp_path / "limit.raw", MiB, {0: b"limit"})
    async with trio.open_nursery() as nursery:
        served = await start_server(nursery, [ExportSettings("l", disk, "raw")],
                                    handshake_timeout=HANDSHAKE_TIMEOUT, max_connections=limit)
        idle = []
        for _ in range(limit):
            c = await Client.connect(served.port)
            await c.greeting()
            idle.append(c)
        for _ in range(excess):
            c = await Client.connect(served.port)
            assert await c.until_closed() == 0, "no greeting beyond the limit"
            await log.verdict(c.peer, rf"^refused, {limit} connections open$", end=f"refused, {limit} connections open")
        for c in idle:
            await c.until_closed()
        h = await trio.to_thread.run_sync(libnbd_handle, served.uri("l"))
        assert await trio.to_thread.run_sync(h.pread, 5, 0) == b"limit"
        await trio.to_thread.run_sync(h.shutdown)
        nursery.cancel_scope.cancel()
    return excess


async def test_pipelined_big_writes_to_a_slow_image_hold_bounded_memory(tmp_path, nursery):
    """64 writes of 32 MiB (the advertised maximum) pipelined at an image whose writes are
    slow (a write_aio delay): 2 GiB announced.  The server stops reading while 64 MiB of
    payload waits in request tasks (server/inflight.py) instead of buffering them all."""
    image = tmp_path / "slow.qcow2"
    await run("qemu-img", "create", "-q", "-f", "qcow2", str(image), "4G")
    served = await start_server(nursery, [ExportSettings("slow", str(image), "qcow2", delays={"write_aio": 1.0})])
    c = await Client.connect(served.port)
    await c.negotiate(export="slow", structured=False)
    sent = 0
    with PeakGrowth() as growth:
        with trio.move_on_after(4):   # the server stops reading: the sends block
            for i in range(64):
                await c.send(request(WRITE, i * 32 * MiB, 32 * MiB, cookie=i))
                for _ in range(32 * MiB // len(JUNK)):
                    await c.send(JUNK)
                    sent += len(JUNK)
        await c.close()
    assert sent < 16 * 32 * MiB, "the server read everything: nothing held it back"
    assert growth.mib < 160, f"peak RSS grew {growth.mib:.0f} MiB for {sent >> 20} MiB received"
