"""Byte-level tests of the sans-IO protocol core.  Client bytes are built here
with ``struct`` straight from proto.md, independently of nbdserve.nbd.wire."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdserve.nbd import (NEED_DATA, BlockStatus, Disconnect, ErrorChunk, ExportCatalog, ExportInfo,
                          LocalProtocolError, Negotiated, NoneChunk, OffsetData, OffsetHole, ProtocolError,
                          Request, ServerConnection, SimpleReply, StartTLS, TlsMode, TransmissionFlag as TF)

NBDMAGIC, IHAVEOPT, REPLY_MAGIC = 0x4E42444D41474943, 0x49484156454F5054, 0x3E889045565A9
REQ_MAGIC, SIMPLE_MAGIC, CHUNK_MAGIC = 0x25609513, 0x67446698, 0x668E33EF
OPT = dict(EXPORT_NAME=1, ABORT=2, LIST=3, STARTTLS=5, INFO=6, GO=7, STRUCTURED_REPLY=8,
           LIST_META_CONTEXT=9, SET_META_CONTEXT=10, EXTENDED_HEADERS=11)
ACK, SERVER, INFO, META = 1, 2, 3, 4
ERR = dict(UNSUP=2**31 + 1, POLICY=2**31 + 2, INVALID=2**31 + 3, TLS_REQD=2**31 + 5, UNKNOWN=2**31 + 6,
           TOO_BIG=2**31 + 9)
EINVAL, EPERM, ENOSPC, EOVERFLOW = 22, 1, 28, 75
READ, WRITE, DISC, FLUSH, TRIM, CACHE, WZ, BS = range(8)

RW_FLAGS = (TF.HAS_FLAGS | TF.SEND_FLUSH | TF.SEND_FUA | TF.SEND_TRIM | TF.SEND_WRITE_ZEROES | TF.SEND_DF
            | TF.CAN_MULTI_CONN | TF.SEND_CACHE | TF.SEND_FAST_ZERO)
DISK = ExportInfo("disk", 1 << 20, RW_FLAGS, description="a test disk", max_block=65536)
RO = ExportInfo("ro", 4096, TF.HAS_FLAGS | TF.READ_ONLY | TF.SEND_FLUSH, meta_contexts=())
CATALOG = ExportCatalog([DISK, RO])


# -- client-side byte builders (proto.md)
def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, opt, len(data)) + data


def info_payload(name: str, *infos: int) -> bytes:
    n = name.encode()
    return struct.pack(">I", len(n)) + n + struct.pack(">H", len(infos)) + b"".join(struct.pack(">H", i) for i in infos)


def meta_payload(name: str, *queries: str) -> bytes:
    n = name.encode()
    out = struct.pack(">I", len(n)) + n + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q.encode())) + q.encode()
    return out


def request(cmd: int, offset: int = 0, length: int = 0, flags: int = 0, cookie: int = 7, data: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", REQ_MAGIC, flags, cmd, cookie, offset, length) + data


def parse_option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    out = []
    while data:
        magic, opt, rtype, length = struct.unpack(">QIII", data[:20])
        assert magic == REPLY_MAGIC
        out.append((opt, rtype, data[20:20 + length]))
        data = data[20 + length:]
    return out


def feed(conn: ServerConnection, data: bytes, bytewise: bool = True) -> list:
    """Feed ``data`` (one byte at a time by default), collecting every event; stops at
    a Disconnect or a StartTLS (after which the core takes no bytes until tls_started())."""
    events = []
    pieces = [data[i:i + 1] for i in range(len(data))] if bytewise else [data][:len(data)]
    for piece in pieces:
        conn.receive_data(piece)
        while (event := conn.next_event()) is not NEED_DATA:
            events.append(event)
            if isinstance(event, (Disconnect, StartTLS)):
                return events
    return events


def handshake(flags: int = 3, tls_mode: TlsMode = TlsMode.OFF, extended_headers: bool = True,
              catalog: ExportCatalog = CATALOG) -> ServerConnection:
    conn = ServerConnection(catalog, tls_mode=tls_mode, extended_headers=extended_headers)
    assert conn.data_to_send() == struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3)
    assert feed(conn, struct.pack(">I", flags)) == []
    return conn


def negotiate(structured=True, contexts=("base:allocation",), export="disk") -> tuple[ServerConnection, Negotiated]:
    conn = handshake()
    data = b""
    if structured:
        data += option(OPT["STRUCTURED_REPLY"])
    if contexts:
        data += option(OPT["SET_META_CONTEXT"], meta_payload(export, *contexts))
    events = feed(conn, data + option(OPT["GO"], info_payload(export)))
    assert len(events) == 1 and isinstance(events[0], Negotiated)
    conn.data_to_send()
    return conn, events[0]


# -- handshake
def test_greeting_and_client_flags():
    handshake(1)
    handshake(0)


@pytest.mark.parametrize("flags", [4, 0x80000000, 0xFFFFFFFF])
def test_unknown_client_flags_close(flags):
    conn = ServerConnection(CATALOG)
    with pytest.raises(ProtocolError):
        feed(conn, struct.pack(">I", flags))
    with pytest.raises(ProtocolError):   # stays broken
        conn.next_event()


def test_export_name_with_and_without_zeroes():
    for client_flags, tail in ((3, b""), (1, bytes(124))):
        conn = handshake(client_flags)
        events = feed(conn, option(OPT["EXPORT_NAME"], b"disk"))
        assert isinstance(events[0], Negotiated) and events[0].export.name == "disk"
        assert not events[0].structured_replies
        expected_flags = int(RW_FLAGS & ~TF.SEND_DF)   # DF only with structured replies
        assert conn.data_to_send() == struct.pack(">QH", 1 << 20, expected_flags) + tail


def test_export_name_empty_is_default_export():
    conn = handshake()
    events = feed(conn, option(OPT["EXPORT_NAME"], b""))
    assert events[0].export.name == "disk"


def test_export_name_unknown_closes():
    conn = handshake()
    events = feed(conn, option(OPT["EXPORT_NAME"], b"nope"))
    assert isinstance(events[0], Disconnect) and "unknown export" in events[0].reason
    assert conn.data_to_send() == b""
    assert isinstance(conn.next_event(), Disconnect)


def test_abort_acks_and_disconnects():
    conn = handshake()
    events = feed(conn, option(OPT["ABORT"]))
    assert events == [Disconnect("abort")]
    assert parse_option_replies(conn.data_to_send()) == [(OPT["ABORT"], ACK, b"")]


def test_list():
    conn = handshake()
    assert feed(conn, option(OPT["LIST"])) == []
    replies = parse_option_replies(conn.data_to_send())
    assert replies == [(3, SERVER, struct.pack(">I", 4) + b"disk" + b"a test disk"),
                       (3, SERVER, struct.pack(">I", 2) + b"ro"), (3, ACK, b"")]
    feed(conn, option(OPT["LIST"], b"x"))
    assert [r[1] for r in parse_option_replies(conn.data_to_send())] == [ERR["INVALID"]]


@pytest.mark.parametrize("opt", ["INFO", "GO"])
def test_info_and_go_honour_requests(opt):
    conn = handshake()
    events = feed(conn, option(OPT[opt], info_payload("disk", 1, 2, 3)))
    replies = parse_option_replies(conn.data_to_send())
    infos = {struct.unpack(">H", d[:2])[0]: d[2:] for o, t, d in replies if t == INFO}
    assert replies[-1] == (OPT[opt], ACK, b"")
    assert infos[0] == struct.pack(">QH", 1 << 20, int(RW_FLAGS & ~TF.SEND_DF))
    assert infos[1] == b"disk" and infos[2] == b"a test disk"
    assert infos[3] == struct.pack(">III", 1, 4096, 65536)
    if opt == "GO":
        assert isinstance(events[0], Negotiated)
    else:
        assert events == []
        # not requested: no NAME/DESCRIPTION
        feed(conn, option(OPT["INFO"], info_payload("disk")))
        types = {struct.unpack(">H", d[:2])[0] for o, t, d in parse_option_replies(conn.data_to_send()) if t == INFO}
        assert types == {0, 3}


def test_go_unknown_export_and_malformed():
    conn = handshake()
    feed(conn, option(OPT["GO"], info_payload("nope")))
    assert [r[1] for r in parse_option_replies(conn.data_to_send())] == [ERR["UNKNOWN"]]
    for bad in (b"", b"\0\0\0\x09disk\0\0", info_payload("disk", 3) + b"x", b"\0\0\0\x04disk\0\x05\0\x01"):
        feed(conn, option(OPT["GO"], bad))
        assert [r[1] for r in parse_option_replies(conn.data_to_send())] == [ERR["INVALID"]]
    events = feed(conn, option(OPT["GO"], info_payload("ro")))   # still usable
    assert events[0].export.name == "ro"


def test_structured_reply_option():
    conn = handshake()
    feed(conn, option(OPT["STRUCTURED_REPLY"], b"x"))
    assert parse_option_replies(conn.data_to_send())[0][1] == ERR["INVALID"]
    feed(conn, option(OPT["STRUCTURED_REPLY"]))
    assert parse_option_replies(conn.data_to_send()) == [(8, ACK, b"")]
    events = feed(conn, option(OPT["GO"], info_payload("disk")))
    assert events[0].structured_replies and events[0].flags & TF.SEND_DF


@pytest.mark.parametrize("name", ["STARTTLS", "EXTENDED_HEADERS"])
def test_unsupported_options(name):
    conn = handshake(extended_headers=False)
    feed(conn, option(OPT[name]) + option(0xDEAD, b"abc"))
    assert parse_option_replies(conn.data_to_send()) == [(OPT[name], ERR["UNSUP"], (
        f"option {name} not supported".encode())), (0xDEAD, ERR["UNSUP"], b"option OPTION_57005 not supported")]


def meta_replies(conn) -> list:
    return [(t, d[4:].decode() if t == META else d) for o, t, d in parse_option_replies(conn.data_to_send())]


def test_list_meta_context_queries():
    conn = handshake()
    feed(conn, option(OPT["LIST_META_CONTEXT"], meta_payload("disk")))
    assert meta_replies(conn) == [(META, "base:allocation"), (META, "qemu:allocation-depth"), (ACK, b"")]
    feed(conn, option(OPT["LIST_META_CONTEXT"], meta_payload("disk", "base:")))
    assert meta_replies(conn) == [(META, "base:allocation"), (ACK, b"")]
    feed(conn, option(OPT["LIST_META_CONTEXT"], meta_payload("disk", "qemu:", "x-foo:bar", "nocolon")))
    assert meta_replies(conn) == [(META, "qemu:allocation-depth"), (ACK, b"")]
    feed(conn, option(OPT["LIST_META_CONTEXT"], meta_payload("ro")))
    assert meta_replies(conn) == [(ACK, b"")]
    feed(conn, option(OPT["LIST_META_CONTEXT"], meta_payload("nope")))
    assert meta_replies(conn)[0][0] == ERR["UNKNOWN"]
    feed(conn, option(OPT["LIST_META_CONTEXT"], meta_payload("disk")[:-1] + b"\0\0\0\x01"))
    assert meta_replies(conn)[0][0] == ERR["INVALID"]


def test_set_meta_context():
    conn = handshake()
    feed(conn, option(OPT["SET_META_CONTEXT"], meta_payload("disk", "base:allocation")))
    assert meta_replies(conn)[0][0] == ERR["INVALID"]   # structured replies first
    feed(conn, option(OPT["STRUCTURED_REPLY"]))
    conn.data_to_send()
    feed(conn, option(OPT["SET_META_CONTEXT"], meta_payload("disk", "base:", "qemu:allocation-depth",
                                                            "base:allocation", "base:nothing")))
    replies = parse_option_replies(conn.data_to_send())
    ids = {d[4:].decode(): struct.unpack(">I", d[:4])[0] for o, t, d in replies if t == META}
    assert set(ids) == {"qemu:allocation-depth", "base:allocation"} and len(set(ids.values())) == 2
    events = feed(conn, option(OPT["GO"], info_payload("disk")))
    assert {v: k for k, v in events[0].meta_contexts.items()} == ids


def test_meta_contexts_dropped_when_go_names_another_export():
    conn = handshake()
    feed(conn, option(OPT["STRUCTURED_REPLY"]) + option(OPT["SET_META_CONTEXT"], meta_payload("disk", "base:allocation")))
    events = feed(conn, option(OPT["GO"], info_payload("ro")))
    assert events[0].meta_contexts == {}


def test_oversized_option_is_discarded_without_buffering():
    conn = handshake()
    big = 10 * 1024 * 1024
    conn.receive_data(struct.pack(">QII", IHAVEOPT, OPT["GO"], big))
    assert conn.next_event() is NEED_DATA
    chunk = bytes(65536)
    for _ in range(big // len(chunk)):
        conn.receive_data(chunk)
        assert conn.next_event() is NEED_DATA
        assert conn.buffered_bytes == 0
    conn.receive_data(option(OPT["LIST"]))
    assert conn.next_event() is NEED_DATA
    assert [r[1] for r in parse_option_replies(conn.data_to_send())] == [ERR["TOO_BIG"], SERVER, SERVER, ACK]


def test_oversized_export_name_closes():
    conn = handshake()
    conn.receive_data(struct.pack(">QII", IHAVEOPT, OPT["EXPORT_NAME"], 1 << 30))
    with pytest.raises(ProtocolError):
        conn.next_event()


def test_bad_option_magic():
    conn = handshake()
    with pytest.raises(ProtocolError):
        feed(conn, struct.pack(">QII", 0x1234, 1, 0))


def test_eof_between_and_inside_options():
    conn = handshake()
    conn.receive_data(b"")
    assert conn.next_event() == Disconnect("eof")
    conn = handshake()
    conn.receive_data(option(OPT["LIST"])[:10])
    conn.receive_data(b"")
    with pytest.raises(ProtocolError):
        conn.next_event()


# -- STARTTLS (proto.md: "NBD_OPT_STARTTLS", "TLS support")
def start_tls(conn: ServerConnection) -> None:
    """Send NBD_OPT_STARTTLS, check the ACK and the StartTLS event, and finish the upgrade
    as a transport would: the ACK leaves in the clear, then tls_started()."""
    assert feed(conn, option(OPT["STARTTLS"])) == [StartTLS()]
    assert parse_option_replies(conn.data_to_send()) == [(OPT["STARTTLS"], ACK, b"")]
    assert conn.next_event() == StartTLS()          # until the transport says it is done
    with pytest.raises(LocalProtocolError):         # no plain bytes during the upgrade
        conn.receive_data(b"x")
    conn.tls_started()


@pytest.mark.parametrize("opt, payload", [("LIST", b""), ("INFO", info_payload("disk")), ("GO", info_payload("disk")),
                                          ("STRUCTURED_REPLY", b""), ("LIST_META_CONTEXT", meta_payload("disk")),
                                          ("EXTENDED_HEADERS", b""), (0xDEAD, b"x")])
def test_tls_required_refuses_options_before_starttls(opt, payload):
    conn = handshake(tls_mode=TlsMode.REQUIRE)
    code = OPT.get(opt, opt)
    assert feed(conn, option(code, payload)) == []
    [(echoed, reply_type, message)] = parse_option_replies(conn.data_to_send())
    assert (echoed, reply_type) == (code, ERR["TLS_REQD"]) and b"STARTTLS" in message
    assert conn.tls_refused


def test_tls_required_export_name_closes_without_reply():
    conn = handshake(tls_mode=TlsMode.REQUIRE)
    [event] = feed(conn, option(OPT["EXPORT_NAME"], b"disk"))
    assert isinstance(event, Disconnect) and "TLS" in event.reason
    assert conn.data_to_send() == b"" and conn.tls_refused


def test_tls_required_abort_still_acks():
    conn = handshake(tls_mode=TlsMode.REQUIRE)
    assert feed(conn, option(OPT["ABORT"])) == [Disconnect("abort")]
    assert parse_option_replies(conn.data_to_send()) == [(OPT["ABORT"], ACK, b"")]
    assert not conn.tls_refused


def test_tls_required_oversized_option_gets_tls_reqd():
    conn = handshake(tls_mode=TlsMode.REQUIRE)
    feed(conn, struct.pack(">QII", IHAVEOPT, OPT["GO"], 100_000) + bytes(100_000), bytewise=False)
    assert [r[1] for r in parse_option_replies(conn.data_to_send())] == [ERR["TLS_REQD"]]
    start_tls(conn)
    feed(conn, struct.pack(">QII", IHAVEOPT, OPT["GO"], 100_000) + bytes(100_000), bytewise=False)
    assert [r[1] for r in parse_option_replies(conn.data_to_send())] == [ERR["TOO_BIG"]]


@pytest.mark.parametrize("tls_mode", [TlsMode.REQUIRE, TlsMode.ON])
@pytest.mark.parametrize("client_flags, zeroes", [(3, b""), (1, bytes(124))])
def test_options_after_starttls(tls_mode, client_flags, zeroes):
    conn = handshake(client_flags, tls_mode)
    start_tls(conn)
    feed(conn, option(OPT["LIST"]))
    assert [r[1] for r in parse_option_replies(conn.data_to_send())] == [SERVER, SERVER, ACK]
    # a second STARTTLS inside TLS is invalid ("FORCEDTLS mode"), and changes nothing
    assert feed(conn, option(OPT["STARTTLS"])) == []
    assert [r[1] for r in parse_option_replies(conn.data_to_send())] == [ERR["INVALID"]]
    # the client flags (C_NO_ZEROES) still hold after the upgrade
    [negotiated] = feed(conn, option(OPT["EXPORT_NAME"], b"disk"))
    assert isinstance(negotiated, Negotiated) and negotiated.tls and not conn.tls_refused
    assert negotiated.options == ("STARTTLS", "LIST", "STARTTLS", "EXPORT_NAME")
    assert conn.data_to_send() == struct.pack(">QH", 1 << 20, int(RW_FLAGS & ~TF.SEND_DF)) + zeroes
    assert feed(conn, request(READ, 0, 512)) == [Request(7, READ, 0, 0, 512)]


def test_starttls_forgets_structured_replies_and_meta_contexts():
    conn = handshake(tls_mode=TlsMode.ON)
    feed(conn, option(OPT["STRUCTURED_REPLY"])
         + option(OPT["SET_META_CONTEXT"], meta_payload("disk", "base:allocation")))
    assert [r[1] for r in parse_option_replies(conn.data_to_send())] == [ACK, META, ACK]
    start_tls(conn)
    # "the server MUST NOT preserve any negotiation state ... issued before this command"
    feed(conn, option(OPT["SET_META_CONTEXT"], meta_payload("disk", "base:allocation")))
    assert [r[1] for r in parse_option_replies(conn.data_to_send())] == [ERR["INVALID"]]
    [negotiated] = feed(conn, option(OPT["GO"], info_payload("disk")))
    assert negotiated.tls and not negotiated.structured_replies and negotiated.meta_contexts == {}
    assert not negotiated.flags & TF.SEND_DF


def test_structured_replies_negotiated_inside_tls_count():
    conn = handshake(tls_mode=TlsMode.REQUIRE)
    start_tls(conn)
    feed(conn, option(OPT["STRUCTURED_REPLY"])
         + option(OPT["SET_META_CONTEXT"], meta_payload("disk", "base:allocation")))
    [negotiated] = feed(conn, option(OPT["GO"], info_payload("disk")))
    assert negotiated.structured_replies and negotiated.meta_contexts == {1: "base:allocation"}


def test_tls_on_serves_plain_clients():
    conn = handshake(tls_mode=TlsMode.ON)
    [negotiated] = feed(conn, option(OPT["GO"], info_payload("disk")))
    assert isinstance(negotiated, Negotiated) and not negotiated.tls
    assert parse_option_replies(conn.data_to_send())[-1] == (OPT["GO"], ACK, b"")


@pytest.mark.parametrize("tls_mode", [TlsMode.REQUIRE, TlsMode.ON])
def test_starttls_with_data_is_invalid(tls_mode):
    conn = handshake(tls_mode=tls_mode)
    assert feed(conn, option(OPT["STARTTLS"], b"x")) == []
    assert [r[1] for r in parse_option_replies(conn.data_to_send())] == [ERR["INVALID"]]
    start_tls(conn)   # still possible afterwards


def test_starttls_needs_fixed_newstyle():
    # proto.md: "The server MUST operate in NOTLS mode unless ... NBD_FLAG_C_FIXED_NEWSTYLE"
    conn = handshake(flags=0, tls_mode=TlsMode.REQUIRE)
    feed(conn, option(OPT["STARTTLS"]) + option(OPT["LIST"]))
    assert [r[1] for r in parse_option_replies(conn.data_to_send())] == [ERR["POLICY"], ERR["POLICY"]]
    [event] = feed(conn, option(OPT["EXPORT_NAME"], b"disk"))
    assert isinstance(event, Disconnect)


def test_bytes_pipelined_after_starttls_are_refused():
    conn = handshake(tls_mode=TlsMode.REQUIRE)
    conn.receive_data(option(OPT["STARTTLS"]) + b"\x16\x03\x01")   # a TLS hello before the ACK
    with pytest.raises(ProtocolError, match="after NBD_OPT_STARTTLS"):
        conn.next_event()
    assert conn.data_to_send() == b""   # no ACK: the transport closes


def test_tls_started_only_after_starttls():
    conn = handshake(tls_mode=TlsMode.REQUIRE)
    with pytest.raises(LocalProtocolError):
        conn.tls_started()
    start_tls(conn)
    with pytest.raises(LocalProtocolError):
        conn.tls_started()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.sampled_from([TlsMode.REQUIRE, TlsMode.ON]), st.booleans())
def test_random_bytes_around_starttls_raise_only_protocol_error(data, tls_mode, starttls_first):
    conn = handshake(tls_mode=tls_mode)
    data = (option(OPT["STARTTLS"]) if starttls_first else b"") + data
    try:
        for piece in (data[:16], data[16:], b""):
            conn.receive_data(piece)
            while (event := conn.next_event()) is not NEED_DATA and not isinstance(event, Disconnect):
                if isinstance(event, StartTLS):
                    conn.tls_started()   # what the transport does once the TLS handshake is over
                elif isinstance(event, Negotiated):
                    assert event.tls or tls_mode is TlsMode.ON
            if isinstance(event, Disconnect):
                break
    except ProtocolError:
        pass


# -- transmission
def test_read_request_byte_by_byte():
    conn, _ = negotiate()
    events = feed(conn, request(READ, 4096, 512, cookie=0xABCDEF))
    assert events == [Request(0xABCDEF, READ, 0, 4096, 512)]


def test_write_payload_byte_by_byte():
    conn, _ = negotiate()
    payload = bytes(range(256)) * 2
    events = feed(conn, request(WRITE, 512, 512, flags=1, data=payload) + request(FLUSH, cookie=8))
    assert [(e.command, e.cookie, e.flags, e.data, e.error) for e in events] == [
        (WRITE, 7, 1, payload, 0), (FLUSH, 8, 0, None, 0)]


@pytest.mark.parametrize("split", [None, 1, 7, 28 + 65536, 28 + 65536 + 28 + 100])
def test_large_write_payloads_in_any_pieces(split):
    """Payloads of 64 KiB and more leave the receive buffer as it is (no copy): what follows
    them in the same bytes must still be the next request, wherever the pieces end."""
    conn, _ = negotiate()
    big, bigger = bytes(range(256)) * 256, bytes(range(255, -1, -1)) * 256   # max_block of DISK
    data = (request(WRITE, 0, len(big), cookie=1, data=big) + request(WRITE, 0, len(bigger), cookie=2, data=bigger)
            + request(FLUSH, cookie=3) + request(WRITE, 0, 512, cookie=4, data=big[:512]))
    pieces = [data] if split is None else [data[i:i + split] for i in range(0, len(data), split)] \
        if split < 100 else [data[:split], data[split:]]
    events = []
    for piece in pieces:
        events += feed(conn, piece, bytewise=False)
    assert [(e.command, e.cookie, e.data) for e in events] == [
        (WRITE, 1, big), (WRITE, 2, bigger), (FLUSH, 3, None), (WRITE, 4, big[:512])]


@pytest.mark.parametrize("req, error", [
    (dict(cmd=99), EINVAL),                                   # unknown command
    (dict(cmd=READ, length=512, flags=1 << 5), EINVAL),       # unknown flag
    (dict(cmd=READ, length=512, flags=1 << 3), EINVAL),       # REQ_ONE on a READ
    (dict(cmd=WZ, length=512, flags=1 << 2), EINVAL),         # DF on WRITE_ZEROES
    (dict(cmd=READ, offset=(1 << 20) - 1, length=2), EINVAL),  # beyond the end
    (dict(cmd=TRIM, offset=1 << 20, length=1), EINVAL),
    (dict(cmd=WZ, offset=1 << 20, length=1), ENOSPC),
    (dict(cmd=READ, length=65537), EINVAL),                   # above max block size
    (dict(cmd=READ, length=65537, flags=1 << 2), EOVERFLOW),  # ... with DF
    (dict(cmd=FLUSH, offset=1), EINVAL),
    (dict(cmd=BS, length=0), EINVAL),
    (dict(cmd=READ, offset=2**64 - 1, length=1), EINVAL),
])
def test_invalid_requests_are_flagged(req, error):
    conn, _ = negotiate()
    events = feed(conn, request(**req))
    assert len(events) == 1 and events[0].error == error


def test_no_contexts_block_status_and_read_only_writes():
    conn, _ = negotiate(structured=False, contexts=(), export="ro")
    events = feed(conn, request(BS, 0, 512) + request(WRITE, 0, 4, cookie=9, data=b"abcd")
                  + request(TRIM, 0, 512, cookie=10) + request(FLUSH, cookie=11) + request(READ, 0, 8, flags=4, cookie=12))
    assert [(e.cookie, e.error) for e in events] == [(7, EINVAL), (9, EPERM), (10, EPERM), (11, 0), (12, EINVAL)]


def test_refused_write_payload_is_discarded_without_buffering():
    conn, _ = negotiate()
    conn.receive_data(request(WRITE, 0, 10 * 65536 + 1, cookie=1))
    event = conn.next_event()
    assert event.error == EINVAL and event.data is None
    for _ in range(10):
        conn.receive_data(bytes(65536))
        assert conn.next_event() is NEED_DATA and conn.buffered_bytes == 0
    events = feed(conn, b"\0" + request(READ, 0, 1, cookie=2))
    assert [(e.cookie, e.error) for e in events] == [(2, 0)]


def test_write_beyond_end_discards_payload():
    conn, _ = negotiate()
    events = feed(conn, request(WRITE, 1 << 20, 3, data=b"xyz") + request(READ, 0, 1, cookie=2))
    assert [(e.cookie, e.error, e.data) for e in events] == [(7, ENOSPC, None), (2, 0, None)]


def test_disc_and_eof():
    conn, _ = negotiate()
    assert feed(conn, request(DISC)) == [Disconnect("disc")]
    conn.receive_data(b"ignored after DISC")
    conn, _ = negotiate()
    conn.receive_data(b"")
    assert conn.next_event() == Disconnect("eof")
    conn, _ = negotiate()
    conn.receive_data(request(WRITE, 0, 4)[:30])
    conn.receive_data(b"")
    with pytest.raises(ProtocolError):
        conn.next_event()


def test_bad_request_magic():
    conn, _ = negotiate()
    with pytest.raises(ProtocolError):
        feed(conn, struct.pack(">IHHQQI", 0x12560953, 0, 0, 0, 0, 0))


# -- replies
def test_simple_replies():
    conn, _ = negotiate(structured=False, contexts=())
    feed(conn, request(READ, 0, 4, cookie=5) + request(FLUSH, cookie=6))
    assert conn.send(SimpleReply(6)) == struct.pack(">IIQ", SIMPLE_MAGIC, 0, 6)
    with pytest.raises(LocalProtocolError):
        conn.send(SimpleReply(5, data=b"abc"))   # wrong length
    with pytest.raises(LocalProtocolError):
        conn.send(OffsetData(5, 0, b"abcd"))     # not negotiated
    assert conn.send(SimpleReply(5, data=b"abcd")) == struct.pack(">IIQ", SIMPLE_MAGIC, 0, 5) + b"abcd"
    with pytest.raises(LocalProtocolError):
        conn.send(SimpleReply(5))                # no longer in flight


def test_structured_chunks():
    conn, neg = negotiate(contexts=("base:allocation",))
    (ctx,) = neg.meta_contexts
    feed(conn, request(READ, 0, 8, cookie=1) + request(BS, 0, 8, cookie=2) + request(TRIM, 0, 8, cookie=3))
    with pytest.raises(LocalProtocolError):
        conn.send(SimpleReply(1))
    assert conn.send(OffsetData(1, 0, b"abcd")) == struct.pack(">IHHQIQ", CHUNK_MAGIC, 0, 1, 1, 12, 0) + b"abcd"
    assert conn.send(OffsetHole(1, 4, 4, done=True)) == struct.pack(">IHHQIQI", CHUNK_MAGIC, 1, 2, 1, 12, 4, 4)
    assert conn.send(BlockStatus(2, ctx, [(4, 0), (4, 3)], done=True)) == (
        struct.pack(">IHHQII", CHUNK_MAGIC, 1, 5, 2, 20, ctx) + struct.pack(">IIII", 4, 0, 4, 3))
    assert conn.send(ErrorChunk(3, EPERM, "no", offset=2, done=False)) == (
        struct.pack(">IHHQIIH", CHUNK_MAGIC, 0, 0x8002, 3, 16, EPERM, 2) + b"no" + struct.pack(">Q", 2))
    assert conn.send(NoneChunk(3)) == struct.pack(">IHHQI", CHUNK_MAGIC, 1, 0, 3, 0)
    with pytest.raises(LocalProtocolError):
        conn.send(NoneChunk(3))


def test_send_before_transmission_is_local_error():
    conn = handshake()
    with pytest.raises(LocalProtocolError):
        conn.send(SimpleReply(1))


# -- hostile input
@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.booleans())
def test_random_bytes_raise_only_protocol_error(data, after_handshake):
    conn = handshake() if after_handshake else ServerConnection(CATALOG)
    try:
        for piece in (data[: len(data) // 2], data[len(data) // 2:], b""):
            conn.receive_data(piece)
            while not isinstance(event := conn.next_event(), Disconnect) and event is not NEED_DATA:
                pass
            if isinstance(event, Disconnect):
                break
    except ProtocolError:
        pass




# -- extended headers (proto.md, extension-ext-header branch: "NBD_OPT_EXTENDED_HEADERS",
#    "Request message", "Extended reply chunk message", "NBD_REPLY_TYPE_BLOCK_STATUS_EXT")
EXT_REQ_MAGIC, EXT_REPLY_MAGIC = 0x21E41C71, 0x6E8A278C
PAYLOAD_LEN = 1 << 5
ERR_EXT_HEADER_REQD = 2**31 + 10
BIG = ExportInfo("big", 1 << 40, RW_FLAGS, max_block=65536)


def ext_request(cmd: int, offset: int = 0, length: int = 0, flags: int = 0, cookie: int = 7,
                data: bytes = b"") -> bytes:
    return struct.pack(">IHHQQQ", EXT_REQ_MAGIC, flags, cmd, cookie, offset, length) + data


def ext_reply(flags: int, rtype: int, cookie: int, offset: int, payload: bytes) -> bytes:
    return struct.pack(">IHHQQQ", EXT_REPLY_MAGIC, flags, rtype, cookie, offset, len(payload)) + payload


def negotiate_extended(contexts=("base:allocation",), export="disk", catalog=CATALOG, first: bytes = b""):
    conn = handshake(catalog=catalog)
    data = first + option(OPT["EXTENDED_HEADERS"])
    if contexts:
        data += option(OPT["SET_META_CONTEXT"], meta_payload(export, *contexts))
    events = feed(conn, data + option(OPT["GO"], info_payload(export)))
    assert len(events) == 1 and isinstance(events[0], Negotiated)
    replies = parse_option_replies(conn.data_to_send())
    assert replies[len(first) and 1] == (OPT["EXTENDED_HEADERS"], ACK, b"")
    return conn, events[0]


def test_extended_headers_option():
    conn = handshake()
    feed(conn, option(OPT["EXTENDED_HEADERS"], b"x"))
    assert parse_option_replies(conn.data_to_send())[0][1] == ERR["INVALID"]
    conn, neg = negotiate_extended()
    assert neg.extended_headers and neg.structured_replies and neg.flags & TF.SEND_DF
    assert list(neg.meta_contexts.values()) == ["base:allocation"]   # no STRUCTURED_REPLY needed
    # after structured replies too; and refused by a server that does not offer them
    negotiate_extended(first=option(OPT["STRUCTURED_REPLY"]))
    conn = handshake(extended_headers=False)
    feed(conn, option(OPT["EXTENDED_HEADERS"]))
    assert parse_option_replies(conn.data_to_send())[0][1] == ERR["UNSUP"]


def test_structured_reply_after_extended_headers_is_ext_header_reqd():
    conn = handshake()
    feed(conn, option(OPT["EXTENDED_HEADERS"]) + option(OPT["STRUCTURED_REPLY"]))
    assert [r[1] for r in parse_option_replies(conn.data_to_send())] == [ACK, ERR_EXT_HEADER_REQD]


def test_export_name_after_extended_headers_closes():
    conn = handshake()
    events = feed(conn, option(OPT["EXTENDED_HEADERS"]) + option(OPT["EXPORT_NAME"], b"disk"))
    assert isinstance(events[-1], Disconnect) and "EXTENDED_HEADERS" in events[-1].reason
    assert [r[1] for r in parse_option_replies(conn.data_to_send())] == [ACK]


def test_starttls_forgets_extended_headers():
    conn = handshake(tls_mode=TlsMode.ON)
    events = feed(conn, option(OPT["EXTENDED_HEADERS"]) + option(OPT["STARTTLS"]))
    assert isinstance(events[-1], StartTLS)
    conn.tls_started()
    events = feed(conn, option(OPT["GO"], info_payload("disk")))
    assert not events[0].extended_headers and not events[0].structured_replies


def test_extended_requests_byte_by_byte():
    conn, _ = negotiate_extended()
    events = feed(conn, ext_request(READ, 512, 1024, cookie=3)
                  + ext_request(WRITE, 4096, 5, flags=PAYLOAD_LEN | 1, cookie=4, data=b"hello"))
    assert events == [Request(3, READ, 0, 512, 1024), Request(4, WRITE, PAYLOAD_LEN | 1, 4096, 5, b"hello")]


def test_compact_header_after_extended_headers_is_a_protocol_error():
    conn, _ = negotiate_extended()
    with pytest.raises(ProtocolError):
        feed(conn, request(READ, 0, 512))
    conn, _ = negotiate()
    with pytest.raises(ProtocolError):
        feed(conn, ext_request(READ, 0, 512))


def test_write_without_payload_len_carries_its_payload_as_qemu_sends_it():
    """proto.md says NBD_CMD_WRITE "MUST use" PAYLOAD_LEN; qemu 10.0's client leaves it out,
    and qemu's server (nbd_co_receive_request) reads a write's payload either way."""
    conn, _ = negotiate_extended()
    events = feed(conn, ext_request(WRITE, 0, 3, flags=1, cookie=1, data=b"abc") + ext_request(FLUSH, cookie=2))
    assert events == [Request(1, WRITE, 1, 0, 3, b"abc"), Request(2, FLUSH, 0, 0, 0)]


def test_payload_on_other_commands_is_consumed_then_einval():
    """proto.md: the server "MUST gracefully consume the client's payload before failing with
    NBD_EINVAL" (the block status payload form is not served, nor advertised)."""
    conn, neg = negotiate_extended()
    assert not neg.flags & TF.BLOCK_STATUS_PAYLOAD
    payload = struct.pack(">QI", 4096, 1)
    events = feed(conn, ext_request(BS, 0, len(payload), flags=PAYLOAD_LEN, cookie=1, data=payload)
                  + ext_request(TRIM, 0, 3, flags=PAYLOAD_LEN, cookie=2, data=b"abc")
                  + ext_request(FLUSH, cookie=3))
    assert [(e.cookie, e.command, e.error) for e in events] == [(1, BS, EINVAL), (2, TRIM, EINVAL), (3, FLUSH, 0)]
    assert conn.buffered_bytes == 0


