"""The scenarios of the 2012 thread (shared/reference/qemu-1.1.2-qcow2-corruption-thread.txt).

Each is a fresh image pair (a qcow2 base and a qcow2 overlay backed by it, 64 KiB
clusters), qemu-io command sequences sent over NBD to the overlay, and the
pattern reads Kevin Wolf used to verify it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    setup: tuple[str, ...]              # one qemu-io invocation, before the interesting part (or none)
    invocations: tuple[tuple[str, ...], ...]   # each: one qemu-io process
    checks: tuple[str, ...]             # read -P lines
    # one qemu-io process reading these from a pipe, then the checks; its blkdebug commands
    # (break, wait_break, resume) go to the server's control socket (piped.run_script)
    script: tuple[str, ...] = ()
    delays: dict[str, float] = field(default_factory=dict)
    size: int = 16 << 20
    cluster_size: int = 64 << 10
    base_pattern: int = 0x11            # the base image's content over base_length
    base_length: int = 2 << 20


SCENARIOS = {
    s.name: s for s in (
        Scenario(
            name="iotest-047",
            summary="Kevin Wolf's sequential reproducer (qemu-iotests 047): the tail COW of a "
                    "write that keeps 5 clusters and allocates 2 runs into the next host cluster",
            # one qemu-io process, as 047 runs it: qemu's client writes with FUA, so the
            # aio_flush after the discard sends no NBD flush; 1.1.2 reuses the discarded
            # clusters at once all the same (discard_single_l2 -> qcow2_free_any_clusters)
            setup=(),
            invocations=(("write -P 0x66 0 320k", "write 320k 128k", "write -P 0x55 1M 128k",
                          "write -P 0x88 448k 128k", "discard 320k 128k", "aio_flush",
                          "write -P 0x77 0 480k", "aio_flush"),),
            checks=("read -P 0x77 0 480k", "read -P 0x88 480k 96k", "read -P 0x55 1M 128k"),
        ),
        Scenario(
            name="race",
            summary="Kevin Wolf's concurrent reproducer, verbatim: a write into a COPIED cluster "
                    "lands between the COW read and the COW write of an allocating write "
                    "(break cow_write A through the control socket; no sleeps, no delays)",
            setup=("write -P 0x66 0 320k", "write 320k 128k", "write -P 0x88 448k 128k",
                   "discard 320k 128k", "aio_flush"),
            invocations=(),
            # the thread, Jan 23 2013: one qemu-io; wait_break also returns when the aio_write
            # completes without reaching cow_write (the fixed allocator has no tail COW there)
            script=("break cow_write A", "aio_write -P 0x77 0 480k", "wait_break A",
                    "write -P 0x99 480k 32k", "resume A", "aio_flush"),
            checks=("read -P 0x77 0 480k", "read -P 0x99 480k 32k", "read -P 0x88 512k 64k"),
        ),
    )
}
