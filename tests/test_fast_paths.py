"""Every fast path against a plain twin, fed the same inputs (hypothesis).

The fast paths avoid Python loops (strided byte slices, one big-integer comparison, a few
integer tests per request); each twin here says the same thing the slow, obvious way.
"""

from __future__ import annotations

import os
import struct

from hypothesis import given, settings, strategies as st

from nbdserve.blockdev import ReadChunk
from nbdserve.nbd import OffsetData, Request, wire
from nbdserve.nbd.constants import ChunkType, Command, CommandFlag, TransmissionFlag as TF
from nbdserve.nbd.exports import ExportInfo
from nbdserve.nbd.replies import ReplyEncoder
from nbdserve.nbd.requests import RequestChecker, check_request
from nbdserve.qcow2 import format as fmt
from nbdserve.qcow2.check.checker import Checker
from nbdserve.qcow2.check.copied import copied_fast
from nbdserve.qcow2.check.computed import ComputedRefcounts
from nbdserve.qcow2.check.fastpaths import ContiguousRuns, decode_refblock, narrow_refblock, widen
from nbdserve.qcow2.check.result import CheckResult
from nbdserve.qcow2.header import read_header
from nbdserve.server.commands import read_replies, read_replies_plain
from qemu_tools import create

# ------------------------------------------------------------------ refcount blocks


