"""TLS (NBD_OPT_STARTTLS) with real clients: nbdinfo/nbdcopy (libnbd, GnuTLS), qemu-io and
qemu-img (qemu's tls-creds-x509), python3-libnbd, and raw sockets with Python's ssl.

The certificates are made at test time with the openssl command (tests/tlscerts.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import ssl
import struct
import subprocess
import textwrap
from pathlib import Path

import pytest
import trio

from conftest import nbdserve_command, import_libnbd
from nbdhelpers import MiB, file_bytes, make_raw, run, same_files, start_server
from nbdserve.server.settings import ExportSettings, TlsSettings
from tlscerts import Pki, make_pki


SIZE = 64 * MiB
DATA = os.urandom(4 * MiB)      # at 8 MiB; the rest of the disk is a hole
IHAVEOPT, REPLY_MAGIC = 0x49484156454F5054, 0x3E889045565A9
OPT_ABORT, OPT_STARTTLS, OPT_GO, OPT_STRUCTURED_REPLY = 2, 5, 7, 8
REP_ACK, REP_INFO, REP_ERR_INVALID = 1, 3, 2**31 + 3
REQUEST_MAGIC, SIMPLE_REPLY_MAGIC = 0x25609513, 0x67446698


# -- certificates -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# -- the server and the clients -----------------------------------------------------------------

async def serve(nursery, tmp_path, tls: TlsSettings, **options):
    disk = make_raw(tmp_path / "disk.raw", SIZE, {8 * MiB: DATA})
    server = await start_server(nursery, [ExportSettings("disk", disk, "raw")], tls=tls, **options)
    server.disk = disk
    return server


def nbds(server, certificates: Path) -> str:
    return f"nbds://127.0.0.1:{server.port}/disk?tls-certificates={certificates}"


def qemu_tls(server, certificates: Path, *, sanity_check: bool = True) -> list[str]:
    """qemu-io/qemu-img arguments that open the export over TLS with ``certificates``."""
    creds = f"tls-creds-x509,id=tls0,dir={certificates},endpoint=client"
    if not sanity_check:   # qemu checks its own certificate against its CA unless told not to
        creds += ",sanity-check=off"
    return ["--object", creds, "--image-opts",
            f"driver=nbd,host=127.0.0.1,port={server.port},export=disk,tls-creds=tls0"]


def log_lines(caplog, fragment: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if fragment in r.getMessage()]


@pytest.fixture(autouse=True)
def _info_logs(caplog):
    caplog.set_level(logging.INFO, logger="nbdserve")


# -- real clients over TLS ------------------------------------------------------------------------

async def test_nbdinfo_over_tls(pki, tmp_path, nursery, caplog):
    server = await serve(nursery, tmp_path, pki.tls())
    result = await run("nbdinfo", "--json", nbds(server, pki.client))
    info = json.loads(result.stdout)
    assert info["TLS"] is True and info["structured"] is True
    assert info["exports"][0]["export-size"] == SIZE
    [started] = log_lines(caplog, "TLS started")
    assert "client CN=client" in started
    assert log_lines(caplog, "over TLS")


async def test_qemu_io_and_qemu_img_over_tls(pki, tmp_path, nursery):
    server = await serve(nursery, tmp_path, pki.tls())
    # -r -U: the server holds qemu's write lock on its image, like qemu-nbd on a qcow2
    local = ["qemu-io", "-r", "-U", "-f", "raw", server.disk]
    # Written locally (no second qemu writer may open the served image), read over TLS.
    with open(server.disk, "r+b") as f:
        os.pwrite(f.fileno(), b"\x5a" * (3 << 20), 20 << 20)
    await run("qemu-io", *qemu_tls(server, pki.client), "-c", "read -P 0x5a 20M 3M", "-c", "read -P 0 24M 1M")
    # Written over TLS (1 MiB requests and an unaligned one), read locally.
    await run("qemu-io", *qemu_tls(server, pki.client), "-c", "write -P 0xc3 30M 2M", "-c", "write -P 0x11 33M 4097",
              "-c", "flush")
    await run(*local, "-c", "read -P 0xc3 30M 2M", "-c", "read -P 0x11 33M 4097")
    # The whole disk through qemu-img over TLS equals the file.
    result = await run("qemu-img", "info", "--output=json", *qemu_tls(server, pki.client))
    assert json.loads(result.stdout)["virtual-size"] == SIZE
    copy = tmp_path / "copy.raw"
    await run("qemu-img", "convert", "-O", "raw", *qemu_tls(server, pki.client), str(copy))
    assert same_files(copy, server.disk)


async def test_nbdcopy_over_tls_with_many_large_requests(pki, tmp_path, nursery):
    server = await serve(nursery, tmp_path, pki.tls())
    copy = tmp_path / "copy.raw"
    await run("nbdcopy", "--request-size=1048576", "--requests=64", "--connections=4", nbds(server, pki.client),
              str(copy))
    assert same_files(copy, server.disk)
    upload = make_raw(tmp_path / "upload.raw", SIZE, {0: os.urandom(16 * MiB), 40 * MiB: os.urandom(8 * MiB)})
    await run("nbdcopy", "--request-size=1048576", "--requests=64", upload, nbds(server, pki.client))
    assert same_files(upload, server.disk)


async def test_libnbd_commands_over_tls(pki, tmp_path, nursery):
    nbd = import_libnbd()
    server = await serve(nursery, tmp_path, pki.tls())
    written = os.urandom(MiB + 512)

    def session():
        h = nbd.NBD()
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_certificates(str(pki.client))
        h.add_meta_context("base:allocation")
        h.connect_tcp("127.0.0.1", str(server.port))
        try:
            negotiated = (h.get_tls_negotiated(), h.get_structured_replies_negotiated(),
                          h.can_meta_context("base:allocation"), h.get_size())
            chunks = []

            def chunk(buf, offset, status, error):
                chunks.append((offset, status, bytes(buf)))
                return 0
            h.pread_structured(6 * MiB, 4 * MiB, chunk)          # 6..8 MiB a hole, 8..10 MiB data
            extents = {}

            def extent(context, offset, entries, error):
                extents[context] = list(zip(entries[::2], entries[1::2]))
                return 0
            h.block_status(4 * MiB, 8 * MiB, extent)             # count, offset
            h.pwrite(written, 40 * MiB, nbd.CMD_FLAG_FUA)
            # 64 reads of 1 MiB in flight at once through the one TLS stream
            buffers = [nbd.Buffer(MiB) for _ in range(64)]
            cookies = [h.aio_pread(buf, i * MiB) for i, buf in enumerate(buffers)]
            while h.aio_in_flight() > 0:
                h.poll(-1)
            assert all(h.aio_command_completed(c) for c in cookies)
            return negotiated, chunks, extents, b"".join(b.to_bytearray() for b in buffers)
        finally:
            h.shutdown()

    negotiated, chunks, extents, whole = await trio.to_thread.run_sync(session)
    assert negotiated == (True, True, True, SIZE)
    image = bytearray(4 * MiB)
    for offset, status, data in chunks:
        if status == nbd.READ_DATA:
            image[offset - 6 * MiB: offset - 6 * MiB + len(data)] = data
    assert bytes(image) == bytes(2 * MiB) + DATA[:2 * MiB]
    assert any(status == nbd.READ_HOLE for _, status, _ in chunks)   # the hole came as OFFSET_HOLE
    assert extents["base:allocation"][0] == (4 * MiB, 0)             # 8..12 MiB is data
    assert file_bytes(server.disk, 40 * MiB, len(written)) == written
    assert whole == file_bytes(server.disk, 0, SIZE)


# -- refusals ------------------------------------------------------------------------------------

async def test_plain_clients_refused_when_tls_is_required(pki, tmp_path, nursery, caplog):
    server = await serve(nursery, tmp_path, pki.tls())
    plain = await run("nbdinfo", server.uri("disk"), check=False)
    assert plain.returncode != 0
    qemu = await run("qemu-io", "-f", "raw", server.uri("disk"), "-c", "read 0 512", check=False)
    assert qemu.returncode != 0 and b"TLS" in qemu.stderr
    refusals = log_lines(caplog, "refused, TLS is required")
    assert len(refusals) == 2, refusals      # one line per refused client
    # the server goes on serving TLS clients
    await run("nbdinfo", nbds(server, pki.client))
    assert len(log_lines(caplog, "TLS started")) == 1


async def test_client_certificates_verified_against_the_ca(pki, tmp_path, nursery, caplog):
    server = await serve(nursery, tmp_path, pki.tls())
    for certificates in (pki.no_cert, pki.wrong_ca):
        refused = await run("nbdinfo", nbds(server, certificates), check=False)
        assert refused.returncode != 0, certificates
    qemu_no_cert = await run("qemu-io", *qemu_tls(server, pki.no_cert), "-c", "read 0 512", check=False)
    qemu_wrong_ca = await run("qemu-io", *qemu_tls(server, pki.wrong_ca, sanity_check=False), "-c", "read 0 512",
                              check=False)
    assert qemu_no_cert.returncode != 0 and qemu_wrong_ca.returncode != 0
    failures = log_lines(caplog, "TLS handshake failed")
    assert len(failures) == 4, failures
    assert sum("did not return a certificate" in f for f in failures) == 2
    assert sum("client certificate refused" in f for f in failures) == 2
    assert not log_lines(caplog, "export 'disk'")      # none of them reached an export
    await run("qemu-io", *qemu_tls(server, pki.client), "-c", f"read -P 0 0 {8 * MiB}")


async def test_authz_identity_lets_in_only_the_client_with_that_subject(pki, tmp_path, nursery, caplog):
    """The client certificate's subject is /CN=client (tlscerts.make_pki): "CN=client" as
    GnuTLS writes it; any other identity refuses it after the TLS handshake."""
    allowed = await serve(nursery, tmp_path, dataclasses.replace(pki.tls(), identity="CN=client"))
    await run("nbdinfo", nbds(allowed, pki.client))
    await run("qemu-io", *qemu_tls(allowed, pki.client), "-c", f"read -P 0 0 {8 * MiB}")
    assert not log_lines(caplog, "authz")
    (tmp_path / "other").mkdir()
    denied = await serve(nursery, tmp_path / "other", dataclasses.replace(pki.tls(), identity="CN=someone else"))
    assert (await run("nbdinfo", nbds(denied, pki.client), check=False)).returncode != 0
    qemu = await run("qemu-io", *qemu_tls(denied, pki.client), "-c", "read 0 512", check=False)
    assert qemu.returncode != 0
    refusals = log_lines(caplog, "authz")
    assert len(refusals) == 2 and all(
        r.endswith(": TLS handshake failed: TLS x509 authz check for CN=client is denied") for r in refusals), refusals
    assert len(log_lines(caplog, "export 'disk'")) == 2     # the allowed client's two connections only
    await run("nbdinfo", nbds(allowed, pki.client))      # both still serving


async def test_without_a_ca_clients_need_no_certificate(pki, tmp_path, nursery):
    server = await serve(nursery, tmp_path, pki.tls(verify_clients=False))
    await run("nbdinfo", nbds(server, pki.no_cert))
    await run("qemu-io", *qemu_tls(server, pki.no_cert), "-c", f"read -P 0 0 {8 * MiB}")


async def test_tls_on_serves_plain_and_tls_clients(pki, tmp_path, nursery, caplog):
    server = await serve(nursery, tmp_path, pki.tls(mode="on"))
    plain = json.loads((await run("nbdinfo", "--json", server.uri("disk"))).stdout)
    secure = json.loads((await run("nbdinfo", "--json", nbds(server, pki.client))).stdout)
    assert (plain["TLS"], secure["TLS"]) == (False, True)
    await run("qemu-io", "-f", "raw", server.uri("disk"), "-c", f"read -P 0 0 {8 * MiB}")
    await run("qemu-io", *qemu_tls(server, pki.client), "-c", f"read -P 0 0 {8 * MiB}")
    assert not log_lines(caplog, "refused")


async def test_tls_off_keeps_starttls_unsupported(pki, tmp_path, nursery):
    server = await serve(nursery, tmp_path, pki.tls(mode="off"))
    assert (await run("nbdinfo", nbds(server, pki.client), check=False)).returncode != 0
    await run("nbdinfo", server.uri("disk"))


# -- raw clients: the protocol around STARTTLS, and hostile ones -----------------------------------

def _receive_exactly(sock, count: int) -> bytes:
    data = b""
    while len(data) < count:
        piece = sock.recv(count - len(data))
        if not piece:
            raise EOFError(f"closed after {len(data)} of {count} bytes")
        data += piece
    return data


def _option(sock, option: int, data: bytes = b"") -> None:
    sock.sendall(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)


def _option_reply(sock) -> tuple[int, int, bytes]:
    magic, option, reply, length = struct.unpack(">QIII", _receive_exactly(sock, 20))
    assert magic == REPLY_MAGIC
    return option, reply, _receive_exactly(sock, length)


def _plain_session(port: int) -> socket.socket:
    """Connected and past the greeting (client flags: fixed newstyle, no zeroes)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    assert _receive_exactly(sock, 18)[:16] == b"NBDMAGICIHAVEOPT"
    sock.sendall(struct.pack(">I", 3))
    return sock


