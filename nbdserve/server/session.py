"""One client connection: handshake, then transmission.

Requests the device answers without waiting (BlockDevice.read_sparse_now / pwrite_now:
page-cache reads, writes in place) are answered by the reading loop itself; every other
request gets a task of its own.  Replies go through one ReplySender, so they never
interleave and several leave per system call.
"""

from __future__ import annotations

import logging

import trio

from ..nbd import NEED_DATA, Disconnect, Negotiated, ProtocolError, Request, ServerConnection, StartTLS, TlsMode
from .commands import execute, replies_now
from .exports import Export
from .inflight import InFlight, buffered_bytes
from .sender import HIGH_WATER, ReplySender
from .tls import TlsHandshakeError, start_tls

log = logging.getLogger("nbdserve.server")
RECEIVE_SIZE = 256 * 1024
REPLY_GRACE = 5.0            # seconds to send replies still queued when reading stops


class Session:
    def __init__(self, stream: trio.abc.Stream, peer: str, exports: dict[str, Export],
                 catalog, handshake_timeout: float, verbose: bool,
                 tls_mode: TlsMode = TlsMode.OFF, tls_context=None, *, extended_headers: bool = True):
        # ``stream`` becomes a tls.TlsStream once STARTTLS succeeds: use self.stream after the handshake.
        self.stream, self.peer = stream, peer
        self.tls_mode, self.tls_context = tls_mode, tls_context
        self.extended_headers = extended_headers
        self.exports, self.catalog = exports, catalog
        self.handshake_timeout, self.verbose = handshake_timeout, verbose
        self._stopping = False
        self.negotiated = False            # the handshake chose an export
        self._lost = False                 # "connection lost" logged (once per connection)
        self._reading: trio.CancelScope | None = None   # cancelled to stop taking requests

    def stop_reading(self) -> None:
        """Take no more requests (shutdown); those in flight still finish."""
        self._stopping = True
        if self._reading is not None:
            self._reading.cancel()

    def _reading_scope(self) -> trio.CancelScope:
        self._reading = trio.CancelScope()
        if self._stopping:
            self._reading.cancel()
        return self._reading

    async def run(self) -> None:
        """Serve the connection; never raises (except Cancelled)."""
        try:
            negotiated, conn = await self._handshake()
            if negotiated is not None:
                self.negotiated = True
                await self._transmission(conn, negotiated)
        except ProtocolError as e:
            log.warning("%s: protocol error: %s", self.peer, e)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            self._log_lost(e)
        except Exception:   # noqa: BLE001 - a broken client or handler must not stop the server
            log.exception("%s: connection failed", self.peer)
        finally:
            await trio.aclose_forcefully(self.stream)
            log.info("%s: disconnected", self.peer)

    async def _handshake(self) -> tuple[Negotiated | None, ServerConnection | None]:
        conn = ServerConnection(self.catalog, tls_mode=self.tls_mode, extended_headers=self.extended_headers)
        with self._reading_scope(), trio.move_on_after(self.handshake_timeout):
            while True:
                event = conn.next_event()
                out = conn.data_to_send()
                if out:
                    await self.stream.send_all(out)
                if event is NEED_DATA:
                    conn.receive_data(await self.stream.receive_some(RECEIVE_SIZE))
                elif isinstance(event, StartTLS):   # the ACK went out in the clear just above
                    try:
                        self.stream = await start_tls(self.stream, self.tls_context)
                    except TlsHandshakeError as e:
                        log.warning("%s: TLS handshake failed: %s", self.peer, e)
                        return None, None
                    log.info("%s: TLS started: %s", self.peer, self.stream.describe())
                    conn.tls_started()
                elif isinstance(event, Disconnect):
                    if conn.tls_refused:
                        log.warning("%s: refused, TLS is required; closed during handshake (%s)",
                                    self.peer, event.reason)
                    else:
                        log.info("%s: closed during handshake (%s)", self.peer, event.reason)
                    return None, None
                else:
                    log.info("%s: export %r, flags %#x, structured replies %s, extended headers %s, "
                             "contexts %s, options %s%s",
                             self.peer, event.export.name, event.flags, event.structured_replies,
                             event.extended_headers,
                             sorted(event.meta_contexts.values()), ",".join(event.options),
                             ", over TLS" if event.tls else "")
                    return event, conn
        if not self._stopping:
            log.warning("%s: handshake timed out after %s s", self.peer, self.handshake_timeout)
        return None, None

    async def _transmission(self, conn: ServerConnection, negotiated: Negotiated) -> None:
        export = self.exports[negotiated.export.name]
        device, structured = export.device, negotiated.structured_replies
        in_flight = InFlight()
        sender = ReplySender(self.stream)
        file_slices = sender.takes_file_slices

        async def send(event) -> None:
            sender.queue(conn.send_parts(event))
            await sender.send()

        async def run_request(request: Request) -> None:
            try:
                await execute(request, device, structured, negotiated.meta_contexts, send, export.bitmaps)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                self._log_lost(e)   # the client is gone
                nursery.cancel_scope.cancel()
            except Exception:   # noqa: BLE001
                log.exception("%s: request %r failed", self.peer, request)
                nursery.cancel_scope.cancel()
            finally:
                in_flight.done(buffered_bytes(request))

        def answer_now(request: Request) -> bool:
            """Reads the page cache serves and writes in place are answered here, without a
            task; their replies leave with the next send (several per system call)."""
            replies = replies_now(request, device, structured, file_slices)
            if replies is None:
                return False
            for reply in replies:
                sender.queue(conn.send_parts(reply))
            return True

        try:
            async with trio.open_nursery() as nursery:
                try:
                    with self._reading_scope():
                        reason = await self._read_requests(conn, in_flight, sender, answer_now,
                                                           lambda r: nursery.start_soon(run_request, r))
                        log.info("%s: %s", self.peer, reason)
                except ProtocolError as e:
                    log.warning("%s: dropping connection: %s", self.peer, e)
                    nursery.cancel_scope.cancel()
                except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                    self._log_lost(e)
                    nursery.cancel_scope.cancel()
            if sender.queued and not self._lost:   # answered inline when reading stopped (shutdown)
                with trio.CancelScope(shield=True), trio.move_on_after(REPLY_GRACE):
                    await sender.send()
        finally:
            sender.close()   # its duplicate of the socket

    def _log_lost(self, exc: BaseException) -> None:
        """One line when the client is found gone, by whichever task finds it first."""
        if not self._lost:
            self._lost = True
            log.info("%s: connection lost: %s", self.peer, exc or type(exc).__name__)

    async def _read_requests(self, conn, in_flight, sender, answer_now, spawn) -> str:
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                if sender.queued:   # answer what this receive asked before waiting for more
                    await sender.send()
                conn.receive_data(await self.stream.receive_some(RECEIVE_SIZE))
            elif isinstance(event, Disconnect):
                if sender.queued:
                    await sender.send()
                return {"disc": "NBD_CMD_DISC", "eof": "client closed without NBD_CMD_DISC"}.get(
                    event.reason, event.reason)
            else:
                if self.verbose:
                    log.debug("%s: %s cookie=%#x flags=%#x offset=%d length=%d%s", self.peer,
                             getattr(event.command, "name", event.command), event.cookie, event.flags,
                             event.offset, event.length, f" error={event.error.name}" if event.error else "")
                if answer_now(event):
                    if sender.queued > HIGH_WATER:
                        await sender.send()
                    continue
                await in_flight.admit(buffered_bytes(event))
                spawn(event)
