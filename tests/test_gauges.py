"""Gauge reading, CD measurement and the per-image gauge table."""
from __future__ import annotations

import csv

import numpy as np
import pytest
from shapely.geometry import Polygon, box

from segsem_cli.errors import SegsemError
from segsem_cli.gauges import Gauge, gauge_rows, measure_cd, read_gauges, write_gauge_csv
from segsem_cli.types import ContourRecord


def rect(x0, y0, x1, y1):
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=float)


# ------------------------------------------------------------------ measure_cd


def test_cd_of_rectangle_is_its_width_exactly():
    r = rect(10.25, -50, 47.6, 50)  # width 37.35 nm
    res = measure_cd((0, 3.3), (60, 3.3), [r])
    assert res.status == "ok"
    assert res.cd_nm == pytest.approx(37.35, abs=1e-12)
    np.testing.assert_allclose(res.crossings_xy, [[10.25, 3.3], [47.6, 3.3]], atol=1e-12)
    np.testing.assert_allclose(res.crossings_t, [10.25, 47.6], atol=1e-12)
    assert res.features == (0,)


def test_cd_on_tilted_cutline_and_reversed_direction():
    r = rect(0, 0, 30, 100)
    # diagonal cutline from (-10, 40) to (40, 90): crosses x=0 at y=50 and x=30 at y=80
    res = measure_cd((-10, 40), (40, 90), [r])
    assert res.status == "ok"
    assert res.cd_nm == pytest.approx(30 * np.sqrt(2), abs=1e-12)
    back = measure_cd((40, 90), (-10, 40), [r])
    assert back.cd_nm == pytest.approx(res.cd_nm, abs=1e-12)


def test_cd_spans_first_to_last_crossing_over_a_hole_and_two_features():
    ring = Polygon(rect(0, 0, 100, 100), [rect(20, 20, 80, 80)])
    # across the hole only: endpoints inside the ring's solid part -> two crossings at 20 and 80
    res = measure_cd((10, 50), (90, 50), [ring])
    assert res.status == "ok" and res.cd_nm == pytest.approx(60.0)
    assert len(res.crossings_t) == 2
    # two separate lines: the space between them is measured from inside each line
    a, b = rect(0, 0, 20, 100), rect(55.5, 0, 75, 100)
    sp = measure_cd((10, 50), (60, 50), [a, b])
    assert sp.cd_nm == pytest.approx(35.5)
    assert sp.features == (0, 1)
    assert sp.crossing_features == (0, 1)


def test_record_holes_count_as_the_same_feature():
    rec = ContourRecord("img", "f1", rect(0, 0, 100, 100), "sam2", 0.9, holes_nm=(rect(40, 40, 60, 60),))
    res = measure_cd((-5, 50), (105, 50), [rec])
    assert res.status == "ok" and res.cd_nm == pytest.approx(100.0)
    np.testing.assert_allclose(res.crossings_t, [5, 45, 65, 105])
    assert res.features == (0,)


def test_no_crossing_and_single_crossing_give_none():
    r = rect(0, 0, 10, 10)
    res = measure_cd((20, 5), (30, 5), [r])
    assert res.status == "no_crossing" and res.cd_nm is None
    assert res.crossings_t.shape == (0,)
    res = measure_cd((5, 5), (30, 5), [r])
    assert res.status == "single_crossing" and res.cd_nm is None
    assert res.crossings_xy.tolist() == [[10.0, 5.0]]
    assert measure_cd((0, 0), (1, 1), []).status == "no_crossing"


def test_cutline_through_a_vertex_counts_once():
    diamond = np.array([[0, -10], [10, 0], [0, 10], [-10, 0]], dtype=float)
    res = measure_cd((-20, 0), (20, 0), [diamond])
    assert res.status == "ok"
    assert len(res.crossings_t) == 2
    assert res.cd_nm == pytest.approx(20.0)


def test_measure_cd_rejects_zero_length():
    with pytest.raises(ValueError, match="zero-length"):
        measure_cd((1, 1), (1, 1), [rect(0, 0, 2, 2)])


# ------------------------------------------------------------------ read_gauges


def write(path, text):
    path.write_text(text)
    return path


def test_read_gauges_keeps_extra_columns(tmp_path):
    p = write(tmp_path / "g.csv", "name,x1,y1,x2,y2,type,weight\nA,0,1.5,10,1.5,line,2\n\nB,-3,0,-3,8e1,space,1\n")
    gs = read_gauges(p)
    assert [g.name for g in gs] == ["A", "B"]
    assert gs[1].y2 == 80.0 and gs[1].x1 == -3.0
    assert gs[0].extra == {"type": "line", "weight": "2"}
    assert gs[0].length_nm == 10.0


