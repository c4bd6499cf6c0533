"""Fallback ``threshold``: iso-contours of the smoothed image, then sub-pixel edge refinement.

Stages (all vectorised; one pass over the image, one batched refinement):

1. smooth (Gaussian ``coarse_sigma``) and pick a two-class level (Otsu by
   default, or ``level=<grey>``);
2. iso-contours at that level (marching squares, :func:`iso_lines`: the same
   contours as :func:`skimage.measure.find_contours`, vectorised); they lie somewhere on the
   rise to the rim, possibly on the rim's far flank, which refinement fixes.
   Iso-lines that run out of the image are closed along the image border
   (:func:`segsem_cli.contours.close_along_border`): every region they cut the
   image into, bright or dark, becomes a candidate whose border part lies
   exactly on ``u = 0``, ``u = W``, ``v = 0`` or ``v = H``; so does, per feature,
   the outline of the regions lying mostly inside its polygon (:func:`_filled_outlines`:
   a shape whose dim interior falls below the level inside its bright rim is cut into
   a rim ring and a hole, which only merged overlap it well);
3. associate each layout feature with the contour that overlaps its polygon
   best (IoU of filled shapes, at least ``min_iou``);
4. :func:`segsem_cli.edges.refine_contours` moves every associated contour
   onto the physical edge (``edge``/``threshold`` rule, see docs/edge-convention.md);
   border segments stay fixed and do not count in the confidence. A contour whose border
   points read the level outside it (a line end a few px short of the border, its iso-line
   snapped onto it, or a line side running a few px inside it: :func:`border_sides_ending_short`)
   is refined again from its coarse contour moved off that border, and the retry is kept
   where it measured an edge there (:func:`border_retry_wins`);
5. tone check (``tone_check``, on by default with ``substrate=auto``; needs ``seed_layout``):
   the substrate side each contour decided is checked against the aligned layout
   (:func:`segsem_cli.tone.tone_check`): a resist darker than the substrate makes
   every contour decide the wrong side, a rim width off its layout; a feature deciding
   against its image's clear majority is tried on the majority's side;
6. layout-seeded retry (``seed_layout``, on by default): a feature that came out
   ``not_found`` or ``low_contrast``, or ``ok`` but overlapping its layout polygon
   with IoU below ``retry_iou`` (0.75), is refined again starting from its aligned
   layout polygon. On noisy or charging images the Otsu iso-line of a large shape
   can wander into its interior or follow a charging boundary; the layout polygon
   lies within the search window of the printed edge. The retry replaces the first
   result only when it has a clean edge on at least 80 % of its normals and, for an
   ``ok`` first result, is no worse in layout IoU nor in clean normals (within 0.02) and better by
   0.1 IoU or by 0.2 of its normals (:func:`segsem_cli.tone.retry_wins`); an ``ok`` result with clean
   edges on fewer than 80 % of its normals is retried too. Otherwise the first
   result stands. ``extra["seed"] = "layout"`` and ``extra["first_status"]`` mark a
   replaced result. An unprinted feature finds no edges from the layout either, so
   it stays unreported.

A shape cut by the image border (a line crossing the field of view) is
returned ``ok`` with its part inside the image, ``extra["clipped"] = True``
and ``extra["border_fraction"]``. Statuses otherwise: ``not_found`` (no
contour overlaps the feature), ``clipped`` (an edge hugging the border, whose
normals leave the image), ``merged`` (one printed
shape covers several layout features, e.g. a bridge; the refined shape is in
``extra["merged_contour_px"]`` and the other ids in ``extra["merged_with"]``),
``low_contrast`` (fewer than ``min_valid`` of the normals found a clean edge).

Options (``--fallback-opt key=value``): ``coarse_sigma`` (2.0), ``level``
(Otsu), ``min_iou`` (0.2), ``min_valid`` (0.5), ``min_area`` (4 px^2),
``seed_layout`` (1; 0 turns the retry and the tone check off), ``tone_check`` (1; 0 turns the tone
check off), ``retry_iou`` (0.75), ``split_merged``
(1: features sharing a coarse region that separate at its own Otsu level are retried from
their layout polygons, see :func:`split_merged_regions`; 0 keeps them merged), and the
refinement options of :func:`segsem_cli.edges.parse_refine_options` (here
``passes`` defaults to 1: the iso-lines already run parallel to the edge).
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np

from segsem_cli import hookimpl
from segsem_cli.contours import (SNAP_HYSTERESIS, CoarseContour, associate, border_distances, border_lines,
                                 close_along_border, coarse_contours, normals, orient, polygon_area,
                                 polygon_ious, polygon_mask, shapely_polygons, usable_polygon)
from segsem_cli.edges import (REPASS_VALID_TOL, EdgeImage, feature_result, gaussian_smooth, opt_float,
                              parse_refine_options, refine_contours, suppress_frame, unmeasurable)
from segsem_cli.tone import RETRY_IOU, layout_retry, tone_check as run_tone_check, tone_check_enabled
from segsem_cli.types import Feature, FeatureResult, SEMImage


def otsu_level(img: np.ndarray, *, max_samples: int = 262144) -> float:
    """Otsu's two-class level of an image (on a regular subsample for speed)."""
    from skimage.filters import threshold_otsu

    a = np.asarray(img)
    step = max(1, int(np.sqrt(a.size / max_samples)))
    return float(threshold_otsu(a[::step, ::step]))


