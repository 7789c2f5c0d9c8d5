"""A qcow2 backing chain served by nbdserve: block status and data equal qemu-nbd's."""

from __future__ import annotations

import os


from nbdserve.server.settings import ExportSettings
from nbdhelpers import free_port, run, start_server



async def qemu_io(path: str, *commands: str, fmt: str = "qcow2") -> None:
    argv = ["qemu-io", "-f", fmt]
    for c in commands:
        argv += ["-c", c]
    await run(*argv, path)


async def make_chain(tmp_path) -> str:
    """raw (8 MiB) <- qcow2 mid <- qcow2 top (16 MiB: the tail is past every backing file)."""
    raw, mid, top = (str(tmp_path / n) for n in ("base.raw", "mid.qcow2", "top.qcow2"))
    with open(raw, "wb") as f:
        f.truncate(8 << 20)
    await qemu_io(raw, "write -P 0x11 0 2M", "write -P 0x12 6M 1M", fmt="raw")
    await run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", mid, "12M")
    await qemu_io(mid, "write -P 0x21 1M 2M", "write -z 7M 1M", "write -P 0x22 9M 64k")
    await run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top, "16M")
    await qemu_io(top, "write -P 0x31 512k 1M", "write -z 4M 512k", "write -P 0x32 13M 128k",
                  "discard 9M 64k")
    return top


async def _map(uri: str, context: str) -> list:
    import json
    out = (await run("nbdinfo", "--json", f"--map={context}", uri)).stdout
    return [(e["offset"], e["length"], e["type"]) for e in json.loads(out)]


async def test_chain_maps_and_data_equal_qemu_nbd(tmp_path, nursery):
    top = await make_chain(tmp_path)
    server = await start_server(nursery, [ExportSettings("top", top, "qcow2", read_only=True)])
    port = free_port()
    pidfile = tmp_path / "qemu-nbd.pid"
    await run("qemu-nbd", "-f", "qcow2", "-x", "top", "-p", str(port), "-b", "127.0.0.1", "-t", "-r", "-A",
              "--fork", f"--pid-file={pidfile}", top)
    reference = f"nbd://127.0.0.1:{port}/top"
    try:
        for context in ("base:allocation", "qemu:allocation-depth"):
            assert await _map(server.uri("top"), context) == await _map(reference, context), context
        ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
        await run("nbdcopy", server.uri("top"), str(ours))
        await run("nbdcopy", reference, str(theirs))
        assert ours.read_bytes() == theirs.read_bytes()
    finally:
        os.kill(int(pidfile.read_text()), 15)
    depth = await _map(server.uri("top"), "qemu:allocation-depth")
    # from the scenario: 512k..1.5M written in top (depth 1); 6M..7M only in the raw base (3);
    # 14M..16M lies past mid's end (12M): qemu counts it in mid's layer (2)
    assert (512 << 10, 1 << 20, 1) in depth
    assert any(o <= 6 << 20 and o + n >= 7 << 20 and t == 3 for o, n, t in depth)
    assert depth[-1][0] + depth[-1][1] == 16 << 20 and depth[-1][2] == 2
