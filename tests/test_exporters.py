"""Exporters (gds, oasis, csv), the contour reader and the polygon helpers behind them.

Layout files are checked twice: with gdstk (through ``read_contours``) and with
the independent KLayout reader (``klayout.db``).
"""
from __future__ import annotations

import math
import os
import warnings
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import gdstk
import numpy as np
import pytest
import shapely
from shapely.geometry import Polygon

import klayout.db as db
from segsem_cli import contour_io
from segsem_cli.contour_io import CSV_COLUMNS, read_contours
from segsem_cli.errors import SegsemError
from segsem_cli import geometry
from segsem_cli.geometry import (
    GDS_MAX_VERTICES,
    SAFE_MAX_VERTICES,
    GeometryWarning,
    from_dbu,
    keyhole,
    keyhole_pieces,
    orient_ring,
    signed_area,
    snap_to_grid,
    split_polygon,
    to_dbu_geometry,
    unkeyhole,
    vertex_count,
)
from segsem_cli.types import ContourRecord
from segsem_plugins import exporters

EXPORTERS = {e.name: e for e in (exporters.GDS, exporters.OASIS, exporters.CSV)}
LAYOUT = ["gds", "oasis"]


# ----------------------------------------------------------------- helpers

def circle(r: float, n: int, cx: float = 0.0, cy: float = 0.0) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.c_[cx + r * np.cos(t), cy + r * np.sin(t)]


def square(x0, y0, s):
    return np.array([(x0, y0), (x0 + s, y0), (x0 + s, y0 + s), (x0, y0 + s)], dtype=float)


def canon(points) -> list[tuple[int, int]]:
    """A ring as a comparable list: counter-clockwise, starting at its smallest (x, y)."""
    a = orient_ring(np.asarray(points, dtype=float), ccw=True)
    k = int(np.lexsort((a[:, 1], a[:, 0]))[0])
    return [tuple(int(round(v)) for v in p) for p in np.roll(a, -k, axis=0)]


def kl_shapes(path: Path, layer=100, datatype=0):
    """Read ``path`` with KLayout's own reader: (layout info, [(Polygon in top-cell coordinates, properties)]).

    Everything is copied out of the Layout (KLayout shapes must not outlive their layout).
    """
    ly = db.Layout()
    ly.read(str(path))
    top = ly.top_cell()
    li = ly.find_layer(layer, datatype)
    info = SimpleNamespace(dbu=ly.dbu, top=top.name, children=sorted(ly.cell(i).name for i in top.each_child_cell()),
                           own_shapes=0 if li is None else top.shapes(li).size())
    out = []
    if li is not None:
        it = top.begin_shapes_rec(li)
        while not it.at_end():
            out.append((it.shape().polygon.transformed(it.trans()), dict(it.shape().properties())))
            it.next()
    return info, out


def kl_points(poly) -> list[tuple[int, int]]:
    return [(p.x, p.y) for p in poly.each_point_hull()]


def prop(props: dict, fmt: str, key: str):
    return props.get(contour_io.GDS_PROPERTY_ATTRS[key] if fmt == "gds" else key)


@pytest.fixture
def records():
    hexagon = circle(37.77, 6, cx=-120.33, cy=45.61)  # off-grid vertices
    tri = np.array([(10.04, 0.0), (60.0, 0.0), (30.0, 40.06)])
    return [
        ContourRecord("imgA", "imgA:1", hexagon, "sam2", 0.875),
        ContourRecord("imgA", "imgA:2", tri, "threshold", 0.5),
        ContourRecord("img B", "img B:1", square(200.0, -50.0, 30.0), "canny", 1.0),
    ]


# ------------------------------------------------------------ registration

def test_plugin_registers_three_exporters_through_the_entry_point():
    got = []
    exporters.register_exporters(register=got.append)
    assert [(e.name, e.suffix) for e in got] == [("gds", ".gds"), ("oasis", ".oas"), ("csv", ".csv")]
    eps = {ep.name: ep.value for ep in metadata.entry_points(group="segsem")}
    assert eps["exporters"] == "segsem_plugins.exporters"