def _closed_by_server(sock) -> bool:
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, ssl.SSLError):
        return True


def _client_context(pki: Pki) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(pki.client / "ca-cert.pem")
    context.load_cert_chain(pki.client / "client-cert.pem", pki.client / "client-key.pem")
    return context


async def test_starttls_forgets_options_and_refuses_a_second_one(pki, tmp_path, nursery):
    """Python's ssl as the client: STRUCTURED_REPLY in the clear, then STARTTLS; inside TLS
    a second STARTTLS is NBD_REP_ERR_INVALID, and a read gets a simple reply because
    structured replies were negotiated before STARTTLS (proto.md: "NBD_OPT_STARTTLS").
    NBD_CMD_DISC closes the TLS session with close_notify before the TCP connection."""
    server = await serve(nursery, tmp_path, pki.tls(mode="on"))

    def client():
        sock = _plain_session(server.port)
        _option(sock, OPT_STRUCTURED_REPLY)
        assert _option_reply(sock) == (OPT_STRUCTURED_REPLY, REP_ACK, b"")
        _option(sock, OPT_STARTTLS)
        assert _option_reply(sock) == (OPT_STARTTLS, REP_ACK, b"")
        with _client_context(pki).wrap_socket(sock, server_hostname="127.0.0.1", suppress_ragged_eofs=False) as tls:
            _option(tls, OPT_STARTTLS)
            assert _option_reply(tls)[:2] == (OPT_STARTTLS, REP_ERR_INVALID)
            _option(tls, OPT_GO, struct.pack(">I", 4) + b"disk" + struct.pack(">H", 0))
            while (reply := _option_reply(tls))[1] == REP_INFO:
                pass
            assert reply == (OPT_GO, REP_ACK, b"")
            tls.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 0, 0xC0FFEE, 8 * MiB, 4096))   # NBD_CMD_READ
            header = _receive_exactly(tls, 16)
            assert struct.unpack(">IIQ", header) == (SIMPLE_REPLY_MAGIC, 0, 0xC0FFEE)
            data = _receive_exactly(tls, 4096)
            tls.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 2, 1, 0, 0))   # NBD_CMD_DISC
            assert tls.recv(1) == b""      # close_notify; without it: SSLEOFError
            return data

    assert await trio.to_thread.run_sync(client) == DATA[:4096]