@pytest.mark.parametrize(
    "text, expected",
    [
        ("name,x1,y1,x2\nA,0,0,1\n", r"g\.csv row 1 field 'y2': missing column"),
        ("name,x1,y1,x2,y2\nA,0,0,1,1\nB,0,abc,1,1\n", r"g\.csv row 3 field 'y1': 'abc' is not a number"),
        ("name,x1,y1,x2,y2\nA,0,0,1,1\nA,0,0,2,2\n", r"g\.csv row 3 field 'name': duplicate gauge name 'A'"),
        ("name,x1,y1,x2,y2\nA,0,0,1,1\n\nC,5,5,5,5\n", r"g\.csv row 4 field 'x2': zero-length cutline"),
        ("name,x1,y1,x2,y2\nA,0,,1,1\n", r"g\.csv row 2 field 'y1': empty"),
        ("name,x1,y1,x2,y2\nA,0,nan,1,1\n", r"g\.csv row 2 field 'y1': 'nan' is not a finite number"),
        ("", r"g\.csv: empty gauge file"),
    ],
)
def test_read_gauges_errors_name_row_and_field(tmp_path, text, expected):
    p = write(tmp_path / "g.csv", text)
    with pytest.raises(SegsemError, match=expected) as ei:
        read_gauges(p)
    assert "\n" not in str(ei.value)


def test_read_gauges_missing_file(tmp_path):
    with pytest.raises(SegsemError, match="not found"):
        read_gauges(tmp_path / "nope.csv")


# ------------------------------------------------------------------ gauge_rows + write


def test_gauge_rows_pick_image_measure_and_write(tmp_path):
    recs_a = [
        ContourRecord("a", "a:0", rect(10, -40, 30, 40), "sam2", 0.8),
        ContourRecord("a", "a:1", rect(50, -40, 72.5, 40), "threshold", 0.6),
    ]
    recs_b = [ContourRecord("b", "b:0", rect(10, -40, 31, 40), "sam2", 0.95)]  # b sees the line 1 nm wider
    fovs = {"a": box(0, -50, 100, 50), "b": box(-90, -50, 40, 50)}
    gauges = [
        Gauge("line", 5, 0, 35, 0, {"kind": "line"}),  # in both a and b; a's centre (50,0) is nearer (20,0)
        Gauge("two", 20, 10, 60, 10, {"kind": "space"}),  # only in a; crosses both features
        Gauge("miss", 35, 0, 45, 0, {"kind": "space"}),  # in a, crosses nothing
        Gauge("out", 90, 0, 120, 0, {"kind": "line"}),  # leaves every field of view
        Gauge("half", 20, 20, 40, 20, {"kind": "line"}),  # single crossing
    ]
    rows = gauge_rows(gauges, {"a": recs_a, "b": recs_b}, fovs)
    by = {r["name"]: r for r in rows}
    assert by["line"]["image"] == "a" and by["line"]["wafer_cd_nm"] == pytest.approx(20.0)
    assert by["line"]["status"] == "ok" and by["line"]["source"] == "sam2" and by["line"]["confidence"] == 0.8
    assert by["two"]["wafer_cd_nm"] == pytest.approx(20.0)  # the space from x=30 to x=50
    assert by["two"]["source"] == "sam2+threshold" and by["two"]["confidence"] == 0.6
    assert by["miss"]["status"] == "no_crossing" and by["miss"]["wafer_cd_nm"] == ""
    assert by["out"]["status"] == "outside_images" and by["out"]["image"] == "" and by["out"]["wafer_cd_nm"] == ""
    assert by["half"]["status"] == "single_crossing" and by["half"]["wafer_cd_nm"] == ""
    # nearer centre wins: move the gauge next to b's centre
    rows_b = gauge_rows([Gauge("lb", 5, 0, 35, 0)], {"a": recs_a, "b": recs_b}, {"a": box(0, -50, 200, 50), **{"b": fovs["b"]}})
    assert rows_b[0]["image"] == "b" and rows_b[0]["wafer_cd_nm"] == pytest.approx(21.0)

    out = write_gauge_csv(tmp_path / "sub" / "gauges.csv", rows)
    with open(out, newline="") as fh:
        got = list(csv.DictReader(fh))
    assert list(got[0].keys()) == ["name", "x1", "y1", "x2", "y2", "kind", "wafer_cd_nm", "image", "source", "confidence", "status"]
    assert got[0]["wafer_cd_nm"] == "20" and got[0]["kind"] == "line" and got[0]["x1"] == "5"
    assert got[3]["status"] == "outside_images" and got[3]["wafer_cd_nm"] == ""
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["gauges.csv"]
