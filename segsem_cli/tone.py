"""Checks of a fallback's results against the aligned layout, shared by the classical fallbacks:
the tone check (is the substrate on the side each contour decided?) and the layout-seeded
retry (:func:`layout_retry`: features the coarse contours served badly, refined again from
their layout polygons).

:func:`segsem_cli.edges.refine_contours` decides the substrate side of each contour from
its own profiles (``substrate="auto"``: the lower floor, else the rim). Where the resist
top images darker than the substrate with bright rims, the lower floor is the resist:
the edge is then placed on the rim's inner flank, a rim width (about 2 x blur + the
sidewall footprint) inside the print, and the shape fits its layout polygon poorly. An
opening layer (dark substrate inside the polygons) gives the same profiles with the
sides swapped, so no profile rule can tell the two apart; the aligned layout can: the
right side puts the edges near the design (the print bias), the wrong one a rim width
away.

:func:`tone_check` runs after a fallback's first extraction (``docs/edge-convention.md``,
*Checking the side against the layout*):

1. **Group flip.** The ``ok`` features that decided the same side form a group. When
   the group's median layout misfit (:func:`iou_offset_px`, the edge offset its layout
   IoU amounts to) is at least :data:`TONE_GATE_PX`, its features are
   refined again from their aligned layout polygons with the other side forced; both
   results are measured against the layout (:func:`segsem_cli.contours.edge_offsets`:
   median signed distance, the per-edge print bias) and :func:`tone_flips` decides.
   Each feature then takes its new result if it is ``ok``
   (``extra["tone_check"] = "flipped"``).
2. **Majority.** One layer, one tone: a feature that decided against at least
   :data:`TONE_MAJORITY` of its image's ``ok`` features (at least
   :data:`TONE_MAJORITY_MIN` of them) is refined again on the majority's side and
   takes that result if it fits the layout at least as well (``"majority"``); if it
   finds no edge there and fitted its layout poorly (IoU below :data:`MINORITY_IOU`),
   what it found was not this feature (e.g. the space where an unprinted line should
   be, bounded by its neighbours' edges): it is reported ``not_found`` (``"minority"``).

The layout cannot tell a wrong side from a print biased by a rim width against its
layout: such a group (e.g. lines printed 10 nm wider than drawn, with a 5 nm rim) is
flipped wrongly. Force ``substrate=inside|outside`` (a known layer tone) or pass
``tone_check=0`` there; with a forced side the check never runs.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from .contours import border_lines, concat_rings, edge_offsets, polygon_ious, usable_polygon
from .edges import EdgeImage, feature_result, opt_bool, opt_float, refine_contours
from .types import Feature, FeatureResult

__all__ = [
    "MINORITY_IOU",
    "RETRY_GAIN",
    "RETRY_IOU",
    "RETRY_MIN_VALID",
    "RETRY_STATUSES",
    "RETRY_VALID_GAIN",
    "RETRY_VALID_TOL",
    "TONE_GATE_PX",
    "TONE_GATE_STRIDE",
    "TONE_OFFSET_PX",
    "TONE_MAJORITY",
    "TONE_MAJORITY_MIN",
    "TONE_MIN_WIDTH_PX",
    "TONE_NEAR",
    "iou_offset_px",
    "layout_retry",
    "refine_from_layout",
    "retry_options",
    "retry_wins",
    "tone_check",
    "tone_check_enabled",
    "tone_flips",
]

#: A group of features that decided the substrate on the same side (``auto``) whose median
#: layout misfit (:func:`iou_offset_px`: the edge offset its layout IoU amounts to) is at least
#: this many pixels has the other side tried as well. A flip needs the first result at least
#: (1 - TONE_NEAR) * TONE_MIN_WIDTH_PX = 1.7 px off its layout; the misfit reads an outward
#: offset short (by A / (A + P d)), so the gate sits lower.
TONE_GATE_PX = 1.0
#: ... and whose median edge offset from the layout (:func:`~segsem_cli.contours.edge_offsets`) is
#: at least this (a little below the 1.7 px a flip needs: the flip reads the offsets of the
#: features found on both sides only).
TONE_OFFSET_PX = 1.5
#: ... measured on every TONE_GATE_STRIDE-th contour point (about 90 of a long line's 700; a quick
#: estimate against a gate of 1.5 px; the flip itself is decided on all of them).
TONE_GATE_STRIDE = 8
#: ... and takes it only when the two results lie a rim width ``w`` apart (at least TONE_MIN_WIDTH_PX)
#: and the layout sits on the other one's edge: the group's median edge offset from the layout is
#: within TONE_NEAR * w with the other side and at least (1 - TONE_NEAR) * w with the first.
TONE_NEAR = 0.15
TONE_MIN_WIDTH_PX = 2.0
#: A feature whose side differs from that of at least TONE_MAJORITY of the image's ``ok`` features
#: (at least TONE_MAJORITY_MIN of them) is refined again on the majority's side.
TONE_MAJORITY = 0.75
TONE_MAJORITY_MIN = 3
#: ... and, finding no edge there, is reported ``not_found`` when its first result overlapped its
#: layout polygon less than this.
MINORITY_IOU = 0.75


def tone_flips(first_offset: float, other_offset: float) -> bool:
    """Does a group take the other substrate side? ``*_offset``: its median edge offset from the layout (px).

    The two results sit on the two flanks of the rim, ``w = |first - other|`` apart. The
    other side wins only when the layout lies on its edge (``|other| <= TONE_NEAR * w``)
    and the first result a rim width off (``|first| >= (1 - TONE_NEAR) * w``): a print
    bias of about a rim width would look the same, so anything in between keeps the first.
    """
    w = abs(first_offset - other_offset)
    return bool(w >= TONE_MIN_WIDTH_PX and abs(other_offset) <= TONE_NEAR * w
                and abs(first_offset) >= (1.0 - TONE_NEAR) * w)


def iou_offset_px(iou: float, polygon: np.ndarray, shape: tuple[int, int]) -> float:
    """The edge offset (px) a layout IoU amounts to: ``(1 - IoU) * area / edge length``.

    For a result whose edges all sit ``d`` inside its layout polygon (area ``A``, edge
    length ``P`` without the part on the image border, where print and layout are both cut)
    this is ``d``; ``d`` outside reads ``d * A / (A + P d)``. A shape mismatch (corner
    rounding) adds to it. The IoU alone would depend on the feature's size: a pad 100 px
    across 5 px (a rim width) inside its layout still overlaps it by 0.81.
    """
    return float(_misfits([iou], [polygon], shape)[0])


def _misfits(ious: Sequence[float], polygons: Sequence[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """:func:`iou_offset_px` of many features at once (one numpy pass over all their vertices; a
    segment with both ends on the same image border line is not edge, as in
    :func:`segsem_cli.contours.border_length`)."""
    if len(polygons) == 0:
        return np.zeros(0)
    c, nxt, fid = concat_rings(polygons)
    d = c[nxt] - c
    seg = np.hypot(d[:, 0], d[:, 1])
    on = border_lines(c, shape)
    on_border = np.any(on & on[nxt], axis=1)
    edge = np.bincount(fid, weights=np.where(on_border, 0.0, seg), minlength=len(polygons))
    area = np.abs(0.5 * np.bincount(fid, weights=c[:, 0] * c[nxt, 1] - c[nxt, 0] * c[:, 1], minlength=len(polygons)))
    with np.errstate(invalid="ignore", divide="ignore"):
        m = (1.0 - np.asarray(ious, dtype=np.float64)) * area / edge
    return np.where(edge > 0, m, 0.0)


def tone_check_enabled(options: Mapping[str, Any], ropt: Mapping[str, Any], *, default: bool = True) -> bool:
    """The ``tone_check`` option (on by default); the check only runs with ``substrate=auto``."""
    return opt_bool(options, "tone_check", default) and ropt.get("substrate", "auto") == "auto"


def refine_from_layout(eimg: EdgeImage, features: Sequence[Feature], idx: Sequence[int],
                       extras: Sequence[dict[str, Any]], ropt: Mapping[str, Any], *, source: str, min_valid: float,
                       image_shape: tuple[int, int], **refine: Any) -> list[FeatureResult]:
    """Features ``idx`` refined again from their aligned layout polygons, each with its ``extras``.

    Two passes at least (the layout runs less parallel to the print than a coarse
    contour); ``refine`` overrides :func:`~segsem_cli.edges.refine_contours` keywords
    (``substrate``, ``on_edge``). The layout IoU of each result is in ``extra["layout_iou"]``.
    """
    polys = [np.asarray(features[i].pixels, dtype=np.float64) for i in idx]
    opts = {**ropt, "passes": max(int(ropt.get("passes", 1)), 2), **refine}
    results = refine_contours(eimg, polys, **opts)
    ious = polygon_ious([r.contour_uv for r in results], polys)
    return [feature_result(features[i], res, source=source, image_shape=image_shape, min_valid=min_valid,
                           layout_iou=float(iou), extra=dict(ex))
            for i, res, iou, ex in zip(idx, results, ious, extras)]


#: First statuses that get a second try seeded with the layout polygon.
RETRY_STATUSES = ("low_contrast", "not_found", "partial")
#: An ``ok`` result overlapping its layout polygon less than this is retried too ...
RETRY_IOU = 0.75
#: ... and replaced when the layout-seeded result overlaps it by at least this much more
#: and found a clean edge on at least as many of its normals.
RETRY_GAIN = 0.1
#: A layout-seeded result counts only with a clean edge on this share of its normals: where
#: the print differs from the layout beyond the search window (a disc printed from a square),
#: the seed finds edges only where the two happen to be close.
RETRY_MIN_VALID = 0.8
#: An ``ok`` result with clean edges on fewer than RETRY_MIN_VALID of its normals is retried
#: too, and replaced when the retry finds clean edges on this much larger a share (no lower IoU).
RETRY_VALID_GAIN = 0.2
#: "No worse" allows this much lower a share of clean normals: the two seeds sample the edge
#: at different points, so two results on the same edge differ by about a percent.
RETRY_VALID_TOL = 0.02


def retry_wins(first: FeatureResult, valid: float, iou: float, *, min_valid: float = 0.5) -> bool:
    """Does a layout-seeded result (``valid`` share of clean normals, layout ``iou``) replace ``first``?

    It needs clean edges on at least ``max(min_valid, RETRY_MIN_VALID)`` of its normals.
    Against a first result that is not ``ok`` that is enough; against an ``ok`` one it
    must be no worse on either count (clean normals within ``RETRY_VALID_TOL``) and
    clearly better on one: ``RETRY_GAIN`` more IoU or ``RETRY_VALID_GAIN`` more clean normals.
    """
    if valid < max(min_valid, RETRY_MIN_VALID):
        return False
    if not first.ok:
        return True
    d_iou = iou - float(first.extra.get("layout_iou", 0.0))
    d_valid = valid - float(first.extra.get("valid_fraction", 0.0))
    return d_iou >= 0 and d_valid >= -RETRY_VALID_TOL and (d_iou >= RETRY_GAIN or d_valid >= RETRY_VALID_GAIN)


def retry_options(options: Mapping[str, Any]) -> tuple[bool, float]:
    """The ``seed_layout`` (on by default) and ``retry_iou`` (``RETRY_IOU``) options of
    :func:`layout_retry`, as ``canny`` and ``active-contour`` take them."""
    return opt_bool(options, "seed_layout", True), opt_float(options, "retry_iou", RETRY_IOU, lo=0.0, hi=1.0)


def layout_retry(eimg: EdgeImage, features: Sequence[Feature], out: list[FeatureResult],
                 ropt: Mapping[str, Any], *, source: str, min_valid: float, image_shape: tuple[int, int],
                 retry_iou: float = RETRY_IOU) -> None:
    """Re-extract, in place in ``out``, features a fallback's coarse contours served badly,
    seeded with their aligned layout polygon.

    On noisy or charging images the iso-line (``threshold``), the edge-enclosed region
    (``canny``) or the snake (``active-contour``) of a shape can wander into its
    interior, follow a charging boundary or leak into a neighbour; the feature then
    comes out ``low_contrast``, ``not_found`` or ``partial``, or ``ok`` with a poor
    layout overlap (< ``retry_iou``) or few clean normals (< ``RETRY_MIN_VALID``). The
    aligned layout polygon is a second seed within the search window of the printed
    edge (bias, corner rounding and line-end pullback are a few pixels). The retry
    replaces the first result only as :func:`retry_wins` decides; otherwise the first
    result stands, so an unprinted feature stays unreported. Results the tone check
    already re-seeded from the layout are left alone.
    """
    def poor(r: FeatureResult) -> bool:
        if r.extra.get("tone_check"):  # already seeded from the layout, on the side the tone check chose
            return False
        if r.status in RETRY_STATUSES or "split_level" in r.extra:
            return True
        return r.ok and (r.extra.get("layout_iou", 1.0) < retry_iou
                         or r.extra.get("valid_fraction", 1.0) < RETRY_MIN_VALID)

    retry = [i for i, r in enumerate(out) if poor(r) and usable_polygon(features[i].pixels)]
    if not retry:
        return
    extras = [{**out[i].extra, "seed": "layout", "first_status": out[i].status} for i in retry]
    new = refine_from_layout(eimg, features, retry, extras, ropt, source=source, min_valid=min_valid,
                             image_shape=image_shape, on_edge=True)
    for i, r in zip(retry, new):
        if r.ok and retry_wins(out[i], r.extra["valid_fraction"], r.extra["layout_iou"], min_valid=min_valid):
            out[i] = r


def _forced_side(eimg: EdgeImage, features: Sequence[Feature], idx: Sequence[int], out: Sequence[FeatureResult],
                 side: str, mark: str, ropt: Mapping[str, Any], *, source: str, min_valid: float,
                 image_shape: tuple[int, int]) -> list[FeatureResult]:
    """Features ``idx`` refined from their layout polygons with the substrate forced to ``side``,
    marked ``extra["tone_check"] = mark``."""
    return refine_from_layout(eimg, features, idx, [{**out[i].extra, "tone_check": mark} for i in idx], ropt,
                              source=source, min_valid=min_valid, image_shape=image_shape, substrate=side)


def tone_check(eimg: EdgeImage, features: Sequence[Feature], out: list[FeatureResult], ropt: Mapping[str, Any], *,
               source: str, min_valid: float, image_shape: tuple[int, int]) -> None:
    """Check the substrate side of ``out`` (one result per feature, in place) against the layout.

    See the module docstring. ``ropt`` are the refinement options the fallback used
    (:func:`~segsem_cli.edges.parse_refine_options`, without ``frame_px`` and
    ``image_sigma``); ``source`` names the fallback in the new results. A result the
    check replaced carries ``extra["tone_check"]`` (``flipped``, ``majority`` or ``minority``).
    """
    kw = dict(source=source, min_valid=min_valid, image_shape=image_shape)
    sides: dict[str, list[int]] = {"inside": [], "outside": []}
    for i, r in enumerate(out):
        s = r.extra.get("substrate")
        if r.ok and s in sides and usable_polygon(features[i].pixels):
            sides[s].append(i)
    for side, group in sides.items():
        if not group:
            continue
        misfit = _misfits([float(out[i].extra.get("layout_iou", 1.0)) for i in group],
                          [features[i].pixels for i in group], image_shape)
        if float(np.median(misfit)) < TONE_GATE_PX:
            continue
        # The misfit also counts shape differences (line-end pullback, corner rounding): the
        # edge offset itself decides whether the group is off its layout by a rim width.
        off_first = edge_offsets([out[i].contour_px for i in group], [features[i].pixels for i in group],
                                 image_shape, stride=TONE_GATE_STRIDE)
        if not np.isfinite(off_first).any() or abs(float(np.nanmedian(off_first))) < TONE_OFFSET_PX:
            continue
        other = "outside" if side == "inside" else "inside"
        new = _forced_side(eimg, features, group, out, other, "flipped", ropt, **kw)
        both = [k for k, r in enumerate(new) if r.ok]
        if not both:
            continue
        polys = [features[group[k]].pixels for k in both]
        off_old = edge_offsets([out[group[k]].contour_px for k in both], polys, image_shape)
        off_new = edge_offsets([new[k].contour_px for k in both], polys, image_shape)
        good = np.isfinite(off_old) & np.isfinite(off_new)
        if not good.any():
            continue
        if tone_flips(float(np.median(off_old[good])), float(np.median(off_new[good]))):
            for k in both:
                out[group[k]] = new[k]
    sides_now = [(i, r.extra.get("substrate")) for i, r in enumerate(out)
                 if r.ok and r.extra.get("substrate") in ("inside", "outside")]
    if len(sides_now) < TONE_MAJORITY_MIN:
        return
    n_in = sum(1 for _, sd in sides_now if sd == "inside")
    major = "inside" if n_in > len(sides_now) - n_in else "outside"
    minority = [i for i, sd in sides_now if sd != major and usable_polygon(features[i].pixels)]
    if not minority or len(sides_now) - len(minority) < TONE_MAJORITY * len(sides_now):
        return
    new = _forced_side(eimg, features, minority, out, major, "majority", ropt, **kw)
    for i, r in zip(minority, new):
        first_iou = float(out[i].extra.get("layout_iou", 1.0))
        if r.ok:
            # (a right minority against a wrong majority would land a rim width off its layout)
            if float(r.extra.get("layout_iou", 0.0)) >= first_iou:
                out[i] = r
        elif first_iou < MINORITY_IOU:
            keep = {k: v for k, v in out[i].extra.items()
                    if k not in ("valid_fraction", "median_snr", "roughness_px", "substrate", "layout_iou",
                                 "clipped", "border_fraction", "border_coverage")}
            out[i] = feature_result(features[i], None, source=source, image_shape=image_shape,
                                    status="not_found", extra={**keep, "tone_check": "minority"})
