"""The sans-IO NBD server connection (after h11's Connection): bytes in, events out.

    conn = ServerConnection(catalog)
    sock.send(conn.data_to_send())              # the greeting
    conn.receive_data(sock.recv())              # b"" means EOF
    event = conn.next_event()                   # an event or NEED_DATA
    sock.send(conn.data_to_send())              # option replies, during haggling
    sock.send(conn.send(SimpleReply(...)))      # replies, during transmission

With ``tls_mode`` ON or REQUIRE, ``next_event`` can return StartTLS: send
``data_to_send()``, wrap the socket in TLS, then ``conn.tls_started()`` and go on
feeding the decrypted bytes.
"""

from __future__ import annotations

from . import wire
from ._state import EOF_IS_CLEAN, TRANSMISSION, State, StateMachine, Trigger
from .constants import (EXTENDED_REQUEST_MAGIC, IHAVEOPT, REQUEST_MAGIC, ClientFlag, Command, CommandFlag,
                        Errno, HandshakeFlag, Option)
from .errors import LocalProtocolError, ProtocolError
from .events import NEED_DATA, Disconnect, Negotiated, Request, StartTLS
from .exports import ExportCatalog, ExportInfo
from .options import Negotiation, OptionOutcome, TlsMode
from .replies import ReplyEncoder
from .requests import RequestChecker

MAX_OPTION_LENGTH = 64 * 1024
_COMMANDS = {int(c): c for c in Command}
_FLAGS: dict[int, CommandFlag] = {}


def _command_flags(flags: int) -> CommandFlag:
    """CommandFlag(flags), memoised: building an IntFlag costs more than the rest of a request."""
    known = _FLAGS.get(flags)
    if known is None:
        known = CommandFlag(flags)
        if len(_FLAGS) < 1 << 16:   # 16-bit field: bounded anyway
            _FLAGS[flags] = known
    return known
SERVER_HANDSHAKE_FLAGS = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
# enum members read for every request, as module constants (Python 3.11 reads an enum
# member off its class through a descriptor, ~50 ns a time)
_WRITE, _DISC, _OK = Command.WRITE, Command.DISC, Errno.OK
_REQUEST_DONE, _WRITE_HEADER = Trigger.REQUEST_DONE, Trigger.WRITE_HEADER


HAND_OVER = 64 * 1024   # payloads this large leave the receive buffer without a copy (_take)

