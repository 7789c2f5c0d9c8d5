"""Shared test helpers: free ports, a running ``nbdserve serve`` process, Debian's libnbd bindings.

    def test_x(nbdserve, tmp_path):
        disk = tmp_path / "disk.raw"; disk.write_bytes(bytes(1 << 20))
        proc = nbdserve("serve", "-f", "raw", "-x", "disk", str(disk))   # port picked for you
        subprocess.run(["nbdinfo", proc.uri], check=True)
    # at teardown: SIGTERM, and the exit status must be 0
"""

from __future__ import annotations

import os
import selectors
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SERVING_PREFIX = "nbdserve: serving "


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nbdserve_command() -> list[str]:
    """The installed ``nbdserve`` console script beside this interpreter (.venv/bin/nbdserve).

    ``NBDSERVE_COMMAND`` (split like a shell would) overrides it, e.g. to run the CLI tests
    against another build.
    """
    if os.environ.get("NBDSERVE_COMMAND"):
        return shlex.split(os.environ["NBDSERVE_COMMAND"])
    script = Path(sys.executable).parent / "nbdserve"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "nbdserve"]


def import_libnbd():
    """Debian's python3-libnbd (built for the system Python 3.11), importable from the venv."""
    dist = "/usr/lib/python3/dist-packages"
    if dist not in sys.path:
        sys.path.append(dist)
    try:
        import nbd
    except ImportError:   # scripts/test installs it: a missing one fails, never skips
        pytest.fail("python3-libnbd is not installed (apt-get install python3-libnbd)")
    return nbd


class NbdserveProcess:
    """``nbdserve ARGS...`` as a subprocess; :meth:`start` waits for its "serving" lines.

    ``uris`` holds every URI it printed, ``uri`` the first.  :meth:`stop` sends SIGTERM and
    returns the exit status.  Usable as a context manager (stop asserts exit 0 on leaving).
    """

    def __init__(self, *args: str, timeout: float = 20.0, cwd: str | os.PathLike[str] | None = None,
                 expected_uris: int | None = None):
        self.args = [str(a) for a in args]
        self.timeout = timeout
        self.cwd = cwd
        self.expected_uris = expected_uris
        self.proc: subprocess.Popen[str] | None = None
        self.uris: list[str] = []
        self.stdout_lines: list[str] = []
        self.stderr = ""

    @property
    def uri(self) -> str:
        return self.uris[0]

    def start(self) -> "NbdserveProcess":
        self.proc = subprocess.Popen(nbdserve_command() + self.args, cwd=self.cwd, text=True,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + self.timeout
        pending = b""
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while True:
                enough = self.uris and (self.expected_uris is None or len(self.uris) >= self.expected_uris)
                # Every URI is printed at once: after the first, wait briefly for the rest.
                left = 0.2 if enough and self.expected_uris is None else deadline - time.monotonic()
                if enough and self.expected_uris is not None:
                    return self
                if left <= 0:
                    self._fail(f"no serving line within {self.timeout} s")
                if not sel.select(timeout=left):
                    if enough:
                        return self
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    self._fail("exited before serving")
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for raw in lines:
                    line = raw.decode()
                    self.stdout_lines.append(line)
                    if line.startswith(SERVING_PREFIX):
                        self.uris.append(line[len(SERVING_PREFIX):].strip())

    def _fail(self, why: str):
        rc = self.stop(signal.SIGKILL)
        pytest.fail(f"nbdserve {' '.join(self.args)}: {why} (exit {rc})\n"
                    f"stdout: {self.stdout_lines}\nstderr: {self.stderr}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig``, wait for the exit, and return the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            self.stderr += err
            pytest.fail(f"nbdserve did not exit within {timeout} s of signal {sig}; stderr: {self.stderr}")
        self.stdout_lines += out.splitlines()
        self.stderr += err
        return self.proc.returncode

    def __enter__(self) -> "NbdserveProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            rc = self.stop()
            assert rc == 0, f"nbdserve exited {rc} on SIGTERM; stderr: {self.stderr}"


@pytest.fixture
def nbdserve():
    """Factory: ``nbdserve("serve", IMAGE, ...)`` starts a server (adds ``-p 0`` for
    ``serve IMAGE`` without -p/-k) and returns the started NbdserveProcess.  Every process
    still running at teardown gets SIGTERM and must exit 0."""
    procs: list[NbdserveProcess] = []

    def start(*args: str, **kwargs) -> NbdserveProcess:
        args = tuple(str(a) for a in args)
        if args[:1] == ("serve",) and "--config" not in args and not {"-p", "--port", "-k", "--socket"} & set(args):
            args += ("-p", "0")      # any free port: the serving line names it
        proc = NbdserveProcess(*args, **kwargs)
        procs.append(proc)
        return proc.start()

    yield start
    failures = []
    for proc in procs:
        if proc.proc is not None and proc.proc.poll() is None:
            rc = proc.stop()
            if rc != 0:
                failures.append(f"nbdserve {' '.join(proc.args)} exited {rc} on SIGTERM; stderr: {proc.stderr}")
    assert not failures, "\n".join(failures)