# --------------------------------------------------------- round trips

@pytest.mark.parametrize("fmt", LAYOUT)
def test_round_trip_gdstk_and_klayout(tmp_path, records, fmt):
    ex = EXPORTERS[fmt]
    path = tmp_path / f"c{ex.suffix}"
    assert ex.export(records, path) == [path]
    expected = {r.feature_id: canon(snap_to_grid(r.xy_nm, 0.1)) for r in records}

    ly, shapes = kl_shapes(path)
    assert ly.dbu == pytest.approx(1e-4)  # 0.1 nm in micrometres
    assert ly.top == "SEGSEM"
    assert len(shapes) == 3
    for poly, shape in shapes:
        fid = prop(shape, fmt, "feature_id")
        got = canon(kl_points(poly))
        want = expected[fid]
        assert len(got) == len(want)
        assert np.abs(np.array(got) - np.array(want)).max() <= 1
        rec = next(r for r in records if r.feature_id == fid)
        assert prop(shape, fmt, "image") == rec.image
        assert prop(shape, fmt, "source") == rec.source
        assert float(prop(shape, fmt, "confidence")) == rec.confidence

    back = read_contours(path)
    assert [(r.image, r.feature_id, r.source, r.confidence) for r in back] == [
        (r.image, r.feature_id, r.source, r.confidence) for r in records]
    for r, b in zip(records, back):
        assert canon(snap_to_grid(b.xy_nm, 0.1)) == expected[r.feature_id]
        assert np.abs(b.xy_nm - np.rint(b.xy_nm * 10) / 10).max() == 0  # exactly on the grid
        assert b.holes_nm == ()


@pytest.mark.parametrize("fmt", LAYOUT)
def test_options_layer_datatype_cell_grid(tmp_path, records, fmt):
    path = tmp_path / f"c{EXPORTERS[fmt].suffix}"
    EXPORTERS[fmt].export(records, path, layer="7", datatype=3, cell="TOP", grid_nm="1", color="ignored")
    ly, shapes = kl_shapes(path, 7, 3)
    assert ly.dbu == pytest.approx(1e-3) and ly.top == "TOP" and len(shapes) == 3
    pts = dict((prop(s, fmt, "feature_id"), canon(kl_points(p))) for p, s in shapes)
    assert pts["imgA:2"] == canon([(10, 0), (60, 0), (30, 40)])  # 1 nm grid
    assert kl_shapes(path, 100, 0)[1] == []
    assert len(read_contours(path, layer=7, datatype=3)) == 3


@pytest.mark.parametrize("fmt", LAYOUT)
def test_per_image_cells_are_referenced_from_the_top_cell(tmp_path, records, fmt):
    path = tmp_path / f"c{EXPORTERS[fmt].suffix}"
    records = records + [ContourRecord("img_B", "img_B:1", square(0, 300, 5), "canny", 0.25)]  # same cell name
    EXPORTERS[fmt].export(records, path, per_image_cells="yes")
    ly, shapes = kl_shapes(path)
    assert ly.top == "SEGSEM" and ly.own_shapes == 0
    assert ly.children == ["SEGSEM_imgA", "SEGSEM_img_B", "SEGSEM_img_B_2"]
    assert len(shapes) == 4
    back = read_contours(path)
    assert sorted((r.image, r.feature_id) for r in back) == [
        ("img B", "img B:1"), ("imgA", "imgA:1"), ("imgA", "imgA:2"), ("img_B", "img_B:1")]
    for r in records:
        (b,) = [b for b in back if b.feature_id == r.feature_id]
        assert canon(snap_to_grid(b.xy_nm, 0.1)) == canon(snap_to_grid(r.xy_nm, 0.1))