class ServerConnection:
    def __init__(self, catalog: ExportCatalog, *, max_option_length: int = MAX_OPTION_LENGTH,
                 tls_mode: TlsMode = TlsMode.OFF, extended_headers: bool = True):
        """``extended_headers`` False: NBD_OPT_EXTENDED_HEADERS is refused (NBD_REP_ERR_UNSUP)."""
        self._machine = StateMachine()
        self._negotiation = Negotiation(catalog, tls_mode=tls_mode, offer_extended_headers=extended_headers)
        self._request_header, self._request_magic = wire.REQUEST_HEADER, REQUEST_MAGIC
        self._max_option_length = max_option_length
        self._buffer = bytearray()
        self._eof = False
        self._outgoing = bytearray(wire.Greeting.build(dict(handshake_flags=SERVER_HANDSHAKE_FLAGS)))
        self._option = 0                 # option whose data is due or being discarded
        self._pending = 0                # bytes of that data / of a write payload
        self._write: tuple | None = None  # (cookie, flags, offset, length) of a write awaiting data
        self._closed: Disconnect | None = None
        self._error = ""
        self.export: ExportInfo | None = None
        self.negotiated: Negotiated | None = None
        self.replies: ReplyEncoder | None = None
        self._check: RequestChecker | None = None

    # -- introspection
    @property
    def state(self) -> State:
        return self._machine.state

    @property
    def tls_refused(self) -> bool:
        """An option was refused (or EXPORT_NAME closed) because TLS is required, and TLS never started."""
        return self._negotiation.tls_refused and not self._negotiation.tls

    @property
    def buffered_bytes(self) -> int:
        """Bytes received and not yet consumed (bounded; see MAX_OPTION_LENGTH)."""
        return len(self._buffer)

    # -- input
    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof:
            raise LocalProtocolError("receive_data after EOF")
        if self.state == State.TLS_UPGRADE:
            raise LocalProtocolError("receive_data during the TLS upgrade: call tls_started() first")
        if not data:
            self._eof = True
        elif self.state != State.CLOSED:   # proto.md: nothing may follow NBD_CMD_DISC; ignore it
            self._buffer += data

    def next_event(self):
        machine = self._machine
        if machine.state is State.ERROR:
            raise ProtocolError(self._error)
        try:
            while True:
                result = self._READERS[machine.state](self)
                if result is not None:
                    return result
        except ProtocolError as e:
            self._error = str(e)
            self._machine.fire(Trigger.PROTOCOL_ERROR)
            raise

    def tls_started(self) -> None:
        """The transport finished the TLS handshake that StartTLS asked for."""
        self._machine.fire(Trigger.TLS_STARTED)

    # -- output
    def data_to_send(self) -> bytes:
        """Handshake bytes queued so far (greeting, option replies)."""
        out = bytes(self._outgoing)
        self._outgoing.clear()
        return out

    def send(self, event) -> bytes:
        """Encode a reply event (transmission phase only)."""
        return b"".join(self.send_parts(event))

    def send_parts(self, event) -> list:
        """Like send(), as a list of buffers whose concatenation is the reply (no copy of read data)."""
        if self.replies is None or self._machine.state not in TRANSMISSION:
            raise LocalProtocolError(f"cannot send {type(event).__name__} in state {self.state.name}")
        return self.replies.encode_parts(event)

    # -- readers, one per state
    def _need(self, count: int):
        """NEED_DATA, or the end of the session if the peer has closed."""
        if not self._eof:
            return NEED_DATA
        if self.state in EOF_IS_CLEAN and not self._buffer:
            return self._close("eof")
        raise ProtocolError(f"connection closed with {count - len(self._buffer)} more bytes due")

    def _take(self, count: int) -> bytes | bytearray:
        buf = self._buffer
        if count >= HAND_OVER and len(buf) - count < count:
            # a large payload: the buffer itself becomes it, and only what follows is copied
            self._buffer = buf[count:]
            del buf[count:]
            return buf
        with memoryview(buf) as view, view[:count] as part:
            data = bytes(part)
        del buf[:count]
        return data

    def _discard(self) -> bool:
        """Drop up to ``_pending`` buffered bytes; True when all are gone."""
        n = min(self._pending, len(self._buffer))
        del self._buffer[:n]
        self._pending -= n
        return self._pending == 0

    def _close(self, reason: str) -> Disconnect:
        self._closed = Disconnect(reason)
        self._machine.fire(Trigger.CLOSE)
        return self._closed

    def _read_client_flags(self):
        if len(self._buffer) < 4:
            return self._need(4)
        flags = int.from_bytes(self._take(4), "big")
        unknown = flags & ~int(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES)
        if unknown:   # proto.md: "Client flags": the server MUST drop the connection
            raise ProtocolError(f"unknown client flags {unknown:#x}")
        self._negotiation.client_flags = ClientFlag(flags)
        self._machine.fire(Trigger.FLAGS_OK)

    def _read_option_header(self):
        if len(self._buffer) < wire.OPTION_REQUEST_HEADER.size:
            return self._need(wire.OPTION_REQUEST_HEADER.size)
        magic, option, length = wire.OPTION_REQUEST_HEADER.unpack(self._take(wire.OPTION_REQUEST_HEADER.size))
        if magic != IHAVEOPT:
            raise ProtocolError(f"bad option magic {magic:#x}")
        self._option, self._pending = option, length
        if length <= self._max_option_length:
            self._machine.fire(Trigger.OPTION_HEADER)
        elif option == Option.EXPORT_NAME:   # cannot be answered with an error
            raise ProtocolError(f"NBD_OPT_EXPORT_NAME of {length} bytes")
        else:
            self._machine.fire(Trigger.OPTION_TOO_BIG)

    def _discard_option(self):
        if not self._discard():
            return self._need(self._pending)
        self._outgoing += self._negotiation.too_big(self._option)
        self._machine.fire(Trigger.OPTION_DONE)

    def _read_option_payload(self):
        if len(self._buffer) < self._pending:
            return self._need(self._pending)
        outcome: OptionOutcome = self._negotiation.handle(self._option, self._take(self._pending))
        if outcome.start_tls and self._buffer:
            # The client must wait for the ACK before its TLS hello; bytes already here
            # would be read as plain text after the ACK (proto.md: "FORCEDTLS mode").
            raise ProtocolError(f"{len(self._buffer)} bytes sent after NBD_OPT_STARTTLS before its reply")
        self._outgoing += outcome.replies
        if outcome.close is not None:
            return self._close(outcome.close)
        if outcome.start_tls:
            self._machine.fire(Trigger.START_TLS)
            return StartTLS()
        if outcome.go is None:
            self._machine.fire(Trigger.OPTION_DONE)
            return None
        return self._enter_transmission(outcome.go)

    def _enter_transmission(self, export: ExportInfo) -> Negotiated:
        n = self._negotiation
        self.export = export
        self.negotiated = Negotiated(export=export, flags=n.export_flags(export),
                                     structured_replies=n.chunked_replies,
                                     meta_contexts=dict(n.meta_contexts), options=tuple(n.options_seen),
                                     tls=n.tls, extended_headers=n.extended_headers)
        self.replies = ReplyEncoder(n.chunked_replies, extended=n.extended_headers)
        self._check = RequestChecker(export, self.negotiated.flags, bool(self.negotiated.meta_contexts),
                                     n.extended_headers)
        if n.extended_headers:
            self._request_header, self._request_magic = wire.EXTENDED_REQUEST_HEADER, EXTENDED_REQUEST_MAGIC
        self._machine.fire(Trigger.GO)
        return self.negotiated

    def _read_request_header(self):
        header, buf = self._request_header, self._buffer
        if len(buf) < header.size:
            if len(buf) >= 4 and int.from_bytes(buf[:4], "big") != self._request_magic:
                # e.g. a 28-byte compact header under extended headers: fail now, not at the next one
                raise ProtocolError(f"bad request magic {int.from_bytes(buf[:4], 'big'):#x}")
            return self._need(header.size)
        magic, flags, command, cookie, offset, length = header.unpack_from(buf)
        del buf[:header.size]
        if magic != self._request_magic:
            raise ProtocolError(f"bad request magic {magic:#x}")
        if command == _DISC:
            return self._close("disc")
        # proto.md (extension-ext-header): with extended headers a payload follows iff
        # PAYLOAD_LEN is set, which NBD_CMD_WRITE "MUST use"; qemu (10.0) sends its writes
        # without it, and qemu's server reads a write's payload either way: so do we
        has_payload = command == _WRITE
        if header is not wire.REQUEST_HEADER:
            has_payload = has_payload or bool(flags & CommandFlag.PAYLOAD_LEN)
            if has_payload and length > self.export.max_block:
                # "SHOULD initiate hard disconnect" rather than read a payload that large
                raise ProtocolError(f"payload of {length} bytes above the maximum of {self.export.max_block}")
        error, reason = self._check(command, flags, offset, length)
        if has_payload:
            if error == _OK and command == _WRITE:
                self._write, self._pending = (cookie, flags, offset, length), length
                self._machine.fire(_WRITE_HEADER)
                # its payload is most often here already: take it now, not on the next round
                return self._read_write_payload() if len(buf) >= length else None
            self._pending = length   # proto.md: reply with the error, drop the data unbuffered
            self._machine.fire(Trigger.WRITE_REFUSED)
        else:
            self._machine.fire(_REQUEST_DONE)
        command = _COMMANDS.get(command, command)
        self.replies.expect(cookie, command, length, offset)
        return Request(cookie, command, _command_flags(flags), offset, length, None, error, reason)

    def _read_write_payload(self):
        if len(self._buffer) < self._pending:
            return self._need(self._pending)
        cookie, flags, offset, length = self._write
        data = self._take(length)
        self._write, self._pending = None, 0
        self._machine.fire(_REQUEST_DONE)
        self.replies.expect(cookie, _WRITE, length, offset)
        return Request(cookie, _WRITE, _command_flags(flags), offset, length, data)

    def _discard_write(self):
        if not self._discard():
            return self._need(self._pending)
        self._machine.fire(Trigger.REQUEST_DONE)

    def _read_tls_upgrade(self):
        return StartTLS()

    def _read_closed(self):
        return self._closed

    _READERS = {
        State.AWAIT_CLIENT_FLAGS: _read_client_flags,
        State.AWAIT_OPTION: _read_option_header,
        State.OPTION_PAYLOAD: _read_option_payload,
        State.OPTION_DISCARD: _discard_option,
        State.TLS_UPGRADE: _read_tls_upgrade,
        State.AWAIT_REQUEST: _read_request_header,
        State.WRITE_PAYLOAD: _read_write_payload,
        State.WRITE_DISCARD: _discard_write,
        State.CLOSED: _read_closed,
    }
