"""Sending replies: in order of completion, never interleaved, several per system call.

Replies are queued as buffers (a header, then read data that is not copied); one task at
a time sends, and what other requests queue meanwhile leaves with its next send.  A
plain socket gets the buffers with one sendmsg(2) (scatter-gather), and the FileSlices of
read-only layers with sendfile(2), page cache to socket; any other stream (TLS) gets the
batch joined, FileSlices read first.
"""

from __future__ import annotations

import errno
import os
import socket

import trio

from ..blockdev.base import FileSlice, materialize

IOV_MAX = 1024            # sendmsg(2): buffers per call (Linux UIO_MAXIOV)
HIGH_WATER = 4 << 20      # queued bytes above which a request waits for the send to drain


class ReplySender:
    def __init__(self, stream: trio.abc.SendStream):
        self._stream = stream
        # A plain socket is written with sendmsg(2) in a loop until the kernel takes no more;
        # trio's socket methods would pass through the scheduler after every partial send.
        self._socket: socket.socket | None = None
        if isinstance(stream, trio.SocketStream):
            self._socket = socket.socket(fileno=os.dup(stream.socket.fileno()))
            self._socket.setblocking(False)
        self._queue: list = []
        self._queued_slices = False         # a FileSlice is in _queue
        self.queued = 0                     # bytes queued and not yet handed to the kernel
        self._sending = False
        self._drained = trio.Event()        # set (and replaced) after each send
        self._failure: BaseException | None = None

    @property
    def takes_file_slices(self) -> bool:
        """FileSlice replies go out with sendfile(2) on a plain socket (TLS needs the bytes)."""
        return self._socket is not None

    def queue(self, parts: list) -> None:
        """Add one reply (its buffers, in order); it leaves with the next send()."""
        self._queue.extend(parts)
        self.queued += sum(map(len, parts))
        if type(parts[-1]) is FileSlice:   # a read's data, after its header
            self._queued_slices = True

    async def send(self) -> None:
        """Send what is queued.  If another task is already sending, it takes our replies
        along; we only wait while more than HIGH_WATER bytes are queued (backpressure)."""
        if self._failure is not None:
            raise trio.BrokenResourceError("reply stream failed") from self._failure
        if self._sending:
            while self._sending and self.queued > HIGH_WATER:
                await self._drained.wait()
            if self._failure is not None:
                raise trio.BrokenResourceError("reply stream failed") from self._failure
            return
        self._sending = True
        try:
            if trio.lowlevel.current_statistics().tasks_runnable:
                # requests finishing in this scheduler batch add their replies to this send
                await trio.lowlevel.checkpoint()
            while self._queue:
                batch, slices = self._queue, self._queued_slices
                self._queue, self._queued_slices = [], False
                if not slices and len(batch) <= IOV_MAX and self._socket is not None:
                    batch = self._send_at_once(batch)
                if batch:
                    await self._send_batch(batch)
                self._wake()
        except trio.Cancelled:
            if self._socket is None:   # send_all cancelled midway leaves the stream unusable
                self._failure = trio.BrokenResourceError("reply send cancelled")
            raise   # the socket path put back what it had not sent; the next send() goes on
        except BaseException as exc:
            self._failure = exc
            raise
        finally:
            self._sending = False
            self._wake()

    def close(self) -> None:
        if self._socket is not None:
            trio.lowlevel.notify_closing(self._socket)   # trio: before closing an fd it may watch
            self._socket.close()

    def _wake(self) -> None:
        self._drained.set()
        self._drained = trio.Event()

    def _send_at_once(self, batch: list) -> list:
        """One sendmsg(2) of a batch of buffers (no FileSlice), the usual case: what the
        kernel did not take, for _send_batch."""
        total = self.queued   # the batch is all that was queued
        try:
            sent = self._socket.sendmsg(batch)
        except BlockingIOError:
            return batch
        except OSError as exc:   # as trio.SocketStream.send_all reports a lost peer
            raise trio.BrokenResourceError(f"socket send failed: {exc}") from exc
        self.queued -= sent
        if sent == total:
            return []
        rest = [memoryview(b).cast("B") for b in batch]
        while sent >= len(rest[0]):
            sent -= len(rest.pop(0))
        rest[0] = rest[0][sent:]
        return rest

    async def _send_batch(self, batch: list) -> None:
        if self._socket is None:
            data = materialize(batch[0]) if len(batch) == 1 else b"".join(map(materialize, batch))
            await self._stream.send_all(data)
            self.queued -= sum(map(len, batch))
            return
        items = [b if type(b) is FileSlice else memoryview(b).cast("B") for b in batch if len(b)]
        first = 0
        try:
            while first < len(items):
                try:
                    sent = self._send_some(items, first)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(self._socket)
                    continue
                except OSError as exc:   # as trio.SocketStream.send_all reports a lost peer
                    raise trio.BrokenResourceError(f"socket send failed: {exc}") from exc
                self.queued -= sent
                while sent:   # skip what went out; a partly sent item keeps its tail
                    if sent >= len(items[first]):
                        sent -= len(items[first])
                        first += 1
                    elif type(items[first]) is FileSlice:
                        items[first] = items[first].after(sent)
                        sent = 0
                    else:
                        items[first] = items[first][sent:]
                        sent = 0
        except trio.Cancelled:
            self._queue[:0] = items[first:]   # unsent, in order, ahead of what came since
            self._queued_slices = True        # perhaps: the next send takes the general path
            raise

    def _send_some(self, items: list, first: int) -> int:
        """One system call: sendfile(2) for a FileSlice, else sendmsg(2) of the buffers up to
        the next one (MSG_MORE before a FileSlice: a reply header leaves with its data)."""
        item = items[first]
        if type(item) is FileSlice:
            sent = os.sendfile(self._socket.fileno(), item.fd, item.offset, item.length)
            if not sent:
                raise OSError(errno.EIO, "a read-only image file shrank while served")
            return sent
        end, limit = first + 1, min(len(items), first + IOV_MAX)
        while end < limit and type(items[end]) is not FileSlice:
            end += 1
        return self._socket.sendmsg(items[first:end], (), socket.MSG_MORE if end < len(items) else 0)
