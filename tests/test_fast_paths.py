"""Fast re-implementations give the same results as the straightforward code they replace."""
from __future__ import annotations

import numpy as np
import pytest
from skimage.measure import find_contours

from segsem_cli.contours import coarse_contours
from segsem_cli.edges import gaussian_smooth

from segsem_plugins.threshold import _coarse_contours, iso_lines


def _same_contours(a, b) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("seed", range(6))
def test_iso_lines_equal_skimage_find_contours(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(rng.integers(2, 60, 2))
    img = rng.standard_normal(shape)
    if seed % 2:
        img = gaussian_smooth(img.astype(np.float32), 1.5)  # float32 input, smooth closed and open lines
    for level in (0.0, 0.3, float(np.median(img))):
        want = find_contours(img, level)
        got = iso_lines(img, level)
        assert _same_contours(want, got)
    assert len(find_contours(img, 0.0)) >= 1


def test_iso_lines_saddles_closed_and_open_order():
    # a checkerboard is all saddles; a bright disc gives a closed contour, a bright band open ones
    img = np.zeros((40, 50))
    img[5:15, 5:15] = np.indices((10, 10)).sum(axis=0) % 2
    v, u = np.mgrid[0:40, 0:50]
    img += np.hypot(u - 35, v - 25) < 6
    img[:, 45:48] = 1.0
    want = find_contours(img, 0.5)
    got = iso_lines(img, 0.5)
    assert _same_contours(want, got)
    closed = [c for c in got if np.array_equal(c[0], c[-1])]
    assert len(closed) >= 2 and len(got) > len(closed)


def test_iso_lines_level_on_pixel_values_and_integer_images():
    # pixels exactly at the level put crossings on grid vertices (handled by skimage)
    img = np.round(np.random.default_rng(3).standard_normal((30, 30)) * 2) / 2
    assert _same_contours(find_contours(img, 0.5), iso_lines(img, 0.5))
    ints = (np.random.default_rng(4).random((20, 20)) * 4).astype(np.uint8)
    assert _same_contours(find_contours(ints, 1.5), iso_lines(ints, 1.5))
    assert iso_lines(np.zeros((5, 5)), 0.5) == []


def test_coarse_contours_fast_equal_reference():
    rng = np.random.default_rng(5)
    img = gaussian_smooth(rng.standard_normal((120, 140)).astype(np.float32), 2.5)
    level = float(np.percentile(img, 60))
    want = coarse_contours(img, level, min_area=4.0)
    got = _coarse_contours(img, level, min_area=4.0)
    assert len(want) == len(got) > 3
    for a, b in zip(want, got):
        assert a.closed == b.closed and a.area == b.area and np.array_equal(a.points, b.points)
