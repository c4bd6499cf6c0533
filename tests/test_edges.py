"""Sub-pixel edge refinement (segsem_cli.edges) and contour helpers (segsem_cli.contours)."""
from __future__ import annotations

import numpy as np
import pytest

from segsem_cli.contours import (
    associate,
    coarse_contours,
    normals,
    orient,
    perimeter,
    polygon_area,
    polygon_mask,
    resample_closed,
    signed_area,
)
from segsem_cli.edges import EdgeImage, estimate_noise, parse_refine_options, refine_contour, refine_contours
from segsem_cli.errors import SegsemError

from synthetic_helpers import Rim, convention_edge, disc, rect, render

RIM = Rim(rim=4.0)  # wide rim: the threshold rule lands within a few 0.01 px of mid-sidewall
BLUR = 0.8
CU, CV, R = 64.2, 63.9, 20.3


def circle(cu, cv, r, n=48):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.column_stack([cu + r * np.cos(t), cv + r * np.sin(t)])


def radii(c, cu=CU, cv=CV):
    return np.hypot(c[:, 0] - cu, c[:, 1] - cv)


def left_edge_u(c, v0, v1, u_mid):
    sel = (c[:, 1] > v0) & (c[:, 1] < v1) & (c[:, 0] < u_mid)
    return c[sel, 0]


# ----------------------------------------------------------------------------- contour helpers

def test_resample_spacing_and_orientation():
    sq = np.array([[0, 0], [10, 0], [10, 10], [0, 10]], dtype=float)
    r = resample_closed(sq, 0.5)
    assert len(r) == 80
    seg = np.hypot(*(np.roll(r, -1, axis=0) - r).T)
    assert np.allclose(seg, 0.5, atol=1e-9)
    assert signed_area(sq) == pytest.approx(100.0)
    assert signed_area(orient(sq, positive=False)) == pytest.approx(-100.0)
    assert perimeter(sq) == pytest.approx(40.0)


def test_normals_point_outward_for_both_orientations():
    c = circle(5.0, 7.0, 3.0, 64)
    for cc in (c, c[::-1]):
        n = normals(cc)
        radial = (cc - [5.0, 7.0]) / 3.0
        assert np.all(np.sum(n * radial, axis=1) > 0.99)


def test_polygon_mask_uses_pixel_centres():
    sq = np.array([[2.0, 3.0], [6.0, 3.0], [6.0, 8.0], [2.0, 8.0]])  # u in [2,6], v in [3,8]
    m = polygon_mask(sq, (12, 12))
    assert m.sum() == 20 == polygon_area(sq)
    assert m[3, 2] and m[7, 5] and not m[8, 5] and not m[3, 6]


def test_coarse_contours_pixel_convention():
    img = np.zeros((20, 20), dtype=np.float32)
    img[5:10, 4:12] = 1.0  # pixels v in [5,10), u in [4,12)
    cs = coarse_contours(img, 0.5)
    assert len(cs) == 1 and cs[0].closed
    c = cs[0].points
    # The 0.5 iso-line lies halfway between pixel centres, i.e. on the pixel boundaries.
    assert c[:, 0].min() == pytest.approx(4.0) and c[:, 0].max() == pytest.approx(12.0)
    assert c[:, 1].min() == pytest.approx(5.0) and c[:, 1].max() == pytest.approx(10.0)


def test_associate_unique_shared_and_missing():
    a = np.array([[0, 0], [10, 0], [10, 10], [0, 10]], dtype=float)
    b = a + [20, 0]
    far = a + [100, 100]
    c_a = a + 0.5
    bridge = np.array([[0, 0], [30, 0], [30, 10], [0, 10]], dtype=float)
    res = associate([a, far], [c_a])
    assert res[0].index == 0 and res[0].iou > 0.8 and res[0].shared_with == ()
    assert res[1].index == -1
    res = associate([a, b], [bridge])
    assert res[0].index == 0 and res[1].index == 0
    assert res[0].shared_with == (1,) and res[1].shared_with == (0,)


# ----------------------------------------------------------------------------- refinement accuracy

