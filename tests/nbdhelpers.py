"""Helpers for the server tests: an in-process server on a free port, and real clients."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass

import trio

sys.path.append("/usr/lib/python3/dist-packages")   # Debian's python3-libnbd

from nbdserve.server.settings import ExportSettings, ServerSettings   # noqa: E402
from nbdserve.server import run_server                     # noqa: E402

MiB = 1 << 20


@dataclass
class Served:
    port: int
    config: ServerSettings

    def uri(self, name: str) -> str:
        return f"nbd://127.0.0.1:{self.port}/{name}"


def make_raw(path, size: int, regions: dict[int, bytes]) -> str:
    """A sparse raw file of ``size`` bytes with ``regions`` (offset -> bytes) written."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in regions.items():
            f.seek(offset)
            f.write(data)
    return str(path)


async def start_server(nursery, exports: list[ExportSettings], **options) -> Served:
    config = ServerSettings(exports=exports, bind="127.0.0.1", port=0, **options)
    bound = await nursery.start(run_server, config)
    return Served(port=bound[0][1], config=config)


async def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run a client; on failure the assertion shows its output."""
    result = await trio.run_process(list(args), capture_stdout=True, capture_stderr=True, check=False)
    if check:
        assert result.returncode == 0, (args, result.stdout.decode()[-2000:], result.stderr.decode()[-2000:])
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def libnbd_handle(uri: str, *contexts: str, strict: bool = True):
    """A connected libnbd handle (call from a worker thread)."""
    import nbd
    h = nbd.NBD()
    for context in contexts:
        h.add_meta_context(context)
    if not strict:
        h.set_strict_mode(0)
    h.connect_uri(uri)
    return h


def file_bytes(path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def same_files(a, b) -> bool:
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(MiB), fb.read(MiB)
            if x != y:
                return False
            if not x:
                return True