def test_grid_snapping_default_is_a_tenth_of_a_nm(tmp_path):
    assert snap_to_grid([[10.04, 10.06], [-0.04, 0.05]], 0.1).tolist() == [[100, 101], [0, 0]]
    assert from_dbu([3, 100], 0.1).tolist() == [0.3, 10.0]  # not 0.30000000000000004
    rec = ContourRecord("i", "i:1", np.array([(10.04, 0.0), (20.0, 0.0), (20.0, 7.96)]), "s", 1.0)
    path = tmp_path / "g.gds"
    EXPORTERS["gds"].export([rec], path)
    (poly, _), = kl_shapes(path)[1]
    assert canon(kl_points(poly)) == canon([(100, 0), (200, 0), (200, 80)])
    xy = read_contours(path)[0].xy_nm
    assert sorted(map(tuple, xy.tolist())) == [(10.0, 0.0), (20.0, 0.0), (20.0, 8.0)]


# --------------------------------------------------------------- holes

@pytest.fixture
def donut():
    outer = square(0.0, 0.0, 1000.0)
    hole = square(400.0, 300.0, 200.0)[::-1]
    return ContourRecord("imgH", "imgH:1", outer, "sam2", 0.9, (hole,))


@pytest.mark.parametrize("fmt", LAYOUT)
def test_hole_as_keyhole_keeps_the_area(tmp_path, donut, fmt):
    path = tmp_path / f"k{EXPORTERS[fmt].suffix}"
    EXPORTERS[fmt].export([donut], path)
    _, shapes = kl_shapes(path)
    assert len(shapes) == 1
    poly = shapes[0][0]
    assert poly.area() == (10000**2 - 2000**2)  # dbu^2: 1000 nm square minus 200 nm square
    assert poly.num_points() == 4 + 4 + 2  # outline, hole, two bridge vertices
    (back,) = read_contours(path)
    assert len(back.holes_nm) == 1
    assert Polygon(back.xy_nm, back.holes_nm).area == pytest.approx(1000**2 - 200**2)
    assert canon(back.holes_nm[0]) == canon(square(400, 300, 200))


@pytest.mark.parametrize("fmt", LAYOUT)
def test_hole_on_its_own_datatype(tmp_path, donut, fmt):
    path = tmp_path / f"d{EXPORTERS[fmt].suffix}"
    EXPORTERS[fmt].export([donut], path, holes="datatype", datatype=2)
    _, outline = kl_shapes(path, 100, 2)
    _, holes = kl_shapes(path, 100, 3)  # default hole_datatype = datatype + 1
    assert [p.area() for p, _ in outline] == [10000**2]
    assert [p.area() for p, _ in holes] == [2000**2]
    assert prop(holes[0][1], fmt, "feature_id") == "imgH:1"
    (plain,) = read_contours(path, datatype=2)
    assert plain.holes_nm == ()
    (back,) = read_contours(path, datatype=2, hole_datatype=3)
    assert Polygon(back.xy_nm, back.holes_nm).area == pytest.approx(1000**2 - 200**2)


def test_keyhole_with_several_holes_is_one_ring_of_equal_area():
    holes = [square(100, 100, 200), square(600, 600, 200), square(600, 100, 200), square(350, 500, 20),
             circle(40, 50, 200, 700)]
    poly = to_dbu_geometry(Polygon(square(0, 0, 1000), [h[::-1] for h in holes]), 1.0)
    ring = keyhole(poly)
    assert len(ring) == vertex_count(poly) == 4 + 4 * 4 + 50 + 2 * 5
    assert signed_area(ring) == pytest.approx(poly.area, abs=1e-6)
    (rebuilt,) = unkeyhole(ring)
    assert len(rebuilt.interiors) == 5 and rebuilt.symmetric_difference(poly).area < 1e-6


def test_keyhole_falls_back_to_cutting_through_the_hole(monkeypatch):
    poly = to_dbu_geometry(Polygon(square(0, 0, 100), [square(40, 30, 20)[::-1]]), 1.0)
    real = geometry.keyhole

    def no_bridge(p):
        if p.interiors:
            raise SegsemError("keyhole: no bridge found")
        return real(p)

    monkeypatch.setattr(geometry, "keyhole", no_bridge)
    rings = keyhole_pieces(poly)
    assert len(rings) == 2
    assert sum(signed_area(r) for r in rings) == 100 * 100 - 20 * 20
    assert shapely.union_all([Polygon(r) for r in rings]).equals(poly)


