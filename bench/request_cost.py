"""What one request costs inside the server, without sockets (bench/README.md).

The sans-IO core (ServerConnection) parses fio-shaped requests, 16 to a receive, and the
reading loop's own path answers them (server.commands.replies_now: the qcow2 engine's
read_sparse_now / pwrite_now, then the reply events and ReplyEncoder), for three kinds of
4 KiB request: reads of an allocated image (read-only), writes in place (a copy of it) and
allocating writes (one per cluster of a fresh image).  Prints the CPU time per request, or
with --callgrind the user-space instructions per request, which do not move with the
machine's load: two runs under valgrind's callgrind (N and 3N requests), their difference
less that of the same two runs stopped before serving (building the requests), over 2N.

    .venv/bin/python bench/request_cost.py                    # CPU us per request, each kind
    .venv/bin/python bench/request_cost.py --callgrind        # instructions per request (about a minute a kind)
    .venv/bin/python bench/request_cost.py --kind read --requests 100000
"""

from __future__ import annotations

import argparse
import os
import random
import re
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import trio  # noqa: E402

from nbdserve.nbd import NEED_DATA, ExportCatalog, ExportInfo, Negotiated, ServerConnection  # noqa: E402
from nbdserve.nbd.constants import IHAVEOPT, REQUEST_MAGIC, Command, Option, TransmissionFlag as TF  # noqa: E402
from nbdserve.qcow2 import Qcow2Image  # noqa: E402
from nbdserve.server.commands import replies_now  # noqa: E402

KINDS = ("read", "inplace", "alloc")
MiB, GiB = 1 << 20, 1 << 30
CLUSTER = 64 * 1024
BATCH = 16                        # fio's iodepth in bench/run.py's 4 KiB rows
IMAGE_SIZE = GiB
ALLOCATED = 256 * MiB             # the allocated image's data: reads and writes in place stay inside it


def option(opt: int, data: bytes = b"") -> bytes:
    """proto.md: an option request (client side)."""
    return struct.pack(">QII", IHAVEOPT, opt, len(data)) + data


def negotiated_connection(size: int) -> ServerConnection:
    """A ServerConnection in transmission, as libnbd leaves it: structured replies, no
    metadata context, export "bench"."""
    flags = (TF.HAS_FLAGS | TF.SEND_FLUSH | TF.SEND_FUA | TF.SEND_TRIM | TF.SEND_WRITE_ZEROES | TF.SEND_DF
             | TF.CAN_MULTI_CONN)
    conn = ServerConnection(ExportCatalog([ExportInfo("bench", size, flags, max_block=32 * MiB)]))
    name = b"bench"
    go = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    conn.receive_data(struct.pack(">I", 3) + option(Option.STRUCTURED_REPLY) + option(Option.GO, go))
    while not isinstance(event := conn.next_event(), Negotiated):
        assert event is NEED_DATA, event
    conn.data_to_send()
    return conn


def make_images(tmp: Path) -> dict[str, Path]:
    allocated = tmp / "allocated.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(allocated), str(IMAGE_SIZE)], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -q -P 0x5a 0 {ALLOCATED}", str(allocated)],
                   check=True, capture_output=True)
    return {"allocated": allocated}


def open_image(kind: str, images: dict[str, Path], tmp: Path) -> Qcow2Image:
    if kind == "read":
        return Qcow2Image.open(str(images["allocated"]), read_only=True)
    path = tmp / f"{kind}.qcow2"
    path.unlink(missing_ok=True)
    if kind == "inplace":
        shutil.copyfile(images["allocated"], path)
    else:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(IMAGE_SIZE)], check=True)
    return Qcow2Image.open(str(path))


