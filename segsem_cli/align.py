"""Alignment of a SEM image to the layout (stage error, optional tiny rotation).

Conventions are those of :mod:`segsem_cli.transform`: pixel ``(u, v)`` with
``u`` right and ``v`` down, pixel ``(r, c)`` covering ``[c, c+1) x [r, r+1)``;
layout ``(x, y)`` in nm with ``y`` up. This module maps between the two only
through :class:`~segsem_cli.transform.PixelTransform` (``to_pixel``,
``to_layout``, ``with_offset``).

Method (details and measurements in ``docs/alignment.md``)
----------------------------------------------------------
1. The design polygons are rendered with exact area coverage
   (:func:`render_layout`) on a canvas that is the image grown by the search
   range, with the nominal transform.
2. SEM appearance model: the image is ``a * region + c * rim + background``
   (:func:`sem_channels`): ``region`` is the blurred coverage (the sign of
   ``a`` is the polarity), ``rim`` the bright band along every edge (edge
   effect, ``c >= 0``), and a quadratic background absorbs charging.
3. Coarse search: normalised cross-correlation of the whole (detrended,
   smoothed) image with both channels for every whole-pixel shift within the
   search range (``cv2.matchTemplate``), combined as a multiple correlation.
   Near-equal peaks (periodic patterns) and, with unknown polarity, the
   line/space swap are detected; the candidate nearest the nominal position
   is kept and the result is flagged ``ambiguous``.
4. Fine stage: Gauss-Newton fit of the shift, a global edge bias (printed CD
   bias plus the rim's own offset, so that features cut by the image border
   do not bias the shift) and optionally a rotation, with the layout
   re-rendered exactly at every step. Pixels near design corners and line
   ends are down-weighted (they round and pull back when printed) and
   residual outliers (missing/bridged features) get Huber weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import cv2
import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon, box
from shapely.geometry.base import BaseGeometry

from .errors import SegsemError
from .transform import PixelTransform

__all__ = ["AlignResult", "render_layout", "sem_channels", "align_image"]


# --------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------


def _iter_polygons(geoms) -> Iterable[Polygon]:
    if isinstance(geoms, BaseGeometry):
        geoms = [geoms]
    for g in geoms:
        if g is None or g.is_empty:
            continue
        if isinstance(g, Polygon):
            yield g
        elif isinstance(g, MultiPolygon) or hasattr(g, "geoms"):
            yield from _iter_polygons(list(g.geoms))
        else:
            raise SegsemError(f"render_layout: expected shapely polygons, got {g.geom_type}")


def _rings(polys: Sequence[Polygon]) -> list[np.ndarray]:
    """Rings (closed, last vertex repeated) of oriented polygons: exteriors
    counter-clockwise in (u, v) maths orientation, holes the other way."""
    rings = []
    for p in polys:
        p = shapely.geometry.polygon.orient(p, sign=1.0)
        rings.append(np.asarray(p.exterior.coords, dtype=np.float64))
        for hole in p.interiors:
            rings.append(np.asarray(hole.coords, dtype=np.float64))
    return rings


def _exact_coverage(rings: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Exact area coverage by signed-area accumulation (as in font rasterisers).

    Every edge is cut at the integer grid lines into pieces that each lie in
    one pixel. A piece from ``(x0, y0)`` to ``(x1, y1)`` in pixel ``(r, c)``
    adds the signed area between itself and the right end of its row:
    ``dy * (c + 1 - xm)`` to pixel ``c`` and ``dy * (xm - c)`` to ``c + 1``
    (``xm`` the piece's mid x); a cumulative sum along each row then gives
    the exact covered area of every pixel. Vertical edges (most edges of a
    Manhattan layout) are cut row by row directly; only the other edges need
    their x and y crossings merged (one sort).
    """
    h, w = shape
    if not rings:
        return np.zeros(shape, dtype=np.float32)
    segs = np.concatenate([np.stack([r[:-1], r[1:]], axis=1) for r in rings if len(r) > 1])  # (E, 2, 2)
    p0 = segs[:, 0]
    p1 = segs[:, 1]
    keep = p0[:, 1] != p1[:, 1]  # horizontal edges add nothing
    p0, p1 = p0[keep], p1[keep]
    if len(p0) == 0:
        return np.zeros(shape, dtype=np.float32)
    d = p1 - p0
    vert = d[:, 0] == 0
    rows_l, xm_l, dy_l = [], [], []
    if np.any(vert):
        # one piece per pixel row, x fixed
        x = p0[vert, 0]
        ya, yb = p0[vert, 1], p1[vert, 1]
        sgn = np.sign(yb - ya)
        lo = np.minimum(ya, yb)
        hi = np.maximum(ya, yb)
        r0 = np.clip(np.floor(lo), 0, h).astype(np.int64)
        r1 = np.clip(np.ceil(hi), 0, h).astype(np.int64)  # exclusive
        n = np.maximum(r1 - r0, 0)
        eid = np.repeat(np.arange(len(x)), n)
        start = np.repeat(np.cumsum(n) - n, n)
        row = r0[eid] + (np.arange(int(n.sum())) - start)
        rowf = row.astype(np.float64)
        rows_l.append(row)
        xm_l.append(x[eid])
        dy_l.append(sgn[eid] * (np.minimum(hi[eid], rowf + 1.0) - np.maximum(lo[eid], rowf)))
    if not np.all(vert):
        q0, q1, dq = p0[~vert], p1[~vert], d[~vert]
        ne = len(q0)
        # parameters t at which each edge crosses an integer x or y
        ts = [np.zeros(ne), np.ones(ne)]
        ids = [np.arange(ne), np.arange(ne)]
        for k in (0, 1):
            lo = np.minimum(q0[:, k], q1[:, k])
            hi = np.maximum(q0[:, k], q1[:, k])
            first = np.floor(lo) + 1.0
            n = np.maximum(np.ceil(hi) - first, 0).astype(np.int64)  # integers strictly inside (lo, hi)
            if n.sum() == 0:
                continue
            eid = np.repeat(np.arange(ne), n)
            start = np.repeat(np.cumsum(n) - n, n)
            vals = first[eid] + (np.arange(int(n.sum())) - start)
            with np.errstate(divide="ignore", invalid="ignore"):
                t = (vals - q0[eid, k]) / dq[eid, k]
            ok = (t > 0) & (t < 1)
            ts.append(t[ok])
            ids.append(eid[ok])
        t = np.concatenate(ts)
        eid = np.concatenate(ids)
        order = np.argsort(eid * 2.0 + t, kind="stable")  # by edge, then along the edge
        t = t[order]
        eid = eid[order]
        same = eid[1:] == eid[:-1]
        ta, tb, e = t[:-1][same], t[1:][same], eid[:-1][same]
        xa = q0[e, 0] + ta * dq[e, 0]
        ya = q0[e, 1] + ta * dq[e, 1]
        xb = q0[e, 0] + tb * dq[e, 0]
        yb = q0[e, 1] + tb * dq[e, 1]
        rows_l.append(np.floor(0.5 * (ya + yb)).astype(np.int64))
        xm_l.append(0.5 * (xa + xb))
        dy_l.append(yb - ya)
    row = np.concatenate(rows_l)
    xm = np.concatenate(xm_l)
    dy = np.concatenate(dy_l)
    col = np.floor(xm).astype(np.int64)
    ok = (dy != 0) & (row >= 0) & (row < h) & (col < w + 1)
    row, col, xm, dy = row[ok], col[ok], xm[ok], dy[ok]
    left = col < 0  # pieces left of the canvas cover the whole row strip
    a_next = np.where(left, 0.0, dy * (xm - col))
    col = np.maximum(col, 0)
    base = row * (w + 2) + col
    acc = np.bincount(np.concatenate([base, base + 1]), weights=np.concatenate([dy - a_next, a_next]),
                      minlength=h * (w + 2)).reshape(h, w + 2)
    np.cumsum(acc, axis=1, out=acc)
    # Exteriors are counter-clockwise in (u, v) maths orientation; with v down
    # the accumulated area has the opposite sign.
    cov = (-acc[:, :w]).astype(np.float32)
    return np.clip(cov, 0.0, 1.0, out=cov)


