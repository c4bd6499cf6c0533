import gdstk
import numpy as np
import pytest

from segsem_cli.errors import SegsemError
from segsem_cli.layout import context_pixels, features_in_view, load_layout, parse_layer
from segsem_cli.transform import PixelTransform


def make_lib(tmp_path, suffix=".gds", unit=1e-6):
    lib = gdstk.Library(unit=unit, precision=1e-12)
    leaf = lib.new_cell("LEAF")
    s = 1e-9 / unit  # one nm in user units
    leaf.add(gdstk.rectangle((0, 0), (20 * s, 100 * s), layer=1, datatype=0))
    leaf.add(gdstk.rectangle((0, 0), (5 * s, 5 * s), layer=2, datatype=0))
    top = lib.new_cell("TOP")
    top.add(gdstk.Reference(leaf, (100 * s, 0), columns=3, rows=1, spacing=(50 * s, 0)))
    top.add(gdstk.rectangle((400 * s, 0), (440 * s, 40 * s), layer=1, datatype=0))
    p = tmp_path / f"t{suffix}"
    (lib.write_gds if suffix == ".gds" else lib.write_oas)(str(p))
    return p


@pytest.mark.parametrize("suffix", [".gds", ".oas"])
@pytest.mark.parametrize("unit", [1e-6, 1e-9])
def test_flattened_polygons_in_nm(tmp_path, suffix, unit):
    lay = load_layout(make_lib(tmp_path, suffix, unit))
    assert lay.cell_name == "TOP"
    assert len(lay.polygons) == 4
    xs = sorted(round(p.bounds[0], 6) for p in lay.polygons)
    assert xs == [100.0, 150.0, 200.0, 400.0]
    assert lay.polygons[0].area == pytest.approx(2000.0)
    assert lay.bounds == pytest.approx((100.0, 0.0, 440.0, 100.0))


def test_layer_and_cell_selection(tmp_path):
    p = make_lib(tmp_path)
    assert len(load_layout(p, layer=(2, 0)).polygons) == 3
    assert len(load_layout(p, cell="LEAF").polygons) == 1
    with pytest.raises(SegsemError, match="no polygons on layer 7/0"):
        load_layout(p, layer=(7, 0))
    with pytest.raises(SegsemError, match="no cell 'NOPE'"):
        load_layout(p, cell="NOPE")


def test_ambiguous_top_cell(tmp_path):
    lib = gdstk.Library()
    for name in ("A", "B"):
        lib.new_cell(name).add(gdstk.rectangle((0, 0), (1, 1)))
    p = tmp_path / "two.gds"
    lib.write_gds(str(p))
    with pytest.raises(SegsemError, match="several top cells"):
        load_layout(p)


def test_parse_layer():
    assert parse_layer("100/2") == (100, 2)
    assert parse_layer("5") == (5, 0)
    with pytest.raises(SegsemError, match="not a layer/datatype"):
        parse_layer("a/b")


def test_clip_and_features_in_view(tmp_path):
    lay = load_layout(make_lib(tmp_path, unit=1e-9))
    # a 100 x 100 px image at 1 nm/px centred at (160, 50): x in [110, 210], y in [0, 100]
    t = PixelTransform(center_nm=(160.0, 50.0), pixel_nm=1.0, shape=(100, 100))
    feats = features_in_view(lay, t)
    ids = [f.feature_id for f in feats]
    assert ids == ["p0", "p1", "p2"]
    f0 = feats[0]  # [100,120] x [0,100], clipped at x=110
    assert f0.clipped
    assert f0.layout_nm[:, 0].min() == pytest.approx(110.0)
    assert not feats[1].clipped
    # pixel polygon of p1 ([150,170] x [0,100]) spans u in [40, 60], v in [0, 100]
    np.testing.assert_allclose(sorted(set(np.round(feats[1].pixels[:, 0], 9))), [40.0, 60.0])
    np.testing.assert_allclose(sorted(set(np.round(feats[1].pixels[:, 1], 9))), [0.0, 100.0])



def test_context_pixels_give_a_frame_cut_polygon_as_drawn_beyond_the_frame(tmp_path):
    lay = load_layout(make_lib(tmp_path, unit=1e-9))
    t = PixelTransform(center_nm=(160.0, 50.0), pixel_nm=1.0, shape=(100, 100))  # x in [110, 210]
    feats = features_in_view(lay, t)
    ctx = context_pixels(lay, t, feats, margin_px=64.0)
    # p0 ([100, 120] x [0, 100]) is clipped at x = 110 (u = 0): in context it reaches u = -10
    assert feats[0].pixels[:, 0].min() == pytest.approx(0.0)
    assert ctx[0][:, 0].min() == pytest.approx(-10.0) and ctx[0][:, 0].max() == pytest.approx(10.0)
    # p2 ([200, 220] x [0, 100]) is clipped at x = 210 (u = 100): in context it reaches u = 110
    assert ctx[2][:, 0].max() == pytest.approx(110.0)
    # an unclipped feature keeps its array; a margin too short to reach the corner stops short
    assert ctx[1] is feats[1].pixels
    assert context_pixels(lay, t, feats, margin_px=4.0)[0][:, 0].min() == pytest.approx(-4.0)
    # features named by someone else (not p<index>) keep their own polygon
    from segsem_cli.types import Feature
    other = [Feature("gate_3", feats[0].layout_nm, feats[0].pixels, True), Feature("p99", feats[0].layout_nm,
                                                                                    feats[0].pixels, True)]
    assert all(c is f.pixels for c, f in zip(context_pixels(lay, t, other), other))


