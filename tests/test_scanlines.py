"""Scan-line offset correction (segsem_cli/scanlines.py) on synthetic raster images."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import uniform_filter1d

from segsem_cli.errors import SegsemError
from segsem_cli.scanlines import correct_scan_lines, scan_line_offsets

from synthetic_helpers import Rim, rect, render

SHAPE = (256, 256)
GREY, BASE = 160.0, 30.0  # grey levels per signal unit, substrate offset


def scene(shapes, *, noise_grey=4.0, seed=0):
    sig = render(shapes, SHAPE, rim=Rim(rim=4.0), blur=0.8)
    rng = np.random.default_rng(seed)
    return (BASE + GREY * sig + rng.normal(0.0, noise_grey, SHAPE)).astype(np.float32)


BARS = [rect(20.3, 30.4, 236.6, 60.7), rect(40.2, 100.5, 70.8, 236.1), rect(120.6, 110.2, 220.3, 180.9)]


def stripes(rows, sigma, seed=1):
    return np.random.default_rng(seed).normal(0.0, sigma, rows).astype(np.float32)


def test_offsets_removed_and_reported():
    ref = scene(BARS)
    o = stripes(SHAPE[0], 6.0)
    striped = ref + o[:, None]
    out, rep = correct_scan_lines(striped)
    assert rep.applied and rep.lines_measured > 150
    assert 4.5 < rep.rms_grey < 7.5 and rep.noise_floor_grey < 1.5
    # rows with flat pixels (not those across the wide bar's rims and interior, which are all edge)
    _, counts, _ = scan_line_offsets(striped)
    rows = np.nonzero(counts > 0)[0]
    rows = rows[(rows > 2) & (rows < SHAPE[0] - 3)]
    removed = (striped - out).mean(axis=1)
    err = (removed - removed[rows].mean()) - (o - o[rows].mean())
    assert np.std(err[rows]) < 0.25 * np.std(o[rows]), (np.std(err[rows]), np.std(o[rows]))
    # rows without flat pixels are left alone
    assert np.all(removed[counts == 0] == 0.0)
    # offsets are whole quarters of a grey level (keeps integer-like images on exact arithmetic)
    assert np.allclose(removed * 4, np.rint(removed * 4), atol=1e-3)


def test_clean_image_returned_unchanged():
    ref = scene(BARS, seed=3)
    out, rep = correct_scan_lines(ref)
    assert not rep.applied and rep.shrink == 0.0
    assert out is ref
    assert rep.rms_grey < 2.0 * rep.noise_floor_grey


def test_horizontal_lines_are_not_mistaken_for_stripes():
    # full-width horizontal lines: every row lies on structure, which must not read as an offset
    lines = [rect(-10.0, v, 266.0, v + 14.3) for v in np.arange(8.2, 250.0, 32.0)]
    ref = scene(lines, seed=5)
    out, rep = correct_scan_lines(ref)
    assert not rep.applied, rep
    assert out is ref


def test_horizontal_edges_gain_from_correction():
    from pathlib import Path

    from segsem_cli.plugins import get_registry
    from segsem_cli.transform import PixelTransform
    from segsem_cli.types import Feature, SEMImage

    bar = rect(60.3, 80.4, 196.6, 150.7)  # background beside it keeps its rows measurable
    fb = get_registry().get("fallback", "threshold")

    def edges(pixels):
        img = SEMImage(Path("s.tif"), pixels, PixelTransform((0.0, 0.0), 1.0, SHAPE))
        feat = Feature("bar", img.transform.to_layout(bar.polygon()), bar.polygon(), False)
        r, = fb.extract(img, [feat])
        assert r.ok, (r.status, r.extra)
        c = r.contour_px
        mid = (c[:, 0] > 80) & (c[:, 0] < 176)
        return np.array([c[mid & (c[:, 1] < 115), 1].mean(), c[mid & (c[:, 1] > 115), 1].mean()])

    raw_err, fixed_err = [], []
    for seed in range(3):
        ref = scene([bar], noise_grey=6.0, seed=10 + seed)
        striped = ref + stripes(SHAPE[0], 10.0, seed=20 + seed)[:, None]
        clean = edges(ref)
        raw_err.append(edges(striped) - clean)
        fixed_err.append(edges(correct_scan_lines(striped)[0]) - clean)
    raw, fixed = np.sqrt(np.mean(np.square(raw_err))), np.sqrt(np.mean(np.square(fixed_err)))
    assert raw > 0.05, raw  # the stripes do move the horizontal edges ...
    assert fixed < 0.5 * raw, (raw, fixed)  # ... and the correction takes most of that back


def test_modes_and_errors():
    ref = scene(BARS)
    striped = ref + stripes(SHAPE[0], 6.0)[:, None]
    out, rep = correct_scan_lines(striped, mode="off")
    assert out is striped and not rep.applied
    with pytest.raises(SegsemError, match="mode must be one of auto, off"):
        correct_scan_lines(striped, mode="rows")
    with pytest.raises(SegsemError, match="2-D"):
        scan_line_offsets(np.zeros((4, 4, 3)))
    off, counts, noise = scan_line_offsets(striped)
    assert off.shape == (SHAPE[0],) and counts.max() > 32 and 3.0 < noise < 5.5


def test_noise_correlated_along_the_scan_is_not_taken_for_stripes():
    # A detector's limited bandwidth correlates neighbouring pixels of a row. Row means of such
    # noise vary more than white pixel noise of the same per-pixel sigma would make them; the
    # significance test must measure noise on the binned rows, not on single pixels.
    sig = render(BARS, SHAPE, rim=Rim(rim=4.0), blur=0.8)
    for seed in range(3):
        rng = np.random.default_rng(40 + seed)
        noise = uniform_filter1d(rng.normal(0.0, 8.0, SHAPE), 4, axis=1)
        img = (BASE + GREY * sig + noise).astype(np.float32)
        out, rep = correct_scan_lines(img)
        assert not rep.applied, rep
        assert out is img
        # the same image with real stripes on top is still corrected
        striped = img + stripes(SHAPE[0], 6.0, seed=seed)[:, None]
        assert correct_scan_lines(striped)[1].applied