def render_layout(polygons_px, shape, *, supersample: int | None = None) -> np.ndarray:
    """Render polygons as area coverage in pixel space.

    Parameters
    ----------
    polygons_px : shapely Polygon / MultiPolygon or a sequence of them
        Geometry in continuous pixel coordinates ``(u, v)`` (``u`` right,
        ``v`` down); pixel ``(r, c)`` covers ``[c, c+1) x [r, r+1)``. Holes are
        honoured; overlapping polygons are merged (union).
    shape : (int, int)
        Output shape ``(H, W)``.
    supersample : int or None, optional
        ``None`` (default): exact analytic area coverage (edge pieces are
        integrated per pixel, error at floating-point level). An integer ``n``
        instead fills the polygons on an ``n``-times finer grid with
        ``cv2.fillPoly`` and takes block means (coverage quantised to
        ``1/n^2``; kept for comparison).

    Returns
    -------
    numpy.ndarray
        ``float32`` array of shape ``(H, W)`` with values in ``[0, 1]``: the
        fraction of each pixel's area inside the polygons.
    """
    try:
        h, w = (int(shape[0]), int(shape[1]))
    except (TypeError, ValueError, IndexError):
        raise SegsemError(f"render_layout: shape must be (H, W), got {shape!r}") from None
    if h <= 0 or w <= 0:
        raise SegsemError(f"render_layout: shape must be positive, got {shape!r}")
    polys = list(_iter_polygons(polygons_px))
    if not polys:
        return np.zeros((h, w), dtype=np.float32)
    # Clip to the canvas (with a margin) and merge overlaps.
    canvas = box(-1.0, -1.0, w + 1.0, h + 1.0)
    merged = shapely.union_all([p.buffer(0) if not p.is_valid else p for p in polys]).intersection(canvas)
    polys = list(_iter_polygons(merged))
    if supersample is None:
        return _exact_coverage(_rings(polys), (h, w))
    n = int(supersample)
    if n < 1:
        raise SegsemError(f"render_layout: supersample must be >= 1 or None, got {supersample!r}")
    shift = 8
    big = np.zeros((h * n, w * n), dtype=np.uint8)
    # fillPoly fills the fine pixels whose centre (integer point in its frame)
    # is inside, i.e. fine pixel k covers [k - 0.5, k + 0.5): move by +0.5 fine pixel.
    # fillPoly also fills the boundary pixels (it fills k in [round(x0), round(x1)]),
    # so erode by half a fine pixel first to get the centre-sampling rule.
    eroded = list(_iter_polygons([p.buffer(-0.5 / n, join_style="mitre") for p in polys]))
    rings = [np.asarray(r)[:-1] for r in _rings(eroded)]
    pts = [np.round((r * n - 0.5) * (1 << shift)).astype(np.int32).reshape(-1, 1, 2) for r in rings]
    cv2.fillPoly(big, pts, 1, lineType=cv2.LINE_8, shift=shift)  # even-odd over all rings: holes stay empty
    return big.reshape(h, n, w, n).mean(axis=(1, 3), dtype=np.float32)


# --------------------------------------------------------------------------
# SEM appearance model
# --------------------------------------------------------------------------