# Marching-squares segments of skimage.measure.find_contours (fully_connected="low"): per cell
# case (bit 0: upper-left above the level, 1: upper-right, 2: lower-left, 3: lower-right), the
# (from, to) cell edges of its segments in emission order. Edges: 0 top, 1 bottom, 2 left, 3 right.
_TOP, _BOTTOM, _LEFT, _RIGHT = 0, 1, 2, 3
_CASE_SEGMENTS = {
    1: [(_TOP, _LEFT)], 2: [(_RIGHT, _TOP)], 3: [(_RIGHT, _LEFT)], 4: [(_LEFT, _BOTTOM)], 5: [(_TOP, _BOTTOM)],
    6: [(_RIGHT, _TOP), (_LEFT, _BOTTOM)], 7: [(_RIGHT, _BOTTOM)], 8: [(_BOTTOM, _RIGHT)],
    9: [(_TOP, _LEFT), (_BOTTOM, _RIGHT)], 10: [(_BOTTOM, _TOP)], 11: [(_BOTTOM, _LEFT)], 12: [(_LEFT, _RIGHT)],
    13: [(_TOP, _RIGHT)], 14: [(_LEFT, _TOP)],
}
_N_SEG = np.zeros(16, np.int64)
_SEG_EDGES = np.full((16, 2, 2), -1, np.int64)
for _case, _segs in _CASE_SEGMENTS.items():
    _N_SEG[_case] = len(_segs)
    _SEG_EDGES[_case, :len(_segs)] = _segs


