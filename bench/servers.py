"""The servers measured side by side: nbdserve, qemu-nbd and nbdkit, each started on a free port."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from common import EXPORT, REPO, free_port, run

class Server:
    """One server process serving one image on 127.0.0.1:port/EXPORT."""

    name = "?"

    def __init__(self, image: Path, read_only: bool = False, shared: int | None = None,
                 tls_dir: Path | None = None):
        """shared: qemu-nbd -e (None: its default, 1 client at a time); tls_dir: a folder with
        ca-cert.pem, server-cert.pem, server-key.pem (x509 TLS required, clients verified)."""
        self.image = image
        self.read_only = read_only
        self.shared = shared
        self.tls_dir = tls_dir
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0
        self.ready_at = 0.0

    @property
    def uri(self) -> str:
        return f"{'nbds' if self.tls_dir else 'nbd'}://127.0.0.1:{self.port}/{EXPORT}"

    def argv(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> "Server":
        self.started_at = time.perf_counter()
        # stderr to a file: a server logging every connection must never block on a full pipe
        self.stderr = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(self.argv(), stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        self.wait_ready()
        self.ready_at = time.perf_counter()
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        # Poll with a plain TCP connect (a negotiation-less connection is harmless).
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.error_output()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"{self.name} did not listen within {timeout}s")

    def error_output(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()[-2000:]

    def cpu_seconds(self) -> float:
        """utime + stime of the server process so far, all its threads (/proc/PID/stat)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")   # fields 14, 15

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class NbdServe(Server):
    name = "nbdserve"

    def argv(self):
        a = [str(REPO / ".venv/bin/nbdserve"), "serve", "-f", "qcow2", "-x", EXPORT,
             "-p", str(self.port), "-b", "127.0.0.1"]
        if self.read_only:
            a.append("-r")
        if self.tls_dir:
            a += ["--tls-cert", str(self.tls_dir / "server-cert.pem"),
                  "--tls-key", str(self.tls_dir / "server-key.pem"),
                  "--tls-ca", str(self.tls_dir / "ca-cert.pem")]
        return a + [str(self.image)]

    def wait_ready(self, timeout: float = 20.0) -> None:
        # nbdserve prints "nbdserve: serving nbd://..." once it listens.
        line = self.proc.stdout.readline()
        if "serving" not in line:
            self.proc.wait(timeout=5)
            raise RuntimeError(f"nbdserve did not start: {line!r} {self.error_output()}")

    def status(self) -> dict[str, int]:
        """VmHWM / VmRSS of the server process in KiB."""
        out = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, val = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(val.split()[0])
        return out


class QemuNbd(Server):
    name = "qemu-nbd"

    def argv(self):
        a = ["qemu-nbd", "-f", "qcow2", "-x", EXPORT, "-p", str(self.port),
             "-b", "127.0.0.1", "-t"]
        if self.read_only:
            a.append("-r")
        if self.shared is not None:
            a += ["-e", str(self.shared)]
        if self.tls_dir:   # verify-peer defaults to yes: clients need a certificate, as with --tls-ca
            a += ["--object", f"tls-creds-x509,id=tls0,dir={self.tls_dir},endpoint=server",
                  "--tls-creds", "tls0"]
        return a + [str(self.image)]


class NbdKit(Server):
    name = "nbdkit"

    def argv(self):
        return ["nbdkit", "-f", "-r", "-i", "127.0.0.1", "-p", str(self.port),
                "-e", EXPORT, "--filter=qcow2dec", "file", str(self.image)]


def nbdkit_note(image: Path) -> str | None:
    """None if nbdkit can serve this qcow2 (qcow2dec filter), else why not."""
    if not shutil.which("nbdkit"):
        return "nbdkit not installed"
    try:
        with NbdKit(image, read_only=True) as s:
            run(["qemu-io", "-f", "raw", s.uri, "-c", "read -P 0x5a 0 64k"], timeout=20)
    except Exception as e:  # noqa: BLE001 - any failure means "skip nbdkit"
        ver = subprocess.run(["nbdkit", "--version"], capture_output=True, text=True).stdout.strip()
        if "cannot open filter" in str(e):
            return f"{ver} has no qcow2dec filter, so it cannot serve qcow2 here"
        return f"{ver} --filter=qcow2dec failed: {str(e).strip()[:200]}"
    return None
