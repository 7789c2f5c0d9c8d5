"""The result of a check, printed as ``qemu-img check`` prints it (qemu-img.c: collect_image_check,
dump_human_image_check, dump_json_image_check)."""

from __future__ import annotations

from dataclasses import dataclass, field

# qemu: BdrvCheckMode (BDRV_FIX_LEAKS, BDRV_FIX_ERRORS)
FIX_LEAKS = 1
FIX_ERRORS = 2


@dataclass
class CheckResult:
    filename: str
    format: str = "qcow2"
    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    failed: str | None = None          # qemu: "Check failed: ..." (the check itself stopped)
    messages: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """qemu-img check: 0 clean, 1 check errors (or failure), 2 corruptions, 3 leaks only."""
        if self.failed or self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0

    def to_json(self) -> dict:
        """The keys of ``qemu-img check --output=json`` (optional ones only when nonzero), in
        the order qemu-img prints them."""
        values = {"filename": self.filename, "format": self.format, "check-errors": self.check_errors}
        for key in _OPTIONAL_KEYS:
            value = getattr(self, key.replace("-", "_"))
            if value:
                values[key] = value
        return {key: values[key] for key in _JSON_ORDER if key in values}

    def human(self) -> str:
        """The summary qemu-img check prints on stdout."""
        lines: list[str] = []
        if not (self.corruptions or self.leaks or self.check_errors):
            lines.append("No errors were found on the image.")
        else:
            if self.corruptions:
                lines += ["", f"{self.corruptions} errors were found on the image.",
                          "Data may be corrupted, or further writes to the image may corrupt it."]
            if self.leaks:
                lines += ["", f"{self.leaks} leaked clusters were found on the image.",
                          "This means waste of disk space, but no harm to data."]
            if self.check_errors:
                lines += ["", f"{self.check_errors} internal errors have occurred during the check."]
        if self.total_clusters and self.allocated_clusters:
            a = self.allocated_clusters
            lines.append(f"{a}/{self.total_clusters} = {a * 100.0 / self.total_clusters:0.2f}% allocated, "
                         f"{self.fragmented_clusters * 100.0 / a:0.2f}% fragmented, "
                         f"{self.compressed_clusters * 100.0 / a:0.2f}% compressed clusters")
        if self.image_end_offset:
            lines.append(f"Image end offset: {self.image_end_offset}")
        return "\n".join(lines) + "\n"

    def counts(self) -> dict[str, int]:
        """The counters a repair saves and restores between its passes."""
        return {name: getattr(self, name) for name in COUNTS}

    def set_counts(self, counts: dict[str, int]) -> None:
        for name, value in counts.items():
            setattr(self, name, value)


COUNTS = ("corruptions", "leaks", "check_errors", "corruptions_fixed", "leaks_fixed",
          "allocated_clusters", "fragmented_clusters", "compressed_clusters")


def _qdict_bucket(key: str) -> int:
    """qemu: qobject/qdict.c tdb_hash(key) % QDICT_BUCKET_MAX."""
    value = (0x238F13AF * len(key)) & 0xFFFFFFFF
    for i, ch in enumerate(key.encode()):
        value = (value + (ch << (i * 5 % 24))) & 0xFFFFFFFF
    return ((1103515243 * value + 12345) & 0xFFFFFFFF) % 512


# qapi/block-core.json ImageCheck, in its declared order (the order the QDict is filled)
_QAPI_KEYS = ("filename", "format", "check-errors", "image-end-offset", "corruptions", "leaks",
              "corruptions-fixed", "leaks-fixed", "total-clusters", "allocated-clusters",
              "fragmented-clusters", "compressed-clusters")
_OPTIONAL_KEYS = _QAPI_KEYS[3:]
# qemu-img prints the QDict bucket by bucket (these keys fall in distinct buckets)
_JSON_ORDER = sorted(_QAPI_KEYS, key=_qdict_bucket)
assert len({_qdict_bucket(k) for k in _QAPI_KEYS}) == len(_QAPI_KEYS)
