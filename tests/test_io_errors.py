"""I/O errors (issue 7): host-file errors reach the client as the matching NBD error, leave the
image consistent and do not stop the server.

- Injected, as qemu-iotests 026 does with blkdebug's ``[inject-error]``: every blkdebug event a
  scenario reaches (found by a dry run of the scenario on the engine, so the list follows
  ``nbdserve.qcow2.events.EVENTS``) fails with EIO and with ENOSPC, once and every time, while
  libnbd (which shows the exact errno) and qemu-io (which prints it) send the scenario over NBD
  to an export served with ``inject_error``.
- A real full filesystem: the image on a small tmpfs, written until the host says ENOSPC.

After each case the image must pass ``qemu-img check`` (exit 0, or 3 for leaked clusters), and
hold, per byte, what the requests that succeeded wrote whenever a later flush succeeded.
"""

from __future__ import annotations

import errno
import functools
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from conftest import NbdserveProcess, free_port, import_libnbd, nbdserve_command
from nbdserve.server.settings import ExportSettings, ServerSettings
from nbdserve.qcow2 import Qcow2Image
from nbdserve.qcow2.events import EVENTS
from nbdserve.server import run_server
from qemu_tools import QEMU_IO, check_no_corruption, convert_raw, create, qemu_io

K, MiB = 1024, 1 << 20
ERRNOS = (errno.EIO, errno.ENOSPC)
CONCURRENT_CASES = 8     # cases in flight at once, each on its own export
BACKING_BYTE = 0x22


# ------------------------------------------------------------------ scenarios
@dataclass
class Scenario:
    """An image shape and the requests sent to it: (kind, offset, length, pattern byte)."""

    name: str
    size: int
    options: dict
    backing: bool
    steps: list[tuple[str, int, int, int]]
    qemu_io: list[str] = field(default_factory=list)    # the same kind of requests as qemu-io commands


SCENARIOS = [
    # qemu-iotests 026, first part: allocating writes; here also a copy-on-write from the
    # backing file, a discard whose cluster is freed at the flush after it, reuse of the space
    Scenario("writes", 4 * MiB, dict(cluster_size=64 * K), True, [
        ("write", 0, 128 * K, 0xA1),
        ("write", 200000, 1000, 0xB2),
        ("flush", 0, 0, 0),
        ("trim", 0, 64 * K, 0),
        ("flush", 0, 0, 0),
        ("write", MiB, 4 * K, 0xD4),
        ("flush", 0, 0, 0),
        ("read", 128 * K, 64 * K, 0),
    ], ["write -P 0xa1 0 128k", "write -P 0xb2 200000 1000", "discard 0 64k",
        "write -P 0xd4 1M 4k", "read -P 0x22 128k 64k"]),
    # 026, "refcount table growth": small clusters; with 64-bit refcounts a refcount block covers
    # 32 KiB and the first refcount table 2 MiB, so 2.5 MiB allocate blocks and move the table
    Scenario("refcount-growth", 4 * MiB, dict(cluster_size=512, refcount_bits=64), False, [
        ("write", 0, 2560 * K, 0xC3),
        ("flush", 0, 0, 0),
    ], ["write -P 0xc3 0 2560k"]),
]


def make_image(tmp_path: Path, scenario: Scenario, name: str) -> Path:
    backing = tmp_path / "backing.qcow2"
    if scenario.backing and not backing.exists():
        create(backing, MiB)
        qemu_io(backing, f"write -P {BACKING_BYTE:#x} 0 1M")
    path = tmp_path / f"{name}.qcow2"
    create(path, scenario.size, backing=str(backing) if scenario.backing else None, **scenario.options)
    return path


async def _dry_run(tmp_path: Path, scenario: Scenario) -> dict[str, int]:
    """Event -> index of the first step that fires it, running the steps on the engine."""
    img = Qcow2Image.open(str(make_image(tmp_path, scenario, f"dry-{scenario.name}")))
    first: dict[str, int] = {}
    step_index = 0
    img.events.hook = lambda event: first.setdefault(event, step_index)
    try:
        for step_index, (kind, offset, length, byte) in enumerate(scenario.steps):
            if kind == "write":
                await img.pwrite(offset, bytes([byte]) * length)
            elif kind == "trim":
                await img.trim(offset, length)
            elif kind == "flush":
                await img.flush()
            else:
                await img.pread(offset, length)
    finally:
        img.events.hook = None
        await img.close()
    return first


