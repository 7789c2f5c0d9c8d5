"""The top-level Dockerfile, built and run with podman (scripts/container-image).

The image is built once per module (the first build debootstraps the base image: about
1.5 minutes; later ones reuse podman's layer cache).  What the containers report is checked
against the scenarios themselves (DiskModel) and against images read on the host with
qemu-img, never against values read off nbdserve.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import subprocess
import time

import pytest

from conftest import REPO, SERVING_PREFIX, free_port
from nbdserve.reproduce import SCENARIOS
from nbdserve.reproduce.model import DiskModel, differing_ranges, parse_size, pattern_checks
from qemu_tools import check, convert_raw, create, info, qemu_io

pytestmark = pytest.mark.slow

IMAGE = "nbdserve"
K = 1024


@pytest.fixture(scope="module")
def podman() -> list[str]:
    """The podman command line scripts/container-image prints, once it has built IMAGE."""
    p = subprocess.run([str(REPO / "scripts" / "container-image")], capture_output=True,
                       text=True, timeout=1800, env={**os.environ, "NBDSERVE_IMAGE": IMAGE})
    assert p.returncode == 0, f"scripts/container-image exited {p.returncode}:\n{p.stderr[-4000:]}"
    return shlex.split(p.stdout.strip().splitlines()[-1])


def run(podman: list[str], *args: str, timeout: float = 300, check: bool = True):
    p = subprocess.run([*podman, *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert p.returncode == 0, f"podman {' '.join(args)} exited {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


# ------------------------------------------------- the default command: reproduce all
def _columns(block: str, label: str) -> list[str]:
    """The values of one row of a side-by-side table (``corrupted  no  YES``)."""
    for line in block.splitlines():
        if line.startswith(label + " "):
            return line[len(label):].split()
    raise AssertionError(f"no {label!r} row in:\n{block}")


GUEST_RUN = re.compile(r"^run \d+ allocator=(\S+) client=(\S+): (\S+); (\d+) files checked, (\d+) corrupted; "
                       r"qemu-img check: (\S+);", re.M)
PAIR = ("qemu-1.1.2", "qemu-1.1.2+b7ab0fea")     # reproduce's default A/B


def test_default_command_reproduces_every_scenario(podman):
    """``podman run nbdserve``'s command (``reproduce all``): every qemu-io scenario, then the
    guest through both client paths, each with both allocators of the A/B.  The guest here
    runs the synthetic workload, for CI's time: the Debian guest (the default workload, 2 to
    3 minutes a boot) is booted on the host by tests/test_guest.py."""
    config = json.loads(run(podman, "image", "inspect", IMAGE).stdout)[0]["Config"]
    assert config["Entrypoint"] == ["nbdserve"] and config["Cmd"] == ["reproduce", "all"]
    # two boots per allocator and path: the reproduction is a race with the guest's writeback
    # (20 of 20 runs corrupted on the host, README), so one boot could miss it by chance
    out = run(podman, "run", "--rm", IMAGE, *config["Cmd"], "--workload", "synthetic", "--runs", "2",
              timeout=1800).stdout
    blocks = {b.split("\nscenario ", 1)[1].split()[0]: b for b in out.split("\n\n") if "\nscenario " in b}
    assert sorted(blocks) == sorted(SCENARIOS), out
    for name, block in blocks.items():
        allocators = _columns(block, "allocator")
        corrupted = dict(zip(allocators, _columns(block, "corrupted")))
        assert corrupted == {"qemu-1.1.2": "YES", "qemu-1.1.2+b7ab0fea": "no"}, block
        verdicts = _columns(block, "qemu-img check")
        assert verdicts == ["clean", "clean"], block
    guest: dict[tuple[str, str], list[tuple]] = {}
    for m in GUEST_RUN.findall(out):
        guest.setdefault((m[0], m[1]), []).append(m[2:])
    assert sorted(guest) == sorted((a, c) for a in PAIR for c in ("virtio", "nbd-client")), out
    for (allocator, client), runs in guest.items():
        assert len(runs) == 2, (allocator, client, out)
        for state, checked, bad, verdict in runs:
            assert int(checked) > 50 and verdict == "clean", (allocator, client, out)
            if allocator == "qemu-1.1.2+b7ab0fea":
                assert state == "ok" and bad == "0", (client, out)
        if allocator == "qemu-1.1.2":
            assert any(state == "CORRUPTED" for state, *_ in runs), (client, out)


ALLOCATING_WRITE = ("write -P 0x77 0 480k", "aio_write -P 0x77 0 480k")   # keeps 5, allocates 2 (both scenarios)


def _commands(scenario) -> list[str]:
    """The scenario's qemu-io commands in order (its blkdebug commands go to the server)."""
    return [c for c in (*scenario.setup, *(c for inv in scenario.invocations for c in inv), *scenario.script)
            if c.split()[0] in ("write", "aio_write", "discard", "aio_flush", "flush")]