def _detrend(img: np.ndarray, degree: int = 2) -> np.ndarray:
    """Subtract a least-squares polynomial surface (charging gradients)."""
    h, w = img.shape
    step = max(1, int(math.sqrt(h * w / 65536.0)))
    coef = np.linalg.lstsq(_poly_basis((h, w), degree, step), img[::step, ::step].astype(np.float64).ravel(),
                           rcond=None)[0]
    return (img - (_poly_basis((h, w), degree) @ coef).reshape(h, w)).astype(np.float32)


def _poly_basis(shape, degree: int = 2, step: int = 1) -> np.ndarray:
    """Columns ``1, u, v, u^2, uv, v^2, ...`` (normalised coordinates) on a grid."""
    h, w = shape
    vv, uu = np.mgrid[0:h:step, 0:w:step].astype(np.float64)
    u = (uu.ravel() - w / 2.0) / w
    v = (vv.ravel() - h / 2.0) / h
    cols = [np.ones_like(u)]
    for d in range(1, degree + 1):
        for k in range(d + 1):
            cols.append(u ** (d - k) * v ** k)
    return np.stack(cols, axis=1)


def sem_channels(coverage: np.ndarray, sigma_px: float) -> tuple[np.ndarray, np.ndarray]:
    """The two layout channels the SEM image is modelled with.

    A SEM image of printed features is modelled as
    ``a * region + c * rim + background``: ``region`` is the coverage blurred
    by the imaging resolution (its sign ``a`` is the polarity: polygons
    brighter or darker than their surroundings) and ``rim`` the bright band
    along every edge (edge effect, ``c >= 0``).

    Parameters
    ----------
    coverage : 2-D float array (row, column), area coverage in [0, 1]
        (see :func:`render_layout`).
    sigma_px : Gaussian blur (imaging resolution), pixels, > 0.

    Returns
    -------
    (region, rim) : two ``float32`` arrays of the coverage's shape.
        ``region = G_sigma * coverage``; ``rim = |grad region|`` scaled so a
        straight edge peaks at 1.
    """
    cov = np.asarray(coverage, dtype=np.float32)
    if cov.ndim != 2:
        raise SegsemError(f"sem_channels: expected a 2-D coverage array, got shape {cov.shape}")
    if not sigma_px > 0:
        raise SegsemError(f"sem_channels: sigma_px must be > 0, got {sigma_px!r}")
    region = cv2.GaussianBlur(cov, (0, 0), float(sigma_px), borderType=cv2.BORDER_REFLECT)
    gu, gv = _gradients(region)
    rim = cv2.magnitude(gu, gv) * np.float32(sigma_px * math.sqrt(2.0 * math.pi))
    return region, rim


