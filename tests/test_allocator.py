"""The qemu-1.1.2 allocator mode against the fixed one (issue: reproduce the 2012 corruption).

Expected bytes always come from the scenario's own qemu-io commands (DiskModel)
or from the qemu-iotests verify lists, never from the allocator under test.
"""

from __future__ import annotations

import subprocess

import pytest
import trio
import trio.testing

from nbdserve.qcow2 import Qcow2Image
from nbdserve.qcow2.create import create_image
from nbdserve.reproduce import SCENARIOS
from nbdserve.reproduce.runner import run_scenario
from nbdserve.reproduce.model import DiskModel, parse_size
from qemu_tools import check, qemu_io

K = 1024


# ---------------------------------------------------------------- over NBD
@pytest.mark.parametrize("partner", ["fixed", "qemu-1.1.2+b7ab0fea"])
@pytest.mark.parametrize("name", ["iotest-047", "race"])
async def test_reproduce_over_nbd(name, partner):
    scenario = SCENARIOS[name]
    fixed = await run_scenario(scenario, partner)
    buggy = await run_scenario(scenario, "qemu-1.1.2")
    assert not fixed.corrupted and fixed.bad_ranges == []
    assert all(c["ok"] for c in fixed.checks)
    assert fixed.actual_md5 == fixed.expected_md5
    assert buggy.corrupted and buggy.actual_md5 != buggy.expected_md5
    # the 1.1.2 bug corrupts data, not metadata
    assert fixed.qemu_img_check["exit"] == 0 and buggy.qemu_img_check["exit"] == 0


async def test_iotest_047_corruption_is_the_stale_tail_cow():
    """1M+32K..1M+64K holds what guest 480K..512K held when the COW read it (0x88)."""
    scenario = SCENARIOS["iotest-047"]
    r = await run_scenario(scenario, "qemu-1.1.2")
    model = DiskModel(bytes(scenario.size), scenario.cluster_size)
    commands = [*scenario.setup, *scenario.invocations[0]]
    for c in commands[:commands.index("write -P 0x77 0 480k")]:
        model.apply(c)
    stale = model.data[480 * K:512 * K]          # the tail COW's source, before the 0x77 write
    assert r.bad_ranges == [[1024 * K + 32 * K, 32 * K]]
    assert set(stale) == {0x88}
    failed = [c["command"] for c in r.checks if not c["ok"]]
    assert failed == ["read -P 0x55 1M 128k"]


async def test_race_loses_the_concurrent_write():
    """Kevin's reproducer through the control socket, no delays: qemu-1.1.2 stops at cow_write
    and loses the 0x99 write every time; fixed never reaches cow_write and loses nothing."""
    assert SCENARIOS["race"].delays == {} and not any("sleep" in c for c in SCENARIOS["race"].script)
    for _ in range(5):
        r = await run_scenario(SCENARIOS["race"], "qemu-1.1.2")
        assert r.breakpoints == {"A": True}
        assert r.bad_ranges == [[480 * K, 32 * K]]
        assert [c["command"] for c in r.checks if not c["ok"]] == ["read -P 0x99 480k 32k"]
        r = await run_scenario(SCENARIOS["race"], "fixed")
        assert r.breakpoints == {"A": False}
        assert not r.corrupted and all(c["ok"] for c in r.checks)


# ------------------------------------------------------ in-process, breakpoints
async def _first_of(*events: trio.Event) -> None:
    async with trio.open_nursery() as nursery:
        for e in events:
            async def wait(e=e):
                await e.wait()
                nursery.cancel_scope.cancel()
            nursery.start_soon(wait)


def _pattern(byte: int, n: int) -> bytes:
    return bytes([byte]) * n


