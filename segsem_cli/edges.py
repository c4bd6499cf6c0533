"""Sub-pixel edge placement along contour normals on the SEM signal.

Shared by the classical fallbacks and the SAM2 backbone: give it any coarse
closed contour in ``(u, v)`` pixels and the image, get back the contour moved
onto the physical edge, with per-point validity and a quality score.

Coordinates follow :mod:`segsem_cli.transform`: ``u`` right, ``v`` down, pixel
``(r, c)`` centred at ``(c + 0.5, r + 0.5)``. The image array is sampled at
array index ``(row, col) = (v - 0.5, u - 0.5)``.

Edge convention (``docs/edge-convention.md``)
--------------------------------------------
The printed contour is the resist sidewall at mid-height. Along a normal the
CD-SEM signal has a minimum on the substrate side, rises across the sidewall
footprint to the bright rim at the sidewall top, then decays into the resist
top. With the profile oriented from substrate to resist:

* ``edge="threshold"`` (default, ``threshold=t=0.5``): the position on the
  substrate-side flank (between the minimum and the rim peak) where the
  profile crosses ``min + t * (peak - min)``, linearly interpolated.
* ``edge="peak"``: the rim peak, parabolic sub-sample interpolation.
* ``edge="max-gradient"``: the steepest point of the substrate-side flank.

The substrate side is decided per contour from the data (``substrate="auto"``:
the side whose half-profiles are darker on average) or forced with
``substrate="inside"`` / ``"outside"`` (relative to the contour).

The rim peak is the sample with the largest rise above the running minimum
coming from the substrate side, so the rim's resist-side flank (the second
edge a naive gradient detector reports) is never chosen.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Mapping, Sequence

import numpy as np

from .contours import as_contour, normals, orient, resample_closed
from .errors import SegsemError

__all__ = [
    "EDGE_RULES",
    "EdgeImage",
    "RefineResult",
    "refine_contour",
    "refine_contours",
    "estimate_noise",
    "parse_refine_options",
    "opt_float",
    "opt_int",
    "opt_choice",
    "feature_result",
]

EDGE_RULES = ("threshold", "peak", "max-gradient")
_BATCH_POINTS = 8192
SUBSTRATE_SIDES = ("auto", "inside", "outside")


# ----------------------------------------------------------------------------- image prep

def estimate_noise(pixels: np.ndarray, *, stride: int = 4) -> float:
    """Robust per-pixel noise sigma of an image (grey levels).

    ``1.4826 * MAD`` of horizontal neighbour differences divided by
    ``sqrt(2)``; edges occupy few pixels, so the median ignores them. Rows are
    subsampled with ``stride`` for speed.
    """
    a = np.asarray(pixels, dtype=np.float32)[::max(1, int(stride))]
    if a.shape[1] < 2:
        return 0.0
    d = (a[:, 1:] - a[:, :-1]).ravel()
    med = np.median(d)
    return float(1.4826 * np.median(np.abs(d - med)) / np.sqrt(2.0))


def gaussian_smooth(pixels: np.ndarray, sigma: float) -> np.ndarray:
    """Isotropic Gaussian smoothing (float32, reflect border); ``sigma <= 0`` returns float32 pixels."""
    a = np.ascontiguousarray(pixels, dtype=np.float32)
    if sigma <= 0:
        return a
    import cv2

    k = int(2 * np.ceil(4 * sigma) + 1)
    return cv2.GaussianBlur(a, (k, k), sigmaX=float(sigma), sigmaY=float(sigma), borderType=cv2.BORDER_REFLECT)


class EdgeImage:
    """An image prepared once for many refinements: the array profiles are sampled from, and its noise.

    Parameters
    ----------
    pixels : 2-D grey-level array (row, column), any real dtype.
    image_sigma : optional isotropic Gaussian pre-smoothing in px (default 0:
        profiles are smoothed along the normal and averaged along the contour
        instead, which does not shift curved edges; see docs/edge-convention.md).
    noise : per-pixel noise sigma of ``pixels``; estimated when None.
    """

    def __init__(self, pixels: np.ndarray, *, image_sigma: float = 0.0, noise: float | None = None):
        a = np.asarray(pixels)
        if a.ndim != 2 or min(a.shape) < 4:
            raise SegsemError(f"edge refinement: expected a 2-D image of at least 4x4 pixels, got shape {a.shape}")
        if not np.issubdtype(a.dtype, np.number):
            raise SegsemError(f"edge refinement: image dtype {a.dtype} is not numeric")
        if not np.all(np.isfinite(a)):
            raise SegsemError("edge refinement: image contains non-finite values")
        if image_sigma < 0:
            raise SegsemError(f"edge refinement: image_sigma must be >= 0, got {image_sigma}")
        self.pixels = a
        self.image_sigma = float(image_sigma)
        self.sampled = gaussian_smooth(a, self.image_sigma)
        self.noise = float(estimate_noise(a) if noise is None else noise)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.pixels.shape)  # type: ignore[return-value]


# ----------------------------------------------------------------------------- results

@dataclass(frozen=True)
class RefineResult:
    """The refined contour and how much to trust each point.

    Attributes
    ----------
    contour_uv : (N, 2) refined closed contour in ``(u, v)`` px (positive orientation).
    valid : (N,) bool, True where a clean edge was found on the normal and
        kept by the outlier test (the others were filled by interpolation).
    found : (N,) bool, True where an edge was found before outlier rejection.
    displacement : (N,) px moved along the outward normal from the resampled input.
    snr : (N,) rim contrast ``peak - min`` over the profile noise (0 where no edge).
    substrate : "inside" or "outside", the side taken as substrate.
    inside : (N,) bool, True where the whole search window lay inside the image.
    """

    contour_uv: np.ndarray
    valid: np.ndarray
    found: np.ndarray
    displacement: np.ndarray
    snr: np.ndarray
    substrate: str
    inside: np.ndarray
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def valid_fraction(self) -> float:
        return float(np.mean(self.valid)) if len(self.valid) else 0.0

    @property
    def median_snr(self) -> float:
        return float(np.median(self.snr[self.valid])) if np.any(self.valid) else 0.0

    @property
    def roughness_px(self) -> float:
        """RMS of the kept raw edge positions about the regularised contour (px)."""
        r = self.params.get("_residual")
        if r is None or not np.any(self.valid):
            return float("nan")
        return float(np.sqrt(np.mean(np.asarray(r)[self.valid] ** 2)))

    @property
    def quality(self) -> float:
        """A [0, 1] score: valid fraction x contrast term x roughness term.

        * contrast term ``snr^2 / (snr^2 + snr_half^2)`` with the median
          per-point SNR (``snr_half`` = 12 by default);
        * roughness term ``1 / (1 + (rms / 0.5 px)^2)`` of the raw edge
          positions about the regularised contour (noise makes edges jitter).
        """
        if not np.any(self.valid):
            return 0.0
        s = self.median_snr
        half = float(self.params.get("snr_half", 12.0))
        c_term = s * s / (s * s + half * half)
        rough = self.roughness_px
        r_term = 1.0 / (1.0 + (rough / 0.5) ** 2) if np.isfinite(rough) else 0.0
        return float(np.clip(self.valid_fraction * c_term * r_term, 0.0, 1.0))


# ----------------------------------------------------------------------------- sampling

_REMAP_ROWS = 32000  # cv2.remap maps must stay below SHRT_MAX rows


def _sample(arr: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Bilinear samples of ``arr`` at ``(M, K)`` arrays of ``u`` and ``v`` (edge-clamped), float32.

    Array index ``(row, col) = (v - 0.5, u - 0.5)``. Uses :func:`cv2.remap`
    (float maps: exact bilinear weights), in chunks of rows.
    """
    import cv2

    src = np.ascontiguousarray(arr, dtype=np.float32)
    mx = (u - 0.5).astype(np.float32)
    my = (v - 0.5).astype(np.float32)
    out = np.empty(mx.shape, dtype=np.float32)
    for r0 in range(0, mx.shape[0], _REMAP_ROWS):
        r1 = min(mx.shape[0], r0 + _REMAP_ROWS)
        out[r0:r1] = cv2.remap(src, mx[r0:r1], my[r0:r1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return out


def _neighbour_index(counts: np.ndarray, along_points: int) -> np.ndarray:
    """``(M, J)`` indices of each point's ``J`` circular neighbours within its own contour."""
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    st = np.repeat(starts, counts)
    n = np.repeat(counts, counts)
    local = np.arange(int(counts.sum())) - st
    j = np.arange(along_points) - along_points // 2
    return st[:, None] + (local[:, None] + j[None, :]) % n[:, None]


def _along_mean(a: np.ndarray, counts: np.ndarray, window: int) -> np.ndarray:
    """Circular moving average of rows over ``window`` (odd) neighbours within each contour.

    ``a`` is ``(M, ...)`` with the contours' rows concatenated (``counts``).
    One padded gather and a float64 cumulative sum: no Python loop per contour.
    """
    if window <= 1:
        return a
    h = window // 2
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    # Padded index: for each contour, local positions -h .. n+h-1 wrapped into it.
    lens = counts + 2 * h
    pst = np.repeat(starts, lens)
    pn = np.repeat(counts, lens)
    pstart_p = np.concatenate([[0], np.cumsum(lens)[:-1]])
    local = np.arange(int(lens.sum())) - np.repeat(pstart_p, lens) - h
    idx = pst + local % pn
    c = np.cumsum(a[idx], axis=0, dtype=np.float64)
    c = np.concatenate([np.zeros((1,) + c.shape[1:]), c], axis=0)
    # Row i of contour k sits at padded position pstart_p[k] + h + i; window covers [pos-h, pos+h].
    pos = np.repeat(pstart_p, counts) + h + (np.arange(int(counts.sum())) - np.repeat(starts, counts))
    return ((c[pos + h + 1] - c[pos - h]) / window).astype(a.dtype, copy=False)


def _raw_profiles(arr: np.ndarray, pts: np.ndarray, nrm: np.ndarray, *, search_px: float, sample_px: float,
                  smooth_sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Profiles ``(M, K)`` at offsets ``-search_px..search_px`` along the outward normals,
    smoothed along the normal (1-D Gaussian ``smooth_sigma`` px), and a per-point flag
    that the whole window lies inside the image."""
    from scipy.ndimage import gaussian_filter1d

    pad = int(np.ceil(3.0 * smooth_sigma / sample_px)) if smooth_sigma > 0 else 0
    k = int(round(search_px / sample_px))
    offsets = np.arange(-k - pad, k + pad + 1) * sample_px
    u = pts[:, 0:1] + offsets[None, :] * nrm[:, 0:1]
    v = pts[:, 1:2] + offsets[None, :] * nrm[:, 1:2]
    h, w = arr.shape
    ends_u, ends_v = u[:, [0, -1]], v[:, [0, -1]]  # a straight window is inside iff its ends are
    inside = np.all((ends_u >= 0.5) & (ends_u <= w - 0.5) & (ends_v >= 0.5) & (ends_v <= h - 0.5), axis=1)
    prof = _sample(arr, u, v)
    if smooth_sigma > 0:
        prof = gaussian_filter1d(prof, smooth_sigma / sample_px, axis=1, mode="nearest")
    if pad:
        prof = prof[:, pad:-pad]
    return prof, inside


def _profiles(arr: np.ndarray, pts: np.ndarray, nrm: np.ndarray, counts: np.ndarray, *, search_px: float,
              sample_px: float, smooth_sigma: float, along_points: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_raw_profiles` averaged with the ``along_points`` neighbours on the contour
    (each sampled along its own normal, so the average follows a curved edge)."""
    prof, inside = _raw_profiles(arr, pts, nrm, search_px=search_px, sample_px=sample_px,
                                 smooth_sigma=smooth_sigma)
    if along_points > 1:
        prof = _along_mean(prof, counts, along_points)
        inside = _along_mean(inside.astype(np.float32), counts, along_points) > 0.999
    return prof, inside


@lru_cache(maxsize=64)
def _profile_noise_factor(image_sigma: float, smooth_sigma: float, sample_px: float, along_points: int,
                          step_px: float) -> float:
    """Std of a profile sample per unit of per-pixel white noise, measured once by Monte Carlo.

    Runs :func:`_profiles` with the same parameters over straight lines on a
    white-noise image (bilinear interpolation, smoothing along the normal and
    averaging along the contour make an analytic formula fiddly).
    """
    rng = np.random.default_rng(20261107)
    noise = gaussian_smooth(rng.standard_normal((192, 192)).astype(np.float32), image_sigma)
    n_lines, length = 48, along_points + 8
    h = along_points // 2
    ang = rng.uniform(0, np.pi, n_lines)
    cen = rng.uniform(70, 122, (n_lines, 2))
    tan = np.column_stack([np.cos(ang), np.sin(ang)])
    kk = (np.arange(length) - length / 2) * step_px
    pts = (cen[:, None, :] + kk[None, :, None] * tan[:, None, :]).reshape(-1, 2)
    nrm = np.repeat(np.column_stack([-tan[:, 1], tan[:, 0]]), length, axis=0)
    counts = np.full(n_lines, length)
    prof, _ = _profiles(noise, pts, nrm, counts, search_px=4.0, sample_px=sample_px,
                        smooth_sigma=smooth_sigma, along_points=along_points)
    keep = np.tile(np.r_[np.zeros(h, bool), np.ones(length - 2 * h, bool), np.zeros(h, bool)], n_lines)
    return float(np.std(prof[keep]))


def _locate(q: np.ndarray, qw: np.ndarray, *, edge: str, threshold: float, centre_weight: float,
            noise_w: float = 0.0, base_band: float = 0.05) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Edge index position in profiles oriented substrate -> resist.

    ``qw`` (averaged over more contour points, so less noisy) picks the rim
    peak and the substrate minimum and sets their levels; the crossing is
    located on ``q``. Noise biases the minimum of a profile low, so the
    substrate level is the mean of the ``qw`` samples before the peak that lie
    within ``max(base_band * contrast, 3 * noise_w)`` of the minimum (the
    substrate floor), not the single lowest sample.

    Returns ``(x, found, contrast)``: fractional sample index of the edge,
    whether one was found, and the rim contrast ``peak - min`` (from ``qw``).
    """
    m_, k_ = q.shape
    idx = np.arange(k_)
    cm = np.minimum.accumulate(qw, axis=1)
    rise = qw - cm
    centre = (k_ - 1) / 2.0
    wgt = 1.0 - centre_weight * ((idx - centre) / max(centre, 1.0)) ** 2
    # Candidates are local maxima of the profile (the last sample counts when rising),
    # so the weighting picks *which* rim, never a point on its flank.
    lm = np.ones_like(qw, dtype=bool)
    lm[:, 1:] &= qw[:, 1:] >= qw[:, :-1]
    lm[:, :-1] &= qw[:, :-1] >= qw[:, 1:]
    k = np.argmax(np.where(lm, rise * wgt[None, :], -np.inf), axis=1)
    rows = np.arange(m_)
    peak = qw[rows, k]
    before = idx[None, :] <= k[:, None]
    m = np.argmin(np.where(before, qw, np.inf), axis=1)
    lowest = qw[rows, m]
    band = np.maximum(base_band * (peak - lowest), 3.0 * noise_w)
    floor = before & (qw <= (lowest + band)[:, None])
    qmin = np.sum(np.where(floor, qw, 0.0), axis=1) / np.maximum(floor.sum(axis=1), 1)
    contrast = peak - qmin
    found = (k > m) & (contrast > 0)
    x = np.full(m_, np.nan)

    if edge == "threshold":
        level = qmin + threshold * contrast
        cand = (idx[None, :] >= m[:, None]) & (idx[None, :] < k[:, None]) & (q < level[:, None])
        has = cand.any(axis=1)
        j = k_ - 1 - np.argmax(cand[:, ::-1], axis=1)
        j = np.clip(j, 0, k_ - 2)
        q0 = q[rows, j]
        q1 = q[rows, j + 1]
        den = q1 - q0
        frac = np.where(den > 0, (level - q0) / np.where(den > 0, den, 1.0), 0.5)
        x = j + np.clip(frac, 0.0, 1.0)
        found &= has
    elif edge == "peak":
        kk = np.clip(k, 1, k_ - 2)
        a, b, c = qw[rows, kk - 1], qw[rows, kk], qw[rows, kk + 1]
        den = a - 2 * b + c
        delta = np.where(den < 0, 0.5 * (a - c) / np.where(den < 0, den, -1.0), 0.0)
        x = kk + np.clip(delta, -0.5, 0.5)
        found &= (k > 0) & (k < k_ - 1)
    elif edge == "max-gradient":
        g = np.diff(qw, axis=1)  # g[j] sits at j + 0.5
        gi = np.arange(k_ - 1)
        inside = (gi[None, :] >= m[:, None]) & (gi[None, :] < k[:, None])
        gj = np.argmax(np.where(inside, g, -np.inf), axis=1)
        gjc = np.clip(gj, 1, k_ - 3)
        a, b, c = g[rows, gjc - 1], g[rows, gjc], g[rows, gjc + 1]
        den = a - 2 * b + c
        delta = np.where(den < 0, 0.5 * (a - c) / np.where(den < 0, den, -1.0), 0.0)
        x = gjc + 0.5 + np.clip(delta, -0.5, 0.5)
        found &= inside.any(axis=1)
    else:  # pragma: no cover - validated by the caller
        raise SegsemError(f"unknown edge rule {edge!r}")
    return x, found, contrast


def _smooth_closed(c: np.ndarray, sigma: float) -> np.ndarray:
    """Circular Gaussian smoothing (``sigma`` in samples) of a closed contour's coordinates."""
    from scipy.ndimage import gaussian_filter1d

    if sigma <= 0 or len(c) < 4:
        return c
    return gaussian_filter1d(np.asarray(c, dtype=np.float64), min(sigma, len(c) / 6.0), axis=0, mode="wrap")


def _running_median(d: np.ndarray, ok: np.ndarray, counts: np.ndarray, half: int) -> np.ndarray:
    """Circular running median over ``2*half+1`` neighbours of the ``ok`` values, per contour (NaN if none)."""
    w = 2 * half + 1
    nb = _neighbour_index(counts, w)
    win = np.sort(np.where(ok, d, np.nan)[nb], axis=1)  # NaN sort last
    c = np.sum(ok[nb], axis=1)
    # Rows whose neighbourhood wraps onto itself (contours shorter than w) count points twice; harmless.
    lo = np.clip((c - 1) // 2, 0, w - 1)
    hi = np.clip(c // 2, 0, w - 1)
    rows = np.arange(len(d))
    med = 0.5 * (win[rows, lo] + win[rows, hi])
    return np.where(c > 0, med, np.nan)


def _circular_fill(d: np.ndarray, ok: np.ndarray) -> np.ndarray:
    n = len(d)
    if ok.all() or not ok.any():
        return d.copy()
    i = np.arange(n)
    xi = i[ok]
    return np.interp(i, xi, d[ok], period=n)


def _regularise(d: np.ndarray, found: np.ndarray, med: np.ndarray, *, outlier_k: float,
                contour_sigma: float, min_mad: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reject outliers by MAD about the running median ``med``, fill by interpolation, smooth along the contour.

    Returns (smoothed displacement, kept mask, residual of raw minus smoothed).
    """
    from scipy.ndimage import gaussian_filter1d

    keep = found.copy()
    if keep.sum() >= 3:
        r = d - med
        finite = keep & np.isfinite(r)
        if finite.any():
            mad = 1.4826 * np.median(np.abs(r[finite]))
            lim = outlier_k * max(mad, min_mad)
            keep = finite & (np.abs(r) <= lim)
    if not keep.any():
        return np.zeros_like(d), keep, np.zeros_like(d)
    filled = _circular_fill(np.where(keep, d, 0.0), keep)
    smooth = gaussian_filter1d(filled, contour_sigma, mode="wrap") if contour_sigma > 0 else filled
    resid = np.where(keep, d - smooth, 0.0)
    return smooth, keep, resid


# ----------------------------------------------------------------------------- public API

def _decide_substrate(arr: np.ndarray, pts: np.ndarray, nrm: np.ndarray, counts: np.ndarray,
                      reach_px: float) -> list[str]:
    """Which side of each contour is the substrate, from the data.

    Profiles reaching ``reach_px`` to each side are compared per contour: the
    side with the clearly lower floor (10th percentile, median over the contour)
    is the substrate, which holds even when the coarse contour sits on the
    rim's resist-side flank. When the floors are within 15 % of the profile
    range (resist top as dark as the substrate), the side with the lower mean
    is the substrate (the bright rim lies on the resist side).
    """
    prof, inside = _raw_profiles(arr, pts, nrm, search_px=reach_px, sample_px=0.5, smooth_sigma=1.0)
    half = prof.shape[1] // 2
    inner, outer = prof[:, :half], prof[:, half + 1:]
    kth = max(0, int(0.1 * half))
    floor_diff = (np.partition(outer, kth, axis=1)[:, kth] - np.partition(inner, kth, axis=1)[:, kth])
    mean_diff = outer.mean(axis=1) - inner.mean(axis=1)
    span = prof.max(axis=1) - prof.min(axis=1)
    out: list[str] = []
    start = 0
    for n in counts:
        sl = slice(start, start + n)
        start += n
        ok = inside[sl] if inside[sl].any() else np.ones(n, bool)
        fd = float(np.median(floor_diff[sl][ok]))
        if abs(fd) > 0.15 * float(np.median(span[sl][ok])):
            out.append("inside" if fd > 0 else "outside")
        else:
            out.append("inside" if float(np.median(mean_diff[sl][ok])) > 0 else "outside")
    return out


def _check_params(edge: str, threshold: float, search_px: float, step_px: float, sample_px: float,
                  smooth_sigma: float, along_points: int, passes: int, centre_weight: float) -> None:
    if edge not in EDGE_RULES:
        raise SegsemError(f"edge rule '{edge}' is not one of {', '.join(EDGE_RULES)}")
    if not 0.0 <= threshold <= 1.0:
        raise SegsemError(f"edge threshold must be in [0, 1], got {threshold}")
    if not search_px > 0:
        raise SegsemError(f"search_px must be > 0, got {search_px}")
    if not step_px > 0:
        raise SegsemError(f"step_px must be > 0, got {step_px}")
    if not 0 < sample_px <= search_px / 2:
        raise SegsemError(f"sample_px must be in (0, search_px/2], got {sample_px}")
    if smooth_sigma < 0:
        raise SegsemError(f"smooth_sigma must be >= 0, got {smooth_sigma}")
    if along_points < 1 or along_points % 2 == 0:
        raise SegsemError(f"along_points must be an odd number >= 1, got {along_points}")
    if passes < 1:
        raise SegsemError(f"passes must be >= 1, got {passes}")
    if not 0 <= centre_weight < 1:
        raise SegsemError(f"centre_weight must be in [0, 1), got {centre_weight}")


def refine_contours(
    image: np.ndarray | EdgeImage,
    contours_uv: Sequence[np.ndarray],
    *,
    edge: str = "threshold",
    threshold: float = 0.5,
    search_px: float = 6.0,
    step_px: float = 1.0,
    sample_px: float = 0.25,
    smooth_sigma: float = 1.0,
    along_points: int = 3,
    level_points: int = 9,
    image_sigma: float = 0.0,
    substrate: str | Sequence[str] = "auto",
    normal_smooth: float = 1.5,
    min_snr: float = 5.0,
    outlier_k: float = 3.0,
    outlier_window: int = 3,
    min_mad: float = 0.1,
    contour_sigma: float = 1.0,
    centre_weight: float = 0.3,
    passes: int = 2,
    base_sigma: float = 3.0,
) -> list[RefineResult]:
    """Refine many coarse closed contours on one image (all normals sampled in one vectorised pass).

    Parameters
    ----------
    image : 2-D grey levels (row, column) or an :class:`EdgeImage` prepared once.
    contours_uv : coarse closed contours, each ``(N, 2)`` in ``(u, v)`` px, any orientation.
        The edge must lie within ``search_px`` of the coarse contour.
    edge : ``"threshold"`` | ``"peak"`` | ``"max-gradient"`` (see module docs).
    threshold : ``t`` of the threshold rule, in [0, 1].
    search_px : half-length of the search window along each normal (px); it must
        hold the substrate minimum and the rim peak.
    step_px : arc-length spacing of the resampled contour (px).
    sample_px : sample spacing along the normal (px).
    smooth_sigma : 1-D Gaussian smoothing of each profile along the normal (px).
    along_points : each profile is averaged with its neighbours on the contour
        (odd count, ``step_px`` apart), which beats noise without blurring across the edge.
    level_points : the rim peak and substrate minimum levels (and the ``peak`` and
        ``max-gradient`` positions) come from profiles averaged over this many
        contour points (odd), which keeps noise from biasing the threshold level.
    image_sigma : optional isotropic pre-smoothing of the image (px; ignored if an
        EdgeImage is given). It shifts curved edges (blur of a curved edge), so it is 0 by default.
    substrate : ``"auto"``, ``"inside"`` or ``"outside"``; one value or one per contour.
    normal_smooth : circular Gaussian (samples) on the coordinates before taking normals.
    min_snr : a point's edge counts as found when ``(peak - min) / profile noise >= min_snr``.
    outlier_k, outlier_window, min_mad : reject points whose displacement differs from the
        running median of ``2*outlier_window+1`` neighbours by more than
        ``outlier_k * max(1.4826 MAD, min_mad)``.
    contour_sigma : circular Gaussian (samples) smoothing of the displacements.
    centre_weight : in [0, 1); prefers rims near the coarse contour when several are in the window.
    passes : refinement passes; later passes re-take the normals from the refined contour
        smoothed along its length with a Gaussian of ``base_sigma`` samples.

    Returns
    -------
    list of RefineResult, one per input contour; contours have positive orientation
    (see :mod:`segsem_cli.contours`) and ``step_px`` spacing.
    """
    img = image if isinstance(image, EdgeImage) else EdgeImage(image, image_sigma=image_sigma)
    along_points, passes = int(along_points), int(passes)
    level_points = int(level_points)
    _check_params(edge, threshold, search_px, step_px, sample_px, smooth_sigma, along_points, passes, centre_weight)
    if level_points < 1 or level_points % 2 == 0:
        raise SegsemError(f"level_points must be an odd number >= 1, got {level_points}")
    subs = [substrate] * len(contours_uv) if isinstance(substrate, str) else list(substrate)
    if len(subs) != len(contours_uv):
        raise SegsemError(f"substrate: got {len(subs)} values for {len(contours_uv)} contours")
    for s in subs:
        if s not in SUBSTRATE_SIDES:
            raise SegsemError(f"substrate must be one of {', '.join(SUBSTRATE_SIDES)}, got '{s}'")
    if len(contours_uv) == 0:
        return []

    factor = _profile_noise_factor(img.image_sigma, float(smooth_sigma), float(sample_px), along_points, float(step_px))
    noise_prof = max(img.noise * factor, 1e-9 * max(1.0, float(np.ptp(img.sampled))))
    noise_w = img.noise * _profile_noise_factor(img.image_sigma, float(smooth_sigma), float(sample_px),
                                                level_points, float(step_px))

    current = [orient(resample_closed(as_contour(c, name=f"contour {i}"), step_px))
               for i, c in enumerate(contours_uv)]
    # Work in batches of about _BATCH_POINTS points: the (points x samples) arrays then stay
    # in cache (a 2048 px image with 200 features ran 1.5x slower per point in one batch).
    sizes = np.array([len(c) for c in current])
    if len(current) > 1 and sizes.sum() > _BATCH_POINTS:
        groups: list[list[int]] = [[]]
        acc = 0
        for i, n in enumerate(sizes):
            if groups[-1] and acc + n > _BATCH_POINTS:
                groups.append([])
                acc = 0
            groups[-1].append(i)
            acc += int(n)
        kw = dict(edge=edge, threshold=threshold, search_px=search_px, step_px=step_px, sample_px=sample_px,
                  smooth_sigma=smooth_sigma, along_points=along_points, level_points=level_points,
                  normal_smooth=normal_smooth, min_snr=min_snr, outlier_k=outlier_k,
                  outlier_window=outlier_window, min_mad=min_mad, contour_sigma=contour_sigma,
                  centre_weight=centre_weight, passes=passes, base_sigma=base_sigma)
        out: list[RefineResult] = [None] * len(current)  # type: ignore[list-item]
        for g in groups:
            for i, r in zip(g, refine_contours(img, [contours_uv[i] for i in g],
                                               substrate=[subs[i] for i in g], **kw)):
                out[i] = r
        return out
    decided = list(subs)
    results: list[RefineResult] = []
    sp = float(search_px)
    for p in range(passes):
        if p > 0:
            # Later passes start from the refined contour low-passed along its length:
            # neighbouring profiles are averaged in their own normal coordinates, so a
            # jittery base would blur the averaged profile (lower the rim, bias the level).
            current = [orient(resample_closed(_smooth_closed(c, base_sigma), step_px)) for c in current]
        pts = np.vstack(current)
        nrm = np.vstack([normals(c, smooth=normal_smooth) for c in current])
        counts = np.array([len(c) for c in current])
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        prof1, inside1 = _raw_profiles(img.sampled, pts, nrm, search_px=sp, sample_px=sample_px,
                                       smooth_sigma=smooth_sigma)
        prof = _along_mean(prof1, counts, along_points)
        profw = _along_mean(prof1, counts, level_points)
        inside = _along_mean(inside1.astype(np.float32), counts, max(along_points, level_points)) > 0.999
        k_ = prof.shape[1]
        half = k_ // 2

        if p == 0 and "auto" in decided:
            auto = np.array([d == "auto" for d in decided])
            sides = _decide_substrate(img.sampled, pts, nrm, counts, 2.0 * sp)
            decided = [sides[i] if auto[i] else decided[i] for i in range(len(decided))]
        flip = np.repeat(np.array([s == "outside" for s in decided]), counts)
        q = np.where(flip[:, None], prof[:, ::-1], prof)  # substrate -> resist
        qw = np.where(flip[:, None], profw[:, ::-1], profw)
        x, found, contrast = _locate(q, qw, edge=edge, threshold=threshold, centre_weight=centre_weight,
                                     noise_w=noise_w)
        s_pos = (x - half) * sample_px
        s_out = np.where(flip, -s_pos, s_pos)  # displacement along the outward normal
        snr = contrast / noise_prof
        found = found & inside & (snr >= min_snr) & (np.abs(s_out) <= sp - sample_px)

        d_all = np.where(found, s_out, 0.0)
        med_all = _running_median(d_all, found, counts, int(outlier_window))
        new: list[np.ndarray] = []
        results = []
        for i in range(len(current)):
            sl = slice(starts[i], starts[i] + counts[i])
            f_i = found[sl]
            d, keep, resid = _regularise(d_all[sl], f_i, med_all[sl], outlier_k=outlier_k,
                                         contour_sigma=contour_sigma, min_mad=min_mad)
            c_new = pts[sl] + d[:, None] * nrm[sl] if keep.any() else current[i]
            new.append(c_new)
            results.append(RefineResult(
                contour_uv=c_new, valid=keep, found=f_i.copy(), displacement=d,
                snr=np.where(f_i, snr[sl], 0.0), substrate=decided[i], inside=inside[sl].copy(),
                params={"edge": edge, "threshold": threshold, "search_px": sp, "noise": img.noise,
                        "profile_noise": noise_prof, "_residual": resid,
                        "_raw_displacement": np.where(f_i, s_out[sl], np.nan)},
            ))
        current = new
    return results


def refine_contour(image: np.ndarray | EdgeImage, contour_uv: np.ndarray, **kwargs: Any) -> RefineResult:
    """Refine one coarse closed contour onto the SEM edge; see :func:`refine_contours` for parameters.

    Example
    -------
    >>> res = refine_contour(img, coarse_uv, edge="threshold", threshold=0.5, search_px=6)
    >>> res.contour_uv, res.valid_fraction, res.quality
    """
    return refine_contours(image, [contour_uv], **kwargs)[0]


# ----------------------------------------------------------------------------- option parsing

def _err(key: str, value: Any, what: str) -> SegsemError:
    return SegsemError(f"--fallback-opt {key}={value!r}: {what}")


def opt_float(options: Mapping[str, Any], key: str, default: float, *, lo: float | None = None,
              hi: float | None = None) -> float:
    """A float option from ``--fallback-opt key=value`` strings, range-checked."""
    if key not in options or options[key] is None:
        return float(default)
    raw = options[key]
    try:
        v = float(raw)
    except (TypeError, ValueError):
        raise _err(key, raw, "is not a number") from None
    if not np.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
        raise _err(key, raw, f"must be in [{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]")
    return v


def opt_int(options: Mapping[str, Any], key: str, default: int, *, lo: int | None = None,
            hi: int | None = None) -> int:
    """An integer option from ``--fallback-opt key=value`` strings, range-checked."""
    v = opt_float(options, key, default, lo=lo, hi=hi)
    if v != int(v):
        raise _err(key, options.get(key), "is not an integer")
    return int(v)


def opt_choice(options: Mapping[str, Any], key: str, default: str, choices: Sequence[str]) -> str:
    """A string option restricted to ``choices``."""
    if key not in options or options[key] is None:
        return default
    v = str(options[key]).strip().lower()
    if v not in choices:
        raise _err(key, options[key], f"must be one of {', '.join(choices)}")
    return v


def parse_refine_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The :func:`refine_contours` keywords from fallback options (strings); unknown keys ignored.

    Keys: ``edge``, ``threshold``, ``search_px``, ``step_px``, ``sample_px``,
    ``smooth_sigma`` (alias ``sigma``), ``along_points``, ``level_points``, ``image_sigma``,
    ``substrate``, ``min_snr``, ``outlier_k``, ``contour_sigma``, ``passes``.
    """
    o = dict(options)
    if "sigma" in o and "smooth_sigma" not in o:
        o["smooth_sigma"] = o["sigma"]
    return {
        "edge": opt_choice(o, "edge", "threshold", EDGE_RULES),
        "threshold": opt_float(o, "threshold", 0.5, lo=0.0, hi=1.0),
        "search_px": opt_float(o, "search_px", 6.0, lo=0.5, hi=200.0),
        "step_px": opt_float(o, "step_px", 1.0, lo=0.05, hi=50.0),
        "sample_px": opt_float(o, "sample_px", 0.25, lo=0.01, hi=5.0),
        "smooth_sigma": opt_float(o, "smooth_sigma", 1.0, lo=0.0, hi=50.0),
        "substrate": opt_choice(o, "substrate", "auto", SUBSTRATE_SIDES),
        "along_points": opt_int(o, "along_points", 3, lo=1, hi=51),
        "level_points": opt_int(o, "level_points", 9, lo=1, hi=101),
        "image_sigma": opt_float(o, "image_sigma", 0.0, lo=0.0, hi=50.0),
        "min_snr": opt_float(o, "min_snr", 5.0, lo=0.0),
        "outlier_k": opt_float(o, "outlier_k", 3.0, lo=0.5),
        "contour_sigma": opt_float(o, "contour_sigma", 1.0, lo=0.0, hi=100.0),
        "passes": opt_int(o, "passes", 2, lo=1, hi=10),
    }


# ----------------------------------------------------------------------------- results for plugins

def feature_result(feature: Any, res: RefineResult | None, *, source: str, image_shape: tuple[int, int],
                   min_valid: float = 0.5, border_px: float = 0.5, status: str | None = None,
                   confidence_scale: float = 1.0, layout_px: np.ndarray | None = None,
                   layout_iou: float | None = None, extra: dict[str, Any] | None = None):
    """Turn one refinement into a :class:`~segsem_cli.types.FeatureResult` (shared by fallbacks and backbones).

    * ``status`` given (e.g. ``"not_found"``): that status, no contour, confidence 0.
    * a contour closer than ``border_px`` to the image border, or with more
      than 20 % of its normals leaving the image: ``"clipped"`` (a contour
      never runs along the border as if it were an edge).
    * fewer than ``min_valid`` of the normals with a clean edge: ``"low_contrast"``.
    * otherwise ``"ok"`` with confidence ``res.quality * confidence_scale``,
      times ``min(1, IoU / 0.5)`` with ``layout_px`` (the feature's layout
      polygon) when given, or with ``layout_iou`` if the caller computed it
      (e.g. :func:`segsem_cli.contours.polygon_ious` for all features at once);
      the IoU goes to ``extra["layout_iou"]``.

    ``extra`` always receives ``valid_fraction``, ``median_snr``,
    ``roughness_px`` and ``substrate`` when a refinement is given.
    """
    from .types import FeatureResult

    ex = dict(extra or {})
    fid = feature.feature_id
    if status is not None or res is None:
        return FeatureResult(fid, None, source, 0.0, status=status or "not_found", extra=ex)
    ex.update(valid_fraction=res.valid_fraction, median_snr=res.median_snr,
              roughness_px=res.roughness_px, substrate=res.substrate)
    c = res.contour_uv
    h, w = image_shape
    near_border = bool(np.any((c[:, 0] < border_px) | (c[:, 0] > w - border_px)
                              | (c[:, 1] < border_px) | (c[:, 1] > h - border_px)))
    if near_border or np.mean(~res.inside) > 0.2:
        return FeatureResult(fid, None, source, 0.0, status="clipped", extra=ex)
    if res.valid_fraction < min_valid:
        return FeatureResult(fid, None, source, 0.0, status="low_contrast", extra=ex)
    if layout_iou is None and layout_px is not None:
        from .contours import polygon_iou

        layout_iou = polygon_iou(c, np.asarray(layout_px, dtype=np.float64))
    if layout_iou is not None:
        ex["layout_iou"] = float(layout_iou)
        confidence_scale *= min(1.0, float(layout_iou) / 0.5)
    conf = float(np.clip(res.quality * confidence_scale, 0.0, 1.0))
    return FeatureResult(fid, np.ascontiguousarray(c, dtype=np.float64), source, conf, status="ok", extra=ex)