def _gradients(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Central-difference derivatives along u (columns) and v (rows)."""
    gu = cv2.Sobel(img, cv2.CV_32F, 1, 0, ksize=1, scale=0.5, borderType=cv2.BORDER_REFLECT)
    gv = cv2.Sobel(img, cv2.CV_32F, 0, 1, ksize=1, scale=0.5, borderType=cv2.BORDER_REFLECT)
    return gu, gv


# --------------------------------------------------------------------------
# Alignment
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class AlignResult:
    """Outcome of :func:`align_image`.

    Attributes
    ----------
    transform : the refined :class:`PixelTransform` (the nominal one when
        ``status == "failed"``).
    offset_nm : ``(dx, dy)`` true centre minus nominal centre, layout axes
        (``y`` up), nm.
    offset_px : ``(du, dv)`` displacement of the image content relative to
        where the nominal transform puts it, pixel axes (``v`` down). Content
        moved right/down by ``(du, dv)`` means the true centre lies at smaller
        ``x`` and larger ``y`` than nominal: ``dx = -du * p``, ``dy = +dv * p``
        for pixel size ``p`` (no rotation).
    score : match quality in ``[0, 1]``: correlation between the image (less
        its fitted background) and the fitted layout model.
    residual_px : estimated 1-sigma uncertainty of the offset (pixels, both
        axes together) from the fit's covariance and residual noise.
    ambiguous : True when another candidate (one pitch away in a periodic
        array, or lines and spaces swapped) matches nearly as well; the
        candidate nearest the nominal position is returned.
    status : ``"ok"``, ``"ambiguous"`` or ``"failed"``.
    message : one line explaining the status.
    rotation_rad : the fitted rotation (the nominal one unless
        ``rotation=True``).
    candidates_px : the near-equal candidate content shifts ``(du, dv)``
        (whole pixels), best first; empty unless ambiguous.
    polarity : ``"bright"`` or ``"dark"``: tone of the polygons found.
    edge_bias_px : fitted outward offset (pixels) of the image edges from the
        design edges: printed CD bias plus the SEM edge signature's own
        offset. A nuisance parameter, not a CD measurement.
    """

    transform: PixelTransform
    offset_nm: tuple[float, float]
    offset_px: tuple[float, float]
    score: float
    residual_px: float
    ambiguous: bool
    status: str
    message: str
    rotation_rad: float = 0.0
    candidates_px: tuple[tuple[float, float], ...] = field(default_factory=tuple)
    polarity: str = ""
    edge_bias_px: float = 0.0


def _fail(transform: PixelTransform, message: str, score: float = 0.0) -> AlignResult:
    return AlignResult(
        transform=transform, offset_nm=(0.0, 0.0), offset_px=(0.0, 0.0), score=float(score),
        residual_px=float("nan"), ambiguous=False, status="failed", message=message,
        rotation_rad=transform.rotation_rad,
    )


def _polys_to_px(polys_nm: Sequence[Polygon], transform: PixelTransform, origin: tuple[float, float]):
    """Map layout polygons to pixel space with ``transform``, then shift by ``-origin``."""
    out = []
    ou, ov = origin
    for p in polys_nm:
        ext = transform.to_pixel(np.asarray(p.exterior.coords)[:, :2]) - (ou, ov)
        holes = [transform.to_pixel(np.asarray(r.coords)[:, :2]) - (ou, ov) for r in p.interiors]
        out.append(Polygon(ext, holes))
    return out


def _content_shift_to_offset(t: PixelTransform, d_uv) -> tuple[float, float]:
    """Offset (nm) of a transform under which the layout content appears moved by
    ``d_uv`` pixels relative to where ``t`` puts it (same rotation)."""
    h, w = t.shape
    c = np.array([w / 2.0, h / 2.0])
    a = t.to_layout(c)
    b = t.to_layout(c + np.asarray(d_uv, dtype=np.float64))
    return (t.offset_nm[0] + float(a[0] - b[0]), t.offset_nm[1] + float(a[1] - b[1]))


def _content_shift(t0: PixelTransform, t1: PixelTransform) -> np.ndarray:
    """Displacement (pixels) of the layout content at the image centre from ``t0`` to ``t1``."""
    h, w = t0.shape
    c = np.array([w / 2.0, h / 2.0])
    return t1.to_pixel(t0.to_layout(c)) - c


def _peak_candidates(score: np.ndarray, m: int, search_px: float, tol: float, min_sep: float):
    """Candidate integer shifts from a coarse score map (index (m, m) = zero shift).

    Returns ``((su, sv), best, candidates, ridge)``: the chosen shift (the
    candidate nearest zero), the best score, all candidates ``(su, sv, score)``
    scoring at least ``best - tol * best`` (best first), and whether one of
    them is an elongated plateau (pattern invariant along a direction).
    """
    from scipy import ndimage

    n0, n1 = score.shape
    sv, su = np.mgrid[0:n0, 0:n1] - m
    inside = (np.abs(su) <= search_px) & (np.abs(sv) <= search_px)
    s = np.where(inside, score, -np.inf)
    best = float(s.max())
    high = s >= best - tol * max(abs(best), 1e-6)
    lab, nlab = ndimage.label(high)
    cands = []
    ridge = False
    for k in range(1, nlab + 1):
        sel = lab == k
        vals = np.where(sel, s, -np.inf)
        i = np.unravel_index(np.argmax(vals), vals.shape)
        pu, pv = su[i], sv[i]
        r2 = float(pu * pu + pv * pv)
        if np.hypot(su[sel] - pu, sv[sel] - pv).max() >= min_sep:
            # an elongated plateau (pattern nearly invariant along a direction):
            # located at its maximum, ranked by its point nearest zero shift
            ridge = True
            r2 = float(np.min(su[sel] ** 2 + sv[sel] ** 2))
        cands.append((float(pu), float(pv), float(vals[i]), r2))
    cands.sort(key=lambda c: -c[2])
    chosen = min(cands, key=lambda c: (c[3], -c[2]))
    return (chosen[0], chosen[1]), best, [c[:3] for c in cands], ridge


def _subpixel_parabola(score: np.ndarray, i: int, j: int) -> tuple[float, float]:
    def f(a, b, c):
        den = a - 2 * b + c
        return 0.0 if not den < 0 else float(np.clip(0.5 * (a - c) / den, -0.5, 0.5))
    n0, n1 = score.shape
    if 0 < i < n0 - 1 and 0 < j < n1 - 1 and np.all(np.isfinite(score[i - 1 : i + 2, j - 1 : j + 2])):
        return f(score[i, j - 1], score[i, j], score[i, j + 1]), f(score[i - 1, j], score[i, j], score[i + 1, j])
    return 0.0, 0.0


def _coarse_scores(r1: np.ndarray, r2: np.ndarray, r12: float, tone: float) -> np.ndarray:
    """Multiple correlation of the image with (region, rim) per shift, with the
    sign of the region coefficient fixed by ``tone`` and the rim one >= 0."""
    det = max(1.0 - r12 * r12, 1e-6)
    b1 = (r1 - r12 * r2) / det
    b2 = (r2 - r12 * r1) / det
    both = np.maximum(b1 * r1 + b2 * r2, 0.0)
    valid = (tone * b1 >= 0) & (b2 >= 0)
    alt1 = np.where(tone * r1 > 0, r1 * r1, 0.0)
    alt2 = np.where(r2 > 0, r2 * r2, 0.0)
    return np.sqrt(np.where(valid, both, np.maximum(alt1, alt2)))


def _model_channels(polys, t: PixelTransform, edge_bias: float, sigma_px: float, pad: int):
    """(region, rim) channels of the layout mapped with ``t``, grown by ``edge_bias`` px."""
    h, w = t.shape
    lp = _polys_to_px(polys, t, (-pad, -pad))
    if edge_bias != 0.0:
        lp = [p.buffer(edge_bias, join_style="mitre", mitre_limit=4.0) for p in lp]
    region, rim = sem_channels(render_layout(lp, (h + 2 * pad, w + 2 * pad)), sigma_px)
    return region[pad : pad + h, pad : pad + w], rim[pad : pad + h, pad : pad + w]


def _corner_weights(polys, t: PixelTransform, radius_px: float, weight: float, min_turn_deg: float = 30.0):
    """Weight map: ``weight`` within ``radius_px`` of a polygon corner (turning by more
    than ``min_turn_deg``), 1 elsewhere. Corners round and line ends pull back
    when printed, by amounts that are not symmetric within the field of view."""
    h, w = t.shape
    out = np.ones((h, w), dtype=np.float32)
    cos_min = math.cos(math.radians(min_turn_deg))
    r = int(round(radius_px))
    for p in _polys_to_px(polys, t, (0.0, 0.0)):
        for ring in [p.exterior, *p.interiors]:
            xy = np.asarray(ring.coords)[:-1]
            if len(xy) < 3:
                continue
            d_in = xy - np.roll(xy, 1, axis=0)
            d_out = np.roll(xy, -1, axis=0) - xy
            n_in = np.linalg.norm(d_in, axis=1)
            n_out = np.linalg.norm(d_out, axis=1)
            ok = (n_in > 1e-9) & (n_out > 1e-9)
            cosang = np.einsum("ij,ij->i", d_in, d_out) / np.maximum(n_in * n_out, 1e-18)
            for (u, v) in xy[ok & (cosang < cos_min)]:
                if -r <= u <= w + r and -r <= v <= h + r:
                    cv2.circle(out, (int(round(u - 0.5)), int(round(v - 0.5))), r, float(weight), -1)
    return out


def _refine(img_s, t_nom: PixelTransform, t: PixelTransform, polys, *, sigma_px: float, smooth_px: float,
            border: int, rotation: bool, max_iter: int, robust: bool = True,
            corner_px: float = 10.0, corner_weight: float = 0.1, weak_px: float = 1.0):
    """Gauss-Newton fit of ``img_s ~ a * region + c * rim + quadratic background``.

    Non-linear unknowns: content shift ``(du, dv)``, edge bias (px) and,
    optionally, rotation; the linear ones are re-solved at every step. With
    ``robust``, pixels the model cannot explain (line-end pullback, missing
    or bridged features, particles) are down-weighted (Huber weights on the
    residual, iteratively re-weighted). Returns a dict with the refined
    transform, edge bias, 1-sigma shift uncertainty, weak-direction flag,
    coefficients and score, or None when the fit breaks down.
    """
    h, w = img_s.shape
    pad = border + 2
    sl = (slice(border, h - border), slice(border, w - border))
    theta = t.rotation_rad
    eb = 0.0
    weak = False
    strong = None
    # Pixels used: all those near a layout edge (where the shift is measured), and
    # every 4th row/column elsewhere with weight 16 (background and grey levels).
    reg, rim = _model_channels(polys, t, eb, sigma_px, pad)
    near = cv2.dilate((rim > 1e-3).astype(np.uint8), np.ones((7, 7), np.uint8))[sl]
    sparse = np.zeros_like(near)
    sparse[::4, ::4] = 1
    keep = (near > 0) | (sparse > 0)
    idx = np.flatnonzero(keep.ravel())
    samp_w = np.where(near.ravel()[idx] > 0, 1.0, 16.0)
    if corner_weight < 1.0 and corner_px > 0:
        samp_w = samp_w * _corner_weights(polys, t, corner_px, corner_weight)[sl].ravel()[idx]

    def take(a2d):
        return a2d[sl].ravel()[idx]

    y = take(img_s).astype(np.float64)
    n = y.size
    n_lin = 8
    n_geo = 4 if rotation else 3
    A = np.empty((n, n_lin + n_geo), dtype=np.float64)
    A[:, 2:n_lin] = _poly_basis((h, w), 2).reshape(h, w, 6)[sl].reshape(-1, 6)[idx]
    wts = samp_w.copy()
    vv, uu = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    # smoothing the image correlates the residuals over about 4 pi smooth^2 pixels
    corr_area = max(1.0, 4.0 * math.pi * smooth_px ** 2)

    def solve_lin():
        L = A[:, :n_lin]
        Lw = L * wts[:, None]
        return np.linalg.solve(Lw.T @ L + 1e-12 * np.eye(n_lin), Lw.T @ y)

    for it in range(max_iter):
        t = t.with_offset(t.offset_nm, theta)
        if it > 0:
            reg, rim = _model_channels(polys, t, eb, sigma_px, pad)
        A[:, 0] = take(reg)
        A[:, 1] = take(rim)
        try:
            coef = solve_lin()
        except np.linalg.LinAlgError:
            return None
        r_lin = y - A[:, :n_lin] @ coef
        if robust:
            # Huber weights, scale from the median absolute residual
            scale = 1.4826 * float(np.median(np.abs(r_lin))) + 1e-12
            k = 2.0 * scale
            ar = np.abs(r_lin)
            wts = samp_w * np.where(ar <= k, 1.0, k / np.maximum(ar, 1e-30))
            coef = solve_lin()
            r_lin = y - A[:, :n_lin] @ coef
        a, c = float(coef[0]), float(coef[1])
        model = a * reg + c * rim
        gu, gv = _gradients(model)
        A[:, n_lin] = -take(gu)
        A[:, n_lin + 1] = -take(gv)
        # growing the polygons by db moves every edge outwards along n = -grad(region)/|grad(region)|
        ru, rv = _gradients(reg)
        mag = np.maximum(cv2.magnitude(ru, rv), 1e-6)
        A[:, n_lin + 2] = take((gu * ru + gv * rv) / mag)
        if rotation:
            # content displacement per radian, obtained through the transform itself
            eps = 1e-4
            t2 = t.with_offset(t.offset_nm, theta + eps)
            pts = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]) + (w / 2.0, h / 2.0)
            disp = (t2.to_pixel(t.to_layout(pts)) - pts) / eps
            du_ = disp[0, 0] + (disp[1, 0] - disp[0, 0]) * (uu - pts[0, 0]) + (disp[2, 0] - disp[0, 0]) * (vv - pts[0, 1])
            dv_ = disp[0, 1] + (disp[1, 1] - disp[0, 1]) * (uu - pts[0, 0]) + (disp[2, 1] - disp[0, 1]) * (vv - pts[0, 1])
            A[:, n_lin + 3] = take(-(gu * du_ + gv * dv_))
        Aw = A * wts[:, None]
        ata = Aw.T @ A
        atb = Aw.T @ y
        wsum = float(wts.sum())
        s2_lin = float((wts * r_lin) @ r_lin) / max(wsum - n_lin, 1.0) * corr_area
        # a direction along which the pattern is (nearly) invariant (long lines) is left
        # alone: its 1-sigma uncertainty from the shift block alone exceeds weak_px
        hs = ata[n_lin : n_lin + 2, n_lin : n_lin + 2]
        evals, evecs = np.linalg.eigh(hs)
        weak = bool(evals[0] <= 1e-9 * max(evals[1], 1e-30) or s2_lin / max(evals[0], 1e-300) > weak_px ** 2)
        if weak:
            strong = evecs[:, 1]
            P = np.delete(np.eye(A.shape[1]), n_lin + 1, axis=1)
            P[n_lin : n_lin + 2, n_lin] = strong
            try:
                sol = P @ np.linalg.solve(P.T @ ata @ P, P.T @ atb)
            except np.linalg.LinAlgError:
                return None
        else:
            try:
                sol = np.linalg.solve(ata, atb)
            except np.linalg.LinAlgError:
                return None
        step = np.clip(sol[n_lin : n_lin + 2], -2.0, 2.0)
        deb = float(np.clip(sol[n_lin + 2], -1.0, 1.0))
        dth = float(np.clip(sol[n_lin + 3], -0.01, 0.01)) if rotation else 0.0
        t = t.with_offset(_content_shift_to_offset(t, step))
        eb += deb
        theta += dth
        if math.hypot(*step) < 2e-3 and abs(deb) < 1e-2 and abs(dth) * max(h, w) < 2e-3:
            break
    t = t.with_offset(t.offset_nm, theta)
    if weak:
        # keep the nominal position along the invariant direction
        d = _content_shift(t_nom, t)
        t_rot = t_nom.with_offset(t_nom.offset_nm, theta)
        t = t_rot.with_offset(_content_shift_to_offset(t_rot, strong * float(strong @ d)), theta)
    # final model, residual noise and score
    reg, rim = _model_channels(polys, t, eb, sigma_px, pad)
    A[:, 0] = take(reg)
    A[:, 1] = take(rim)
    coef = solve_lin()
    fg = A[:, :2] @ coef[:2]
    sig = y - A[:, 2:n_lin] @ coef[2:]
    resid = sig - fg
    fg_c, sig_c = fg - fg.mean(), sig - sig.mean()
    den = math.sqrt(float(fg_c @ fg_c) * float(sig_c @ sig_c))
    score = float(np.clip((fg_c @ sig_c) / den, 0.0, 1.0)) if den > 0 else 0.0
    s2 = float((wts * resid) @ resid) / max(float(wts.sum()) - A.shape[1], 1.0)
    cinv = np.linalg.pinv(ata)
    var = cinv[n_lin : n_lin + 2, n_lin : n_lin + 2] * s2 * corr_area
    if weak:
        var = np.outer(strong, strong) * float(strong @ var @ strong)
    sigma_formal = math.sqrt(max(float(np.trace(var)), 0.0))
    sigma_jack = _jackknife_sigma(A, wts, resid, idx, (h - 2 * border, w - 2 * border), n_lin,
                                  strong if weak else None)
    return {
        "t": t, "edge_bias": eb, "sigma": float(max(sigma_formal, sigma_jack)), "weak": weak,
        "a": float(coef[0]), "c": float(coef[1]), "score": score,
    }


def _jackknife_sigma(A, wts, resid, idx, shape, n_lin: int, strong, k: int = 4) -> float:
    """Delete-one-block jackknife of the shift over a ``k x k`` grid of image blocks.

    Captures spatially correlated misfit (edge roughness, local print
    variations) that the formal covariance (white noise) misses. Returns the
    1-sigma uncertainty of the shift (pixels, both axes together).
    """
    hh, ww = shape
    block = (idx // ww) * k // hh * k + (idx % ww) * k // ww
    Aw = A * wts[:, None]
    ata = Aw.T @ A
    atr = Aw.T @ resid
    P = np.eye(A.shape[1])
    if strong is not None:
        P = np.delete(P, n_lin + 1, axis=1)
        P[n_lin : n_lin + 2, n_lin] = strong
    est = []
    for b in range(k * k):
        sel = block == b
        if not np.any(sel):
            continue
        m_b = ata - Aw[sel].T @ A[sel]
        g_b = atr - Aw[sel].T @ resid[sel]
        try:
            sol = P @ np.linalg.solve(P.T @ m_b @ P, P.T @ g_b)
        except np.linalg.LinAlgError:
            continue
        est.append(sol[n_lin : n_lin + 2])
    if len(est) < 2:
        return float("nan")
    est = np.asarray(est)
    nb = len(est)
    var = (nb - 1) / nb * float(np.sum((est - est.mean(axis=0)) ** 2))
    return math.sqrt(var)


def align_image(
    pixels,
    transform: PixelTransform,
    polygons_nm,
    *,
    search_px: float = 40.0,
    refine: bool = True,
    rotation: bool = False,
    polarity: str = "auto",
    sigma_px: float = 2.0,
    smooth_px: float = 1.0,
    ambiguity_tol: float = 0.03,
    tone_tol: float = 0.25,
    min_score: float = 0.2,
    min_significance: float = 8.0,
    max_iter: int = 15,
    robust: bool = True,
    corner_px: float | None = None,
    corner_weight: float = 0.1,
) -> AlignResult:
    """Align a SEM image to the layout: find the stage error (and a tiny rotation).

    The image is modelled as ``a * region + c * rim + background`` where
    ``region`` and ``rim`` are rendered from the layout (see
    :func:`sem_channels`), ``a`` carries the polarity, ``c >= 0`` the bright
    edge rims, and a quadratic background absorbs charging. A coarse search
    over every whole-pixel shift within ``search_px`` (normalised
    cross-correlation of the whole image) is followed by a Gauss-Newton
    refinement of the shift, a global edge bias (printed CD bias, so that
    features cut by the image border do not bias the shift) and, optionally,
    a rotation, with the layout re-rendered exactly at each step.

    Parameters
    ----------
    pixels : 2-D array (row, column)
        The raw SEM grey levels (any range, either polarity).
    transform : PixelTransform
        Nominal transform of the image (its ``shape`` must equal
        ``pixels.shape``). Its offset/rotation, if any, is the starting point.
    polygons_nm : shapely Polygon(s)
        Design polygons in layout nm (``y`` up) near the field of view: pass
        those intersecting ``transform.field_of_view_nm(margin_px=search_px)``.
    search_px : float
        Largest stage error searched, pixels, per axis (``|du|, |dv| <= search_px``).
    refine : bool
        Sub-pixel refinement (else whole-pixel peak plus a parabola fit).
    rotation : bool
        Also fit a small rotation about the image centre (refinement only;
        up to a few tenths of a degree).
    polarity : {"auto", "bright", "dark"}
        Tone of the polygons in the image: ``"bright"`` when polygon
        interiors are brighter than their surroundings (e.g. resist lines),
        ``"dark"`` when darker (e.g. contact holes in bright resist),
        ``"auto"`` to decide from the match. Lines and spaces of a line/space
        array can swap roles when the tone is unknown: ``"auto"`` flags such a
        clip ambiguous; passing the polarity resolves it.
    sigma_px : float
        Blur of the layout model (imaging resolution plus smoothing), pixels.
    smooth_px : float
        Gaussian smoothing of the image against noise, pixels.
    ambiguity_tol : float
        Candidates whose coarse score is within this fraction of the best are
        "nearly as good" (periodic ambiguity).
    tone_tol : float
        With ``polarity="auto"``, the other tone's best coarse score within
        this fraction of the best flags a tone (line/space) ambiguity.
    min_score : float
        Below this score the alignment fails.
    min_significance : float
        The coarse correlation peak must exceed this many standard deviations
        of the correlation expected from noise alone.
    max_iter : int
        Gauss-Newton iterations at most.
    robust : bool
        Down-weight pixels the layout model cannot explain (line-end
        pullback, missing or bridged features, particles): Huber weights,
        iteratively re-weighted.
    corner_px, corner_weight : float
        Pixels within ``corner_px`` (default ``3 * sigma_px + 4``) of a design
        corner get weight ``corner_weight`` in the refinement: printed corners
        round and line ends pull back, and when such features sit on one side
        of the view only they would bias the offset. They still count where
        nothing else constrains a direction. ``corner_weight=1`` disables.

    Returns
    -------
    AlignResult
        ``status == "failed"`` (nominal transform, zero offset, a message) for
        a blank image, no layout edges in view, or a weak/insignificant match;
        ``"ambiguous"`` when a periodic pattern leaves near-equal candidates
        (the one nearest nominal is returned).

    Notes
    -----
    Sign convention: if the image content appears ``(du, dv)`` pixels
    right/down of where the nominal transform puts it, the true centre is at
    ``(Xc - du * p, Yc + dv * p)`` (no rotation, pixel size ``p``), i.e.
    ``offset_nm = (-du * p, +dv * p)``. Offsets are computed through
    ``transform.to_layout``/``to_pixel``, never re-derived.
    """
    img = np.asarray(pixels)
    if img.ndim != 2:
        raise SegsemError(f"align_image: pixels must be a 2-D array, got shape {img.shape}")
    if not isinstance(transform, PixelTransform):
        raise SegsemError(f"align_image: transform must be a PixelTransform, got {type(transform).__name__}")
    if tuple(transform.shape) != img.shape:
        raise SegsemError(f"align_image: transform.shape {tuple(transform.shape)} != pixels shape {img.shape}")
    if polarity not in ("auto", "bright", "dark"):
        raise SegsemError(f"align_image: polarity must be 'auto', 'bright' or 'dark', got {polarity!r}")
    if not (search_px >= 0 and math.isfinite(search_px)):
        raise SegsemError(f"align_image: search_px must be a finite number >= 0, got {search_px!r}")
    if not (sigma_px > 0 and smooth_px >= 0):
        raise SegsemError(f"align_image: sigma_px must be > 0 and smooth_px >= 0, got {sigma_px!r}, {smooth_px!r}")
    h, w = img.shape
    bd = int(math.ceil(3.0 * sigma_px)) + 1
    if min(h, w) < 4 * bd + 8:
        raise SegsemError(f"align_image: image too small ({h}x{w}) for sigma_px={sigma_px}")
    img = img.astype(np.float32)
    if not np.all(np.isfinite(img)):
        return _fail(transform, "image has NaN/inf pixels")
    polys = list(_iter_polygons(polygons_nm)) if polygons_nm is not None else []
    if not float(np.percentile(img, 99.5) - np.percentile(img, 0.5)) > 0:
        return _fail(transform, "image is blank (no grey-level contrast)")
    img_s = _detrend(img)
    if smooth_px > 0:
        img_s = cv2.GaussianBlur(img_s, (0, 0), float(smooth_px), borderType=cv2.BORDER_REFLECT)

    # ---- coarse: correlation of the whole image with the layout channels, every whole-pixel shift
    m = int(math.ceil(search_px)) + 1
    pad = m + bd + 2
    canvas = (h + 2 * pad, w + 2 * pad)
    cov_big = render_layout(_polys_to_px(polys, transform, (-pad, -pad)), canvas)
    core = (slice(pad - m + bd, pad + h + m - bd), slice(pad - m + bd, pad + w + m - bd))
    reg_big, rim_big = sem_channels(cov_big, sigma_px)
    reg_l, rim_l = np.ascontiguousarray(reg_big[core]), np.ascontiguousarray(rim_big[core])
    if not polys or float(rim_l.max()) <= 1e-3:
        return _fail(transform, "no layout edges within the field of view (+ search range)")
    inner = (slice(bd, h - bd), slice(bd, w - bd))
    tmpl = np.ascontiguousarray(img_s[inner])
    if not float(tmpl.std()) > 0:
        return _fail(transform, "image is blank (no contrast)")
    # matchTemplate index (i, j) = (m + sv, m + su): image pixel (u, v) shows the layout
    # content of nominal pixel (u + su, v + sv): the content appears moved by (-su, -sv).
    r1 = np.nan_to_num(cv2.matchTemplate(reg_l, tmpl, cv2.TM_CCOEFF_NORMED), nan=0.0)
    r2 = np.nan_to_num(cv2.matchTemplate(rim_l, tmpl, cv2.TM_CCOEFF_NORMED), nan=0.0)
    a0 = reg_l[m : m + tmpl.shape[0], m : m + tmpl.shape[1]].ravel()
    b0 = rim_l[m : m + tmpl.shape[0], m : m + tmpl.shape[1]].ravel()
    r12 = float(np.corrcoef(a0, b0)[0, 1]) if a0.std() > 0 and b0.std() > 0 else 0.0
    min_sep = max(3.0, 2.0 * sigma_px)
    tones = []
    for tone in {"bright": (1.0,), "dark": (-1.0,), "auto": (1.0, -1.0)}[polarity]:
        sc = _coarse_scores(r1, r2, r12, tone)
        tones.append((tone, sc) + _peak_candidates(sc, m, search_px, ambiguity_tol, min_sep))
    tones.sort(key=lambda x: -x[3])
    tone, score_map, (su, sv), best, cands, ridge = tones[0]
    tone_ambiguous = False
    if len(tones) > 1:
        # the other tone (lines <-> spaces) nearly as good at another position?
        rivals = [c for c in tones[1][4] if c[2] >= (1.0 - tone_tol) * best
                  and math.hypot(c[0] - su, c[1] - sv) >= min_sep]
        tone_ambiguous = bool(rivals)
    if tone_ambiguous:
        # pool the candidates of both tones
        pool = [(c, tn) for tn in tones for c in tn[4]]
        c_sel, tn = min(pool, key=lambda ct: (ct[0][0] ** 2 + ct[0][1] ** 2, -ct[0][2]))
        tone, score_map, ridge = tn[0], tn[1], ridge or tn[5]
        su, sv = c_sel[0], c_sel[1]
        cands = sorted([c for c, _ in pool], key=lambda c: -c[2])
    # a plateau (ridge) is judged by the refinement's uncertainty when refining
    ambiguous = len(cands) > 1 or tone_ambiguous or (ridge and not refine)
    i, j = int(sv + m), int(su + m)
    peak = float(score_map[i, j])
    # noise significance: correlation of (smoothed) white noise with the smooth layout channels
    n_eff = tmpl.size / max(1.0, 4.0 * math.pi * smooth_px ** 2)
    significance = peak * math.sqrt(n_eff)
    if peak < min_score or significance < min_significance:
        return _fail(transform, f"no significant match (coarse correlation {peak:.3f}, "
                     f"{significance:.1f} sigma of noise)", score=peak)
    fu, fv = _subpixel_parabola(score_map, i, j)
    d0 = np.array([-(su + fu), -(sv + fv)])  # content displacement, pixels
    t = transform.with_offset(_content_shift_to_offset(transform, d0))
    score, res_px, edge_bias, weak = peak, 0.5, 0.0, False
    pol = "bright" if tone > 0 else "dark"

    # ---- fine: Gauss-Newton on the exactly re-rendered layout model
    if refine:
        fit = _refine(img_s, transform, t, polys, sigma_px=sigma_px, smooth_px=smooth_px, border=bd,
                      rotation=rotation, max_iter=max_iter, robust=robust,
                      corner_px=3.0 * sigma_px + 4.0 if corner_px is None else corner_px,
                      corner_weight=corner_weight)
        if fit is None:
            return _fail(transform, "refinement diverged", score=peak)
        t, edge_bias, res_px, weak, score = fit["t"], fit["edge_bias"], fit["sigma"], fit["weak"], fit["score"]
        if fit["a"] != 0:
            pol = "bright" if fit["a"] > 0 else "dark"
    ambiguous = ambiguous or weak
    d = _content_shift(transform, t)
    if np.any(np.abs(d) > search_px + 1.0):
        return _fail(transform, f"refinement left the search range (content shift {d[0]:.1f}, {d[1]:.1f} px)",
                     score=score)
    if score < min_score:
        return _fail(transform, f"weak match after refinement (score {score:.3f} < {min_score})", score=score)

    offset_nm = (t.offset_nm[0] - transform.offset_nm[0], t.offset_nm[1] - transform.offset_nm[1])
    cand_px = tuple((-c[0], -c[1]) for c in cands) if ambiguous else ()
    if ambiguous:
        if tone_ambiguous:
            what = ("lines and spaces (the polygon tone) cannot be told apart; kept the candidate nearest "
                    "nominal (pass polarity='bright' or 'dark')")
        elif weak or (ridge and not refine):
            what = "the pattern is (nearly) invariant along one direction; kept the nominal position along it"
        else:
            alt = ", ".join(f"({c[0]:+.0f},{c[1]:+.0f})" for c in cand_px[:4])
            what = f"{len(cands)} near-equal peaks (periodic pattern) at content shifts {alt} px; kept the one nearest nominal"
        status, msg = "ambiguous", f"ambiguous alignment: {what}"
    else:
        status, msg = "ok", f"aligned: content shift ({d[0]:+.3f}, {d[1]:+.3f}) px, score {score:.3f}"
    return AlignResult(
        transform=t, offset_nm=(float(offset_nm[0]), float(offset_nm[1])), offset_px=(float(d[0]), float(d[1])),
        score=float(score), residual_px=float(res_px), ambiguous=bool(ambiguous), status=status, message=msg,
        rotation_rad=float(t.rotation_rad), candidates_px=cand_px, polarity=pol, edge_bias_px=float(edge_bias),
    )
