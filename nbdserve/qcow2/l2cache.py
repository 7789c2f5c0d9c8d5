"""A bounded write-back cache of L2 tables (qcow2.txt: "Cluster mapping").

Tables are kept decoded as native ``array('Q')``; extended L2 tables hold the
entry at 2*i and its subcluster bitmap at 2*i+1.  Dirty tables are written by
the image's flush, after the data they point at is durable.
"""

from __future__ import annotations

import errno
import os
import sys
from array import array
from collections import OrderedDict
from typing import Callable

from ..blockdev.fileio import pwrite_all

_LITTLE = sys.byteorder == "little"


def decode_table(raw: bytes) -> array:
    a = array("Q", raw)
    if _LITTLE:
        a.byteswap()
    return a


def encode_table(table: array) -> bytes:
    out = array("Q", table)
    if _LITTLE:
        out.byteswap()
    return out.tobytes()


class L2Cache:
    def __init__(self, fd: int, cluster_size: int, max_tables: int,
                 make_room: Callable[[], None]):
        self.fd = fd
        self.cluster_size = cluster_size
        self.max_tables = max(4, max_tables)
        self.tables: OrderedDict[int, array] = OrderedDict()
        self.dirty: set[int] = set()
        self.make_room = make_room      # writes dirty tables back (with the ordering flush needs)

    def get(self, offset: int) -> array:
        t = self.tables.get(offset)
        if t is not None:
            self.tables.move_to_end(offset)
            return t
        raw = os.pread(self.fd, self.cluster_size, offset)
        if len(raw) < self.cluster_size:
            raise OSError(errno.EIO, f"L2 table at {offset:#x} lies past the end of the file")
        return self.put(offset, decode_table(raw))

    def put(self, offset: int, table: array, dirty: bool = False) -> array:
        self.tables[offset] = table
        self.tables.move_to_end(offset)
        if dirty:
            self.dirty.add(offset)
        if len(self.tables) > self.max_tables:
            self._evict(keep=offset)
        return table

    def mark_dirty(self, offset: int) -> None:
        self.dirty.add(offset)

    def _evict(self, keep: int) -> None:
        """Drop the least recently used clean table, never ``keep`` (the one being returned:
        its caller may be about to change it)."""
        for off in self.tables:
            if off not in self.dirty and off != keep:
                del self.tables[off]
                return
        self.make_room()
        self.tables.popitem(last=False)     # the LRU end; ``keep`` is at the other

    def write_dirty(self) -> int:
        n = 0
        for off in sorted(self.dirty):
            pwrite_all(self.fd, encode_table(self.tables[off]), off)
            n += 1
        self.dirty.clear()
        return n

    def drop(self, offset: int) -> None:
        self.tables.pop(offset, None)
        self.dirty.discard(offset)