# ------------------------------------------------------------------ the expected image
class Expected:
    """Per byte: the known content, or unknown (None) where a failed request, or one no later
    flush made durable, may or may not have landed."""

    def __init__(self, initial: bytes):
        self.data = bytearray(initial)
        self.known = bytearray(b"\x01" * len(initial))

    def apply(self, scenario: Scenario, outcomes: list[int]) -> None:
        flushed_later = [any(k == "flush" and outcomes[j] == 0 for j, (k, *_) in enumerate(scenario.steps)
                             if j > i) for i in range(len(scenario.steps))]
        for i, (kind, offset, length, byte) in enumerate(scenario.steps):
            if kind not in ("write", "trim"):
                continue
            if outcomes[i] == 0 and flushed_later[i]:
                self.data[offset:offset + length] = bytes([byte if kind == "write" else 0]) * length
                self.known[offset:offset + length] = b"\x01" * length
            else:
                self.known[offset:offset + length] = bytes(length)

    def mismatches(self, image: bytes) -> list[int]:
        """Offsets of the 512-byte sectors where a known byte differs."""
        bad = []
        all_known = b"\x01" * 512
        for i in range(0, len(image), 512):
            known = self.known[i:i + 512]
            if known == all_known:
                if image[i:i + 512] != self.data[i:i + 512]:
                    bad.append(i)
            elif any(known) and any(k and a != b for a, b, k in zip(image[i:i + 512], self.data[i:i + 512], known)):
                bad.append(i)
        return bad


def initial_view(scenario: Scenario) -> bytes:
    view = bytearray(scenario.size)
    if scenario.backing:
        view[:MiB] = bytes([BACKING_BYTE]) * MiB
    return bytes(view)


# ------------------------------------------------------------------ clients
def libnbd_steps(uri: str, scenario: Scenario) -> list[int]:
    """Send the scenario's steps over one connection; 0 or the errno of each."""
    nbd = import_libnbd()
    h = nbd.NBD()
    h.connect_uri(uri)
    outcomes = []
    for kind, offset, length, byte in scenario.steps:
        try:
            if kind == "write":
                h.pwrite(bytes([byte]) * length, offset)
            elif kind == "trim":
                h.trim(length, offset)
            elif kind == "flush":
                h.flush()
            else:
                data = h.pread(length, offset)
                assert data == initial_view(scenario)[offset:offset + length], f"{kind} {offset} read wrong data"
            outcomes.append(0)
        except nbd.Error as e:
            outcomes.append(e.errnum)   # the errno number (.errno is its name)
    h.shutdown()
    return outcomes


def libnbd_read(uri: str, offset: int, length: int) -> bytes:
    nbd = import_libnbd()
    h = nbd.NBD()
    h.connect_uri(uri)
    data = h.pread(length, offset)
    h.shutdown()
    return data


async def qemu_io_commands(uri: str, commands: list[str]) -> list[str]:
    """qemu-io over NBD (its default cache mode writethrough: every write is a FUA write);
    the failure messages it printed, e.g. "write failed: No space left on device"."""
    args = [QEMU_IO, "-f", "raw", uri]
    for c in commands:
        args += ["-c", c]
    p = await trio.run_process(args, capture_stdout=True, capture_stderr=True, check=False)
    out = (p.stdout + p.stderr).decode()
    return [line for line in out.splitlines() if "failed" in line or "verification" in line]


# ------------------------------------------------------------------ injected faults
@dataclass
class Case:
    event: str
    err: int
    once: bool
    scenario: Scenario
    first_step: int
    image: Path | None = None
    outcomes: list[int] = field(default_factory=list)
    qemu_io_failures: list[str] | None = None
    leaks: int = 0

    @property
    def name(self) -> str:
        return f"{self.event}.{errno.errorcode[self.err]}.{'once' if self.once else 'always'}"


def _cases(first_steps: dict[str, dict[str, int]]) -> list[Case]:
    cases = []
    for event in EVENTS:
        reached = [s for s in SCENARIOS if event in first_steps[s.name]]
        if not reached:
            continue
        scenario = reached[0]
        for err in ERRNOS:
            for once in (True, False):
                cases.append(Case(event, err, once, scenario, first_steps[scenario.name][event]))
    return cases