@pytest.mark.parametrize("tone,substrate", [("line", "outside"), ("hole", "inside")])
def test_disc_radius_and_rms_at_moderate_noise(tone, substrate):
    img = render([disc(CU, CV, R)], (128, 128), tone=tone, rim=RIM, blur=BLUR, noise=0.05, seed=3)
    res = refine_contour(img, circle(CU, CV, R + 2.5))  # coarse contour 2.5 px off
    r = radii(res.contour_uv)
    assert res.substrate == substrate
    assert abs(r.mean() - R) < 0.1
    assert np.sqrt(np.mean((r - R) ** 2)) < 0.2
    assert res.valid_fraction > 0.95


@pytest.mark.parametrize("t", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("tone", ["line", "hole"])
def test_straight_edge_follows_threshold_convention(tone, t):
    img = render([rect(30.3, 30.6, 90.7, 100.2)], (128, 128), tone=tone, rim=RIM, blur=BLUR, noise=0.02, seed=1)
    res = refine_contour(img, np.array([[33, 33], [88, 33], [88, 98], [33, 98.0]]), threshold=t)
    u = left_edge_u(res.contour_uv, 40, 90, 60).mean()
    into_resist = convention_edge(RIM, blur=BLUR, smooth_sigma=1.0, threshold=t)
    # line: resist inside (+u at the left edge); hole: resist outside (-u).
    expected = 30.3 + into_resist if tone == "line" else 30.3 - into_resist
    assert abs(u - expected) < 0.1
    if t == 0.5:
        assert abs(u - 30.3) < 0.1


def test_threshold_moves_edge_towards_resist():
    img = render([rect(30.3, 30.6, 90.7, 100.2)], (128, 128), rim=RIM, blur=BLUR, noise=0.0)
    base = np.array([[33, 33], [88, 33], [88, 98], [33, 98.0]])
    u = [left_edge_u(refine_contour(img, base, threshold=t).contour_uv, 40, 90, 60).mean() for t in (0.2, 0.5, 0.8)]
    assert u[0] < u[1] < u[2]  # higher level -> further up the flank -> into the resist (+u)


def test_edge_rules_order_on_flank():
    img = render([rect(30.3, 30.6, 90.7, 100.2)], (128, 128), rim=RIM, blur=BLUR, noise=0.0)
    base = np.array([[33, 33], [88, 33], [88, 98], [33, 98.0]])
    u = {e: left_edge_u(refine_contour(img, base, edge=e).contour_uv, 40, 90, 60).mean()
         for e in ("threshold", "max-gradient", "peak")}
    # Max gradient of the symmetric footprint ramp is at mid-sidewall; the rim peak is
    # at the sidewall top plus part of the rim plateau (footprint/2 + ~rim/2 into the resist).
    assert abs(u["max-gradient"] - 30.3) < 0.15
    assert 30.3 + RIM.footprint / 2 < u["peak"] < 30.3 + RIM.footprint / 2 + RIM.rim
    assert u["threshold"] < u["peak"]


@pytest.mark.parametrize("start", [-6.0, -3.0, 4.0])
def test_bright_rim_gives_one_edge_from_either_side(start):
    """A coarse contour beyond the rim (resist side, R-6), on the rim (R-3) or on the
    substrate (R+4) must give the same edge: the substrate-side flank, never the rim's other flank."""
    img = render([disc(CU, CV, R)], (128, 128), rim=RIM, blur=BLUR, noise=0.02, seed=5)
    res = refine_contour(img, circle(CU, CV, R + start))
    r = radii(res.contour_uv)
    assert abs(r.mean() - R) < 0.1
    assert r.max() - r.min() < 0.5  # no point jumped to the other flank


def test_substrate_override_and_rim_with_dark_resist():
    # Resist top as dark as the substrate: only the rim tells the sides apart.
    rim = Rim(S=0.2, P=1.0, T=0.2, rim=4.0)
    img = render([disc(CU, CV, R)], (128, 128), rim=rim, blur=BLUR, noise=0.02, seed=2)
    res = refine_contour(img, circle(CU, CV, R + 1))
    assert res.substrate == "outside"
    assert abs(radii(res.contour_uv).mean() - R) < 0.1
    forced = refine_contour(img, circle(CU, CV, R + 1), substrate="inside")
    assert forced.substrate == "inside"
    assert abs(radii(forced.contour_uv).mean() - R) > 0.5  # the wrong side gives another (wrong) edge


def test_noise_only_gives_no_valid_edge():
    rng = np.random.default_rng(0)
    img = (0.5 + 0.05 * rng.standard_normal((128, 128))).astype(np.float32)
    res = refine_contour(img, circle(CU, CV, R))
    assert res.valid_fraction < 0.3
    assert res.quality < 0.2


def test_blank_image_gives_no_valid_edge():
    res = refine_contour(np.full((64, 64), 0.3, dtype=np.float32), circle(32, 32, 10))
    assert res.valid_fraction == 0.0 and res.quality == 0.0


def test_quality_lower_on_noisy_image():
    q = []
    for noise in (0.01, 0.08, 0.2):
        img = render([disc(CU, CV, R)], (128, 128), rim=RIM, blur=BLUR, noise=noise, seed=4)
        q.append(refine_contour(img, circle(CU, CV, R + 1)).quality)
    assert q[0] > q[1] > q[2]
    assert q[0] > 0.9


def test_points_outside_image_are_invalid():
    img = render([disc(10.0, 64.0, 20.0)], (128, 128), rim=RIM, blur=BLUR, noise=0.01)
    res = refine_contour(img, circle(10.0, 64.0, 21.0))
    assert not res.inside.all() and not res.valid[~res.inside].any()


def test_batch_equals_single():
    img = render([disc(40, 40, 12), disc(90, 90, 15)], (128, 128), rim=RIM, blur=BLUR, noise=0.03, seed=7)
    a = refine_contours(img, [circle(40, 40, 13), circle(90, 90, 14)])
    b = refine_contour(EdgeImage(img), circle(90, 90, 14))
    assert np.allclose(a[1].contour_uv, b.contour_uv)


def test_noise_estimate():
    rng = np.random.default_rng(1)
    img = render([disc(CU, CV, R)], (128, 128), rim=RIM, blur=BLUR) + 0.07 * rng.standard_normal((128, 128))
    assert estimate_noise(img) == pytest.approx(0.07, rel=0.15)


# ----------------------------------------------------------------------------- validation and options

def test_bad_inputs_raise_segsem_error():
    img = np.zeros((32, 32), dtype=np.float32)
    with pytest.raises(SegsemError, match="edge rule"):
        refine_contour(img, circle(16, 16, 5), edge="zero-crossing")
    with pytest.raises(SegsemError, match=r"\(N, 2\)"):
        refine_contour(img, np.zeros((5, 3)))
    with pytest.raises(SegsemError, match="threshold"):
        refine_contour(img, circle(16, 16, 5), threshold=1.5)
    with pytest.raises(SegsemError, match="2-D image"):
        refine_contour(np.zeros(10), circle(16, 16, 5))


def test_parse_refine_options_from_strings():
    o = parse_refine_options({"threshold": "0.3", "edge": "Peak", "search_px": "8", "sigma": "1.5", "whatever": "x"})
    assert o["threshold"] == 0.3 and o["edge"] == "peak" and o["search_px"] == 8.0 and o["smooth_sigma"] == 1.5
    with pytest.raises(SegsemError, match="threshold='abc'"):
        parse_refine_options({"threshold": "abc"})
    with pytest.raises(SegsemError, match="substrate"):
        parse_refine_options({"substrate": "left"})


def test_large_batches_split_without_changing_results(monkeypatch):
    import segsem_cli.edges as edges_mod

    img = render([disc(40, 40, 12), disc(90, 90, 15)], (128, 128), tone="hole", rim=RIM, blur=BLUR, noise=0.03, seed=7)
    coarse = [circle(40, 40, 13), circle(90, 90, 14)]
    whole = refine_contours(img, coarse)
    monkeypatch.setattr(edges_mod, "_BATCH_POINTS", 50)
    split = refine_contours(img, coarse)
    for a, b in zip(whole, split):
        assert a.substrate == b.substrate == "inside"
        assert np.allclose(a.contour_uv, b.contour_uv)