def iso_lines(image: np.ndarray, level: float) -> list[np.ndarray]:
    """Iso-lines of ``image`` at ``level``: exactly :func:`skimage.measure.find_contours` (default options).

    Same contours, same order, same vertices (``(row, column)`` float64, closed
    contours repeat their first vertex) with the same arithmetic, but the
    segments are computed and linked with whole-array operations instead of a
    loop over cells and a Python dictionary (about 2x faster on a 1024 px
    image). Segments are linked by the grid edge they cross; skimage links them
    by coordinates, which differs only when crossings on different edges
    coincide at a grid vertex (a pixel exactly at ``level``): those images are
    handed to skimage.

    The order rules reproduced: skimage emits segments cell by cell in row-major
    order and grows chains from both ends, keeping the number of the chain
    started first; so contours come in the order of their first segment, a path
    starts at its free end, and a closed contour starts (and ends) at the end
    point of its last-emitted segment.
    """
    a = np.asarray(image)
    if a.ndim != 2 or min(a.shape) < 2:
        raise ValueError(f"iso_lines: expected a 2-D image of at least 2x2, got shape {a.shape}")
    if (not np.issubdtype(a.dtype, np.floating) or a.dtype.itemsize > 8
            or not (np.isfinite(a.sum(dtype=np.float64)) or np.all(np.isfinite(a)))):  # NaN cells: skimage
        from skimage.measure import find_contours

        return find_contours(a, float(level))
    h, w = a.shape
    lev = np.float64(level)
    up = np.greater(a, lev).view(np.uint8)  # compared in float64, as skimage does
    pair = up[:-1] | (up[1:] << 2)  # bit 0: upper pixel above the level, bit 2: lower pixel
    case = pair[:, :-1] | (pair[:, 1:] << 1)
    cells = np.flatnonzero((case - 1) < 14)  # cases 1..14: the iso-line crosses the cell
    if cells.size == 0:
        return []
    cs = case.ravel()[cells]
    ns = _N_SEG[cs]
    seg_cell = np.repeat(np.arange(len(cells)), ns)  # segments in emission order
    sub = np.arange(len(seg_cell)) - np.repeat(np.cumsum(ns) - ns, ns)
    cs = cs[seg_cell]
    r, c = np.divmod(cells[seg_cell], w - 1)
    flat = a.ravel()
    i00 = r * w + c
    corners = [flat[i00].astype(np.float64), flat[i00 + 1].astype(np.float64),
               flat[i00 + w].astype(np.float64), flat[i00 + w + 1].astype(np.float64)]  # ul, ur, ll, lr
    ends = {0: (0, 1), 1: (2, 3), 2: (0, 2), 3: (1, 3)}  # edge -> (from corner, to corner) of its fraction

    def crossing(e: np.ndarray):
        fr = np.choose(e, [corners[ends[k][0]] for k in range(4)])
        to = np.choose(e, [corners[ends[k][1]] for k in range(4)])
        same = to == fr
        frac = np.where(same, 0.0, (lev - fr) / np.where(same, 1.0, to - fr))
        horiz = e <= _BOTTOM
        row = r + (e == _BOTTOM)
        col = c + (e == _RIGHT)
        pr = np.where(horiz, row.astype(np.float64), r + frac)
        pc = np.where(horiz, c + frac, col.astype(np.float64))
        eid = np.where(horiz, row * (w - 1) + c, h * (w - 1) + r * w + col)
        return pr, pc, eid, frac

    f_r, f_c, f_id, f_frac = crossing(_SEG_EDGES[cs, sub, 0])
    t_r, t_c, t_id, t_frac = crossing(_SEG_EDGES[cs, sub, 1])
    on_vertex = np.concatenate([(f_frac == 0.0) | (f_frac == 1.0), (t_frac == 0.0) | (t_frac == 1.0)])
    if on_vertex.any():
        ids = np.concatenate([f_id, t_id])[on_vertex]
        xy = np.column_stack([np.concatenate([f_r, t_r])[on_vertex], np.concatenate([f_c, t_c])[on_vertex]])
        _, first = np.unique(ids, return_index=True)
        if len(np.unique(xy[first], axis=0)) < len(first):
            from skimage.measure import find_contours

            return find_contours(a, float(level))
    n = len(f_id)
    srt = np.argsort(f_id, kind="stable")
    pos = np.minimum(np.searchsorted(f_id[srt], t_id), n - 1)
    linked = f_id[srt][pos] == t_id
    nxt = np.where(linked, srt[pos], -1)  # the segment starting where this one ends
    prv = np.full(n, -1)
    src = np.nonzero(linked)[0]
    prv[nxt[src]] = src
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    ncomp, lab = connected_components(coo_matrix((np.ones(len(src), np.int8), (src, nxt[src])), shape=(n, n)),
                                      directed=True, connection="weak")
    seg = np.arange(n)
    first_seg = np.full(ncomp, n)
    np.minimum.at(first_seg, lab, seg)
    start = np.full(ncomp, -1)
    np.maximum.at(start, lab, seg)  # closed: the last-emitted segment
    free = np.nonzero(prv < 0)[0]
    is_path = np.zeros(ncomp, dtype=bool)
    is_path[lab[free]] = True
    start[lab[free]] = free  # open: the free end
    nx = nxt.copy()
    nx[prv[start[~is_path]]] = -1  # cut each closed contour just before its start
    # list ranking by pointer jumping: number of segments after each one in its chain
    after = (nx >= 0).astype(np.int64)
    jump = nx
    live = np.nonzero(jump >= 0)[0]
    while live.size:
        j = jump[live]
        after[live] += after[j]
        jump = jump.copy() if jump is nx else jump
        jump[live] = jump[j]
        live = live[jump[live] >= 0]
    length = np.bincount(lab, minlength=ncomp)
    comp_order = np.argsort(first_seg, kind="stable")
    offs = np.concatenate([[0], np.cumsum(length[comp_order])])
    comp_start = np.empty(ncomp, np.int64)
    comp_start[comp_order] = offs[:-1]
    seq = np.empty(n, np.int64)  # segments in output order: contour by contour, along each
    seq[comp_start[lab] + length[lab] - 1 - after] = np.arange(n)
    pts = np.column_stack([t_r, t_c])[seq]  # each segment contributes its end point
    out = []
    for k, ci in enumerate(comp_order):
        p = pts[offs[k]:offs[k + 1]]
        s0 = seq[offs[k]]
        if is_path[ci]:
            out.append(np.vstack([[[f_r[s0], f_c[s0]]], p]))
        else:
            out.append(np.vstack([p, p[:1]]))
    return out


