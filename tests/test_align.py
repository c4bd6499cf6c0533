"""Tests for segsem_cli.align: exact rendering and SEM-to-layout alignment.

The SEM-like test images are built here from shapely polygons: the printed
shapes differ from the design (CD bias, rounded corners), the image has bright
edge rims, either polarity, blur, noise, scan-line noise and a charging ramp.
"""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from shapely import affinity
from shapely.geometry import Point, Polygon, box

from segsem_cli.align import AlignResult, align_image, render_layout, sem_channels
from segsem_cli.errors import SegsemError
from segsem_cli.transform import PixelTransform

SHAPE = (256, 256)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def layout_to_px(polys_nm, t: PixelTransform):
    out = []
    for p in polys_nm:
        out.append(Polygon(t.to_pixel(np.asarray(p.exterior.coords)), [t.to_pixel(np.asarray(r.coords)) for r in p.interiors]))
    return out


def sem_from_px(polys_px, shape=SHAPE, *, bias_px=2.0, round_px=3.0, polarity=1, noise=0.03, scan=0.01,
                ramp=0.5, seed=0):
    """SEM-like image of polygons given in pixel coordinates (u, v)."""
    h, w = shape
    printed = [p.buffer(bias_px + round_px, join_style="round").buffer(-round_px, join_style="round") for p in polys_px]
    cov = render_layout(printed, shape)
    g = cv2.GaussianBlur(cov, (0, 0), 1.0)
    rim = np.hypot(*np.gradient(g))
    rim /= max(rim.max(), 1e-9)
    base = cov if polarity > 0 else 1.0 - cov
    img = cv2.GaussianBlur((0.3 * base + 0.6 * rim).astype(np.float32), (0, 0), 1.0)
    rng = np.random.default_rng(seed)
    vv, uu = np.mgrid[0:h, 0:w] / max(h, w)
    img = img + ramp * (0.6 * uu - 0.4 * vv) + rng.normal(0, noise, shape) + scan * rng.normal(0, 1, (h, 1))
    return (img * 800 + 1000).astype(np.float32)


def sem_true(polys_nm, t_nom: PixelTransform, du: float, dv: float, **kw):
    """Image whose content appears (du, dv) px right/down of where t_nom puts it."""
    px = [affinity.translate(p, du, dv) for p in layout_to_px(polys_nm, t_nom)]
    return sem_from_px(px, t_nom.shape, **kw)


PIX = 1.5  # nm per pixel
CENTER = (12000.0, -3500.0)


def mixed_layout(center=CENTER, pix=PIX):
    """A non-periodic clip: pads, a vertical line, a contact, a horizontal bar."""
    cx, cy = center
    s = pix
    shapes = [
        box(-100, -40, -20, 40), box(10, -90, 40, 70), Point(70, 50).buffer(18, 32),
        box(50, -80, 110, -60), box(-90, 60, -50, 100), box(-120, -120, -60, -95),
    ]
    return [affinity.translate(affinity.scale(p, s, s, origin=(0, 0)), cx, cy) for p in shapes]


# ---------------------------------------------------------------------------
# render_layout
# ---------------------------------------------------------------------------


def _coverage_ref(poly, shape):
    h, w = shape
    return np.array([[poly.intersection(box(c, r, c + 1, r + 1)).area for c in range(w)] for r in range(h)])


def test_render_exact_coverage_random_polygons():
    rng = np.random.default_rng(3)
    for _ in range(3):
        poly = Polygon(rng.uniform(-2, 22, (8, 2))).buffer(0)
        got = render_layout(poly, (20, 20))
        ref = _coverage_ref(poly, (20, 20))
        assert got.dtype == np.float32 and got.shape == (20, 20)
        assert np.abs(got - ref).max() < 1e-5


