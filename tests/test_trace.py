"""The allocation trace (``serve --trace FILE``, ``ctl trace on|off``, config key ``trace``).

qemu-iotests 047 over NBD with qemu-io, the numbers checked against what 047's own commands
and qemu 1.1.2's qcow2_alloc_cluster_offset() make of them (keep = the COPIED clusters the
first write left, new = the clusters up to the next COPIED one) and the host clusters
against ``qemu-img map`` of the file: never against the trace's own output.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import free_port, nbdserve_command
from qemu_tools import create, qemu_io, qemu_map
from test_control import ctl, ctl_ok, ctl_refused

K = 1024
CS = 64 * K
SECTORS = CS // 512
# qemu-iotests 047 before its last write, and that write
SETUP = ("write -P 0x66 0 320k", "write 320k 128k", "write -P 0x55 1M 128k",
         "write -P 0x88 448k 128k", "discard 320k 128k")
LAST = "write -P 0x77 0 480k"


def host_of(path, guest: int) -> int | None:
    """The host offset of guest byte ``guest`` in ``path`` itself (qemu-img map), or None."""
    for e in qemu_map(path):
        if e["start"] <= guest < e["start"] + e["length"] and e["data"] and e["depth"] == 0:
            return e["offset"] + guest - e["start"]
    return None


def make_pair(tmp_path) -> str:
    base = create(tmp_path / "base.qcow2", "16M")
    qemu_io(base, "write -P 0x11 0 2M")
    return create(tmp_path / "top.qcow2", "16M", backing="base.qcow2", backing_fmt="qcow2")


def records(path, event: str) -> list[dict]:
    with open(path) as f:
        return [r for r in map(json.loads, f) if r["event"] == event]


@pytest.mark.parametrize("allocator", ["qemu-1.1.2", "qemu-1.1.2+b7ab0fea"])
def test_iotest_047_traced_in_qemu_1_1_2_terms(nbdserve, tmp_path, allocator):
    top = make_pair(tmp_path)
    trace = tmp_path / "trace.jsonl"
    server = nbdserve("serve", top, "-x", "top", "--allocator", allocator, "--trace", trace)
    qemu_io(server.uri, *SETUP, fmt="raw")          # qemu-io's exit flushes: the file shows the map
    before = {g: host_of(top, g * CS) for g in range(0, 5)}
    qemu_io(server.uri, LAST, fmt="raw")
    assert server.stop() == 0

    # the 0x77 write: 5 COPIED clusters kept (the first write's), then 2 new ones up to the
    # COPIED cluster at 448K (the 0x88 write's), where the discarded 320K..448K were
    keep, new = 320 * K // CS, (448 - 320) * K // CS
    n_end = 480 * K // 512
    ours = [r for r in records(trace, "alloc") if r["guest_offset"] == 0 and r["keep_clusters"]]
    assert len(ours) == 1, records(trace, "alloc")
    a = ours[0]
    assert (a["keep_clusters"], a["nb_clusters"], a["n_start"], a["n_end"]) == (keep, new, 0, n_end)
    assert a["length"] == 480 * K
    assert a["kept_host_offset"] == before[0]
    assert a["host_offset"] == host_of(top, 320 * K) == before[4] + CS   # right after the kept ones
    assert a["requested_sectors"] == n_end - keep * SECTORS
    assert a["avail_sectors"] == (keep + new) * SECTORS
    assert a["avail_sectors_fixed"] == new * SECTORS
    K_, N_ = keep * SECTORS, new * SECTORS
    assert a["case_a"] is (K_ + N_ < n_end <= 2 * K_ + N_) is True      # the thread, Jan 22 2013
    assert a["head_cow"] is None
    if allocator == "qemu-1.1.2":
        # MIN(requested, avail) = requested: a tail COW from guest 480K to its cluster's end,
        # written 128K + 32K after the new clusters' start: into guest 1M's host cluster
        assert a["nb_available"] == n_end - keep * SECTORS
        t = a["tail_cow"]
        assert (t["guest_offset"], t["length"]) == (480 * K, 32 * K)
        assert t["host_offset"] == host_of(top, 1024 * K) + 32 * K
        assert t["host_offset"] not in range(a["host_offset"], a["host_offset"] + new * CS)
    else:
        assert a["nb_available"] == new * SECTORS and a["tail_cow"] is None
    # every other allocating round is cluster-aligned and keeps nothing: no case (a), no COW
    others = [r for r in records(trace, "alloc") if r["index"] != a["index"]]
    assert all(not r["case_a"] and r["head_cow"] is r["tail_cow"] is None for r in others)
    # the discard returned the two host clusters guest 320K..448K had
    freed = [(r["cause"], r["host_offset"], r["length"]) for r in records(trace, "free")]
    assert ("discard", a["host_offset"], CS) in freed and ("discard", a["host_offset"] + CS, CS) in freed


def test_trace_on_off_through_the_control_socket(nbdserve, tmp_path):
    top = make_pair(tmp_path)
    sock = tmp_path / "ctl.sock"
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    server = nbdserve("serve", top, "-x", "top", "--allocator", "qemu-1.1.2", "--control", sock)
    msg = ctl_refused(sock, "trace", "on")
    assert msg == ("nbdserve: error: ctl trace: export 'top' has no trace file: "
                   "give one (trace on FILE) or serve with --trace FILE")
    qemu_io(server.uri, "write -P 1 0 64k", fmt="raw")            # not traced
    ctl_ok(sock, "trace", "on", str(first))
    qemu_io(server.uri, "write -P 2 64k 4k", fmt="raw")           # head + tail COW from the backing file
    ctl_ok(sock, "trace", "off")
    qemu_io(server.uri, "write -P 3 128k 64k", fmt="raw")         # not traced
    ctl_ok(sock, "trace", "on", str(second))
    qemu_io(server.uri, "write -P 4 0 4k", fmt="raw")             # in place: a write, no allocation
    assert server.stop() == 0
    [a] = records(first, "alloc")
    assert (a["guest_offset"], a["length"], a["keep_clusters"], a["nb_clusters"]) == (64 * K, 4 * K, 0, 1)
    assert a["head_cow"] is None   # n_start = 0
    assert a["n_end"] == 8 and a["tail_cow"]["guest_offset"] == 68 * K and a["tail_cow"]["length"] == 60 * K
    assert a["tail_cow"]["host_offset"] == host_of(top, 68 * K)
    assert records(first, "write") == []
    assert records(second, "alloc") == []
    [w] = records(second, "write")
    assert (w["guest_offset"], w["length"], w["host_offset"]) == (0, 4 * K, host_of(top, 0))


def test_trace_refusals(nbdserve, tmp_path):
    raw = tmp_path / "disk.raw"
    raw.write_bytes(bytes(1 << 20))
    p = subprocess.run([*nbdserve_command(), "serve", str(raw), "-f", "raw", "-p", str(free_port()),
                        "--trace", str(tmp_path / "t.jsonl")], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    assert p.stderr == (f"nbdserve: error: {raw}: trace needs a qcow2 image "
                   "(a raw file has no cluster allocations to trace)\n")
    top = make_pair(tmp_path)
    sock = tmp_path / "ctl.sock"
    nbdserve("serve", top, "-x", "top", "--control", sock)
    assert ctl_refused(sock, "trace", "on", str(tmp_path / "no" / "such" / "t.jsonl")) == (
        f"nbdserve: error: ctl trace: export 'top': trace file {tmp_path}/no/such/t.jsonl: "
        "No such file or directory")
    p = ctl(sock, "trace", "maybe")
    assert p.returncode == 2 and "invalid choice" in p.stderr


def test_trace_config_key(tmp_path):
    from nbdserve.config import ConfigError, load_config
    conf = tmp_path / "n.toml"
    conf.write_text('[[export]]\nname = "a"\nimage = "a.qcow2"\ntrace = "t/a.jsonl"\n')
    assert load_config(conf).exports[0].trace == str(tmp_path / "t" / "a.jsonl")
    conf.write_text('[[export]]\nname = "a"\nimage = "a.qcow2"\ntrace = 3\n')
    with pytest.raises(ConfigError, match=r"export\[0\]\.trace"):
        load_config(conf)