def _coarse_contours(image: np.ndarray, level: float, *, min_area: float = 4.0,
                     min_points: int = 6) -> list[CoarseContour]:
    """:func:`segsem_cli.contours.coarse_contours` on :func:`iso_lines` (same result, faster)."""
    return coarse_contours(image, level, min_area=min_area, min_points=min_points, tracer=iso_lines)


def _regions(found: Sequence[CoarseContour], shape: tuple[int, int], polys: Sequence[np.ndarray], *,
             min_area: float, min_iou: float) -> list[np.ndarray]:
    """Candidate regions for the features ``polys``: the closed iso-lines of ``found``, and the
    regions its open ones (running out of the image) cut the image into, closed along the border.
    A region can only reach IoU >= ``min_iou`` with a feature of at least ``min_iou`` times its
    area, so larger border regions (the background) are left out."""
    cands = [c.points for c in found if c.closed]
    open_ = [c.points for c in found if not c.closed]
    if open_:
        areas = [polygon_area(np.asarray(p, float)) for p in polys if usable_polygon(p)]
        amax = max(areas) if areas else 0.0
        faces = [r for r in close_along_border(open_, shape, min_area=min_area)
                 if polygon_area(r) * max(min_iou, 1e-3) <= amax]
        cands += faces + _filled_outlines(faces, polys)
    return cands


#: Border points whose first pixels inside the image read below this share of the way from the level
#: outside the contour to its own interior level are outside it: the shape ends short of the border.
BORDER_SHORT_SHARE = 0.5
#: Such contours are refined again from their coarse contour moved this far beyond ``border_px``
#: off that border (see :func:`retry_margin`).
BORDER_RETRY_PX = 0.5
#: The retry must find a clean edge on at least this share of its points facing that border within
#: ``BORDER_RETRY_ZONE_PX`` of it (see :func:`border_retry_wins`).
BORDER_RETRY_VALID = 0.15
BORDER_RETRY_ZONE_PX = 8.0