def test_render_rectangle_hole_and_clipping():
    got = render_layout([box(2.25, 3.5, 6.75, 5.0)], (8, 10))
    assert got[3, 2] == pytest.approx(0.75 * 0.5)
    assert got[4, 3] == pytest.approx(1.0)
    assert got[4, 6] == pytest.approx(0.75)
    assert got.sum() == pytest.approx(4.5 * 1.5, abs=1e-5)
    ring = Point(20, 20).buffer(15, 64).difference(Point(20, 20).buffer(6, 64))
    cov = render_layout(ring, (40, 40))
    assert cov.sum() == pytest.approx(ring.area, rel=1e-5)
    assert cov[20, 20] == pytest.approx(0.0, abs=1e-6)
    # partly outside the canvas: only the inside part is counted
    assert render_layout(box(-5, -5, 3.5, 3.5), (10, 10)).sum() == pytest.approx(12.25, abs=1e-5)
    # overlapping polygons are merged (no double counting)
    assert render_layout([box(0, 0, 4, 4), box(2, 2, 6, 6)], (8, 8)).max() == pytest.approx(1.0)
    assert render_layout([], (5, 5)).sum() == 0.0


def test_render_supersample_close_to_exact():
    poly = Point(10.3, 9.7).buffer(6.2, 32)
    exact = render_layout(poly, (20, 20))
    for n, tol in ((4, 0.25), (16, 0.07)):
        approx = render_layout(poly, (20, 20), supersample=n)
        assert np.abs(approx - exact).max() < tol
        # area (mean edge position) is unbiased to better than 0.05 px of perimeter
        assert abs(approx.sum() - exact.sum()) / poly.length < 0.05


def test_render_bad_input():
    with pytest.raises(SegsemError):
        render_layout(box(0, 0, 1, 1), (0, 5))
    with pytest.raises(SegsemError):
        render_layout([Point(1, 1)], (5, 5))


def test_sem_channels_rim_on_edge():
    cov = render_layout(box(40.0, -10, 200, 80), (64, 96))
    region, rim = sem_channels(cov, 2.0)
    row = rim[32]
    assert int(np.argmax(row)) in (39, 40)
    assert row.max() == pytest.approx(1.0, abs=0.1)  # a straight edge peaks at about 1
    assert region[32, 39] < 0.5 < region[32, 40]
    with pytest.raises(SegsemError):
        sem_channels(cov, 0.0)


def test_work_arrays_are_aligned_so_the_result_does_not_depend_on_the_process():
    # cv2.magnitude rounds the elements before the first 16/32-byte boundary of its output
    # differently in the last bit; with work arrays wherever the allocator put them, the same
    # image aligned in two processes differed by up to 1e-3 nm.
    from segsem_cli.align import _ALIGN, _channels, _scratch

    for tag in (None, "test-aligned"):
        for shape in [(1, 1), (7, 9), (100, 3), (333, 517), (1060, 1060)]:
            a = _scratch(tag, "x", shape)
            assert a.shape == shape and a.dtype == np.float32
            assert a.flags.c_contiguous and a.flags.writeable
            assert a.ctypes.data % _ALIGN == 0
        assert _scratch(tag, "y", (5, 5), np.float64).ctypes.data % _ALIGN == 0
    cov = np.clip(np.random.default_rng(3).normal(0.5, 0.4, (257, 263)), 0, 1).astype(np.float32)
    ref = [c.copy() for c in _channels(cov, 1.7)]
    buf = np.empty(cov.size + 16, np.float32)
    for k in range(1, 8):  # the coverage at every 4-byte offset: the same channels to the bit
        view = buf[k : k + cov.size].reshape(cov.shape)
        view[...] = cov
        for c, r in zip(_channels(view, 1.7, "test-aligned"), ref):
            assert np.array_equal(c, r)


