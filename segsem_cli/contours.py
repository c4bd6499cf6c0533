"""Small geometry helpers for pixel-space contours.

Conventions (see :mod:`segsem_cli.transform`): continuous pixel coordinates
``(u, v)``, ``u`` to the right (columns), ``v`` down (rows); pixel ``(r, c)``
covers ``[c, c+1) x [r, r+1)`` and its centre is ``(c + 0.5, r + 0.5)``.
A contour is an ``(N, 2)`` float array of ``(u, v)``, closed implicitly (the
last vertex is not a repeat of the first).

Orientation: :func:`signed_area` is the shoelace sum in the ``(u, v)`` plane
taken as ordinary math axes. A *positive* contour has positive signed area;
on screen (``v`` down) it runs clockwise. :func:`normals` returns outward unit
normals whatever the orientation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import SegsemError

__all__ = [
    "as_contour",
    "usable_polygon",
    "polygon_iou",
    "polygon_ious",
    "signed_area",
    "polygon_area",
    "orient",
    "perimeter",
    "resample_closed",
    "normals",
    "coarse_contours",
    "CoarseContour",
    "polygon_mask",
    "touches_border",
    "associate",
    "Association",
    "features_covered",
]


def as_contour(contour, *, name: str = "contour", min_points: int = 3) -> np.ndarray:
    """Validate and return a closed contour as an ``(N, 2)`` float64 array.

    A repeated closing vertex (last == first) is dropped.

    Raises
    ------
    SegsemError
        If the array is not ``(N, 2)``, has fewer than ``min_points`` distinct
        vertices, or holds non-finite values.
    """
    a = np.asarray(contour, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != 2:
        raise SegsemError(f"{name}: expected an (N, 2) array of (u, v), got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise SegsemError(f"{name}: contains non-finite coordinates")
    if len(a) > 1 and np.allclose(a[0], a[-1]):
        a = a[:-1]
    if len(a) < min_points:
        raise SegsemError(f"{name}: needs at least {min_points} vertices, got {len(a)}")
    return a


def usable_polygon(polygon, *, min_area: float = 1e-6) -> bool:
    """True for an ``(N >= 3, 2)`` finite polygon with non-zero area (a feature worth extracting)."""
    a = np.asarray(polygon, dtype=np.float64)
    return bool(a.ndim == 2 and a.shape[1] == 2 and len(a) >= 3 and np.all(np.isfinite(a))
                and abs(signed_area(a)) > min_area)


def polygon_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two filled ``(u, v)`` polygons (0 when either is degenerate)."""
    return float(polygon_ious([a], [b])[0])


def polygon_ious(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> np.ndarray:
    """Pairwise IoU ``a[i]`` vs ``b[i]`` of filled polygons, vectorised (0 where either is degenerate)."""
    import shapely

    if len(a) != len(b):
        raise SegsemError(f"polygon_ious: {len(a)} polygons against {len(b)}")
    out = np.zeros(len(a))
    ok = [i for i in range(len(a)) if usable_polygon(a[i]) and usable_polygon(b[i])]
    if not ok:
        return out
    pa = _shapely_polys([a[i] for i in ok])
    pb = _shapely_polys([b[i] for i in ok])
    inter = shapely.area(shapely.intersection(pa, pb))
    union = shapely.area(pa) + shapely.area(pb) - inter
    out[ok] = np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)
    return out


def signed_area(contour: np.ndarray) -> float:
    """Shoelace area in the ``(u, v)`` plane (positive = counter-clockwise in math axes)."""
    c = np.asarray(contour, dtype=np.float64)
    u, v = c[:, 0], c[:, 1]
    return 0.5 * float(np.dot(u, np.roll(v, -1)) - np.dot(v, np.roll(u, -1)))


def polygon_area(contour: np.ndarray) -> float:
    """Unsigned polygon area in px^2."""
    return abs(signed_area(contour))


def orient(contour: np.ndarray, positive: bool = True) -> np.ndarray:
    """Return the contour with positive (default) or negative signed area."""
    c = np.asarray(contour, dtype=np.float64)
    if (signed_area(c) >= 0) != positive:
        c = c[::-1].copy()
    return c


def perimeter(contour: np.ndarray) -> float:
    """Length of the closed polyline in px."""
    c = np.asarray(contour, dtype=np.float64)
    return float(np.sum(np.hypot(*(np.roll(c, -1, axis=0) - c).T)))