@pytest.mark.slow
async def test_injected_errors_reach_the_client(tmp_path):
    first_steps = {s.name: await _dry_run(tmp_path, s) for s in SCENARIOS}
    cases = _cases(first_steps)
    exports = [ExportSettings("control", str(make_image(tmp_path, SCENARIOS[0], "control")), "qcow2")]
    for case in cases:
        case.image = make_image(tmp_path, case.scenario, case.name)
        exports.append(ExportSettings(case.name, str(case.image), "qcow2",
                                    inject_errors={case.event: (case.err, case.once)}))
        if case.once:   # a second export for qemu-io
            exports.append(ExportSettings("qemu-io." + case.name,
                                        str(make_image(tmp_path, case.scenario, "qemu-io." + case.name)),
                                        "qcow2", inject_errors={case.event: (case.err, case.once)}))
    stop = trio.Event()
    config = ServerSettings(exports=exports, bind="127.0.0.1", port=0)
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(functools.partial(run_server, config, shutdown=stop))
        base = f"nbd://127.0.0.1:{bound[0][1]}/"
        clients = trio.CapacityLimiter(CONCURRENT_CASES)

        async def run_case(case: Case) -> None:
            async with clients:
                case.outcomes = await trio.to_thread.run_sync(libnbd_steps, base + case.name, case.scenario)
                if case.once:
                    case.qemu_io_failures = await qemu_io_commands(base + "qemu-io." + case.name,
                                                                   case.scenario.qemu_io)
                # the server keeps serving, this export too: a read that fires no event (past the
                # backing file's end), from another connection
                data = await trio.to_thread.run_sync(libnbd_read, base + case.name, 3 * MiB, 4 * K)
                assert data == bytes(4 * K)

        async with trio.open_nursery() as clients_nursery:
            for case in cases:
                clients_nursery.start_soon(run_case, case)
        control = await trio.to_thread.run_sync(libnbd_steps, base + "control", SCENARIOS[0])
        assert control == [0] * len(SCENARIOS[0].steps)
        stop.set()

    rows = []
    for case in cases:
        label = f"{case.name} (scenario {case.scenario.name}, first fires at step {case.first_step})"
        expected_first = [0] * case.first_step + [case.err]
        assert case.outcomes[:case.first_step + 1] == expected_first, (label, case.outcomes)
        if case.once:
            assert case.outcomes.count(case.err) == 1 and set(case.outcomes) == {0, case.err}, (label, case.outcomes)
            message = os.strerror(case.err)
            assert len(case.qemu_io_failures) == 1 and message in case.qemu_io_failures[0], \
                (label, case.qemu_io_failures)
        else:
            assert set(case.outcomes) <= {0, case.err}, (label, case.outcomes)
        report = check_no_corruption(case.image)
        case.leaks = report.get("leaks", 0)
        expected = Expected(initial_view(case.scenario))
        expected.apply(case.scenario, case.outcomes)
        bad = expected.mismatches(convert_raw(case.image, tmp_path))
        assert not bad, (label, case.outcomes, [hex(b) for b in bad[:10]])
        rows.append(case)
    print(f"\n{len(cases)} injected-fault cases over {len({c.event for c in cases})} events; "
          f"not reached by the scenarios: {[e for e in EVENTS if not any(c.event == e for c in cases)]}")
    print(f"{'event':28} {'errno':7} {'mode':7} {'libnbd outcomes per step':34} {'qemu-io':28} check")
    for c in rows:
        outcomes = " ".join(errno.errorcode[o] if o else "ok" for o in c.outcomes)
        qio = "-" if c.qemu_io_failures is None else "; ".join(f.split(": ", 1)[-1] for f in c.qemu_io_failures)
        print(f"{c.event:28} {errno.errorcode[c.err]:7} {'once' if c.once else 'always':7} {outcomes:34} "
              f"{qio:28} {'clean' if not c.leaks else f'{c.leaks} leaked'}")


def test_expected_image_model():
    """The byte model itself: a known byte that differs is found, unknown bytes are not checked."""
    scenario = Scenario("t", 4 * K, {}, False, [("write", 0, 1000, 0xAA), ("write", 2048, 1024, 0xBB),
                                                ("flush", 0, 0, 0), ("write", 3072, 512, 0xCC)])
    expected = Expected(bytes(4 * K))
    expected.apply(scenario, [0, errno.EIO, 0, 0])    # the second write failed; the last is unflushed
    image = bytearray(b"\xaa" * 1000 + bytes(3096))
    assert expected.mismatches(bytes(image)) == []
    image[2048:3072] = b"\xbb" * 1024                 # the failed write's range: either content
    image[3072:3584] = b"\xcc" * 512                  # the unflushed one's: either content
    assert expected.mismatches(bytes(image)) == []
    image[999] = 0
    image[1500] = 1                                   # never written: must stay zero
    assert expected.mismatches(bytes(image)) == [512, 1024]


# ------------------------------------------------------------------ the knob: CLI and config file
def test_inject_error_from_the_command_line(tmp_path):
    """``--inject-error EVENT=ERRNO:once``: the first write fails with that errno, the next succeeds."""
    image = make_image(tmp_path, SCENARIOS[0], "cli")
    with NbdserveProcess("serve", "-x", "disk", "-p", str(free_port()), "--inject-error", "l2_update=ENOSPC:once",
                         "--inject-error", "cluster_free=5", str(image)) as server:
        out = qemu_io(server.uri, "write -P 0xa1 0 64k", "write -P 0xa2 0 64k", "read -P 0xa2 0 64k",
                      fmt="raw", check=False)
        assert out.count("failed") == 1 and "write failed: No space left on device" in out, out
        assert "Pattern verification" not in out, out
    check_no_corruption(image)