def decode_refblock_plain(raw: bytes, bits: int) -> list[int]:
    """qcow2.txt "Refcount block entries": big-endian entries of ``bits``; below 8 bits, packed
    from the least significant bit of each byte."""
    if bits >= 8:
        w = bits // 8
        return [int.from_bytes(raw[i:i + w], "big") for i in range(0, len(raw), w)]
    per = 8 // bits
    return [(raw[i // per] >> (i % per * bits)) & ((1 << bits) - 1) for i in range(len(raw) * per)]


@settings(max_examples=300)
@given(bits=st.sampled_from([1, 2, 4, 8, 16, 32, 64]), raw=st.binary(min_size=0, max_size=512))
def test_decode_refblock(bits, raw):
    raw = raw[:len(raw) - len(raw) % max(1, bits // 8)]
    assert list(decode_refblock(raw, bits)) == decode_refblock_plain(raw, bits)


def refcount_values(bits: int):
    """Refcounts near the edges of one byte and of the entry width."""
    top = (1 << bits) - 1
    return st.lists(st.sampled_from(sorted({min(top, v) for v in (0, 1, 2, 254, 255, 256, top)})),
                    max_size=64).map(lambda v: v[:len(v) - len(v) % max(1, 8 // bits)])


@settings(max_examples=300)
@given(data=st.data(), bits=st.sampled_from([1, 2, 4, 8, 16, 32, 64]))
def test_narrow_refblock(data, bits):
    values = data.draw(refcount_values(bits))
    raw = encode_refblock_plain(values, bits)
    plain = decode_refblock_plain(raw, bits)
    narrow = narrow_refblock(raw, bits)
    assert narrow == (bytes(plain) if all(v < 255 for v in plain) else None)
    if narrow is not None and bits >= 8:
        assert widen(narrow, bits // 8, "big") == raw          # rebuild.py writes blocks so


# ------------------------------------------------- computed refcounts (check)

@settings(max_examples=300)
@given(ops=st.lists(st.tuples(st.sampled_from(["run", "one", "limited", "set"]), st.integers(0, 40),
                              st.integers(0, 12), st.sampled_from([1, 3, 254, 255, 256, 1000]))),
       limit=st.sampled_from([1, 3, 15, 255, 65535]))
def test_computed_refcounts(ops, limit):
    """ComputedRefcounts (one byte per cluster, a side table) against a list of ints."""
    n = 52
    counts, plain = ComputedRefcounts(n), [0] * n
    for op, k, m, value in ops:
        if op == "run":
            counts.add_run(k, m)
            plain[k:k + m] = [v + 1 for v in plain[k:k + m]]
        elif op == "one":
            counts.add_one(k)
            plain[k] += 1
        elif op == "limited":
            refused = [i for i in range(k, k + m) if plain[i] >= value]
            assert counts.add_limited(k, k + m, value) == refused
            plain[k:k + m] = [v if v >= value else v + 1 for v in plain[k:k + m]]
        else:
            counts[k] = value
            plain[k] = value
    assert list(counts.values(0, n)) == plain
    assert [counts[k] for k in range(n)] == plain
    assert counts.above(limit) == [k for k, v in enumerate(plain) if v > limit]
    for first, end in ((0, n), (5, 30), (40, 52)):
        assert counts.used_end(first, end) == max((k + 1 for k in range(first, end) if plain[k]), default=first)


# ---------------------------------------------------- sequential L2 tables (check)

def contiguous_run_plain(raw: bytes, cs: int, file_len: int) -> tuple[int, int]:
    """ContiguousRuns.find's contract, entry by entry."""
    entries = [e for (e,) in struct.iter_unpack(">Q", raw)]
    m = max((i + 1 for i, e in enumerate(entries) if e), default=0)
    if m == 0:
        return 0, 0
    first = entries[0]
    flags, off = first & ~fmt.L2E_OFFSET_MASK, first & fmt.L2E_OFFSET_MASK
    if flags not in (0, fmt.QCOW_OFLAG_COPIED) or not off or off % cs or off + (m - 1) * cs >= file_len:
        return 0, -1
    if any(entries[i] != first + i * cs for i in range(m)):
        return 0, -1
    return first, m


def l2_tables(cs: int):
    """Tables near the fast path's edge: sequential runs, with one entry bent, or flags."""
    n = cs // 8

    @st.composite
    def table(draw):
        m = draw(st.integers(0, n))
        first = draw(st.sampled_from([cs, 2 * cs, 3 * cs + 512, 0])) | draw(st.sampled_from(
            [0, fmt.QCOW_OFLAG_COPIED, fmt.QCOW_OFLAG_ZERO, fmt.QCOW_OFLAG_COMPRESSED]))
        entries = [first + i * cs for i in range(m)] + [0] * (n - m)
        for _ in range(draw(st.integers(0, 2))):
            if m:
                entries[draw(st.integers(0, n - 1))] = draw(st.sampled_from([0, 1, cs, first + cs, 1 << 62]))
        return struct.pack(f">{n}Q", *entries)
    return table()


def runs(cs: int):
    """Tables that are one contiguous run, with COPIED or without."""
    n = cs // 8
    return st.builds(lambda m, first, flags: struct.pack(f">{n}Q", *[flags | (first + i * cs) for i in range(m)],
                                                         *[0] * (n - m)),
                     st.integers(1, n), st.sampled_from([cs, 2 * cs]), st.sampled_from([0, fmt.QCOW_OFLAG_COPIED]))


@settings(max_examples=300, deadline=None)
@given(data=st.data(), cs=st.sampled_from([512, 4096]))
def test_contiguous_run(data, cs):
    raw = data.draw(l2_tables(cs))
    entries = [e for (e,) in struct.iter_unpack(">Q", raw)]
    m = max((i + 1 for i, e in enumerate(entries) if e), default=1)
    last = (entries[0] & fmt.L2E_OFFSET_MASK) + (m - 1) * cs      # the run's last cluster
    # the file ending before, at and after the run's last cluster, or far past it
    file_len = data.draw(st.sampled_from([1 << 16, 1 << 40, last, last + 1, last + cs]))
    assert ContiguousRuns(cs, cs // 8).find(raw, file_len) == contiguous_run_plain(raw, cs, file_len)


FILE_LEN = 4 << 20          # the images below are grown to this, so that every drawn run fits
_templates: dict[tuple[int, int], bytes] = {}


def image(tmp_path_factory, cs: int, refbits: int, block0: list[int] | None = None) -> str:
    """A fresh image made by qemu-img, grown to FILE_LEN; ``block0``: the stored refcounts
    written over its first refcount block."""
    key = cs, refbits
    if key not in _templates:
        path = create(tmp_path_factory.mktemp("fast") / "t.qcow2", "64M", cluster_size=cs,
                      refcount_bits=refbits)
        with open(path, "rb") as f:
            _templates[key] = f.read()
    path = tmp_path_factory.mktemp("fast") / "i.qcow2"
    path.write_bytes(_templates[key])
    os.truncate(path, FILE_LEN)
    if block0 is not None:
        fd = os.open(path, os.O_RDWR)
        try:
            h = read_header(fd)
            (block_offset,) = struct.unpack(">Q", os.pread(fd, 8, h.refcount_table_offset))
            os.pwrite(fd, encode_refblock_plain(block0, refbits), block_offset)
        finally:
            os.close(fd)
    return str(path)


def encode_refblock_plain(values: list[int], bits: int) -> bytes:
    """The inverse of decode_refblock_plain."""
    if bits >= 8:
        return b"".join(v.to_bytes(bits // 8, "big") for v in values)
    per = 8 // bits
    return bytes(sum(values[i + j] << (j * bits) for j in range(per)) for i in range(0, len(values), per))


def l2_check_state(c: Checker) -> tuple:
    """What counting one L2 table leaves behind: every computed refcount and the result."""
    c.end_counting()
    return list(c.ref.values(0, len(c.ref))), c.res.counts(), c.res.messages


@settings(max_examples=200, deadline=None)
@given(data=st.data(), cs=st.sampled_from([512, 4096]), refbits=st.sampled_from([1, 16]),
       frag=st.booleans())
def test_count_run(tmp_path_factory, data, cs, refbits, frag):
    """_count_run, given a table ContiguousRuns.find takes, counts what the entry-by-entry
    loop counts."""
    raw = data.draw(l2_tables(cs))
    before = data.draw(st.lists(st.integers(0, cs // 8 + 4), max_size=4))   # clusters counted already
    states = []
    for fast in (True, False):
        c = Checker(image(tmp_path_factory, cs, refbits), writable=False)
        try:
            c.res = CheckResult(c.path)
            c.start_counting()
            for k in before:
                c._inc(k * cs, cs)
            if fast:
                run = c.runs.find(raw, FILE_LEN)
                if run[1] < 0:
                    return
                c._count_run(run, frag)
            else:
                c._check_l2_entries(raw, 1 << 30, frag, 0)
            states.append(l2_check_state(c))
        finally:
            c.close()
    assert states[0] == states[1]


def copied_fast_plain(raw: bytes, cs: int, block0: list[int]) -> bool:
    """copied_fast's contract: a table of zeros, or a contiguous run whose clusters all have
    the stored refcount 1 if COPIED is set, none if not (block0 holds the first refcount
    block; no other exists: there the refcounts are 0)."""
    first, m = contiguous_run_plain(raw, cs, FILE_LEN)
    if m <= 0:
        return m == 0
    k = (first & fmt.L2E_OFFSET_MASK) // cs
    stored = [block0[k + i] if k + i < len(block0) else 0 for i in range(m)]
    if first & fmt.QCOW_OFLAG_COPIED:
        return all(rc == 1 for rc in stored)
    return all(rc != 1 for rc in stored)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), cs_bits=st.sampled_from([(512, 16), (512, 64), (4096, 16)]))
def test_copied_fast(tmp_path_factory, data, cs_bits):
    cs, refbits = cs_bits
    block0 = [data.draw(st.sampled_from([1, 2]))] * (cs * 8 // refbits)
    for _ in range(data.draw(st.integers(0, 2))):
        block0[data.draw(st.integers(0, min(len(block0), cs // 8 + 4) - 1))] = data.draw(st.sampled_from([0, 1, 2]))
    raw = data.draw(st.one_of(l2_tables(cs), runs(cs)))
    c = Checker(image(tmp_path_factory, cs, refbits, block0), writable=False)
    try:
        assert copied_fast(c.runs.find(raw, FILE_LEN), c.stored) == copied_fast_plain(raw, cs, block0)
    finally:
        c.close()


# ------------------------------------------------------------- NBD request checks

EXPORTS = [ExportInfo("a", 1 << 20, TF.HAS_FLAGS | TF.SEND_FLUSH | TF.SEND_FUA | TF.SEND_TRIM | TF.SEND_WRITE_ZEROES
                      | TF.SEND_DF | TF.SEND_FAST_ZERO),
           ExportInfo("r", 65536, TF.HAS_FLAGS | TF.READ_ONLY | TF.SEND_FLUSH, min_block=512, max_block=32768),
           ExportInfo("b", 3 << 20, TF.HAS_FLAGS, min_block=4096, max_block=1 << 20)]


@settings(max_examples=2000)
@given(export=st.sampled_from(EXPORTS), contexts=st.booleans(),
       command=st.sampled_from([int(c) for c in Command] + [9, 77]),
       cmd_flags=st.integers(0, 0xFFFF),
       offset=st.one_of(st.integers(0, 4 << 20), st.sampled_from([0, 512, 4096, 65536 - 512])),
       length=st.one_of(st.integers(0, 2 << 20), st.sampled_from([0, 512, 4096, 32768, 1 << 20])),
       extended=st.booleans())
def test_request_checker(export, contexts, command, cmd_flags, offset, length, extended):
    fast = RequestChecker(export, int(export.flags), contexts, extended)
    assert fast(command, cmd_flags, offset, length) == check_request(
        export, int(export.flags), contexts, command, cmd_flags, offset, length, extended)


# ------------------------------------------------------------- NBD read replies

@st.composite
def _read_and_chunks(draw):
    """A read request and the chunks a device could answer it with: one data chunk over the
    whole range (the common case), or the range cut into data and hole pieces."""
    offset = draw(st.integers(0, 1 << 20)) * 512
    length = draw(st.integers(1, 64)) * 512
    flags = CommandFlag.DF if draw(st.booleans()) else CommandFlag(0)
    if draw(st.booleans()):
        cuts = [offset, offset + length]
    else:
        cuts = sorted({offset, offset + length, *(offset + 512 * draw(st.integers(0, length // 512))
                                                  for _ in range(draw(st.integers(0, 4))))})
    chunks = [ReadChunk(a, b - a, os.urandom(b - a) if draw(st.booleans()) else None)
              for a, b in zip(cuts, cuts[1:])]
    return Request(draw(st.integers(0, (1 << 64) - 1)), Command.READ, flags, offset, length), chunks


@settings(max_examples=500)
@given(case=_read_and_chunks(), structured=st.booleans())
def test_read_replies(case, structured):
    request, chunks = case
    assert read_replies(request, chunks, structured) == read_replies_plain(request, chunks, structured)


@settings(max_examples=500)
@given(cookie=st.integers(0, (1 << 64) - 1), offset=st.integers(0, (1 << 63) - 1),
       data=st.binary(min_size=1, max_size=600), done=st.booleans())
def test_offset_data_header(cookie, offset, data, done):
    """ReplyEncoder packs an OFFSET_DATA chunk's header and offset in one struct: the same
    bytes as the construct declarations of the chunk header and the offset prefix."""
    encoder = ReplyEncoder(structured=True)
    encoder.expect(cookie, Command.READ, len(data), offset)
    plain = (wire.ChunkHeader.build(dict(flags=int(done), type=ChunkType.OFFSET_DATA, cookie=cookie,
                                         length=8 + len(data)))
             + wire.OffsetDataPrefix.build(dict(offset=offset)) + data)
    assert b"".join(encoder.encode_parts(OffsetData(cookie, offset, data, done))) == plain


# --------------------------------------------------- qcow2 writes answered at once

def _writes(cs: int, size: int):
    block = st.sampled_from([512, 4096, cs - 512, cs, cs + 4096, 3 * cs])
    return st.lists(st.tuples(st.integers(0, size // 512 - 1), block, st.integers(1, 255)),
                    min_size=1, max_size=24)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), cs=st.sampled_from([512, 4096, 65536]), extended=st.booleans())
def test_pwrite_now_is_pwrite(tmp_path_factory, data, cs, extended):
    """Qcow2Image.pwrite_now (in place, or allocating at once) leaves the same file, byte for
    byte, as pwrite() fed the same writes, and qemu-img check finds nothing wrong with it."""
    import trio

    from nbdserve.qcow2 import Qcow2Image
    from qemu_tools import qemu_img

    if extended and cs < 16384:   # qcow2.txt: extended L2 needs 16 KiB clusters or more
        extended = False
    size = 64 * cs
    writes = data.draw(_writes(cs, size))
    folder = tmp_path_factory.mktemp("now")
    opts = {"cluster_size": cs, **({"extended_l2": "on"} if extended else {})}
    paths = [create(folder / f"{name}.qcow2", size, **opts) for name in ("now", "plain")]
    answered_now = 0

    async def apply(path: str, now: bool) -> None:
        nonlocal answered_now
        img = Qcow2Image.open(path)
        for sector, length, pattern in writes:
            offset = sector * 512
            buf = bytes([pattern]) * min(length, size - offset)
            if now and img.pwrite_now(offset, buf):
                answered_now += 1
                continue
            await img.pwrite(offset, buf)
        await img.close()

    trio.run(apply, paths[0], True)
    trio.run(apply, paths[1], False)
    assert answered_now == len(writes)   # no backing file, nothing armed: every write at once
    with open(paths[0], "rb") as a, open(paths[1], "rb") as b:
        assert a.read() == b.read()
    for p in paths:
        qemu_img("check", "-q", p)


# ------------------------------------------- qcow2 reads inside one cluster, down a chain

@st.composite
def _chain(draw):
    """Layers from the base up: (cluster size, size, qemu-io commands)."""
    layers = []
    for _ in range(draw(st.integers(1, 4))):
        cs = draw(st.sampled_from([512, 4096, 65536]))
        size = draw(st.sampled_from([256 << 10, 512 << 10, 1 << 20]))
        # compressed writes first, each into a cluster of its own (qemu writes them only there)
        compressed = draw(st.sets(st.integers(0, size // cs - 1), max_size=3))
        cmds = [f"write -c -P {draw(st.integers(1, 255))} {c * cs} {cs}" for c in sorted(compressed)]
        for _ in range(draw(st.integers(0, 6))):
            kind = draw(st.sampled_from(["write", "write -z"]))
            off = draw(st.integers(0, size // 512 - 1)) * 512
            length = min(draw(st.sampled_from([512, 4096, 65536, 200 << 10])), size - off)
            pattern = f" -P {draw(st.integers(1, 255))}" if kind == "write" else ""
            cmds.append(f"{kind}{pattern} {off} {length}")
        layers.append((cs, size, cmds))
    return layers


@settings(max_examples=25, deadline=None)
@given(data=st.data(), layers=_chain(), read_only=st.booleans())
def test_read_sparse_now_one_cluster(tmp_path_factory, data, layers, read_only):
    """Qcow2Image.read_sparse_now's loop down the chain gives the chunks of the layer-by-layer
    path (_read_sparse_now_plain), data and holes alike, for reads inside a cluster and across."""
    import trio

    from nbdserve.blockdev.base import materialize
    from nbdserve.qcow2 import Qcow2Image
    from qemu_tools import qemu_io

    folder = tmp_path_factory.mktemp("chain")
    below = None
    for i, (cs, size, cmds) in enumerate(layers):
        path = create(folder / f"l{i}.qcow2", size, cluster_size=cs,
                      **({"backing": below} if below else {}))
        if cmds:
            qemu_io(path, *cmds)
        below = path
    top_size = layers[-1][1]
    reads = data.draw(st.lists(st.tuples(st.integers(0, top_size // 512 - 1),
                                         st.sampled_from([512, 4096, 65536, 70000])), min_size=1, max_size=30))

    def flat(chunks):
        return [(c.offset, c.length, None if c.data is None else bytes(materialize(c.data))) for c in chunks]

    async def compare():
        img = Qcow2Image.open(below, read_only=read_only)
        try:
            for sector, length in reads:
                offset = sector * 512
                length = min(length, top_size - offset)
                for slices in (False, True):
                    assert flat(img.read_sparse_now(offset, length, slices)) == \
                        flat(img._read_sparse_now_plain(offset, length, slices))
        finally:
            await img.close()

    trio.run(compare)
