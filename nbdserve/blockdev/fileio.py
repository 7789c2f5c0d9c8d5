"""Writing the image file: every byte, or an error; and where its holes are."""

from __future__ import annotations

import errno
import os


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
        done += n


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
