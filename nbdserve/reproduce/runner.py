"""Run a scenario: fresh image pair, nbdserve on loopback, qemu-io over NBD, verdict."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field

import trio

from ..api import Export, serve
from ..qcow2.create import create_image
from ..qcow2.trace import read_trace
from .culprits import allocations_of, describe_culprit, find_culprits, offset_text, size_text
from .model import DiskModel, differing_ranges, pattern_checks
from .report import host_layout
from .piped import run_script
from .scenarios import Scenario

EXPORT = "top"
PATTERN_FAILED = "Pattern verification failed"     # qemu-io's read -P on a mismatch


@dataclass
class RunResult:
    scenario: str
    allocator: str
    corrupted: bool
    expected_md5: str
    actual_md5: str
    bad_ranges: list[list[int]]              # [offset, length]
    checks: list[dict]                       # {"command", "ok"}
    qemu_img_check: dict                     # qemu-img check --output=json, plus "exit"
    delays: dict[str, float] = field(default_factory=dict)
    breakpoints: dict[str, bool] = field(default_factory=dict)   # script's tag -> a request stopped there
    workdir: str | None = None
    allocations: list[dict] = field(default_factory=list)   # culprits.ALLOCATION_KEYS, in allocation order
    culprits: list[dict] = field(default_factory=list)      # per bad range piece (culprits.find_culprits)
    # not in the JSON: what the report draws
    cluster_size: int = 0
    trace: list[dict] = field(default_factory=list)         # the whole allocation trace (qcow2/trace.py)
    host_map: list[dict] = field(default_factory=list)      # qemu-img map --output=json of the overlay
    host_kinds: list[str] = field(default_factory=list)     # per host cluster (report.host_layout)

    HIDDEN = ("cluster_size", "trace", "host_map", "host_kinds")

    def to_json(self) -> str:
        d = asdict(self)
        for key in self.HIDDEN:
            del d[key]
        return json.dumps(d)

    def culprit_lines(self) -> list[str]:
        return [describe_culprit(c, self.allocations, self.trace, self.cluster_size) for c in self.culprits]


async def _run(argv: list[str], check: bool = True) -> trio.CompletedProcess:
    return await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=check)


async def qemu_io(uri_or_file: str, commands, fmt: str = "raw") -> trio.CompletedProcess:
    argv = ["qemu-io", "-f", fmt]
    for c in commands:
        argv += ["-c", c]
    result = await _run(argv + [uri_or_file])
    if b"error" in result.stdout.lower() or result.stderr:
        raise RuntimeError(f"qemu-io {' '.join(commands)} failed: {(result.stdout + result.stderr).decode()}")
    return result


async def make_image_pair(workdir: str, scenario: Scenario) -> tuple[str, bytes]:
    """A qcow2 base holding ``base_pattern`` and a fresh qcow2 overlay backed by it."""
    base = os.path.join(workdir, "base.qcow2")
    top = os.path.join(workdir, "top.qcow2")
    create_image(base, scenario.size, cluster_size=scenario.cluster_size)
    await qemu_io(base, [f"write -P {scenario.base_pattern:#x} 0 {scenario.base_length}"], fmt="qcow2")
    create_image(top, scenario.size, cluster_size=scenario.cluster_size,
                 backing="base.qcow2", backing_format="qcow2")
    content = bytes([scenario.base_pattern]) * scenario.base_length
    return top, content + bytes(scenario.size - len(content))


async def run_scenario(scenario: Scenario, allocator: str, *, keep: bool = False,
                       workdir: str | None = None) -> RunResult:
    own = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix=f"nbdserve-{scenario.name}-{allocator}-")
    try:
        top, base_content = await make_image_pair(workdir, scenario)
        model = DiskModel(base_content, scenario.cluster_size)
        for command in scenario.setup + tuple(c for inv in scenario.invocations for c in inv) + scenario.script:
            model.apply(command)
        expected = bytes(model.data)
        actual_path = os.path.join(workdir, "actual.raw")
        trace_path = os.path.join(workdir, "trace.jsonl")
        export = Export(top, name=EXPORT, format="qcow2", allocator=allocator, delays=dict(scenario.delays),
                        trace=trace_path)
        control = os.path.join(workdir, "control.sock") if scenario.script else None
        check_results = []
        hit: dict[str, bool] = {}
        async with trio.open_nursery() as nursery:
            serving = await nursery.start(functools.partial(serve, [export], control=control))
            uri = serving.uri
            if scenario.setup:
                await qemu_io(uri, scenario.setup)
            for invocation in scenario.invocations:
                await qemu_io(uri, invocation)
            checks = pattern_checks(list(scenario.checks))
            if scenario.script:   # the checks follow in the same qemu-io process
                run = await run_script(uri, control, scenario.script + scenario.checks)
                printed, hit = dict(run.outputs), run.hit
                for check in checks:
                    check_results.append({"command": check.command,
                                          "ok": not any(PATTERN_FAILED in ln for ln in printed[check.command])})
            else:
                for check in checks:
                    r = await _run(["qemu-io", "-f", "raw", "-c", check.command, uri], check=False)
                    check_results.append({"command": check.command,
                                          "ok": PATTERN_FAILED.encode() not in r.stdout})
            await _run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, actual_path])
            serving.stop()
        with open(actual_path, "rb") as f:
            actual = f.read()
        check = await _run(["qemu-img", "check", "--output=json", top], check=False)
        verdict = json.loads(check.stdout or b"{}")
        verdict["exit"] = check.returncode
        mapped = await _run(["qemu-img", "map", "--output=json", top])
        host_map = json.loads(mapped.stdout)
        trace = read_trace(trace_path)
        host_kinds = await host_layout(top, scenario.cluster_size, host_map)
        bad = differing_ranges(expected, actual)
        return RunResult(
            scenario=scenario.name, allocator=allocator,
            corrupted=bool(bad) or not all(c["ok"] for c in check_results),
            expected_md5=hashlib.md5(expected).hexdigest(), actual_md5=hashlib.md5(actual).hexdigest(),
            bad_ranges=[[o, n] for o, n in bad], checks=check_results, qemu_img_check=verdict,
            delays=dict(scenario.delays), breakpoints=hit, workdir=workdir if keep else None,
            allocations=allocations_of(trace), culprits=find_culprits(bad, trace, host_map, scenario.cluster_size),
            cluster_size=scenario.cluster_size, trace=trace, host_map=host_map, host_kinds=host_kinds)
    finally:
        if own and not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def describe_check(verdict: dict) -> str:
    if verdict.get("exit") == 0:
        return "clean"
    parts = []
    for key in ("corruptions", "leaks", "check-errors"):
        if verdict.get(key):
            parts.append(f"{verdict[key]} {key}")
    return ", ".join(parts) or f"exit {verdict.get('exit')}"


def format_side_by_side(results: list[RunResult]) -> str:
    """One column per allocator, a row per fact."""
    def ranges(r: RunResult) -> str:
        if not r.bad_ranges:
            return "-"
        return " ".join(f"{offset_text(o)}+{size_text(n)}" for o, n in r.bad_ranges[:4]) + (" ..." if len(r.bad_ranges) > 4 else "")

    rows = [("allocator", [r.allocator for r in results]),
            ("corrupted", ["YES" if r.corrupted else "no" for r in results])]
    for tag in results[0].breakpoints:
        rows.append((f"breakpoint {tag}", ["hit" if r.breakpoints.get(tag) else "not reached" for r in results]))
    rows += [("expected md5", [r.expected_md5 for r in results]),
             ("actual md5", [r.actual_md5 for r in results]),
             ("bad ranges", [ranges(r) for r in results])]
    for i, c in enumerate(results[0].checks):
        rows.append((c["command"], ["ok" if r.checks[i]["ok"] else "FAILED" for r in results]))
    rows.append(("qemu-img check", [describe_check(r.qemu_img_check) for r in results]))
    if any(r.workdir for r in results):
        rows.append(("kept in", [r.workdir or "-" for r in results]))
    width = max(len(k) for k, _ in rows) + 2
    colw = max(len(v) for _, vals in rows for v in vals) + 2
    lines = [f"scenario {results[0].scenario}" + (f" (delays: {results[0].delays})" if results[0].delays else "")]
    for key, vals in rows:
        lines.append(key.ljust(width) + "".join(v.ljust(colw) for v in vals).rstrip())
    for r in results:
        if r.culprits:
            lines.append(f"culprits under {r.allocator}:")
            lines += [f"  {line}" for line in r.culprit_lines()]
    return "\n".join(lines)
