"""Alignment of a SEM image to the layout (stage error, optional tiny rotation).

Conventions are those of :mod:`segsem_cli.transform`: pixel ``(u, v)`` with
``u`` right and ``v`` down, pixel ``(r, c)`` covering ``[c, c+1) x [r, r+1)``;
layout ``(x, y)`` in nm with ``y`` up. This module maps between the two only
through :class:`~segsem_cli.transform.PixelTransform` (``to_pixel``,
``to_layout``, ``with_offset``).

Method (details and measurements in ``docs/alignment.md``)
----------------------------------------------------------
1. SEM appearance model: the image is ``a * region + c * rim + background``
   (:func:`sem_channels`): ``region`` is the blurred exact area coverage of
   the design polygons (:func:`render_layout`; the sign of ``a`` is the
   polarity), ``rim`` the bright band along every edge (edge effect,
   ``c >= 0``), and a quadratic background absorbs charging.
2. Coarse search: normalised cross-correlation of the whole (detrended,
   smoothed) image with both channels for every whole-pixel shift within the
   search range (``cv2.matchTemplate``), combined as a multiple correlation.
   Images of about 800 px and more are searched at 1/4 of the resolution
   (about 400 px and more: 1/2); when that level shows several near-equal
   peaks, each is scored again at 1/2 resolution. Near-equal peaks (periodic
   patterns) and, with unknown polarity, the line/space swap are detected;
   the candidate nearest the nominal position is kept and the result is
   flagged ``ambiguous``.
3. Fine stage: a fit of the shift, a global edge bias (printed CD bias plus
   the rim's own offset, so that features cut by the image border do not
   bias the shift) and optionally a rotation, first at 1/2 resolution with
   the layout rendered exactly at every step (images of about 400 px and
   more), then at full resolution. The model is evaluated at up to about
   12000 pixels near the layout edges (an evenly spread subset; all pixels
   that constrain a direction few edges constrain are kept) plus a sparse
   grid elsewhere, each weighted by the pixels it stands for. Between exact
   renderings the channels are sampled by cubic interpolation and the edge
   bias enters to first order; Newton steps (Gauss-Newton plus the
   residual's curvature) converge in 2-4 iterations. Pixels near design
   corners and line ends are down-weighted (they round and pull back when
   printed) and residual outliers (missing/bridged features) get Huber
   weights.
"""
from __future__ import annotations

import collections
import functools
import math
import threading
from dataclasses import dataclass, field, replace
from typing import Iterable, Sequence

import cv2
import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon, box
from shapely.geometry.base import BaseGeometry

from .errors import SegsemError
from .transform import PixelTransform

__all__ = ["AlignResult", "render_layout", "sem_channels", "align_image", "align_to_layout", "search_range_px"]

_SCRATCH = threading.local()
_SCRATCH_MAX_ARRAY = 40 << 20  # larger work arrays (images beyond ~3000 px) are not kept
_SCRATCH_MAX_TOTAL = 160 << 20  # per thread


#: Work arrays start on this byte boundary (see :func:`_aligned_empty`).
_ALIGN = 64


def _aligned_empty(shape, dtype=np.float32) -> np.ndarray:
    """``np.empty(shape, dtype)`` whose data starts on a ``_ALIGN``-byte boundary.

    Some OpenCV kernels take a different path for the few elements before the
    first aligned address than for the rest (``cv2.magnitude`` rounds them
    differently in the last bit), so with arrays wherever the allocator put
    them the same image aligned in two processes differed by up to 1e-3 nm
    (the fit's stopping rules amplify last-bit differences), and so did the
    contours started from it. Aligned work arrays make the result independent
    of the process."""
    dt = np.dtype(dtype)
    n = int(np.prod(shape)) * dt.itemsize
    raw = np.empty(n + _ALIGN, dtype=np.uint8)
    k = (-raw.ctypes.data) % _ALIGN
    return raw[k : k + n].view(dt).reshape(shape)


