"""qemu's own iotests (fetched at test time) with nbdserve-qemu-nbd as their qemu-nbd.

``./check -raw -nbd`` (every test's image is served by QEMU_NBD_PROG) and the qcow2/raw
tests that start qemu-nbd themselves run twice, unchanged: with Debian's qemu-nbd, then
with ``QEMU_NBD_PROG=nbdserve-qemu-nbd``.  Every test that passes with qemu-nbd must pass
with nbdserve, except those the README lists as encoding qemu-nbd's identity (read from
the README here, so the list and its reasons live in one place).  Both result tables are
printed.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import subprocess
from pathlib import Path

import pytest

from qemu_source import qemu_iotests_dir

REPO = Path(__file__).resolve().parent.parent
DROPIN = str(Path(sys.executable).parent / "nbdserve-qemu-nbd")

# (check arguments, tests): the -raw -nbd tests that pass with Debian's qemu-nbd here
# (/work/shared/reference/testing-notes.md), then those that start qemu-nbd themselves.
RUNS = [
    (["-raw", "-nbd"], ["001", "002", "003", "004", "008", "009", "010", "011", "021", "032", "033",
                        "077", "104", "123", "197", "215", "241", "259"]),
    (["-qcow2"], ["058", "209", "302", "nbd-qemu-allocation", "nbd-reconnect-on-open"]),
    (["-raw"], ["block-status-cache"]),
]
IDENTITY_HEADING = "### qemu-iotests that encode qemu-nbd's identity"
RESULT = re.compile(r"^(\S+)\s+(pass|fail|not run)\b")


def identity_tests() -> dict[str, str]:
    """The README's list under IDENTITY_HEADING: ``- `NAME`: reason`` lines."""
    text = (REPO / "README.md").read_text()
    assert IDENTITY_HEADING in text, f"README.md has no {IDENTITY_HEADING!r} section"
    section = text.split(IDENTITY_HEADING, 1)[1].split("\n#", 1)[0]
    return dict(re.findall(r"^- `([^`]+)`: (.+)$", section, re.MULTILINE))


def run_check(qemu_nbd: str, args: list[str], tests: list[str], scratch: Path) -> tuple[dict[str, str], str]:
    """``./check ARGS TESTS`` with QEMU_NBD_PROG=qemu_nbd: test -> pass/fail/not run, and the output."""
    env = {**os.environ,
           "QEMU_PROG": shutil.which("qemu-system-x86_64") or "qemu-system-x86_64",
           "QEMU_IMG_PROG": shutil.which("qemu-img") or "qemu-img",
           "QEMU_IO_PROG": shutil.which("qemu-io") or "qemu-io",
           "QSD_PROG": shutil.which("qemu-storage-daemon") or "qemu-storage-daemon",
           "QEMU_NBD_PROG": qemu_nbd,
           "TEST_DIR": str(scratch / "test"), "SOCK_DIR": str(scratch / "sock")}
    for name in ("test", "sock"):
        (scratch / name).mkdir(exist_ok=True)
    # /usr/bin/python3: Debian's, which has python3-libnbd (the venv's has not).
    p = subprocess.run(["/usr/bin/python3", "./check", *args, *tests], cwd=qemu_iotests_dir(), env=env,
                       capture_output=True, text=True, timeout=1800)
    out = p.stdout + p.stderr
    results = {}
    for line in out.replace("\r", "\n").splitlines():
        m = RESULT.match(line)
        if m and m.group(1) in tests:
            results[m.group(1)] = m.group(2)
    missing = [t for t in tests if t not in results]
    assert not missing, f"./check {' '.join(args)} gave no result for {missing}:\n{out[-5000:]}"
    return results, out


def table(title: str, results: dict[str, str]) -> str:
    width = max(map(len, results))
    return "\n".join([title] + [f"  {t:<{width}}  {r}" for t, r in results.items()])


@pytest.mark.slow
def test_qemu_iotests_pass_with_nbdserve_as_with_qemu_nbd():
    identity = identity_tests()
    assert identity and all(reason.strip() for reason in identity.values())
    qemu, ours, outputs = {}, {}, []
    with tempfile.TemporaryDirectory(prefix="iot", dir="/tmp") as scratch:   # short: Unix socket paths
        for args, tests in RUNS:
            for server, results in (("/usr/bin/qemu-nbd", qemu), (DROPIN, ours)):
                got, out = run_check(server, args, tests, Path(scratch))
                results.update({f"{' '.join(args)} {t}": r for t, r in got.items()})
                outputs.append(out)
    print(table("Debian's qemu-nbd:", qemu))
    print(table("nbdserve-qemu-nbd:", ours))
    # The list passes with qemu-nbd here (testing-notes.md); one that does not means the runs are broken.
    assert all(r == "pass" for r in qemu.values()), table("qemu-nbd failed some:", qemu)
    unexpected = [t for t, r in ours.items() if r != "pass" and t.split()[-1] not in identity]
    assert not unexpected, (f"fail with nbdserve-qemu-nbd, pass with qemu-nbd: {unexpected}\n"
                            + table("nbdserve-qemu-nbd:", ours) + "\n" + "\n".join(outputs)[-20000:])
    stale = [name for name in identity if all(r == "pass" for t, r in ours.items() if t.split()[-1] == name)]
    assert not stale, f"README lists {stale} as encoding qemu-nbd's identity, but they pass: drop them"
