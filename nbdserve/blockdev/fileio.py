"""Writing the image file: every byte, or an error."""

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
