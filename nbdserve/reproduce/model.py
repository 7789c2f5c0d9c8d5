"""What a qemu-io command sequence must leave on the disk: a bytearray model.

The expected bytes of every scenario come from here, i.e. from the scenario's
own commands, never from the allocator under test.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

QEMU_IO_DEFAULT_PATTERN = 0xCD     # qemu-io: "write" without -P


def parse_size(text: str) -> int:
    """qemu-io sizes: 4096, 0x1000, 64k, 1M, 2G."""
    text = text.strip()
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}.get(text[-1:].lower())
    if mult:
        return int(text[:-1], 0) * mult
    return int(text, 0)


@dataclass
class PatternCheck:
    """``read -P PATTERN OFFSET LENGTH``."""

    command: str
    pattern: int
    offset: int
    length: int


class DiskModel:
    """The guest-visible content after a list of qemu-io commands (qcow2 v3 semantics)."""

    def __init__(self, base: bytes, cluster_size: int):
        self.data = bytearray(base)
        self.cluster_size = cluster_size

    def apply(self, command: str) -> None:
        argv = shlex.split(command)
        op, args = argv[0], argv[1:]
        if op in ("write", "aio_write"):
            pattern = QEMU_IO_DEFAULT_PATTERN
            zero = False
            while args and args[0].startswith("-"):
                flag = args.pop(0)
                if flag == "-P":
                    pattern = int(args.pop(0), 0)
                elif flag == "-z":
                    zero = True
            off, length = parse_size(args[0]), parse_size(args[1])
            self.data[off:off + length] = bytes([0 if zero else pattern]) * length
        elif op == "discard":
            # qcow2 v3: whole clusters read as zeros afterwards; partial ones are untouched
            off, length = parse_size(args[0]), parse_size(args[1])
            cs = self.cluster_size
            first = -(-off // cs) * cs
            last = (off + length) // cs * cs
            if last > first:
                self.data[first:last] = bytes(last - first)
        elif op in ("aio_flush", "flush", "sleep", "break", "wait_break", "resume", "remove_break"):
            pass
        else:
            raise ValueError(f"the model does not know qemu-io command {op!r}")


def pattern_checks(commands: list[str]) -> list[PatternCheck]:
    checks = []
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "read" and argv[1] == "-P", command
        checks.append(PatternCheck(command, int(argv[2], 0), parse_size(argv[3]), parse_size(argv[4])))
    return checks


def differing_ranges(expected: bytes, actual: bytes, granularity: int = 512) -> list[tuple[int, int]]:
    """[(offset, length)] of the runs of ``granularity``-sized blocks that differ."""
    ranges: list[tuple[int, int]] = []
    n = min(len(expected), len(actual))
    for off in range(0, n, granularity):
        if expected[off:off + granularity] != actual[off:off + granularity]:
            if ranges and ranges[-1][0] + ranges[-1][1] == off:
                ranges[-1] = (ranges[-1][0], ranges[-1][1] + granularity)
            else:
                ranges.append((off, granularity))
    if len(expected) != len(actual):
        ranges.append((n, abs(len(expected) - len(actual))))
    return ranges
