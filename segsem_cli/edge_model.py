"""Where the edge is on the flank, measured on the image itself (``threshold=auto``).

The threshold rule (:mod:`segsem_cli.edges`) puts an edge where its profile crosses
``min + t (peak - min)``. Which ``t`` is the physical edge depends on the imaging:
a rim-free blurred step crosses its mid level (``t = 0.5``) at the edge, but the
bright rim of the edge effect lifts the peak, and beam blur spreads it, so the
edge of a real print sits higher up the flank (``t`` = 0.66 on segsem's simulator,
0.92 on the second image model of ``benchmarks/bench_foreign.py``). ``segsem
calibrate`` fits ``t`` to labelled images; without labels, ``threshold=auto``
estimates it from the image:

1. a subset of the contours is refined once at ``t = 0.5`` (the rule's usual
   machinery: substrate side, outlier rejection, smoothing along the contour);
2. the signal is sampled along their normals, substrate to resist, at their
   kept edge points, and averaged into one mean edge profile (thousands of
   profiles: noise-free for practical purposes; the points' own jitter only
   widens it, like blur);
3. the mean profile is fitted with the physical model of an edge (:func:`edge_model`):
   substrate level up to the edge, the resist level plus a bright rim decaying
   exponentially into the resist after it, blurred by a Gaussian beam. Its
   parameters are the edge position ``e``, the blur, the rim's decay length
   and three levels (solved linearly at each step: variable projection);
4. ``t`` is the level of the fitted profile at ``e``, measured the way the rule
   measures it (its floor and rim levels over the same search window,
   :func:`threshold_at_edge`).

What the model covers, measured on noise-free 1-D profiles (error of the edge
in px at 1 / 1.5 / 2.5 px blur, ``t = 0.5`` against auto): a blurred step
-0.03 / -0.03 / -0.02 against -0.02 / -0.02 / -0.02; segsem's simulator (ramp
across the sidewall footprint, rim at its top) -0.31 / -0.51 / -1.03 against
+0.21 / +0.19 / +0.17; an edge rim that decays from the edge -0.27 / -0.47 /
-0.91 against -0.02; a symmetric gradient rim centred on the edge -1.14 / -1.70
/ -2.78 against -0.12 / -0.12 / -0.13; the second image model (brightest band ON
the sidewall, a shadow on the substrate) -1.16 / -1.50 / -2.17 against -0.87 /
-1.01 / -1.20. Where it is wrong: a thin bright line well inside the edge (a rim
1.5 px in from it) reads as starting at the edge, +0.93 px against -0.05 /
-0.40 / -1.10. The fit is reported per feature (``edge_threshold``) and falls
back to ``t = 0.5`` (``edge_threshold_source = default``) when it cannot be made.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

#: ``t`` used when the fit cannot be made, and for the subset refined to find the edges.
AUTO_START = 0.5
#: Contour points (at ``step_px`` spacing) refined for the estimate, longest contours first.
AUTO_POINTS = 3000
#: Fewest edge profiles the mean profile needs.
AUTO_MIN_PROFILES = 100
#: ``t`` is capped here: closer to the rim peak the flank is flat and the crossing unstable.
AUTO_T_MAX = 0.95
#: A fit whose RMS misfit exceeds this share of the profile's range is not used.
AUTO_MAX_MISFIT = 0.03
#: The mean profile spans the search window plus this much either side (px).
AUTO_MARGIN_PX = 4.0
#: Refinement passes of the subset: one (the refinement's default is two); on the ten hard
#: benchmark images two passes gave fitted t 0.62-0.72 against 0.61-0.69 with one, at twice the cost.
AUTO_PASSES = 1


def exgauss(x: np.ndarray, sigma: float, decay: float) -> np.ndarray:
    """``H(x) exp(-x / decay)`` blurred by a unit-area Gaussian of standard deviation ``sigma``.

    Written with the scaled complementary error function where the plain form
    would overflow (short decays), so it is exact for any ``decay > 0``.
    """
    from scipy.special import erfcx, ndtr

    x = np.asarray(x, dtype=np.float64)
    z = x / sigma
    w = (sigma / decay - z) / math.sqrt(2.0)
    out = np.empty_like(x)
    pos = w > 0
    out[pos] = 0.5 * np.exp(-0.5 * z[pos] ** 2) * erfcx(w[pos])
    xn = x[~pos]
    out[~pos] = np.exp(0.5 * (sigma / decay) ** 2 - xn / decay) * ndtr(xn / sigma - sigma / decay)
    return out


def edge_model(x: np.ndarray, edge: float, sigma: float, decay: float) -> np.ndarray:
    """The model's three basis profiles ``(len(x), 3)``: 1, the blurred step at ``edge``, the blurred rim.

    An edge profile (substrate ``x < edge``, resist after it) is
    ``S + A * step + E * rim``: substrate level ``S``, resist top ``S + A``, a rim of
    height ``E`` at the edge decaying over ``decay`` px into the resist, all blurred
    by a Gaussian of ``sigma`` px.
    """
    from scipy.special import ndtr

    x = np.asarray(x, dtype=np.float64)
    return np.column_stack([np.ones_like(x), ndtr((x - edge) / sigma), exgauss(x - edge, sigma, decay)])


@dataclass(frozen=True)
class EdgeProfileFit:
    """The fitted model of a mean edge profile (px; levels in the profile's units)."""

    edge: float
    sigma: float
    decay: float
    levels: tuple[float, float, float]  # S, A, E
    misfit: float  # RMS residual / profile range

    def curve(self, x: np.ndarray) -> np.ndarray:
        return edge_model(x, self.edge, self.sigma, self.decay) @ np.asarray(self.levels)


def fit_edge_profile(x: np.ndarray, p: np.ndarray) -> EdgeProfileFit | None:
    """Least-squares fit of :func:`edge_model` to the profile ``p`` sampled at ``x`` (px).

    A coarse grid over (edge, blur, decay) with the levels solved linearly at each
    node, then a bounded Gauss-Newton refinement (:func:`scipy.optimize.least_squares`).
    The resist step ``A`` and the rim ``E`` are kept non-negative (at each node the best of
    the full model, rim only and step only); None when the profile has no rise at all.
    """
    from scipy.optimize import least_squares

    x = np.asarray(x, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    rng_p = float(np.ptp(p))
    if not (np.all(np.isfinite(p)) and rng_p > 0):
        return None
    lo_e, hi_e = float(x[0]) * 0.75, float(x[-1]) * 0.75

    def solve(edge, sigma, decay):
        """Levels (S, A, E) with A, E >= 0 (the best of the full model, rim only and step only)."""
        b = edge_model(x, edge, sigma, decay)
        best = None
        gram, rhs = b.T @ b, b.T @ p
        for cols in ((0, 1, 2), (0, 2), (0, 1)):
            ix = np.ix_(cols, cols)
            try:
                c = np.linalg.solve(gram[ix] + 1e-12 * np.trace(gram) * np.eye(len(cols)), rhs[list(cols)])
            except np.linalg.LinAlgError:
                continue
            if np.any(c[1:] < 0):
                continue
            r = b[:, cols] @ c - p
            cost = float(r @ r)
            if best is None or cost < best[0]:
                full = np.zeros(3)
                full[list(cols)] = c
                best = (cost, full, r)
            if len(cols) == 3:
                break  # the unconstrained optimum is feasible
        if best is None:
            c0 = float(p.mean())
            return np.array([c0, 0.0, 0.0]), c0 - p
        return best[1], best[2]

    best = None
    for e0 in np.arange(-3.0, 3.01, 0.5):  # the profiles are centred on edges found at t = 0.5
        for s0 in (1.0, 2.0, 3.0):
            for d0 in (1.0, 4.0):
                r = solve(e0, s0, d0)[1]
                cost = float(r @ r)
                if best is None or cost < best[0]:
                    best = (cost, e0, s0, d0)
    _, e0, s0, d0 = best
    sol = least_squares(lambda th: solve(th[0], math.exp(th[1]), math.exp(th[2]))[1],
                        [e0, math.log(s0), math.log(d0)],
                        bounds=([lo_e, math.log(0.2), math.log(0.1)], [hi_e, math.log(10.0), math.log(50.0)]))
    e, s, d = float(sol.x[0]), math.exp(sol.x[1]), math.exp(sol.x[2])
    c, r = solve(e, s, d)
    if c[1] + c[2] <= 0:
        return None
    return EdgeProfileFit(e, s, d, (float(c[0]), float(c[1]), float(c[2])), float(np.sqrt(np.mean(r * r))) / rng_p)


def threshold_at_edge(f: EdgeProfileFit, *, search_px: float, sample_px: float) -> float:
    """The ``t`` at which the threshold rule, on the fitted (noise-free) profile centred on its
    edge, puts the edge exactly there: its floor and rim levels from the same search window."""
    from .edges import _locate

    k = int(round(search_px / sample_px))
    xs = np.arange(-k, k + 1) * sample_px
    q = f.curve(xs + f.edge)[None, :]
    ts = np.linspace(0.0, 1.0, 401)
    qq = np.repeat(q, len(ts), axis=0)
    x, found, *_ = _locate(qq, qq, edge="threshold", threshold=ts, centre_weight=0.0)
    ok = found & np.isfinite(x)
    if ok.sum() < 2:
        return float("nan")
    xi, ti = x[ok], ts[ok]
    order = np.argsort(xi, kind="stable")
    return float(np.interp(k, xi[order], ti[order]))


@dataclass
class EdgeThreshold:
    """The outcome of :func:`estimate_edge_threshold` (one per image)."""

    threshold: float
    source: str  # "auto" (fitted) or "default" (AUTO_START: the fit could not be made)
    message: str = ""
    profiles: int = 0
    fit: EdgeProfileFit | None = None


def mean_edge_profile(img, results: Sequence, *, half_px: float, sample_px: float,
                      normal_smooth: float = 1.5) -> tuple[np.ndarray, np.ndarray, int]:
    """The mean profile (substrate -> resist) over the kept edge points of refined contours.

    Points whose window would leave the image (or reach its ignored frame) are skipped.
    Returns ``(offsets_px, mean_profile, n_profiles)``.
    """
    from .edges import _contour_normals, _sample_along

    k = int(round(half_px / sample_px))
    offs = np.arange(-k, k + 1) * sample_px
    h, w = img.shape
    m = half_px + 1.0 + img.frame_px
    total = np.zeros(len(offs))
    n = 0
    for r in results:
        if r is None or not np.any(r.valid):
            continue
        c = r.contour_uv
        b = np.zeros(len(c), dtype=bool) if r.border is None else np.asarray(r.border, dtype=bool)
        keep = (np.asarray(r.valid, dtype=bool) & ~b & (c[:, 0] >= m) & (c[:, 0] <= w - m)
                & (c[:, 1] >= m) & (c[:, 1] <= h - m))
        if not keep.any():
            continue
        nrm = _contour_normals(c, b, normal_smooth)
        direction = -nrm[keep] if r.substrate == "outside" else nrm[keep]
        prof = _sample_along(img.sampled, c[keep], direction, offs)
        total += prof.sum(axis=0, dtype=np.float64)
        n += len(prof)
    return offs, (total / n if n else total), n


def estimate_edge_threshold(img, contours_uv: Sequence[np.ndarray], *, substrate: Sequence[str] | str = "auto",
                            search_px: float = 6.0, sample_px: float = 0.25, step_px: float = 1.0,
                            normal_smooth: float = 1.5, points: int | None = None,
                            **refine_kw: Any) -> EdgeThreshold:
    """``t`` of the threshold rule at the physical edge of this image (see the module docstring).

    ``img`` is an :class:`~segsem_cli.edges.EdgeImage`; ``contours_uv`` coarse contours
    of its features (the longest, up to ``points`` points, are used); ``refine_kw``
    further :func:`~segsem_cli.edges.refine_contours` options for the subset's refinement.
    """
    from .contours import perimeter
    from .edges import refine_contours

    points = AUTO_POINTS if points is None else int(points)
    subs = [substrate] * len(contours_uv) if isinstance(substrate, str) else list(substrate)
    lengths = [perimeter(c) if len(c) > 2 else 0.0 for c in contours_uv]
    order = np.argsort(lengths, kind="stable")[::-1]
    pick, acc = [], 0.0
    for i in order:
        if lengths[i] <= 0 or (pick and acc + lengths[i] / step_px > points):
            continue
        pick.append(int(i))
        acc += lengths[i] / step_px
    if not pick:
        return EdgeThreshold(AUTO_START, "default", "no contour to measure the edge profile on")
    refine_kw = {k: v for k, v in refine_kw.items() if k not in ("threshold", "passes", "repass_snr", "edge")}
    res = refine_contours(img, [contours_uv[i] for i in pick], edge="threshold", threshold=AUTO_START,
                          search_px=search_px, sample_px=sample_px, step_px=step_px, normal_smooth=normal_smooth,
                          substrate=[subs[i] for i in pick], passes=AUTO_PASSES, repass_snr=0.0, **refine_kw)
    offs, prof, n = mean_edge_profile(img, res, half_px=search_px + AUTO_MARGIN_PX, sample_px=sample_px,
                                      normal_smooth=normal_smooth)
    if n < AUTO_MIN_PROFILES:
        return EdgeThreshold(AUTO_START, "default", f"{n} edge profiles (fewer than {AUTO_MIN_PROFILES})", n)
    f = fit_edge_profile(offs, prof)
    if f is None:
        return EdgeThreshold(AUTO_START, "default", "the mean edge profile has no rise to fit", n)
    if f.misfit > AUTO_MAX_MISFIT:
        return EdgeThreshold(AUTO_START, "default", f"the edge model misfits the mean profile ({f.misfit:.3f})", n, f)
    t = threshold_at_edge(f, search_px=search_px, sample_px=sample_px)
    if not np.isfinite(t):
        return EdgeThreshold(AUTO_START, "default", "the threshold rule finds no edge on the fitted profile", n, f)
    return EdgeThreshold(float(min(max(t, 0.0), AUTO_T_MAX)), "auto", "", n, f)
