"""contour_sigma="auto": the along-contour smoothing chosen from each contour's own displacements."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter1d, uniform_filter1d

from segsem_cli.contours import resample_closed
from segsem_cli.edges import AUTO_SIGMAS, auto_contour_sigma, parse_refine_options, refine_contour
from segsem_cli.errors import SegsemError
from synthetic_helpers import Rim, rect, render


def _series(rough: float, noise: float, n: int = 3000, seed: int = 0, corr: float = 15.0, shared: int = 3):
    """True edge (Gaussian-correlated roughness of rms ``rough``) and displacements with
    position noise of rms ``noise`` shared by ``shared`` neighbouring points (along_points=3)."""
    rng = np.random.default_rng(seed)
    s = gaussian_filter1d(rng.standard_normal(n), corr / 2, mode="wrap")
    s = s / s.std() * rough if rough > 0 else np.zeros(n)
    e = uniform_filter1d(rng.standard_normal(n), shared, mode="wrap")
    return s, s + e / e.std() * noise


def _err(s, d, sigma):
    return float(np.sqrt(np.mean((gaussian_filter1d(d, sigma, mode="wrap") - s) ** 2)))


def test_white_noise_gets_the_longest_smoothing_and_a_clean_rough_edge_the_shortest():
    s, d = _series(0.0, 1.0, shared=1)
    sig, info = auto_contour_sigma(d, np.ones(len(d), bool))
    assert sig == max(AUTO_SIGMAS)
    assert 0.9 < info["nugget"] < 1.1  # the noise variance, 1 px^2
    s, d = _series(1.5, 0.0)
    sig, info = auto_contour_sigma(d, np.ones(len(d), bool))
    assert sig == min(AUTO_SIGMAS)
    assert info["nugget"] < 0.05


@pytest.mark.parametrize("rough,noise", [(1.8, 1.2), (1.2, 0.6), (0.8, 0.2)])
def test_the_choice_is_near_the_best_fixed_smoothing(rough, noise):
    s, d = _series(rough, noise, seed=4)  # noise shared by 3 points, as the estimator is told
    sig, _ = auto_contour_sigma(d, np.ones(len(d), bool), noise_points=3)
    errs = {c: _err(s, d, c) for c in AUTO_SIGMAS}
    assert errs[sig] <= 1.06 * min(errs.values())
    assert errs[sig] <= errs[3.0] + 1e-12  # never worse than the fixed default here


def test_too_few_points_keep_the_default():
    _, d = _series(0.0, 1.0, n=400)
    ok = np.zeros(len(d), bool)
    ok[:50] = True
    sig, info = auto_contour_sigma(d, ok)
    assert sig == 3.0 and info["points"] == 50


def test_noisy_image_smooths_longer_and_lands_closer_to_the_edge():
    # A 60 x 90 px rectangle at dose-15-like noise: auto chooses more than 3 samples and the
    # straight edges come out closer to the truth than with the fixed default.
    rim = Rim(rim=4.0)
    x0, y0, x1, y1 = 40.3, 30.6, 100.7, 120.2
    errs = {}
    used = []
    for seed in range(3):
        img = render([rect(x0, y0, x1, y1)], (160, 150), rim=rim, blur=1.5, noise=0.35, seed=seed)
        coarse = resample_closed(np.array([[x0 + 1, y0 + 1], [x1 - 1, y0 + 1], [x1 - 1, y1 - 1], [x0 + 1, y1 - 1.0]]), 1.0)
        for cs in ("auto", 3.0):
            res = refine_contour(img, coarse, contour_sigma=cs, passes=1)
            c = res.contour_uv
            left = (np.abs(c[:, 0] - x0) < 3) & (c[:, 1] > y0 + 15) & (c[:, 1] < y1 - 15)
            right = (np.abs(c[:, 0] - x1) < 3) & (c[:, 1] > y0 + 15) & (c[:, 1] < y1 - 15)
            e = np.concatenate([c[left, 0] - x0, c[right, 0] - x1])
            errs.setdefault(cs, []).append(e - e.mean())  # scatter about the convention's own bias
            if cs == "auto":
                used.append(res.params["contour_sigma"])
    assert min(used) > 3.0
    rms = {k: float(np.sqrt(np.mean(np.concatenate(v) ** 2))) for k, v in errs.items()}
    assert rms["auto"] < 0.85 * rms[3.0]


def test_option_parsing():
    assert parse_refine_options({})["contour_sigma"] == "auto"
    assert parse_refine_options({"contour_sigma": "AUTO"})["contour_sigma"] == "auto"
    assert parse_refine_options({"contour_sigma": None})["contour_sigma"] == "auto"  # None = the default
    assert parse_refine_options({"contour_sigma": "4.5"})["contour_sigma"] == 4.5
    with pytest.raises(SegsemError, match="contour_sigma"):
        parse_refine_options({"contour_sigma": "wide"})
    img = render([rect(20.3, 20.6, 60.7, 70.2)], (96, 96), rim=Rim(rim=4.0), blur=1.0, noise=0.0)
    coarse = resample_closed(np.array([[22, 22], [59, 22], [59, 69], [22, 69.0]]), 1.0)
    with pytest.raises(SegsemError, match="contour_sigma must be a number >= 0 or 'auto'"):
        refine_contour(img, coarse, contour_sigma=-2)


@pytest.mark.parametrize("cs,used", [(1.0, 1.0), (0.0, 0.0), ("auto", 3.0)])
def test_a_contour_without_edges_reports_the_smoothing_it_was_given(cs, used):
    img = np.full((64, 64), 0.3)  # blank: no edge is found anywhere
    coarse = resample_closed(np.array([[20, 20], [44, 20], [44, 44], [20, 44.0]]), 1.0)
    res = refine_contour(img, coarse, contour_sigma=cs, passes=1)
    assert not res.valid.any()
    assert res.params["contour_sigma"] == used
