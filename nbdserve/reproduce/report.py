"""``nbdserve reproduce ... --report FILE.html``: one self-contained page (inline SVG, no
script, nothing fetched) with a section per scenario and its allocators side by side.

Each panel draws the overlay's file as a strip of host clusters (metadata, data, free), the
guest clusters the overlay holds above it with an arrow to the host cluster holding each,
the allocation of interest (the one a culprit names, else the first in Laszlo's case (a))
with its kept and new clusters, and its COW drawn across the host range it wrote: red and
"stale" when that range lies outside the allocation's new clusters.
"""

from __future__ import annotations

import html
import os

from ..qcow2 import format as fmt
from .culprits import offset_text, size_text

PANEL_W = 660
STRIP_W = 620
GUEST_Y, HOST_Y, CELL_H = 92, 250, 34
COLOURS = {"header": "#6b7280", "L1 table": "#4b5563", "L2 table": "#9ca3af", "refcount table": "#374151",
           "refcount block": "#d1d5db", "metadata": "#e5e7eb", "data": "#60a5fa", "free": "#ffffff"}
BAD = "#ef4444"
KEPT, NEW, COW = "#16a34a", "#f59e0b", "#dc2626"


async def host_layout(path: str, cluster_size: int, host_map: list[dict]) -> list[str]:
    """The kind of each host cluster of a qcow2 file: its metadata (from the header, the L1
    table and the refcount table), data (``qemu-img map``), or free (refcount 0)."""
    from ..qcow2 import Qcow2Image
    img = Qcow2Image.open(path, read_only=True)
    try:
        bits = img.cluster_bits
        count = -(-os.fstat(img.fd).st_size // cluster_size)
        kinds = ["free" if img.refcounts.get(c) == 0 else "metadata" for c in range(count)]

        def mark(offset: int, nbytes: int, kind: str) -> None:
            for c in range(offset >> bits, min(count, -(-(offset + nbytes) // cluster_size))):
                kinds[c] = kind

        h = img.header
        mark(0, 1, "header")
        mark(h.refcount_table_offset, h.refcount_table_clusters * cluster_size, "refcount table")
        mark(h.l1_table_offset, max(1, h.l1_size * 8), "L1 table")
        for e in img.l1:
            if e & fmt.L1E_OFFSET_MASK:
                mark(e & fmt.L1E_OFFSET_MASK, cluster_size, "L2 table")
        for e in img.refcounts.table:
            if e & fmt.REFT_OFFSET_MASK:
                mark(e & fmt.REFT_OFFSET_MASK, cluster_size, "refcount block")
        for e in host_map:
            if e.get("data") and e.get("depth") == 0 and "offset" in e:
                mark(e["offset"], e["length"], "data")
        return kinds
    finally:
        await img.close()


def interest(result) -> int | None:
    """The allocation a culprit names, else the first in case (a), else None."""
    named = [c["allocation"] for c in result.culprits if c["allocation"] is not None]
    if named:
        return named[0]
    case_a = [i for i, a in enumerate(result.allocations) if a["case_a"]]
    return case_a[0] if case_a else None


def _guest_clusters(result) -> list[tuple[int, int]]:
    """(guest cluster offset, host offset) of every cluster the overlay holds, guest order."""
    cs = result.cluster_size
    out = []
    for e in result.host_map:
        if e.get("data") and e.get("depth") == 0 and "offset" in e:
            for g in range(e["start"], e["start"] + e["length"], cs):
                out.append((g, e["offset"] + g - e["start"]))
    return sorted(out)


def _attr(**kw) -> str:
    return " ".join(f'{k.rstrip("_").replace("_", "-")}="{html.escape(str(v))}"' for k, v in kw.items())


def _text(x, y, s, size=11, anchor="start", cls="", fill="#111", rotate=None) -> str:
    t = f' transform="rotate({rotate} {x} {y})"' if rotate is not None else ""
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" fill="{fill}" '
            f'class="{cls}"{t}>{html.escape(s)}</text>')


def panel(result, x0: float) -> tuple[str, float]:
    """One allocator's picture, at x offset ``x0``."""
    cs = result.cluster_size
    kinds = result.host_kinds
    n = max(1, len(kinds))
    cw = max(4.0, min(34.0, STRIP_W / n))
    guests = _guest_clusters(result)
    gw = max(4.0, min(34.0, STRIP_W / max(1, len(guests))))
    bad_clusters = {(o + i) // cs * cs for o, length in result.bad_ranges for i in range(0, length, 512)}

    def hx(host: int) -> float:
        return x0 + 20 + host / cs * cw

    out = [f'<g class="panel" data-allocator="{html.escape(result.allocator)}">']
    verdict = "CORRUPTED" if result.corrupted else "intact"
    out.append(_text(x0 + 20, 24, f"{result.allocator}: {verdict}", 15, cls="panel-title",
                     fill=BAD if result.corrupted else "#111"))
    out.append(_text(x0 + 20, GUEST_Y - 30, "guest disk: the clusters this overlay holds (guest offset)", 11))
    out.append(_text(x0 + 20, HOST_Y + CELL_H + 62, "host file: one box per cluster (host offsets above this line)", 11))
    a_index = interest(result)
    a = result.allocations[a_index] if a_index is not None else None
    kept: set[int] = set()
    new: set[int] = set()
    victims = _victims(a, new_of(a, cs), cs) if a is not None else set()
    if a is not None:
        new = new_of(a, cs)
        first_kept = _full_record(result, a_index)["kept_host_offset"]
        if first_kept is not None:
            kept = {first_kept + i * cs for i in range(a["keep_clusters"])}
    # host strip
    for c, kind in enumerate(kinds):
        host = c * cs
        role = " kept" if host in kept else " new" if host in new else ""
        stroke = KEPT if role == " kept" else NEW if role == " new" else "#555"
        out.append(f'<rect class="host-cluster kind-{kind.replace(" ", "-")}{role}" '
                   f'{_attr(data_host=hex(host), data_kind=kind)} x="{hx(host):.1f}" y="{HOST_Y}" '
                   f'width="{cw - 1:.1f}" height="{CELL_H}" fill="{COLOURS[kind]}" stroke="{stroke}" '
                   f'stroke-width="{3 if role else 1}"><title>host {host:#x}: {kind}{role}</title></rect>')
        if cw >= 14:
            out.append(_text(hx(host) + cw / 2, HOST_Y + CELL_H + 12, f"{host:#x}", 8, "end", rotate=-60))
    # guest strip and the arrows
    for i, (g, host) in enumerate(guests):
        gx = x0 + 20 + i * gw
        bad = g in bad_clusters
        out.append(f'<rect class="guest-cluster{" bad" if bad else ""}" {_attr(data_guest=hex(g), data_host=hex(host))} '
                   f'x="{gx:.1f}" y="{GUEST_Y}" width="{gw - 1:.1f}" height="{CELL_H}" '
                   f'fill="{BAD if bad else "#bfdbfe"}" stroke="#555"><title>guest {g:#x} -> host {host:#x}'
                   f'{" (bad bytes)" if bad else ""}</title></rect>')
        if gw >= 14:
            out.append(_text(gx + gw / 2, GUEST_Y - 4, size_text(g) if g else "0", 8, "start", rotate=-60))
        colour = KEPT if host in kept else NEW if host in new else COW if host in victims else "#9ca3af"
        out.append(f'<line class="arrow{" victim" if host in victims else ""}" {_attr(data_guest=hex(g), data_host=hex(host))} '
                   f'x1="{gx + gw / 2:.1f}" y1="{GUEST_Y + CELL_H}" x2="{hx(host) + cw / 2:.1f}" y2="{HOST_Y - 2}" '
                   f'stroke="{colour}" stroke-width="{2 if colour != "#9ca3af" else 1}" marker-end="url(#head)"/>')
    # the allocation of interest and its COW
    y = HOST_Y + CELL_H + 84
    if a is not None:
        full = _full_record(result, a_index)
        out.append(_text(x0 + 20, y, f"allocation of interest: the write at {offset_text(full['guest_offset'])}"
                         f"+{size_text(full['length'])}: keep {a['keep_clusters']} (green), new "
                         f"{a['nb_clusters']} (orange){', case (a)' if a['case_a'] else ''}", 12, cls="alloc-label"))
        out.append(_text(x0 + 20, y + 16, f"n_end {a['n_end']}, avail_sectors {a['avail_sectors']} (1.1.2) / "
                         f"{a['avail_sectors_fixed']} (b7ab0fea), nb_available {a['nb_available']}", 11))
        for which in ("head_cow", "tail_cow"):
            cow = a[which]
            if cow is None:
                continue
            stale = cow["host_offset"] // cs * cs in victims
            x1, x2 = hx(cow["host_offset"]), hx(cow["host_offset"] + cow["length"])
            cls = f"cow {which.split('_')[0]}{' stale' if stale else ''}"
            victim = cow["host_offset"] // cs * cs
            if stale:
                out.append(f'<rect class="victim" {_attr(data_host=hex(victim))} x="{hx(victim):.1f}" y="{HOST_Y}" '
                           f'width="{cw - 1:.1f}" height="{CELL_H}" fill="url(#hatch)" stroke="{COW}" '
                           f'stroke-width="3"/>')
            out.append(f'<rect class="{cls}" {_attr(data_host=hex(cow["host_offset"]), data_guest=hex(cow["guest_offset"]), data_length=cow["length"])} '
                       f'x="{x1:.1f}" y="{HOST_Y + CELL_H / 2 - 5}" width="{max(2.0, x2 - x1):.1f}" height="10" '
                       f'fill="{COW}"><title>{which}: guest {cow["guest_offset"]:#x}+{size_text(cow["length"])} '
                       f'written at host {cow["host_offset"]:#x}</title></rect>')
            src = [i for i, (g, _) in enumerate(guests) if g <= cow["guest_offset"] < g + cs]
            if src:
                sx = x0 + 20 + src[0] * gw + gw / 2
                out.append(f'<path class="cow-arrow" d="M {sx:.1f} {GUEST_Y + CELL_H} C {sx:.1f} {HOST_Y - 60} '
                           f'{(x1 + x2) / 2:.1f} {HOST_Y - 60} {(x1 + x2) / 2:.1f} {HOST_Y + CELL_H / 2 - 6}" '
                           f'fill="none" stroke="{COW}" stroke-width="2" stroke-dasharray="5 3" marker-end="url(#redhead)"/>')
            owner = [g for g, h in guests if h == victim]
            where = (f"into host cluster {victim:#x}, which holds guest {offset_text(owner[0])}" if owner and stale
                     else f"into host {cow['host_offset']:#x}")
            label = (f"{which.replace('_', ' ')}{' (STALE)' if stale else ''}: guest "
                     f"{offset_text(cow['guest_offset'])}+{size_text(cow['length'])} copied {where}")
            y += 34
            out.append(_text(x0 + 20, y, label, 12, cls=f"cow-label{' stale' if stale else ''}",
                             fill=COW if stale else "#111"))
        if a["tail_cow"] is None and a["head_cow"] is None:
            y += 34
            out.append(_text(x0 + 20, y, "no COW: nb_available ends on a cluster boundary", 12, cls="cow-label"))
    for line in result.culprit_lines():
        for i, part in enumerate(_wrap(line, 100)):
            y += 16 if i else 20
            out.append(_text(x0 + 20 + (12 if i else 0), y, part, 10, cls="culprit", fill=BAD))
    out.append("</g>")
    return "\n".join(out), y


def new_of(a: dict, cs: int) -> set[int]:
    """The host clusters an allocation got."""
    return {a["host_offset"] + i * cs for i in range(a["nb_clusters"])}


def _victims(a: dict, new: set[int], cs: int) -> set[int]:
    """Host clusters the allocation's COW wrote into that are not its own: stale COW."""
    out = set()
    for which in ("head_cow", "tail_cow"):
        cow = a[which]
        if cow is not None:
            for c in range(cow["host_offset"] // cs, -(-(cow["host_offset"] + cow["length"]) // cs)):
                if c * cs not in new:
                    out.add(c * cs)
    return out


def _wrap(line: str, width: int) -> list[str]:
    parts, current = [], ""
    for word in line.split(" "):
        if current and len(current) + 1 + len(word) > width:
            parts.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    return parts + [current]


def _full_record(result, index: int) -> dict:
    return sorted((r for r in result.trace if r["event"] == "alloc"), key=lambda r: r["index"])[index]


DEFS = f"""<defs>
<marker id="head" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="6" markerHeight="6" orient="auto-start-reverse">
<path d="M 0 0 L 10 5 L 0 10 z" fill="#6b7280"/></marker>
<marker id="redhead" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse">
<path d="M 0 0 L 10 5 L 0 10 z" fill="{COW}"/></marker>
<pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" patternTransform="rotate(45)">
<rect width="6" height="6" fill="#fecaca"/><line x1="0" y1="0" x2="0" y2="6" stroke="{COW}" stroke-width="3"/></pattern>
</defs>"""


def section(scenario, results) -> str:
    panels, bottom = [], 0
    for i, r in enumerate(results):
        svg, y = panel(r, i * PANEL_W)
        panels.append(svg)
        bottom = max(bottom, y)
    width, height = PANEL_W * len(results), bottom + 24
    legend = " ".join(f'<span class="key"><i style="background:{c}"></i>{html.escape(k)}</span>'
                      for k, c in COLOURS.items())
    return (f'<section class="scenario" data-scenario="{html.escape(scenario.name)}">'
            f"<h2>{html.escape(scenario.name)}</h2><p>{html.escape(scenario.summary)}</p>"
            f'<p class="legend">{legend} <span class="key"><i style="background:{BAD}"></i>guest cluster '
            f'with bad bytes</span> <span class="key"><i style="background:{COW}"></i>copy-on-write</span></p>'
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}">{DEFS}<rect width="100%" height="100%" fill="#fff"/>'
            + "".join(panels) + "</svg></section>")


INTRO = """<p>A qcow2 image stores each guest cluster (top row) in some cluster of the host file
(bottom row); the arrows show where. A write into clusters the image does not hold yet gets
new host clusters, and copies the part of the last one the write does not cover from the old
content (the tail copy-on-write). qemu 1.1.2 measured how far the new clusters reach from the
first <em>kept</em> cluster instead of the first new one (fixed by commit b7ab0fea), so when a
write keeps clusters and allocates new ones right after them, its tail copy-on-write can land
in the host cluster after the new ones, which belongs to another guest cluster: those bytes
are lost.</p>"""


def guest_section(results) -> str:
    """A guest run series: its damaged files, each with the writes that broke it (filemap.py)."""
    from ..guest.harness import culprit_lines, damaged_files
    r0 = results[0]
    items = []
    for r in results:
        for said, path in damaged_files(r):
            why = "<br>".join(html.escape(c) for c in culprit_lines(r, path, most=20))
            items.append(f'<li class="corrupted-file">run {r.run}: <b>{html.escape(said)}</b><br>'
                         f'<small>{why}</small></li>')
    bad = sum(r.corrupted for r in results)
    return (f'<section class="guest" data-allocator="{html.escape(r0.allocator)}" data-client="{html.escape(r0.client)}">'
            f"<h2>guest via {html.escape(r0.client)} under {html.escape(r0.allocator)}: corrupted files in "
            f"{bad} of {len(results)} runs</h2><ul>{''.join(items)}</ul></section>")


def render(sections: list[tuple[object, list]], guests: list[list] = ()) -> str:
    body = "\n".join([section(s, rs) for s, rs in sections] + [guest_section(g) for g in guests if g])
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<title>nbdserve reproduce: why the data broke</title><style>"
            "body{font-family:sans-serif;margin:16px;color:#111;background:#fff}"
            "h1{font-size:20px}h2{font-size:17px;margin-bottom:4px}p{max-width:1300px;font-size:13px}"
            ".key{display:inline-block;margin-right:12px;font-size:12px}"
            ".key i{display:inline-block;width:12px;height:12px;border:1px solid #555;margin-right:4px;vertical-align:-2px}"
            "</style></head><body><h1>nbdserve reproduce: why the data broke</h1>"
            f"{INTRO}\n{body}\n</body></html>\n")


def write_report(path: str, sections: list[tuple[object, list]], guests: list[list] = ()) -> None:
    with open(path, "w") as f:
        f.write(render(sections, guests))