# ---------------------------------------------------------------------------
# align_image
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "du,dv,polarity,seed",
    [(17.37, -23.81, 1, 0), (-28.62, 11.14, -1, 1), (4.55, 29.3, -1, 2), (-12.09, -6.71, 1, 3), (29.4, 0.35, 1, 4)],
)
def test_recovers_random_offsets(du, dv, polarity, seed):
    t_nom = PixelTransform(CENTER, PIX, SHAPE)
    polys = mixed_layout()
    img = sem_true(polys, t_nom, du, dv, polarity=polarity, seed=seed)
    r = align_image(img, t_nom, polys, search_px=40)
    assert isinstance(r, AlignResult)
    assert r.status == "ok", r.message
    assert not r.ambiguous
    assert abs(r.offset_px[0] - du) < 0.2 and abs(r.offset_px[1] - dv) < 0.2
    assert r.score > 0.7
    assert 0 < r.residual_px < 0.5
    # the refined transform maps a design vertex to where it appears in the image
    xy = np.asarray(polys[0].exterior.coords)[0]
    assert np.allclose(r.transform.to_pixel(xy), t_nom.to_pixel(xy) + (du, dv), atol=0.2)


def test_sign_convention_explicit():
    """Content 3 px right and 2 px down of nominal: the true centre is 3 px to
    the left (smaller x) and 2 px up (larger y, layout y is up) of nominal."""
    pix = 2.0
    t_nom = PixelTransform((500.0, 800.0), pix, SHAPE)
    polys = mixed_layout((500.0, 800.0), pix)
    img = sem_true(polys, t_nom, 3.0, 2.0, polarity=1)
    r = align_image(img, t_nom, polys, search_px=10)
    assert r.status == "ok", r.message
    assert r.offset_px == pytest.approx((3.0, 2.0), abs=0.1)
    assert r.offset_nm == pytest.approx((-6.0, 4.0), abs=0.2)
    assert r.transform.true_center_nm == pytest.approx((494.0, 804.0), abs=0.2)
    assert r.transform.offset_nm == pytest.approx(r.offset_nm)


def test_dark_holes_in_bright_resist():
    pix = 1.0
    t_nom = PixelTransform((0.0, 0.0), pix, SHAPE)
    rng = np.random.default_rng(7)
    # irregular contact holes (not periodic)
    pts = rng.uniform(-150, 150, (14, 2))
    polys = [Point(x, y).buffer(r, 32) for (x, y), r in zip(pts, rng.uniform(8, 16, 14))]
    img = sem_true(polys, t_nom, -21.3, 13.8, polarity=-1, noise=0.05, seed=5)
    r = align_image(img, t_nom, polys, search_px=40)
    assert r.status == "ok", r.message
    assert r.offset_px == pytest.approx((-21.3, 13.8), abs=0.2)


def test_no_refine_is_within_half_pixel():
    t_nom = PixelTransform(CENTER, PIX, SHAPE)
    polys = mixed_layout()
    img = sem_true(polys, t_nom, 7.3, -3.6)
    r = align_image(img, t_nom, polys, refine=False)
    assert r.status == "ok"
    assert r.offset_px == pytest.approx((7.3, -3.6), abs=1.0)


def test_small_rotation():
    t_nom = PixelTransform(CENTER, PIX, SHAPE)
    polys = mixed_layout()
    theta = math.radians(0.4)
    # image whose true transform has this rotation and an offset
    t_true = t_nom.with_offset((9.0, -4.5), theta)
    img = sem_from_px(layout_to_px(polys, t_true), seed=11)
    r = align_image(img, t_nom, polys, rotation=True)
    assert r.status == "ok", r.message
    assert r.rotation_rad == pytest.approx(theta, abs=math.radians(0.05))
    assert r.offset_nm == pytest.approx((9.0, -4.5), abs=0.2 * PIX)


def line_space(pitch_px, cd_px, pix, center, *, end_line=None, n=20):
    """Vertical lines (design), centred on the image; ``end_line`` ends mid-image."""
    cx, cy = center
    polys = []
    for k in range(-n, n + 1):
        x0 = cx + (k * pitch_px - cd_px / 2) * pix
        y0, y1 = cy - 400 * pix, cy + 400 * pix
        if end_line is not None and k == end_line:
            y0 = cy - 20 * pix  # line end 20 px above the image centre (layout y up)
        polys.append(box(x0, y0, x0 + cd_px * pix, y1))
    return polys