def _scratch(tag: str | None, name: str, shape, dtype=np.float32) -> np.ndarray:
    """A reusable per-thread work array (contents undefined), or a fresh one when ``tag`` is None.

    Renderings allocate tens of megabytes; fresh arrays of that size come from the
    operating system zero-filled page by page, which costs more than the
    arithmetic. A tagged array stays valid until the next request with the same
    tag, name and shape (callers use a rendering before making the next one).
    """
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if tag is None or nbytes > _SCRATCH_MAX_ARRAY:
        return _aligned_empty(shape, dtype)
    pool = getattr(_SCRATCH, "pool", None)
    if pool is None:
        pool = _SCRATCH.pool = collections.OrderedDict()
    key = (tag, name, tuple(int(x) for x in shape), np.dtype(dtype).str)
    a = pool.get(key)
    if a is None:
        a = pool[key] = _aligned_empty(shape, dtype)
        while len(pool) > 40 or sum(x.nbytes for x in pool.values()) > _SCRATCH_MAX_TOTAL:
            pool.popitem(last=False)
    else:
        pool.move_to_end(key)
    return a


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
    the exact covered area of every pixel (done as one 2-D prefix sum, see
    :func:`_segment_coverage`). Vertical edges (most edges of a Manhattan
    layout) need no cutting; only the other edges have their x and y
    crossings merged (one sort).
    """
    rings = [r for r in rings if len(r) > 1]
    if not rings:
        return np.zeros(shape, dtype=np.float32)
    segs = np.concatenate([np.stack([r[:-1], r[1:]], axis=1) for r in rings])  # (E, 2, 2)
    return _segment_coverage(segs[:, 0], segs[:, 1], None, shape)


def _segment_coverage(p0: np.ndarray, p1: np.ndarray, sign, shape: tuple[int, int],
                      tag: str | None = None) -> np.ndarray:
    """Exact coverage (see :func:`_exact_coverage`) from edge segments ``p0 -> p1``
    (exteriors counter-clockwise in (u, v) maths orientation, holes clockwise);
    ``sign`` (per segment, or None) flips segments of rings given the other way.

    The per-row signed areas are written as 2-D differences (a piece in row
    ``r`` as ``+a`` at ``r`` and ``-a`` at ``r + 1``; a vertical edge's run of
    whole rows as four values in all) and summed with one 2-D prefix sum
    (``cv2.integral``).
    """
    h, w = shape
    keep = p0[:, 1] != p1[:, 1]  # horizontal edges add nothing
    p0, p1 = p0[keep], p1[keep]
    if len(p0) == 0:
        cov = _scratch(tag, "cov", (h, w))
        cov.fill(0.0)
        return cov
    sgn_e = np.ones(len(p0)) if sign is None else np.asarray(sign, dtype=np.float64)[keep]
    d = p1 - p0
    vert = d[:, 0] == 0
    rows_l, xm_l, dy_l = [], [], []  # single-row pieces
    run_r0, run_r1, run_x, run_s = [], [], [], []  # runs of whole rows (vertical edges)
    if np.any(vert):
        x = p0[vert, 0]
        ya, yb = p0[vert, 1], p1[vert, 1]
        sg = -np.sign(yb - ya) * sgn_e[vert]  # minus: with v down the accumulated area has the opposite sign
        lo = np.clip(np.minimum(ya, yb), 0.0, float(h))
        hi = np.clip(np.maximum(ya, yb), 0.0, float(h))
        f0 = np.ceil(lo)  # first whole row
        f1 = np.floor(hi)  # end of the whole rows
        one = f1 < f0  # the edge lies within one row
        r = np.floor(lo[one])
        rows_l.append(r)
        xm_l.append(x[one])
        dy_l.append(sg[one] * (hi[one] - lo[one]))
        many = ~one
        x, lo, hi, f0, f1, sg = x[many], lo[many], hi[many], f0[many], f1[many], sg[many]
        top = lo < f0  # partial first row
        rows_l.append(np.floor(lo[top]))
        xm_l.append(x[top])
        dy_l.append(sg[top] * (f0[top] - lo[top]))
        bot = hi > f1  # partial last row
        rows_l.append(f1[bot])
        xm_l.append(x[bot])
        dy_l.append(sg[bot] * (hi[bot] - f1[bot]))
        run = f1 > f0
        run_r0.append(f0[run])
        run_r1.append(f1[run])
        run_x.append(x[run])
        run_s.append(sg[run])
    if not np.all(vert):
        q0, q1, dq = p0[~vert], p1[~vert], d[~vert]
        qs = -sgn_e[~vert]
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
        rows_l.append(np.floor(0.5 * (ya + yb)))
        xm_l.append(0.5 * (xa + xb))
        dy_l.append((yb - ya) * qs[e])
    # every contribution as (row start, row end, x, signed height per row)
    r0 = np.concatenate(rows_l + run_r0)
    r1 = np.concatenate([r + 1.0 for r in rows_l] + run_r1)
    xm = np.concatenate(xm_l + run_x)
    dy = np.concatenate(dy_l + run_s)
    ok = (dy != 0) & (r0 >= 0) & (r0 < h) & (xm < w + 1)
    r0, r1, xm, dy = r0[ok].astype(np.int64), np.minimum(r1[ok], h).astype(np.int64), xm[ok], dy[ok]
    col = np.floor(xm).astype(np.int64)
    left = col < 0  # pieces left of the canvas cover the whole row strip
    a_next = np.where(left, 0.0, dy * (xm - col))
    col = np.maximum(col, 0)
    a_here = dy - a_next
    wd = w + 2
    idx = np.concatenate([r0 * wd + col, r0 * wd + col + 1, r1 * wd + col, r1 * wd + col + 1])
    val = np.concatenate([a_here, a_next, -a_here, -a_next])
    # float64 for render_layout; the fit's own renderings (tag) in float32: the running sums are
    # coverage values and row differences, so the rounding stays below 1e-4
    dt, depth = (np.float64, cv2.CV_64F) if tag is None else (np.float32, cv2.CV_32F)
    delta = _scratch(tag, "delta", (h + 1, wd), dt)
    delta.fill(0.0)
    np.add.at(delta.reshape(-1), idx, val.astype(dt))
    total = cv2.integral(delta, _scratch(tag, "sum", (h + 2, wd + 1), dt), depth)
    cov = _scratch(tag, "cov", (h, w))
    np.copyto(cov, total[1 : h + 1, 1 : w + 1], casting="unsafe")
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


def _poly_basis(shape, degree: int = 2, step: int = 1) -> np.ndarray:
    """Columns ``1, u, v, u^2, uv, v^2, ...`` (normalised coordinates) on a grid."""
    h, w = shape
    vv, uu = np.mgrid[0:h:step, 0:w:step].astype(np.float64)
    return _poly_cols(uu.ravel(), vv.ravel(), shape, degree)


def _poly_cols(cols: np.ndarray, rows: np.ndarray, shape, degree: int = 2) -> np.ndarray:
    """Columns ``1, u, v, u^2, uv, v^2, ...`` at pixel indices ``(rows, cols)``,
    with ``u = (col - W/2) / W`` and ``v = (row - H/2) / H``."""
    h, w = shape
    u = (np.asarray(cols, dtype=np.float64) - w / 2.0) / w
    v = (np.asarray(rows, dtype=np.float64) - h / 2.0) / h
    out = [np.ones_like(u)]
    for d in range(1, degree + 1):
        for k in range(d + 1):
            out.append(u ** (d - k) * v ** k)
    return np.stack(out, axis=1)


def _detrend(img: np.ndarray, degree: int = 2) -> np.ndarray:
    """Subtract a least-squares polynomial surface (charging gradients)."""
    h, w = img.shape
    step = max(1, int(math.sqrt(h * w / 16384.0)))
    coef = np.linalg.lstsq(_poly_basis((h, w), degree, step), img[::step, ::step].astype(np.float64).ravel(),
                           rcond=None)[0]
    u = ((np.arange(w) - w / 2.0) / w)[None, :]
    v = ((np.arange(h) - h / 2.0) / h)[:, None]
    surf = np.full((h, w), coef[0])
    k = 1
    for d in range(1, degree + 1):
        for j in range(d + 1):
            surf += coef[k] * (u ** (d - j) * v ** j)
            k += 1
    return (img - surf).astype(np.float32)


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
    return _channels(cov, float(sigma_px))[:2]


def _channels(cov: np.ndarray, sigma_px: float, tag: str | None = None):
    """``(region, rim, rim_u, rim_v)`` of a coverage array (see :func:`sem_channels`): the
    last two are the derivatives of ``region`` along u and v in rim units (``rim`` is
    their magnitude)."""
    shp = cov.shape
    k = 0.5 * sigma_px * math.sqrt(2.0 * math.pi)  # central differences, scaled so a straight edge's rim peaks at 1
    region = cv2.GaussianBlur(cov, (0, 0), sigma_px, dst=_scratch(tag, "reg", shp), borderType=cv2.BORDER_REFLECT)
    gu = cv2.Sobel(region, cv2.CV_32F, 1, 0, dst=_scratch(tag, "gu", shp), ksize=1, scale=k,
                   borderType=cv2.BORDER_REFLECT)
    gv = cv2.Sobel(region, cv2.CV_32F, 0, 1, dst=_scratch(tag, "gv", shp), ksize=1, scale=k,
                   borderType=cv2.BORDER_REFLECT)
    rim = cv2.magnitude(gu, gv, magnitude=_scratch(tag, "rim", shp))
    return region, rim, gu, gv


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
    tone_ambiguous : True when, with ``polarity="auto"``, the image could not
        tell the polygon tone (the swapped tone matched nearly as well at
        another position) and ``polarity`` is the prior's choice, not the
        data's. ``segsem extract`` then takes the tone of the batch
        (:func:`segsem_cli.pipeline.batch_polarity`).
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
    tone_ambiguous: bool = False


def _fail(transform: PixelTransform, message: str, score: float = 0.0) -> AlignResult:
    return AlignResult(
        transform=transform, offset_nm=(0.0, 0.0), offset_px=(0.0, 0.0), score=float(score),
        residual_px=float("nan"), ambiguous=False, status="failed", message=message,
        rotation_rad=transform.rotation_rad,
    )


#: Default alignment search: this many pixels or this many nm, whichever is more pixels.
DEFAULT_SEARCH_PX = 40.0
DEFAULT_SEARCH_NM = 40.0


def search_range_px(search_px: float | None, pixel_nm: float) -> float:
    """The search range in pixels: ``search_px`` when given, else the larger of
    :data:`DEFAULT_SEARCH_PX` and :data:`DEFAULT_SEARCH_NM` / ``pixel_nm`` (a stage error is a
    physical length: at 0.5 nm/px, 40 nm is 80 px)."""
    if search_px is not None:
        return float(search_px)
    return max(DEFAULT_SEARCH_PX, DEFAULT_SEARCH_NM / float(pixel_nm))


#: With the default search range, a match that fails in a way a larger stage error explains is
#: tried once more over this many times the range (see :func:`align_to_layout`).
WIDEN_FACTOR = 2.0
_WIDEN_ON = ("no significant match", "refinement left the search range", "weak match", "refinement diverged")


def align_to_layout(pixels: np.ndarray, transform: PixelTransform, layout, *, search_px: float | None = None,
                    polarity: str = "auto") -> AlignResult:
    """:func:`align_image` against the layout polygons around the image's nominal field of view.

    ``layout`` has ``polygons`` and ``query(bbox_nm)`` (:class:`segsem_cli.layout.Layout`); the
    clip is the field of view grown by the search range (:func:`search_range_px`).

    With the default range (``search_px=None``), a failure a stage error beyond the range
    explains (no significant match, the refinement leaving the range, a weak or diverging
    fit) is tried once more over :data:`WIDEN_FACTOR` times the range; a success says so in its
    message. A blank image or one without layout in view is not retried, and an explicit
    ``search_px`` is a hard limit."""
    search = search_range_px(search_px, transform.pixel_nm)

    def attempt(rng: float) -> AlignResult:
        polys = [layout.polygons[i] for i in layout.query(transform.field_of_view_nm(rng))]
        return align_image(pixels, transform, polys, search_px=rng, polarity=polarity)

    res = attempt(search)
    if search_px is not None or res.status != "failed" or not res.message.startswith(_WIDEN_ON):
        return res
    wide = search * WIDEN_FACTOR
    h, w = transform.shape
    if wide >= 0.5 * min(h, w):  # the layout clip would be mostly outside the image
        return res
    res2 = attempt(wide)
    if res2.status == "failed":
        return replace(res, message=f"{res.message} (also with the search widened to +/-{wide:.0f} px: {res2.message})")
    return replace(res2, message=f"{res2.message}; found with the search widened to +/-{wide:.0f} px "
                                 f"(the default +/-{search:.0f} px failed: {res.message})")


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


@dataclass
class _Cand:
    """A coarse candidate: whole-pixel shift ``(su, sv)`` (image pixel ``(u, v)``
    shows the layout content of nominal pixel ``(u + su, v + sv)``), its score,
    squared distance used for "nearest nominal", and sub-pixel peak offsets."""

    su: float
    sv: float
    score: float
    r2: float
    fu: float = 0.0
    fv: float = 0.0
    low: tuple[int, int] | None = None  # originating low-resolution (su, sv), pyramid levels only


def _plateaus(score: np.ndarray, m: int, search: float, tol: float, min_sep: float):
    """Connected regions of a coarse score map (index ``(m, m)`` = zero shift)
    scoring at least ``best - tol * best`` within the search range.

    Returns ``(best, cands, ridge, labels, region_r2)``: one :class:`_Cand`
    per region (at its maximum; an elongated plateau, i.e. a pattern nearly
    invariant along a direction, is ranked by its point nearest zero shift),
    best first; whether any region is such a plateau; the label map and, per
    label, the squared distance of an elongated region's point nearest zero
    (None for compact regions).
    """
    from scipy import ndimage

    n0, n1 = score.shape
    sv, su = np.mgrid[0:n0, 0:n1] - m
    inside = (np.abs(su) <= search) & (np.abs(sv) <= search)
    s = np.where(inside, score, -np.inf)
    best = float(s.max())
    high = s >= best - tol * max(abs(best), 1e-6)
    lab, nlab = ndimage.label(high)
    cands = []
    region_r2: dict[int, float | None] = {}
    ridge = False
    for k in range(1, nlab + 1):
        sel = lab == k
        vals = np.where(sel, s, -np.inf)
        i = np.unravel_index(np.argmax(vals), vals.shape)
        pu, pv = su[i], sv[i]
        r2 = float(pu * pu + pv * pv)
        region_r2[k] = None
        if np.hypot(su[sel] - pu, sv[sel] - pv).max() >= min_sep:
            ridge = True
            r2 = float(np.min(su[sel] ** 2 + sv[sel] ** 2))
            region_r2[k] = r2
        cands.append(_Cand(float(pu), float(pv), float(vals[i]), r2))
    cands.sort(key=lambda c: -c.score)
    return best, cands, ridge, lab, region_r2


def _local_maxima(score: np.ndarray, m: int, search: float, thr: float, limit: int) -> list[tuple[int, int, float]]:
    """Whole-pixel local maxima ``(su, sv, value)`` (3 x 3 neighbourhood) of a score
    map within the search range scoring at least ``thr``, best first, at most ``limit``."""
    n0, n1 = score.shape
    s = score.astype(np.float32)
    dil = cv2.dilate(s, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_REPLICATE)
    ii, jj = np.nonzero((s >= dil) & (s >= thr))
    out = []
    for i, j in zip(ii.tolist(), jj.tolist()):
        su, sv = j - m, i - m
        if abs(su) <= search and abs(sv) <= search:
            out.append((su, sv, float(score[i, j])))
    out.sort(key=lambda c: -c[2])
    # a flat top gives several equal neighbours: keep one per 3 x 3 neighbourhood
    kept: list[tuple[int, int, float]] = []
    for c in out:
        if all(max(abs(c[0] - k[0]), abs(c[1] - k[1])) > 1 for k in kept):
            kept.append(c)
    return kept[:limit]


def _subpixel_parabola(score: np.ndarray, i: int, j: int) -> tuple[float, float]:
    def f(a, b, c):
        den = a - 2 * b + c
        return 0.0 if not den < 0 else float(np.clip(0.5 * (a - c) / den, -0.5, 0.5))
    n0, n1 = score.shape
    if 0 < i < n0 - 1 and 0 < j < n1 - 1 and np.all(np.isfinite(score[i - 1 : i + 2, j - 1 : j + 2])):
        return f(score[i, j - 1], score[i, j], score[i, j + 1]), f(score[i - 1, j], score[i, j], score[i + 1, j])
    return 0.0, 0.0


def _coarse_scores(r1, r2, r12: float, tone: float):
    """Multiple correlation of the image with (region, rim) per shift, with the
    sign of the region coefficient fixed by ``tone`` and the rim one >= 0."""
    r1 = np.asarray(r1, dtype=np.float64)
    r2 = np.asarray(r2, dtype=np.float64)
    det = max(1.0 - r12 * r12, 1e-6)
    b1 = (r1 - r12 * r2) / det
    b2 = (r2 - r12 * r1) / det
    both = np.maximum(b1 * r1 + b2 * r2, 0.0)
    valid = (tone * b1 >= 0) & (b2 >= 0)
    alt1 = np.where(tone * r1 > 0, r1 * r1, 0.0)
    alt2 = np.where(r2 > 0, r2 * r2, 0.0)
    return np.sqrt(np.where(valid, both, np.maximum(alt1, alt2)))


def _pyramid_factor(h: int, w: int) -> int:
    """Downsampling factor of the coarse search: 1 below ~400 px, up to 4 from ~800 px."""
    f = 1
    while f < 4 and min(h, w) / (2 * f) >= 200:
        f *= 2
    return f


class _LevelScorer:
    """Whole-pixel coarse scores, one shift at a time, on a regular subgrid of an image.

    Normalised correlations of the (smoothed, detrended) image with the
    region and rim channels of the nominal rendering: an estimate of the
    whole-image correlations a coarse score map holds, used to tell apart
    the peaks a coarser pyramid level cannot.
    """

    def __init__(self, img_s: np.ndarray, reg: np.ndarray, rim: np.ndarray, pad: int, border: int,
                 max_points: int = 40000):
        h, w = img_s.shape
        self.k = k = max(1, int(math.ceil(math.sqrt((h - 2 * border) * (w - 2 * border) / max_points))))
        self.nr = len(range(border, h - border, k))
        self.nc = len(range(border, w - border, k))
        self.r0 = self.c0 = border
        self.pad = pad
        self.reg, self.rim = reg, rim
        sub = img_s[border : h - border : k, border : w - border : k].astype(np.float64)
        rows = np.arange(self.nr) * k + border
        cols = np.arange(self.nc) * k + border
        rr, cc = np.meshgrid(rows, cols, indexing="ij")
        basis = _poly_cols(cc.ravel(), rr.ravel(), (h, w))
        y = sub.ravel()
        coef = np.linalg.lstsq(basis, y, rcond=None)[0]
        img0 = y - basis @ coef
        img0 -= img0.mean()
        self.img = img0.reshape(self.nr, self.nc)
        self.inorm = math.sqrt(float(np.sum(img0 * img0)))
        self.n = img0.size
        self.cache: dict[tuple[int, int], tuple[float, float]] = {}
        self.r12 = self._r12()

    def _view(self, ch, su: int, sv: int) -> np.ndarray:
        k = self.k
        r = self.pad + sv + self.r0
        c = self.pad + su + self.c0
        return ch[r : r + self.nr * k : k, c : c + self.nc * k : k]

    def _r12(self) -> float:
        a = self._view(self.reg, 0, 0).astype(np.float64).ravel()
        b = self._view(self.rim, 0, 0).astype(np.float64).ravel()
        if not (a.std() > 0 and b.std() > 0):
            return 0.0
        return float(np.corrcoef(a, b)[0, 1])

    def corr(self, su: int, sv: int) -> tuple[float, float]:
        key = (su, sv)
        if key not in self.cache:
            out = []
            for ch in (self.reg, self.rim):
                v = self._view(ch, su, sv)
                if v.shape != self.img.shape:
                    out.append(0.0)
                    continue
                v = v.astype(np.float64)
                s1 = float(v.sum())
                var = float(np.einsum("ij,ij->", v, v)) - s1 * s1 / self.n
                num = float(np.einsum("ij,ij->", self.img, v))
                out.append(num / math.sqrt(var * self.inorm ** 2) if var > 0 and self.inorm > 0 else 0.0)
            self.cache[key] = (out[0], out[1])
        return self.cache[key]

    def score(self, su: int, sv: int, tone: float) -> float:
        r1, r2 = self.corr(su, sv)
        return float(_coarse_scores(r1, r2, self.r12, tone))

    def climb(self, su: int, sv: int, tone: float, limit: float, max_moves: int = 4) -> _Cand:
        """Hill-climb the full-resolution score from ``(su, sv)`` (3 x 3 steps, within
        ``+/-limit``); returns the local maximum with its parabola sub-pixel offsets."""
        for move in range(max_moves + 1):
            grid = np.full((3, 3), -np.inf)
            for dv in (-1, 0, 1):
                for du in (-1, 0, 1):
                    if abs(su + du) <= limit and abs(sv + dv) <= limit:
                        grid[dv + 1, du + 1] = self.score(su + du, sv + dv, tone)
            i, j = np.unravel_index(int(np.argmax(grid)), grid.shape)
            if (i, j) == (1, 1) or move == max_moves:
                break
            su, sv = su + int(j) - 1, sv + int(i) - 1
        fu, fv = _subpixel_parabola(grid, 1, 1)
        return _Cand(float(su), float(sv), float(grid[1, 1]), float(su * su + sv * sv), fu, fv)


def _corner_weights(lay: "_Layout", t: PixelTransform, radius_px: float, weight: float, min_turn_deg: float = 30.0,
                    tag: str | None = None) -> np.ndarray:
    """Weight map: ``weight`` within ``radius_px`` of a polygon corner (turning by more
    than ``min_turn_deg``), 1 elsewhere. Corners round and line ends pull back
    when printed, by amounts that are not symmetric within the field of view."""
    h, w = t.shape
    out = _scratch(tag, "corners", (h, w))
    out.fill(1.0)
    xy, ring, _ = lay.segments(0.0)
    if len(xy) < 4:
        return out
    uv = t.to_pixel(xy)
    # closed rings: vertex i has its predecessor and successor within the ring (the first
    # vertex is repeated at the end)
    start = np.r_[0, np.flatnonzero(np.diff(ring)) + 1]
    end = np.r_[start[1:], len(ring)]  # exclusive; end - 1 repeats start
    n = end - start - 1  # distinct vertices per ring
    ok_ring = n >= 3
    idx = np.concatenate([np.arange(a, b - 1) for a, b, o in zip(start, end, ok_ring) if o]) if np.any(ok_ring) else []
    if len(idx) == 0:
        return out
    rid = np.repeat(np.arange(len(start))[ok_ring], n[ok_ring])
    first, cnt = start[rid], n[rid]
    prev = first + (idx - first - 1) % cnt
    nxt = first + (idx - first + 1) % cnt
    d_in = uv[idx] - uv[prev]
    d_out = uv[nxt] - uv[idx]
    n_in = np.linalg.norm(d_in, axis=1)
    n_out = np.linalg.norm(d_out, axis=1)
    ok = (n_in > 1e-9) & (n_out > 1e-9)
    cosang = np.einsum("ij,ij->i", d_in, d_out) / np.maximum(n_in * n_out, 1e-18)
    r = int(round(radius_px))
    pts = uv[idx][ok & (cosang < math.cos(math.radians(min_turn_deg)))]
    pts = pts[(pts[:, 0] >= -r) & (pts[:, 0] <= w + r) & (pts[:, 1] >= -r) & (pts[:, 1] <= h + r)]
    for u, v in np.rint(pts - 0.5).astype(int).tolist():
        cv2.circle(out, (u, v), r, float(weight), -1)
    return out


def _level_image(img: np.ndarray, f: int) -> np.ndarray:
    """Block means over ``f x f`` pixels (the image cropped to a multiple of ``f``)."""
    if f == 1:
        return img
    h, w = img.shape
    hf, wf = h - h % f, w - w % f
    return cv2.resize(img[:hf, :wf], (wf // f, hf // f), interpolation=cv2.INTER_AREA)


def _polygon_parts(geoms: np.ndarray) -> np.ndarray:
    """The non-empty polygons of an array of geometries (multi-parts split)."""
    if len(geoms) == 0:
        return np.zeros(0, dtype=object)
    parts = shapely.get_parts(geoms)
    return parts[(shapely.get_type_id(parts) == 3) & ~shapely.is_empty(parts)] if len(parts) else parts


def _disjoint(parts: np.ndarray) -> np.ndarray:
    """Polygons made pairwise disjoint: merged (one union) only if some overlap or touch."""
    if len(parts) < 2:
        return parts
    i, j = shapely.STRtree(parts).query(parts, predicate="intersects")
    if np.all(i == j):
        return parts
    return _polygon_parts(np.array([shapely.union_all(parts)], dtype=object))


class _Layout:
    """The design polygons of one alignment, clipped once (layout nm) and merged where
    they overlap or touch, with their ring coordinates per edge bias: renderings then
    need no shapely calls beyond one (vectorised) buffer per edge bias."""

    def __init__(self, polys_nm: Sequence[Polygon], clip_nm: tuple[float, float, float, float]):
        win = box(*clip_nm)
        parts = np.array([p if p.is_valid else p.buffer(0) for p in polys_nm] or [Polygon()], dtype=object)
        parts = _polygon_parts(parts[shapely.intersects(win, parts)])
        cross = ~shapely.contains_properly(win, parts)  # only polygons crossing the window are clipped
        if np.any(cross):
            parts = np.concatenate([parts[~cross], _polygon_parts(shapely.intersection(parts[cross], win))])
        self.parts = _disjoint(parts)
        self._cache: dict[float, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def segments(self, bias_nm: float):
        """``(xy, ring_of, is_exterior)``: ring vertices (layout nm, closed rings), the ring
        of each vertex and whether each ring is an exterior, for the layout grown by ``bias_nm``."""
        key = round(float(bias_nm), 9)
        if key not in self._cache:
            parts = self.parts
            if key != 0.0 and len(parts):
                parts = shapely.buffer(parts, key, join_style="mitre", mitre_limit=4.0)
                parts = _polygon_parts(parts)
                if key > 0:  # growing can make neighbours meet
                    parts = _disjoint(parts)
            if len(parts) == 0:
                out = (np.zeros((0, 2)), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool))
            else:
                n_int = shapely.get_num_interior_rings(parts)
                is_ext = np.zeros(int(len(parts) + n_int.sum()), dtype=bool)
                is_ext[np.cumsum(np.concatenate([[0], n_int[:-1] + 1]))] = True
                xy, ring = shapely.get_coordinates(shapely.get_rings(parts), return_index=True)
                out = (xy, ring, is_ext)
            if len(self._cache) > 8:
                self._cache.clear()
            self._cache[key] = out
        return self._cache[key]

    def coverage(self, t: PixelTransform, bias_px: float, shape: tuple[int, int], origin: float,
                 scale: float = 1.0, tag: str | None = None) -> np.ndarray:
        """Exact coverage on a canvas of ``shape`` whose pixel ``(0, 0)`` starts at image
        pixel ``(origin, origin)`` (under ``t``), ``scale`` canvas pixels per image pixel."""
        xy, ring, is_ext = self.segments(bias_px * t.pixel_nm)
        if len(xy) < 2:
            cov = _scratch(tag, "cov", shape)
            cov.fill(0.0)
            return cov
        uv = (t.to_pixel(xy) - origin) * scale
        same = ring[1:] == ring[:-1]
        p0, p1 = uv[:-1][same], uv[1:][same]
        # orientation: exteriors counter-clockwise, holes clockwise in (u, v) maths orientation
        cross = uv[:-1, 0] * uv[1:, 1] - uv[1:, 0] * uv[:-1, 1]
        area = np.bincount(ring[:-1][same], weights=cross[same], minlength=len(is_ext))
        flip = np.where((area > 0) == is_ext, 1.0, -1.0)
        return _segment_coverage(p0, p1, flip[ring[:-1][same]], shape, tag)


@dataclass
class _Render:
    """Layout channels rendered exactly with transform ``t`` and edge bias ``eb``
    (full-resolution pixels) at ``1/f`` of the image resolution, on a canvas grown
    by ``pad`` (level) pixels on every side: level pixel ``(r, c)`` of the image is
    canvas pixel ``(r + pad, c + pad)`` when the image is where ``t`` puts it."""

    reg: np.ndarray
    rim: np.ndarray
    t: PixelTransform
    eb: float
    pad: int
    f: int = 1
    grad_u: np.ndarray | None = None  # d reg / du, dv in rim units (rim = |grad|)
    grad_v: np.ndarray | None = None


def _render(lay: _Layout, t: PixelTransform, edge_bias: float, sigma_px: float, pad: int, f: int = 1,
            tag: str = "fit") -> _Render:
    """Render the layout with ``t`` at level ``f`` (``sigma_px`` in level pixels), polygons
    grown by ``edge_bias`` full-resolution pixels. The arrays are per-thread scratch
    space (:func:`_scratch`): valid until the next rendering with the same ``tag``
    and canvas shape."""
    h, w = t.shape
    cov = lay.coverage(t, edge_bias, (h // f + 2 * pad, w // f + 2 * pad), -pad * f, 1.0 / f, tag)
    reg, rim, gu, gv = _channels(cov, float(sigma_px), tag)
    return _Render(reg, rim, t, float(edge_bias), int(pad), int(f), gu, gv)


def _cubic(s: np.ndarray, second: bool = False):
    """Catmull-Rom interpolation kernel and its derivative (and second derivative) at offsets ``s``."""
    a = np.abs(s)
    k = np.where(a <= 1.0, (1.5 * a - 2.5) * a * a + 1.0,
                 np.where(a < 2.0, ((-0.5 * a + 2.5) * a - 4.0) * a + 2.0, 0.0))
    dk = np.where(a <= 1.0, (4.5 * a - 5.0) * a, np.where(a < 2.0, (-1.5 * a + 5.0) * a - 4.0, 0.0)) * np.sign(s)
    if not second:
        return k, dk
    d2k = np.where(a <= 1.0, 9.0 * a - 5.0, np.where(a < 2.0, -3.0 * a + 5.0, 0.0))
    return k, dk, d2k


_TAPS = np.arange(5)
_MAX_POINTS = 12000


def _render_shift(rend: _Render, t: PixelTransform) -> np.ndarray:
    """Canvas index of level pixel ``(0, 0)`` of the image under ``t`` (``(u, v)``), when
    ``t`` and the rendering differ by a translation only."""
    h, w = t.shape
    c = np.array([w / 2.0, h / 2.0])
    return (rend.t.to_pixel(t.to_layout(c)) - c) / rend.f + rend.pad


class _Sampler:
    """The rendered channels at the fit's pixels, for any nearby transform.

    Each fit pixel keeps a 5 x 5 patch of both channels around where the
    rendering's transform put it; the channels at a (sub-pixel) shifted or
    slightly rotated position are interpolated (Catmull-Rom, with exact
    derivatives) from the patch, so no re-rendering is needed while the
    shift changes by up to half a pixel (a new patch is taken beyond). The
    channels are blurred by at least one pixel, smooth enough for cubic
    interpolation. At whole-pixel positions (the rendering's own transform)
    the values and central differences are read directly.
    """

    def __init__(self, rend: _Render, rows: np.ndarray, cols: np.ndarray, translation_only: bool):
        self.rend = rend
        self.rows, self.cols = rows, cols
        self.translation = translation_only
        self.wc = rend.reg.shape[1]
        self.flat_reg = rend.reg.ravel()
        self.flat_rim = rend.rim.ravel()
        self.base = None
        self.hess = None

    def _positions(self, t: PixelTransform):
        r = self.rend
        if self.translation:
            return _render_shift(r, t)  # level pixel (row, col) -> canvas index (col + du, row + dv)
        p = np.stack([self.cols + 0.5, self.rows + 0.5], axis=1) * r.f
        return r.t.to_pixel(t.to_layout(p)) / r.f + (r.pad - 0.5)

    def _flat(self, b) -> np.ndarray:
        if self.translation:
            return (self.rows + int(b[1])) * self.wc + (self.cols + int(b[0]))
        return b[:, 1] * self.wc + b[:, 0]

    def _gather(self, pos):
        self.base = b = np.rint(pos).astype(np.int64) - 2
        offs = (_TAPS[:, None] * self.wc + _TAPS[None, :]).ravel()
        idx = self._flat(b)[:, None] + offs[None, :]
        self.p_reg = np.take(self.flat_reg, idx, mode="clip")
        self.p_rim = np.take(self.flat_rim, idx, mode="clip")

    def sample(self, t: PixelTransform):
        """``(reg, reg_u, reg_v, rim, rim_u, rim_v)`` at the fit pixels under ``t``
        (derivatives per level pixel along u and v)."""
        pos = self._positions(t)
        if self.translation and np.all(np.abs(pos - np.rint(pos)) < 1e-7):
            # whole-pixel position: values and central differences
            i = self._flat(np.rint(pos).astype(np.int64))
            out, hess = [], []
            wc = self.wc
            for ch in (self.flat_reg, self.flat_rim):
                tk = lambda o: np.take(ch, i + o, mode="clip").astype(np.float64)  # noqa: E731
                c0, cl, cr, cu, cd = tk(0), tk(-1), tk(1), tk(-wc), tk(wc)
                out += [c0, 0.5 * (cr - cl), 0.5 * (cd - cu)]
                huv = 0.25 * (tk(wc + 1) - tk(wc - 1) - tk(1 - wc) + tk(-1 - wc))
                hess.append(np.stack([cr - 2.0 * c0 + cl, huv, cd - 2.0 * c0 + cu], axis=1))
            self.hess = tuple(hess)
            return tuple(out)
        if self.base is None or np.any(np.abs(pos - self.base - 2) > 0.5 + 1e-9):
            self._gather(pos)
        frac = pos - self.base
        if self.translation:
            ku, dku, d2ku = _cubic(frac[0] - _TAPS, True)
            kv, dkv, d2kv = _cubic(frac[1] - _TAPS, True)
            wmat = np.stack([np.outer(kv, ku), np.outer(kv, dku), np.outer(dkv, ku),
                             np.outer(kv, d2ku), np.outer(dkv, dku), np.outer(d2kv, ku)]).reshape(6, 25).T
            wmat = wmat.astype(np.float32)
            a = (self.p_reg @ wmat).astype(np.float64)
            b = (self.p_rim @ wmat).astype(np.float64)
            self.hess = (a[:, 3:], b[:, 3:])
            return a[:, 0], a[:, 1], a[:, 2], b[:, 0], b[:, 1], b[:, 2]
        ku, dku = _cubic(frac[:, 0:1] - _TAPS[None, :])
        kv, dkv = _cubic(frac[:, 1:2] - _TAPS[None, :])
        out = []
        for p in (self.p_reg, self.p_rim):
            p3 = p.reshape(-1, 5, 5).astype(np.float64)
            tu = np.einsum("nij,nj->ni", p3, ku)
            tdu = np.einsum("nij,nj->ni", p3, dku)
            out += [np.einsum("ni,ni->n", tu, kv), np.einsum("ni,ni->n", tdu, kv), np.einsum("ni,ni->n", tu, dkv)]
        return tuple(out)


def _nonzero(mask: np.ndarray) -> np.ndarray:
    """Flat indices of the non-zero pixels of a uint8 mask (row-major order)."""
    p = cv2.findNonZero(mask)
    if p is None:
        return np.zeros(0, dtype=np.int64)
    p = p.reshape(-1, 2)
    return p[:, 1].astype(np.int64) * mask.shape[1] + p[:, 0]


@functools.lru_cache(maxsize=4)
def _rank_map(h: int, w: int) -> np.ndarray:
    """Weyl sequence (golden-ratio hash of the pixel index) in [0, 1): thresholding it
    keeps pixels evenly spread along rows and columns, with no fixed phase relative
    to periodic edges."""
    return ((np.arange(h * w, dtype=np.float64) * 0.6180339887498949) % 1.0).astype(np.float32).reshape(h, w)


def _select_pixels(rend: _Render, t: PixelTransform, shape: tuple[int, int], border: int, max_points: int):
    """Fit pixels of a level image of ``shape``: pixels near a layout edge (where
    the shift is measured), thinned to about ``max_points`` by a deterministic,
    evenly spread subset, plus a regular grid elsewhere (background and grey
    levels).

    When the edges mostly run one way (a line/space array), the few pixels
    whose gradient points along the other direction (line ends, the odd
    perpendicular edge) carry all the information about it: they are all kept.
    Returns rows, cols, the number of pixels each one stands for (fit weight)
    and the weight that makes the score comparable across image sizes (band
    pixels about 1, others 1/16 per pixel).
    """
    h, w = shape
    d = _render_shift(rend, t)
    hc, wc = rend.rim.shape
    iu = int(np.clip(round(float(d[0])), -border, wc - w + border))
    iv = int(np.clip(round(float(d[1])), -border, hc - h + border))
    hi, wi = h - 2 * border, w - 2 * border
    win = (slice(iv + border, iv + border + hi), slice(iu + border, iu + border + wi))
    view = rend.rim[win]
    near = np.zeros((hi, wi), dtype=np.uint8)
    near[: view.shape[0], : view.shape[1]] = view > 0.01
    near = cv2.dilate(near, np.ones((5, 5), np.uint8)) * np.uint8(255)
    n_band = cv2.countNonZero(near)
    if n_band > max_points:
        rank = _rank_map(hi, wi)
        extra = None
        if rend.grad_u is not None and view.shape == (hi, wi):
            # structure tensor of the edges (on a coarse grid): is there a weak direction?
            gu, gv = rend.grad_u[win], rend.grad_v[win]
            m = near[::4, ::4] > 0
            a, b = gu[::4, ::4][m].astype(np.float64), gv[::4, ::4][m].astype(np.float64)
            ev, evec = np.linalg.eigh(np.array([[a @ a, a @ b], [a @ b, b @ b]]))
            if ev[0] < 0.25 * ev[1]:
                # pixels whose gradient is within 60 degrees of the weak direction (and on an edge)
                along = cv2.absdiff(cv2.addWeighted(gu, float(evec[0, 0]), gv, float(evec[1, 0]), 0.0), 0.0)
                extra = cv2.compare(along, view * np.float32(0.5), cv2.CMP_GT)
                extra = cv2.bitwise_and(extra, cv2.compare(view, 0.02, cv2.CMP_GT))
                extra = cv2.bitwise_and(extra, near)
                n_extra = cv2.countNonZero(extra)
                if n_extra == 0:
                    extra = None
        if extra is None:
            keep = cv2.bitwise_and(near, cv2.compare(rank, max_points / n_band, cv2.CMP_LT))
            band = _nonzero(keep)
            band_w = np.ones(band.size)
        else:
            n_rest = n_band - n_extra
            p_extra = min(1.0, 0.5 * max_points / n_extra)
            p_rest = min(1.0, max(max_points - p_extra * n_extra, 0.25 * max_points) / max(n_rest, 1))
            keep = cv2.bitwise_or(
                cv2.bitwise_and(extra, cv2.compare(rank, p_extra, cv2.CMP_LT)),
                cv2.bitwise_and(cv2.bitwise_and(near, cv2.bitwise_not(extra)), cv2.compare(rank, p_rest, cv2.CMP_LT)))
            band = _nonzero(keep)
            band_w = np.where(extra.ravel()[band] > 0, 1.0 / p_extra, 1.0 / p_rest)
    else:
        band = _nonzero(near)
        band_w = np.ones(band.size)
    band_w *= n_band / max(float(band_w.sum()), 1e-9)  # exact total (the rank threshold is not)
    g = 4  # away from the edges: a grid of at most about max_points / 8 pixels
    while (hi // g) * (wi // g) > max_points / 8:
        g *= 2
    gr, gc = np.nonzero(near[g // 2 :: g, g // 2 :: g] == 0)
    away = (gr * g + g // 2) * wi + gc * g + g // 2
    idx = np.concatenate([band, away])
    samp_w = np.concatenate([band_w, np.full(away.size, float(g * g))])
    score_w = np.concatenate([band_w, np.full(away.size, g * g / 16.0)])
    return idx // wi + border, idx % wi + border, samp_w, score_w


def _gauss_newton(img_l: np.ndarray, f: int, t_nom: PixelTransform, t: PixelTransform, eb: float, lay: _Layout, *,
                  sigma_px: float, smooth_px: float, border: int, rotation: bool, max_iter: int, robust: bool,
                  cw_full: np.ndarray | None, weak_px: float, max_points: int, trust_eb: float, trust_px: float,
                  tol_px: float, tol_eb: float, final: bool):
    """Gauss-Newton fit of ``img_l ~ a * region + c * rim + quadratic background`` at
    pyramid level ``f`` (``img_l`` holds ``f x f`` block means; lengths in
    full-resolution pixels unless said otherwise).

    Non-linear unknowns: content shift ``(du, dv)``, edge bias and, optionally,
    rotation; the linear ones are re-solved at every step. With ``robust``,
    pixels the model cannot explain (line-end pullback, missing or bridged
    features, particles) are down-weighted (Huber weights on the residual,
    iteratively re-weighted).

    The model is sampled from an exact rendering by cubic interpolation; the
    edge bias's change since that rendering enters to first order. The layout
    is rendered again whenever the bias has moved on by more than
    ``trust_eb`` or the content by more than ``trust_px`` since the last
    rendering, and once more at the end when they have moved at all
    noticeably (0.2 px bias, 0.5 px shift). Returns a dict (``t``,
    ``edge_bias``, ``weak``, ``strong``, coefficients and, with ``final``, the
    score and the 1-sigma shift uncertainty) or None when the fit breaks down.
    """
    h, w = t.shape
    hl, wl = img_l.shape
    theta = t.rotation_rad
    weak = False
    strong = None
    n_lin = 8
    n_geo = 4 if rotation else 3
    pad = border + 6
    sig_l = sigma_px / f
    corr_area = max(1.0, 4.0 * math.pi * (smooth_px / f) ** 2)
    img_flat = img_l.ravel()
    t = t.with_offset(t.offset_nm, theta)
    rend = _render(lay, t, eb, sig_l, pad, f)
    rows, cols, samp_w, score_w = _select_pixels(rend, t, (hl, wl), border, max_points)
    if cw_full is not None:
        samp_w = samp_w * cw_full[np.minimum(rows * f + f // 2, h - 1), np.minimum(cols * f + f // 2, w - 1)]
    y = img_flat[rows * wl + cols].astype(np.float64)
    A = np.empty((y.size, n_lin + n_geo), dtype=np.float64)
    A[:, 2:n_lin] = _poly_cols(cols, rows, (hl, wl))
    samp = _Sampler(rend, rows, cols, not rotation)
    wts = samp_w.copy()
    n_render = 1
    pu, pv = (cols + 0.5) * f, (rows + 0.5) * f  # full-resolution pixel centres

    def solve_lin():
        L = A[:, :n_lin]
        Lw = L * wts[:, None]
        return np.linalg.solve(Lw.T @ L + 1e-12 * np.eye(n_lin), Lw.T @ y)

    def model_cols(t_cur: PixelTransform, eb_cur: float):
        """Region and rim (bias applied to first order) and their derivatives at the fit pixels."""
        reg, reg_u, reg_v, rim, rim_u, rim_v = samp.sample(t_cur)
        mag = np.maximum(np.hypot(reg_u, reg_v), 1e-6)
        rim_n = (rim_u * reg_u + rim_v * reg_v) / mag  # derivative of rim along the inward normal
        db = (eb_cur - samp.rend.eb) / f
        return reg + db * mag, rim + db * rim_n, reg_u, reg_v, rim_u, rim_v, mag, rim_n

    def stale(t_cur, eb_cur, eb_lim, px_lim):
        r = samp.rend
        return (abs(eb_cur - r.eb) > eb_lim or float(np.hypot(*_content_shift(r.t, t_cur))) > px_lim
                or abs(t_cur.rotation_rad - r.t.rotation_rad) * max(h, w) > px_lim)

    ata = None
    coef = None
    it = 0
    finishing = 0
    update_w = True
    prev_deb = None
    while it < max_iter:
        if it > 0 and (finishing == 1 or (stale(t, eb, trust_eb, trust_px) and (trust_eb == 0.0 or n_render < 3))):
            samp = _Sampler(_render(lay, t, eb, sig_l, pad, f), rows, cols, not rotation)
            n_render += 1
        reg, rim, reg_u, reg_v, rim_u, rim_v, mag, rim_n = model_cols(t, eb)
        A[:, 0] = reg
        A[:, 1] = rim
        if coef is None or update_w:
            try:
                coef = solve_lin()
                if robust:
                    # Huber weights, scale from the median absolute residual; re-weighting
                    # converges slowly, so the weights are kept once the fit has settled
                    ar = np.abs(y - A[:, :n_lin] @ coef)
                    k = 2.0 * (1.4826 * float(np.median(ar)) + 1e-12)
                    wts = samp_w * np.where(ar <= k, 1.0, k / np.maximum(ar, 1e-30))
                    coef = solve_lin()
            except np.linalg.LinAlgError:
                return None
        r_lin = y - A[:, :n_lin] @ coef
        a, c = float(coef[0]), float(coef[1])
        gu = a * reg_u + c * rim_u
        gv = a * reg_v + c * rim_v
        A[:, n_lin] = -gu
        A[:, n_lin + 1] = -gv
        # growing the polygons by db moves every edge outwards along n = -grad(region)/|grad(region)|
        A[:, n_lin + 2] = a * mag + c * rim_n
        if rotation:
            # content displacement per radian (level pixels), obtained through the transform itself
            eps = 1e-4
            t2 = t.with_offset(t.offset_nm, theta + eps)
            q = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]) + (w / 2.0, h / 2.0)
            disp = (t2.to_pixel(t.to_layout(q)) - q) / eps / f
            du_ = disp[0, 0] + (disp[1, 0] - disp[0, 0]) * (pu - q[0, 0]) + (disp[2, 0] - disp[0, 0]) * (pv - q[0, 1])
            dv_ = disp[0, 1] + (disp[1, 1] - disp[0, 1]) * (pu - q[0, 0]) + (disp[2, 1] - disp[0, 1]) * (pv - q[0, 1])
            A[:, n_lin + 3] = -(gu * du_ + gv * dv_)
        Aw = A * wts[:, None]
        ata = Aw.T @ A
        wsum = float(wts.sum())
        s2_lin = float((wts * r_lin) @ r_lin) / max(wsum - n_lin, 1.0) * corr_area
        # a direction along which the pattern is (nearly) invariant (long lines) is left
        # alone: its 1-sigma uncertainty from the shift block alone exceeds weak_px
        atr = Aw.T @ r_lin
        hs = ata[n_lin : n_lin + 2, n_lin : n_lin + 2]
        evals, evecs = np.linalg.eigh(hs)
        weak = bool(evals[0] <= 1e-9 * max(evals[1], 1e-30) or s2_lin / max(evals[0], 1e-300) > (weak_px / f) ** 2)
        hmat = ata
        if samp.hess is not None and not weak:
            # Newton: add the residual curvature to the shift block. With a model that cannot
            # fit the image exactly (asymmetric physical rims), Gauss-Newton alone converges
            # only linearly; the fixed point is the same. (The edge bias's curvature is left
            # out: a rigid normal displacement describes it too poorly and makes steps oscillate.)
            hm = a * samp.hess[0] + c * samp.hess[1]  # (uu, uv, vv) second derivatives of the model
            wr = wts * r_lin
            cur = np.array([[wr @ hm[:, 0], wr @ hm[:, 1]], [wr @ hm[:, 1], wr @ hm[:, 2]]])
            g = slice(n_lin, n_lin + 2)
            h2 = ata[g, g] - cur
            if np.linalg.eigvalsh(h2)[0] > 0.2 * evals[0]:
                hmat = ata.copy()
                hmat[g, g] = h2
        try:
            if weak:
                strong = evecs[:, 1]
                P = np.delete(np.eye(A.shape[1]), n_lin + 1, axis=1)
                P[n_lin : n_lin + 2, n_lin] = strong
                sol = P @ np.linalg.solve(P.T @ hmat @ P, P.T @ atr)
            else:
                sol = np.linalg.solve(hmat, atr)
        except np.linalg.LinAlgError:
            return None
        if not np.all(np.isfinite(sol)):
            return None
        coef = coef + sol[:n_lin]  # the linear coefficients at the new geometry (first order)
        step = np.clip(sol[n_lin : n_lin + 2] * f, -2.0, 2.0)
        lim = max(trust_eb, 0.5) if trust_eb > 0 else 2.0
        deb = float(np.clip(sol[n_lin + 2] * f, -lim, lim))
        dth = float(np.clip(sol[n_lin + 3], -0.01, 0.01)) if rotation else 0.0
        t = t.with_offset(_content_shift_to_offset(t, step))
        eb += deb
        if trust_eb == 0.0 and prev_deb is not None and 0.0 < deb / prev_deb < 0.85 and abs(deb) > tol_eb:
            # the bias converges linearly here (misfit curvature): jump to the limit of the
            # geometric series of its steps (Aitken)
            q = deb / prev_deb
            eb += deb * q / (1.0 - q)
            deb = deb / (1.0 - q)
        prev_deb = deb
        theta += dth
        t = t.with_offset(t.offset_nm, theta)
        it += 1
        update_w = robust and (math.hypot(*step) > 0.05 or abs(deb) > 0.05 or abs(dth) * max(h, w) > 0.05)
        if math.hypot(*step) < tol_px and abs(deb) < tol_eb and abs(dth) * max(h, w) < tol_px:
            if finishing or not final or n_render >= 3 or not stale(t, eb, min(trust_eb, 0.2), min(trust_px, 0.5)):
                break
            finishing = 1  # render exactly where the fit has settled (once), then converge again
        elif finishing == 1:
            finishing = 2
    if weak and final:
        # keep the nominal position along the invariant direction
        d = _content_shift(t_nom, t)
        t_rot = t_nom.with_offset(t_nom.offset_nm, theta)
        t = t_rot.with_offset(_content_shift_to_offset(t_rot, strong * float(strong @ d)), theta)
    out = {"t": t, "edge_bias": eb, "weak": weak, "strong": strong, "iterations": it, "renders": n_render}
    if not final:
        return out
    if coef is None or ata is None:
        return None
    # final model, residual noise and score
    reg, rim = model_cols(t, eb)[:2]
    A[:, 0] = reg
    A[:, 1] = rim
    coef = solve_lin()
    fg = A[:, :2] @ coef[:2]
    sig = y - A[:, 2:n_lin] @ coef[2:]
    resid = sig - fg
    sw = score_w / score_w.sum()
    fg_c, sig_c = fg - sw @ fg, sig - sw @ sig
    den = math.sqrt(float((sw * fg_c) @ fg_c) * float((sw * sig_c) @ sig_c))
    score = float(np.clip((sw * fg_c) @ sig_c / den, 0.0, 1.0)) if den > 0 else 0.0
    s2 = float((wts * resid) @ resid) / max(float(wts.sum()) - A.shape[1], 1.0)
    cinv = np.linalg.pinv(ata)
    var = cinv[n_lin : n_lin + 2, n_lin : n_lin + 2] * s2 * corr_area * f * f
    if weak:
        var = np.outer(strong, strong) * float(strong @ var @ strong)
    sigma_formal = math.sqrt(max(float(np.trace(var)), 0.0))
    sigma_jack = f * _jackknife_sigma(A, wts, resid, rows - border, cols - border,
                                      (hl - 2 * border, wl - 2 * border), n_lin, strong if weak else None)
    out.update(sigma=float(max(sigma_formal, sigma_jack)), a=float(coef[0]), c=float(coef[1]), score=score)
    return out


def _refine(img_s, t_nom: PixelTransform, t: PixelTransform, lay: _Layout, *, sigma_px: float, smooth_px: float,
            border: int, rotation: bool, max_iter: int, robust: bool = True, corner_px: float = 10.0,
            corner_weight: float = 0.1, weak_px: float = 1.0, max_points: int | None = None):
    """Sub-pixel fit of shift, edge bias (and rotation), coarse to fine.

    Large images are first fitted at half resolution with the layout
    rendered exactly at every step (shift and edge bias settle to about a
    tenth of a pixel at a quarter of the cost); the full-resolution fit then
    starts from there with one exact rendering, sampled at up to
    ``max_points`` pixels near the edges (see :func:`_gauss_newton`).
    """
    h, w = img_s.shape
    max_points = _MAX_POINTS if max_points is None else max_points
    cw_full = None
    if corner_weight < 1.0 and corner_px > 0:
        cw_full = _corner_weights(lay, t, corner_px, corner_weight, tag="fit")
    eb = 0.0
    common = dict(smooth_px=smooth_px, rotation=rotation, robust=robust, cw_full=cw_full, weak_px=weak_px)
    if min(h, w) >= 400:
        f = 2
        bl = int(math.ceil(3.0 * sigma_px / f)) + 1
        fit = _gauss_newton(_level_image(img_s, f), f, t_nom, t, eb, lay, sigma_px=sigma_px, border=bl,
                            max_iter=6, max_points=max_points // 2, trust_eb=0.0, trust_px=0.0,
                            tol_px=0.1, tol_eb=0.1, final=False, **common)
        if fit is None:
            return None
        t, eb = fit["t"], fit["edge_bias"]
    return _gauss_newton(img_s, 1, t_nom, t, eb, lay, sigma_px=sigma_px, border=border, max_iter=max_iter,
                         max_points=max_points, trust_eb=0.3, trust_px=1.0, tol_px=2e-3, tol_eb=1e-2, final=True,
                         **common)


def _jackknife_sigma(A, wts, resid, rows, cols, shape, n_lin: int, strong, k: int = 4) -> float:
    """Delete-one-block jackknife of the shift over a ``k x k`` grid of image blocks.

    Captures spatially correlated misfit (edge roughness, local print
    variations) that the formal covariance (white noise) misses. Returns the
    1-sigma uncertainty of the shift (pixels, both axes together).
    """
    hh, ww = shape
    block = (rows * k // hh) * k + cols * k // ww
    order = np.argsort(block, kind="stable")
    bounds = np.searchsorted(block[order], np.arange(k * k + 1))
    A = A[order]
    Aw = A * wts[order, None]
    resid = resid[order]
    ata = Aw.T @ A
    atr = Aw.T @ resid
    P = np.eye(A.shape[1])
    if strong is not None:
        P = np.delete(P, n_lin + 1, axis=1)
        P[n_lin : n_lin + 2, n_lin] = strong
    est = []
    for b in range(k * k):
        sl = slice(bounds[b], bounds[b + 1])
        if bounds[b + 1] == bounds[b]:
            continue
        m_b = ata - Aw[sl].T @ A[sl]
        g_b = atr - Aw[sl].T @ resid[sl]
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
    coarse_level: int | None = None,
) -> AlignResult:
    """Align a SEM image to the layout: find the stage error (and a tiny rotation).

    The image is modelled as ``a * region + c * rim + background`` where
    ``region`` and ``rim`` are rendered from the layout (see
    :func:`sem_channels`), ``a`` carries the polarity, ``c >= 0`` the bright
    edge rims, and a quadratic background absorbs charging. A coarse search
    over every whole-pixel shift within ``search_px`` (normalised
    cross-correlation of the whole image, on a pyramid level for large
    images) is followed by a Newton refinement of the shift, a global edge
    bias (printed CD bias, so that features cut by the image border do not
    bias the shift) and, optionally, a rotation, on pixels sampled near the
    layout edges (see the module docstring). About 50-60 ms for a
    1024 x 1024 image with ~50 features on one core.

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
        Sub-pixel refinement (else the coarse peak plus a parabola fit; on
        large images the peak of the half-resolution level, about 0.3 px).
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
        Iterations of the full-resolution fit at most (the half-resolution
        stage takes at most 6).
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
    coarse_level : {None, 1, 2, 4}
        Resolution of the coarse search: 1/``coarse_level`` of the image's.
        None (default) picks 4 from about 800 px, 2 from about 400 px, else 1.
        Use 1 when the only details that tell candidates apart are smaller
        than about 8 px (slower: about 0.1 s more per 1024 px image).

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
    if coarse_level not in (None, 1, 2, 4):
        raise SegsemError(f"align_image: coarse_level must be None, 1, 2 or 4, got {coarse_level!r}")
    h, w = img.shape
    bd = int(math.ceil(3.0 * sigma_px)) + 1
    if min(h, w) < 4 * bd + 8:
        raise SegsemError(f"align_image: image too small ({h}x{w}) for sigma_px={sigma_px}")
    if img.dtype != np.float32 or not img.flags.c_contiguous:
        buf = _scratch("image", "pixels", img.shape)
        np.copyto(buf, img, casting="unsafe")
        img = buf
    if not math.isfinite(float(img.sum(dtype=np.float64))):
        return _fail(transform, "image has NaN/inf pixels")
    polys = list(_iter_polygons(polygons_nm)) if polygons_nm is not None else []
    step = max(1, int(math.sqrt(h * w / 16384.0)))
    lo_hi = np.percentile(img[::step, ::step], [0.5, 99.5])
    if not float(lo_hi[1] - lo_hi[0]) > 0:
        return _fail(transform, "image is blank (no grey-level contrast)")
    img_s = img
    if smooth_px > 0:
        img_s = cv2.GaussianBlur(img, (0, 0), float(smooth_px), dst=_scratch("image", "smoothed", img.shape),
                                 borderType=cv2.BORDER_REFLECT)

    # ---- coarse: correlation of the whole image with the layout channels for every whole-pixel
    # shift, on a pyramid level (1/fc of the resolution) for large images
    fc = _pyramid_factor(h, w) if coarse_level is None else int(coarse_level)
    if min(h, w) // fc < 4 * (int(math.ceil(3.0 * sigma_px / fc)) + 1) + 8:
        fc = 1
    if fc <= 2:
        sig_c, s_c = sigma_px / fc, smooth_px / fc
    else:  # extra smoothing where the rims are narrower than a pixel
        sig_c, s_c = math.sqrt((sigma_px / fc) ** 2 + 1.0), math.sqrt((smooth_px / fc) ** 2 + 1.0)
    bl = int(math.ceil(3.0 * sig_c)) + 1
    ml = int(math.ceil(search_px / fc)) + 1
    pad_c = ml + bl + 2
    lay = _Layout(polys, transform.field_of_view_nm(margin_px=max(pad_c * fc, search_px + bd + 8) + 32))
    rend_c = _render(lay, transform, 0.0, sig_c, pad_c, fc, tag="coarse")
    low = _detrend(_level_image(img_s, fc))
    if fc > 2:
        low = cv2.GaussianBlur(low, (0, 0), 1.0, borderType=cv2.BORDER_REFLECT)
    hl, wl = low.shape
    core = (slice(pad_c - ml + bl, pad_c + hl + ml - bl), slice(pad_c - ml + bl, pad_c + wl + ml - bl))
    reg_l, rim_l = np.ascontiguousarray(rend_c.reg[core]), np.ascontiguousarray(rend_c.rim[core])
    if not polys or float(rim_l.max()) <= 1e-3:
        return _fail(transform, "no layout edges within the field of view (+ search range)")
    tmpl = np.ascontiguousarray(low[bl : hl - bl, bl : wl - bl])
    if not float(tmpl.std()) > 0:
        return _fail(transform, "image is blank (no contrast)")
    # matchTemplate index (i, j) = (ml + sv, ml + su): image pixel (u, v) shows the layout
    # content of nominal pixel (u + su, v + sv) (level pixels): the content appears moved by (-su, -sv).
    r1 = np.nan_to_num(cv2.matchTemplate(reg_l, tmpl, cv2.TM_CCOEFF_NORMED), nan=0.0)
    r2 = np.nan_to_num(cv2.matchTemplate(rim_l, tmpl, cv2.TM_CCOEFF_NORMED), nan=0.0)
    a0 = reg_l[ml : ml + tmpl.shape[0], ml : ml + tmpl.shape[1]].ravel()
    b0 = rim_l[ml : ml + tmpl.shape[0], ml : ml + tmpl.shape[1]].ravel()
    r12 = float(np.corrcoef(a0, b0)[0, 1]) if a0.std() > 0 and b0.std() > 0 else 0.0
    min_sep = max(3.0, 2.0 * sigma_px)
    tones = []
    for tone in {"bright": (1.0,), "dark": (-1.0,), "auto": (1.0, -1.0)}[polarity]:
        sc = _coarse_scores(r1, r2, r12, tone)
        # a plateau must span two pixels of a coarse level to count as a ridge (peaks are ~2 px wide there)
        best, cands, ridge, lab, region_r2 = _plateaus(sc, ml, search_px / fc, ambiguity_tol,
                                                       min_sep if fc == 1 else max(min_sep / fc, 2.0))
        tones.append(dict(tone=tone, map=sc, best=best, cands=cands, ridge=ridge, lab=lab, region_r2=region_r2))
    # Candidates in full-resolution pixels. The coarsest level (1/4) cannot tell near-equal
    # peaks apart reliably: when it has several, they are scored again at half resolution.
    tones.sort(key=lambda x: -x["best"])
    loose = max(0.1, 3.0 * ambiguity_tol)
    peaks = {}
    if fc > 2:
        for rank, tn in enumerate(tones):
            thr = (1.0 - loose) * tn["best"]
            if rank > 0:  # the other tone only matters when it may rival the best
                thr = max(thr, (1.0 - tone_tol - loose) * tones[0]["best"])
            peaks[rank] = _local_maxima(tn["map"], ml, search_px / fc, thr, limit=12)
    if sum(len(p) for p in peaks.values()) > 1 or (peaks and not refine):
        fv = 2
        sig_v = sigma_px / fv
        bv = int(math.ceil(3.0 * sig_v)) + 1
        pad_v = int(math.ceil(search_px / fv)) + bv + 3
        rend_v = _render(lay, transform, 0.0, sig_v, pad_v, fv, tag="verify")
        scorer = _LevelScorer(_level_image(img_s, fv), rend_v.reg, rend_v.rim, pad_v, bv, max_points=16000)
        for rank, tn in enumerate(tones):
            found: list[_Cand] = []
            for lu, lv, _ in peaks[rank]:
                pu, pv = _subpixel_parabola(tn["map"], lv + ml, lu + ml)
                c = scorer.climb(int(round((lu + pu) * fc / fv)), int(round((lv + pv) * fc / fv)), tn["tone"],
                                 search_px / fv)
                c = _Cand(c.su * fv, c.sv * fv, c.score, c.r2 * fv * fv, c.fu * fv, c.fv * fv)
                k = int(tn["lab"][lv + ml, lu + ml])
                if k > 0 and tn["region_r2"].get(k) is not None:
                    c.r2 = tn["region_r2"][k] * fc * fc  # an elongated plateau: ranked by its point nearest zero
                found.append(c)
            found.sort(key=lambda c: -c.score)
            kept: list[_Cand] = []
            for c in found:
                if all(math.hypot(c.su - k.su, c.sv - k.sv) >= min_sep for k in kept):
                    kept.append(c)
            tn["best"] = kept[0].score if kept else -np.inf
            tn["cands"] = [c for c in kept if c.score >= tn["best"] - ambiguity_tol * max(abs(tn["best"]), 1e-6)]
        tones = [tn for tn in tones if tn["cands"]]
        n_eff = scorer.n * scorer.k ** 2 / max(1.0, 4.0 * math.pi * (smooth_px / fv) ** 2)
    else:
        for tn in tones:
            for c in tn["cands"]:
                c.fu, c.fv = _subpixel_parabola(tn["map"], int(c.sv) + ml, int(c.su) + ml)
                c.su, c.sv, c.fu, c.fv, c.r2 = c.su * fc, c.sv * fc, c.fu * fc, c.fv * fc, c.r2 * fc * fc
        n_eff = tmpl.size / max(1.0, 4.0 * math.pi * s_c ** 2)
    tones.sort(key=lambda x: -x["best"])
    top = tones[0]
    tone, best, cands, ridge = top["tone"], top["best"], top["cands"], top["ridge"]
    chosen = min(cands, key=lambda c: (c.r2, -c.score))
    tone_ambiguous = False
    if len(tones) > 1:
        # the other tone (lines <-> spaces) nearly as good at another position?
        rivals = [c for c in tones[1]["cands"] if c.score >= (1.0 - tone_tol) * best
                  and math.hypot(c.su - chosen.su, c.sv - chosen.sv) >= min_sep]
        tone_ambiguous = bool(rivals)
    if tone_ambiguous:
        # pool the candidates of both tones; prior: the layout polygons are the printed material, imaged
        # brighter than the substrate (resist lines on a dark substrate), then nearest nominal
        pool = [(c, tn) for tn in tones for c in tn["cands"]]
        chosen, tn = min(pool, key=lambda ct: (ct[1]["tone"] < 0, ct[0].su ** 2 + ct[0].sv ** 2, -ct[0].score))
        tone, ridge = tn["tone"], ridge or tn["ridge"]
        cands = sorted([c for c, _ in pool], key=lambda c: -c.score)
    # a plateau (ridge) is judged by the refinement's uncertainty when refining
    ambiguous = len(cands) > 1 or tone_ambiguous or (ridge and not refine)
    peak = chosen.score
    # noise significance: correlation of (smoothed) white noise with the smooth layout channels
    significance = peak * math.sqrt(n_eff)
    if peak < min_score or significance < min_significance:
        return _fail(transform, f"no significant match (coarse correlation {peak:.3f}, "
                     f"{significance:.1f} sigma of noise)", score=peak)
    su, sv = chosen.su, chosen.sv
    d0 = np.array([-(su + chosen.fu), -(sv + chosen.fv)])  # content displacement, pixels
    t = transform.with_offset(_content_shift_to_offset(transform, d0))
    score, res_px, edge_bias, weak = peak, 0.5, 0.0, False
    pol = "bright" if tone > 0 else "dark"

    # ---- fine: Gauss-Newton on the layout model, half then full resolution
    if refine:
        fit = _refine(img_s, transform, t, lay, sigma_px=sigma_px, smooth_px=smooth_px, border=bd,
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
    cand_px = tuple((-c.su, -c.sv) for c in cands) if ambiguous else ()
    if ambiguous:
        if tone_ambiguous:
            what = ("lines and spaces (the polygon tone) cannot be told apart; kept the candidate with the "
                    "polygons bright, nearest nominal (pass polarity='bright' or 'dark')")
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
        tone_ambiguous=bool(tone_ambiguous),
    )