def _stale_tail(scenario, before: bytes) -> tuple[int, bytes]:
    """What the tail COW of the allocating write copies: the bytes from the write's end to its
    cluster's end as they were before that write, and where in a cluster they start.  qemu
    1.1.2 wrote them into the wrong host cluster (README)."""
    [command] = [c for c in _commands(scenario) if c in ALLOCATING_WRITE]
    argv = shlex.split(command)
    end = parse_size(argv[-2]) + parse_size(argv[-1])
    cluster_end = -(-end // scenario.cluster_size) * scenario.cluster_size
    return end % scenario.cluster_size, before[end:cluster_end]


def test_reproduce_images_as_qemu_img_reads_them(podman, tmp_path):
    """Each qemu-io scenario with --json --keep, its images kept on the host (TMPDIR is a
    volume) and read with the host's qemu-img."""
    kept = tmp_path / "kept"
    kept.mkdir()
    out = "".join(run(podman, "run", "--rm", "-v", f"{kept}:/kept", "-e", "TMPDIR=/kept", IMAGE,
                      "reproduce", name, "--json", "--keep").stdout for name in SCENARIOS)
    results = {(r["scenario"], r["allocator"]): r for r in map(json.loads, out.splitlines())}
    assert sorted(results) == sorted((s, a) for s in SCENARIOS for a in PAIR)
    for name, scenario in SCENARIOS.items():
        base = bytes([scenario.base_pattern]) * scenario.base_length
        model = DiskModel(base + bytes(scenario.size - len(base)), scenario.cluster_size)
        before = None
        for command in _commands(scenario):
            if command in ALLOCATING_WRITE:
                before = bytes(model.data)
            model.apply(command)
        expected = bytes(model.data)
        checks = pattern_checks(list(scenario.checks))
        for allocator in PAIR:
            r = results[name, allocator]
            top = kept / r["workdir"].removeprefix("/kept/") / "top.qcow2"
            check(top)                                 # the 1.1.2 bug corrupts data, not metadata
            actual = convert_raw(top, tmp_path)
            assert r["expected_md5"] == hashlib.md5(expected).hexdigest()
            assert r["actual_md5"] == hashlib.md5(actual).hexdigest()
            bad = [list(b) for b in differing_ranges(expected, actual)]
            assert r["bad_ranges"] == bad
            failed = {c["command"] for c in r["checks"] if not c["ok"]}
            if allocator == "qemu-1.1.2+b7ab0fea":
                assert actual == expected and not failed and not r["corrupted"], r
                continue
            assert r["corrupted"] and bad, r
            in_cluster, stale = _stale_tail(scenario, before)
            for offset, length in bad:
                assert offset % scenario.cluster_size == in_cluster, (name, bad)
                assert actual[offset:offset + length] == stale, (name, offset, length)
            # exactly the pattern reads that cover a corrupted range fail
            assert failed == {c.command for c in checks
                              if any(o < c.offset + c.length and c.offset < o + n for o, n in bad)}


# ------------------------------------------------------------------ serve an image
def _wait_serving(podman, name: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        logs = run(podman, "logs", name).stdout
        if SERVING_PREFIX in logs:
            return logs
        state = json.loads(run(podman, "inspect", name).stdout)[0]["State"]
        assert state["Running"], f"the container stopped: {state}\n{run(podman, 'logs', name)}"
        time.sleep(0.2)
    raise AssertionError(f"no {SERVING_PREFIX!r} line in {timeout} s")


def test_serve_a_backing_chain_through_a_published_port(podman, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    base = create(images / "base.qcow2", "64M")
    qemu_io(base, "write -P 0x11 0 2M", "write -P 0x22 5M 1M")
    top = create(images / "top.qcow2", "64M", cwd=images, backing="base.qcow2")
    qemu_io(top, "write -P 0x33 1M 128k", "write -P 0x44 2052k 60k")
    served = convert_raw(top, tmp_path)                # the chain as qemu reads it locally
    port = free_port()
    uri = f"nbd://127.0.0.1:{port}/top"
    name = f"nbdserve-test-{port}"
    try:
        run(podman, "run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:10809",
            "-v", f"{images}:/images", IMAGE, "serve", "-b", "0.0.0.0", "-x", "top", "/images/top.qcow2")
        _wait_serving(podman, name)
        nbd_info = json.loads(subprocess.run(["nbdinfo", "--json", uri], capture_output=True,
                                             text=True, check=True, timeout=60).stdout)
        assert nbd_info["exports"][0]["export-size"] == info(top)["virtual-size"]
        through_port = tmp_path / "through-port.raw"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(through_port)],
                       check=True, timeout=120)
        assert through_port.read_bytes() == served
        qemu_io(uri, "read -P 0x11 0 1M", "read -P 0x33 1M 128k", "read -P 0x44 2052k 60k",
                "read -P 0x22 5M 1M", fmt="raw")
        # an allocating write across clusters, over data of both layers
        qemu_io(uri, "write -P 0x5c 1000k 200k", "read -P 0x5c 1000k 200k", fmt="raw")
        run(podman, "stop", "-t", "20", name)
        state = json.loads(run(podman, "inspect", name).stdout)[0]["State"]
        assert state["ExitCode"] == 0, (state, run(podman, "logs", name).stderr)
    finally:
        run(podman, "rm", "-f", name, check=False)
    check(top)
    want = bytearray(served)
    want[1000 * K:1200 * K] = b"\x5c" * (200 * K)
    assert convert_raw(top, tmp_path) == bytes(want)
