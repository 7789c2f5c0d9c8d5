"""Boot a Linux guest on an overlay served by nbdserve and run dpkg's workload in it.

Per run: a fresh image pair (``base.qcow2`` with the ext4 tree and packages of
:mod:`.workload`, ``top.qcow2`` a qcow2 overlay backed by it, 64 KiB clusters),
nbdserve in this process on 127.0.0.1 (port chosen by the kernel) serving
``top.qcow2`` as export ``top`` with the allocator under test, and
``qemu-system-x86_64`` booting the host's Debian kernel with the initramfs of
:mod:`.initramfs`.  Two client paths:

``virtio``
    qemu's own NBD client: ``-drive file=nbd://127.0.0.1:PORT/top,format=raw,if=virtio,
    cache=none,discard=unmap``; the guest sees ``/dev/vda``.
``nbd-client``
    the guest kernel's NBD driver: a user-mode network with ``restrict=on`` and
    ``guestfwd=tcp:10.0.2.100:10809-tcp:127.0.0.1:PORT``; Debian's ``nbd-client`` in the
    guest attaches ``/dev/nbd0`` to ``10.0.2.100 10809 -N top``.  qemu's chardev is the
    only host-side connection, and it goes to loopback.

Why the qemu-1.1.2 allocator corrupts here, and what the run relies on (none of it
is planted: both allocators see the very same guest, images, workload and delays):

* writes that start in a cluster the overlay already owns (QCOW_OFLAG_COPIED): files
  written back in pieces (small dirty-page limits) continue in the cluster where the
  previous piece ended; 1.1.x then allocates the new clusters at the host offset right
  after the kept one;
* host space there that is free but shorter than the write needs: the holes that
  ``rm`` + ``fstrim`` + a flush leave between clusters still in use, and the remainders
  of those holes after first-fit allocations; or an allocation cut short by the next
  COPIED cluster or by another write's allocation in flight (parallel unpacks);
* a write that does not end on a cluster boundary (file sizes are never multiples of
  64 KiB) and ends within the kept clusters' length past the new ones: 1.1.2's
  ``nb_available`` then leaves an unaligned tail, and the tail COW writes stale guest data
  into the host cluster after the new ones, which belongs to another file (iotest 047),
  or into a cluster that a concurrent write is filling (Kevin Wolf's race);
* every generation (remove, discard, upgrade) gives a few such writes, and the files are
  checked from disk after each one; eight generations (the default) make a run without
  a corrupted file rare.  ``delays`` (default ``cow_write=0.02``, the slow host storage of
  2012) widens the race window for both allocators alike.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field

import trio

from ..api import Export, serve
from ..qcow2.create import create_image
from . import debian
from .initramfs import build_initramfs, kernel_image
from .workload import WorkloadSpec, build_base_image

ARCHIVES = "/var/cache/apt/archives"   # the Debian guest's archives (debian.py's script: A=)

EXPORT = "top"
CLIENTS = ("virtio", "nbd-client")
WORKLOADS = ("debian", "synthetic")
GUEST_RAM_MIB = {"debian": 192, "synthetic": 768}
GUEST_NBD_ADDR = "10.0.2.100"
GUEST_NBD_PORT = 10809
DEFAULT_DELAYS = {"cow_write": 0.02}
BOOT_TIMEOUT = 900.0


class GuestUnavailable(RuntimeError):
    """No kernel in /boot or no qemu-system-x86_64: the harness cannot run here."""


@dataclass
class GuestResult:
    run: int
    allocator: str
    client: str
    files_checked: int
    files_corrupted: int
    corrupted_files: list[str]            # "<package> <path>"
    qemu_img_check: dict                  # qemu-img check --output=json, plus "exit"
    seconds: float
    completed: bool                       # the guest printed its summary
    errors: list[str] = field(default_factory=list)   # @@ERROR lines, timeouts
    phases: list[str] = field(default_factory=list)
    delays: dict[str, float] = field(default_factory=dict)
    userland: str = "busybox"             # "debian": the Debian guest's own dpkg ran
    partition_start_sector: int | None = None   # None: the file system is the whole disk
    packages_installed: list[str] = field(default_factory=list)
    dpkg_messages: list[str] = field(default_factory=list)   # dpkg's errors and --verify mismatches
    archives_damaged: list[str] = field(default_factory=list)  # SHA256 differs from the Packages index
    console_log: str | None = None
    workdir: str | None = None
    # "<path>" of a corrupted file -> its blocks a stale COW wrote last (reproduce/filemap.py)
    culprits: dict[str, list[str] | None] = field(default_factory=dict)   # None: removed later

    @property
    def corrupted(self) -> bool:
        return self.files_corrupted > 0 or bool(self.archives_damaged) or bool(self.dpkg_messages)

    @property
    def check_clean(self) -> bool:
        return self.qemu_img_check.get("exit") == 0

    def to_dict(self) -> dict:
        d = {"scenario": "guest", **asdict(self)}
        d["corrupted"] = self.corrupted
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


def missing_requirements(workload: str = "synthetic") -> str | None:
    """Why the guest harness cannot run ``workload`` on this machine, or None."""
    if kernel_image() is None:
        return "no /boot/vmlinuz-* with its modules (install linux-image-amd64: scripts/guest-deps)"
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 not found (install qemu-system-x86: scripts/guest-deps)"
    for tool in ("busybox", "nbd-client", "ip", "dpkg-deb", "mkfs.ext4", "qemu-img"):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            return f"{tool} not found (scripts/guest-deps installs it)"
    if workload == "debian" and not debian.base_cached():
        for tool in ("debootstrap", "apt-get"):
            if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
                return f"{tool} not found (scripts/guest-deps installs it; it builds the Debian base image once)"
    return None


def qemu_argv(vmlinuz: str, initrd: str, client: str, port: int, console: str,
              workload: str = "synthetic") -> list[str]:
    append = f"console=ttyS0 quiet panic=-1 nbdserve.client={client}"
    if workload == "debian":
        append += " nbdserve.root=partition"
    argv = ["qemu-system-x86_64", "-accel", "tcg", "-m", str(GUEST_RAM_MIB[workload]), "-smp", "1",
            "-display", "none", "-monitor", "none", "-serial", f"file:{console}", "-no-reboot",
            "-kernel", vmlinuz, "-initrd", initrd, "-append", append]
    if client == "virtio":
        argv += ["-net", "none",
                 "-drive", f"file=nbd://127.0.0.1:{port}/{EXPORT},format=raw,if=virtio,cache=none,"
                           f"discard=unmap"]
    elif client == "nbd-client":
        # the chardev's socket with TCP_NODELAY (",," escapes the comma inside -netdev): qemu
        # writes each guest segment to it alone, and Nagle would hold all but the first of a
        # request's segments until the server's delayed ACK, 40 ms later
        argv += ["-netdev", f"user,id=n0,restrict=on,guestfwd=tcp:{GUEST_NBD_ADDR}:{GUEST_NBD_PORT}"
                            f"-tcp:127.0.0.1:{port},,nodelay=on",
                 "-device", "virtio-net-pci,netdev=n0"]
    else:
        raise ValueError(f"client must be one of {', '.join(CLIENTS)}, not {client!r}")
    return argv


FILE_LINE = re.compile(r"^@@FILE (\S+) (.+): (OK|FAILED.*)$")


def parse_console(text: str) -> dict:
    """The @@ lines of the guest's serial console.  A file checked several times (after each
    generation) counts once, as corrupted if any check failed."""
    status: dict[str, bool] = {}         # "<package> <path>" -> intact in every check so far
    errors, phases = [], []
    summary = None
    for line in text.splitlines():
        line = line.strip()
        m = FILE_LINE.match(line)
        if m:
            name = f"{m.group(1)} {m.group(2)}"
            status[name] = status.get(name, True) and m.group(3) == "OK"
        elif line.startswith("@@ERROR"):
            errors.append(line[len("@@ERROR "):])
        elif line.startswith("@@PHASE "):
            phases.append(line[len("@@PHASE "):])
        elif line.startswith("@@SUMMARY"):
            summary = dict(kv.split("=", 1) for kv in line.split()[1:])
    corrupted = [name for name, ok in status.items() if not ok]
    return {"files": len(status), "corrupted": corrupted, "errors": errors, "phases": phases,
            "summary": summary}


async def _qemu_img_check(path: str) -> dict:
    r = await trio.run_process(["qemu-img", "check", "--output=json", path], capture_stdout=True,
                               capture_stderr=True, check=False)
    try:
        verdict = json.loads(r.stdout or b"{}")
    except json.JSONDecodeError:
        verdict = {"output": r.stdout.decode(errors="replace")}
    verdict["exit"] = r.returncode
    return verdict


async def run_guest_once(allocator: str, client: str = "virtio", *, run: int = 1, workdir: str,
                         delays: dict[str, float] | None = None, spec: WorkloadSpec | None = None,
                         workload: str = "debian", debian_spec: debian.DebianSpec | None = None,
                         timeout: float = BOOT_TIMEOUT) -> GuestResult:
    """One boot in ``workdir`` (which must exist and be empty)."""
    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {', '.join(WORKLOADS)}, not {workload!r}")
    delays = dict(DEFAULT_DELAYS if delays is None else delays)
    vmlinuz = kernel_image()
    if vmlinuz is None or shutil.which("qemu-system-x86_64") is None:
        raise GuestUnavailable(missing_requirements(workload) or "guest requirements missing")
    initrd = await trio.to_thread.run_sync(build_initramfs, vmlinuz)
    top = os.path.join(workdir, "top.qcow2")
    if workload == "debian":
        base = await trio.to_thread.run_sync(debian.build_base, debian_spec)
        start = time.monotonic()
        size = (debian_spec or debian.DebianSpec()).disk_size
        backing = base["path"]
    else:
        start = time.monotonic()
        await trio.to_thread.run_sync(build_base_image, workdir, spec or WorkloadSpec())
        size, backing = (spec or WorkloadSpec()).fs_size, "base.qcow2"
    create_image(top, size, cluster_size=64 << 10, backing=backing, backing_format="qcow2")
    console = os.path.join(workdir, "console.log")
    trace = os.path.join(workdir, "trace.jsonl")
    export = Export(top, name=EXPORT, format="qcow2", allocator=allocator, delays=delays, trace=trace)
    errors: list[str] = []
    async with trio.open_nursery() as nursery:
        serving = await nursery.start(functools.partial(serve, [export], handshake_timeout=timeout))
        port = serving.port
        argv = qemu_argv(vmlinuz, initrd, client, port, console, workload)
        with open(os.path.join(workdir, "qemu.cmdline"), "w") as f:
            f.write(" ".join(argv) + "\n")
        with trio.move_on_after(timeout) as scope:
            r = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
            if r.returncode != 0:
                errors.append(f"qemu exited {r.returncode}: {r.stderr.decode(errors='replace').strip()}")
        if scope.cancelled_caught:
            errors.append(f"guest did not finish within {timeout:.0f} s")
        serving.stop()
    seconds = time.monotonic() - start
    text = open(console, errors="replace").read() if os.path.exists(console) else ""
    verdict = await _qemu_img_check(top)
    common = dict(run=run, allocator=allocator, client=client, qemu_img_check=verdict,
                  seconds=round(seconds, 1), delays=delays, console_log=console, workdir=workdir)
    if workload == "debian":
        parsed = debian.parse_console(text)
        damaged = [f"{ARCHIVES}/{name}" for name in parsed["archives_damaged"]]
        common["culprits"] = await _culprits(top, trace, parsed["corrupted"] + damaged,
                                             parsed["partition_start_sector"], workdir, errors)
        return GuestResult(files_checked=parsed["files"], files_corrupted=len(parsed["corrupted"]),
                           corrupted_files=parsed["corrupted"], completed=parsed["completed"],
                           errors=errors + parsed["errors"], phases=parsed["phases"], userland="debian",
                           partition_start_sector=parsed["partition_start_sector"],
                           packages_installed=parsed["installed"], dpkg_messages=parsed["dpkg_messages"],
                           archives_damaged=parsed["archives_damaged"], **common)
    parsed = parse_console(text)
    common["culprits"] = await _culprits(top, trace, parsed["corrupted"], None, workdir, errors)
    return GuestResult(files_checked=parsed["files"], files_corrupted=len(parsed["corrupted"]),
                       corrupted_files=parsed["corrupted"], completed=parsed["summary"] is not None,
                       errors=errors + parsed["errors"], phases=parsed["phases"], **common)


def corrupted_path(name: str) -> str:
    """The path of a corrupted file: the Debian guest's "/usr/bin/x" (dpkg --verify's "missing"
    lines add why, e.g. " (Bad message)"), the synthetic one's "<package> <path>"."""
    if name.startswith("/"):
        return re.sub(r" \([^()]*\)$", "", name)
    return name.split(" ", 1)[-1]