@pytest.mark.parametrize("allocator", ["fixed", "qemu-1.1.2"])
async def test_race_with_breakpoint(tmp_path, allocator):
    """Kevin's reproducer as he ran it: break cow_write A; aio_write A; wait_break A;
    write 0x99; resume A.  No timing involved."""
    path = str(tmp_path / "race.qcow2")
    create_image(path, 4 << 20)
    setup = ["write -P 0x66 0 320k", "write 320k 128k", "write -P 0x88 448k 128k", "discard 320k 128k"]
    qemu_io(path, *setup)
    img = Qcow2Image.open(path, allocator=allocator)
    img.events.set_break("cow_write", "A")
    a_done = trio.Event()
    hit = img.events._by_tag["A"].hit
    async with trio.open_nursery() as nursery:
        async def write_a():
            await img.pwrite(0, _pattern(0x77, 480 * K))
            a_done.set()
        nursery.start_soon(write_a)
        await _first_of(hit, a_done)       # fixed: no tail COW, so no cow_write at all
        await img.pwrite(480 * K, _pattern(0x99, 32 * K))
        if hit.is_set():
            img.events.resume("A")
    await img.close()
    out = qemu_io(path, "read -P 0x77 0 480k", "read -P 0x99 480k 32k", "read -P 0x88 512k 64k",
                  check=False)
    check(path)
    if allocator == "fixed":
        assert not hit.is_set()
        assert "Pattern verification failed" not in out
    else:
        assert hit.is_set()
        assert "Pattern verification failed at offset 491520, 32768 bytes" in out


@pytest.mark.parametrize("allocator", ["fixed", "qemu-1.1.2"])
async def test_iotest_047_in_process(tmp_path, allocator):
    scenario = SCENARIOS["iotest-047"]
    path = str(tmp_path / "047.qcow2")
    create_image(path, scenario.size)
    model = DiskModel(bytes(scenario.size), scenario.cluster_size)
    img = Qcow2Image.open(path, allocator=allocator)
    for command in scenario.setup + scenario.invocations[0]:
        model.apply(command)
        op, *args = command.split()
        if op == "write":
            pattern = int(args[1], 0) if args[0] == "-P" else 0xCD
            off, n = parse_size(args[-2]), parse_size(args[-1])
            await img.pwrite(off, _pattern(pattern, n))
        elif op == "discard":
            await img.trim(parse_size(args[0]), parse_size(args[1]))
        else:
            await img.flush()
    got = await img.pread(0, scenario.size)
    await img.close()
    check(path)
    differs = got != bytes(model.data)
    assert differs == (allocator == "qemu-1.1.2")
    if differs:
        assert got[1024 * K + 32 * K:1024 * K + 64 * K] == _pattern(0x88, 32 * K)


# ------------------------------------------------------------- qemu-iotests 046
IOTEST_046 = [
    # (setup through qemu-io, request A, request B); A stops at write_aio while B is issued
    ([], "0x18000 0x2000 10", None),
    ([], "0x28000 0x2000 20", "0x2a000 0x10000 21"),
    ([], "0x48000 0x2000 40", "0x4c000 0x10000 41"),
    (["write -P 70 0x76000 0x8000"], "0x66000 0x2000 60", "0x6a000 0xe000 61"),
    (["write -P 89 0x80000 0x1000", "write -P 90 0x96000 0x8000", "discard 0x80000 0x10000"],
     "0x86000 0x2000 80", "0x8a000 0xe000 81"),
    (["write -P 109 0xa0000 0x1000", "write -c -P 110 0xb0000 0x10000", "discard 0xa0000 0x10000"],
     "0xa6000 0x2000 100", "0xaa000 0xe000 101"),
    ([], "0xdc000 0x2000 121", "0xc4000 0x18000 120"),
    ([], "0xfc000 0x2000 141", "0xe4000 0x14000 140"),
    ([], "0x10c000 0x8000 161", "0x104000 0x18000 160"),
]
# the first case issues two B requests around A
IOTEST_046_FIRST_B = ["0x12000 0x2000 11", "0x1c000 0x2000 12"]

