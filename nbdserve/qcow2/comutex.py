"""The image's metadata lock, with the scheduling of qemu's CoMutex."""

from __future__ import annotations

import trio


class CoMutex:
    """A trio.Lock that is taken without a checkpoint when it is free.

    qemu: qemu_co_mutex_lock() yields only when another coroutine holds the mutex, and
    qemu_co_mutex_unlock() wakes the next waiter without yielding.  trio.Lock.acquire()
    always passes through the scheduler; a request taking and releasing the lock three
    times per allocating write paid for that on every write."""

    def __init__(self) -> None:
        self._lock = trio.Lock()

    def locked(self) -> bool:
        return self._lock.locked()

    def try_acquire(self) -> bool:
        """Take the lock if it is free (True), without a checkpoint."""
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            return False
        return True

    async def acquire(self) -> None:
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()

    def release(self) -> None:
        self._lock.release()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc) -> None:
        self.release()
