"""run_server: open the exports, listen, serve, and shut down gracefully."""

from __future__ import annotations

import functools
import logging
import os
import signal
import socket
import stat
import sys
import threading

import trio

from ..logline import OneLineFormatter
from ..nbd import ExportCatalog, TlsMode
from .commands import CONNECTION_REFUSALS, Refusals
from .control import Control, release_breakpoints
from .exports import Export, open_export
from .session import Session
from .settings import ServerSettings
from .tls import server_context

log = logging.getLogger("nbdserve.server")
SHUTDOWN_GRACE = 10.0     # seconds in-flight requests get to finish


def _ensure_logging() -> None:
    """One line per event on stderr, unless the application configured logging."""
    base = logging.getLogger("nbdserve")
    if not base.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(OneLineFormatter())
        base.addHandler(handler)
        base.setLevel(logging.INFO)


async def _unix_listener(path: str, mode: int | None = None) -> trio.SocketListener:
    """Listen on a Unix socket at ``path``; a stale socket there from an earlier run is replaced
    (it may vanish meanwhile: qemu-iotests remove it while the old server is still exiting)."""
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(path)
    except OSError as e:
        sock.close()
        raise OSError(e.errno, e.strerror, path) from None
    if mode is not None:
        os.chmod(path, mode)
    sock.listen(128)
    return trio.SocketListener(sock)


def _identity(path: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file at ``path``, None when there is none."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _remove_our_socket(path: str, ours: tuple[int, int] | None) -> None:
    """Remove the socket file at ``path`` if it is still ``ours`` (its identity when bound): a
    server started since on the same path (while this one was exiting) keeps its own."""
    if ours is not None and _identity(path) == ours:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


async def _open_listeners(settings: ServerSettings) -> tuple[list[trio.SocketListener], list]:
    listeners, bound = [], []
    for fd in settings.listen_fds:   # sd_listen_fds(3): already bound and listening
        sock = trio.socket.from_stdlib_socket(socket.socket(fileno=fd))   # family from the fd
        listeners.append(trio.SocketListener(sock))
        name = sock.getsockname()
        bound.append(name[:2] if isinstance(name, tuple) else name)
    if settings.bind is not None:
        for listener in await trio.open_tcp_listeners(settings.port, host=settings.bind or None):
            listeners.append(listener)
            bound.append(listener.socket.getsockname()[:2])
    if settings.unix_socket:
        listeners.append(await _unix_listener(settings.unix_socket))
        bound.append(settings.unix_socket)
    if not listeners:
        raise ValueError("nothing to listen on: no bind address and no unix socket")
    return listeners, bound


def _peer_name(stream) -> str:
    try:
        peer = stream.socket.getpeername()
    except OSError:
        return "?"
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"


class _Server:
    def __init__(self, settings: ServerSettings, exports: dict[str, Export], stop: trio.Event):
        self.settings, self.exports, self.stop = settings, exports, stop
        self.catalog = ExportCatalog([e.info for e in exports.values()])
        tls = settings.tls
        self.tls_mode = TlsMode(tls.mode) if tls is not None else TlsMode.OFF
        self.tls_context = server_context(tls) if self.tls_mode is not TlsMode.OFF else None
        self.sessions: set[Session] = set()
        self.left = trio.Event()    # set (and replaced) whenever a session ends

    async def handle(self, stream) -> None:
        peer = _peer_name(stream)
        while len(self.sessions) >= self.settings.max_connections:
            if not self.settings.queue_when_full:
                log.warning("%s: refused, %d connections open", peer, len(self.sessions))
                await trio.aclose_forcefully(stream)
                return
            await self.left.wait()   # qemu-nbd -e N: the client waits until one leaves
            if self.stop.is_set():
                await trio.aclose_forcefully(stream)
                return
        log.info("%s: connected", peer)
        session = Session(stream, peer, self.exports, self.catalog, self.settings.handshake_timeout,
                          self.settings.verbose, self.tls_mode, self.tls_context,
                          extended_headers=self.settings.extended_headers)
        self.sessions.add(session)
        refusals = Refusals()
        CONNECTION_REFUSALS.set(refusals)   # this task's context, copied into its request tasks
        try:
            await session.run()
        finally:
            self.sessions.discard(session)
            self.left.set()
            self.left = trio.Event()
            if refusals.count:
                log.warning("%s: %s", peer, refusals.summary())
            # qemu-nbd.c nbd_client_closed(): without -t, the last negotiated client's exit ends it
            if session.negotiated and not self.sessions and not self.settings.persistent:
                log.info("last client left, shutting down (not persistent)")
                self.stop.set()


async def _wait_for_signal(stop: trio.Event) -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s, shutting down", signal.Signals(signum).name)
            stop.set()
            return


async def run_server(settings: ServerSettings, *, task_status=trio.TASK_STATUS_IGNORED,
                     shutdown: trio.Event | None = None) -> None:
    """Serve ``settings.exports`` until SIGTERM/SIGINT (or ``shutdown`` is set).

    Reports the bound (host, port) pairs / unix socket paths via task_status.
    Raises ImageError if an export cannot be opened, TlsSetupError if the TLS files are unusable."""
    _ensure_logging()
    stop = shutdown if shutdown is not None else trio.Event()
    exports: dict[str, Export] = {}
    listening = False
    try:
        for export_settings in settings.exports:
            exports[export_settings.name] = await open_export(export_settings)
            log.debug("export %r: %s (%d bytes, flags %#x)", export_settings.name, export_settings.image,
                     exports[export_settings.name].info.size, exports[export_settings.name].info.flags)
        server = _Server(settings, exports, stop)
        listeners, bound = await _open_listeners(settings)
        ours = {settings.unix_socket: _identity(settings.unix_socket)} if settings.unix_socket else {}
        # the control socket (owner only: it can stop and fail requests); its clients end at shutdown
        control = [await _unix_listener(settings.control, 0o600)] if settings.control else []
        if settings.control:
            ours[settings.control] = _identity(settings.control)
        async with trio.open_nursery() as outer:
            outer.start_soon(_wait_for_signal, stop)
            async with trio.open_nursery() as connections:
                async with trio.open_nursery() as accepting:
                    accepting.start_soon(functools.partial(trio.serve_listeners, server.handle, listeners,
                                                            handler_nursery=connections))
                    if control:
                        accepting.start_soon(trio.serve_listeners, Control(exports).handle, control)
                        log.info("control socket %s", settings.control)
                    log.info("listening on %s", ", ".join(map(str, bound)))
                    listening = True
                    task_status.started(bound)
                    await stop.wait()
                    accepting.cancel_scope.cancel()
                for listener in listeners + control:
                    await listener.aclose()
                release_breakpoints(exports)   # suspended requests finish within the grace
                server.left.set()   # clients waiting for a free slot give up
                for session in list(server.sessions):
                    session.stop_reading()
                connections.cancel_scope.deadline = trio.current_time() + SHUTDOWN_GRACE
            outer.cancel_scope.cancel()
        for path, identity in ours.items():
            _remove_our_socket(path, identity)
    finally:
        with trio.CancelScope(shield=True):
            for name, export in exports.items():
                try:
                    await export.device.flush()
                except Exception:   # noqa: BLE001
                    log.exception("export %r: flush failed", name)
                try:   # closed even when the flush failed: the file and its image locks are released
                    await export.device.close()
                except Exception:   # noqa: BLE001
                    log.exception("export %r: close failed", name)
        if listening:
            log.info("stopped")
