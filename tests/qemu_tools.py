"""Helpers for testing the qcow2 engine against real qemu tools.

Every expected byte in the qcow2 tests comes from the scenario: a pattern the
test wrote with qemu-io, a raw reference file the test maintains, or what
``qemu-img convert -O raw`` gives.  Nothing here calls the engine except
:func:`read_all`, which is how a test reads what the engine returns.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path


# a missing tool fails the test that runs it (scripts/test installs qemu-utils): no skips
QEMU_IMG = "qemu-img"
QEMU_IO = "qemu-io"


def run(args: list[str], *, cwd: str | os.PathLike[str] | None = None, check: bool = True,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure show its output in the assertion."""
    p = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {p.returncode}\n"
                             f"stdout: {p.stdout}\nstderr: {p.stderr}")
    return p


def qemu_img(*args, cwd=None, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run([QEMU_IMG, *args], cwd=cwd, check=check)


def create(path, size: int | str, *, cwd=None, backing: str | None = None,
           backing_fmt: str | None = None, **options) -> str:
    """``qemu-img create -f qcow2 -o k=v,...`` (options: compat, cluster_size, refcount_bits,
    lazy_refcounts, extended_l2, compression_type); returns the path."""
    args = ["create", "-q", "-f", "qcow2"]
    opts = [f"{k}={v}" for k, v in options.items()]
    if opts:
        args += ["-o", ",".join(opts)]
    if backing is not None:
        args += ["-b", backing, "-F", backing_fmt or "qcow2"]
    qemu_img(*args, str(path), str(size), cwd=cwd)
    return str(path)


def qemu_io(path, *commands: str, fmt: str = "qcow2", check: bool = True) -> str:
    """Run qemu-io commands on an image; qemu-io exits 0 even when a command fails,
    so its output is checked for failures too (unless check=False)."""
    args = [QEMU_IO, "-f", fmt]
    for c in commands:
        args += ["-c", c]
    p = run(args + [str(path)], check=check)
    out = p.stdout + p.stderr
    if check:
        bad = [ln for ln in out.splitlines() if "fail" in ln.lower() or "error" in ln.lower()
               or "Pattern verification" in ln]
        assert not bad, f"qemu-io {commands} on {path}: {out}"
    return out


def convert_raw(path, tmpdir) -> bytes:
    """The guest view of ``path`` according to ``qemu-img convert -O raw``."""
    out = Path(tmpdir) / f"convert-{os.getpid()}-{random.getrandbits(32):08x}.raw"
    qemu_img("convert", "-U", "-O", "raw", str(path), str(out))   # -U: the engine may hold it open
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def check(path) -> str:
    """``qemu-img check`` must exit 0 (no corruption, no leaks)."""
    return qemu_img("check", str(path)).stdout


def check_no_corruption(path) -> dict:
    """``qemu-img check`` after a crash or an I/O error: exit 0, or 3 for leaked clusters only
    (harmless), and no corruption; returns its JSON report (``leaks`` absent when 0)."""
    p = run([QEMU_IMG, "check", "--output=json", str(path)], check=False)
    assert p.returncode in (0, 3), f"qemu-img check {path} exited {p.returncode}: {p.stdout}{p.stderr}"
    report = json.loads(p.stdout)
    assert report.get("corruptions", 0) == 0 and report.get("check-errors", 0) == 0, report
    return report


def compare(path, raw_reference) -> None:
    """``qemu-img compare -f qcow2 -F raw`` must say identical, and the sizes must agree
    (compare alone lets a longer image pass when its extra part reads zeros)."""
    assert info(path)["virtual-size"] == os.path.getsize(raw_reference)
    qemu_img("compare", "-U", "-f", "qcow2", "-F", "raw", str(path), str(raw_reference))


def qemu_map(path) -> list[dict]:
    return json.loads(qemu_img("map", "-U", "--output=json", str(path)).stdout)


def info(path) -> dict:
    return json.loads(qemu_img("info", "-U", "--output=json", str(path)).stdout)


def shape_ids(shapes) -> list[str]:
    """Test ids for (compat, cluster size, refcount bits, extra options) tuples."""
    return [f"v{'2' if c == '0.10' else '3'}-{cs}-rc{rb}{'-' + '-'.join(e) if e else ''}"
            for c, cs, rb, e, *_ in shapes]


def pattern(seed: int, n: int) -> bytes:
    """Reproducible random bytes (never all-zero for n >= 16)."""
    return random.Random(seed).randbytes(n)


async def read_all(img, chunk: int = 4 << 20) -> bytes:
    """The whole guest view as the engine returns it."""
    out = bytearray()
    pos = 0
    while pos < img.size:
        n = min(chunk, img.size - pos)
        out += await img.pread(pos, n)
        pos += n
    return bytes(out)


class RawReference:
    """A raw file kept in step with what a test writes to an image."""

    def __init__(self, path, size: int, initial: bytes | None = None):
        self.path = Path(path)
        self.size = size
        data = initial if initial is not None else bytes(size)
        assert len(data) == size
        self.path.write_bytes(data)

    def write(self, offset: int, data: bytes) -> None:
        with open(self.path, "r+b") as f:
            f.seek(offset)
            f.write(data)

    def read(self) -> bytes:
        return self.path.read_bytes()