def test_line_space_is_ambiguous_nearest_candidate():
    pix = 1.0
    t_nom = PixelTransform((0.0, 0.0), pix, SHAPE)
    polys = line_space(24, 9, pix, (0.0, 0.0))
    img = sem_true(polys, t_nom, 14.4, 6.0, bias_px=1.0, seed=2)
    r = align_image(img, t_nom, polys, search_px=40, polarity="bright")
    assert r.ambiguous and r.status == "ambiguous"
    assert "ambiguous" in r.message
    # the candidate nearest the nominal position: 14.4 - 24 = -9.6 px
    assert r.offset_px[0] == pytest.approx(-9.6, abs=0.2)
    # along the lines nothing is known: the nominal position is kept
    assert r.offset_px[1] == pytest.approx(0.0, abs=0.01)
    assert r.transform.offset_nm[0] == pytest.approx(9.6 * pix, abs=0.2)
    assert r.polarity == "bright"


def test_line_space_tone_unknown_is_flagged():
    """Printed lines as wide as the design spaces: with the polarity unknown,
    lines and spaces can swap roles, which must be flagged, not guessed."""
    pix = 1.0
    t_nom = PixelTransform((0.0, 0.0), pix, SHAPE)
    polys = line_space(24, 10, pix, (0.0, 0.0))
    img = sem_true(polys, t_nom, 3.4, 0.0, bias_px=2.0, seed=3)  # printed CD 14 = design space
    r = align_image(img, t_nom, polys, search_px=40)
    assert r.status == "ambiguous"
    assert "polarity" in r.message
    # the tie goes to the prior (polygons print bright), so the true lines are kept even unasked
    assert r.polarity == "bright" and r.offset_px[0] == pytest.approx(3.4, abs=0.2)
    # with the polarity given, the true lines are found (one-pitch ambiguity only)
    r = align_image(img, t_nom, polys, search_px=40, polarity="bright")
    assert r.status == "ambiguous" and "polarity" not in r.message
    assert r.offset_px[0] == pytest.approx(3.4, abs=0.2)


def test_contact_array_is_ambiguous_nearest_candidate():
    pix = 1.0
    t_nom = PixelTransform((0.0, 0.0), pix, SHAPE)
    polys = [Point(i * 32.0, j * 32.0).buffer(9, 32) for i in range(-7, 8) for j in range(-7, 8)]
    img = sem_true(polys, t_nom, 20.3, -5.6, polarity=-1, seed=4)
    r = align_image(img, t_nom, polys, search_px=40)
    assert r.status == "ambiguous" and r.ambiguous
    assert r.offset_px == pytest.approx((20.3 - 32.0, -5.6), abs=0.2)
    assert len(r.candidates_px) >= 2


def test_line_space_with_line_end_is_unique():
    pix = 1.0
    t_nom = PixelTransform((0.0, 0.0), pix, SHAPE)
    polys = line_space(24, 9, pix, (0.0, 0.0), end_line=1)
    du, dv = 14.4, 6.3
    img = sem_true(polys, t_nom, du, dv, bias_px=1.0, seed=6)
    r = align_image(img, t_nom, polys, search_px=40)
    assert r.status == "ok", r.message
    assert not r.ambiguous
    assert r.offset_px == pytest.approx((du, dv), abs=0.2)


def test_blank_image_fails():
    t_nom = PixelTransform(CENTER, PIX, SHAPE)
    r = align_image(np.full(SHAPE, 1234.0), t_nom, mixed_layout())
    assert r.status == "failed" and "blank" in r.message
    assert r.transform == t_nom and r.offset_nm == (0.0, 0.0)


def test_noise_only_image_fails():
    t_nom = PixelTransform(CENTER, PIX, SHAPE)
    img = np.random.default_rng(0).normal(1000, 50, SHAPE)
    r = align_image(img, t_nom, mixed_layout())
    assert r.status == "failed", r.message
    assert r.transform == t_nom


def test_no_polygons_fails():
    t_nom = PixelTransform(CENTER, PIX, SHAPE)
    img = sem_true(mixed_layout(), t_nom, 0.0, 0.0)
    for polys in ([], [box(0, 0, 10, 10)]):  # none, or only far outside the view
        r = align_image(img, t_nom, polys)
        assert r.status == "failed" and "no layout edges" in r.message
        assert r.transform == t_nom


