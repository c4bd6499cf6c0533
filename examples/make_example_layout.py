#!/usr/bin/env python
"""Generate the OPC-style test layout ``examples/opc_test.gds`` and its gauges.

Run from the repository root::

    python examples/make_example_layout.py            # writes examples/opc_test.gds, gauges.csv, sites.csv

Polarity (layers)
-----------------
* ``1/0`` -- **resist features** (clear-field): line/space arrays, isolated
  lines, line ends and tip-to-tip gaps, L- and T-shapes, small islands and a
  2-D logic-like clip. ``segsem synth LAYOUT --layer 1/0`` (tone ``resist``).
* ``2/0`` -- **contact holes** (dark-field): openings in the resist, arrays at
  several sizes and pitches, isolated and elongated contacts.
  ``segsem synth LAYOUT --layer 2/0 --tone opening``.

Each structure is its own cell, placed in a 800 nm grid of blocks under the
single top cell ``TOP`` (arrays of contacts use GDS repetitions), all in nm
(database unit 1 nm). CDs are 20-60 nm and pitches 40-120 nm, so a 256-512 px
image at 1 nm/px holds a handful to about 50 features.

``gauges.csv`` (``name,x1,y1,x2,y2`` nm, plus ``kind,design_cd_nm``) holds
cutlines across lines, spaces, line-end gaps, islands and holes.
``sites.csv`` (``name,x_nm,y_nm``) lists block centres used for
``examples/data``.
"""
from __future__ import annotations

import csv
import datetime
from pathlib import Path

import gdstk
import numpy as np

HERE = Path(__file__).resolve().parent
BLOCK = 800.0  # block pitch (nm)
L_RESIST = (1, 0)
L_HOLES = (2, 0)

gauges: list[dict] = []
sites: list[dict] = []


def gauge(name, x1, y1, x2, y2, kind, cd):
    gauges.append({"name": name, "x1": round(x1, 3), "y1": round(y1, 3), "x2": round(x2, 3), "y2": round(y2, 3),
                   "kind": kind, "design_cd_nm": cd})


def rect(cell, x0, y0, x1, y1, layer=L_RESIST):
    cell.add(gdstk.rectangle((x0, y0), (x1, y1), layer=layer[0], datatype=layer[1]))


def block_origin(col, row):
    return col * BLOCK, row * BLOCK


def place(top, cell, col, row, site_name=None):
    ox, oy = block_origin(col, row)
    top.add(gdstk.Reference(cell, (ox, oy)))
    if site_name:
        sites.append({"name": site_name, "x_nm": ox + BLOCK / 2, "y_nm": oy + BLOCK / 2})
    return ox, oy


