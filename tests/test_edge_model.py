"""threshold=auto: the edge threshold measured on the image itself (segsem_cli/edge_model.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter1d

from segsem_cli.edge_model import (AUTO_START, estimate_edge_threshold, exgauss, fit_edge_profile,
                                   threshold_at_edge)
from segsem_cli.edges import EdgeImage, _locate, parse_refine_options, refine_contours
from segsem_cli.errors import SegsemError
from segsem_cli.plugins import get_fallback
from segsem_cli.transform import PixelTransform
from segsem_cli.types import Feature, SEMImage

from synthetic_helpers import Rim, disc, rect, render

#: An edge whose rim starts at the edge and decays into the resist (the model's own family):
#: t = 0.5 lies well down the flank, on the substrate side of the edge.
RIM_FROM_EDGE = Rim(S=0.2, P=1.0, T=0.45, footprint=0.01, rim=0.0, decay=3.0)
SHAPES = [disc(48.3, 50.6, 22.2), disc(112.7, 48.1, 18.4), rect(30.4, 90.3, 130.6, 120.8)]


def _scene(noise=0.02, seed=1):
    img = render(SHAPES, (160, 160), rim=RIM_FROM_EDGE, blur=1.5, noise=noise, seed=seed)
    coarse = [(s.polygon(96) if s.kind == "disc" else s.polygon()) + [0.7, -0.5] for s in SHAPES]
    return img, coarse


def _radius_errors(results):
    out = []
    for s, r in zip(SHAPES, results):
        if s.kind == "disc":
            cu, cv, rad = s.params
            out.append(float(np.hypot(r.contour_uv[:, 0] - cu, r.contour_uv[:, 1] - cv).mean() - rad))
    return np.array(out)


def test_auto_threshold_puts_the_edge_where_the_rim_starts():
    img, coarse = _scene()
    eimg = EdgeImage(img)
    auto = refine_contours(eimg, coarse, threshold="auto")
    half = refine_contours(EdgeImage(img), coarse, threshold=0.5)
    fit = eimg.edge_threshold
    assert fit.source == "auto" and fit.profiles >= 300
    assert 0.6 < fit.threshold < 0.72  # measured 0.658
    assert fit.fit.sigma == pytest.approx(1.6, abs=0.25)  # beam 1.5 px plus the pixel's own width
    assert fit.fit.decay == pytest.approx(3.0, abs=0.5)
    assert all(r.params["threshold"] == fit.threshold and r.params["threshold_source"] == "auto" for r in auto)
    assert np.all(np.abs(_radius_errors(auto)) < 0.1)  # measured -0.005, -0.03 px
    assert np.all(_radius_errors(half) > 0.4)  # t = 0.5: 0.6 px out on the substrate side


def test_the_measurement_is_made_once_per_image():
    img, coarse = _scene()
    eimg = EdgeImage(img)
    first = refine_contours(eimg, coarse[:2], threshold="auto")
    measured = eimg.edge_threshold
    again = refine_contours(eimg, coarse[2:], threshold="auto")  # e.g. a retry: same t, no new fit
    assert eimg.edge_threshold is measured
    assert first[0].params["threshold"] == again[0].params["threshold"] == measured.threshold


def _blurred(u, x, sigma, dx):
    return np.interp(x, np.arange(len(u)) * dx - 30.0, gaussian_filter1d(u, sigma / dx))


@pytest.mark.parametrize("family, tol", [("step", 0.05), ("rim_from_edge", 0.05), ("rim_on_edge", 0.2)])
@pytest.mark.parametrize("sigma", [1.0, 2.0])
def test_fit_finds_the_edge_of_noise_free_profiles(family, tol, sigma):
    dx = 0.01
    xf = np.arange(-30.0, 30.0, dx)
    edge = 0.37
    step = np.where(xf > edge, 1.0, 0.0)
    x = np.arange(-40, 41) * 0.25
    if family == "step":
        p = 0.2 + 0.6 * _blurred(step, x, sigma, dx)
    elif family == "rim_from_edge":
        p = 0.2 + _blurred(step * (0.3 + 0.7 * np.exp(-np.clip(xf - edge, 0, None) / 2.5)), x, sigma, dx)
    else:  # a gradient-magnitude rim, symmetric about the edge
        b = _blurred(step, xf, sigma, dx)
        p = np.interp(x, xf, 0.3 * b + np.abs(np.gradient(b, dx)) / np.abs(np.gradient(b, dx)).max())
    f = fit_edge_profile(x, p)
    assert f is not None and f.misfit < 0.01
    assert f.edge == pytest.approx(edge, abs=tol)
    if family == "step":
        assert threshold_at_edge(f, search_px=6.0, sample_px=0.25) == pytest.approx(0.5, abs=0.02)


def test_threshold_at_edge_is_where_the_rule_puts_the_edge():
    x = np.arange(-40, 41) * 0.25
    p = 0.2 + 0.5 * exgauss(x - 0.2, 1.3, 3.0) + 0.3 * (x > 0.2)
    f = fit_edge_profile(x, p)
    t = threshold_at_edge(f, search_px=6.0, sample_px=0.25)
    k = 24  # the rule's window: +/- 6 px at 0.25 px, centred on the fitted edge
    q = f.curve(np.arange(-k, k + 1) * 0.25 + f.edge)[None, :]
    xi, found, *_ = _locate(q, q, edge="threshold", threshold=t, centre_weight=0.0)
    assert found[0] and (xi[0] - k) * 0.25 == pytest.approx(0.0, abs=0.01)


def test_exgauss_is_exact_for_short_and_long_decays():
    x = np.linspace(-8, 12, 401)
    dx = 0.001
    xf = np.arange(-30.0, 30.0, dx)
    for decay in (0.05, 0.5, 4.0, 40.0):
        ref = np.interp(x, xf, gaussian_filter1d(np.where(xf > 0, np.exp(-np.clip(xf, 0, None) / decay), 0.0),
                                                 1.5 / dx))
        assert np.allclose(exgauss(x, 1.5, decay), ref, atol=2e-3)


def test_too_few_edge_points_fall_back_to_half_and_say_why():
    img = render([disc(20.0, 20.0, 5.0)], (40, 40), rim=RIM_FROM_EDGE, blur=1.5, noise=0.01, seed=2)
    eimg = EdgeImage(img)
    out = estimate_edge_threshold(eimg, [disc(20.0, 20.0, 5.0).polygon(32)])
    assert out.source == "default" and out.threshold == AUTO_START
    assert "fewer than" in out.message


def test_options_accept_auto_and_numbers():
    assert parse_refine_options({})["threshold"] == "auto"  # the default
    assert parse_refine_options({"threshold": "AUTO"})["threshold"] == "auto"
    assert parse_refine_options({"threshold": "0.66"})["threshold"] == pytest.approx(0.66)
    with pytest.raises(SegsemError, match="threshold"):
        parse_refine_options({"threshold": "half"})
    with pytest.raises(SegsemError, match="threshold"):
        parse_refine_options({"threshold": "1.5"})


def test_threshold_fallback_measures_t_by_default():
    img, _ = _scene()
    image = SEMImage(Path("auto.tif"), img, PixelTransform((0.0, 0.0), 1.0, img.shape))
    polys = [s.polygon(96) if s.kind == "disc" else s.polygon() for s in SHAPES]
    feats = [Feature(f"auto:{i}", image.transform.to_layout(p), np.asarray(p, float), False)
             for i, p in enumerate(polys)]
    res = get_fallback("threshold").extract(image, feats)
    assert all(r.ok and r.extra["edge_threshold_source"] == "auto" for r in res)
    assert 0.6 < res[0].extra["edge_threshold"] < 0.72
    for s, r in zip(SHAPES[:2], res[:2]):
        cu, cv, rad = s.params
        assert abs(np.hypot(r.contour_px[:, 0] - cu, r.contour_px[:, 1] - cv).mean() - rad) < 0.1
    given = get_fallback("threshold").extract(image, feats, threshold="0.5")
    assert "edge_threshold" not in given[0].extra


def test_bad_options_are_reported_before_anything_is_measured():
    img, coarse = _scene()
    eimg = EdgeImage(img)
    with pytest.raises(SegsemError, match="substrate: got 1 values for 3 contours"):
        refine_contours(eimg, coarse, threshold="auto", substrate=["inside"])
    with pytest.raises(SegsemError, match="search_px"):
        refine_contours(eimg, coarse, threshold="auto", search_px=-1.0)
    assert eimg.edge_threshold is None