async def test_hostile_clients_around_starttls_do_not_stop_the_server(pki, tmp_path, nursery, caplog):
    server = await serve(nursery, tmp_path, pki.tls(), handshake_timeout=1.0)

    def starttls(sock):
        _option(sock, OPT_STARTTLS)
        assert _option_reply(sock) == (OPT_STARTTLS, REP_ACK, b"")

    def garbage_instead_of_tls():
        with _plain_session(server.port) as sock:
            starttls(sock)
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n" + os.urandom(300))
            return _closed_by_server(sock)

    def gone_after_the_ack():
        with _plain_session(server.port) as sock:
            starttls(sock)

    def silent_after_the_ack():
        with _plain_session(server.port) as sock:
            starttls(sock)
            return _closed_by_server(sock)     # the handshake timeout closes it

    def garbage_inside_tls():
        sock = _plain_session(server.port)
        starttls(sock)
        with _client_context(pki).wrap_socket(sock, server_hostname="127.0.0.1") as tls:
            tls.sendall(os.urandom(64))        # not an option request
            return _closed_by_server(tls)

    assert await trio.to_thread.run_sync(garbage_instead_of_tls)
    await trio.to_thread.run_sync(gone_after_the_ack)
    assert await trio.to_thread.run_sync(silent_after_the_ack)
    assert await trio.to_thread.run_sync(garbage_inside_tls)
    assert len(log_lines(caplog, "TLS handshake failed")) == 2, caplog.text
    assert len(log_lines(caplog, "handshake timed out")) == 1, caplog.text
    assert len(log_lines(caplog, "protocol error: bad option magic")) == 1, caplog.text
    # still serving, over TLS
    await run("qemu-io", *qemu_tls(server, pki.client), "-c", f"read -P 0 0 {8 * MiB}")