def border_sides_ending_short(eimg: EdgeImage, res, *, depth_px: int = 8,
                              band: tuple[float, float] = (4.0, 10.0), near_px: int = 32, frame_px: int = 1,
                              share: float = BORDER_SHORT_SHARE, rim_share: float = 0.25,
                              rim_z: float = 15.0, chunk: int = 32) -> set[int]:
    """The border lines (0: ``u = 0``, 1: ``u = W``, 2: ``v = 0``, 3: ``v = H``) along which a
    refined contour's border points read what lies outside the contour.

    A shape cut by the border shows its own interior in the first pixels inside the frame:
    the signal at the first pixel (``frame_px``) equals the signal ``depth_px`` further in.
    A line end a few pixels short of the border does not: the first pixel is on or near the
    substrate floor around it while ``depth_px`` in is the rim or the interior. Its coarse
    iso-line can touch the border and pass within ``border_px`` (2) of it, and the end is
    then put onto the border and never refined. Per border point, perpendicular to its
    border line; medians over the points of each line. The outside level is the median of
    the pixels ``band`` px outside the contour within ``near_px`` of the border points (the
    substrate around a line, the resist around a hole). A line qualifies when its first
    pixels lie below ``share`` of the way from the outside level to the signal ``depth_px`` in.

    A side 1.5-3 px inside the border shows the rim's outer flank in its first pixel
    instead, which can read near the interior level. It also qualifies when the median
    profile from the first pixel to ``depth_px`` in has a peak (the rim) above the first
    pixel by at least ``rim_share`` of the peak's height over the outside level and by
    ``rim_z`` times the noise of that median (``1.25 sigma / sqrt(n)`` over the ``n``
    border points): a shape really cut by the border shows its flat interior there, whose
    medians over 20-40 points of a line end varied by up to 8-13 such noise units on the
    benchmark images (the sides 1.5-3 px in: 22 and more). These are only candidates;
    :func:`border_retry_wins` decides.

    Both tests run on all the points of a border line and on runs of ``chunk`` (32) of
    them, sorted along it, half-overlapping (0: all points only): where a print wanders
    in and out of the image along one border run (a line side 0-5 px inside it, or a
    side 3 px in for 40 px next to 70 px of a shape really cut by that border) the
    median over the whole run reads the cut part. Second image model's hard set:
    0.659 -> 0.614 px EPE RMS; the other benchmark sets unchanged."""
    import cv2

    b = res.border
    if not b.any() or b.all():
        return set()
    h, w = eimg.shape
    c = np.asarray(res.contour_uv, float)
    pts = c[b]
    u0, v0 = (np.floor(pts.min(0)) - near_px).astype(int).clip(0)
    u1, v1 = np.minimum(np.ceil(pts.max(0)).astype(int) + near_px, [w, h])
    outside = (~polygon_mask(c - [u0, v0], (v1 - v0, u1 - u0))).astype(np.uint8)
    d = cv2.distanceTransform(outside, cv2.DIST_L2, 3)  # distance outside the contour
    m = int(np.ceil(frame_px + band[0]))  # and off the frame
    d[:max(m - v0, 0)] = -1.0
    d[max(h - m - v0, 0):] = -1.0
    d[:, :max(m - u0, 0)] = -1.0
    d[:, max(w - m - u0, 0):] = -1.0
    out = eimg.sampled[v0:v1, u0:u1][(d >= band[0]) & (d <= band[1])]
    if len(out) < 10:
        return set()
    level = float(np.median(out))
    sides = set()
    on = border_lines(pts, (h, w))
    for side, (ax, sgn) in enumerate(((0, 1), (0, -1), (1, 1), (1, -1))):  # the order of border_lines' columns
        sel = on[:, side]
        if sel.sum() < 3:
            continue
        q = np.round(pts[sel]).astype(int)
        first = frame_px if sgn > 0 else (w, h)[ax] - 1 - frame_px
        # rows: from the first pixel inside the frame to depth_px further in; columns: the border points
        along = np.clip(first + sgn * np.arange(depth_px + 1), 0, (w, h)[ax] - 1)[:, None]
        across = np.clip(q[:, 1 - ax], 0, (h, w)[ax] - 1)[None, :]
        vals = eimg.sampled[across, along] if ax == 0 else eimg.sampled[along, across]
        order = np.argsort(q[:, 1 - ax], kind="stable")
        n_all = len(order)
        chunks = [order] + ([order[i:i + chunk] for i in range(0, n_all - chunk // 2, chunk // 2)]
                            if chunk and n_all >= 2 * chunk else [])
        for idx in chunks:
            prof = np.median(vals[:, idx], axis=1)
            at, inner, peak = float(prof[0]), float(prof[-1]), float(prof.max())
            if abs(inner - level) > 0 and (at - level) / (inner - level) < share:
                sides.add(side)
                break
            if peak - level > 0 and (peak - at) >= rim_share * (peak - level) \
                    and (peak - at) >= rim_z * 1.25 * eimg.noise / np.sqrt(len(idx)):
                sides.add(side)
                break
    return sides


def border_retry_wins(first, retry, shape: tuple[int, int], sides: set[int], *,
                      zone_px: float = BORDER_RETRY_ZONE_PX, min_valid: float = BORDER_RETRY_VALID,
                      min_points: int = 9, tol: float = REPASS_VALID_TOL) -> bool:
    """Whether the contour refined off the border (``retry``) replaces the one put onto it (``first``).

    The retry must lie less on the border; be a contour :func:`~segsem_cli.edges.feature_result`
    reports (:func:`~segsem_cli.edges.unmeasurable`: a side 3.3 px inside the border whose outward
    profiles mostly leave the image would turn an ``ok`` feature with a few px of error on that
    side into a ``clipped`` one, without a contour); measure a clean edge on at least ``min_valid`` of
    its points within ``zone_px`` of the ``sides`` it was moved off that face them (outward
    normal within 45 degrees of the border's normal), where ``first`` had only the border; and
    have no smaller share of valid points over its whole length (border points are never
    valid) than ``first`` less ``tol``. There must be at least ``min_points`` facing points
    (the caller passes the refinement's ``level_points``, the profiles one edge level is
    measured from): on a hard-noise benchmark image, the 6 facing points of the 8 px wide top
    end of a line cut by the border found "edges" 5 px inside on 4 of them. A line end
    narrower than that stays on the border.

    A shape really cut by the border has no edge facing it: there the share is 0 (the line
    sides running up to the border are valid, which is why only facing points count). A line
    end 4.5 px short of the border measured 0.34 (its outward profiles leave the image before
    the floor), a line side 5 px inside it 0.60. ``valid_fraction`` would not do for the
    whole-length test: it leaves border points out, so the first contour's share counts only
    its refined part (0.97 against the retry's 0.80 for that line side)."""
    if not retry.border_fraction < first.border_fraction or unmeasurable(retry, shape):
        return False
    c = np.asarray(retry.contour_uv, float)
    n = normals(c)
    facing = np.column_stack([-n[:, 0], n[:, 0], -n[:, 1], n[:, 1]])  # towards each border line
    cols = sorted(sides)
    near = ((border_distances(c, shape)[:, cols] <= zone_px) & (facing[:, cols] > np.sqrt(0.5))).any(axis=1)
    if near.any() and (retry.valid[near].mean() < min_valid or near.sum() < min_points):
        return False
    return bool(retry.valid.mean() >= first.valid.mean() - tol)


def retry_margin(res, sides: set[int], shape: tuple[int, int], border_px: float) -> float:
    """How far off the ``sides`` border lines the retry of ``res`` starts: ``BORDER_RETRY_PX``
    beyond ``border_px``, or beyond ``SNAP_HYSTERESIS * border_px`` when the contour also lies on
    another border line. :func:`~segsem_cli.contours.snap_to_border` would otherwise put the
    moved runs next to that border run back onto the border (a line side 2-4 px below the top
    border of a line leaving the image on the right stayed there). As close as it can be
    otherwise: the less of the search window lies beyond the border, the more points measure."""
    b = np.asarray(res.border, bool)
    c = np.asarray(res.contour_uv, float)
    others = set(np.nonzero(border_lines(c[b], shape).any(axis=0))[0].tolist()) - set(sides) if b.any() else set()
    return (SNAP_HYSTERESIS if others else 1.0) * border_px + BORDER_RETRY_PX


def off_border(contour: np.ndarray, shape: tuple[int, int], sides: set[int], margin: float) -> np.ndarray:
    """The contour with its points moved at least ``margin`` px away from the given border lines."""
    c = np.array(contour, dtype=np.float64)
    h, w = shape
    if 0 in sides:
        c[:, 0] = np.maximum(c[:, 0], margin)
    if 1 in sides:
        c[:, 0] = np.minimum(c[:, 0], w - margin)
    if 2 in sides:
        c[:, 1] = np.maximum(c[:, 1], margin)
    if 3 in sides:
        c[:, 1] = np.minimum(c[:, 1], h - margin)
    return c


#: A region counts as part of a feature's filled outline when at least this share of it lies in the feature.
FILL_INSIDE = 0.5


def _filled_outlines(faces: Sequence[np.ndarray], polys: Sequence[np.ndarray], *,
                     inside: float = FILL_INSIDE) -> list[np.ndarray]:
    """Per feature, the outline of the border regions lying mostly (``inside``) within its polygon.

    A shape cut by the border whose interior falls below the level (a dim resist top inside
    its bright rim) leaves an outer and an inner iso-line, which cut it into a rim ring and a
    hole, each a region of its own (and a line cut by the border at both ends into its two
    rims and its interior). Neither overlaps the feature well; merged, they are its filled
    outline, as the outer iso-line of a closed shape is. Only merges of two or more regions
    are returned (the largest piece when they do not connect, holes filled)."""
    import shapely

    if len(faces) < 2:
        return []
    fp = shapely_polygons(faces)
    fa = shapely.area(fp)
    tree = shapely.STRtree(fp)
    usable = [p for p in polys if usable_polygon(p)]
    if not usable:
        return []
    dps = shapely_polygons(usable)
    which, hit = tree.query(dps, predicate="intersects")  # pairs (feature, face)
    out = []
    for j in np.nonzero(np.bincount(which, minlength=len(dps)) >= 2)[0]:
        dp, idx = dps[j], hit[which == j]
        share = shapely.area(shapely.intersection(fp[idx], dp)) / np.maximum(fa[idx], 1e-12)
        sel = idx[share >= inside]
        if len(sel) < 2:
            continue
        merged = shapely.union_all(fp[sel])
        if merged.geom_type != "Polygon":
            parts = [g for g in getattr(merged, "geoms", []) if g.geom_type == "Polygon"]
            if not parts:
                continue
            merged = max(parts, key=lambda g: g.area)
        ring = np.asarray(merged.exterior.coords, dtype=np.float64)[:-1]
        if len(ring) >= 3:
            out.append(orient(ring))
    return out


#: Margin (px) around a shared coarse region within which its local level is taken.
SPLIT_PAD_PX = 8


def split_merged_regions(coarse: np.ndarray, level: float, assoc: list, cands: list, polys: Sequence[np.ndarray],
                         *, min_area: float, min_iou: float, pad: int = SPLIT_PAD_PX) -> dict[int, float]:
    """Which features sharing a coarse region separate at the region's own Otsu level.

    One global level cannot follow charging: where the substrate between two lines charges
    brighter than the level, their iso-lines join and both features would be reported
    ``merged``. Each shared region is thresholded again at the Otsu level of its bounding box
    (``pad`` px larger), only when that level is higher. If every feature sharing it then has
    a region of its own, overlapping it better than the shared one, the features are returned
    (index -> local level) to be extracted from their layout polygons; otherwise (a real
    bridge: the bridging resist is as bright as the lines, so it stays above any level between
    resist and substrate) they stay merged.
    """
    groups: dict[int, list[int]] = {}
    for i, a in enumerate(assoc):
        if a.index >= 0 and a.shared_with:
            groups.setdefault(a.index, []).append(i)
    split: dict[int, float] = {}
    h, w = coarse.shape
    for idx, members in groups.items():
        c = np.asarray(cands[idx], dtype=np.float64)
        u0, v0 = np.maximum(np.floor(c.min(axis=0)).astype(int) - pad, 0)
        u1, v1 = np.minimum(np.ceil(c.max(axis=0)).astype(int) + pad + 1, (w, h))
        crop = coarse[v0:v1, u0:u1]
        if min(crop.shape) < 8:
            continue
        lv = otsu_level(crop)
        if not lv > level:
            continue
        mine = [np.asarray(polys[i], dtype=np.float64) for i in members]
        local = _regions(_coarse_contours(np.ascontiguousarray(crop), lv, min_area=min_area), crop.shape,
                         mine, min_area=min_area, min_iou=min_iou)  # (areas only: no shift needed)
        if not local:
            continue
        local = [np.asarray(p, dtype=np.float64) + (u0, v0) for p in local]
        sub = associate(mine, local, min_iou=min_iou)
        if all(a.index >= 0 and not a.shared_with and a.iou > assoc[i].iou for i, a in zip(members, sub)):
            split.update({i: lv for i in members})
    return split


#: Contours with a median edge SNR below this get a second refinement pass from their own
#: smoothed result (:func:`segsem_cli.edges.refine_contours`, ``repass_snr``). On the synth
#: benchmark medium-noise contours are at 25-30 and hard ones at 8-12; see the README.
REPASS_SNR = 20.0
#: That pass uses the matched filter (``repass_matched``): hard EPE 0.643 -> 0.618 px, second
#: model's hard 0.725 -> 0.673; medium contours are not re-passed, so nothing changes there.
REPASS_MATCHED = True
#: ... and smooths its profiles along the normal by 1.5 px instead of 1 (``repass_smooth``; the
#: matched filter's templates keep the 1 px convention): hard EPE 0.618 -> 0.596 px, second
#: model's hard 0.673 -> 0.669; 2 px gained more on ours (0.587) but lost on the second model
#: (0.716), whose edges are sharper.
REPASS_SMOOTH = 1.5

#: Otsu iso-lines of a noisy image jitter along their length; they are low-passed with a
#: Gaussian of this many samples (the refinement's own ``base_sigma`` for later passes) before
#: the first pass (``seed_sigma``). Second model's medium set: gauge CD 3-sigma 1.86 -> 1.13 nm.
SEED_SIGMA = 3.0

class ThresholdFallback:
    name = "threshold"
    description = "Otsu iso-contours of the smoothed image + sub-pixel edge refinement (fast)"

    def __init__(self) -> None:
        self.last_timings: dict[str, float] = {}

    @staticmethod
    def _options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(refinement keywords, this fallback's own options)``, validated (SegsemError naming the key)."""
        ropt = parse_refine_options(options)
        if "passes" not in options:  # iso-lines already run parallel to the edge: one pass is enough ...
            ropt["passes"] = 1
            if "repass_snr" not in options:  # ... unless noise made them jitter (refine_contours' repass_snr)
                ropt["repass_snr"] = REPASS_SNR
        if "repass_matched" not in options:  # a second pass for noisy contours uses the matched filter
            ropt["repass_matched"] = REPASS_MATCHED
        if "repass_smooth" not in options:  # ... on profiles smoothed a little more along the normal
            ropt["repass_smooth"] = REPASS_SMOOTH
        if "seed_sigma" not in options:
            ropt["seed_sigma"] = SEED_SIGMA
        own = dict(coarse_sigma=opt_float(options, "coarse_sigma", 2.0, lo=0.0, hi=50.0),
                   min_iou=opt_float(options, "min_iou", 0.2, lo=0.0, hi=1.0),
                   min_valid=opt_float(options, "min_valid", 0.5, lo=0.0, hi=1.0),
                   min_area=opt_float(options, "min_area", 4.0, lo=0.0),
                   seed_layout=bool(opt_float(options, "seed_layout", 1.0, lo=0.0, hi=1.0)),
                   retry_iou=opt_float(options, "retry_iou", RETRY_IOU, lo=0.0, hi=1.0),
                   split_merged=bool(opt_float(options, "split_merged", 1.0, lo=0.0, hi=1.0)),
                   tone_check=tone_check_enabled(options, ropt),
                   level=opt_float(options, "level", float("nan")))
        return ropt, own

    def check_options(self, options: dict[str, Any]) -> None:
        """Validate ``--fallback-opt`` values once, before any image is read."""
        self._options(options)

    def extract(self, image: SEMImage, features: Sequence[Feature], **options: Any) -> list[FeatureResult]:
        t0 = time.perf_counter()
        ropt, own = self._options(options)
        coarse_sigma, min_iou, min_valid = own["coarse_sigma"], own["min_iou"], own["min_valid"]
        min_area, seed_layout, retry_iou = own["min_area"], own["seed_layout"], own["retry_iou"]
        split_merged, tone_check = own["split_merged"], own["tone_check"]

        frame_px = ropt.pop("frame_px")
        eimg = EdgeImage(image.pixels, image_sigma=ropt.pop("image_sigma"), frame_px=frame_px)
        # eimg.sampled is the frame-suppressed float32 image itself unless it was pre-smoothed
        framed = eimg.sampled if eimg.image_sigma <= 0 else suppress_frame(image.pixels, frame_px)
        coarse = gaussian_smooth(framed, coarse_sigma)
        level = own["level"]
        if not np.isfinite(level):
            level = otsu_level(coarse)
        t1 = time.perf_counter()

        found = _coarse_contours(coarse, level, min_area=min_area)
        t2 = time.perf_counter()

        polys = [f.pixels for f in features]
        cands = _regions(found, image.shape, polys, min_area=min_area, min_iou=min_iou)
        assoc = associate(polys, cands, min_iou=min_iou)
        split = split_merged_regions(coarse, level, assoc, cands, polys, min_area=min_area,
                                     min_iou=min_iou) if split_merged and seed_layout else {}
        t3 = time.perf_counter()

        # Refine every contour that is some feature's best match.
        todo = sorted({a.index for a in assoc if a.index >= 0})
        refined = dict(zip(todo, refine_contours(eimg, [cands[i] for i in todo], **ropt)))
        # a shape ending a few px short of the border whose iso-line was put onto it: refine its
        # end from the coarse contour moved off that border
        short = {i: sides for i in todo
                 if (sides := border_sides_ending_short(eimg, refined[i], frame_px=frame_px))}
        if short:
            moved = [off_border(cands[i], image.shape, sides,
                                retry_margin(refined[i], sides, image.shape, ropt["border_px"]))
                     for i, sides in short.items()]
            again = refine_contours(eimg, moved, **ropt)
            for (i, sides), r in zip(short.items(), again):
                if border_retry_wins(refined[i], r, image.shape, sides, min_points=ropt["level_points"]):
                    refined[i] = r
        t4 = time.perf_counter()

        ious = polygon_ious([refined[a.index].contour_uv if a.index in refined else f.pixels
                             for f, a in zip(features, assoc)], polys)
        out: list[FeatureResult] = []
        for i, (f, a) in enumerate(zip(features, assoc)):
            extra: dict[str, Any] = {"coarse_iou": a.iou, "level": level}
            if a.index < 0:
                out.append(feature_result(f, None, source=self.name, image_shape=image.shape,
                                          status="not_found", extra=extra))
                continue
            res = refined[a.index]
            if a.shared_with:
                extra["merged_with"] = [features[o].feature_id for o in a.shared_with]
                if i in split:
                    extra["split_level"] = split[i]  # separate at the local level: retried from the layout
                extra["merged_contour_px"] = res.contour_uv
                out.append(feature_result(f, None, source=self.name, image_shape=image.shape,
                                          status="merged", extra=extra))
                continue
            out.append(feature_result(f, res, source=self.name, image_shape=image.shape, min_valid=min_valid,
                                      layout_iou=ious[i], extra=extra))
        if seed_layout and tone_check:
            run_tone_check(eimg, features, out, ropt, source=self.name, min_valid=min_valid, image_shape=image.shape)
        if seed_layout:
            layout_retry(eimg, features, out, ropt, source=self.name, min_valid=min_valid, image_shape=image.shape,
                         retry_iou=retry_iou)
        t5 = time.perf_counter()
        self.last_timings = {"smooth": t1 - t0, "coarse_contours": t2 - t1, "association": t3 - t2,
                             "refinement": t4 - t3, "results": t5 - t4, "total": t5 - t0}
        return out

@hookimpl
def register_fallbacks(register):
    register(ThresholdFallback())