def test_bad_input():
    t_nom = PixelTransform(CENTER, PIX, SHAPE)
    with pytest.raises(SegsemError, match="shape"):
        align_image(np.zeros((100, 100)), t_nom, mixed_layout())
    with pytest.raises(SegsemError, match="2-D"):
        align_image(np.zeros((2, 256, 256)), t_nom, mixed_layout())
    with pytest.raises(SegsemError, match="search_px"):
        align_image(np.zeros(SHAPE), t_nom, mixed_layout(), search_px=-1)


# ---------------------------------------------------------------------------
# large images: coarse search on a pyramid level, half- then full-resolution fit
# ---------------------------------------------------------------------------

LARGE = (1024, 1024)


def large_layout(center=(0.0, 0.0), pix=1.0, seed=0):
    """A non-periodic 1024 px clip: pads, lines with line ends, contacts (nm, y up)."""
    rng = np.random.default_rng(seed)
    shapes = []
    for k in range(9):  # vertical lines of varying length (line ends in view)
        x = -420 + 70 * k + rng.uniform(-8, 8)
        shapes.append(box(x, -600, x + rng.uniform(18, 30), rng.uniform(-200, 300)))
    for i in range(4):  # a few contacts, irregular
        for j in range(3):
            x, y = 150 + 75 * i + rng.uniform(-10, 10), 150 + 80 * j + rng.uniform(-10, 10)
            shapes.append(Point(x, y).buffer(18, 32))
    shapes += [box(80, -450, 420, -300), box(-480, 330, -150, 400), box(200, -220, 240, 60), box(-300, 420, 350, 460)]
    cx, cy = center
    return [affinity.translate(affinity.scale(p, pix, pix, origin=(0, 0)), cx, cy) for p in shapes]


@pytest.mark.parametrize("du,dv,polarity,seed", [(31.37, -27.81, 1, 0), (-36.62, 18.14, -1, 1), (7.55, 37.3, 1, 2)])
def test_large_image_recovers_offsets(du, dv, polarity, seed):
    t_nom = PixelTransform((5000.0, -2000.0), 1.0, LARGE)
    polys = large_layout((5000.0, -2000.0), seed=seed)
    img = sem_true(polys, t_nom, du, dv, polarity=polarity, seed=seed, noise=0.06)
    r = align_image(img, t_nom, polys, search_px=40)
    assert r.status == "ok", r.message
    assert abs(r.offset_px[0] - du) < 0.2 and abs(r.offset_px[1] - dv) < 0.2
    assert r.score > 0.7
    assert 0 < r.residual_px < 0.5
    assert r.polarity == ("bright" if polarity > 0 else "dark")


def test_large_image_no_refine_and_rotation():
    t_nom = PixelTransform((0.0, 0.0), 1.0, LARGE)
    polys = large_layout()
    img = sem_true(polys, t_nom, -12.3, 21.7, seed=3)
    r = align_image(img, t_nom, polys, refine=False)
    assert r.status == "ok", r.message
    assert r.offset_px == pytest.approx((-12.3, 21.7), abs=0.5)
    theta = math.radians(0.25)
    t_true = t_nom.with_offset((14.0, 9.5), theta)
    img = sem_from_px(layout_to_px(polys, t_true), LARGE, seed=4)
    r = align_image(img, t_nom, polys, rotation=True)
    assert r.status == "ok", r.message
    assert r.rotation_rad == pytest.approx(theta, abs=math.radians(0.03))
    assert r.offset_nm == pytest.approx((14.0, 9.5), abs=0.2)


def test_large_contact_array_is_ambiguous():
    """A periodic array: the near-equal peaks of the 1/4 level are scored again at half
    resolution; the candidate nearest nominal is kept and the others are listed."""
    t_nom = PixelTransform((0.0, 0.0), 1.0, LARGE)
    polys = [Point(i * 48.0, j * 48.0).buffer(14, 32) for i in range(-13, 14) for j in range(-13, 14)]
    img = sem_true(polys, t_nom, 30.4, -9.7, polarity=-1, seed=5)
    r = align_image(img, t_nom, polys, search_px=40)
    assert r.status == "ambiguous" and r.ambiguous
    assert r.offset_px == pytest.approx((30.4 - 48.0, -9.7), abs=0.2)
    assert len(r.candidates_px) >= 2
    assert any(c == pytest.approx((30.0, -10.0), abs=2.5) for c in r.candidates_px)


