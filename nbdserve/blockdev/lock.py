"""qemu's image locks: OFD byte-range locks on every image file (qemu >= 2.10).

qemu block/file-posix.c raw_apply_lock_bytes / raw_check_lock_bytes: byte
100 + i is read-locked while a process holds permission bit i, byte 200 + i
while it does NOT share bit i with others; a new opener first takes its own
read locks, then tests (F_OFD_GETLK, F_WRLCK) the shared byte of each
permission it wants and the permission byte of each one it refuses to share.
Locks are advisory, belong to the open file description and go with its close.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

# include/block/block-common.h BLK_PERM_*, with bdrv_perm_names()'s names
CONSISTENT_READ, WRITE, WRITE_UNCHANGED, RESIZE = 0x01, 0x02, 0x04, 0x08
PERM_ALL = 0x0f
PERM_NAMES = {CONSISTENT_READ: "consistent read", WRITE: "write",
              WRITE_UNCHANGED: "write unchanged", RESIZE: "resize"}
LOCK_PERM_BASE, LOCK_SHARED_BASE = 100, 200

# What qemu 7.2 takes on an image's file (seen in /proc/locks with qemu-nbd and qemu-io):
#   writable qcow2:            perm read+write+resize, shares all but write and resize
#   writable raw:              perm read+write (raw never resizes); qemu-nbd shares write
#                              there, nbdserve does not: two writers never share an image
#   read-only (qcow2 backing): perm read, shares all but write and resize
#   raw backing file, or -U:   perm read, shares everything (the qcow2 above guards it)
WRITABLE = (CONSISTENT_READ | WRITE | RESIZE, PERM_ALL & ~(WRITE | RESIZE))
RAW_WRITABLE = (CONSISTENT_READ | WRITE, PERM_ALL & ~(WRITE | RESIZE))
READ_ONLY = (CONSISTENT_READ, PERM_ALL & ~(WRITE | RESIZE))
SHARED_READ = (CONSISTENT_READ, PERM_ALL)

_FLOCK = "hhqqi4x"      # struct flock on Linux x86-64 / aarch64: l_type, l_whence, l_start, l_len, l_pid


class LockError(OSError):
    """Another process holds a lock that conflicts: qemu's one-line message."""


def lock_mode(read_only: bool, force_share: bool = False, *, raw: bool = False,
              backing: bool = False) -> tuple[int, int]:
    """(perm, shared) of one file of a chain, as qemu takes them; ``backing``: a raw backing file."""
    if backing or force_share:
        return SHARED_READ
    if read_only:
        return READ_ONLY
    return RAW_WRITABLE if raw else WRITABLE


def _fcntl(fd: int, cmd: int, l_type: int, offset: int) -> int:
    arg = struct.pack(_FLOCK, l_type, os.SEEK_SET, offset, 1, 0)
    while True:
        try:
            out = fcntl.fcntl(fd, cmd, arg)
            return struct.unpack(_FLOCK, out)[0]
        except InterruptedError:
            continue


def _held_by_another(fd: int, offset: int) -> bool:
    """qemu_lock_fd_test(fd, off, 1, true): would a write lock on the byte conflict?"""
    return _fcntl(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, offset) != fcntl.F_UNLCK


def lock_image(fd: int, path: str, perm: int, shared: int) -> None:
    """Take qemu's locks for ``perm``/``shared`` on ``fd`` (raw_apply_lock_bytes), then fail
    with LockError if another process holds one that conflicts (raw_check_lock_bytes)."""
    try:
        for bit in range(4):
            if perm & (1 << bit):
                _fcntl(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, LOCK_PERM_BASE + bit)
            if not shared & (1 << bit):
                _fcntl(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, LOCK_SHARED_BASE + bit)
        message = None
        for bit in range(4):
            if perm & (1 << bit) and _held_by_another(fd, LOCK_SHARED_BASE + bit):
                message = f'Failed to get "{PERM_NAMES[1 << bit]}" lock'
                break
        else:
            for bit in range(4):
                if not shared & (1 << bit) and _held_by_another(fd, LOCK_PERM_BASE + bit):
                    message = f'Failed to get shared "{PERM_NAMES[1 << bit]}" lock'
                    break
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):   # a conflicting write lock (not qemu's)
            message = "Failed to lock the image"
        else:
            raise LockError(e.errno, f"Failed to lock the image: {os.strerror(e.errno)}") from None
    if message is not None:   # the caller closes fd, which drops the locks taken above
        raise LockError(errno.EAGAIN, f"{message}: Is another process using the image [{path}]?")

