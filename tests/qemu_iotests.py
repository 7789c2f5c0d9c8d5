"""qemu-iotests of the installed qemu (fetched by tests/qemu_source.py): their scripts, filters
and reference outputs, read at test time.

Filters are qemu's own shell functions: :func:`qemu_filter` sources the fetched
``common.filter`` in bash and pipes text through one of them (``_filter_qemu_io``, ...), with
``gsed`` defined as common.rc defines it on a GNU system.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from qemu_source import qemu_iotests_dir

SIZE_SUFFIXES = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def qemu_filter(text: str, *filters: str) -> str:
    """``text`` piped through the common.filter functions ``filters`` (in that order)."""
    pipeline = " | ".join(filters)
    script = f'gsed() {{ sed "$@"; }}; . ./common.filter && {pipeline}'
    p = subprocess.run(["bash", "-c", script], cwd=qemu_iotests_dir(), input=text,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"common.filter {pipeline} exited {p.returncode}: {p.stderr}"
    return p.stdout


def parse_size(text: str) -> int:
    """qemu's size syntax as iotests write it (``128M``, ``64k``)."""
    m = re.fullmatch(r"(\d+)([kKmMgGtT]?)", text)
    assert m, f"not a size: {text!r}"
    return int(m.group(1)) * SIZE_SUFFIXES[m.group(2).lower()]


def heredoc(script: str, function: str) -> list[str]:
    """The lines of the ``cat <<EOF ... EOF`` inside shell function ``function()``."""
    m = re.search(rf"^{re.escape(function)}\(\)\s*\{{\s*cat <<EOF\n(.*?)\nEOF\n\}}", script,
                  re.MULTILINE | re.DOTALL)
    assert m, f"no {function}() with a here-document"
    return m.group(1).splitlines()


@dataclass
class Iotest047:
    """qemu-iotests 047: one qemu-io command list, piped into one qemu-io on a fresh image."""

    size: int                 # _make_test_img $size
    commands: list[str]       # qemu_io_cmds, blank lines dropped
    expected: list[str]       # 047.out


def iotest_047() -> Iotest047:
    iotests = qemu_iotests_dir()
    script = (iotests / "047").read_text()
    # The shape this test relies on; a different 047 must be looked at, not half-run.
    for needed in ("_supported_fmt qcow2", "_make_test_img $size",
                   'qemu_io_cmds | $QEMU_IO "$TEST_IMG" | _filter_qemu_io', "_check_test_img"):
        assert needed in script, f"{iotests / '047'} no longer has {needed!r}"
    size = re.search(r"^size=(\S+)$", script, re.MULTILINE)
    assert size, "047 sets no size="
    commands = [c.strip() for c in heredoc(script, "qemu_io_cmds") if c.strip()]
    return Iotest047(size=parse_size(size.group(1)), commands=commands,
                     expected=(iotests / "047.out").read_text().splitlines())
