"""``nbdserve reproduce``'s culprits: each bad range mapped to the host cluster holding it
(``qemu-img map`` of the overlay) and to the allocation, and its COW, that wrote there last.

The expectations come from the scenarios' commands: in 047 and in Kevin's race the
``write -P 0x77 0 480k`` keeps the 5 clusters of ``write -P 0x66 0 320k`` and allocates the
2 discarded ones (up to the COPIED cluster of ``write -P 0x88 448k 128k``); n_end is 480K.
"""

from __future__ import annotations

import json
import subprocess
import sys

from nbdserve.reproduce import SCENARIOS
from nbdserve.reproduce.runner import run_scenario

K = 1024
CS = 64 * K
KEEP, NEW = 320 * K // CS, (448 - 320) * K // CS
N_END = 480 * K // 512                       # sectors
# issue 17: the allocation objects' keys, exactly
ALLOCATION_KEYS = ("guest_offset", "n_start", "n_end", "keep_clusters", "nb_clusters", "host_offset",
                   "avail_sectors", "avail_sectors_fixed", "nb_available", "head_cow", "tail_cow", "case_a")
CASE_A = KEEP * 128 + NEW * 128 < N_END <= 2 * KEEP * 128 + NEW * 128   # the thread, Jan 22 2013


def host_of(result, guest: int) -> int:
    """From qemu-img map --output=json of the run's overlay."""
    [e] = [e for e in result.host_map if e["start"] <= guest < e["start"] + e["length"]]
    assert e["data"] and e["depth"] == 0
    return e["offset"] + guest - e["start"]


def the_0x77_write(result) -> int:
    """Index of the allocation of ``write -P 0x77 0 480k``: the one at guest 0 that keeps clusters."""
    [i] = [i for i, a in enumerate(result.allocations) if a["guest_offset"] == 0 and a["keep_clusters"]]
    return i


async def test_iotest_047_culprit_is_the_stale_tail_cow():
    scenario = SCENARIOS["iotest-047"]
    buggy = await run_scenario(scenario, "qemu-1.1.2")
    fixed = await run_scenario(scenario, "qemu-1.1.2+b7ab0fea")
    assert CASE_A
    for r in (buggy, fixed):
        assert all(set(a) == set(ALLOCATION_KEYS) for a in r.allocations)
        i = the_0x77_write(r)
        a = r.allocations[i]
        assert (a["keep_clusters"], a["nb_clusters"], a["n_end"], a["case_a"]) == (KEEP, NEW, N_END, True)
        # exactly that allocation is in case (a)
        assert [j for j, x in enumerate(r.allocations) if x["case_a"]] == [i]
        assert a["host_offset"] == host_of(r, 320 * K)
    a = buggy.allocations[the_0x77_write(buggy)]
    host_1m = host_of(buggy, 1024 * K)
    assert a["tail_cow"] == {"guest_offset": 480 * K, "host_offset": host_1m + 32 * K, "length": 32 * K}
    assert fixed.allocations[the_0x77_write(fixed)]["tail_cow"] is None
    assert fixed.culprits == [] and fixed.bad_ranges == []
    # the one culprit: guest 1M+32K (its bytes from the model), in guest 1M's host cluster
    assert buggy.bad_ranges == [[1024 * K + 32 * K, 32 * K]]
    assert buggy.culprits == [{"guest_offset": 1024 * K + 32 * K, "length": 32 * K,
                               "allocation": the_0x77_write(buggy), "host_offset": host_1m + 32 * K,
                               "by": "tail_cow"}]
    assert buggy.culprit_lines() == [
        f"0x108000+32K: stale tail COW of the write at 0+480K (keep {KEEP}, new {NEW}, case (a)), "
        f"copied from guest 0x78000, landed in host cluster {host_1m:#x}  (guest 0x100000..)"]


async def test_race_culprit_is_the_tail_cow_over_the_concurrent_write():
    """The 0x99 write went in place into guest 480K's host cluster; the tail COW, resumed,
    wrote the 0x88 it had read before over it."""
    r = await run_scenario(SCENARIOS["race"], "qemu-1.1.2")
    i = the_0x77_write(r)
    host_480k = host_of(r, 480 * K)
    assert r.bad_ranges == [[480 * K, 32 * K]]
    assert r.culprits == [{"guest_offset": 480 * K, "length": 32 * K, "allocation": i,
                           "host_offset": host_480k, "by": "tail_cow"}]
    assert r.allocations[i]["tail_cow"]["host_offset"] == host_480k
    # not one of the allocation's own clusters: "stale"
    assert not r.allocations[i]["host_offset"] <= host_480k < r.allocations[i]["host_offset"] + NEW * CS
    assert r.culprit_lines()[0].startswith("0x78000+32K: stale tail COW of the write at 0+480K")


def test_reproduce_prints_culprits():
    """The human table ends with one culprit line per bad range; --json has allocations and culprits."""
    human = subprocess.run([sys.executable, "-m", "nbdserve", "reproduce", "iotest-047"],
                           capture_output=True, text=True, timeout=120)
    assert human.returncode == 0, human.stderr
    lines = human.stdout.splitlines()
    at = lines.index("culprits under qemu-1.1.2:")
    assert len(lines) == at + 2
    assert lines[at + 1].startswith("  0x108000+32K: stale tail COW of the write at 0+480K (keep 5, new 2, case (a))")
    js = subprocess.run([sys.executable, "-m", "nbdserve", "reproduce", "iotest-047", "--json"],
                        capture_output=True, text=True, timeout=120)
    runs = [json.loads(line) for line in js.stdout.splitlines()]
    assert [len(x["culprits"]) for x in runs] == [1, 0]
    for x in runs:
        assert all(list(a) == list(ALLOCATION_KEYS) for a in x["allocations"])
        assert all(set(c) == {"guest_offset", "length", "allocation", "host_offset", "by"} for c in x["culprits"])
    assert not {"trace", "host_map", "image", "cluster_size"} & set(runs[0])


def test_reproduce_progress_on_a_terminal_only():
    """One line per run on stderr when it is a terminal, with the time since the start, and a
    last "done"; none under --json, none when stderr is not a terminal."""
    import os
    import pty
    import re

    def run(*extra: str) -> tuple[str, str]:
        main, sub = pty.openpty()
        p = subprocess.Popen([sys.executable, "-m", "nbdserve", "reproduce", "iotest-047", *extra],
                             stdout=subprocess.PIPE, stderr=sub, text=True)
        os.close(sub)
        out, _ = p.communicate(timeout=120)
        err = b""
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:   # EIO: the child side is closed and drained
                break
            if not chunk:
                break
            err += chunk
        os.close(main)
        assert p.returncode == 0
        return out, err.decode()

    _, err = run()
    steps = [f"iotest-047 under {a}" for a in ("qemu-1.1.2", "qemu-1.1.2+b7ab0fea")] + ["done"]
    lines = err.splitlines()
    assert [re.sub(r"^\[\d+:\d\d\] ", "", ln) for ln in lines] == steps, err
    assert all(re.match(r"^\[\d+:\d\d\] ", ln) for ln in lines)
    out, err = run("--json")
    assert err == "" and len(out.splitlines()) == 2
    piped = subprocess.run([sys.executable, "-m", "nbdserve", "reproduce", "iotest-047", "--allocator", "fixed"],
                           capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0 and piped.stderr == ""