IOTEST_046_VERIFY = """
read -P 0 0 0x10000
read -P 1 0x10000 0x2000
read -P 11 0x12000 0x2000
read -P 1 0x14000 0x4000
read -P 10 0x18000 0x2000
read -P 1 0x1a000 0x2000
read -P 12 0x1c000 0x2000
read -P 1 0x1e000 0x2000
read -P 2 0x20000 0x8000
read -P 20 0x28000 0x2000
read -P 21 0x2a000 0x10000
read -P 3 0x3a000 0x6000
read -P 4 0x40000 0x8000
read -P 40 0x48000 0x2000
read -P 4 0x4a000 0x2000
read -P 41 0x4c000 0x10000
read -P 5 0x5c000 0x4000
read -P 6 0x60000 0x6000
read -P 60 0x66000 0x2000
read -P 6 0x68000 0x2000
read -P 61 0x6a000 0xe000
read -P 70 0x78000 0x6000
read -P 7 0x7e000 0x2000
read -P 0 0x80000 0x6000
read -P 80 0x86000 0x2000
read -P 0 0x88000 0x2000
read -P 81 0x8a000 0xe000
read -P 90 0x98000 0x6000
read -P 9 0x9e000 0x2000
read -P 0 0xa0000 0x6000
read -P 100 0xa6000 0x2000
read -P 0 0xa8000 0x2000
read -P 101 0xaa000 0xe000
read -P 110 0xb8000 0x8000
read -P 12 0xc0000 0x4000
read -P 120 0xc4000 0x18000
read -P 121 0xdc000 0x2000
read -P 13 0xde000 0x2000
read -P 14 0xe0000 0x4000
read -P 140 0xe4000 0x14000
read -P 15 0xf8000 0x4000
read -P 141 0xfc000 0x2000
read -P 15 0xfe000 0x2000
read -P 16 0x100000 0x4000
read -P 160 0x104000 0x8000
read -P 160 0x114000 0x8000
read -P 17 0x11c000 0x4000
""".strip().splitlines()


def _req(spec: str) -> tuple[int, bytes]:
    off, n, pattern = (int(x, 0) for x in spec.split())
    return off, _pattern(pattern, n)


async def test_iotest_046_concurrent_allocations_fixed(tmp_path):
    """qemu-iotests 046 (v3): concurrent requests touching clusters being allocated."""
    base = str(tmp_path / "base.qcow2")
    top = str(tmp_path / "top.qcow2")
    create_image(base, 128 << 20)
    qemu_io(base, *[f"write -P {i} {i * 64}k 64k" for i in range(32)])
    create_image(top, 64 << 20, backing="base.qcow2", backing_format="qcow2")
    qemu_io(top, *[c for setup, _, _ in IOTEST_046 for c in setup])
    img = Qcow2Image.open(top, allocator="fixed")
    for i, (_, a_spec, b_spec) in enumerate(IOTEST_046):
        tag = f"A{i}"
        img.events.set_break("write_aio", tag)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(img.pwrite, *_req(a_spec))
            await img.events.wait_break(tag)
            for spec in (IOTEST_046_FIRST_B if i == 0 else [b_spec]):
                nursery.start_soon(img.pwrite, *_req(spec))
            await trio.testing.wait_all_tasks_blocked()
            img.events.resume(tag)
        await img.flush()
    await img.close()
    out = qemu_io(top, *IOTEST_046_VERIFY)        # fails on any "Pattern verification failed"
    assert out.count("read ") == len(IOTEST_046_VERIFY)
    check(top)


def test_reproduce_cli_json():
    """``nbdserve reproduce iotest-047 --json``: one object per allocator, exit 0 either way."""
    import json
    import sys
    r = subprocess.run([sys.executable, "-m", "nbdserve", "reproduce", "iotest-047", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    runs = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(x["allocator"], x["corrupted"]) for x in runs] == [("qemu-1.1.2", True), ("qemu-1.1.2+b7ab0fea", False)]
    for x in runs:
        assert {"scenario", "expected_md5", "actual_md5", "bad_ranges"} <= set(x)
        assert x["scenario"] == "iotest-047" and x["qemu_img_check"]["exit"] == 0


def test_reproduce_all_without_a_guest_says_why(tmp_path):
    """``reproduce all`` where qemu-system-x86_64 is missing: the qemu-io scenarios still
    run, and the guest's absence is reported, not passed over."""
    import json
    import os
    import shutil
    import sys
    from nbdserve.reproduce import SCENARIOS
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("qemu-img", "qemu-io", "stdbuf"):   # stdbuf: the race's piped qemu-io (coreutils)
        (bin_dir / tool).symlink_to(shutil.which(tool))
    r = subprocess.run([sys.executable, "-m", "nbdserve", "reproduce", "all", "--json", "--allocator", "fixed"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "PATH": str(bin_dir)})
    assert r.returncode == 0, r.stderr
    runs = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["scenario"] for x in runs] == [*SCENARIOS, "guest"]
    assert all(not x["corrupted"] for x in runs[:-1])
    assert "qemu-system-x86_64" in runs[-1]["skipped"]