def request_batches(kind: str, count: int) -> list[bytes]:
    """``count`` 4 KiB requests at random offsets, BATCH to a receive; allocating writes each
    land in a cluster of their own."""
    rng = random.Random(1)
    if kind == "alloc":
        if count > IMAGE_SIZE // CLUSTER:
            raise SystemExit(f"request_cost: at most {IMAGE_SIZE // CLUSTER} allocating writes (one per cluster)")
        clusters = rng.sample(range(IMAGE_SIZE // CLUSTER), count)
        offsets = [c * CLUSTER + rng.randrange(CLUSTER // 4096) * 4096 for c in clusters]
    else:
        offsets = [rng.randrange(ALLOCATED // 4096) * 4096 for _ in range(count)]
    command, payload = (Command.READ, b"") if kind == "read" else (Command.WRITE, os.urandom(4096))
    requests = [struct.pack(">IHHQQI", REQUEST_MAGIC, 0, command, i, off, 4096) + payload
                for i, off in enumerate(offsets)]
    return [b"".join(requests[i:i + BATCH]) for i in range(0, count, BATCH)]


def serve(conn: ServerConnection, img: Qcow2Image, batches: list[bytes]) -> None:
    """The reading loop's path for requests the device answers at once (server/session.py)."""
    out: list = []
    for data in batches:
        conn.receive_data(data)
        while (request := conn.next_event()) is not NEED_DATA:
            replies = replies_now(request, img, True, False)
            assert replies is not None, f"{request} was not answered at once"
            for reply in replies:
                out.extend(conn.send_parts(reply))
        out.clear()


def run_kind(kind: str, count: int, tmp: Path, images: dict[str, Path], build_only: bool = False) -> tuple[float, float]:
    """(user, user+sys) CPU seconds per request."""
    img = open_image(kind, images, tmp)
    batches = request_batches(kind, count)
    conn = negotiated_connection(img.size)
    if build_only:
        return 0.0, 0.0

    async def main() -> tuple[float, float]:
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time()
        serve(conn, img, batches)
        r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.process_time()
        await img.close()
        return (r1.ru_utime - r0.ru_utime) / count, (t1 - t0) / count
    return trio.run(main)


def callgrind_instructions(kind: str, count: int, tmp: Path, build_only: bool) -> int:
    cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, __file__,
           "--kind", kind, "--requests", str(count), "--tmpdir", str(tmp), "--reuse-images"]
    if build_only:
        cmd.append("--build-only")
    p = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return int(re.search(r"Collected : (\d+)", p.stderr).group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", choices=KINDS, action="append", help="request kind (repeatable; default all)")
    ap.add_argument("--requests", type=int, help="requests per kind (default 100000, allocating writes 10000; "
                                                 "2000 with --callgrind)")
    ap.add_argument("--callgrind", action="store_true", help="instructions per request, under valgrind")
    ap.add_argument("--tmpdir", help="where the images go (default: a new temporary folder)")
    ap.add_argument("--reuse-images", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    kinds = args.kind or list(KINDS)
    tmp = Path(args.tmpdir or tempfile.mkdtemp(prefix="nbdserve-request-cost-"))
    try:
        images = {"allocated": tmp / "allocated.qcow2"} if args.reuse_images else make_images(tmp)
        if args.reuse_images:   # a run of this script under callgrind, for the parent
            for kind in kinds:
                run_kind(kind, args.requests, tmp, images, args.build_only)
            return
        for kind in kinds:
            if args.callgrind:
                n = args.requests or 2000
                total = [callgrind_instructions(kind, c, tmp, False) for c in (n, 3 * n)]
                setup = [callgrind_instructions(kind, c, tmp, True) for c in (n, 3 * n)]
                per = ((total[1] - total[0]) - (setup[1] - setup[0])) / (2 * n)
                print(f"{kind:8} {per:10.0f} instructions per request (callgrind, {n} and {3 * n} requests)")
            else:
                user, cpu = run_kind(kind, args.requests or (10000 if kind == "alloc" else 100000), tmp, images)
                print(f"{kind:8} {cpu * 1e6:8.2f} us CPU per request ({user * 1e6:.2f} us user)")
    finally:
        if not args.tmpdir:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
