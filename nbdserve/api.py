"""nbdserve as a library: serve images from your own program or tests.

Trio code starts the server in a nursery and gets its URIs::

    serving = await nursery.start(nbdserve.serve, nbdserve.Export("disk.qcow2", name="disk"))
    ... serving.uri ...            # nbd://127.0.0.1:PORT/disk (port 0: any free port)
    serving.stop()                 # or cancel the nursery

Other code uses the synchronous context manager, which runs the same server in a thread::

    with nbdserve.Server("disk.qcow2", name="disk") as srv:
        h = nbd.NBD(); h.connect_uri(srv.uri)

Each export is plain values (``Export``); the server stops cleanly (flush, close) when
``stop()`` is called, the ``with`` block ends or the nursery is cancelled.  Unlike the
``nbdserve serve`` command, nothing process-wide is changed (no logging handlers, no
malloc settings); log records go to the ``nbdserve`` logger as usual.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from urllib.parse import quote

import trio

from .server.settings import ExportSettings, ServerSettings


@dataclass
class Export:
    """One export: the image file and how to serve it (the keys of a config file's [[export]])."""

    path: str
    name: str = ""
    format: str | None = None        # "qcow2" or "raw"; None: probed
    read_only: bool = False
    allocator: str = "fixed"         # "fixed", "qemu-1.1.2", "qemu-1.1.2+b7ab0fea"
    description: str = ""
    delays: dict[str, float] = field(default_factory=dict)   # blkdebug event -> seconds
    trace: str | None = None         # append the qcow2 allocation trace to this file (JSON lines)

    def settings(self) -> ExportSettings:
        """The server's own description of this export (server/settings.py)."""
        return ExportSettings(name=self.name, image=os.path.abspath(self.path), format=self.format,
                              read_only=self.read_only, allocator=self.allocator,
                              description=self.description, delays=dict(self.delays),
                              trace=os.path.abspath(self.trace) if self.trace is not None else None)


@dataclass
class Serving:
    """A running server: where it listens, and how to stop it."""

    exports: list[Export]
    host: str
    port: int
    _stop: trio.Event

    @property
    def uris(self) -> dict[str, str]:
        """Export name -> ``nbd://HOST:PORT/NAME``."""
        return {e.name: f"nbd://{self.host}:{self.port}/{quote(e.name, safe='')}" for e in self.exports}

    @property
    def uri(self) -> str:
        """The first export's URI."""
        return self.uris[self.exports[0].name]

    def stop(self) -> None:
        """Stop serving: clients are disconnected, images flushed and closed."""
        self._stop.set()


def _exports(path_or_exports, options: dict) -> list[Export]:
    if isinstance(path_or_exports, (str, os.PathLike)):
        return [Export(os.fspath(path_or_exports), **options)]
    if options:
        raise TypeError("export options go with a single path; give Export objects otherwise")
    exports = [e if isinstance(e, Export) else Export(os.fspath(e)) for e in path_or_exports]
    if not exports:
        raise ValueError("nothing to serve")
    return exports


async def serve(path_or_exports, *, host: str = "127.0.0.1", port: int = 0, control: str | None = None,
                handshake_timeout: float = 10.0, task_status=trio.TASK_STATUS_IGNORED, **options) -> None:
    """Serve one image (a path, with Export's keywords: ``name=``, ``format=``, ...) or a list
    of ``Export``s on ``host:port`` until stopped; ``nursery.start`` returns the ``Serving``.
    ``control``: also listen on this control socket (``nbdserve ctl``, nbdserve.control);
    ``handshake_timeout``: seconds a client gets to finish negotiating.
    A bad image raises (nbdserve.blockdev.images.ImageError, or the qcow2 engine's Qcow2Error)."""
    from .server import run_server

    exports = _exports(path_or_exports, options)
    stop = trio.Event()
    settings = ServerSettings(exports=[e.settings() for e in exports], bind=host, port=port,
                              control=os.path.abspath(control) if control is not None else None,
                              handshake_timeout=handshake_timeout)
    try:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(lambda task_status: run_server(settings, task_status=task_status,
                                                                        shutdown=stop))
            bound_host, bound_port = bound[0]
            task_status.started(Serving(exports, bound_host, bound_port, stop))
    except BaseExceptionGroup as group:
        raise _sole(group) from None


def _sole(group: BaseExceptionGroup) -> BaseException:
    """The one exception inside nested nursery groups (an image that cannot be opened), so the
    caller sees ImageError itself; the group when there are several."""
    while isinstance(group, BaseExceptionGroup) and len(group.exceptions) == 1:
        group = group.exceptions[0]
    return group


class Server:
    """``with Server(path_or_exports, ...) as srv:`` -- :func:`serve` in a thread of its own,
    for code that does not run Trio.  ``srv.uri`` / ``srv.uris`` as on :class:`Serving`."""

    def __init__(self, path_or_exports, *, host: str = "127.0.0.1", port: int = 0, **options):
        self._args = (path_or_exports,)
        self._kwargs = dict(host=host, port=port, **options)
        self._serving: Serving | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def _run(self, started: threading.Event) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            async with trio.open_nursery() as nursery:
                self._serving = await nursery.start(lambda task_status: serve(
                    *self._args, task_status=task_status, **self._kwargs))
                started.set()
        try:
            trio.run(main)
        except BaseException as e:   # reported by __enter__ (start-up) or __exit__
            self._error = _sole(e) if isinstance(e, BaseExceptionGroup) else e
        finally:
            started.set()

    def __enter__(self) -> Serving:
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), name="nbdserve", daemon=True)
        self._thread.start()
        started.wait()
        if self._serving is None:
            self._thread.join()
            raise self._error if self._error is not None else RuntimeError("nbdserve did not start")
        return self._serving

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self._thread is None:
            return
        if self._serving is not None and self._token is not None:
            try:
                trio.from_thread.run_sync(self._serving.stop, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        self._thread.join()
        self._thread = None
        if self._error is not None:
            raise self._error