# -- the command line and the config file ----------------------------------------------------------

async def test_cli_and_config_file_serve_tls(pki, tmp_path, nbdserve):
    disk = make_raw(tmp_path / "disk.raw", SIZE, {8 * MiB: DATA})
    proc = nbdserve("serve", "-f", "raw", "-x", "disk", "--tls-cert", pki.server / "server-cert.pem",
                    "--tls-key", pki.server / "server-key.pem", "--tls-ca", pki.server / "ca-cert.pem", disk)
    assert proc.uri.startswith("nbds://127.0.0.1:")
    await run("nbdinfo", f"{proc.uri}?tls-certificates={pki.client}")
    assert (await run("nbdinfo", proc.uri.replace("nbds:", "nbd:"), check=False)).returncode != 0

    config = tmp_path / "tls.toml"
    port = proc.uri.split(":")[2].split("/")[0]
    assert proc.stop() == 0
    config.write_text(textwrap.dedent(f"""\
        [server]
        port = {port}
        tls = {{ cert = "{pki.server}/server-cert.pem", key = "{pki.server}/server-key.pem", mode = "on" }}
        [[export]]
        name = "disk"
        image = "disk.raw"
        """))
    proc = nbdserve("serve", "--config", config)
    assert proc.uri == f"nbd://127.0.0.1:{port}/disk"     # TLS offered, not required
    await run("nbdinfo", f"nbds://127.0.0.1:{port}/disk?tls-certificates={pki.no_cert}")
    await run("nbdinfo", proc.uri)