def test_medium_image_line_space_keeps_nominal_along_lines():
    """512 px (coarse search at half resolution): long lines without ends leave the
    position along them unknown; it stays nominal and the result is flagged."""
    t_nom = PixelTransform((0.0, 0.0), 1.0, (512, 512))
    polys = line_space(30, 12, 1.0, (0.0, 0.0), n=12)
    img = sem_true(polys, t_nom, 8.6, 5.0, bias_px=1.0, seed=6)
    r = align_image(img, t_nom, polys, search_px=40, polarity="bright")
    assert r.status == "ambiguous"
    assert r.offset_px[0] == pytest.approx(8.6, abs=0.2)
    assert r.offset_px[1] == pytest.approx(0.0, abs=0.01)


def test_large_blank_and_noise_images_fail():
    t_nom = PixelTransform((0.0, 0.0), 1.0, LARGE)
    polys = large_layout()
    r = align_image(np.full(LARGE, 77.0, dtype=np.float32), t_nom, polys)
    assert r.status == "failed" and "blank" in r.message
    r = align_image(np.random.default_rng(1).normal(1000, 50, LARGE), t_nom, polys)
    assert r.status == "failed", r.message
    assert r.transform == t_nom and r.offset_px == (0.0, 0.0)


# ---------------------------------------------------------------------------
# internals of the fast fit: prepared layout rendering and sub-pixel sampling
# ---------------------------------------------------------------------------


def test_prepared_layout_coverage_is_exact():
    from segsem_cli.align import _Layout

    t = PixelTransform((100.0, 50.0), 2.0, (64, 80)).with_offset((3.1, -1.7), 0.01)
    polys = [Point(110, 60).buffer(20, 32).difference(Point(110, 60).buffer(8, 32)), box(20, 20, 60, 45),
             box(55, 40, 70, 90), Polygon([(140, 10), (190, 30), (160, 90)])]
    lay = _Layout(polys, t.field_of_view_nm(margin_px=30))
    for bias_px in (0.0, 1.5, -0.75):
        grown = [p.buffer(bias_px * 2.0, join_style="mitre", mitre_limit=4.0) for p in polys] if bias_px else polys
        parts = [g for q in grown for g in getattr(q, "geoms", [q])]
        px = [Polygon(t.to_pixel(np.asarray(p.exterior.coords)) + 4,
                      [t.to_pixel(np.asarray(r.coords)) + 4 for r in p.interiors]) for p in parts]
        ref = render_layout(px, (72, 88))
        got = lay.coverage(t, bias_px, (72, 88), -4.0)
        assert np.abs(got - ref).max() < 1e-6, bias_px
        assert np.abs(lay.coverage(t, bias_px, (72, 88), -4.0, tag="test") - ref).max() < 1e-4