def resample_closed(contour: np.ndarray, step_px: float = 1.0, *, min_points: int = 8) -> np.ndarray:
    """Resample a closed contour at (nearly) uniform arc-length spacing.

    The number of points is ``max(min_points, round(perimeter / step_px))`` so
    the actual spacing is within a fraction of ``step_px``. Orientation and the
    starting vertex are kept.
    """
    if not step_px > 0:
        raise SegsemError(f"resample_closed: step_px must be > 0, got {step_px!r}")
    c = as_contour(contour)
    seg = np.hypot(*(np.roll(c, -1, axis=0) - c).T)
    keep = seg > 1e-12
    if not np.all(keep):  # drop duplicate consecutive vertices
        c = c[keep]
        seg = seg[keep]
        if len(c) < 3:
            raise SegsemError("resample_closed: contour collapses to fewer than 3 distinct vertices")
    s = np.concatenate([[0.0], np.cumsum(seg)])
    total = s[-1]
    n = max(int(min_points), int(round(total / step_px)))
    t = np.arange(n) * (total / n)
    closed = np.vstack([c, c[:1]])
    return np.column_stack([np.interp(t, s, closed[:, 0]), np.interp(t, s, closed[:, 1])])


def normals(contour: np.ndarray, *, smooth: float = 0.0) -> np.ndarray:
    """Outward unit normals ``(N, 2)`` of a closed contour.

    Tangents are central differences (``smooth`` > 0 first applies a circular
    Gaussian of that many samples to the coordinates, which steadies the
    normals at sharp corners). Works for either orientation.
    """
    c = np.asarray(contour, dtype=np.float64)
    if smooth > 0:
        from scipy.ndimage import gaussian_filter1d

        c = gaussian_filter1d(c, smooth, axis=0, mode="wrap")
    t = np.roll(c, -1, axis=0) - np.roll(c, 1, axis=0)
    n = np.column_stack([t[:, 1], -t[:, 0]])  # outward for positive orientation
    if signed_area(c) < 0:
        n = -n
    norm = np.hypot(n[:, 0], n[:, 1])
    norm[norm == 0] = 1.0
    return n / norm[:, None]


@dataclass(frozen=True)
class CoarseContour:
    """An iso-line found by :func:`coarse_contours`: ``(u, v)`` points, closed flag, signed area."""

    points: np.ndarray
    closed: bool
    area: float


def coarse_contours(image: np.ndarray, level: float, *, min_area: float = 4.0,
                    min_points: int = 6) -> list[CoarseContour]:
    """Iso-lines of ``image`` at ``level`` (marching squares), in ``(u, v)`` px.

    Uses :func:`skimage.measure.find_contours` (row, column at pixel centres)
    and converts to ``(u, v) = (col + 0.5, row + 0.5)``. Closed contours are
    returned with the repeated end vertex removed; contours that end on the
    image border are returned with ``closed=False``. Closed contours with
    ``|area| < min_area`` px^2 are dropped (noise specks).
    """
    from skimage.measure import find_contours

    img = np.asarray(image)
    if img.ndim != 2:
        raise SegsemError(f"coarse_contours: expected a 2-D image, got shape {img.shape}")
    out: list[CoarseContour] = []
    for rc in find_contours(img, float(level)):
        if len(rc) < min_points:
            continue
        closed = bool(np.allclose(rc[0], rc[-1]))
        uv = np.column_stack([rc[:, 1] + 0.5, rc[:, 0] + 0.5])
        if closed:
            uv = uv[:-1]
            a = signed_area(uv)
            if abs(a) < min_area:
                continue
        else:
            a = 0.0
        out.append(CoarseContour(uv, closed, a))
    return out