def test_polygon_cut_into_parts_by_the_view_gives_one_feature_per_part(tmp_path):
    # A comb: spine at y in [0, 20], teeth x in [0, 20] and [60, 90] up to y = 100.
    # A view over y in [30, 100] cuts it into its two teeth: both are features.
    lib = gdstk.Library(unit=1e-9, precision=1e-12)
    top = lib.new_cell("TOP")
    top.add(gdstk.Polygon([(0, 0), (90, 0), (90, 100), (60, 100), (60, 20), (20, 20), (20, 100), (0, 100)], layer=1))
    path = tmp_path / "comb.gds"
    lib.write_gds(str(path))
    lay = load_layout(path)
    t = PixelTransform(center_nm=(50.0, 65.0), pixel_nm=1.0, shape=(70, 100))
    feats = features_in_view(lay, t)
    assert [f.feature_id for f in feats] == ["p0", "p0.1"]
    assert all(f.clipped for f in feats)
    big, small = feats  # the 30 nm wide tooth is larger than the 20 nm one
    assert (big.layout_nm[:, 0].min(), big.layout_nm[:, 0].max()) == pytest.approx((60.0, 90.0))
    assert (small.layout_nm[:, 0].min(), small.layout_nm[:, 0].max()) == pytest.approx((0.0, 20.0))
    assert small.layout_nm[:, 1].min() == pytest.approx(30.0)


def test_context_pixels_keep_the_frame_clipped_parts_of_a_cut_polygon(tmp_path):
    # The comb of the test above: its two teeth are parts p0, p0.1 of one polygon, which the
    # grown window joins again; each part keeps its own frame-clipped polygon.
    lib = gdstk.Library(unit=1e-9, precision=1e-12)
    top = lib.new_cell("TOP")
    top.add(gdstk.Polygon([(0, 0), (90, 0), (90, 100), (60, 100), (60, 20), (20, 20), (20, 100), (0, 100)], layer=1))
    top.add(gdstk.rectangle((30, 40), (50, 200), layer=1))  # a line cut by the top of the view
    lib.write_gds(str(tmp_path / "comb.gds"))
    lay = load_layout(tmp_path / "comb.gds")
    t = PixelTransform(center_nm=(50.0, 65.0), pixel_nm=1.0, shape=(70, 100))  # y in [30, 100]
    feats = features_in_view(lay, t)
    ctx = context_pixels(lay, t, feats, margin_px=64.0)
    by_id = dict(zip([f.feature_id for f in feats], ctx))
    for f in feats:
        if f.feature_id.startswith("p0"):
            assert by_id[f.feature_id] is f.pixels
    line = next(f for f in feats if f.feature_id == "p1")
    assert line.clipped and line.pixels[:, 1].min() == pytest.approx(0.0)  # v = 0 at y = 100
    assert by_id["p1"][:, 1].min() == pytest.approx(-64.0)  # drawn on up to the grown window


def test_a_polygon_wrapping_a_corner_just_outside_the_view_is_a_border_candidate():
    # An L around the view's top-right corner, 3 px away: its bounding box overlaps the view, the
    # polygon does not. It is not a feature in view, so it must be tried from the border.
    from pathlib import Path

    from shapely.geometry import Polygon

    from segsem_cli.layout import Layout, border_candidates

    t = PixelTransform(center_nm=(0.0, 0.0), pixel_nm=1.0, shape=(100, 100))  # x, y in [-50, 50]
    ell = Polygon([(53, -60), (80, -60), (80, 80), (-60, 80), (-60, 53), (53, 53)])
    far = Polygon([(-70, -10), (-60, -10), (-60, 10), (-70, 10)])  # 10 px left of the view: beyond the margin
    lay = Layout(Path("x.gds"), "TOP", (1, 0), [ell, far])
    assert features_in_view(lay, t) == []
    cands = border_candidates(lay, t, margin_px=6.0)
    assert [c.feature_id for c in cands] == ["p0"] and all(c.clipped for c in cands)
    # its seed strip lies inside the view, along the two sides the L runs beside
    u, v = cands[0].pixels[:, 0], cands[0].pixels[:, 1]
    assert u.min() >= 0.0 and v.min() >= 0.0 and u.max() <= 100.0 and v.max() <= 100.0
    assert u.max() == pytest.approx(100.0) and v.min() == pytest.approx(0.0)