def test_sampled_model_matches_exact_rendering_at_subpixel_shifts():
    """The fit samples the rendered channels by cubic interpolation; against an exact
    rendering at the shifted position the difference stays below 1.5 % (region) and
    3 % (rim) of the edge contrast at half-pixel offsets (sigma = 2 px), and below
    0.4 % / 1.2 % at the ~0.1 px offsets left after the final rendering."""
    from segsem_cli.align import _content_shift_to_offset, _Layout, _render, _Sampler

    t0 = PixelTransform(CENTER, PIX, SHAPE)
    lay = _Layout(mixed_layout(), t0.field_of_view_nm(margin_px=40))
    rows, cols = np.mgrid[12:244:2, 12:244:2]
    rows, cols = rows.ravel(), cols.ravel()
    samp = _Sampler(_render(lay, t0, 0.0, 2.0, 13, tag=None), rows, cols, True)
    for shift, tol_reg, tol_rim in [((0.5, 0.5), 0.015, 0.03), ((0.37, -0.81), 0.015, 0.03),
                                    ((-0.2, 0.45), 0.015, 0.03), ((0.1, -0.05), 0.004, 0.012)]:
        t = t0.with_offset(_content_shift_to_offset(t0, shift))
        reg, reg_u, _, rim, _, _ = samp.sample(t)
        ex = _render(lay, t, 0.0, 2.0, 13, tag=None)
        assert np.abs(reg - ex.reg[rows + 13, cols + 13]).max() < tol_reg
        assert np.abs(rim - ex.rim[rows + 13, cols + 13]).max() < tol_rim
        # the returned derivative is that of the interpolant itself (what the Newton steps use):
        # moving the content by +eps along u samples the channels at -eps
        eps = 1e-3
        up = samp.sample(t0.with_offset(_content_shift_to_offset(t0, (shift[0] + eps, shift[1]))))[0]
        dn = samp.sample(t0.with_offset(_content_shift_to_offset(t0, (shift[0] - eps, shift[1]))))[0]
        assert np.abs(reg_u + (up - dn) / (2 * eps)).max() < 1e-3


def test_coarse_level_full_resolution_agrees_and_bad_value():
    t_nom = PixelTransform((0.0, 0.0), 1.0, LARGE)
    polys = large_layout(seed=7)
    img = sem_true(polys, t_nom, -22.4, 15.9, seed=7)
    a = align_image(img, t_nom, polys, coarse_level=1)
    b = align_image(img, t_nom, polys)
    assert a.status == b.status == "ok"
    assert a.offset_px == pytest.approx((-22.4, 15.9), abs=0.2)
    assert a.offset_px == pytest.approx(b.offset_px, abs=0.02)
    with pytest.raises(SegsemError, match="coarse_level"):
        align_image(img, t_nom, polys, coarse_level=3)


def test_tone_tie_prefers_bright_polygons_over_a_nearer_swap():
    """True lines 9 px off nominal; the swapped tone (spaces as lines) fits 3 px off, nearer nominal.
    With the polarity unknown the tie goes to the prior (polygons print bright), not to the nearer swap."""
    pix = 1.0
    t_nom = PixelTransform((0.0, 0.0), pix, SHAPE)
    polys = line_space(24, 10, pix, (0.0, 0.0))
    img = sem_true(polys, t_nom, 9.0, 0.0, bias_px=2.0, seed=5)  # printed CD 14 = design space
    r = align_image(img, t_nom, polys, search_px=40)
    assert r.status == "ambiguous" and "polarity" in r.message
    assert r.polarity == "bright"
    assert r.offset_px[0] == pytest.approx(9.0, abs=0.2)


def test_default_search_is_widened_once_when_the_stage_error_exceeds_it():
    """Content 55 px off (beyond the default +/-40 px): the default search fails, is retried over
    +/-80 px and finds it; an explicit search range is a hard limit; noise still fails."""
    from pathlib import Path

    from segsem_cli.align import align_to_layout
    from segsem_cli.layout import Layout

    t_nom = PixelTransform(CENTER, PIX, SHAPE)
    polys = mixed_layout()
    lay = Layout(Path("mixed.gds"), "TOP", (1, 0), polys)
    img = sem_true(polys, t_nom, 55.0, -12.0, polarity=1, seed=8)
    r = align_to_layout(img, t_nom, lay)
    assert r.status == "ok", r.message
    assert r.offset_px == pytest.approx((55.0, -12.0), abs=0.2)
    assert "search widened to +/-80 px (the default +/-40 px failed" in r.message
    r40 = align_to_layout(img, t_nom, lay, search_px=40)
    assert r40.status == "failed" and "widened" not in r40.message
    rng = np.random.default_rng(0)
    noise = (1000 + 30 * rng.standard_normal(SHAPE)).astype(np.float32)
    rn = align_to_layout(noise, t_nom, lay)
    assert rn.status == "failed" and "also with the search widened to +/-80 px" in rn.message
