"""Model test: random sequences of write/discard/zero/flush (some issued concurrently, on disjoint
ranges, in a trio nursery) against a bytearray model; afterwards the engine reads the model and
``qemu-img check`` / ``qemu-img compare`` agree."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdserve.qcow2 import Qcow2Image

from qemu_tools import check, compare, create, pattern, qemu_img, read_all

K = 1024

# (compat, cluster size, refcount bits, extra options, image size, backing: None / "raw" / "qcow2")
SHAPES = {
    "v3-512": ("1.1", 512, 16, {}, 96 * K + 1536, None),
    "v3-4k-rc1-rawbacking": ("1.1", 4096, 1, {}, 256 * K, "raw"),
    "v2-64k-qcow2backing": ("0.10", 65536, 16, {}, 640 * K + 512, "qcow2"),
    "v3-32k-extl2-rc64-rawbacking": ("1.1", 32768, 64, {"extended_l2": "on"}, 320 * K, "raw"),
    "v3-16k-compressed": ("1.1", 16384, 16, {}, 256 * K, "compressed"),
}

# more examples for a bug hunt: QCOW2_MODEL_EXAMPLES=500
EXAMPLES = int(os.environ.get("QCOW2_MODEL_EXAMPLES", "25"))
KINDS = ("write", "write", "write", "trim", "zero", "zero_trim", "flush")


@st.composite
def steps(draw, size: int, cs: int):
    """A list of steps; each step is a list of ops (kind, offset, length, seed) run concurrently.
    Ops of one step cover disjoint byte ranges, so the model can predict the result."""
    out = []
    for _ in range(draw(st.integers(1, 10))):
        n = draw(st.integers(1, 4))
        # boundaries near cluster edges are where the interesting things happen
        edge = st.integers(0, size // cs).flatmap(
            lambda c: st.sampled_from([c * cs, c * cs + 1, c * cs - 1, c * cs + cs // 2]))
        points = draw(st.lists(st.one_of(st.integers(0, size), edge), min_size=2 * n, max_size=2 * n))
        points = sorted({min(max(p, 0), size) for p in points})
        group = []
        for i in range(0, len(points) - 1, 2):
            kind = draw(st.sampled_from(KINDS))
            off, end = points[i], points[i + 1]
            if end > off or kind == "flush":
                group.append((kind, off, end - off, draw(st.integers(0, 1 << 30))))
        if group:
            out.append(group)
    return out


class Model:
    def __init__(self, size: int, cs: int, version: int, under: bytes):
        self.data = bytearray(under)
        self.size, self.cs, self.version, self.under = size, cs, version, under

    def apply(self, kind: str, off: int, n: int, seed: int) -> None:
        if kind == "write":
            self.data[off:off + n] = pattern(seed, n)
        elif kind in ("zero", "zero_trim"):
            self.data[off:off + n] = bytes(n)
        elif kind == "trim":
            # whole clusters only (the ragged tail of the image counts as whole)
            a = -(-off // self.cs) * self.cs
            b = self.size if off + n == self.size else (off + n) // self.cs * self.cs
            if b > a:
                self.data[a:b] = bytes(b - a) if self.version >= 3 else self.under[a:b]


async def run_op(img: Qcow2Image, kind: str, off: int, n: int, seed: int) -> None:
    if kind == "write":
        await img.pwrite(off, pattern(seed, n))
    elif kind == "zero":
        await img.zero(off, n)
    elif kind == "zero_trim":
        await img.zero(off, n, may_trim=True)
    elif kind == "trim":
        await img.trim(off, n)
    else:
        await img.flush()


def make_image(d: Path, shape) -> tuple[str, bytes]:
    compat, cs, rb, extra, size, backing = shape
    under = bytes(size)
    kw = {}
    if backing == "compressed":
        # no backing file: the image starts as compressed clusters (qemu-img convert -c)
        start = (b"compressible " * size)[:size - 2 * cs] + pattern(1, cs) + bytes(cs)
        (d / "start.raw").write_bytes(start)
        path = str(d / "img.qcow2")
        qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
                 f"compat={compat},cluster_size={cs},refcount_bits={rb}", str(d / "start.raw"), path)
        return path, start
    if backing:
        under = pattern(size, size - 3 * cs) + bytes(3 * cs)        # shorter than the overlay
        (d / "base.raw").write_bytes(under[:size - 3 * cs])
        if backing == "qcow2":
            qemu_img("convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096",
                     str(d / "base.raw"), str(d / "base.qcow2"))
        kw = dict(backing=f"base.{backing}", backing_fmt=backing)
    path = create(d / "img.qcow2", size, compat=compat, cluster_size=cs, refcount_bits=rb, **extra, **kw)
    return path, under


def run_model(shape, plan, delays: bool) -> None:
    compat, cs, _, _, size, _ = shape
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        path, under = make_image(d, shape)
        model = Model(size, cs, 2 if compat == "0.10" else 3, under)
        if shape[5] == "compressed":
            model.under = bytes(size)             # dropped clusters read zeros: no backing file

        async def main():
            img = Qcow2Image.open(path, delays={"write_aio": 1e-4, "cow_read": 1e-4, "cow_write": 1e-4}
                                  if delays else None)
            try:
                for group in plan:
                    async with trio.open_nursery() as nursery:
                        for op in group:
                            nursery.start_soon(run_op, img, *op)
                    for op in group:
                        model.apply(*op)
                    if len(group) > 1:
                        assert await read_all(img) == bytes(model.data), f"after {group}"
                assert await read_all(img) == bytes(model.data)
            finally:
                await img.close()

        trio.run(main)
        check(path)
        (d / "model.raw").write_bytes(model.data)
        compare(path, d / "model.raw")


@pytest.mark.parametrize("name", list(SHAPES))
def test_model(name):
    shape = SHAPES[name]
    size, cs = shape[4], shape[1]

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(plan=steps(size, cs), delays=st.booleans())
    def inner(plan, delays):
        run_model(shape, plan, delays)

    inner()
