"""The allocation trace: every allocating write round in qemu 1.1.2's own terms, the host
writes the engine made, and the clusters it freed (``serve --trace FILE``, ``ctl trace``,
``nbdserve reproduce``).

One JSON object per line, each with ``"event"``:

- ``alloc``: a round of qemu 1.1.2 ``qcow2_alloc_cluster_offset()`` that allocated
  (QCowL2Meta): ``guest_offset`` (bytes, of the round), ``n_start``/``n_end`` (sectors
  from the round's first cluster), ``keep_clusters``, ``nb_clusters``,
  ``kept_host_offset`` (null without kept clusters), ``host_offset`` (the first new
  cluster, m->alloc_offset), ``requested_sectors``, ``avail_sectors`` (1.1.2:
  ``(keep + nb) * cluster_sectors``), ``avail_sectors_fixed`` (b7ab0fea: ``nb *
  cluster_sectors``), ``nb_available`` (the allocator's MIN(requested, avail), sectors),
  ``case_a`` (Laszlo Ersek's case (a): ``K + N < n_end <= 2K + N``, the fix changes
  nb_available and so the tail COW), ``data`` (the guest write's bytes of this round),
  ``head_cow``/``tail_cow`` (null, or the guest range read and where it was written),
  ``seq`` of each host write;
- ``write``: a write into kept clusters alone (no allocation): guest, host, length;
- ``free``: host clusters returned by ``cause`` ``discard``, ``zero`` (compressed
  clusters dropped by write-zeroes), ``replaced`` (an L2 entry pointed elsewhere),
  ``l2_table`` (an L2 table copied on write) or ``bitmap`` (a dirty bitmap's old clusters,
  stored anew at close); ``deferred`` for the fixed allocator,
  which returns them at the next flush.

Off by default: the image's ``trace`` attribute is None and each hook costs one test.
"""

from __future__ import annotations

import json
from typing import IO

SECTOR = 512


def _sectors(nbytes: int) -> int:
    return -(-nbytes // SECTOR)


def _range(guest: int, host: int, length: int, seq: int) -> dict:
    return {"guest_offset": guest, "host_offset": host, "length": length, "seq": seq}


class AllocationTrace:
    """Records of one image; written to ``path`` (JSON lines) and/or kept in memory."""

    def __init__(self, path: str | None = None, *, keep: bool = False):
        self.path = path
        self.file: IO[str] | None = open(path, "a", buffering=1) if path else None
        self.keep = keep
        self.records: list[dict] = []
        self.seq = 0          # host writes (and frees) in the order they happened
        self.allocations = 0

    def _tick(self) -> int:
        self.seq += 1
        return self.seq

    def _emit(self, record: dict) -> None:
        if self.keep:
            self.records.append(record)
        if self.file is not None:
            self.file.write(json.dumps(record, separators=(",", ":")) + "\n")

    def allocation(self, guest: int, length: int, cluster_size: int, n_start: int, n_end: int,
                   keep: int, nb: int, kept_host: int, alloc_host: int, nb_available: int,
                   covered: int, data_host: int) -> dict:
        """qcow2_alloc_cluster_offset()'s numbers for a round of a write of ``length`` bytes at
        ``guest`` (bytes in; sectors out where qemu had sectors, rounded up for writes not
        aligned to sectors); the record is emitted by done(), once its COW is known."""
        requested = n_end - keep * cluster_size
        avail = (keep + nb) * cluster_size
        avail_fixed = nb * cluster_size
        self.allocations += 1
        return {
            "event": "alloc", "index": self.allocations - 1,
            "guest_offset": guest, "length": length, "cluster_size": cluster_size,
            "n_start": n_start // SECTOR, "n_end": _sectors(n_end),
            "keep_clusters": keep, "nb_clusters": nb,
            "kept_host_offset": kept_host if keep else None, "host_offset": alloc_host,
            "requested_sectors": _sectors(requested), "avail_sectors": avail // SECTOR,
            "avail_sectors_fixed": avail_fixed // SECTOR, "nb_available": _sectors(nb_available),
            # the thread, Jan 22 2013: N < n_end - K <= K + N
            "case_a": avail_fixed < requested <= avail,
            "data": {"guest_offset": guest + n_start, "host_offset": data_host, "length": covered, "seq": 0},
            "head_cow": None, "tail_cow": None,
        }

    def data_written(self, record: dict) -> None:
        record["data"]["seq"] = self._tick()

    def cow(self, record: dict, which: str, guest: int, host: int, length: int) -> None:
        """A COW (``head_cow``/``tail_cow``) of ``record`` was written (qemu: copy_sectors)."""
        record[which] = _range(guest, host, length, self._tick())

    def done(self, record: dict) -> None:
        self._emit(record)

    def write(self, guest: int, host: int, length: int) -> None:
        """A write into kept COPIED clusters: no allocation, one host range."""
        self._emit({"event": "write", "guest_offset": guest, "host_offset": host, "length": length,
                    "seq": self._tick()})

    def free(self, cause: str, host: int, length: int, deferred: bool) -> None:
        self._emit({"event": "free", "cause": cause, "host_offset": host, "length": length,
                    "deferred": deferred, "seq": self._tick()})

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def read_trace(path: str) -> list[dict]:
    """The records of a trace file, in the order they were written."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