def polygon_mask(contour: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Rasterise a ``(u, v)`` polygon: True for pixels whose centre lies inside.

    Parameters
    ----------
    contour : (N, 2) polygon in ``(u, v)`` px (any orientation).
    shape : output ``(H, W)``.
    """
    from skimage.draw import polygon as draw_polygon

    c = np.asarray(contour, dtype=np.float64)
    mask = np.zeros(shape, dtype=bool)
    rr, cc = draw_polygon(c[:, 1] - 0.5, c[:, 0] - 0.5, shape=shape)
    mask[rr, cc] = True
    return mask


def touches_border(contour: np.ndarray, shape: tuple[int, int], *, margin_px: float = 1.0) -> bool:
    """True when any vertex lies within ``margin_px`` of the image border ``[0, W] x [0, H]``."""
    c = np.asarray(contour, dtype=np.float64)
    h, w = shape
    return bool(np.any((c[:, 0] < margin_px) | (c[:, 0] > w - margin_px)
                       | (c[:, 1] < margin_px) | (c[:, 1] > h - margin_px)))


@dataclass(frozen=True)
class Association:
    """Which coarse contour belongs to one layout feature.

    ``index`` is the chosen contour (or -1), ``iou`` its overlap with the
    layout polygon (intersection over union of the filled shapes), and
    ``shared_with`` the other features whose best contour is the same one
    (a bridge: one printed shape covering several layout features).
    """

    index: int
    iou: float
    shared_with: tuple[int, ...] = ()


def _shapely_polys(contours: Sequence[np.ndarray]):
    import shapely

    if len(contours) == 0:
        return np.array([], dtype=object)
    arrs = [np.asarray(c, dtype=np.float64) for c in contours]
    idx = np.repeat(np.arange(len(arrs)), [len(a) for a in arrs])
    polys = shapely.polygons(shapely.linearrings(np.vstack(arrs), indices=idx))
    if len(polys):
        bad = ~shapely.is_valid(polys)
        if np.any(bad):
            polys[bad] = shapely.buffer(polys[bad], 0.0)
    return polys


def associate(feature_polys: Sequence[np.ndarray], contours: Sequence[np.ndarray], *,
              min_iou: float = 0.2) -> list[Association]:
    """Associate each layout feature polygon with the closed contour that overlaps it best.

    Overlap is the intersection over union of the filled polygons (shapely,
    with an STRtree so the cost grows with the number of overlapping pairs,
    not features x contours). A feature whose best IoU is below ``min_iou``
    gets ``index=-1``, as does a degenerate polygon (fewer than 3 vertices or
    zero area). When the same contour is the best match of several features,
    each of them lists the others in ``shared_with``.
    """
    import shapely

    n_all = len(feature_polys)
    result_all = [Association(-1, 0.0) for _ in range(n_all)]
    keep = [i for i, p in enumerate(feature_polys) if usable_polygon(p)]  # degenerate: no match
    if not keep or len(contours) == 0:
        return result_all
    if len(keep) < n_all:
        sub = associate([feature_polys[i] for i in keep], contours, min_iou=min_iou)
        for i, a in zip(keep, sub):
            result_all[i] = Association(a.index, a.iou, tuple(keep[j] for j in a.shared_with))
        return result_all
    n_f = n_all
    result = result_all
    fp = _shapely_polys(feature_polys)
    cp = _shapely_polys(contours)
    tree = shapely.STRtree(cp)
    fi, ci = tree.query(fp, predicate="intersects")
    if len(fi) == 0:
        return result
    inter = shapely.area(shapely.intersection(fp[fi], cp[ci]))
    union = shapely.area(fp[fi]) + shapely.area(cp[ci]) - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)
    best_idx = np.full(n_f, -1)
    best_iou = np.zeros(n_f)
    order = np.argsort(iou)  # ascending: later (better) pairs overwrite
    best_idx[fi[order]] = ci[order]
    best_iou[fi[order]] = iou[order]
    best_idx[best_iou < min_iou] = -1
    owners: dict[int, list[int]] = {}
    for f, c in enumerate(best_idx):
        if c >= 0:
            owners.setdefault(int(c), []).append(f)
    for f in range(n_f):
        c = int(best_idx[f])
        if c < 0:
            result[f] = Association(-1, float(best_iou[f]))
            continue
        others = tuple(o for o in owners[c] if o != f)
        result[f] = Association(c, float(best_iou[f]), others)
    return result


def features_covered(contours: Sequence[np.ndarray], feature_polys: Sequence[np.ndarray], *,
                     min_fraction: float = 0.5) -> list[list[int]]:
    """For each closed contour, the features whose polygon it covers by at least ``min_fraction`` of their area.

    A printed shape that covers two or more layout features is a bridge (merge).
    """
    import shapely

    out: list[list[int]] = [[] for _ in contours]
    keep = [i for i, p in enumerate(feature_polys) if usable_polygon(p)]  # degenerate ones cover nothing
    if len(contours) == 0 or len(keep) == 0:
        return out
    cp = _shapely_polys(contours)
    fp = _shapely_polys([feature_polys[i] for i in keep])
    tree = shapely.STRtree(fp)
    ci, fi = tree.query(cp, predicate="intersects")
    if len(ci) == 0:
        return out
    inter = shapely.area(shapely.intersection(cp[ci], fp[fi]))
    frac = inter / np.maximum(shapely.area(fp[fi]), 1e-12)
    for c, f, x in zip(ci, fi, frac):
        if x >= min_fraction:
            out[int(c)].append(keep[int(f)])
    return out