async def _culprits(top: str, trace: str, corrupted: list[str], partition_start_sector: int | None,
                    workdir: str, errors: list[str]) -> dict[str, list[str] | None]:
    """Each corrupted file's blocks a stale COW wrote last (reproduce/filemap.py)."""
    if not corrupted:
        return {}
    from ..reproduce.filemap import file_culprits
    try:
        return await file_culprits(top, trace, [corrupted_path(n) for n in corrupted], 64 << 10, workdir,
                                   fs_offset=(partition_start_sector or 0) * 512)
    except (OSError, RuntimeError, ValueError) as e:
        errors.append(f"culprits: {e}")
        return {}


async def run_guest(allocator: str, client: str = "virtio", runs: int = 1, keep: bool = False, *,
                    delays: dict[str, float] | None = None, spec: WorkloadSpec | None = None,
                    workload: str = "debian", debian_spec: debian.DebianSpec | None = None,
                    workdir: str | None = None, timeout: float = BOOT_TIMEOUT) -> list[GuestResult]:
    """``runs`` guest boots with ``allocator``; each gets its own work dir under ``workdir``
    (default: a new temporary folder).  Without ``keep`` the images are deleted afterwards but
    the console logs stay (``console_log`` of each result); with ``keep`` everything stays."""
    if client not in CLIENTS:
        raise ValueError(f"client must be one of {', '.join(CLIENTS)}, not {client!r}")
    root = workdir or tempfile.mkdtemp(prefix=f"nbdserve-guest-{allocator}-{client}-")
    os.makedirs(root, exist_ok=True)
    results = []
    for i in range(1, runs + 1):
        wd = os.path.join(root, f"run{i}")
        os.makedirs(wd)
        result = await run_guest_once(allocator, client, run=i, workdir=wd, delays=delays, spec=spec,
                                      workload=workload, debian_spec=debian_spec, timeout=timeout)
        if not keep:
            for name in ("top.qcow2", "base.qcow2"):
                try:
                    os.unlink(os.path.join(wd, name))
                except FileNotFoundError:
                    pass
            result.workdir = None
        results.append(result)
    return results


