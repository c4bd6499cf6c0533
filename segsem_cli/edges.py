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

* ``edge="threshold"`` (default): the position on the substrate-side flank
  (between the minimum and the rim peak) where the profile crosses
  ``min + t * (peak - min)``, linearly interpolated. ``t`` is a number in
  [0, 1] (0.5 is the CD-SEM convention) or ``"auto"``, measured on each image
  by fitting a physical edge model to its mean edge profile
  (:mod:`segsem_cli.edge_model`); ``auto`` is the default of the plugins'
  options (:func:`parse_refine_options`, :data:`DEFAULT_THRESHOLD`).
* ``edge="peak"``: the rim peak, parabolic sub-sample interpolation.
* ``edge="max-gradient"``: the steepest point of the substrate-side flank.

The substrate side is decided per contour from the data (``substrate="auto"``:
the side whose half-profiles are darker on average) or forced with
``substrate="inside"`` / ``"outside"`` (relative to the contour).

The rim peak is the sample with the largest rise above the running minimum
coming from the substrate side, so the rim's resist-side flank (the second
edge a naive gradient detector reports) is never chosen.

Shapes cut by the image border
------------------------------
A contour may run along the image border (a line crossing the field of view,
closed along ``u = 0``, ``u = W``, ``v = 0`` or ``v = H``; the image spans
``[0, W] x [0, H]``). :func:`refine_contours` keeps such *border points* fixed
and refines only the runs of real edge between them; border points never count
as found or valid edges (:attr:`RefineResult.border`). The outermost pixel ring
is not used for edge placement (``frame_px``), and an edge counts only where
the part of its profile the rule used lies inside the image.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Mapping, Sequence

import numpy as np

from .contours import (as_contour, border_coverage, border_fraction, border_lines, border_mask, border_runs, normals,
                       orient, resample_closed, ring_starts, signed_area, touches_border, usable_polygon)
from .errors import SegsemError

__all__ = [
    "EDGE_RULES",
    "EdgeImage",
    "suppress_frame",
    "border_extra",
    "RefineResult",
    "refine_contour",
    "refine_contours",
    "estimate_noise",
    "auto_contour_sigma",
    "parse_refine_options",
    "opt_float",
    "opt_int",
    "opt_choice",
    "parse_bool",
    "opt_bool",
    "feature_result",
    "unmeasurable",
    "MAX_OUTSIDE",
]

EDGE_RULES = ("threshold", "peak", "max-gradient")
#: The threshold rule's ``t`` when the options do not give one: a number in [0, 1] or ``"auto"``
#: (measured on each image, :mod:`segsem_cli.edge_model`).
DEFAULT_THRESHOLD: float | str = "auto"
_BATCH_POINTS = 8192
SUBSTRATE_SIDES = ("auto", "inside", "outside")


# ----------------------------------------------------------------------------- image prep

def estimate_noise(pixels: np.ndarray, *, stride: int = 4, axis: int = 1) -> float:
    """Robust per-pixel noise sigma of an image (grey levels).

    ``1.4826 * MAD`` of neighbour differences along ``axis`` (1: horizontal,
    within scan lines; 0: vertical, which also sees line-to-line offsets) divided
    by ``sqrt(2)``; edges occupy few pixels, so the median ignores them. Lines
    across ``axis`` are subsampled with ``stride`` for speed.
    """
    p = np.asarray(pixels)
    step = max(1, int(stride))
    a = np.asarray(p[::step] if axis == 1 else p[:, ::step], dtype=np.float32)  # convert only the lines used
    if a.shape[axis] < 2:
        return 0.0
    d = (a[:, 1:] - a[:, :-1] if axis == 1 else a[1:] - a[:-1]).ravel()
    med = _median(d)
    return float(1.4826 * _median(np.abs(d - med)) / np.sqrt(2.0))