def test_inject_error_in_the_config_file(tmp_path):
    image = make_image(tmp_path, SCENARIOS[0], "conf")
    conf = tmp_path / "nbdserve.toml"
    conf.write_text(f'[server]\nport = {free_port()}\n[[export]]\nname = "disk"\nimage = "{image.name}"\n'
                    'inject_error = { write_aio = "EIO" }\n')
    with NbdserveProcess("serve", "--config", str(conf)) as server:
        out = qemu_io(server.uri, "write -P 0xa1 0 4k", "write -P 0xa1 1M 4k", fmt="raw", check=False)
        assert out.count("write failed: Input/output error") == 2, out     # every time
    check_no_corruption(image)


@pytest.mark.parametrize("args, status, message", [
    (["--inject-error", "write_aio"], 2, "expected EVENT=ERRNO[:once]"),
    (["--inject-error", "write_aio=EBOGUS"], 2, "--inject-error.write_aio: expected"),
    (["--inject-error", "write_aio=EIO:twice"], 2, "--inject-error.write_aio: expected"),
    (["--inject-error", "no_such_event=EIO"], 2, "unknown blkdebug event 'no_such_event'"),   # as --delay
])
def test_inject_error_refused(tmp_path, args, status, message):
    image = make_image(tmp_path, SCENARIOS[0], "refused")
    p = subprocess.run([*nbdserve_command(), "serve", "-p", str(free_port()), *args, str(image)],
                       capture_output=True, text=True, timeout=30)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == status and len(lines) == 1 and message in lines[0], (p.returncode, p.stderr)


def test_inject_error_config_value_refused(tmp_path):
    conf = tmp_path / "nbdserve.toml"
    conf.write_text('[[export]]\nimage = "x.qcow2"\ninject_error = { write_aio = true }\n')
    p = subprocess.run([*nbdserve_command(), "serve", "--config", str(conf)], capture_output=True, text=True,
                       timeout=30)
    assert p.returncode == 2 and "export[0].inject_error.write_aio: expected" in p.stderr, p.stderr


# ------------------------------------------------------------------ a full host filesystem
@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs (mounting needs root, which scripts/test and CI are)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    assert p.returncode == 0, f"cannot mount a tmpfs: {p.stderr.strip()}"
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def _pattern(i: int, n: int) -> bytes:
    return bytes([i % 251 + 1]) * n


def test_host_enospc_reaches_the_client(small_tmpfs, tmp_path):
    """Writes to an image on a full filesystem fail with ENOSPC; what was acknowledged stays
    readable, the server keeps serving, and once space is back writes and flushes succeed."""
    nbd = import_libnbd()
    chunk = 64 * K
    ballast = small_tmpfs / "ballast"
    ballast.write_bytes(b"\xee" * (256 * K))      # freed later, to give the space back
    image = Path(create(small_tmpfs / "disk.qcow2", 8 * MiB, cluster_size=64 * K))
    with NbdserveProcess("serve", "-f", "qcow2", "-x", "disk", "-p", str(free_port()), str(image)) as server:
        h = nbd.NBD()
        h.connect_uri(server.uri)
        acknowledged = []
        failure = None
        for i in range(64):                          # 4 MiB into a 1 MiB filesystem
            try:
                h.pwrite(_pattern(i, chunk), i * chunk)
                acknowledged.append(i)
            except nbd.Error as e:
                failure = (i, e.errnum)
                break
        assert failure is not None and failure[1] == errno.ENOSPC, (failure, acknowledged)
        assert acknowledged, "the filesystem was full before the first write"
        reader = nbd.NBD()
        reader.connect_uri(server.uri)
        for i in acknowledged:
            assert reader.pread(chunk, i * chunk) == _pattern(i, chunk), f"acknowledged write {i} reads back wrong"
        reader.shutdown()
        try:        # writing the L2 table back may need space too: success or ENOSPC, nothing else
            h.flush()
            flush_when_full = "ok"
        except nbd.Error as e:
            assert e.errnum == errno.ENOSPC, e
            flush_when_full = "ENOSPC"
        ballast.unlink()
        retried = failure[0]
        h.pwrite(_pattern(retried, chunk), retried * chunk)
        h.flush()
        h.shutdown()
    report = check_no_corruption(image)
    data = convert_raw(image, tmp_path)
    for i in acknowledged + [retried]:
        assert data[i * chunk:(i + 1) * chunk] == _pattern(i, chunk), f"write {i} lost after the restart"
    assert data[(retried + 1) * chunk:] == bytes(len(data) - (retried + 1) * chunk)
    print(f"\nhost ENOSPC after {len(acknowledged)} writes of 64 KiB, flush then {flush_when_full}; qemu-img check: "
          f"{report.get('leaks', 0)} leaked clusters, 0 corruptions")