def test_payload_above_the_maximum_disconnects():
    conn, _ = negotiate_extended()
    with pytest.raises(ProtocolError):
        feed(conn, ext_request(WRITE, 0, DISK.max_block + 1, flags=PAYLOAD_LEN), bytewise=False)


def test_64_bit_effect_lengths():
    conn, _ = negotiate_extended(export="big", catalog=ExportCatalog([BIG]))
    events = feed(conn, ext_request(TRIM, 0, 1 << 33, cookie=1) + ext_request(WZ, 1 << 39, 1 << 39, cookie=2)
                  + ext_request(BS, 0, 1 << 40, cookie=3) + ext_request(TRIM, 1, 1 << 40, cookie=4)
                  + ext_request(READ, 0, 1 << 33, cookie=5))
    assert [(e.cookie, e.length, e.error) for e in events] == [
        (1, 1 << 33, 0), (2, 1 << 39, 0), (3, 1 << 40, 0), (4, 1 << 40, EINVAL), (5, 1 << 33, EINVAL)]


def test_extended_replies():
    conn, neg = negotiate_extended(export="big", catalog=ExportCatalog([BIG]))
    (ctx,) = neg.meta_contexts
    feed(conn, ext_request(READ, 4096, 8, cookie=1) + ext_request(BS, 8192, 1 << 34, cookie=2)
         + ext_request(TRIM, 1 << 20, 4096, cookie=3) + ext_request(FLUSH, cookie=4))
    # every reply is an extended chunk carrying the request's offset
    assert conn.send(OffsetData(1, 4100, b"abcd")) == ext_reply(0, 1, 1, 4096, struct.pack(">Q", 4100) + b"abcd")
    assert conn.send(OffsetHole(1, 4096, 4, done=True)) == ext_reply(1, 2, 1, 4096, struct.pack(">QI", 4096, 4))
    assert conn.send(BlockStatus(2, ctx, [(1 << 33, 3), (4096, 0)], done=True)) == ext_reply(
        1, 6, 2, 8192, struct.pack(">II", ctx, 2) + struct.pack(">QQQQ", 1 << 33, 3, 4096, 0))
    # a simple reply event goes out as NONE, or as an ERROR chunk
    assert conn.send(SimpleReply(3)) == ext_reply(1, 0, 3, 1 << 20, b"")
    assert conn.send(SimpleReply(4, EPERM)) == ext_reply(1, 0x8001, 4, 0, struct.pack(">IH", EPERM, 0))