# ----------------------------------------------------------- vertex limit

def test_split_polygon_pieces_tile_the_original():
    poly = to_dbu_geometry(Polygon(circle(5000.0, 20000)), 0.1)
    assert vertex_count(poly) == 20000
    pieces = split_polygon(poly, GDS_MAX_VERTICES)
    assert len(pieces) > 2 and all(vertex_count(p) <= GDS_MAX_VERTICES for p in pieces)
    assert sum(p.area for p in pieces) == pytest.approx(poly.area, rel=1e-9)
    assert shapely.union_all(pieces).area == pytest.approx(poly.area, rel=1e-9)
    assert split_polygon(poly, 20000) == [poly]


@pytest.mark.parametrize("fmt", LAYOUT)
def test_20000_vertex_circle_is_split_not_truncated(tmp_path, fmt, capfd):
    xy = circle(5000.0, 20000, cx=123.4, cy=-56.7)
    path = tmp_path / f"big{EXPORTERS[fmt].suffix}"
    EXPORTERS[fmt].export([ContourRecord("i", "i:1", xy, "sam2", 0.7)], path)
    _, shapes = kl_shapes(path)
    assert "Warning" not in capfd.readouterr().err  # KLayout reads every record without complaint
    assert len(shapes) >= 5
    assert all(p.num_points() <= SAFE_MAX_VERTICES < 8190 for p, _ in shapes)
    assert sum(p.num_points() for p, _ in shapes) >= 20000
    assert {prop(s, fmt, "feature_id") for _, s in shapes} == {"i:1"}
    dbu2 = 0.1**2
    area = sum(p.area() for p, _ in shapes) * dbu2
    merged = db.Region([p for p, _ in shapes]).merged()
    assert merged.count() == 1 and merged.area() * dbu2 == pytest.approx(area, rel=1e-12)  # no overlaps
    assert area == pytest.approx(Polygon(xy).area, rel=1e-6)
    (back,) = read_contours(path)  # the pieces merge back into one contour
    assert Polygon(back.xy_nm).area == pytest.approx(Polygon(xy).area, rel=1e-6)


def test_vertex_limits(tmp_path):
    assert (SAFE_MAX_VERTICES, GDS_MAX_VERTICES) == (4094, 8189)
    recs = [ContourRecord("i", "i:1", circle(5000.0, 4094), "s", 1.0),
            ContourRecord("i", "i:2", circle(5000.0, 4095, cx=20000.0), "s", 1.0)]
    path = tmp_path / "default.gds"
    EXPORTERS["gds"].export(recs, path)
    counts = sorted((s[1], p.num_points()) for p, s in kl_shapes(path)[1])
    pieces = [c for f, c in counts if f == "i:2"]
    assert counts[0] == ("i:1", 4094) and len(pieces) == 2 and sum(pieces) == 4095 + 2  # the cut adds 2 vertices

    recs = [ContourRecord("i", "i:1", circle(5000.0, 8189), "s", 1.0),
            ContourRecord("i", "i:2", circle(5000.0, 8190, cx=20000.0), "s", 1.0)]
    path = tmp_path / "max.gds"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # gdstk warns above 8190 points (with the closing one)
        EXPORTERS["gds"].export(recs, path, max_vertices=GDS_MAX_VERTICES)
    counts = sorted((s[1], p.num_points()) for p, s in kl_shapes(path)[1])
    assert counts[0] == ("i:1", 8189) and [c for f, c in counts if f == "i:2"] == [4097, 4097]


def test_long_names_exceed_the_gds_property_budget_with_a_warning(tmp_path):
    name = "wafer07_die_3_4_site_0123_" * 4
    rec = ContourRecord(name, f"{name}:1", square(0, 0, 10), "sam2", 0.5)
    path = tmp_path / "long.gds"
    with pytest.warns(GeometryWarning, match="128 bytes"):
        EXPORTERS["gds"].export([rec], path)
    (poly, shape), = kl_shapes(path)[1]
    assert shape[4] == name
    assert read_contours(path)[0].feature_id == f"{name}:1"


