"""NBD extended headers end to end, with Debian 13 (trixie) clients (slow).

Debian 12's clients predate NBD_OPT_EXTENDED_HEADERS; qemu 10.0 and libnbd 1.22 from trixie
negotiate them by default.  They run in the container `scripts/container-image
trixie-clients` builds (containers/trixie-clients/Dockerfile, a debootstrapped trixie base),
with the host's network, against nbdserve on the host's 127.0.0.1: once with extended
headers offered and once with the server refusing them (``extended_headers = false``), and
libnbd refusing them itself (``set_request_extended_headers(False)``).  What they see must
be the same in every case, and equal to what the host's Debian 12 clients (compact
headers) and qemu-img see; with extended headers, a single block status covers more than
4 GiB and a single write-zeroes zeroes 5 GiB."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, free_port

pytestmark = pytest.mark.slow

IMAGE = "nbdserve-trixie-clients"
GiB, MiB = 1 << 30, 1 << 20
BIG = 6 * GiB

# libnbd in the container: negotiation results, a whole-disk block status, a 5 GiB
# write-zeroes (in 2 GiB pieces without extended headers), a write and its read-back.
PROBE = r'''
import json, sys
import nbd
uri, request_ext, write = sys.argv[1], sys.argv[2] == "1", sys.argv[3] == "1"
h = nbd.NBD()
h.set_request_extended_headers(request_ext)
h.add_meta_context("base:allocation")
h.add_meta_context("qemu:dirty-bitmap:b0")
h.connect_uri(uri)
ext = h.get_extended_headers_negotiated()
out = {"extended": ext, "structured": h.get_structured_replies_negotiated()}
size = h.get_size()
limit = size if ext else (1 << 32) - 1
if write:
    pos, end = 1 << 20, (5 << 30) + (1 << 20)
    while pos < end:
        n = end - pos if ext else min(end - pos, 2 << 30)
        h.zero(n, pos)
        pos += n
    h.pwrite(b"\x5a" * 65536, 3 << 30)
out["read"] = h.pread(65536, 3 << 30) == b"\x5a" * 65536
maps = {"base:allocation": [], "qemu:dirty-bitmap:b0": []}
first_call = {}
def extent(metacontext, offset, entries, err):
    first_call.setdefault(metacontext, [tuple(e) for e in entries])
    m = maps[metacontext]
    for n, f in entries:
        if m and m[-1][1] == f:
            m[-1] = (m[-1][0] + n, f)
        else:
            m.append((n, f))
    return 0
done = 0
while done < size:
    h.block_status_64(min(limit, size - done), done, extent)
    done = min(sum(n for n, _ in maps["base:allocation"]), sum(n for n, _ in maps["qemu:dirty-bitmap:b0"]))
    for m in maps.values():   # keep both at the shorter one's end
        over = sum(n for n, _ in m) - done
        if over:
            m[-1] = (m[-1][0] - over, m[-1][1])
            if not m[-1][0]:
                m.pop()
out["maps"] = maps
out["first_call"] = first_call
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def podman() -> list[str]:
    p = subprocess.run([str(REPO / "scripts" / "container-image"), "trixie-clients"], capture_output=True,
                       text=True, timeout=1800, env={**os.environ, "NBDSERVE_IMAGE": IMAGE})
    assert p.returncode == 0, f"scripts/container-image trixie-clients exited {p.returncode}:\n{p.stderr[-4000:]}"
    return shlex.split(p.stdout.strip().splitlines()[-1])


def run(*args, check=True, timeout=300) -> subprocess.CompletedProcess:
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert p.returncode == 0, (args, p.returncode, p.stdout, p.stderr)
    return p


def trixie(podman, tmp: Path, *args, timeout=300) -> str:
    """A command in the trixie clients' container: the host's network, ``tmp`` at the same path."""
    return run(*podman, "run", "--rm", "--network", "host", "-v", f"{tmp}:{tmp}", IMAGE, *args,
               timeout=timeout).stdout


def start_server(tmp: Path, port: int, offered: bool) -> subprocess.Popen:
    config = tmp / "nbdserve.toml"
    config.write_text(f'[server]\nport = {port}\nextended_headers = {"true" if offered else "false"}\n'
                      '[[export]]\nname = "big"\nimage = "big.qcow2"\nbitmaps = ["b0"]\n'
                      '[[export]]\nname = "small"\nimage = "small.qcow2"\n')
    proc = subprocess.Popen([str(Path(sys.executable).parent / "nbdserve"), "serve", "--config", config],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("nbdserve: serving") and "/small" in line:
            return proc
    raise AssertionError(f"nbdserve did not start: {proc.stderr.read()}")


def dirty_runs(ranges, granularity=64 << 10) -> list[tuple[int, int]]:
    """The (length, flags) runs of a bitmap with exactly the granules of ``ranges`` set."""
    marks = sorted((o // granularity, -(-(o + n) // granularity)) for o, n in ranges)
    runs, pos = [], 0
    for a, b in marks:
        a, b = max(a * granularity, pos), min(b * granularity, BIG)
        if a > pos:
            runs.append((a - pos, 0))
        if b > a:
            if runs and runs[-1][1] == 1:
                runs[-1] = (runs[-1][0] + b - a, 1)
            else:
                runs.append((b - a, 1))
            pos = b
    if pos < BIG:
        runs.append((BIG - pos, 0))
    return runs


def nbdinfo_map(text: str) -> list[tuple[int, int, int]]:
    return [tuple(map(int, line.split()[:3])) for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("offered", [True, False], ids=["offered", "refused-by-server"])
def test_trixie_clients_with_and_without_extended_headers(podman, tmp_path, offered):
    big, small = tmp_path / "big.qcow2", tmp_path / "small.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", big, str(BIG))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", big)
    run("qemu-img", "bitmap", "--add", big, "b0")
    run("qemu-img", "create", "-q", "-f", "qcow2", small, "64M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x22 0 3M", small)
    (tmp_path / "probe.py").write_text(PROBE)
    up = tmp_path / "up.raw"
    with open(up, "wb") as f:
        f.truncate(64 * MiB)
        f.seek(7 * MiB)
        f.write(os.urandom(3 * MiB))
    port = free_port()
    server = start_server(tmp_path, port, offered)
    uri = f"nbd://127.0.0.1:{port}"
    try:
        # nbdinfo --json says what was negotiated
        info = json.loads(trixie(podman, tmp_path, "nbdinfo", "--json", f"{uri}/big"))
        assert info["extended"] is offered and info["structured"] is True, info
        assert "qemu:dirty-bitmap:b0" in info["exports"][0]["contexts"]
        # python3-libnbd: 64-bit zero and block status; and with the client refusing them
        probes = [json.loads(trixie(podman, tmp_path, "python3", tmp_path / "probe.py", f"{uri}/big", "1", "1"))]
        probes.append(json.loads(trixie(podman, tmp_path, "python3", tmp_path / "probe.py", f"{uri}/big", "0", "0")))
        assert [(p["extended"], p["structured"], p["read"]) for p in probes] == [(offered, True, True),
                                                                                  (False, True, True)]
        data_runs = [[MiB, 0], [3 * GiB - MiB, 3], [64 << 10, 0], [BIG - 3 * GiB - (64 << 10), 3]]
        want_bitmap = [list(r) for r in dirty_runs([(MiB, 5 * GiB), (3 * GiB, 64 << 10)])]
        for p in probes:
            assert p["maps"] == {"base:allocation": data_runs, "qemu:dirty-bitmap:b0": want_bitmap}, p
        if offered:   # one request, one reply per context, extents past 4 GiB
            first = probes[0]["first_call"]
            assert first["base:allocation"] == data_runs, first
            assert max(n for n, _ in first["qemu:dirty-bitmap:b0"]) > 1 << 32, first
        # nbdinfo --map (both contexts) from trixie equals the host's Debian 12 nbdinfo (compact headers)
        for context in ("base:allocation", "qemu:dirty-bitmap:b0"):
            theirs = nbdinfo_map(trixie(podman, tmp_path, "nbdinfo", f"--map={context}", f"{uri}/big"))
            ours = nbdinfo_map(run("nbdinfo", f"--map={context}", f"{uri}/big").stdout)
            assert theirs == ours and [[n, f] for _, n, f in theirs] == (
                data_runs if context == "base:allocation" else want_bitmap), (context, theirs, ours)
        # qemu-io and qemu-img 10.0
        out = trixie(podman, tmp_path, "qemu-io", "-f", "raw", f"{uri}/small", "-c", "write -P 0x66 1M 64k",
                     "-c", "read -P 0x66 1M 64k", "-c", "write -z 2M 1M", "-c", "discard 4M 64k",
                     "-c", "read -P 0x22 0 1M")
        assert "Pattern verification failed" not in out and out.count("read 65536/65536") == 1, out
        theirs = json.loads(trixie(podman, tmp_path, "qemu-img", "map", "--output=json", f"{uri}/small"))
        ours = json.loads(run("qemu-img", "map", "--output=json", f"{uri}/small").stdout)
        assert [{k: v for k, v in e.items() if k != "compressed"} for e in theirs] == ours
        # nbdcopy down and up
        trixie(podman, tmp_path, "nbdcopy", f"{uri}/small", tmp_path / "down.raw")
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", tmp_path / "down.raw", f"{uri}/small")
        trixie(podman, tmp_path, "nbdcopy", up, f"{uri}/small")
    finally:
        server.terminate()
        _, err = server.communicate(timeout=60)
    assert server.returncode == 0, err
    # the server's view: every client that asked for extended headers got them iff offered
    asked = [m for m in re.findall(r"extended headers (True|False), contexts .*?, options (\S+)", err)
             if "EXTENDED_HEADERS" in m[1]]
    assert len(asked) >= 8 and {m[0] for m in asked} == {str(offered)}, err
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", up, small)
    for image in (big, small):
        run("qemu-img", "check", image)
    # the bitmap the trixie clients dirtied, stored at the clean close, as qemu-nbd reads it
    sock = tmp_path / "q.sock"
    run("qemu-nbd", "--fork", "-r", "-k", sock, "-f", "qcow2", "-B", "b0", big)
    stored = nbdinfo_map(run("nbdinfo", "--map=qemu:dirty-bitmap:b0", f"nbd+unix:///?socket={sock}").stdout)
    assert [[n, f] for _, n, f in stored] == want_bitmap