def _median(x: np.ndarray) -> np.floating:
    """``np.median`` of a 1-D float32 array; by counting when the values are multiples of 1/4
    below 2**20 (differences of integer grey levels and their deviations), else ``np.median``.

    The two middle values (or the middle one) and their float32 mean are the same numbers
    ``np.median`` computes; counting avoids two partitions of the whole array.
    """
    if x.dtype != np.float32 or x.ndim != 1 or x.size == 0:
        return np.median(x)
    q = x * np.float32(4.0)  # exact in float32
    if not (float(np.abs(q).max()) < 2.0 ** 22 and np.array_equal(q, np.rint(q))):
        return np.median(x)
    qi = q.astype(np.int64)
    lo = int(qi.min())
    cum = np.cumsum(np.bincount(qi - lo))
    n = x.size
    ranks = [(n - 1) // 2, n // 2]  # the middle order statistics (equal when n is odd)
    v = (np.searchsorted(cum, np.array(ranks) + 1) + lo).astype(np.float32) / np.float32(4.0)
    return np.mean(v) if n % 2 == 0 else v[1]


def gaussian_smooth(pixels: np.ndarray, sigma: float) -> np.ndarray:
    """Isotropic Gaussian smoothing (float32, reflect border); ``sigma <= 0`` returns float32 pixels."""
    a = np.ascontiguousarray(pixels, dtype=np.float32)
    if sigma <= 0:
        return a
    import cv2

    k = int(2 * np.ceil(4 * sigma) + 1)
    return cv2.GaussianBlur(a, (k, k), sigmaX=float(sigma), sigmaY=float(sigma), borderType=cv2.BORDER_REFLECT)


def suppress_frame(pixels: np.ndarray, frame_px: int = 1) -> np.ndarray:
    """A float32 copy of an image whose outermost ``frame_px`` rows and columns repeat their inner neighbours.

    SEM images often carry scan artefacts in the first or last lines or
    columns (a bright or dark frame); detectors and edge profiles then see no
    edge there. ``frame_px = 0`` returns the float32 image unchanged.
    """
    a = np.asarray(pixels)
    f = int(frame_px)
    if a.ndim != 2:
        raise SegsemError(f"suppress_frame: expected a 2-D image, got shape {a.shape}")
    if f != frame_px or not 0 <= f < min(a.shape) // 2 - 1:
        raise SegsemError(f"frame_px must be an integer in [0, {max(0, min(a.shape) // 2 - 2)}], got {frame_px}")
    out = np.array(a, dtype=np.float32, copy=True) if f else np.ascontiguousarray(a, dtype=np.float32)
    if f:
        out[:f] = out[f]
        out[-f:] = out[-f - 1]
        out[:, :f] = out[:, f:f + 1]
        out[:, -f:] = out[:, -f - 1:-f]
    return out


class EdgeImage:
    """An image prepared once for many refinements: the array profiles are sampled from, and its noise.

    Parameters
    ----------
    pixels : 2-D grey-level array (row, column), any real dtype.
    image_sigma : optional isotropic Gaussian pre-smoothing in px (default 0:
        profiles are smoothed along the normal and averaged along the contour
        instead, which does not shift curved edges; see docs/edge-convention.md).
    noise : per-pixel noise sigma of ``pixels``; estimated when None.
    frame_px : the outermost ``frame_px`` pixel rows and columns are not used for
        edge placement (default 1): in the sampled array they repeat their inner
        neighbours. SEM images often carry scan artefacts (a bright or dark first
        line or column) there, which would otherwise look like an edge to profiles
        near the border; an edge cannot be measured that close to the border anyway.
    """

    def __init__(self, pixels: np.ndarray, *, image_sigma: float = 0.0, noise: float | None = None,
                 frame_px: int = 1):
        a = np.asarray(pixels)
        if a.ndim != 2 or min(a.shape) < 4:
            raise SegsemError(f"edge refinement: expected a 2-D image of at least 4x4 pixels, got shape {a.shape}")
        if not np.issubdtype(a.dtype, np.number):
            raise SegsemError(f"edge refinement: image dtype {a.dtype} is not numeric")
        with np.errstate(over="ignore", invalid="ignore"):
            finite_sum = np.isfinite(a.sum(dtype=np.float64))
        if not (finite_sum or np.all(np.isfinite(a))):  # a finite sum: all values finite
            raise SegsemError("edge refinement: image contains non-finite values")
        if image_sigma < 0:
            raise SegsemError(f"edge refinement: image_sigma must be >= 0, got {image_sigma}")
        self.pixels = a
        self.image_sigma = float(image_sigma)
        self.frame_px = int(frame_px)
        self.sampled = gaussian_smooth(suppress_frame(a, frame_px), self.image_sigma)
        self.noise = float(estimate_noise(a) if noise is None else noise)
        #: ``threshold="auto"``: the edge threshold measured on this image (:mod:`segsem_cli.edge_model`)
        self.edge_threshold = None

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
    inside : (N,) bool, True where the part of the profile the edge rule used (from
        the substrate floor to the rim peak) lay inside the image (samples beyond it
        repeat the outermost pixels); an edge is only found where it did.
    border : (N,) bool, True for the points lying on the image border (a shape cut
        by the field of view is closed along it; see :func:`refine_contours`).
        They are not refined, are never ``valid``, and do not count in
        :attr:`valid_fraction`, :attr:`quality` or the SNR and roughness terms.
        None (results built by hand) means no border points.
    """

    contour_uv: np.ndarray
    valid: np.ndarray
    found: np.ndarray
    displacement: np.ndarray
    snr: np.ndarray
    substrate: str
    inside: np.ndarray
    params: dict[str, Any] = field(default_factory=dict)
    border: np.ndarray | None = None

    @property
    def edge_points(self) -> np.ndarray:
        """(N,) bool: the real-edge points (not on the image border)."""
        return np.ones(len(self.valid), dtype=bool) if self.border is None else ~np.asarray(self.border, bool)

    @property
    def clipped(self) -> bool:
        """True when part of the contour runs along the image border."""
        return self.border is not None and bool(np.any(self.border))

    @property
    def border_fraction(self) -> float:
        """Fraction of the contour's perimeter lying on the image border (0 when not clipped)."""
        shape = self.params.get("image_shape")
        if not self.clipped or shape is None:
            return 0.0
        return border_fraction(self.contour_uv, shape)

    @property
    def valid_fraction(self) -> float:
        """Fraction of the real-edge points (border points excluded) with a clean, kept edge."""
        e = self.edge_points
        return float(np.mean(self.valid[e])) if e.any() else 0.0

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
        return self._quality(self.valid_fraction, self.median_snr, self.roughness_px)

    def _quality(self, valid_fraction: float, median_snr: float, roughness_px: float) -> float:
        """:attr:`quality` from its parts (computed once by callers that report them too)."""
        s = median_snr
        half = float(self.params.get("snr_half", 12.0))
        c_term = s * s / (s * s + half * half)
        rough = roughness_px
        r_term = 1.0 / (1.0 + (rough / 0.5) ** 2) if np.isfinite(rough) else 0.0
        return float(np.clip(valid_fraction * c_term * r_term, 0.0, 1.0))


# ----------------------------------------------------------------------------- sampling

def _neighbour_index(counts: np.ndarray, along_points: int) -> np.ndarray:
    """``(M, J)`` indices of each point's ``J`` circular neighbours within its own contour."""
    starts = ring_starts(counts)
    st = np.repeat(starts, counts)
    n = np.repeat(counts, counts)
    local = np.arange(int(counts.sum())) - st
    j = np.arange(along_points) - along_points // 2
    return st[:, None] + (local[:, None] + j[None, :]) % n[:, None]


def _shifted_index(counts: np.ndarray, k: int) -> np.ndarray:
    """Index of the point ``k`` samples ahead of each point (circular, within its own contour):
    one column of :func:`_neighbour_index` without building the others."""
    if len(counts) == 1:  # one contour (the auto smoothing choice's candidates): plain modular indices
        n = int(counts[0])
        return (np.arange(n) + k) % n
    starts = ring_starts(counts)
    st = np.repeat(starts, counts)
    n = np.repeat(counts, counts)
    return st + (np.arange(int(counts.sum())) - st + k) % n


def _along_mean(a: np.ndarray, counts: np.ndarray, window: int) -> np.ndarray:
    """Circular moving average of rows over ``window`` (odd) neighbours within each contour.

    ``a`` is ``(M, ...)`` with the contours' rows concatenated (``counts``).
    One padded gather and a box filter along the rows (float64 sums for float32
    input, :func:`cv2.boxFilter`): no Python loop per contour.
    """
    if window <= 1:
        return a
    h = window // 2
    starts = ring_starts(counts)
    # Padded index: for each contour, local positions -h .. n+h-1 wrapped into it.
    lens = counts + 2 * h
    pst = np.repeat(starts, lens)
    pn = np.repeat(counts, lens)
    pstart_p = ring_starts(lens)
    local = np.arange(int(lens.sum())) - np.repeat(pstart_p, lens) - h
    idx = pst + local % pn
    # Row i of contour k sits at padded position pstart_p[k] + h + i; window covers [pos-h, pos+h].
    pos = np.repeat(pstart_p, counts) + h + (np.arange(int(counts.sum())) - np.repeat(starts, counts))
    padded = a[idx]
    if padded.dtype == np.float32 and padded.ndim == 2:
        import cv2

        # windows never reach the (constant) border at the read positions
        return cv2.boxFilter(padded, -1, (1, window), normalize=True, borderType=cv2.BORDER_CONSTANT)[pos]
    c = np.cumsum(padded, axis=0, dtype=np.float64)
    c = np.concatenate([np.zeros((1,) + c.shape[1:]), c], axis=0)
    return ((c[pos + h + 1] - c[pos - h]) / window).astype(a.dtype, copy=False)


_PROFILE_CHUNK = 1024  # points per block of sampling maps (keeps the float64 work arrays in cache)


@lru_cache(maxsize=16)
def _gauss_taps(sigma: float) -> np.ndarray:
    """The 1-D Gaussian of :func:`scipy.ndimage.gaussian_filter1d` (truncate 4, unit sum), float64."""
    radius = int(4.0 * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    phi = np.exp(-0.5 / (float(sigma) * float(sigma)) * x * x)
    return phi / phi.sum()


def _profile_offsets(search_px: float, sample_px: float, smooth_sigma: float) -> tuple[np.ndarray, int]:
    """Sample offsets along the normal of :func:`_raw_profiles` (px) and the smoothing padding (samples)."""
    pad = int(np.ceil(3.0 * smooth_sigma / sample_px)) if smooth_sigma > 0 else 0
    k = int(round(search_px / sample_px))
    return np.arange(-k - pad, k + pad + 1) * sample_px, pad


def _shared_samples(arr: np.ndarray, pts: np.ndarray, nrm: np.ndarray, main: np.ndarray,
                    other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw samples (:func:`_sample_along`) at two offset grids, the offsets of ``other`` that
    ``main`` holds taken from ``main``'s samples.

    Offsets that are equal numbers give equal positions and so equal samples
    (e.g. the 0.5 px grid of the substrate decision within the 0.25 px grid of the
    edge profiles).
    """
    raw_main = _sample_along(arr, pts, nrm, main)
    pos = np.searchsorted(main, other)
    shared = (pos < len(main)) & (main[np.minimum(pos, len(main) - 1)] == other)
    out = np.empty((len(pts), len(other)), dtype=np.float32)
    if (~shared).any():
        out[:, ~shared] = _sample_along(arr, pts, nrm, other[~shared])
    if shared.any():
        cols, src = np.nonzero(shared)[0], pos[shared]
        if len(cols) > 1 and np.all(np.diff(cols) == 1) and np.all(np.diff(src) == src[1] - src[0]) and src[1] > src[0]:
            out[:, cols[0]:cols[-1] + 1] = raw_main[:, src[0]:src[-1] + 1:src[1] - src[0]]  # a strided block
        else:
            out[:, cols] = raw_main[:, src]
    return raw_main, out


def _sample_along(arr: np.ndarray, pts: np.ndarray, nrm: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Bilinear samples ``(M, K)`` float32 of ``arr`` at ``pts + offsets * nrm`` (edge-clamped).

    Array index ``(row, col) = (v - 0.5, u - 0.5)``. The positions are computed in
    float64 per block of points and sampled by :func:`cv2.remap` (float maps:
    fractional positions in 1/32 px).
    """
    import cv2

    m_ = len(pts)
    src = np.ascontiguousarray(arr, dtype=np.float32)
    prof = np.empty((m_, len(offsets)), dtype=np.float32)
    n0 = min(m_, _PROFILE_CHUNK)
    buf = np.empty((n0, len(offsets)))
    mx = np.empty((n0, len(offsets)), dtype=np.float32)
    my = np.empty_like(mx)
    base = pts - 0.5  # array index (row, col) = (v - 0.5, u - 0.5)
    for r0 in range(0, m_, _PROFILE_CHUNK):
        r1 = min(m_, r0 + _PROFILE_CHUNK)
        n = r1 - r0
        b, x, y = buf[:n], mx[:n], my[:n]
        # positions in float64, rounded once to the float32 maps; cv2.remap samples
        # bilinearly, edge-clamped (fractional positions in 1/32 px)
        np.multiply(offsets[None, :], nrm[r0:r1, 0:1], out=b)
        np.add(b, base[r0:r1, 0:1], out=x, casting="unsafe")
        np.multiply(offsets[None, :], nrm[r0:r1, 1:2], out=b)
        np.add(b, base[r0:r1, 1:2], out=y, casting="unsafe")
        prof[r0:r1] = cv2.remap(src, x, y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return prof


def _pad_crop(raw: np.ndarray, pad_from: int, pad_to: int) -> np.ndarray:
    """Samples taken at :func:`_profile_offsets` with padding ``pad_from``, cut to padding ``pad_to``
    (not more): the same offsets as sampling with ``pad_to`` directly."""
    d = pad_from - pad_to
    return raw[:, d:raw.shape[1] - d] if d else raw


def _raw_profiles(arr: np.ndarray, pts: np.ndarray, nrm: np.ndarray, *, search_px: float, sample_px: float,
                  smooth_sigma: float, raw: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Profiles ``(M, K)`` at offsets ``-search_px..search_px`` along the outward normals,
    smoothed along the normal (1-D Gaussian ``smooth_sigma`` px, nearest-sample extension),
    and a per-point flag that the whole window lies inside the image.

    The samples are :func:`_sample_along` at :func:`_profile_offsets` (or ``raw``, those
    samples taken already); the smoothing is :func:`cv2.sepFilter2D` along the samples
    (float32 arithmetic).
    """
    import cv2

    offsets, pad = _profile_offsets(search_px, sample_px, smooth_sigma)
    h, w = arr.shape
    m_ = len(pts)
    # A straight window is inside iff its ends are; the padding only feeds the smoothing tails.
    ends = offsets[[pad, len(offsets) - 1 - pad]]
    ends_u = pts[:, 0:1] + ends[None, :] * nrm[:, 0:1]
    ends_v = pts[:, 1:2] + ends[None, :] * nrm[:, 1:2]
    inside = np.all((ends_u >= 0.5) & (ends_u <= w - 0.5) & (ends_v >= 0.5) & (ends_v <= h - 0.5), axis=1)
    prof = _sample_along(arr, pts, nrm, offsets) if raw is None else raw
    if smooth_sigma > 0 and m_:
        taps = _gauss_taps(smooth_sigma / sample_px)
        prof = cv2.sepFilter2D(prof, -1, taps, np.ones(1), borderType=cv2.BORDER_REPLICATE)
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


#: The rim level is the mean of the samples around the profile's peak within this many times the
#: profile noise of it (:func:`_locate`): the single largest sample of a noisy profile is biased high.
PEAK_NOISE_K = 1.0
#: ... and at most this many samples either side of the peak (2 px at the default 0.25 px sampling).
PEAK_RUN = 8


def _locate(q: np.ndarray, qw: np.ndarray, *, edge: str, threshold: float, centre_weight: float,
            noise_w: float = 0.0, base_band: float = 0.05
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Edge index position in profiles oriented substrate -> resist.

    ``qw`` (averaged over more contour points, so less noisy) picks the rim
    peak and the substrate minimum and sets their levels; the crossing is
    located on ``q``. Noise biases the minimum of a profile low, so the
    substrate level is the mean of the ``qw`` samples before the peak that lie
    within ``max(base_band * contrast, 3 * noise_w)`` of the minimum (the
    substrate floor), not the single lowest sample.

    Returns ``(x, found, contrast, lo, hi)``: fractional sample index of the
    edge, whether one was found, the rim contrast ``peak - min`` (from
    ``qw``), and the span the rule used: the last substrate-floor sample
    before the peak (``lo``) and the rim peak (``hi``).
    """
    m_, k_ = q.shape
    idx = np.arange(k_)
    # running minimum along the profile (a loop over the few samples beats accumulate along rows)
    cm = np.array(qw, copy=True)
    for j in range(1, k_):
        np.minimum(cm[:, j - 1], cm[:, j], out=cm[:, j])
    rise = qw - cm
    centre = (k_ - 1) / 2.0
    wgt = 1.0 - centre_weight * ((idx - centre) / max(centre, 1.0)) ** 2
    # Candidates are local maxima of the profile (the last sample counts when rising),
    # so the weighting picks *which* rim, never a point on its flank.
    lm = np.ones_like(qw, dtype=bool)
    lm[:, 1:] &= qw[:, 1:] >= qw[:, :-1]
    lm[:, :-1] &= qw[:, :-1] >= qw[:, 1:]
    score = np.full(qw.shape, -np.inf)
    np.multiply(rise, wgt[None, :], out=score, where=lm)
    k = np.argmax(score, axis=1)
    rows = np.arange(m_)
    peak = qw[rows, k]
    before = idx[None, :] <= k[:, None]
    # the first lowest sample up to the peak: where the running minimum first reaches its value at the peak
    m = np.argmax(cm == cm[rows, k][:, None], axis=1)
    lowest = qw[rows, m]
    band = np.maximum(base_band * (peak - lowest), 3.0 * noise_w)
    floor = before & (qw <= (lowest + band)[:, None])
    qmin = np.sum(np.where(floor, qw, 0.0), axis=1) / np.maximum(np.count_nonzero(floor, axis=1), 1)
    if noise_w > 0:
        # Noise biases the largest sample high as it biases the lowest low: the rim level is the
        # mean of the samples around the peak, on its contiguous run within PEAK_NOISE_K * noise_w
        # of it and at most PEAK_RUN samples either side (on noise-free profiles, the peak sample).
        off = np.arange(-PEAK_RUN, PEAK_RUN + 1)
        col = k[:, None] + off[None, :]
        ok = (col >= 0) & (col < k_)
        win = qw[rows[:, None], np.clip(col, 0, k_ - 1)]
        near = ok & (win >= (peak - PEAK_NOISE_K * noise_w)[:, None])
        run = np.empty_like(near)
        run[:, PEAK_RUN:] = np.cumprod(near[:, PEAK_RUN:], axis=1)  # the peak and rightwards
        run[:, :PEAK_RUN + 1] = np.cumprod(near[:, PEAK_RUN::-1], axis=1)[:, ::-1]  # and leftwards
        peak = np.sum(np.where(run, win, 0.0), axis=1) / np.count_nonzero(run, axis=1)
    contrast = peak - qmin
    found = (k > m) & (contrast > 0)
    x = np.full(m_, np.nan)

    if edge == "threshold":
        level = qmin + threshold * contrast
        cand = q < level[:, None]
        cand &= idx[None, :] >= m[:, None]
        cand &= idx[None, :] < k[:, None]
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
    lo = np.where(floor.any(axis=1), k_ - 1 - np.argmax(floor[:, ::-1], axis=1), 0)  # last floor sample
    return x, found, contrast, lo, k


def _along_sum(a: np.ndarray, counts: np.ndarray, window: int) -> np.ndarray:
    """Circular moving sum of rows over ``window`` (odd) neighbours within each contour (float32 rows)."""
    return _along_mean(a, counts, window) * np.float32(window)


_REMAP_ROWS = 16384  # cv2.remap needs source sizes below 32767


def _shift_rows(q: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``q`` (float32) resampled at ``x + u``, ``u = -K//2 .. K//2`` samples (``K`` columns, linear
    interpolation, :func:`cv2.remap`), and whether ``x + u`` lay on the row's samples."""
    import cv2

    m_, k_ = q.shape
    u = (np.arange(k_) - k_ // 2).astype(np.float32)
    mx = np.asarray(x, dtype=np.float32)[:, None] + u[None, :]
    ok = (mx >= 0) & (mx <= k_ - 1)
    out = np.empty((m_, k_), dtype=np.float32)
    src = np.ascontiguousarray(q, dtype=np.float32)
    for r0 in range(0, m_, _REMAP_ROWS):
        r1 = min(m_, r0 + _REMAP_ROWS)
        my = np.broadcast_to(np.arange(r1 - r0, dtype=np.float32)[:, None], (r1 - r0, k_))
        out[r0:r1] = cv2.remap(src[r0:r1], mx[r0:r1], np.ascontiguousarray(my), cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_REPLICATE)
    return out, ok


def _match_template(q: np.ndarray, x: np.ndarray, found: np.ndarray, counts: np.ndarray, *, threshold: float,
                    centre_weight: float, noise_w: float, level_points: int, points: int, exclude: int,
                    before: int, after: int, steps: int = 2, max_step: float = 4.0,
                    min_support: int = 6, q_edge: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Threshold-rule positions measured on a local low-noise template, transferred to each point by a fit.

    For every point, the profiles ``q`` (oriented substrate -> resist, float32) of the
    found points of its own contour within ``+/- points`` (except the ``+/- exclude``
    nearest, whose profiles share data with its own) are averaged as sampled (the
    last pass: the base contour already runs along the edge): the *template*.
    The threshold rule (:func:`_locate`) on the template gives its edge. The point's own
    profile is aligned with the template by least squares (Gauss-Newton on the shift,
    ``steps`` steps of at most ``max_step`` samples) over the samples from ``before``
    samples ahead of the template's substrate floor to ``after`` samples past its rim
    peak; its edge is the template's edge at that shift.

    ``q_edge`` (optional, same shape as ``q``): the same profiles less smoothed along the
    normal. The template's edge is then located on their template, and ``q`` only serves
    the fit: a shift between two equally smoothed profiles does not depend on the
    smoothing, so more smoothing in ``q`` lowers the fit's noise without moving the
    edge convention (which is that of ``q_edge``).

    Returns ``(x_new, ok)``: fractional sample positions (``x`` where not ``ok``).
    """
    m_, k_ = q.shape
    half = k_ // 2
    idx = np.arange(k_)
    win_out, win_in = 2 * points + 1, 2 * exclude + 1
    x_new = np.array(x, dtype=np.float64, copy=True)
    if not found.any():
        return x_new, np.zeros(m_, dtype=bool)

    def window_sum(a: np.ndarray) -> np.ndarray:
        """Sum of ``a`` over each point's template window, less its excluded centre."""
        s = _along_sum(a, counts, win_out)
        return s - _along_sum(a, counts, win_in) if exclude >= 0 else s

    n_nb = window_sum(found.astype(np.float32)[:, None])[:, 0]  # profiles in each template
    per = np.maximum(n_nb, np.float32(1.0))[:, None]
    xa = np.full(m_, float(half))
    tmpl = window_sum(np.where(found[:, None], q, np.float32(0.0))) / per
    # template noise: noise_w is that of a level_points average; the template averages ~n_nb profiles
    scale = np.sqrt(max(float(np.median(n_nb[found])), 1.0) / level_points)
    tmpl_e = tmpl if q_edge is None else window_sum(np.where(found[:, None], q_edge, np.float32(0.0))) / per
    e, t_found, _, t_lo, t_hi = _locate(tmpl_e, tmpl_e, edge="threshold", threshold=threshold,
                                        centre_weight=centre_weight, noise_w=noise_w / scale)
    ok = found & t_found & (n_nb >= min_support - 0.5)
    g = np.empty_like(tmpl)  # template slope per sample
    g[:, 1:-1] = 0.5 * (tmpl[:, 2:] - tmpl[:, :-2])
    g[:, 0], g[:, -1] = g[:, 1], g[:, -2]
    win = (idx[None, :] >= (t_lo - before)[:, None]) & (idx[None, :] <= (t_hi + after)[:, None])
    gw = np.where(win, g, np.float32(0.0))
    den = np.einsum("ij,ij->i", gw, g)
    ok &= den > 0
    xs = np.array(xa, dtype=np.float64, copy=True)
    own, own_ok = q, np.ones((1, k_), dtype=bool)  # the point's own profile as sampled, then shifted
    for s in range(max(1, steps)):
        if s:
            own, own_ok = _shift_rows(q, xs)
        num = np.einsum("ij,ij->i", np.where(own_ok, gw, np.float32(0.0)), own - tmpl)
        step = np.clip(num / np.where(den > 0, den, 1.0), -max_step, max_step)
        xs = np.where(ok, xs - step, xs)
    x_new = np.where(ok, xs + (e - half), x)
    return x_new, ok


def _borrow_levels(q: np.ndarray, qw: np.ndarray, found: np.ndarray, inside: np.ndarray, border: np.ndarray,
                   contrast: np.ndarray, hi: np.ndarray, counts: np.ndarray, *, threshold: float,
                   floor_out: np.ndarray | None = None, min_found: int = 5, min_found_frac: float = 0.1,
                   tol: float = 0.25) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Threshold crossings for points whose rim peak is not observable, at their contour's level.

    A print that runs out of the image a few pixels beyond its edge (a sliver cut
    by the field of view) has its rim peak on or beyond the image border for some
    points: their own profiles cannot set the ``min + t (peak - min)`` level. The
    level of the contour's points that did see both (median floor and peak of
    ``qw``) is used instead, and the crossing is looked for on the point's own
    profile ``q``: the first rise through that level after the profile's lowest
    sample. Only points without a found edge whose peak sat at the end of the
    window or whose span left the image are tried; the profile's lowest sample must
    match the contour's floor within ``tol`` of its contrast and the profile must keep
    rising above the level by ``tol`` of the contrast.

    ``floor_out`` (per point): the substrate end of the profile lies outside the image.
    A side a few pixels inside the border (its substrate strip narrower than the rim's
    fall) never shows the floor there: its lowest sample, the outermost pixel, need only
    lie between the floor and the level less ``tol`` of the contrast (the profile clearly
    crosses the level; the crossing itself must be in the image, which the caller checks).

    Returns ``(rows, x, c)``: the rows given an edge, their fractional sample
    positions and the contour contrast used for their SNR.
    """
    m_, k_ = q.shape
    starts = ring_starts(counts)
    rows_all, x_all, c_all = [], [], []
    idx = np.arange(k_)
    for st, n in zip(starts, counts):
        sl = slice(st, st + n)
        f = found[sl]
        cand = ~f & ~border[sl] & (~inside[sl] | (hi[sl] >= k_ - 2))
        if not cand.any():
            continue
        n_edge = int((~border[sl]).sum())
        if f.sum() < max(min_found, min_found_frac * n_edge):
            continue
        r_f = np.nonzero(f)[0] + st
        peak = qw[r_f, hi[r_f]]
        floor = float(np.median(peak - contrast[r_f]))
        c = float(np.median(peak)) - floor
        if not c > 0:
            continue
        level = floor + threshold * c
        rows = np.nonzero(cand)[0] + st
        qq = q[rows]
        m = np.argmin(qq, axis=1)
        low = qq[np.arange(len(rows)), m]
        above = (idx[None, :] > m[:, None]) & (qq >= level)
        has = above.any(axis=1)
        j = np.argmax(above, axis=1)
        suffix_max = np.maximum.accumulate(qq[:, ::-1], axis=1)[:, ::-1]  # max of q[j:] per row
        rising = np.where(has, suffix_max[np.arange(len(rows)), j], -np.inf)
        top = floor + tol * c if floor_out is None else np.where(floor_out[rows], level - tol * c, floor + tol * c)
        ok = has & (low >= floor - tol * c) & (low <= top) & (rising >= level + tol * c) & (j >= 1)
        if not ok.any():
            continue
        rows, j, qq = rows[ok], j[ok], qq[ok]
        r_ = np.arange(len(rows))
        q0, q1 = qq[r_, j - 1], qq[r_, j]
        den = q1 - q0
        frac = np.where(den > 0, (level - q0) / np.where(den > 0, den, 1.0), 0.5)
        rows_all.append(rows)
        x_all.append(j - 1 + np.clip(frac, 0.0, 1.0))
        c_all.append(np.full(len(rows), c))
    if not rows_all:
        return np.zeros(0, np.int64), np.zeros(0), np.zeros(0)
    return np.concatenate(rows_all), np.concatenate(x_all), np.concatenate(c_all)


def _span_inside(pts: np.ndarray, nrm: np.ndarray, scale: np.ndarray, a: np.ndarray, b: np.ndarray,
                 shape: tuple[int, int], frame_px: int = 0) -> np.ndarray:
    """True where the points ``pts + scale * a * nrm`` and ``pts + scale * b * nrm`` (and so the
    segment between them) lie between the centres of the outermost pixels used,
    ``[m, W - m] x [m, H - m]`` with ``m = frame_px + 0.5``."""
    h, w = shape
    m = frame_px + 0.5
    ok = np.ones(len(pts), dtype=bool)
    for j in (a, b):
        s = scale * j
        u = pts[:, 0] + s * nrm[:, 0]
        v = pts[:, 1] + s * nrm[:, 1]
        ok &= (u >= m) & (u <= w - m) & (v >= m) & (v <= h - m)
    return ok


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


#: Along-edge smoothing is full where the contour turns by less than CORNER_DEG[0] degrees
#: within +/- 3 contour_sigma samples and falls to 1 sample at CORNER_DEG[1] (corners).
CORNER_DEG = (20.0, 45.0)


def _straightness(nrm: np.ndarray, counts: np.ndarray, contour_sigma: float) -> np.ndarray:
    """Per point, 1 on straight or gently curved edges, 0 at corners (see :data:`CORNER_DEG`).

    The turning angle is the angle between the normals ``3 * contour_sigma`` samples
    before and after the point on its own contour.
    """
    k = max(1, int(np.ceil(3.0 * contour_sigma)))
    cos = np.einsum("ij,ij->i", nrm[_shifted_index(counts, -k)], nrm[_shifted_index(counts, k)])
    ang = np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))
    lo, hi = CORNER_DEG
    return np.clip((hi - ang) / (hi - lo), 0.0, 1.0)


def _smooth_displacements(filled: np.ndarray, contour_sigma: float, straight: np.ndarray | None, smooth_fn) -> np.ndarray:
    """``smooth_fn(x, sigma)`` with ``contour_sigma`` on straight parts, 1 sample at corners.

    Averaging displacements over several samples across a corner would spread the
    corner's large outward displacement onto the edges next to it (a bulge), so the
    two smoothings are blended by ``straight`` (:func:`_straightness`).
    """
    if contour_sigma <= 0:
        return filled
    wide = smooth_fn(filled, contour_sigma)
    if straight is None or contour_sigma <= 1.0 or bool(np.all(straight >= 1.0)):
        return wide
    narrow = smooth_fn(filled, 1.0)
    return straight * wide + (1.0 - straight) * narrow


#: Candidate along-contour smoothings of ``contour_sigma="auto"`` (samples). Never below the
#: fixed default: auto only smooths longer where a contour's own data show noise dominates.
AUTO_SIGMAS = (3.0, 4.0, 5.0, 6.0, 8.0, 10.0)
#: Fewest kept points on a contour for ``contour_sigma="auto"`` to choose (else AUTO_DEFAULT).
AUTO_MIN_POINTS = 100
AUTO_DEFAULT = 3.0
#: A longer smoothing is used only where it leaves this share of the contour's straight points straight.
AUTO_KEEP_STRAIGHT = 0.75


def _masked_variogram(d: np.ndarray, ok: np.ndarray, max_lag: int) -> tuple[np.ndarray, np.ndarray]:
    """Circular semivariogram ``gamma(k) = mean((d[i+k] - d[i])**2) / 2`` over pairs of ``ok``
    points, ``k = 0..max_lag`` (FFT correlations), and the number of pairs per lag."""
    n = len(d)
    m = ok.astype(np.float64)
    md = np.where(ok, d, 0.0)
    f_m, f_md, f_md2 = np.fft.rfft(m), np.fft.rfft(md), np.fft.rfft(md * md)

    def corr(a, b):  # sum_i a[i] * b[i + k]
        return np.fft.irfft(np.conj(a) * b, n)[: max_lag + 1]

    pairs = np.rint(corr(f_m, f_m))
    num = corr(f_md2, f_m) + corr(f_m, f_md2) - 2.0 * corr(f_md, f_md)
    with np.errstate(invalid="ignore", divide="ignore"):
        gam = np.where(pairs > 0, 0.5 * num / np.maximum(pairs, 1.0), np.nan)
    gam[0] = 0.0
    return np.maximum(gam, 0.0), pairs


@lru_cache(maxsize=16)
def _lag_weights(sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """For the Gaussian ``g`` of :func:`_gauss_taps` and ``h = g - delta``: the weights ``w`` with
    ``x' T(c) x = c @ w_x`` for any symmetric Toeplitz matrix ``T(c)[i, j] = c[|i - j|]``
    (``w[0] = sum x_i^2``, ``w[k] = 2 sum x_i x_{i+k}``), as ``(w_h, w_g)``; read only."""
    g = _gauss_taps(sigma)
    h = g.copy()
    h[len(g) // 2] -= 1.0
    out = []
    for x in (h, g):
        a = np.correlate(x, x, mode="full")[len(x) - 1:]
        a[1:] *= 2.0
        a.flags.writeable = False
        out.append(a)
    return out[0], out[1]


def auto_contour_sigma(d: np.ndarray, ok: np.ndarray, *, noise_points: int = 9,
                       sigmas: Sequence[float] = AUTO_SIGMAS, min_points: int = AUTO_MIN_POINTS,
                       default: float = AUTO_DEFAULT) -> tuple[float, dict[str, float]]:
    """Along-contour smoothing for one closed contour, chosen from its own displacements.

    The raw edge displacements ``d`` (kept points ``ok``; the contour is closed) are
    the true edge ``s`` (line-edge roughness, corner rounding, ...) plus position noise
    ``n`` from the SEM signal. Their semivariogram is ``gamma(k) = N(0) (1 - rho(k)) +
    gamma_s(k)``: the noise is correlated only over the ``noise_points`` profiles that
    share data (the larger of ``along_points``, averaged into each profile, and
    ``level_points``, which set its threshold level; triangular ``rho``), so for lags
    ``k >= k0 = noise_points // 2 + 2`` it adds the constant *nugget* ``N(0)``,
    estimated by linear extrapolation
    ``2 gamma(k0) - gamma(2 k0)`` (conservative: it underestimates the noise when the
    roughness is smooth at small lags). For each candidate Gaussian ``g`` of width
    ``sigma`` the mean-square error of ``g * d`` against ``s`` is then
    ``-h' Gamma_s h + N(0) g' R g`` with ``h = g - delta`` (the roughness term needs only
    the variogram because ``h`` sums to zero); the candidate with the smallest error is
    returned. Noisy images get longer smoothing, clean rough edges keep their roughness.

    Returns ``(sigma, info)`` with ``info`` = ``nugget`` (position-noise variance, px^2),
    ``rough`` (roughness variance seen at lag ``2 k0``, px^2) and ``points``; ``default``
    when fewer than ``min_points`` points are kept or the contour is too short.
    """
    d = np.asarray(d, dtype=np.float64)
    ok = np.asarray(ok, dtype=bool) & np.isfinite(d)
    sig = sorted(float(s) for s in sigmas if s > 0)
    n_ok = int(ok.sum())
    info = {"nugget": float("nan"), "rough": float("nan"), "points": float(n_ok)}
    if not sig:
        return float(default), info
    k0 = int(noise_points) // 2 + 2
    taps = [_gauss_taps(s) for s in sig]
    max_lag = max(len(g) for g in taps) - 1  # twice the widest kernel's radius
    if n_ok < min_points or len(d) < 2 * max_lag + 1:
        return float(default), info
    gam, pairs = _masked_variogram(d, ok, max_lag)
    if pairs[2 * k0] < 20:
        return float(default), info
    nugget = max(0.0, 2.0 * gam[k0] - gam[2 * k0])
    gs = np.empty(max_lag + 1)
    gs[k0:] = np.maximum(gam[k0:] - nugget, 0.0)
    # lags with too few pairs (long lags on a sparse contour) hold the last reliable value
    bad = ~(pairs[k0:] >= 20) | ~np.isfinite(gs[k0:])
    if bad.any():
        g = gs[k0:]
        good = np.flatnonzero(~bad)
        g[bad] = g[good[np.searchsorted(good, np.flatnonzero(bad), side="right") - 1]]
    gs[:k0] = gs[k0] * np.arange(k0) / k0
    rho = np.clip(1.0 - np.arange(max_lag + 1) / max(int(noise_points), 1), 0.0, 1.0)
    best, best_mse = float(default), float("inf")
    for s, g in zip(sig, taps):
        w_h, w_g = _lag_weights(s)  # h' Gamma_s h and g' R g from the lag weights (Toeplitz forms)
        mse = -float(gs[:len(g)] @ w_h) + nugget * float(rho[:len(g)] @ w_g)
        if mse < best_mse - 1e-12:
            best, best_mse = s, mse
    info.update(nugget=float(nugget), rough=float(gs[2 * k0]))
    return best, info


def _sigma_used(contour_sigma: float) -> float:
    """The smoothing reported for a contour that had nothing to choose from: auto means the default."""
    return AUTO_DEFAULT if contour_sigma < 0 else contour_sigma


def _is_auto(v: Any) -> bool:
    return isinstance(v, str) and v.strip().lower() == "auto"


def _auto_sigma(d: np.ndarray, keep: np.ndarray, contour_sigma: float, straight, nrm, noise_points: int):
    """``contour_sigma < 0`` (auto): the contour's own choice (:func:`auto_contour_sigma` on its
    kept points away from corners) and its corner taper; otherwise the given values."""
    if contour_sigma >= 0 or nrm is None:
        return contour_sigma, straight
    # corners (rounded print vs. sharp design) would read as noise: straight points only
    n = np.array([len(nrm)])
    base = _straightness(nrm, n, AUTO_DEFAULT)
    ok = keep & (base >= 1.0)
    cs, _ = auto_contour_sigma(np.where(ok, d, 0.0), ok, noise_points=noise_points)
    # The corner taper needs +/- 3 sigma of straight contour: on a short side a long sigma
    # would fall back to 1 sample almost everywhere. Longest candidate <= the choice that
    # keeps at least AUTO_KEEP_STRAIGHT of the points that are straight at the default.
    full = max(float(np.sum(base >= 1.0)), 1.0)
    for c in sorted((c for c in AUTO_SIGMAS if AUTO_DEFAULT < c <= cs), reverse=True):
        st = _straightness(nrm, n, c)
        if np.sum(st >= 1.0) >= AUTO_KEEP_STRAIGHT * full:
            return c, st
    return AUTO_DEFAULT, base


def _inliers(d: np.ndarray, found: np.ndarray, med: np.ndarray, *, outlier_k: float, min_mad: float) -> np.ndarray:
    """The ``found`` points whose displacement lies within ``outlier_k`` MADs (at least ``min_mad``)
    of the running median ``med``; all of ``found`` when fewer than 3 points or none finite."""
    keep = found.copy()
    if keep.sum() >= 3:
        r = d - med
        finite = keep & np.isfinite(r)
        if finite.any():
            mad = 1.4826 * np.median(np.abs(r[finite]))
            keep = finite & (np.abs(r) <= outlier_k * max(mad, min_mad))
    return keep


def _regularise(d: np.ndarray, found: np.ndarray, med: np.ndarray, *, outlier_k: float,
                contour_sigma: float, min_mad: float,
                straight: np.ndarray | None = None, nrm: np.ndarray | None = None,
                noise_points: int = 9) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Reject outliers by MAD about the running median ``med``, fill by interpolation, smooth along the contour.

    ``contour_sigma < 0`` chooses it from the kept displacements (needs the contour's
    normals ``nrm`` for the corner taper). Returns (smoothed displacement, kept mask,
    residual of raw minus smoothed, contour_sigma used).
    """
    from scipy.ndimage import gaussian_filter1d

    keep = _inliers(d, found, med, outlier_k=outlier_k, min_mad=min_mad)
    if not keep.any():
        return np.zeros_like(d), keep, np.zeros_like(d), _sigma_used(contour_sigma)
    contour_sigma, straight = _auto_sigma(d, keep, contour_sigma, straight, nrm, noise_points)
    filled = _circular_fill(np.where(keep, d, 0.0), keep)
    smooth = _smooth_displacements(filled, contour_sigma, straight,
                                   lambda x, sg: gaussian_filter1d(x, min(sg, max(len(x) / 6.0, 0.5)), mode="wrap"))
    resid = np.where(keep, d - smooth, 0.0)
    return smooth, keep, resid, contour_sigma


# ----------------------------------------------------------------------------- public API

DECIDE_SAMPLE_PX, DECIDE_SIGMA = 0.5, 1.0  # profiles of the substrate decision
#: Matched filter (``matched_filter=True``): passes, shift search range and correlation window
#: (from MATCH_BEFORE_PX ahead of the template's substrate floor to MATCH_AFTER_PX past its rim peak).
MATCH_STEPS, MATCH_BEFORE_PX, MATCH_AFTER_PX = 2, 1.0, 3.0


#: A contour whose mean profile peaks farther than this fraction of the reach from it, with
#: a decision that cannot vouch for itself, is re-sampled centred on that peak (the rim).
DECIDE_RECENTRE = 1.0 / 3.0
#: ... and whose profile beyond the rim still changes by more than this fraction of the rim's
#: height over its last DECIDE_SETTLED_PX (the floor there is out of reach). Only a cost
#: matter where the floors vouch (re-centring changes no such decision): on the synth presets
#: the change is 0.10-0.12 (median), at most 0.19 in 99 %; rim-only images, 0.25-0.44.
DECIDE_SETTLED, DECIDE_SETTLED_PX = 0.25, 2.0
#: A contour decided by the rim rule (equal floors) is re-centred when its rim is farther than this.
DECIDE_NEAR_PX = 1.0
#: Floors differing by more than this fraction of the profile range decide the substrate.
DECIDE_FLOOR_FRAC = 0.15


def _substrate_sides(prof: np.ndarray, inside: np.ndarray, voters: np.ndarray, counts: np.ndarray
                     ) -> tuple[list[str], np.ndarray]:
    """Per contour: the substrate side from its decision profiles, and whether the floors decided it."""
    half = prof.shape[1] // 2
    inner, outer = prof[:, :half], prof[:, half + 1:]
    kth = max(0, int(0.1 * half))
    floor_diff = (np.partition(outer, kth, axis=1)[:, kth] - np.partition(inner, kth, axis=1)[:, kth])
    mean_diff = outer.mean(axis=1) - inner.mean(axis=1)
    span = prof.max(axis=1) - prof.min(axis=1)
    sides: list[str] = []
    by_floor = np.zeros(len(counts), dtype=bool)
    start = 0
    for k, n in enumerate(counts):
        sl = slice(start, start + n)
        start += n
        ok = inside[sl] & voters[sl]
        if not ok.any():
            ok = voters[sl] if voters[sl].any() else np.ones(n, bool)
        fd = float(np.median(floor_diff[sl][ok]))
        if abs(fd) > DECIDE_FLOOR_FRAC * float(np.median(span[sl][ok])):
            sides.append("inside" if fd > 0 else "outside")
            by_floor[k] = True
        else:
            sides.append("inside" if float(np.median(mean_diff[sl][ok])) > 0 else "outside")
    return sides, by_floor


def _centre_on_rim(arr: np.ndarray, pts: np.ndarray, nrm: np.ndarray, counts: np.ndarray, prof: np.ndarray,
                   inside: np.ndarray, reach_px: float, sides: list[str], by_floor: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Re-sample the decision profiles of contours lying far off their rim, centred on it.

    The substrate decision compares the two sides of the edge, so it needs both floors
    in reach, and its rule for equal floors (the rim lies on the resist side) needs the
    contour on the rim's substrate-side flank. A coarse contour on the resist-side flank
    (an iso-line around the dark interior of a wide feature whose top is as dark as the
    substrate) sees the rim near the end of its profiles and the substrate beyond it out
    of reach, and its decision comes out reversed. So a contour whose mean-profile peak
    lies more than ``DECIDE_RECENTRE`` of the reach away is sampled again with its points
    moved along the normals onto the peak, unless its first decision vouches for itself:
    decided by clearly different floors, with the rim on the resist side and the profile
    levelled off beyond it (``DECIDE_SETTLED``), as on images where the resist top is
    brighter than the substrate. A contour decided by the rim rule (floors equal) is
    re-centred whenever its rim is more than ``DECIDE_NEAR_PX`` away: from either flank
    it sees the rim on one side, so that rule can only compare the rim's own two flanks,
    the sidewall's and the slower decay into the resist top. Returns the profiles,
    their inside flags, each point's move along its outward normal (0 where none) and
    which contours moved.
    """
    half = prof.shape[1] // 2
    starts = ring_starts(counts)
    shift = np.zeros(len(pts))
    moved_c = np.zeros(len(counts), dtype=bool)
    for k, (a, n) in enumerate(zip(starts, counts)):
        if n == 0:
            continue
        m = prof[a:a + n].mean(axis=0)
        j = int(np.argmax(m))
        off = (j - half) * DECIDE_SAMPLE_PX
        if not by_floor[k]:  # equal floors: the rim rule needs the contour off the rim's far flank
            if abs(off) > DECIDE_NEAR_PX:
                shift[a:a + n] = off
                moved_c[k] = True
            continue
        if abs(off) <= DECIDE_RECENTRE * reach_px:
            continue
        # Beyond the rim the profile must have levelled off for the floor there to count.
        far = m[j:] if off > 0 else m[j::-1]
        k2 = max(1, int(round(DECIDE_SETTLED_PX / DECIDE_SAMPLE_PX)))
        settled = len(far) > k2 and abs(float(far[-1] - far[-1 - k2])) <= DECIDE_SETTLED * float(m[j] - m.min())
        rim_on_resist = (off < 0) == (sides[k] == "outside")
        if not (rim_on_resist and settled):
            shift[a:a + n] = off
            moved_c[k] = True
    if not moved_c.any():
        return prof, inside, shift, moved_c
    moved = np.repeat(moved_c, counts)
    prof = prof.copy()
    inside = inside.copy()
    p2, in2 = _raw_profiles(arr, pts[moved] + shift[moved, None] * nrm[moved], nrm[moved], search_px=reach_px,
                            sample_px=DECIDE_SAMPLE_PX, smooth_sigma=DECIDE_SIGMA)
    prof[moved], inside[moved] = p2, in2
    return prof, inside, shift, moved_c


def _decide_substrate(arr: np.ndarray, pts: np.ndarray, nrm: np.ndarray, counts: np.ndarray,
                      reach_px: float, exclude: np.ndarray | None = None, raw: np.ndarray | None = None,
                      recentre: bool = True) -> tuple[list[str], np.ndarray]:
    """Which side of each contour is the substrate, from the data, and where its rim is.

    Profiles reaching ``reach_px`` to each side are compared per contour: the
    side with the clearly lower floor (10th percentile, median over the contour)
    is the substrate, which holds even when the coarse contour sits on the
    rim's resist-side flank. When the floors are within 15 % of the profile
    range (resist top as dark as the substrate), the side with the lower mean
    is the substrate (the bright rim lies on the resist side). Points in
    ``exclude`` (on the image border) do not vote. ``raw``: the profiles' samples, if taken already.
    A contour far off its rim is then decided again on profiles centred on the rim
    (:func:`_centre_on_rim`), unless not ``recentre``: contours known to run along the
    edge, whose rim side is the resist side. The second value is that move per point
    (px along the outward normal, 0 where none).
    """
    prof, inside = _raw_profiles(arr, pts, nrm, search_px=reach_px, sample_px=DECIDE_SAMPLE_PX,
                                 smooth_sigma=DECIDE_SIGMA, raw=raw)
    voters = np.ones(len(pts), dtype=bool) if exclude is None else ~exclude
    sides, by_floor = _substrate_sides(prof, inside, voters, counts)
    shift = np.zeros(len(pts))
    if recentre:
        prof, inside, shift, moved = _centre_on_rim(arr, pts, nrm, counts, prof, inside, reach_px, sides, by_floor)
        if moved.any():  # decide the re-centred contours again
            rows = np.repeat(moved, counts)
            again, _ = _substrate_sides(prof[rows], inside[rows], voters[rows], np.asarray(counts)[moved])
            for k, side in zip(np.flatnonzero(moved), again):
                sides[k] = side
    return sides, shift


def _contour_sigma_value(v: float | str) -> float:
    """``contour_sigma``: a number >= 0, or ``"auto"`` (returned as -1, chosen per contour)."""
    if _is_auto(v):
        return -1.0
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise SegsemError(f"contour_sigma must be a number >= 0 or 'auto', got {v!r}") from None
    if not (np.isfinite(f) and f >= 0):
        raise SegsemError(f"contour_sigma must be a number >= 0 or 'auto', got {v!r}")
    return f


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


# ----------------------------------------------------------------------------- border handling

def _masked_gauss_wrap(x: np.ndarray, w: np.ndarray, sigma: float) -> np.ndarray:
    """Circular Gaussian smoothing of ``x`` along axis 0 over the points with ``w`` (normalised
    convolution); points without weighted neighbours keep their value."""
    from scipy.ndimage import gaussian_filter1d

    if sigma <= 0 or len(x) < 4:
        return x
    sigma = min(sigma, len(x) / 6.0)
    wf = w.astype(np.float64)
    xw = x * (wf[:, None] if x.ndim == 2 else wf)
    num = gaussian_filter1d(xw, sigma, axis=0, mode="wrap")
    den = gaussian_filter1d(wf, sigma, mode="wrap")
    ok = den > 1e-6
    den = np.where(ok, den, 1.0)
    out = num / (den[:, None] if x.ndim == 2 else den)
    keep = ~(ok & w)
    out[keep] = x[keep]
    return out


def _masked_along_mean(a: np.ndarray, counts: np.ndarray, window: int, w: np.ndarray) -> np.ndarray:
    """:func:`_along_mean` over the neighbours with ``w`` only (rows without any keep their value).

    Only the rows whose neighbourhood holds a point without ``w`` differ from
    the plain mean; just those are recomputed.
    """
    if window <= 1 or w.all():
        return _along_mean(a, counts, window)
    out = _along_mean(a, counts, window)
    den = _along_mean(w.astype(np.float32), counts, window)
    rows = np.nonzero(den < 1.0 - 0.5 / window)[0]
    if rows.size:
        starts = ring_starts(counts)
        which = np.searchsorted(starts, rows, side="right") - 1
        st, n = starts[which], counts[which]
        j = np.arange(window) - window // 2
        nb = st[:, None] + (rows - st)[:, None] + j[None, :]
        nb = st[:, None] + (nb - st[:, None]) % n[:, None]
        wn = w[nb].astype(np.float32)
        cnt = wn.sum(axis=1)
        num = np.einsum("rj,rjk->rk", wn, a[nb].astype(np.float32))
        ok = cnt > 0
        out[rows[ok]] = (num[ok] / cnt[ok, None]).astype(a.dtype, copy=False)
        out[rows[~ok]] = a[rows[~ok]]
    return out


def _run_normals(c: np.ndarray, border: np.ndarray, smooth: float) -> np.ndarray:
    """Outward unit normals of a contour whose border points split it into open runs.

    Coordinates are smoothed over the run points only and tangents use
    one-sided differences at the run ends, so the image border never tilts the
    normals of the edge next to it.
    """
    edge = ~border
    cs = _masked_gauss_wrap(c, edge, smooth)
    n = len(c)
    i = np.arange(n)
    prv, nxt = (i - 1) % n, (i + 1) % n
    ip = np.where(edge[prv], prv, i)
    inx = np.where(edge[nxt], nxt, i)
    t = np.where(edge[:, None], cs[inx] - cs[ip], c[nxt] - c[prv])
    flat = np.hypot(t[:, 0], t[:, 1]) < 1e-12
    t[flat] = (c[nxt] - c[prv])[flat]
    nv = np.column_stack([t[:, 1], -t[:, 0]])
    if signed_area(c) < 0:
        nv = -nv
    norm = np.hypot(nv[:, 0], nv[:, 1])
    norm[norm == 0] = 1.0
    return nv / norm[:, None]


def _contour_normals(c: np.ndarray, border: np.ndarray, smooth: float) -> np.ndarray:
    """Outward unit normals of a contour: per edge run (:func:`_run_normals`) when it has border
    points, else of the whole closed contour (:func:`~segsem_cli.contours.normals`)."""
    return _run_normals(c, border, smooth) if border.any() else normals(c, smooth=smooth)


def _regularise_runs(d: np.ndarray, found: np.ndarray, med: np.ndarray, border: np.ndarray, *, outlier_k: float,
                     contour_sigma: float, min_mad: float,
                     straight: np.ndarray | None = None, nrm: np.ndarray | None = None,
                     noise_points: int = 9) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """:func:`_regularise` for a contour with border points: rejected points are filled within
    their own run (held constant towards its ends), smoothing does not cross onto the border,
    and border points keep a zero displacement."""
    keep = _inliers(d, found & ~border, med, outlier_k=outlier_k, min_mad=min_mad)
    if not keep.any():
        return np.zeros_like(d), keep, np.zeros_like(d), _sigma_used(contour_sigma)
    contour_sigma, straight = _auto_sigma(d, keep, contour_sigma, straight, nrm, noise_points)
    filled = np.zeros_like(d)
    for run in border_runs(border):
        k = keep[run]
        if k.any():
            filled[run] = np.interp(np.arange(len(run)), np.nonzero(k)[0], d[run][k])
    smooth = _smooth_displacements(filled, contour_sigma, straight, lambda x, sg: _masked_gauss_wrap(x, ~border, sg))
    smooth[border] = 0.0
    return smooth, keep, np.where(keep, d - smooth, 0.0), contour_sigma


def _ray_to_border(p: np.ndarray, d: np.ndarray, shape: tuple[int, int]) -> tuple[float, int, float]:
    """Distance ``t`` along unit direction ``d`` from ``p`` (inside) to the image border, the axis hit and its value."""
    h, w = shape
    best = (np.inf, 0, 0.0)
    for axis, lim in ((0, w), (1, h)):
        if d[axis] < -1e-12:
            best = min(best, (-p[axis] / d[axis], axis, 0.0))
        elif d[axis] > 1e-12:
            best = min(best, ((lim - p[axis]) / d[axis], axis, float(lim)))
    return best


def _junction(run: np.ndarray, at_start: bool, fallback: np.ndarray, shape: tuple[int, int], max_ext: float,
              k: int = 8) -> np.ndarray:
    """Where a run of edge points meets the image border.

    The run's last ``k`` points (towards the end ``at_start`` or not) are fitted
    with a quadratic in arc length and the curve is followed past the end
    until it leaves the image; a straight extension along the fitted end
    tangent when the curve does not get there, then the end's perpendicular
    foot on the border, each only within ``max_ext`` px; else ``fallback``
    (the coarse contour's border point).
    """
    h, w = shape
    seg = run[:k][::-1] if at_start else run[-k:]  # ordered towards the end
    p = seg[-1]
    if len(seg) >= 2:
        t = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(seg, axis=0).T))])
        t = t - t[-1]  # end at t = 0, the run behind at t < 0
        if t[0] < -1e-9:
            quad = len(seg) >= 5 and t[0] < -3.0
            A = np.column_stack([np.ones_like(t), t] + ([t * t] if quad else []))
            coef = np.linalg.lstsq(A, seg - p, rcond=None)[0]  # rows: offset, slope, (curvature)
            # Follow the fitted curve beyond the end (0.25 px steps) until it leaves the image.
            ts = np.arange(0.0, max_ext + 0.25, 0.25)
            q = p + np.outer(ts, coef[1]) + (np.outer(ts * ts, coef[2]) if quad else 0.0)
            out = (q[:, 0] < 0) | (q[:, 0] > w) | (q[:, 1] < 0) | (q[:, 1] > h)
            if out.any():
                j = int(np.argmax(out))
                if j > 0:
                    a0, d = q[j - 1], q[j] - q[j - 1]
                    nd = float(np.hypot(*d))
                    if nd > 1e-12:
                        tt, axis, val = _ray_to_border(a0, d / nd, shape)
                        r = a0 + min(tt, nd) * d / nd
                        r[axis] = val
                        return np.array([np.clip(r[0], 0, w), np.clip(r[1], 0, h)])
            d = coef[1]
            nd = float(np.hypot(*d))
            if nd > 1e-12:
                tt, axis, val = _ray_to_border(p, d / nd, shape)
                if 0.0 <= tt <= max_ext:
                    r = p + tt * d / nd
                    r[axis] = val
                    return np.array([np.clip(r[0], 0, w), np.clip(r[1], 0, h)])
    dist = [p[0], w - p[0], p[1], h - p[1]]
    i = int(np.argmin(dist))
    if dist[i] <= max_ext:
        return np.array([[0.0, p[1]], [float(w), p[1]], [p[0], 0.0], [p[0], float(h)]][i])
    return np.asarray(fallback, dtype=np.float64).copy()


def _gap_length(seg_len: np.ndarray, a: int, b: int) -> float:
    """Length of a closed contour from its point ``a`` forward to its point ``b``
    (``seg_len[k]``: from point ``k`` to ``k + 1``)."""
    n = len(seg_len)
    k = (b - a) % n
    if a + k <= n:
        return float(seg_len[a:a + k].sum())
    return float(seg_len[a:].sum() + seg_len[:a + k - n].sum())


def _same_border_side(a: np.ndarray, b: np.ndarray, shape: tuple[int, int], margin: float) -> bool:
    """True when points ``a`` and ``b`` lie on the same side of the image frame, both farther
    than ``margin`` from that side's corners."""
    ab = np.vstack([a, b])
    common = np.all(border_lines(ab, shape), axis=0)  # u = 0, u = W, v = 0, v = H
    if not common.any():
        return False
    axis = 0 if int(np.argmax(common)) < 2 else 1  # the coordinate fixed on that side
    t = ab[:, 1 - axis]
    return bool(np.all((t > margin) & (t < shape[axis] - margin)))


def _rebuild_along_border(c_in: np.ndarray, c_new: np.ndarray, border: np.ndarray, valid: np.ndarray,
                          cols: dict[str, np.ndarray], shape: tuple[int, int], *, step_px: float, max_ext: float,
                          trim_max: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Join the refined edge runs of a contour with new border segments.

    At each run end, points without a kept edge (``valid`` False: e.g. the
    search window left the image) are dropped, at most ``trim_max`` per end
    and never the whole run; the run is extended onto the border
    (:func:`_junction`) and consecutive runs are joined along the border in the
    positive direction, through the image corners (or directly, where that walk
    would go round more than half the frame between two ends the input contour
    joined by a short path; see the loop). ``cols`` are per-point arrays
    (validity, SNR, ...): run points keep theirs, border points get False / 0 /
    NaN. Returns ``(contour, border mask, cols)``.
    """
    from .contours import border_param, border_path

    h, w = shape
    n = len(c_new)
    c = np.column_stack([np.clip(c_new[:, 0], 0, w), np.clip(c_new[:, 1], 0, h)])
    on = border_mask(c, shape)
    kept = []
    for r in border_runs(border):
        lo, hi = 0, len(r)
        while lo < hi and lo < trim_max and not valid[r[lo]]:
            lo += 1
        while hi > lo and len(r) - hi < trim_max and not valid[r[hi - 1]]:
            hi -= 1
        rr = r[lo:hi] if hi - lo >= 2 else r
        while len(rr) and on[rr[0]]:
            rr = rr[1:]
        while len(rr) and on[rr[-1]]:
            rr = rr[:-1]
        if len(rr) < 2:
            continue
        before, after = c_in[(r[0] - 1) % n], c_in[(r[-1] + 1) % n]
        kept.append((rr, _junction(c[rr], True, before, shape, max_ext),
                     _junction(c[rr], False, after, shape, max_ext), before, after, r[0], r[-1]))
    if not kept:
        return c_in, border, cols
    per = 2.0 * (w + h)
    seg_len = None  # c_in[k] -> c_in[k + 1], when a long walk needs it
    pts: list[np.ndarray] = []
    idx: list[np.ndarray] = []
    for i, (rr, _ja, jb, _bef, after, _r0, r1) in enumerate(kept):
        nxt = kept[(i + 1) % len(kept)]
        nxt_ja, nxt_before, nxt_r0 = nxt[1], nxt[3], nxt[5]
        pts.append(c[rr])
        idx.append(rr)
        s = border_param(np.vstack([jb, nxt_ja, after, nxt_before]), shape)
        walk = (s[1] - s[0]) % per
        # a walk round more than half the frame between two ends within a junction's reach, or
        # on the same side of the frame away from its corners with the input contour's own path
        # from one run to the next at most twice as long as the chord plus a junction either end
        suspect = walk > 0.5 * per
        if suspect:
            if seg_len is None:
                seg_len = np.hypot(*(np.roll(c_in, -1, axis=0) - c_in).T)
            gap = _gap_length(seg_len, r1, nxt_r0)
            chord = float(np.hypot(*(nxt_ja - jb)))
            suspect = chord <= max_ext or (gap <= 2.0 * (chord + max_ext)
                                           and _same_border_side(jb, nxt_ja, shape, max_ext))
        if walk - (s[3] - s[2]) % per > 0.5 * per:  # refinement swapped the ends: no detour
            path = np.vstack([jb, nxt_ja])
        elif suspect and gap < 0.5 * walk:
            # The input contour went (nearly) straight from this run to the next: a join made
            # so by the rule above in an earlier pass; a side snapped on and off the border near
            # a corner, which leaves a run ending just past where the next begins; or a sliver
            # whose coarse contour touched the border between two pieces, running along it one
            # way there and the other way under the pieces. Walking round more than half the
            # frame would enclose the whole image. (Near a corner the print may really go round
            # it, and a long way between the ends is a shape of its own: those keep the walk.)
            path = np.vstack([jb, nxt_ja])
        else:
            path = border_path(jb, nxt_ja, shape, step_px=step_px)
        pts.append(path)
        idx.append(np.full(len(path), -1))
    contour = np.vstack(pts)
    src = np.concatenate(idx)
    bnd = src < 0
    out = {}
    for key, arr in cols.items():
        fill = np.nan if arr.dtype.kind == "f" and key == "raw" else (False if arr.dtype == bool else 0.0)
        o = np.full(len(src), fill, dtype=arr.dtype)
        o[~bnd] = arr[src[~bnd]]
        out[key] = o
    return contour, bnd, out


def _print_reaches_border(pts: np.ndarray, nrm: np.ndarray, prof: np.ndarray, found: np.ndarray,
                          border: np.ndarray, shape: tuple[int, int], *, search_px: float, sample_px: float,
                          min_run: int = 3) -> np.ndarray:
    """Points of one contour to move onto the image border: the printed shape runs out of the image there.

    Candidates are runs (at least ``min_run`` long) of points without an edge
    whose outward normal meets the border within ``search_px``. A run is taken
    when the signal just inside the border, along those normals, is closer to
    the shape's own interior level than to its exterior level (both measured
    on the profiles of the points that did find an edge): the shape continues
    to the border. An edge between the point and the border that was not
    measured leaves the exterior level there, and the run stays.
    Returns the ray distance to the border (``inf`` for points not moved).
    """
    h, w = shape
    t = np.full(len(pts), np.inf)  # distance along the outward normal to the border
    with np.errstate(divide="ignore", invalid="ignore"):
        for axis, lim in ((0, w), (1, h)):
            n_, p_ = nrm[:, axis], pts[:, axis]
            t = np.minimum(t, np.where(n_ < -1e-9, -p_ / n_, np.where(n_ > 1e-9, (lim - p_) / n_, np.inf)))
    cand = ~found & ~border & (t <= search_px)
    out = np.full(len(pts), np.inf)
    if cand.sum() < min_run or cand.all() or found.sum() < 3:
        return out
    k = prof.shape[1]
    half = k // 2
    reach = int(round(0.75 * search_px / sample_px))
    interior = float(np.median(prof[found, half - reach]))
    exterior = float(np.median(prof[found, half + reach]))
    if abs(exterior - interior) < 1e-9:
        return out
    # the sample about one pixel inside the border along each normal
    # (only candidates are read: others may have t = inf or nan, e.g. a degenerate normal)
    jb = np.clip(half + np.floor((np.where(cand, t, 1.0) - 1.0) / sample_px).astype(np.int64), half, k - 1)
    at_border = prof[np.arange(len(pts)), np.where(cand, jb, half)]
    inside_like = np.abs(at_border - interior) < np.abs(at_border - exterior)
    for run in border_runs(~cand):
        if len(run) >= min_run and inside_like[run].mean() > 0.5:
            out[run] = t[run]
    return out


def _prepare(contours_uv: Sequence[np.ndarray], shape: tuple[int, int], *, step_px: float, border: bool,
             border_px: float) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Validate, snap to the border (when ``border``), orient and resample the coarse contours."""
    from .contours import snap_to_border

    h, w = shape
    cur, bnd = [], []
    for i, c in enumerate(contours_uv):
        a = as_contour(c, name=f"contour {i}")
        if border and np.any((a[:, 0] <= border_px) | (a[:, 0] >= w - border_px)
                             | (a[:, 1] <= border_px) | (a[:, 1] >= h - border_px)):
            s = snap_to_border(a, shape, border_px=border_px)
            if abs(signed_area(s)) > 1e-6:
                r = orient(resample_closed(s, step_px))
                b = border_mask(r, shape)
                if b.any() and not b.all():
                    cur.append(r)
                    bnd.append(b)
                    continue
        r = orient(resample_closed(a, step_px))
        cur.append(r)
        bnd.append(np.zeros(len(r), dtype=bool))
    return cur, bnd


def _auto_threshold(img: EdgeImage, contours_uv: Sequence[np.ndarray], substrate, *, edge: str,
                    **kw: Any) -> tuple[float, str]:
    """``threshold="auto"``: the image's own ``t`` (:mod:`segsem_cli.edge_model`), measured once per
    :class:`EdgeImage` on the first contours it is asked for, and its source (``auto``/``default``)."""
    from .edge_model import AUTO_START, estimate_edge_threshold

    if edge != "threshold" or len(contours_uv) == 0:  # t is not used, or nothing to measure on yet
        return AUTO_START, "default"
    if img.edge_threshold is None:
        img.edge_threshold = estimate_edge_threshold(img, contours_uv, substrate=substrate, **kw)
    return img.edge_threshold.threshold, img.edge_threshold.source


def refine_contours(
    image: np.ndarray | EdgeImage,
    contours_uv: Sequence[np.ndarray],
    *,
    edge: str = "threshold",
    threshold: float | str = 0.5,
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
    contour_sigma: float | str = "auto",
    centre_weight: float = 0.3,
    passes: int = 2,
    repass_snr: float = 0.0,
    base_sigma: float = 3.0,
    seed_sigma: float = 0.0,
    repass_matched: bool = False,
    repass_smooth: float = 0.0,
    border: bool = True,
    border_px: float = 2.0,
    frame_px: int = 1,
    matched_filter: bool = False,
    template_points: int = 15,
    on_edge: bool = False,
) -> list[RefineResult]:
    """Refine many coarse closed contours on one image (all normals sampled in one vectorised pass).

    Parameters
    ----------
    image : 2-D grey levels (row, column) or an :class:`EdgeImage` prepared once.
    contours_uv : coarse closed contours, each ``(N, 2)`` in ``(u, v)`` px, any orientation.
        The edge must lie within ``search_px`` of the coarse contour.
    edge : ``"threshold"`` | ``"peak"`` | ``"max-gradient"`` (see module docs).
    threshold : ``t`` of the threshold rule, in [0, 1], or ``"auto"``: measured on the image
        (:func:`segsem_cli.edge_model.estimate_edge_threshold` on these contours), once per
        :class:`EdgeImage` (``img.edge_threshold``); every later call on the same EdgeImage
        uses that value. ``RefineResult.params`` has ``threshold`` (the number used) and
        ``threshold_source`` (``given``, ``auto`` or ``default``: the fit fell back to 0.5).
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
    on_edge : the contours are known to run along the edge (aligned layout polygons), not
        iso-lines that may lie on the rim's far flank: the ``auto`` substrate decision then
        takes the rim's side as the resist without looking across it (:func:`_centre_on_rim`).
    normal_smooth : circular Gaussian (samples) on the coordinates before taking normals.
    min_snr : a point's edge counts as found when ``(peak - min) / profile noise >= min_snr``.
    outlier_k, outlier_window, min_mad : reject points whose displacement differs from the
        running median of ``2*outlier_window+1`` neighbours by more than
        ``outlier_k * max(1.4826 MAD, min_mad)``.
    contour_sigma : circular Gaussian (samples; 3 = 3 px at ``step_px=1``) smoothing of the
        displacements along the contour, or ``"auto"`` (default): each contour with at least
        :data:`AUTO_MIN_POINTS` kept points chooses from :data:`AUTO_SIGMAS` (3 to 10) the
        smoothing that minimises the predicted error of its own displacements
        (:func:`auto_contour_sigma`: position noise from the nugget of their variogram,
        edge roughness from the rest), others use 3. Three samples average the per-point
        noise over about 7 profiles while line-edge roughness with a correlation length of
        15 px keeps 93 % of its variance; noisy images need longer. At corners (the contour
        turning by more than 20-45 degrees within +/- 3 contour_sigma samples) it tapers to
        1 sample so corner rounding is not smeared onto the edges next to it. 0 keeps every
        point's own position. The value used is ``RefineResult.params["contour_sigma"]``.
    centre_weight : in [0, 1); prefers rims near the coarse contour when several are in the window.
    passes : refinement passes; later passes re-take the normals from the refined contour
        smoothed along its length with a Gaussian of ``base_sigma`` samples.
    repass_snr : after the last of ``passes``, contours whose median edge SNR (rim contrast
        over profile noise, at the points where an edge was found) is below this get one
        more pass (0, the default: never). A noisy image gives a jittery coarse contour
        (an iso-line of a smoothed noisy image): its neighbouring profiles, averaged in its
        own normal coordinates, blur the rim and bias the level, which a pass from the
        smoothed refined contour undoes; on clean images the extra pass changes nothing
        and is skipped.
    repass_matched : that extra pass uses the matched filter (``matched_filter``) whatever
        ``matched_filter`` says: the contours it re-takes are the noisy ones the filter is for.
    repass_smooth : that extra pass smooths its profiles along the normal by this many px
        instead of ``smooth_sigma`` (0, the default: the same). With the matched filter, the
        templates' edges are still located on profiles smoothed by ``smooth_sigma``: the
        extra smoothing only steadies the per-point fits and the plain rule where the filter
        does not apply (those points' edges move with it, by about 0.05 px towards the
        substrate for 1 -> 1.5 px at 2.6 px blur).
    seed_sigma : the coarse contours are low-passed along their length with a Gaussian of
        this many samples before the first pass, as every later pass's base is with
        ``base_sigma`` (0, the default: used as given). The same jitter, removed before
        it blurs the first pass's profile averages; it costs nothing.
    border : contours that run along the image border (a shape cut by the field of
        view, closed along ``u = 0``, ``u = W``, ``v = 0`` or ``v = H``) keep that
        part fixed (default). The contour is clamped into ``[0, W] x [0, H]`` and
        coordinates within ``border_px`` of a border line are put onto it; these
        *border points* are never refined, do not count in ``valid``/``quality``
        (:attr:`RefineResult.border`), and are not averaged into their
        neighbours' profiles. The runs of real edge between them are refined as
        open curves; at a run's ends, points without a kept edge (e.g. their
        profile would leave the image) are dropped and the run is extended along
        its fitted end onto the border. A run of points without an edge whose
        normals reach the border within ``search_px``, where the signal next to
        the border is the shape's own interior level, goes onto the border too
        (a print running out of the image from a coarse contour that did not).
        ``False``: every point is refined as an edge (none is found where the
        profile leaves the image).
    frame_px : outermost pixel rows and columns not used for edge placement (see
        :class:`EdgeImage`; ignored if an EdgeImage is given).
    matched_filter : optional second stage of the threshold rule (default off). In the last
        pass, each found point's profile is fitted (least-squares shift, 2 Gauss-Newton steps,
        over the samples from 1 px before the substrate floor to 3 px past the rim peak) to a
        local template: the mean profile of the found points within ``+/- template_points`` on
        its contour, excluding the ``along_points - 1`` nearest (which share its data). The
        template's own threshold crossing (same ``t``/min/peak rule, low noise) sets the edge,
        so the convention is unchanged (clean edges within 0.002 px of the plain rule).
        Benchmark (synth presets, t = 0.66): EPE RMS easy 0.257 -> 0.256, medium 0.314 -> 0.305,
        hard 0.775 -> 0.733 px; gauge CD 3-sigma lower at all levels; about +35 % refinement time.
        Outlier rejection and ``contour_sigma`` smoothing follow as usual.
    template_points : half-width of the matched filter's template window (contour points, default 15).
    border_px : snapping distance for ``border`` (px, default 2). Masks and iso-lines
        closed through a padded border lie within half a pixel of it; an edge closer
        than 2 px to the border, or a bright or dark frame in the outermost pixels
        (smoothed into the image by a coarse detector), cannot be measured there anyway.

    Returns
    -------
    list of RefineResult, one per input contour; contours have positive orientation
    (see :mod:`segsem_cli.contours`) and ``step_px`` spacing (border segments are
    sampled at ``step_px`` too).
    """
    img = image if isinstance(image, EdgeImage) else EdgeImage(image, image_sigma=image_sigma, frame_px=frame_px)
    along_points, passes = int(along_points), int(passes)
    level_points = int(level_points)
    auto_t = _is_auto(threshold)
    _check_params(edge, 0.5 if auto_t else threshold, search_px, step_px, sample_px, smooth_sigma, along_points,
                  passes, centre_weight)
    if level_points < 1 or level_points % 2 == 0:
        raise SegsemError(f"level_points must be an odd number >= 1, got {level_points}")
    if not (np.isfinite(border_px) and border_px >= 0):
        raise SegsemError(f"border_px must be >= 0, got {border_px}")
    contour_sigma = _contour_sigma_value(contour_sigma)
    subs = [substrate] * len(contours_uv) if isinstance(substrate, str) else list(substrate)
    if len(subs) != len(contours_uv):
        raise SegsemError(f"substrate: got {len(subs)} values for {len(contours_uv)} contours")
    for s in subs:
        if s not in SUBSTRATE_SIDES:
            raise SegsemError(f"substrate must be one of {', '.join(SUBSTRATE_SIDES)}, got '{s}'")
    if len(contours_uv) == 0:
        return []
    t_source = "given"
    if auto_t:
        threshold, t_source = _auto_threshold(img, contours_uv, subs, edge=edge, search_px=search_px, step_px=step_px,
                                              sample_px=sample_px, smooth_sigma=smooth_sigma, along_points=along_points,
                                              level_points=level_points, normal_smooth=normal_smooth, min_snr=min_snr,
                                              outlier_k=outlier_k, outlier_window=outlier_window, min_mad=min_mad,
                                              contour_sigma="auto" if contour_sigma < 0 else contour_sigma,
                                              centre_weight=centre_weight, border=border, border_px=border_px,
                                              seed_sigma=seed_sigma, on_edge=on_edge)

    def noises(sigma: float) -> tuple[float, float]:
        """Noise of a mean profile and of a level window's profile, smoothed by ``sigma`` along the normal."""
        factor = _profile_noise_factor(img.image_sigma, sigma, float(sample_px), along_points, float(step_px))
        return (max(img.noise * factor, 1e-9 * max(1.0, float(np.ptp(img.sampled)))),
                img.noise * _profile_noise_factor(img.image_sigma, sigma, float(sample_px), level_points,
                                                  float(step_px)))

    noise_prof, noise_w = noises(float(smooth_sigma))
    current, bnd = _prepare(contours_uv, img.shape, step_px=float(step_px), border=bool(border),
                            border_px=float(border_px))
    if seed_sigma > 0:
        current, bnd = _next_base(current, bnd, float(seed_sigma), float(step_px), img.shape, taper=True)
    kw = dict(edge=edge, threshold=threshold, search_px=float(search_px), step_px=float(step_px),
              sample_px=sample_px, smooth_sigma=smooth_sigma, along_points=along_points, level_points=level_points,
              normal_smooth=normal_smooth, min_snr=min_snr, outlier_k=outlier_k, outlier_window=int(outlier_window),
              min_mad=min_mad, contour_sigma=contour_sigma, centre_weight=centre_weight, passes=passes,
              base_sigma=base_sigma, noise_prof=noise_prof, noise_w=noise_w, border_mode=bool(border),
              matched_filter=bool(matched_filter), template_points=int(template_points), on_edge=bool(on_edge),
              threshold_source=t_source)
    out = _refine_batches(img, current, bnd, subs, kw)
    if repass_snr > 0:
        # One more pass for the noisy contours only, from their own smoothed result, on the
        # side the first pass decided.
        again = [i for i, r in enumerate(out) if r.found.any() and float(np.median(r.snr[r.found])) < repass_snr]
        if again:
            base, base_b = _next_base([out[i].contour_uv for i in again], [out[i].border for i in again],
                                      base_sigma, float(step_px), img.shape)
            redo = _refine_batches(img, base, base_b, [out[i].substrate for i in again],
                                   {**kw, "passes": 1, "matched_filter": kw["matched_filter"] or bool(repass_matched),
                                    **({"smooth_sigma": float(repass_smooth), "template_sigma": float(smooth_sigma),
                                        **dict(zip(("noise_prof", "noise_w"), noises(float(repass_smooth))))}
                                       if repass_smooth > 0 else {})})
            for i, r in zip(again, redo):
                # kept unless it lost edges (a tiny shape cut by the border can shrink onto it)
                if r.valid_fraction >= out[i].valid_fraction - REPASS_VALID_TOL:
                    out[i] = r
    return out


def _refine_batches(img: EdgeImage, current: list[np.ndarray], bnd: list[np.ndarray], subs: list[str],
                    kw: dict[str, Any]) -> list[RefineResult]:
    """:func:`_refine_batch` over all contours, in batches."""
    # Contours along the border go in their own batches: a contour's result never
    # depends on which others it was refined with.
    out: list[RefineResult] = [None] * len(current)  # type: ignore[list-item]
    for along_border in (False, True):
        members = [i for i in range(len(current)) if bool(bnd[i].any()) == along_border]
        # Batches of about _BATCH_POINTS points keep the (points x samples) arrays in
        # cache (a 2048 px image with 200 features ran 1.5x slower per point in one batch).
        groups: list[list[int]] = [[]]
        acc = 0
        for i in members:
            if groups[-1] and acc + len(current[i]) > _BATCH_POINTS:
                groups.append([])
                acc = 0
            groups[-1].append(i)
            acc += len(current[i])
        for g in groups:
            if not g:
                continue
            res = _refine_batch(img, [current[i] for i in g], [bnd[i] for i in g], [subs[i] for i in g], **kw)
            for i, r in zip(g, res):
                out[i] = r
    return out


def _refine_batch(img: EdgeImage, current: list[np.ndarray], bnd: list[np.ndarray], decided: list[str], *,
                  edge: str, threshold: float, search_px: float, step_px: float, sample_px: float,
                  smooth_sigma: float, along_points: int, level_points: int, normal_smooth: float, min_snr: float,
                  outlier_k: float, outlier_window: int, min_mad: float, contour_sigma: float,
                  centre_weight: float, passes: int, base_sigma: float, noise_prof: float,
                  noise_w: float, border_mode: bool, matched_filter: bool = False,
                  template_points: int = 15, on_edge: bool = False,
                  template_sigma: float | None = None, threshold_source: str = "given") -> list[RefineResult]:
    """:func:`refine_contours` on prepared (resampled, oriented) contours with their border masks.

    ``template_sigma``: the matched filter locates its templates' edges on profiles smoothed
    by this (default: ``smooth_sigma``), see :func:`_match_template`'s ``q_edge``."""
    decided = list(decided)
    results: list[RefineResult] = []
    sp = float(search_px)
    max_ext = 2.0 * sp
    trim_max = int(np.ceil(2.0 * sp / step_px)) + max(along_points, level_points) // 2
    for p in range(passes):
        if p > 0:
            current, bnd = _next_base(current, bnd, base_sigma, step_px, img.shape)
        pts = np.vstack(current)
        border = np.concatenate(bnd)
        any_border = bool(border.any())
        nrm = np.vstack([_contour_normals(c, b, normal_smooth) for c, b in zip(current, bnd)])
        counts = np.array([len(c) for c in current])
        starts = ring_starts(counts)
        decide = p == 0 and "auto" in decided
        raw_main = raw_dec = None
        if decide:  # the substrate decision's samples are mostly among the edge profiles' ones
            main_offsets = _profile_offsets(sp, sample_px, smooth_sigma)[0]
            raw_main, raw_dec = _shared_samples(img.sampled, pts, nrm, main_offsets,
                                                _profile_offsets(2.0 * sp, DECIDE_SAMPLE_PX, DECIDE_SIGMA)[0])
            auto_side = np.array([d == "auto" for d in decided])
            sides, shift = _decide_substrate(img.sampled, pts, nrm, counts, 2.0 * sp,
                                             exclude=border if any_border else None, raw=raw_dec,
                                             recentre=not on_edge)
            decided = [sides[i] if auto_side[i] else decided[i] for i in range(len(decided))]
            # A contour far from its rim, with the rim towards the substrate, lies on the rim's
            # resist-side flank: it starts from the rim instead, whose substrate-side flank
            # (the edge) is within the search window. (Rim far towards the resist: the contour
            # lies out on the substrate side, and the edge is between the two: no move.)
            towards = np.repeat(np.array([1.0 if d == "outside" else -1.0 for d in decided]), counts)
            move = (shift * towards > 0) & np.repeat(auto_side, counts) & ~border
            if move.any():
                pts = pts.copy()
                pts[move] += shift[move, None] * nrm[move]
                raw_main[move] = _sample_along(img.sampled, pts[move], nrm[move], main_offsets)
                current = [pts[a:a + n].copy() for a, n in zip(starts, counts)]
        # the matched filter's templates locate their edges on profiles smoothed by template_sigma
        # (refine_contours' repass_smooth: only the fits see the extra smoothing)
        edge_sigma = (template_sigma if edge == "threshold" and matched_filter and p == passes - 1
                      and template_sigma is not None and template_sigma != smooth_sigma else None)
        raw_edge = None
        if edge_sigma is not None and raw_main is None:
            # both smoothings from one sampling: the wider padding, cut down for the narrower
            pads = {sg: _profile_offsets(sp, sample_px, sg)[1] for sg in (smooth_sigma, edge_sigma)}
            wide = max(smooth_sigma, edge_sigma)
            raw_w = _sample_along(img.sampled, pts, nrm, _profile_offsets(sp, sample_px, wide)[0])
            raw_main = _pad_crop(raw_w, pads[wide], pads[smooth_sigma])
            raw_edge = _pad_crop(raw_w, pads[wide], pads[edge_sigma])
        prof1, _ = _raw_profiles(img.sampled, pts, nrm, search_px=sp, sample_px=sample_px,
                                 smooth_sigma=smooth_sigma, raw=raw_main)
        flip = np.repeat(np.array([s == "outside" for s in decided]), counts)

        def along(pr: np.ndarray, n: int) -> np.ndarray:
            """Along-contour mean of ``n`` profiles (border points' are not averaged into their neighbours')."""
            return _masked_along_mean(pr, counts, n, ~border) if any_border else _along_mean(pr, counts, n)

        def oriented(pr: np.ndarray) -> np.ndarray:
            """Profiles oriented substrate -> resist."""
            return np.where(flip[:, None], pr[:, ::-1], pr)

        prof = along(prof1, along_points)
        q = oriented(prof)
        qw = oriented(along(prof1, level_points))
        k_ = prof.shape[1]
        half = k_ // 2
        x, found, contrast, lo, hi = _locate(q, qw, edge=edge, threshold=threshold, centre_weight=centre_weight,
                                             noise_w=noise_w)
        s_pos = (x - half) * sample_px
        s_out = np.where(flip, -s_pos, s_pos)  # displacement along the outward normal
        # Samples beyond the image repeat its outermost pixels: an edge counts only when the
        # part of the profile the rule used (substrate floor to rim peak) lies in the image.
        sgn = np.where(flip, -1.0, 1.0) * sample_px  # oriented sample index -> px along the normal
        inside = _span_inside(pts, nrm, sgn, lo - half, hi - half, img.shape, img.frame_px)
        snr = contrast / noise_prof
        found = found & inside & (snr >= min_snr) & (np.abs(s_out) <= sp - sample_px) & ~border
        if edge == "threshold" and matched_filter and p == passes - 1:  # earlier passes only set the base
            q_edge = None
            if edge_sigma is not None:
                pe, _ = _raw_profiles(img.sampled, pts, nrm, search_px=sp, sample_px=sample_px,
                                      smooth_sigma=edge_sigma, raw=raw_edge)
                q_edge = oriented(along(pe, along_points))
            xm, ok_m = _match_template(q, x, found, counts, threshold=threshold, centre_weight=centre_weight, q_edge=q_edge,
                                       noise_w=noise_w, level_points=level_points, points=int(template_points),
                                       exclude=along_points - 1,
                                       before=int(round(MATCH_BEFORE_PX / sample_px)),
                                       after=int(round(MATCH_AFTER_PX / sample_px)), steps=MATCH_STEPS)
            sm = (xm - half) * sample_px
            sm_out = np.where(flip, -sm, sm)
            # Contours cut by the image border keep the plain rule: their templates would mix
            # profiles of runs on different sides of the border segments.
            cut = np.repeat(np.add.reduceat(border.astype(np.int64), starts) > 0, counts)
            use = ok_m & (np.abs(sm_out) <= sp - sample_px) & ~cut
            s_out = np.where(use, sm_out, s_out)
        if edge == "threshold":
            floor_out = ~_span_inside(pts, nrm, sgn, -half, -half, img.shape, img.frame_px)  # substrate end
            rb, xb, cb = _borrow_levels(q, qw, found, inside, border, contrast, hi, counts, threshold=threshold,
                                        floor_out=floor_out)
            if len(rb):
                # the two samples the crossing lies between must be pixels of the image
                span_ok = _span_inside(pts[rb], nrm[rb], sgn[rb], np.floor(xb) - half, np.ceil(xb) - half,
                                       img.shape, img.frame_px)
                sb = (xb - half) * sample_px
                sb_out = np.where(flip[rb], -sb, sb)
                keep_b = span_ok & (np.abs(sb_out) <= sp - sample_px) & (cb / noise_prof >= min_snr)
                rb = rb[keep_b]
                s_out[rb] = sb_out[keep_b]
                snr[rb] = cb[keep_b] / noise_prof
                inside[rb] = True
                found[rb] = True
        if border_mode:
            # Where no edge was found and the shape's interior runs on up to a nearby
            # border, the print leaves the image: those points go onto the border.
            h_, w_ = img.shape
            for i in range(len(current)):
                sl = slice(starts[i], starts[i] + counts[i])
                t_hit = _print_reaches_border(pts[sl], nrm[sl], prof[sl], found[sl], border[sl], img.shape,
                                              search_px=sp, sample_px=sample_px)
                mv = np.isfinite(t_hit)
                if not mv.any():
                    continue
                q = pts[sl][mv] + t_hit[mv, None] * nrm[sl][mv]
                q[:, 0] = np.clip(q[:, 0], 0, w_)
                q[:, 1] = np.clip(q[:, 1], 0, h_)
                q[np.abs(q[:, 0]) < 1e-6, 0] = 0.0
                q[np.abs(q[:, 0] - w_) < 1e-6, 0] = float(w_)
                q[np.abs(q[:, 1]) < 1e-6, 1] = 0.0
                q[np.abs(q[:, 1] - h_) < 1e-6, 1] = float(h_)
                idx = np.arange(starts[i], starts[i] + counts[i])[mv]
                pts[idx] = q
                bm = border_mask(pts[idx], img.shape)
                border[idx[bm]] = True
                current[i] = pts[sl].copy()

        d_all = np.where(found, s_out, 0.0)
        med_all = _running_median(d_all, found, counts, int(outlier_window))
        straight_all = _straightness(nrm, counts, contour_sigma) if contour_sigma > 1.0 else None
        auto = contour_sigma < 0
        new: list[np.ndarray] = []
        new_b: list[np.ndarray] = []
        results = []
        for i in range(len(current)):
            sl = slice(starts[i], starts[i] + counts[i])
            f_i, b_i = found[sl], border[sl]
            if b_i.any():
                d, keep, resid, cs_i = _regularise_runs(d_all[sl], f_i, med_all[sl], b_i, outlier_k=outlier_k,
                                                        contour_sigma=contour_sigma, min_mad=min_mad,
                                                        straight=None if straight_all is None else straight_all[sl],
                                                        nrm=nrm[sl] if auto else None, noise_points=max(along_points, level_points))
            else:
                d, keep, resid, cs_i = _regularise(d_all[sl], f_i, med_all[sl], outlier_k=outlier_k,
                                                   contour_sigma=contour_sigma, min_mad=min_mad,
                                                   straight=None if straight_all is None else straight_all[sl],
                                                   nrm=nrm[sl] if auto else None, noise_points=max(along_points, level_points))
            c_new = pts[sl] + d[:, None] * nrm[sl] if keep.any() else current[i]
            cols = {"valid": keep, "found": f_i.copy(), "displacement": d, "snr": np.where(f_i, snr[sl], 0.0),
                    "inside": inside[sl].copy(), "resid": resid, "raw": np.where(f_i, s_out[sl], np.nan)}
            if b_i.any() and keep.any():
                c_new, b_i, cols = _rebuild_along_border(current[i], c_new, b_i, keep, cols, img.shape,
                                                         step_px=step_px, max_ext=max_ext, trim_max=trim_max)
            new.append(c_new)
            new_b.append(b_i)
            results.append(RefineResult(
                contour_uv=c_new, valid=cols["valid"], found=cols["found"], displacement=cols["displacement"],
                snr=cols["snr"], substrate=decided[i], inside=cols["inside"],
                params={"edge": edge, "threshold": threshold, "threshold_source": threshold_source,
                        "search_px": sp, "noise": img.noise,
                        "profile_noise": noise_prof, "contour_sigma": float(cs_i), "_residual": cols["resid"], "_raw_displacement": cols["raw"],
                        "image_shape": img.shape},
                border=b_i.copy(),
            ))
        current, bnd = new, new_b
    return results


#: A repass result replaces the first pass unless its share of valid points is lower by more than this.
REPASS_VALID_TOL = 0.05


def _run_end_taper(b: np.ndarray, sigma: float) -> np.ndarray:
    """Per point, ``min(1, k / (2 sigma))`` for the point ``k`` samples along the contour from the
    nearest border point: how much of a smoothed position to take near the ends of edge runs."""
    n = len(b)
    k = np.nonzero(b)[0]
    i = np.arange(n)
    j = np.searchsorted(k, i) % len(k)
    d = np.minimum((k[j] - i) % n, (i - k[j - 1]) % n)
    return np.clip(d / max(2.0 * sigma, 1e-9), 0.0, 1.0)


def _next_base(current: list[np.ndarray], bnd: list[np.ndarray], base_sigma: float, step_px: float,
               shape: tuple[int, int], *, taper: bool = False) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The start of a later pass: the refined contours low-passed along their length.

    Neighbouring profiles are averaged in their own normal coordinates, so a jittery
    base would blur the averaged profile (lower the rim, bias the level). With ``taper``
    (coarse seeds, which bend where they meet the image border) the smoothing fades out
    over ``2 base_sigma`` samples towards the ends of edge runs, so the runs' ends, from
    which the refinement extends them to the border, stay where they were.
    """
    nxt, nb = [], []
    for c, b in zip(current, bnd):
        cut = bool(b.any())
        if cut:
            sm = _masked_gauss_wrap(c, ~b, base_sigma)
            if taper:
                a = _run_end_taper(b, base_sigma)[:, None]
                sm = a * sm + (1.0 - a) * c
        else:
            sm = _smooth_closed(c, base_sigma)
        r = orient(resample_closed(sm, step_px))
        nxt.append(r)
        nb.append(border_mask(r, shape) if cut else np.zeros(len(r), dtype=bool))
    return nxt, nb


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


def parse_bool(value: Any) -> bool | None:
    """``true/false``, ``yes/no``, ``on/off``, ``1/0`` (any case) or a bool -> bool; anything else -> None."""
    if isinstance(value, bool):
        return value
    t = str(value).strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    return None


def opt_bool(options: Mapping[str, Any], key: str, default: bool) -> bool:
    """A boolean option (``true/false``, ``yes/no``, ``on/off``, ``1/0``)."""
    if key not in options or options[key] is None:
        return bool(default)
    v = parse_bool(options[key])
    if v is None:
        raise _err(key, options[key], "must be true or false")
    return v


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

    Keys: ``edge``, ``threshold`` (a number in [0, 1] or ``auto``, the default: :data:`DEFAULT_THRESHOLD`), ``search_px``, ``step_px``, ``sample_px``,
    ``smooth_sigma`` (alias ``sigma``), ``along_points``, ``level_points``, ``image_sigma``,
    ``substrate``, ``min_snr``, ``outlier_k``, ``contour_sigma`` (a number or ``auto``, the default),
    ``passes``, ``repass_snr``, ``repass_matched``, ``repass_smooth``, ``seed_sigma``, ``border``
    (``true``/``false``: keep contour parts on the image border fixed, default true),
    ``border_px`` and ``frame_px`` (outer pixel ring ignored, default 1), ``matched_filter``
    (``true``/``false``, default false) and ``template_points`` (default 15).
    """
    o = dict(options)
    if "sigma" in o and "smooth_sigma" not in o:
        o["smooth_sigma"] = o["sigma"]
    return {
        "edge": opt_choice(o, "edge", "threshold", EDGE_RULES),
        "threshold": ("auto" if _is_auto(o.get("threshold", DEFAULT_THRESHOLD))
                      else opt_float({"threshold": DEFAULT_THRESHOLD, **o}, "threshold", 0.5, lo=0.0, hi=1.0)),
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
        "contour_sigma": ("auto" if o.get("contour_sigma") is None or _is_auto(o["contour_sigma"])
                          else opt_float(o, "contour_sigma", 3.0, lo=0.0, hi=100.0)),
        "passes": opt_int(o, "passes", 2, lo=1, hi=10),
        "repass_snr": opt_float(o, "repass_snr", 0.0, lo=0.0),
        "seed_sigma": opt_float(o, "seed_sigma", 0.0, lo=0.0, hi=50.0),
        "repass_matched": opt_bool(o, "repass_matched", False),
        "repass_smooth": opt_float(o, "repass_smooth", 0.0, lo=0.0, hi=50.0),
        "border": opt_bool(o, "border", True),
        "border_px": opt_float(o, "border_px", 2.0, lo=0.0, hi=10.0),
        "frame_px": opt_int(o, "frame_px", 1, lo=0, hi=16),
        "matched_filter": opt_bool(o, "matched_filter", False),
        "template_points": opt_int(o, "template_points", 15, lo=2, hi=200),
    }


# ----------------------------------------------------------------------------- results for plugins

#: A contour cut by the image border must cover at least this share of the border stretch its
#: layout polygon covers (:func:`feature_result`); less means only part of the shape was traced.
MIN_BORDER_COVERAGE = 0.5

#: An ``ok`` result must overlap its (aligned) layout polygon by at least this IoU
#: (:func:`feature_result`); less means the contour traced something else (e.g. the image
#: frame around a border sliver) and the feature is reported ``not_found``. The same value
#: as the association floor of a coarse region to a feature (``min_iou`` of the fallbacks).
#: Real prints on the benchmark sets reach 0.35 (a line end cut by the border on ``hard``).
MIN_LAYOUT_IOU = 0.2


def border_extra(res: RefineResult) -> dict[str, Any]:
    """``{"clipped": True, "border_fraction": f}`` for a refined contour running along the image border, else ``{}``.

    For callers that build their own :class:`~segsem_cli.types.FeatureResult`
    from :func:`refine_contours` (e.g. the hybrid judge of the SAM2 path);
    :func:`feature_result` adds the same keys.
    """
    if not res.clipped:
        return {}
    return {"clipped": True, "border_fraction": float(res.border_fraction)}


#: A refined contour with more than this share of its real-edge normals leaving the image is not measured.
MAX_OUTSIDE = 0.2


def unmeasurable(res: RefineResult, image_shape: tuple[int, int], *, border_px: float = 0.5,
                 max_outside: float = MAX_OUTSIDE) -> bool:
    """True when :func:`feature_result` turns ``res`` into ``"clipped"`` (no contour): more than
    ``max_outside`` of its real-edge normals leave the image (an edge hugging the border), or,
    for a contour without border points, a vertex lies closer than ``border_px`` to the border."""
    if res.clipped:
        edge = res.edge_points
        return bool(not edge.any() or np.mean(~res.inside[edge]) > max_outside)
    return touches_border(res.contour_uv, image_shape, margin_px=border_px) or bool(np.mean(~res.inside) > max_outside)


def feature_result(feature: Any, res: RefineResult | None, *, source: str, image_shape: tuple[int, int],
                   min_valid: float = 0.5, border_px: float = 0.5, status: str | None = None,
                   confidence_scale: float = 1.0, layout_px: np.ndarray | None = None,
                   layout_iou: float | None = None, extra: dict[str, Any] | None = None,
                   max_outside: float = MAX_OUTSIDE, min_border_coverage: float = MIN_BORDER_COVERAGE,
                   min_layout_iou: float = MIN_LAYOUT_IOU):
    """Turn one refinement into a :class:`~segsem_cli.types.FeatureResult` (shared by fallbacks and backbones).

    * ``status`` given (e.g. ``"not_found"``): that status, no contour, confidence 0.
    * a contour running along the image border (a shape cut by the field of view,
      :attr:`RefineResult.border`): judged on its real-edge points only, with
      ``extra["clipped"] = True`` and ``extra["border_fraction"]`` (fraction of
      the perimeter on the border);
    * more than ``max_outside`` of the real-edge normals leaving the image (an
      edge hugging the border, which cannot be measured), or, for a contour
      without border points, a vertex closer than ``border_px`` to the border:
      ``"clipped"``, no contour;
    * a contour along the border that covers less than ``min_border_coverage`` of
      the border stretch its layout polygon covers
      (:func:`segsem_cli.contours.border_coverage`, in ``extra["border_coverage"]``):
      only part of the cut shape was traced, ``"partial"``, no contour;
    * fewer than ``min_valid`` of the real-edge normals with a clean edge: ``"low_contrast"``.
    * an IoU with the layout polygon (below) under ``min_layout_iou``: the contour is
      not this feature (it traced the image frame, a neighbour, a charging patch),
      ``"not_found"``, no contour, with ``extra["reason"] = "layout_iou"``;
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
    vf, snr, rough = res.valid_fraction, res.median_snr, res.roughness_px
    ex.update(valid_fraction=vf, median_snr=snr, roughness_px=rough, substrate=res.substrate)
    if res.params.get("threshold_source", "given") != "given":  # threshold=auto: the t this image got
        ex.update(edge_threshold=float(res.params["threshold"]), edge_threshold_source=res.params["threshold_source"])
    c = res.contour_uv
    if res.clipped:
        ex.update(clipped=True, border_fraction=border_fraction(c, image_shape))
    if unmeasurable(res, image_shape, border_px=border_px, max_outside=max_outside):
        return FeatureResult(fid, None, source, 0.0, status="clipped", extra=ex)
    lay = getattr(feature, "pixels", None)
    if res.clipped and lay is not None and usable_polygon(lay):
        cov = border_coverage(c, lay, image_shape)
        if cov is not None:
            ex["border_coverage"] = cov
            if cov < min_border_coverage:
                return FeatureResult(fid, None, source, 0.0, status="partial", extra=ex)
    if vf < min_valid:
        return FeatureResult(fid, None, source, 0.0, status="low_contrast", extra=ex)
    if layout_iou is None and layout_px is not None:
        from .contours import polygon_iou

        layout_iou = polygon_iou(c, np.asarray(layout_px, dtype=np.float64))
    if layout_iou is not None:
        ex["layout_iou"] = float(layout_iou)
        if not float(layout_iou) >= min_layout_iou:
            return FeatureResult(fid, None, source, 0.0, status="not_found", extra={**ex, "reason": "layout_iou"})
        confidence_scale *= min(1.0, float(layout_iou) / 0.5)
    quality = res._quality(vf, snr, rough) if np.any(res.valid) else 0.0  # = res.quality
    conf = float(np.clip(quality * confidence_scale, 0.0, 1.0))
    return FeatureResult(fid, np.ascontiguousarray(c, dtype=np.float64), source, conf, status="ok", extra=ex)