# ------------------------------------------------------------ bad contours

def test_invalid_contours_are_repaired_or_skipped_with_a_warning(tmp_path):
    bowtie = np.array([(0, 0), (10, 10), (10, 0), (0, 10)], dtype=float)
    recs = [
        ContourRecord("i", "i:1", bowtie, "s", 1.0),
        ContourRecord("i", "i:2", np.array([(0, 0), (1, 1)], dtype=float), "s", 1.0),
        ContourRecord("i", "i:3", np.array([(0, 0), (np.nan, 1), (1, 0)]), "s", 1.0),
        ContourRecord("i", "i:4", np.array([(0, 0), (0.01, 0), (0, 0.01)]), "s", 1.0),  # below the grid
        ContourRecord("i", "i:5", square(50, 50, 10), "s", 1.0),
    ]
    path = tmp_path / "bad.gds"
    with pytest.warns(GeometryWarning) as caught:
        EXPORTERS["gds"].export(recs, path)
    text = " | ".join(str(w.message) for w in caught)
    for fid in ("i:1", "i:2", "i:3", "i:4"):
        assert f"'{fid}'" in text
    _, shapes = kl_shapes(path)
    areas = sorted((prop(s, "gds", "feature_id"), p.area()) for p, s in shapes)
    assert areas == [("i:1", 2500), ("i:1", 2500), ("i:5", 10000)]  # bow-tie -> two 25 nm^2 triangles (dbu^2)


@pytest.mark.parametrize("opts, msg", [
    ({"layer": "abc"}, "'layer'"),
    ({"datatype": -1}, "'datatype'"),
    ({"holes": "bogus"}, "'holes'"),
    ({"max_vertices": 9000}, "'max_vertices'"),
    ({"grid_nm": 0}, "grid_nm"),
    ({"per_image_cells": "maybe"}, "'per_image_cells'"),
])
def test_bad_options_raise_one_line_errors(tmp_path, records, opts, msg):
    with pytest.raises(SegsemError, match=msg) as e:
        EXPORTERS["gds"].export(records, tmp_path / "x.gds", **opts)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "x.gds").exists()


# ---------------------------------------------------------------------- CSV

def test_csv_content_is_exact_and_reads_back(tmp_path):
    recs = [
        ContourRecord("img1", "img1:1", np.array([(0.0, 0.0), (10.123456, 0.0), (10.0, -0.00001)]), "sam2", 0.87654),
        ContourRecord("im,2", "im,2:7", square(0, 0, 4)[::-1], "canny", 1.0, (np.array([(1, 1), (2, 1), (1, 2)], float),)),
    ]
    path = tmp_path / "c.csv"
    assert EXPORTERS["csv"].export(recs, path) == [path]
    assert path.read_text() == (
        "image,feature_id,source,confidence,ring,point_index,x_nm,y_nm\n"
        "img1,img1:1,sam2,0.8765,0,0,10.0000,0.0000\n"  # clockwise input -> reversed to counter-clockwise
        "img1,img1:1,sam2,0.8765,0,1,10.1235,0.0000\n"
        "img1,img1:1,sam2,0.8765,0,2,0.0000,0.0000\n"
        '"im,2","im,2:7",canny,1.0000,0,0,0.0000,0.0000\n'
        '"im,2","im,2:7",canny,1.0000,0,1,4.0000,0.0000\n'
        '"im,2","im,2:7",canny,1.0000,0,2,4.0000,4.0000\n'
        '"im,2","im,2:7",canny,1.0000,0,3,0.0000,4.0000\n'
        '"im,2","im,2:7",canny,1.0000,1,0,1.0000,2.0000\n'  # hole clockwise
        '"im,2","im,2:7",canny,1.0000,1,1,2.0000,1.0000\n'
        '"im,2","im,2:7",canny,1.0000,1,2,1.0000,1.0000\n'
    )
    back = read_contours(path)
    assert [(r.image, r.feature_id, r.source, r.confidence) for r in back] == [
        ("img1", "img1:1", "sam2", 0.8765), ("im,2", "im,2:7", "canny", 1.0)]
    assert back[1].xy_nm.tolist() == [[0, 0], [4, 0], [4, 4], [0, 4]]
    assert back[1].holes_nm[0].tolist() == [[1, 2], [2, 1], [1, 1]]
    assert tuple(path.read_text().splitlines()[0].split(",")) == CSV_COLUMNS