def describe_check(verdict: dict) -> str:
    if verdict.get("exit") == 0:
        return "clean"
    parts = [f"{verdict[k]} {k}" for k in ("corruptions", "leaks", "check-errors") if verdict.get(k)]
    return ", ".join(parts) or f"exit {verdict.get('exit')}"


def culprit_lines(r: GuestResult, path: str, most: int = 3) -> list[str]:
    """The culprits of one damaged file (none when none were looked for)."""
    if path not in r.culprits:
        return []
    found = r.culprits[path]
    if found is None:
        return ["removed later in the run: its blocks are gone"]
    if not found:
        return ["no stale COW wrote its bytes last"]
    return found[:most] + ([f"... and {len(found) - most} more"] if len(found) > most else [])


def damaged_files(r: GuestResult) -> list[tuple[str, str]]:
    """(what the guest said, path) of every damaged archive and corrupted file of a run."""
    return ([(f"SHA256 mismatch {ARCHIVES}/{name}", f"{ARCHIVES}/{name}") for name in r.archives_damaged]
            + [(f"FAILED {name}", corrupted_path(name)) for name in r.corrupted_files])


def format_guest_results(results: list[GuestResult], *, max_files: int = 6, max_messages: int = 12) -> str:
    """A line per run, the corrupted files (and for the Debian guest, damaged archives and
    dpkg's own words) under it, and a total per allocator/client."""
    lines = []
    for r in results:
        state = "CORRUPTED" if r.corrupted else ("ok" if r.completed else "INCOMPLETE")
        where = (f"debian, partition at sector {r.partition_start_sector}, "
                 f"{len(r.packages_installed)} packages installed at the end; " if r.userland == "debian" else "")
        archives = f"{len(r.archives_damaged)} archives damaged; " if r.userland == "debian" else ""
        lines.append(f"run {r.run} allocator={r.allocator} client={r.client}: {state}; {where}"
                     f"{r.files_checked} files checked, {r.files_corrupted} corrupted; {archives}"
                     f"qemu-img check: {describe_check(r.qemu_img_check)}; {r.seconds:.0f} s")
        for name in r.archives_damaged[:max_files]:
            lines.append(f"    SHA256 mismatch {ARCHIVES}/{name}")
            lines += [f"      {c}" for c in culprit_lines(r, f"{ARCHIVES}/{name}")]
        if len(r.archives_damaged) > max_files:
            lines.append(f"    ... and {len(r.archives_damaged) - max_files} more archives")
        for name in r.corrupted_files[:max_files]:
            lines.append(f"    FAILED {name}")
            lines += [f"      {c}" for c in culprit_lines(r, corrupted_path(name))]
        if len(r.corrupted_files) > max_files:
            lines.append(f"    ... and {len(r.corrupted_files) - max_files} more")
        for message in r.dpkg_messages[:max_messages]:
            lines.append(f"    dpkg said: {message}")
        if len(r.dpkg_messages) > max_messages:
            lines.append(f"    ... and {len(r.dpkg_messages) - max_messages} more lines from dpkg")
        for e in r.errors:
            lines.append(f"    error: {e}")
        lines.append(f"    console log: {r.console_log}" + (f"; images kept in {r.workdir}" if r.workdir else ""))
    groups: dict[tuple[str, str], list[GuestResult]] = {}
    for r in results:
        groups.setdefault((r.allocator, r.client), []).append(r)
    for (allocator, client), rs in groups.items():
        bad = sum(r.corrupted for r in rs)
        lines.append(f"{allocator} via {client}: corrupted files in {bad} of {len(rs)} runs")
    return "\n".join(lines)
