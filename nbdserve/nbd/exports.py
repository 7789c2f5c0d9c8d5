"""The export catalog the application hands to the protocol core: pure data."""

from __future__ import annotations

from dataclasses import dataclass, field

from .constants import CONTEXT_BASE_ALLOCATION, CONTEXT_QEMU_ALLOCATION_DEPTH, TransmissionFlag

DEFAULT_MIN_BLOCK = 1
DEFAULT_PREFERRED_BLOCK = 4096
DEFAULT_MAX_BLOCK = 32 * 1024 * 1024
ALL_CONTEXTS = (CONTEXT_BASE_ALLOCATION, CONTEXT_QEMU_ALLOCATION_DEPTH)


@dataclass(frozen=True)
class ExportInfo:
    """What the client learns about one export (proto.md: "NBD_REP_INFO")."""

    name: str
    size: int
    flags: TransmissionFlag
    description: str = ""
    min_block: int = DEFAULT_MIN_BLOCK
    preferred_block: int = DEFAULT_PREFERRED_BLOCK
    max_block: int = DEFAULT_MAX_BLOCK
    meta_contexts: tuple[str, ...] = field(default=ALL_CONTEXTS)

    def __post_init__(self):
        # proto.md: "Block size constraints"
        if not (_power_of_two(self.min_block) and self.min_block <= 65536):
            raise ValueError(f"minimum block size {self.min_block} is not a power of 2 <= 64 KiB")
        if not (_power_of_two(self.preferred_block) and self.preferred_block >= max(self.min_block, 512)):
            raise ValueError(f"preferred block size {self.preferred_block} is invalid")
        if self.max_block < self.preferred_block or self.max_block % self.min_block or self.max_block >= 1 << 32:
            raise ValueError(f"maximum block size {self.max_block} is invalid")
        if not self.flags & TransmissionFlag.HAS_FLAGS:
            raise ValueError("transmission flags must include HAS_FLAGS")


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class ExportCatalog:
    """Exports by name; the first one is also the default export (empty name)."""

    def __init__(self, exports: list[ExportInfo]):
        self.exports = list(exports)
        self._by_name = {e.name: e for e in self.exports}
        if len(self._by_name) != len(self.exports):
            raise ValueError("duplicate export names")

    def lookup(self, name: str) -> ExportInfo | None:
        if name == "" and "" not in self._by_name and self.exports:
            return self.exports[0]
        return self._by_name.get(name)