@pytest.mark.parametrize("args, status, message", [
    (["--tls-cert", "server-cert.pem"], 2, "--tls-cert and --tls-key go together"),
    (["--tls-ca", "ca-cert.pem"], 2, "--tls-ca needs --tls-cert and --tls-key"),
    (["--tls", "require"], 2, "--tls require needs --tls-cert and --tls-key"),
    (["--tls-cert", "server-cert.pem", "--tls-key", "server-key.pem", "--tls-authz-identity", "CN=client"], 2,
     "--tls-authz-identity needs --tls-ca"),
    (["--tls-cert", "absent.pem", "--tls-key", "server-key.pem"], 1, "absent.pem: No such file or directory"),
    (["--tls-cert", "server-key.pem", "--tls-key", "server-key.pem"], 1, "server-key.pem: no PEM certificate"),
    (["--tls-cert", "server-cert.pem", "--tls-key", "ca-cert.pem"], 1, "ca-cert.pem: no PEM private key"),
    (["--tls-cert", "server-cert.pem", "--tls-key", "client-key.pem"], 1,
     "client-key.pem: does not match the certificate"),
    (["--tls-cert", "server-cert.pem", "--tls-key", "server-key.pem", "--tls-ca", "server-key.pem"], 1,
     "server-key.pem: no PEM CA certificate"),
])
def test_cli_refuses_bad_tls_settings(pki, tmp_path, args, status, message):
    disk = make_raw(tmp_path / "disk.raw", MiB, {})
    work = pki.server.parent / "work"     # every certificate and key made by the pki fixture
    result = subprocess.run(nbdserve_command() + ["serve", "-p", "1", disk, *args], cwd=work,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == status, result.stderr
    assert result.stderr.startswith("nbdserve: error: ") and message in result.stderr
    assert result.stderr.count("\n") == 1 and result.stdout == ""