def line_space(lib, top, col, row, cd, pitch, vertical=True):
    """A line/space array centred in its block, lines 640 nm long."""
    name = f"{'V' if vertical else 'H'}LS_{cd}_{pitch}"
    cell = lib.new_cell(name)
    n = int(640 // pitch)
    span = (n - 1) * pitch + cd
    start = (BLOCK - span) / 2
    lo, hi = 80.0, 720.0
    for i in range(n):
        a = start + i * pitch
        if vertical:
            rect(cell, a, lo, a + cd, hi)
        else:
            rect(cell, lo, a, hi, a + cd)
    ox, oy = place(top, cell, col, row, name)
    k = n // 2  # middle line
    a = start + k * pitch
    s = min(0.45 * (pitch - cd), 20.0)
    mid = BLOCK / 2
    if vertical:
        gauge(f"{name}_line", ox + a - s, oy + mid, ox + a + cd + s, oy + mid, "line", cd)
        gauge(f"{name}_space", ox + a + cd / 2, oy + mid + 60, ox + a + pitch + cd / 2, oy + mid + 60, "space", pitch - cd)
    else:
        gauge(f"{name}_line", ox + mid, oy + a - s, ox + mid, oy + a + cd + s, "line", cd)
        gauge(f"{name}_space", ox + mid + 60, oy + a + cd / 2, ox + mid + 60, oy + a + pitch + cd / 2, "space", pitch - cd)


def iso_lines(lib, top, col, row):
    cell = lib.new_cell("ISO_LINES")
    ox, oy = place(top, cell, col, row, "ISO_LINES")
    x = 110.0
    for cd in (20, 30, 40, 60):
        rect(cell, x, 80, x + cd, 720)
        gauge(f"ISO_{cd}_line", ox + x - 25, oy + 400, ox + x + cd + 25, oy + 400, "line", cd)
        x += cd + 140


def tip_to_tip(lib, top, col, row):
    """Vertical lines (CD 30, pitch 140) each cut by a gap of 30-80 nm."""
    cell = lib.new_cell("TIP2TIP")
    ox, oy = place(top, cell, col, row, "TIP2TIP")
    cd, pitch = 30.0, 140.0
    x = 85.0
    for gap in (30, 40, 50, 60, 80):
        y_mid = 400.0
        rect(cell, x, 80, x + cd, y_mid - gap / 2)
        rect(cell, x, y_mid + gap / 2, x + cd, 720)
        gauge(f"T2T_{gap}_gap", ox + x + cd / 2, oy + y_mid - gap / 2 - 25, ox + x + cd / 2, oy + y_mid + gap / 2 + 25,
              "tip_to_tip", gap)
        gauge(f"T2T_{gap}_line", ox + x - 20, oy + 200, ox + x + cd + 20, oy + 200, "line", cd)
        x += pitch


def line_end_to_line(lib, top, col, row):
    """Horizontal bar with vertical lines ending below it at gaps of 30-70 nm."""
    cell = lib.new_cell("END2LINE")
    ox, oy = place(top, cell, col, row, "END2LINE")
    bar_y0, bar_y1 = 560.0, 600.0
    rect(cell, 80, bar_y0, 720, bar_y1)
    gauge("E2L_bar_line", ox + 120, oy + bar_y0 - 20, ox + 120, oy + bar_y1 + 20, "line", 40)
    x = 140.0
    for gap in (30, 40, 50, 70):
        rect(cell, x, 120, x + 40, bar_y0 - gap)
        gauge(f"E2L_{gap}_gap", ox + x + 20, oy + bar_y0 - gap - 25, ox + x + 20, oy + bar_y0 + 20, "end_to_line", gap)
        x += 140


def l_and_t(lib, top, col, row):
    cell = lib.new_cell("L_T_SHAPES")
    ox, oy = place(top, cell, col, row, "L_T_SHAPES")
    w = 40.0
    # two L-shapes (corner at lower left) and two T-shapes
    for i, (x0, y0) in enumerate(((90, 90), (90, 430))):
        cell.add(gdstk.Polygon([(x0, y0), (x0 + 260, y0), (x0 + 260, y0 + w), (x0 + w, y0 + w), (x0 + w, y0 + 260),
                                (x0, y0 + 260)], layer=1, datatype=0))
        gauge(f"L{i}_arm_line", ox + x0 + 160, oy + y0 - 20, ox + x0 + 160, oy + y0 + w + 20, "line", w)
    for i, (x0, y0) in enumerate(((430, 110), (430, 450))):
        cell.add(gdstk.Polygon([(x0, y0 + 200), (x0 + 260, y0 + 200), (x0 + 260, y0 + 200 + w), (x0, y0 + 200 + w)],
                               layer=1, datatype=0))
        cell.add(gdstk.Polygon([(x0 + 110, y0), (x0 + 110 + w, y0), (x0 + 110 + w, y0 + 200), (x0 + 110, y0 + 200)],
                               layer=1, datatype=0))
        gauge(f"T{i}_stem_line", ox + x0 + 90, oy + y0 + 80, ox + x0 + 130 + w, oy + y0 + 80, "line", w)
    # the T is drawn as two touching rectangles: merge them into one polygon
    merged = gdstk.boolean(cell.polygons, [], "or", layer=1, datatype=0)
    cell.remove(*cell.polygons)
    cell.add(*merged)


def islands(lib, top, col, row):
    """Small square resist islands (pillars) 24-48 nm at pitch 90-120: print as rounded squares or circles."""
    cell = lib.new_cell("ISLANDS")
    ox, oy = place(top, cell, col, row, "ISLANDS")
    y = 110.0
    for size, pitch in ((24, 90), (32, 100), (40, 110), (48, 120)):
        n = int(600 // pitch)
        x = 110.0
        for i in range(n):
            rect(cell, x, y, x + size, y + size)
            if i == n // 2:
                gauge(f"ISL_{size}_dia", ox + x - 20, oy + y + size / 2, ox + x + size + 20, oy + y + size / 2, "island", size)
            x += pitch
        y += pitch + 60


def logic_clip(lib, top, col, row, seed=7):
    """A 2-D logic-like routing clip: horizontal wires on a 64 nm track pitch with jogs (1520 x 720 nm)."""
    rng = np.random.default_rng(seed)
    cell = lib.new_cell("LOGIC")
    ox, oy = place(top, cell, col, row)
    sites.append({"name": "LOGIC_a", "x_nm": ox + 400, "y_nm": oy + 400})
    sites.append({"name": "LOGIC_b", "x_nm": ox + 1200, "y_nm": oy + 400})
    w, tp = 32.0, 64.0
    x_lo, x_hi = 40.0, 1560.0
    rects = []
    n_tracks = 11
    segs_per_track = []
    for t in range(n_tracks):
        y = 56.0 + t * tp
        x = x_lo + float(rng.integers(0, 4)) * 16
        segs = []
        while x < x_hi - 96:
            length = float(rng.integers(6, 26)) * 16
            x1 = min(x + length, x_hi)
            segs.append((x, x1))
            rects.append(gdstk.rectangle((x, y), (x1, y + w)))
            x = x1 + float(rng.integers(3, 8)) * 16  # tip-to-tip gap 48-112 nm
        segs_per_track.append((y, segs))
    # vertical jogs joining a wire to the next track's wire where both exist
    for t in range(n_tracks - 1):
        y0, segs0 = segs_per_track[t]
        y1, segs1 = segs_per_track[t + 1]
        for a0, a1 in segs0:
            if rng.random() < 0.35:
                for b0, b1 in segs1:
                    lo, hi = max(a0, b0) + 8, min(a1, b1) - 8 - w
                    if hi > lo:
                        xj = lo + float(rng.integers(0, int((hi - lo) // 16) + 1)) * 16
                        xj = min(xj, hi)
                        rects.append(gdstk.rectangle((xj, y0), (xj + w, y1 + w)))
                        break
    for p in gdstk.boolean(rects, [], "or", layer=1, datatype=0):
        cell.add(p)
    # gauges across a few wires (line) and tip-to-tip gaps
    for t in (2, 5, 8):
        y, segs = segs_per_track[t]
        if len(segs) >= 2:
            (a0, a1), (b0, b1) = segs[0], segs[1]
            xm = (a0 + a1) / 2
            gauge(f"LOGIC_t{t}_line", ox + xm, oy + y - 14, ox + xm, oy + y + w + 14, "line", w)
            gauge(f"LOGIC_t{t}_gap", ox + a1 - 20, oy + y + w / 2, ox + b0 + 20, oy + y + w / 2, "tip_to_tip", b0 - a1)


def contacts(lib, top, row):
    """Contact holes (layer 2/0, openings in resist): arrays via GDS repetitions, isolated and elongated."""
    specs = [(0, 30, 80), (2, 40, 100), (3, 50, 120)]  # (column, size, pitch); the mixed block sits in column 1
    for col, size, pitch in specs:
        unit = lib.new_cell(f"CT_{size}")
        rect(unit, 0, 0, size, size, layer=L_HOLES)
        n = int(600 // pitch)
        span = (n - 1) * pitch + size
        start = (BLOCK - span) / 2
        ox, oy = block_origin(col, row)
        top.add(gdstk.Reference(unit, (ox + start, oy + start), columns=n, rows=n, spacing=(pitch, pitch)))
        sites.append({"name": f"CT_{size}_{pitch}", "x_nm": ox + BLOCK / 2, "y_nm": oy + BLOCK / 2})
        k = n // 2
        cx = ox + start + k * pitch
        cy = oy + start + k * pitch
        s = min(0.4 * (pitch - size), 15.0)
        gauge(f"CT_{size}_{pitch}_dia_x", cx - s, cy + size / 2, cx + size + s, cy + size / 2, "hole", size)
        gauge(f"CT_{size}_{pitch}_dia_y", cx + size / 2, cy - s, cx + size / 2, cy + size + s, "hole", size)
        gauge(f"CT_{size}_{pitch}_space", cx + size / 2, cy + size / 2, cx + pitch + size / 2, cy + size / 2,
              "hole_space", pitch - size)
    cell = lib.new_cell("CT_MISC")
    ox, oy = place(top, cell, 1, row, "CT_MISC")
    for i, size in enumerate((30, 40, 60)):
        x0 = 230.0 + i * 140
        rect(cell, x0, 500, x0 + size, 500 + size, layer=L_HOLES)  # semi-isolated contacts
        gauge(f"CT_iso_{size}_dia_x", ox + x0 - 25, oy + 500 + size / 2, ox + x0 + size + 25, oy + 500 + size / 2,
              "hole", size)
        rect(cell, x0, 230, x0 + size, 230 + 2.5 * size, layer=L_HOLES)  # elongated contacts
        gauge(f"CT_bar_{size}_len", ox + x0 + size / 2, oy + 230 - 25, ox + x0 + size / 2, oy + 230 + 2.5 * size + 25,
              "hole", 2.5 * size)


def build() -> gdstk.Library:
    lib = gdstk.Library(name="OPC_TEST", unit=1e-9, precision=1e-9)
    top = lib.new_cell("TOP")
    # row 0: vertical line/space; row 1: horizontal line/space + isolated lines
    for col, (cd, pitch) in enumerate(((20, 40), (30, 60), (40, 80), (60, 120), (30, 90))):
        line_space(lib, top, col, 0, cd, pitch, vertical=True)
    for col, (cd, pitch) in enumerate(((20, 40), (30, 60), (40, 80), (60, 120))):
        line_space(lib, top, col, 1, cd, pitch, vertical=False)
    iso_lines(lib, top, 4, 1)
    # row 2: 2-D structures
    tip_to_tip(lib, top, 0, 2)
    line_end_to_line(lib, top, 1, 2)
    l_and_t(lib, top, 2, 2)
    islands(lib, top, 3, 2)
    # row 3: logic clip (two blocks wide)
    logic_clip(lib, top, 0, 3)
    # row 4: contact holes on layer 2/0
    contacts(lib, top, 4)
    return lib


def main() -> None:
    lib = build()
    lib.write_gds(str(HERE / "opc_test.gds"), timestamp=datetime.datetime(2024, 1, 1))  # fixed: reproducible bytes
    with open(HERE / "gauges.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["name", "x1", "y1", "x2", "y2", "kind", "design_cd_nm"], lineterminator="\n")
        w.writeheader()
        w.writerows(gauges)
    with open(HERE / "sites.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["name", "x_nm", "y_nm"], lineterminator="\n")
        w.writeheader()
        w.writerows(sites)
    n_poly = sum(len(c.polygons) for c in lib.cells)
    print(f"wrote {HERE / 'opc_test.gds'} ({(HERE / 'opc_test.gds').stat().st_size} bytes, {len(lib.cells)} cells, "
          f"{n_poly} polygons before repetition), {len(gauges)} gauges, {len(sites)} sites")


if __name__ == "__main__":
    main()