@pytest.mark.parametrize("body, msg", [
    ("a,b\n", "row 1: header"),
    ("image,feature_id,source,confidence,ring,point_index,x_nm,y_nm\ni,f,s,1,0,0,abc,1\n", "row 2 field 'x_nm'"),
    ("image,feature_id,source,confidence,ring,point_index,x_nm,y_nm\ni,f,s,1,-1,0,1,1\n", "row 2 field 'ring'"),
    ("image,feature_id,source,confidence,ring,point_index,x_nm,y_nm\ni,f,s,1,0,0\n", "row 2: expected 8"),
])
def test_read_bad_csv_names_row_and_field(tmp_path, body, msg):
    path = tmp_path / "bad.csv"
    path.write_text(body)
    with pytest.raises(SegsemError, match=msg):
        read_contours(path)


def test_read_errors(tmp_path):
    with pytest.raises(SegsemError, match="no such file"):
        read_contours(tmp_path / "missing.gds")
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(SegsemError, match="unknown contour file suffix"):
        read_contours(tmp_path / "x.txt")
    (tmp_path / "broken.gds").write_bytes(b"\x00\x06\x00\x02\x02")
    with pytest.raises(SegsemError, match="broken.gds"):
        read_contours(tmp_path / "broken.gds")


def test_read_foreign_layout_without_properties(tmp_path):
    lib = gdstk.Library(unit=1e-6, precision=1e-9)  # micrometre user unit, 1 nm grid
    cell = lib.new_cell("X")
    cell.add(gdstk.rectangle((0, 0), (0.5, 0.25), layer=100), gdstk.rectangle((1, 1), (2, 2), layer=101))
    path = tmp_path / "foreign.gds"
    lib.write_gds(str(path))
    (rec,) = read_contours(path)
    assert (rec.image, rec.feature_id, rec.source) == ("foreign", "foreign:1", "layout")
    assert math.isnan(rec.confidence)
    assert canon(rec.xy_nm) == canon(square(0, 0, 500)[:, :] * [1, 0.5])


# ------------------------------------------------------------------ atomic

@pytest.mark.parametrize("fmt", LAYOUT)
def test_layout_write_is_atomic(tmp_path, records, fmt, monkeypatch):
    def broken(lib, tmp, f):
        Path(tmp).write_bytes(b"\x00\x06\x00\x02\x02\x58 half a file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(contour_io, "_write_library", broken)
    path = tmp_path / f"out{EXPORTERS[fmt].suffix}"
    with pytest.raises(RuntimeError, match="disk full"):
        EXPORTERS[fmt].export(records, path)
    assert os.listdir(tmp_path) == []


def test_csv_write_is_atomic_and_keeps_the_old_file(tmp_path, records, monkeypatch):
    path = tmp_path / "out.csv"
    path.write_text("old\n")
    real = Path.write_text

    def broken(self, text, *a, **k):
        real(self, text[:10], *a, **k)
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", broken)
    with pytest.raises(OSError, match="disk full"):
        EXPORTERS["csv"].export(records, path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["out.csv"] and path.read_text() == "old\n"


def test_no_warnings_for_clean_input(tmp_path, records):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name, ex in EXPORTERS.items():
            ex.export(records, tmp_path / f"ok{ex.suffix}")
    assert sorted(os.listdir(tmp_path)) == ["ok.csv", "ok.gds", "ok.oas"]
