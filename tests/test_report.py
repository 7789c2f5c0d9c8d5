"""``nbdserve reproduce iotest-047 --report FILE.html``: the page's SVG holds what 047's commands
and ``qemu-img map`` of each kept overlay say it must, and headless Chromium renders it.

047: ``write -P 0x77 0 480k`` keeps the 5 clusters of ``write -P 0x66 0 320k`` and gets the
2 host clusters the discard of 320K..448K freed; under qemu-1.1.2 its tail COW (guest
480K..512K) lands in the host cluster of guest 1M; under qemu-1.1.2+b7ab0fea there is none.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import zlib
import xml.etree.ElementTree as ET

from qemu_tools import qemu_map

K = 1024
CS = 64 * K
SVG = "{http://www.w3.org/2000/svg}"


def host_of(entries, guest: int) -> int:
    [e] = [e for e in entries if e["start"] <= guest < e["start"] + e["length"]]
    assert e["data"] and e["depth"] == 0
    return e["offset"] + guest - e["start"]


def classes(el) -> set[str]:
    return set(el.get("class", "").split())


def decode_png(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB(A) bytes) of an 8-bit, non-interlaced RGB/RGBA PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and colour in (2, 6) and interlace == 0, (depth, colour, interlace)
            bpp = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows, prev = [], bytearray(stride)
    for y in range(height):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return width, bpp, rows


def test_report_pictures_the_stale_tail_cow(tmp_path):
    report = tmp_path / "report.html"
    r = subprocess.run([sys.executable, "-m", "nbdserve", "reproduce", "iotest-047", "--json", "--keep",
                        "--report", str(report)], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    runs = {x["allocator"]: x for x in map(json.loads, r.stdout.splitlines())}
    maps = {a: qemu_map(os.path.join(x["workdir"], "top.qcow2")) for a, x in runs.items()}
    page = report.read_text()
    assert "<script" not in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    [svg_text] = re.findall(r"<svg .*?</svg>", page, re.S)
    svg = ET.fromstring(svg_text)
    panels = {g.get("data-allocator"): g for g in svg.iter(f"{SVG}g") if "panel" in classes(g)}
    assert list(panels) == ["qemu-1.1.2", "qemu-1.1.2+b7ab0fea"]
    for allocator, g in panels.items():
        entries = maps[allocator]
        top = os.path.join(runs[allocator]["workdir"], "top.qcow2")
        rects = list(g.iter(f"{SVG}rect"))
        hosts = [e for e in rects if "host-cluster" in classes(e)]
        assert len(hosts) == -(-os.path.getsize(top) // CS)        # the whole file, cluster by cluster
        # every cluster the overlay holds: an arrow to the host cluster qemu-img map names
        held = [(g_, host_of(entries, g_)) for g_ in range(0, 16 << 20, CS)
                if any(e["start"] <= g_ < e["start"] + e["length"] and e["data"] and e["depth"] == 0
                       for e in entries)]
        arrows = [(int(a.get("data-guest"), 16), int(a.get("data-host"), 16))
                  for a in g.iter(f"{SVG}line") if "arrow" in classes(a)]
        assert arrows == held
        kinds = {int(e.get("data-host"), 16): e.get("data-kind") for e in hosts}
        assert all(kinds[h] == "data" for _, h in held) and kinds[0] == "header"
        # the 0x77 write's 5 kept clusters (guest 0..320K) and 2 new ones (guest 320K..448K)
        kept = sorted(int(e.get("data-host"), 16) for e in hosts if "kept" in classes(e))
        new = sorted(int(e.get("data-host"), 16) for e in hosts if "new" in classes(e))
        assert kept == [host_of(entries, i * CS) for i in range(5)]
        assert new == [host_of(entries, 320 * K), host_of(entries, 384 * K)]
        cows = [e for e in rects if "cow" in classes(e)]
        victims = [e for e in rects if "victim" in classes(e)]
        bad = [int(e.get("data-guest"), 16) for e in rects if "bad" in classes(e)]
        if allocator == "qemu-1.1.2":
            [cow] = cows
            assert classes(cow) == {"cow", "tail", "stale"}
            assert int(cow.get("data-host"), 16) == host_of(entries, 1024 * K) + 32 * K
            assert int(cow.get("data-guest"), 16) == 480 * K and cow.get("data-length") == str(32 * K)
            assert [int(v.get("data-host"), 16) for v in victims] == [host_of(entries, 1024 * K)]
            assert bad == [1024 * K]
        else:
            assert cows == victims == bad == []

    shot = tmp_path / "report.png"
    chromium = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                               "--window-size=1340,680", f"--screenshot={shot}", report.as_uri()],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert chromium.returncode == 0 and shot.exists(), chromium.stderr
    width, bpp, rows = decode_png(shot.read_bytes())
    assert (width, len(rows)) == (1340, 680)
    pixels = [row[i:i + 3] for row in rows[::2] for i in range(0, len(row), bpp * 2)]
    white = sum(p == b"\xff\xff\xff" for p in pixels)
    assert white < 0.93 * len(pixels), "the screenshot is (nearly) blank"
    # the SVG was drawn, not only the text: the bad guest cluster's red and the data clusters' blue
    assert b"\xef\x44\x44" in pixels and b"\x60\xa5\xfa" in pixels


def test_report_lists_a_guest_runs_corrupted_files():
    """A guest run series: each corrupted file with its culprit lines, or why there are none."""
    from nbdserve.guest import GuestResult
    from nbdserve.reproduce.report import render
    line = "bytes 0+16K (fs blocks 1..4) = guest 0x1000+16K: stale tail COW of ..."
    r = GuestResult(run=1, allocator="qemu-1.1.2", client="virtio", files_checked=3, files_corrupted=3,
                    corrupted_files=["x usr/lib/x.so", "y usr/lib/y.so", "z usr/lib/z.so"], qemu_img_check={"exit": 0},
                    seconds=1.0, completed=True, culprits={"usr/lib/x.so": [line], "usr/lib/y.so": None,
                                                           "usr/lib/z.so": []})
    page = render([], [[r]])
    items = re.findall(r'<li class="corrupted-file">(.*?)</li>', page)
    assert len(items) == 3
    assert "FAILED x usr/lib/x.so" in items[0] and line in items[0]
    assert "removed later in the run" in items[1] and "no stale COW" in items[2]
    assert "corrupted files in 1 of 1 runs" in page
