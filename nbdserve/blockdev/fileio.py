"""Writing the image file: every byte, or an error; where its holes are; and the one seam
every write and fsync of the qcow2 engine goes through.

``observers`` see each completed write and fsync (tests/test_power_cut.py records them to
build the files a power cut could leave); empty, it costs one test per call.
"""

from __future__ import annotations

import errno
import os
from typing import Protocol


class IoObserver(Protocol):
    def wrote(self, fd: int, offset: int, data: bytes) -> None: ...
    def synced(self, fd: int, writes_before: int) -> None: ...
    def writes_seen(self) -> int: ...


observers: list[IoObserver] = []


def pwrite_all(fd: int, data, offset: int) -> None:
    """``os.pwrite`` until all of ``data`` is written.  A filesystem that fills up mid-write
    returns a short count; the retry then fails with ENOSPC (qemu's file-posix
    handle_aiocb_rw_linear loops the same way), so no partial write passes for a whole one."""
    mv = memoryview(data).cast("B")
    done = 0
    while done < len(mv):
        n = os.pwrite(fd, mv[done:], offset + done)
        if n == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        for observer in observers:
            observer.wrote(fd, offset + done, bytes(mv[done:done + n]))
        done += n


def fsync(fd: int) -> None:
    """os.fsync; an observer learns which writes it made durable: those completed before
    it was called (a write completing meanwhile may or may not be)."""
    if not observers:
        os.fsync(fd)
        return
    before = [o.writes_seen() for o in observers]
    os.fsync(fd)
    for observer, n in zip(observers, before):
        observer.synced(fd, n)


def host_runs(fd: int, offset: int, length: int):
    """(length, is_hole) runs of the file over [offset, offset + length), by SEEK_DATA /
    SEEK_HOLE (past the end of the file is a hole), as qemu's file-posix block_status asks."""
    pos, end = offset, offset + length
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            data = end
        if data > pos:
            step = min(data, end) - pos
            yield step, True
        else:
            step = min(os.lseek(fd, pos, os.SEEK_HOLE), end) - pos
            yield step, False
        pos += step
