"""TLS for NBD_OPT_STARTTLS: the server's ssl.SSLContext, and the upgrade of a stream.

qemu-nbd (--tls-creds) and nbdkit (--tls-certificates) use GnuTLS; this is Python's
ssl (OpenSSL) through trio.SSLStream.  proto.md: "TLS versions": 1.2 at least.
With a CA, the client must present a certificate that CA signed (like qemu's
tls-creds-x509 verify-peer=on, nbdkit --tls-verify-peer); with an identity too, its
subject must be that distinguished name (qemu's --tls-authz with authz-simple).
"""

from __future__ import annotations

import os
import ssl

import trio

from .settings import TlsSettings
from .x509_name import DerError, subject_dn


RECEIVE_SIZE = 64 * 1024


class TlsSetupError(ValueError):
    """A certificate, key or CA file is unusable; the message names the file."""


class TlsHandshakeError(Exception):
    """The client's TLS handshake failed; the message says why, in one line."""


def _refuse_encrypted_key() -> bytes:
    raise TlsSetupError("encrypted private keys are not supported")


def _readable(path: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise TlsSetupError(f"{path}: {e.strerror}") from None


class ServerContext(ssl.SSLContext):
    """An SSLContext and the one client identity it lets in (None: any the CA signed)."""

    allowed_identity: str | None = None


def server_context(tls: TlsSettings) -> ServerContext:
    """The SSLContext for ``tls``; TlsSetupError names the file at fault."""
    for path in (tls.cert, tls.key, tls.ca):
        if path is not None:
            _readable(path)
    context = ServerContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION
    try:   # parse the certificate alone first, so that a failure names the right file
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=tls.cert)
    except ssl.SSLError:
        raise TlsSetupError(f"{tls.cert}: no PEM certificate in it") from None
    try:
        context.load_cert_chain(tls.cert, tls.key, password=_refuse_encrypted_key)
    except TlsSetupError as e:
        raise TlsSetupError(f"{tls.key}: {e}") from None
    except ssl.SSLError as e:
        why = "does not match the certificate" if e.reason == "KEY_VALUES_MISMATCH" else "no PEM private key in it"
        raise TlsSetupError(f"{tls.key}: {why} ({os.path.basename(tls.cert)})") from None
    if tls.ca is not None:
        try:
            context.load_verify_locations(cafile=tls.ca)
        except ssl.SSLError:
            raise TlsSetupError(f"{tls.ca}: no PEM CA certificate in it") from None
        context.verify_mode = ssl.CERT_REQUIRED
        context.allowed_identity = tls.identity
    return context


def _failure(error: BaseException | None) -> str:
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"client certificate refused: {error.verify_message}"
    if isinstance(error, ssl.SSLError) and error.reason:
        return error.reason.lower().replace("_", " ")
    if error is None:
        return "connection lost"
    return str(error) or type(error).__name__


class TlsStream(trio.abc.Stream):
    """A trio.SSLStream as NBD wants it closed (proto.md: "Terminating the transmission
    phase": the server "MUST close down the TLS session ... and then close the TCP
    connection"): aclose() sends close_notify even when called from aclose_forcefully,
    for at most CLOSE_NOTIFY_SECONDS.  A peer that closes without close_notify reads as
    a plain EOF (the core still refuses an EOF in the middle of a message)."""

    CLOSE_NOTIFY_SECONDS = 1.0

    def __init__(self, ssl_stream: trio.SSLStream):
        self.ssl_stream = ssl_stream

    async def send_all(self, data) -> None:
        await self.ssl_stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.ssl_stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            return await self.ssl_stream.receive_some(max_bytes)
        except trio.BrokenResourceError as e:
            if isinstance(e.__cause__, ssl.SSLEOFError):
                return b""
            raise

    async def aclose(self) -> None:
        with trio.move_on_after(self.CLOSE_NOTIFY_SECONDS, shield=True):
            await self.ssl_stream.aclose()
        await trio.aclose_forcefully(self.ssl_stream.transport_stream)   # if the timeout cut it short

    def describe(self) -> str:
        """``TLSv1.3 TLS_AES_256_GCM_SHA384, client CN=...`` for the log."""
        text = f"{self.ssl_stream.version()} {self.ssl_stream.cipher()[0]}"
        rdns = (self.ssl_stream.getpeercert() or {}).get("subject", ())
        subject = dict(pair for rdn in rdns for pair in rdn)
        if "commonName" in subject:
            text += f", client CN={subject['commonName']}"
        return text


async def _hang_up(stream: trio.abc.HalfCloseableStream) -> None:
    """Half-close the connection and read what the client still sends until it closes
    (at most CLOSE_NOTIFY_SECONDS): it gets an EOF, not a reset, as from qemu-nbd."""
    with trio.move_on_after(TlsStream.CLOSE_NOTIFY_SECONDS):
        try:
            await stream.send_eof()
            while await stream.receive_some(RECEIVE_SIZE):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def start_tls(stream: trio.abc.Stream, context: ssl.SSLContext) -> TlsStream:
    """Run the server side of the TLS handshake on ``stream``; return the TLS stream."""
    ssl_stream = trio.SSLStream(stream, context, server_side=True)
    try:
        await ssl_stream.do_handshake()
    except trio.BrokenResourceError as e:
        raise TlsHandshakeError(_failure(e.__cause__)) from e
    allowed = getattr(context, "allowed_identity", None)
    if allowed is not None:   # qemu's qcrypto_tls_session_check_certificate, with authz-simple
        try:
            identity = subject_dn(ssl_stream.getpeercert(binary_form=True))
        except DerError as e:
            raise TlsHandshakeError(f"cannot get client distinguished name: {e}") from None
        if identity != allowed:
            await _hang_up(stream)
            raise TlsHandshakeError(f"TLS x509 authz check for {identity} is denied")
    return TlsStream(ssl_stream)