def test_compact_block_status_refuses_descriptors_past_32_bits():
    conn, neg = negotiate(contexts=("base:allocation",))
    (ctx,) = neg.meta_contexts
    feed(conn, request(BS, 0, 4096, cookie=2))
    with pytest.raises(LocalProtocolError):
        conn.send(BlockStatus(2, ctx, [(1 << 32, 0)], done=True))


@pytest.mark.parametrize("extended", [False, True], ids=["compact", "extended"])
@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10), st.integers(0, 63), st.integers(0, 2**64 - 1),
                          st.integers(0, 2**64 - 1)), max_size=8), st.binary(max_size=64))
def test_random_requests_raise_only_protocol_error(extended, requests, tail):
    """Compact (28-byte) or extended (32-byte, 64-bit length) headers; payloads kept small
    where the length is a payload's."""
    conn, _ = negotiate_extended() if extended else negotiate()
    magic, layout = (EXT_REQ_MAGIC, ">IHHQQQ") if extended else (REQ_MAGIC, ">IHHQQI")
    data = b"".join(struct.pack(layout, magic, f, c, 1, o,
                                n if extended and c != WRITE and not f & PAYLOAD_LEN else n % 2**17)
                    for c, f, o, n in requests) + tail
    try:
        feed(conn, data, bytewise=False)
        conn.receive_data(b"")
        conn.next_event()
    except ProtocolError:
        pass
