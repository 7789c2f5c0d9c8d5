"""Writing the image file: every byte, or an error; zeroing a range with fallocate(2); where
its holes are; and the one seam every write, zeroing and fsync of the qcow2 engine goes through.

``observers`` see each completed write (a zeroed range as a write of zeros) and fsync
(tests/test_power_cut.py records them to build the files a power cut could leave); empty,
it costs one test per call.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from typing import Protocol

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


class IoObserver(Protocol):
    def wrote(self, fd: int, offset: int, data: bytes) -> None: ...
    def synced(self, fd: int, writes_before: int) -> None: ...
    def writes_seen(self) -> int: ...


observers: list[IoObserver] = []


def pwrite_all(fd: int, data, offset: int) -> None:
    """``os.pwrite`` until all of ``data`` is written.  A filesystem that fills up mid-write
    returns a short count; the retry then fails with ENOSPC (qemu's file-posix
    handle_aiocb_rw_linear loops the same way), so no partial write passes for a whole one."""
    mv = data if type(data) is bytes or type(data) is bytearray else memoryview(data).cast("B")
    done = 0
    while done < len(mv):
        # the buffer as it is; a slice only after a short write (a file system filling up)
        n = os.pwrite(fd, mv[done:] if done else mv, offset + done)
        if n == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        for observer in observers:
            observer.wrote(fd, offset + done, bytes(mv[done:done + n]))
        done += n


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _zeroed(fd: int, offset: int, length: int) -> None:
    for observer in observers:
        observer.wrote(fd, offset, bytes(length))


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate a range of a file, keeping its size (fallocate(2) PUNCH_HOLE)."""
    _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
    _zeroed(fd, offset, length)


def zero_allocated(fd: int, offset: int, length: int) -> bool:
    """Make a range read as zeros and stay allocated, without writing them: qemu file-posix
    handle_aiocb_write_zeroes() (FALLOC_FL_ZERO_RANGE, else PUNCH_HOLE then fallocate(0)).
    Past the end of the file, the file grows.  False when the file system can do neither."""
    try:
        _fallocate(fd, _FALLOC_FL_ZERO_RANGE, offset, length)
        _zeroed(fd, offset, length)
        return True
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
    try:
        punch_hole(fd, offset, length)
        _fallocate(fd, 0, offset, length)
        return True
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
    return False


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
