"""Printed-shape model: from design polygons to the printed (resist) contours.

Everything is in layout nanometres (``x`` right, ``y`` up) on shapely
geometries; randomness comes only from the ``numpy.random.Generator`` passed in,
so a given generator state always prints the same shapes.

The model is geometric, in this order (see :func:`print_features`):

1. **CD bias** -- every polygon grows by ``bias_nm`` (signed; negative shrinks)
   plus a per-feature random term of standard deviation ``bias_sigma_nm``
   (mitred offset, so the corners stay sharp until step 3).
2. **Line-end pullback** -- the short ends of elongated polygons (an edge no
   longer than ``line_end_max_nm`` whose two corners are convex and whose two
   neighbouring edges are at least 1.5 times longer) move inwards by
   ``pullback_nm``. Edges lying on the ``protect`` box (where the caller clipped
   a long polygon) are never line ends.
3. **Corner rounding** -- an opening (erode then dilate by ``corner_radius_nm``)
   rounds convex corners; a closing by ``concave_radius_nm`` rounds concave
   ones. When a feature is too small for the radius (a square of side ``s <
   2 r``, a thin arm), the radius shrinks until nothing but the corners is lost,
   so small squares print as rounded squares or, at ``s ~ 2 r``, as circles.
4. **Defects** (probability ``defect_rate`` per feature): ``"missing"``
   (dropped), ``"neck"`` (a local pinch of an elongated feature to 35-65 % of
   its width) or ``"bridge"`` (a rounded neck of material joining the feature
   to its nearest neighbour within ``bridge_max_gap_nm``; both become one
   printed feature).
5. **Line-edge roughness** -- every ring is resampled along its arc length and
   displaced along its normal by Gaussian noise of standard deviation
   ``ler_sigma_nm`` and Gaussian autocorrelation
   ``C(s) = sigma^2 exp(-(s / ler_corr_nm)^2)`` (periodic along the ring).
6. **Merging** -- printed features that touch or overlap (large bias, LER,
   bridges) are merged into one feature with defect ``"bridge"``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Sequence

import numpy as np
import shapely
from shapely import affinity
from shapely.geometry import LineString, Polygon
from shapely.geometry.polygon import orient
from shapely.ops import nearest_points

from ..errors import SegsemError

DEFECT_KINDS = ("bridge", "neck", "missing")
_QUAD = 16  # segments per quarter circle in buffers: arc error 0.1 % of the radius


@dataclass(frozen=True)
class LithoParams:
    """Parameters of the printed-shape model (all lengths in nm).

    Attributes
    ----------
    bias_nm : signed growth of every printed feature (edge moves out by this).
    bias_sigma_nm : standard deviation of an extra per-feature bias.
    corner_radius_nm : radius of convex corners.
    concave_radius_nm : radius of concave (inner) corners.
    pullback_nm : how far each line end moves back (before rounding).
    line_end_max_nm : longest edge that can be a line end.
    ler_sigma_nm : line-edge roughness, standard deviation of the normal displacement.
    ler_corr_nm : correlation length of the roughness along the edge.
    defect_rate : probability that a feature gets a defect.
    bridge_max_gap_nm : largest gap a bridge defect spans.
    """

    bias_nm: float = 0.0
    bias_sigma_nm: float = 0.0
    corner_radius_nm: float = 8.0
    concave_radius_nm: float = 5.0
    pullback_nm: float = 5.0
    line_end_max_nm: float = 80.0
    ler_sigma_nm: float = 1.0
    ler_corr_nm: float = 15.0
    defect_rate: float = 0.0
    bridge_max_gap_nm: float = 60.0

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if not math.isfinite(v):
                raise SegsemError(f"litho parameter '{f.name}': {v!r} is not a finite number")
        for name in ("bias_sigma_nm", "corner_radius_nm", "concave_radius_nm", "pullback_nm",
                     "line_end_max_nm", "ler_sigma_nm", "bridge_max_gap_nm"):
            if getattr(self, name) < 0:
                raise SegsemError(f"litho parameter '{name}': {getattr(self, name)!r} must be >= 0")
        if self.ler_corr_nm <= 0:
            raise SegsemError(f"litho parameter 'ler_corr_nm': {self.ler_corr_nm!r} must be > 0")
        if not 0.0 <= self.defect_rate <= 1.0:
            raise SegsemError(f"litho parameter 'defect_rate': {self.defect_rate!r} must be in [0, 1]")

    def margin_nm(self) -> float:
        """How far printing can move an edge: clip design polygons this much beyond the view."""
        return (abs(self.bias_nm) + 4 * self.bias_sigma_nm + 2 * self.corner_radius_nm
                + 2 * self.concave_radius_nm + self.pullback_nm + 6 * self.ler_sigma_nm + 20.0)


@dataclass
class PrintedFeature:
    """One printed feature.

    ``design_index`` is the caller's index of the design polygon it comes from;
    ``merged`` lists further design indices joined to it by a bridge.
    ``shape`` is the printed polygon (nm), None for a ``"missing"`` feature.
    ``defect`` is None, ``"bridge"``, ``"neck"`` or ``"missing"``.
    """

    design_index: int
    shape: Polygon | None
    defect: str | None = None
    merged: list[int] = field(default_factory=list)


# ----------------------------------------------------------------------------
# single-polygon operations
# ----------------------------------------------------------------------------

def _polys(geom) -> list[Polygon]:
    """The non-empty polygons in a shapely geometry (dropping slivers below 1e-6 nm^2)."""
    if geom is None or geom.is_empty:
        return []
    if isinstance(geom, Polygon):
        return [geom] if geom.area > 1e-6 else []
    if hasattr(geom, "geoms"):
        out = []
        for g in geom.geoms:
            out.extend(_polys(g))
        return out
    return []


def _largest(geom) -> Polygon | None:
    ps = _polys(geom)
    return max(ps, key=lambda p: p.area) if ps else None


def bias_polygon(poly: Polygon, bias_nm: float) -> list[Polygon]:
    """Grow (``bias_nm > 0``) or shrink a polygon with mitred corners.

    Returns the resulting polygons (a shrink can split a feature or remove it).
    """
    if bias_nm == 0:
        return _polys(poly)
    return _polys(poly.buffer(bias_nm, join_style="mitre", mitre_limit=10.0))


def _on_box_edge(p0, p1, protect: tuple[float, float, float, float] | None, tol=1e-6) -> bool:
    if protect is None:
        return False
    x0, y0, x1, y1 = protect
    for k, lim in ((0, x0), (0, x1), (1, y0), (1, y1)):
        if abs(p0[k] - lim) < tol and abs(p1[k] - lim) < tol:
            return True
    return False


def pull_back_line_ends(poly: Polygon, pullback_nm: float, *, max_end_nm: float,
                        protect: tuple[float, float, float, float] | None = None) -> Polygon:
    """Move the line ends of an elongated polygon inwards by ``pullback_nm``.

    A line end is an exterior edge of length ``<= max_end_nm`` with two convex
    corners whose neighbouring edges are both at least 1.5 times longer than it.
    Edges on the boundary of the ``protect`` box ``(xmin, ymin, xmax, ymax)``
    are not line ends (they are where the caller clipped the polygon).
    """
    if pullback_nm <= 0:
        return poly
    p = orient(poly, 1.0)  # exterior counter-clockwise: interior on the left
    xy = np.asarray(p.exterior.coords)[:-1]
    n = len(xy)
    if n < 4:
        return poly
    e = np.roll(xy, -1, axis=0) - xy  # edge i: xy[i] -> xy[i+1]
    length = np.hypot(e[:, 0], e[:, 1])
    cut = []
    for i in range(n):
        li = length[i]
        if li <= 1e-9 or li > max_end_nm:
            continue
        lp, ln = length[i - 1], length[(i + 1) % n]
        if lp < 1.5 * li or ln < 1.5 * li or lp <= pullback_nm or ln <= pullback_nm:
            continue
        ep, ei, en = e[i - 1], e[i], e[(i + 1) % n]
        if ep[0] * ei[1] - ep[1] * ei[0] <= 0 or ei[0] * en[1] - ei[1] * en[0] <= 0:
            continue  # a concave corner: not a line end
        a, b = xy[i], xy[(i + 1) % n]
        if _on_box_edge(a, b, protect):
            continue
        t = ei / li
        nrm = np.array([-t[1], t[0]])  # left normal = inwards
        eps = 1e-3
        rect = Polygon([a - t * eps, b + t * eps, b + t * eps + nrm * pullback_nm, a - t * eps + nrm * pullback_nm])
        cut.append(rect)
    if not cut:
        return poly
    out = _largest(p.difference(shapely.union_all(cut)))
    return out if out is not None else poly


def _opening_loss(p: Polygon, r: float) -> float:
    """Area an opening of radius ``r`` removes at the convex corners of ``p`` (exact for straight edges)."""
    p = orient(p, 1.0)
    loss = 0.0
    for ring in [p.exterior, *p.interiors]:
        xy = np.asarray(ring.coords)[:-1]
        if len(xy) < 3:
            continue
        ein = xy - np.roll(xy, 1, axis=0)
        eout = np.roll(xy, -1, axis=0) - xy
        cross = ein[:, 0] * eout[:, 1] - ein[:, 1] * eout[:, 0]
        dot = (ein * eout).sum(axis=1)
        turn = np.arctan2(cross, dot)  # > 0 at a convex corner (material on the left)
        turn = turn[turn > 1e-9]
        alpha = math.pi - turn  # interior angle
        loss += float(np.sum(r * r * (1.0 / np.tan(alpha / 2) - (math.pi - alpha) / 2)))
    return loss


def round_corners(poly: Polygon, convex_nm: float, concave_nm: float) -> list[Polygon]:
    """Round convex corners (opening) and concave corners (closing).

    The convex radius is reduced (by factors of 0.8) until the opening removes
    no more than the corner areas, so thin parts and small squares survive:
    a square of side ``s <= 2 * convex_nm`` prints as a circle of diameter ``s``.
    """
    out = poly
    if convex_nm > 0:
        area = poly.area

        def opened(r):
            cand = poly.buffer(-r, quad_segs=_QUAD)
            if cand.is_empty:
                return None
            cand = cand.buffer(r, quad_segs=_QUAD)
            if area - cand.area <= 1.05 * _opening_loss(poly, r) + 1e-3 * area + 0.05:
                return cand
            return None

        try:  # never erode past the widest inscribed circle
            r_hi = min(convex_nm, 0.999 * shapely.maximum_inscribed_circle(poly, 0.01).length)
        except Exception:  # pragma: no cover - degenerate input
            r_hi = convex_nm
        best = opened(r_hi)
        if best is None:  # a thin part would vanish: largest radius that keeps it
            lo, hi = 0.0, r_hi
            for _ in range(7):
                mid = 0.5 * (lo + hi)
                cand = opened(mid)
                if cand is None:
                    hi = mid
                else:
                    lo, best = mid, cand
        out = best if best is not None else poly
    if concave_nm > 0:
        out = out.buffer(concave_nm, quad_segs=_QUAD).buffer(-concave_nm, quad_segs=_QUAD)
    return _polys(out)


def _ler_ring(xy: np.ndarray, sigma: float, corr: float, rng: np.random.Generator, step: float) -> np.ndarray:
    """Resample a closed ring (N, 2) by arc length and displace it along its right normal."""
    seg = np.roll(xy, -1, axis=0) - xy
    seglen = np.hypot(seg[:, 0], seg[:, 1])
    perim = float(seglen.sum())
    n = max(8, int(math.ceil(perim / step)))
    s_vert = np.concatenate([[0.0], np.cumsum(seglen)])
    closed = np.vstack([xy, xy[:1]])
    s = np.arange(n) * (perim / n)
    pts = np.stack([np.interp(s, s_vert, closed[:, 0]), np.interp(s, s_vert, closed[:, 1])], axis=1)
    # periodic Gaussian-correlated noise: amplitude filter sqrt(PSD) of C(s) = sigma^2 exp(-(s/corr)^2)
    f = np.fft.fftfreq(n, d=perim / n)
    h = np.exp(-0.5 * (math.pi * f * corr) ** 2)
    white = rng.standard_normal(n)
    noise = np.fft.ifft(np.fft.fft(white) * h).real
    noise *= sigma / math.sqrt(float(np.mean(h * h)))
    tang = np.roll(pts, -1, axis=0) - np.roll(pts, 1, axis=0)
    tl = np.hypot(tang[:, 0], tang[:, 1])
    tl[tl == 0] = 1.0
    right = np.stack([tang[:, 1] / tl, -tang[:, 0] / tl], axis=1)
    return pts + right * noise[:, None]


def add_ler(poly: Polygon, *, sigma_nm: float, corr_nm: float, rng: np.random.Generator,
            step_nm: float | None = None) -> Polygon | None:
    """Add line-edge roughness: random normal displacement along every ring.

    The displacement is Gaussian with standard deviation ``sigma_nm`` and
    autocorrelation ``exp(-(s / corr_nm)^2)`` along the arc length ``s``;
    positive values push the edge out of the material. Rings are resampled every
    ``step_nm`` (default ``min(2, corr_nm / 6)``; the resampled polygon *is*
    the printed shape, so the step only limits the finest roughness scale). Returns the largest valid
    polygon of the result (None if nothing is left).
    """
    if sigma_nm <= 0:
        return poly
    step = step_nm if step_nm is not None else min(2.0, corr_nm / 6.0)
    p = orient(poly, 1.0)  # exterior CCW, holes CW: material on the left, outwards on the right
    ext = _ler_ring(np.asarray(p.exterior.coords)[:-1], sigma_nm, corr_nm, rng, step)
    holes = [_ler_ring(np.asarray(r.coords)[:-1], sigma_nm, corr_nm, rng, step) for r in p.interiors]
    out = Polygon(ext, holes)
    if not out.is_valid:
        out = shapely.make_valid(out)
    return _largest(out)


def _width_estimate(p: Polygon) -> float:
    """Typical width of a feature, ``2 * area / perimeter`` (exact for long lines)."""
    return 2.0 * p.area / max(p.length, 1e-9)


def _neck_axis(p: Polygon):
    """(centre, unit long axis, length, width) of a nearly rectangular elongated polygon, else None."""
    mrr = p.minimum_rotated_rectangle
    if not isinstance(mrr, Polygon):
        return None
    xy = np.asarray(mrr.exterior.coords)[:4]
    e1, e2 = xy[1] - xy[0], xy[2] - xy[1]
    l1, l2 = float(np.hypot(*e1)), float(np.hypot(*e2))
    if min(l1, l2) <= 0:
        return None
    if l1 >= l2:
        axis, length, width = e1 / l1, l1, l2
    else:
        axis, length, width = e2 / l2, l2, l1
    if length < 3 * width or p.area < 0.85 * length * width:
        return None
    return xy.mean(axis=0), axis, length, width


def make_neck(poly: Polygon, rng: np.random.Generator, *, smooth_nm: float = 2.0) -> Polygon | None:
    """Pinch an elongated, nearly rectangular feature to 35-65 % of its width.

    The pinch sits in the middle 60 % of the feature and is 1-2.5 widths long,
    cut by two ellipses (one per side). Returns None if the feature is not eligible.
    """
    ax = _neck_axis(poly)
    if ax is None:
        return None
    c, a, length, width = ax
    perp = np.array([-a[1], a[0]])
    t = rng.uniform(-0.3, 0.3) * length
    keep = rng.uniform(0.35, 0.65)
    along = rng.uniform(1.0, 2.5) * width
    depth = width * (1 - keep) / 2
    m = c + t * a
    angle = math.degrees(math.atan2(a[1], a[0]))
    cuts = []
    for side in (1.0, -1.0):
        centre = m + side * perp * (width / 2 + width - depth)
        ell = shapely.Point(0, 0).buffer(1.0, quad_segs=_QUAD)
        ell = affinity.scale(ell, along / 2, width, origin=(0, 0))
        ell = affinity.rotate(ell, angle, origin=(0, 0))
        cuts.append(affinity.translate(ell, centre[0], centre[1]))
    out = _largest(poly.difference(shapely.union_all(cuts)))
    if out is None:
        return None
    if smooth_nm > 0:
        sm = _largest(out.buffer(-smooth_nm, quad_segs=_QUAD).buffer(smooth_nm, quad_segs=_QUAD))
        out = sm if sm is not None else out
    return out


def make_bridge(a: Polygon, b: Polygon, rng: np.random.Generator, *, round_nm: float = 4.0) -> Polygon | None:
    """Join two features by a neck of material across their closest gap.

    The bridge is 30-70 % as wide as the narrower feature and its junctions are
    rounded with radius ``round_nm``. Returns the merged polygon (None when the
    union is not a single polygon).
    """
    p, q = nearest_points(a, b)
    p = np.array(p.coords[0])
    q = np.array(q.coords[0])
    gap = float(np.hypot(*(q - p)))
    if gap < 1e-6:
        return _largest(a.union(b))
    u = (q - p) / gap
    bw = rng.uniform(0.3, 0.7) * min(_width_estimate(a), _width_estimate(b))
    bw = max(bw, 1.0)
    neck = LineString([p - 2 * u, q + 2 * u]).buffer(bw / 2, cap_style="flat")
    merged = shapely.union_all([a, b, neck])
    if round_nm > 0:
        local = neck.buffer(2 * round_nm + bw)
        closed = merged.buffer(round_nm, quad_segs=_QUAD).buffer(-round_nm, quad_segs=_QUAD)
        merged = merged.union(closed.intersection(local))
    out = _polys(merged)
    return out[0] if len(out) == 1 else None


# ----------------------------------------------------------------------------
# the whole model
# ----------------------------------------------------------------------------

def print_features(polygons: Sequence[Polygon], *, params: LithoParams, rng: np.random.Generator,
                   design_indices: Sequence[int] | None = None,
                   protect: tuple[float, float, float, float] | None = None) -> list[PrintedFeature]:
    """Print design polygons into printed features (see the module docstring for the model).

    Parameters
    ----------
    polygons : design polygons in nm (shapely, without holes or with).
    params : the model parameters.
    rng : the only source of randomness (the result is a function of its state).
    design_indices : index of each polygon in the caller's layout (default 0..n-1).
    protect : ``(xmin, ymin, xmax, ymax)`` box the polygons were clipped to;
        edges on it are not treated as line ends.

    Returns
    -------
    list of :class:`PrintedFeature`, one per printed feature (a design polygon
    that splits gives several; a missing one keeps ``shape=None``; bridged ones
    are merged into the first).
    """
    if design_indices is None:
        design_indices = list(range(len(polygons)))
    if len(design_indices) != len(polygons):
        raise SegsemError("print_features: design_indices and polygons differ in length")
    feats: list[PrintedFeature] = []
    for idx, poly in zip(design_indices, polygons):
        if not isinstance(poly, Polygon):
            raise SegsemError(f"print_features: design polygon {idx} is a {type(poly).__name__}, not a Polygon")
        bias = params.bias_nm + (rng.normal(0.0, params.bias_sigma_nm) if params.bias_sigma_nm > 0 else 0.0)
        for part in bias_polygon(poly, bias):
            part = pull_back_line_ends(part, params.pullback_nm, max_end_nm=params.line_end_max_nm, protect=protect)
            for rounded in round_corners(part, params.corner_radius_nm, params.concave_radius_nm):
                feats.append(PrintedFeature(int(idx), rounded))

    if params.defect_rate > 0 and feats:
        _add_defects(feats, params, rng)

    for f in feats:
        if f.shape is not None and params.ler_sigma_nm > 0:
            f.shape = add_ler(f.shape, sigma_nm=params.ler_sigma_nm, corr_nm=params.ler_corr_nm, rng=rng)
            if f.shape is None:
                f.defect = "missing"
    return _merge_touching(feats)


def _add_defects(feats: list[PrintedFeature], params: LithoParams, rng: np.random.Generator) -> None:
    tree = shapely.STRtree([f.shape for f in feats])
    consumed: set[int] = set()
    for i, f in enumerate(feats):
        if i in consumed or f.shape is None or f.defect is not None:
            continue
        if rng.random() >= params.defect_rate:
            continue
        kinds = ["missing"]
        if _neck_axis(f.shape) is not None:
            kinds.append("neck")
        partner = None
        near = tree.query(f.shape.buffer(params.bridge_max_gap_nm))
        best = math.inf
        for j in sorted(int(k) for k in near):
            g = feats[j]
            if j == i or j in consumed or g.shape is None or g.defect is not None:
                continue
            dist = f.shape.distance(g.shape)
            if 0 < dist <= params.bridge_max_gap_nm and dist < best:
                best, partner = dist, j
        if partner is not None:
            kinds.append("bridge")
        kind = kinds[int(rng.integers(len(kinds)))]
        if kind == "missing":
            f.shape, f.defect = None, "missing"
        elif kind == "neck":
            necked = make_neck(f.shape, rng)
            if necked is not None:
                f.shape, f.defect = necked, "neck"
        else:
            g = feats[partner]
            merged = make_bridge(f.shape, g.shape, rng, round_nm=max(params.concave_radius_nm, 2.0))
            if merged is not None:
                f.shape, f.defect = merged, "bridge"
                f.merged.append(g.design_index)
                f.merged.extend(g.merged)
                g.shape, g.defect = None, "merged"
                consumed.add(partner)
    feats[:] = [f for f in feats if f.defect != "merged"]


def _merge_touching(feats: list[PrintedFeature]) -> list[PrintedFeature]:
    """Union printed features that touch or overlap; the result is marked ``"bridge"``."""
    live = [i for i, f in enumerate(feats) if f.shape is not None]
    if len(live) < 2:
        return feats
    shapes = [feats[i].shape for i in live]
    tree = shapely.STRtree(shapes)
    a, b = tree.query(shapes, predicate="intersects")
    parent = list(range(len(live)))

    def find(k):
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for x, y in zip(a.tolist(), b.tolist()):
        if x != y:
            rx, ry = find(x), find(y)
            if rx != ry:
                parent[max(rx, ry)] = min(rx, ry)
    groups: dict[int, list[int]] = {}
    for k in range(len(live)):
        groups.setdefault(find(k), []).append(k)
    if all(len(g) == 1 for g in groups.values()):
        return feats
    drop: set[int] = set()
    for root, members in groups.items():
        if len(members) == 1:
            continue
        first = feats[live[members[0]]]
        union = shapely.union_all([shapes[k] for k in members])
        parts = _polys(union)
        first.shape = max(parts, key=lambda p: p.area)
        first.defect = "bridge"
        for k in members[1:]:
            other = feats[live[k]]
            first.merged.append(other.design_index)
            first.merged.extend(other.merged)
            drop.add(live[k])
    return [f for i, f in enumerate(feats) if i not in drop]


__all__ = [
    "DEFECT_KINDS", "LithoParams", "PrintedFeature", "add_ler", "bias_polygon", "make_bridge",
    "make_neck", "print_features", "pull_back_line_ends", "round_corners",
]
