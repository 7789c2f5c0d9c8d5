"""How much a connection may have in flight in request tasks."""

from __future__ import annotations

import trio

from ..nbd import Command

MAX_REQUESTS = 256            # requests per connection handed to tasks
MAX_BYTES = 64 << 20          # their write payloads and read replies together


def buffered_bytes(request) -> int:
    """What a request holds in memory until its reply is sent: a write's payload, a read's data."""
    return request.length if request.command in (Command.READ, Command.WRITE) and not request.error else 0


class InFlight:
    """At most MAX_REQUESTS requests and MAX_BYTES of their data at a time (one request alone
    may exceed MAX_BYTES: the advertised maximum block size bounds it).  The reading loop
    waits in admit(), and so stops reading: a client pipelining 32 MiB writes against a slow
    image cannot make the server hold 256 x 32 MiB."""

    def __init__(self, max_requests: int = MAX_REQUESTS, max_bytes: int = MAX_BYTES):
        self.max_requests, self.max_bytes = max_requests, max_bytes
        self.requests = 0
        self.bytes = 0
        self._freed = trio.Event()

    def _fits(self, nbytes: int) -> bool:
        return self.requests < self.max_requests and (self.bytes == 0 or self.bytes + nbytes <= self.max_bytes)

    async def admit(self, nbytes: int) -> None:
        while not self._fits(nbytes):   # no checkpoint while it fits: one request after another
            await self._freed.wait()
        self.requests += 1
        self.bytes += nbytes

    def done(self, nbytes: int) -> None:
        self.requests -= 1
        self.bytes -= nbytes
        self._freed.set()
        self._freed = trio.Event()
