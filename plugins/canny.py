"""Fallback ``canny``: Canny edges closed into regions per feature, then sub-pixel edge refinement.

Stages:

1. smooth (Gaussian ``canny_sigma``) and run :func:`cv2.Canny` with
   hysteresis thresholds set from the gradient statistics of the image
   (``high = max(high_k * median gradient, high_frac * 99.5th percentile)``,
   ``low = high / 2``); the median gradient is the noise floor since edges are sparse;
2. dilate the edges by one pixel to close small gaps and label the regions
   they enclose; per feature, fill the holes of each region its layout
   polygon overlaps and keep the one that overlaps it best (IoU >= ``min_iou``). A bright rim gives two edges per rim (both flanks),
   so the candidates include the feature up to either flank; either is a
   coarse start, and refinement puts the edge on the substrate-side flank;
3. :func:`segsem_cli.edges.refine_contours` on all features at once. A
   feature whose best region overlaps its layout polygon by IoU <
   ``layout_start_iou`` (edge gaps, noise) is refined from the layout
   polygon instead (``extra["coarse"] == "layout"``); refinement then decides
   whether an edge is there (``low_contrast`` if not);
4. tone check (``tone_check``, on by default with ``substrate=auto``): the substrate
   side each contour decided is checked against the aligned layout, as for
   ``threshold`` (:func:`segsem_cli.tone.tone_check`);
5. layout-seeded retry (``seed_layout``, on by default), as for ``threshold``
   (:func:`segsem_cli.tone.layout_retry`): a feature that came out ``not_found``,
   ``low_contrast`` or ``partial``, or ``ok`` with layout IoU below ``retry_iou``
   (0.75) or clean edges on fewer than 80 % of its normals (its region was a fragment
   or leaked into a neighbour), is refined again from its aligned layout polygon; the
   retry replaces it only as :func:`segsem_cli.tone.retry_wins` decides.

A region that reaches the image border (a shape cut by the field of view)
is a candidate like any other: its contour is closed along the border
(pixel-edge coordinates ``u = 0``, ``u = W``, ``v = 0``, ``v = H``), and
refinement keeps that part fixed; the result is ``ok`` with
``extra["clipped"] = True`` and ``extra["border_fraction"]``. Region contours
within ``border_px`` (3) of the border are put onto it
(:func:`segsem_cli.contours.snap_to_border`): a region also stops one dilated
edge short of a bright or dark frame in the outermost pixels.

Statuses as for ``threshold``: ``not_found``, ``clipped`` (an edge hugging the
border, whose normals leave the image), ``merged`` (the region covers half of
another layout feature too; ``extra["merged_with"]``), ``low_contrast``.

Options: ``canny_sigma`` (1.5), ``high_k`` (4.0), ``high_frac`` (0.2),
``min_iou`` (0.2), ``layout_start_iou`` (0.5), ``border_px`` (3.0),
``min_valid`` (0.5), ``tone_check`` (1), ``seed_layout`` (1), ``retry_iou`` (0.75), and the refinement options of
:func:`segsem_cli.edges.parse_refine_options`.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from segsem_cli import hookimpl
from segsem_cli.contours import coarse_contours, polygon_ious, polygon_mask, snap_to_border, usable_polygon
from segsem_cli.edges import (EdgeImage, feature_result, gaussian_smooth, opt_float, parse_refine_options,
                              refine_contours, suppress_frame)
from segsem_cli.tone import layout_retry, retry_options, tone_check as run_tone_check, tone_check_enabled
from segsem_cli.types import Feature, FeatureResult, SEMImage


def canny_edges(pixels: np.ndarray, *, sigma: float = 1.5, high_k: float = 4.0, high_frac: float = 0.2) -> np.ndarray:
    """Boolean Canny edge map of an image with data-driven hysteresis thresholds (see module docs)."""
    import cv2

    sm = gaussian_smooth(pixels, sigma)
    lo, hi = np.percentile(sm[::2, ::2], [0.5, 99.5])
    if not hi > lo:
        return np.zeros(sm.shape, dtype=bool)
    img8 = np.clip((sm - lo) * (255.0 / (hi - lo)), 0, 255).astype(np.uint8)
    gx = cv2.Sobel(img8, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(img8, cv2.CV_32F, 0, 1, ksize=3)
    gm = np.hypot(gx, gy)[::2, ::2]
    high = max(high_k * float(np.median(gm)), high_frac * float(np.percentile(gm, 99.5)), 1.0)
    return cv2.Canny(img8, 0.5 * high, high, L2gradient=True) > 0


class EdgeRegions:
    """Regions enclosed by a Canny edge map (edges dilated by one pixel to close small gaps).

    ``labels`` labels the non-edge pixels (4-connectivity); ``slices`` are
    their bounding boxes; ``areas`` their pixel counts; ``on_border`` flags regions
    that reach the image border.
    """

    def __init__(self, edges: np.ndarray):
        from scipy import ndimage as ndi

        self.shape = edges.shape
        self.labels, self.n = ndi.label(~ndi.binary_dilation(edges))
        self.slices = ndi.find_objects(self.labels)
        lab = self.labels
        self.areas = np.bincount(lab.ravel(), minlength=self.n + 1)
        self.on_border = np.zeros(self.n + 1, dtype=bool)
        self.on_border[np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))] = True
        self._filled: dict[int, tuple[tuple[slice, slice], np.ndarray]] = {}

    def filled(self, lbl: int) -> tuple[tuple[slice, slice], np.ndarray]:
        """Region ``lbl`` with its holes filled, as (bounding-box slices, mask within them)."""
        from scipy import ndimage as ndi

        if lbl not in self._filled:
            sl = self.slices[lbl - 1]
            self._filled[lbl] = (sl, ndi.binary_fill_holes(self.labels[sl] == lbl))
        return self._filled[lbl]

    def candidates(self, polygon_uv: np.ndarray) -> tuple[list[int], np.ndarray, tuple[slice, slice]]:
        """Labels of the regions a ``(u, v)`` polygon overlaps, its mask and the mask's slices."""
        h, w = self.shape
        u0, v0 = np.floor(polygon_uv.min(axis=0)).astype(int)
        u1, v1 = np.ceil(polygon_uv.max(axis=0)).astype(int)
        r0, r1, c0, c1 = max(0, v0), min(h, v1 + 1), max(0, u0), min(w, u1 + 1)
        if r1 - r0 < 1 or c1 - c0 < 1:
            return [], np.zeros((0, 0), bool), (slice(0, 0), slice(0, 0))
        sl = (slice(r0, r1), slice(c0, c1))
        mask = polygon_mask(polygon_uv - [c0, r0], (r1 - r0, c1 - c0))
        hits = np.bincount(self.labels[sl][mask], minlength=self.n + 1)
        return [int(x) for x in np.nonzero(hits)[0] if x != 0], mask, sl


def _overlap(sl_a, mask_a, sl_b, mask_b) -> tuple[int, int, int]:
    """(intersection, area a, area b) of two masks given with their bounding-box slices."""
    r0 = max(sl_a[0].start, sl_b[0].start)
    r1 = min(sl_a[0].stop, sl_b[0].stop)
    c0 = max(sl_a[1].start, sl_b[1].start)
    c1 = min(sl_a[1].stop, sl_b[1].stop)
    na, nb = int(mask_a.sum()), int(mask_b.sum())
    if r0 >= r1 or c0 >= c1:
        return 0, na, nb
    a = mask_a[r0 - sl_a[0].start:r1 - sl_a[0].start, c0 - sl_a[1].start:c1 - sl_a[1].start]
    b = mask_b[r0 - sl_b[0].start:r1 - sl_b[0].start, c0 - sl_b[1].start:c1 - sl_b[1].start]
    return int(np.count_nonzero(a & b)), na, nb


def region_for_feature(regions: EdgeRegions, polygons: Sequence[np.ndarray], index: int, *,
                       min_iou: float = 0.2) -> tuple[np.ndarray | None, float, str, list[int]]:
    """The edge-enclosed region that best matches layout polygon ``index``.

    Returns ``(coarse contour or None, iou, status, merged_with)``: status is
    ``"ok"`` or ``"not_found"``; ``merged_with`` lists the other polygons
    covered by half or more by a filled region that also holds this feature (a
    bridge). With a bright rim the regions are nested (feature up to the rim's
    inner flank, the rim band filled up to its outer flank); the best IoU picks
    one, the outer one reveals bridges. A region reaching the image border
    gives a contour closed along the border (exactly on ``u = 0``, ``W``,
    ``v = 0``, ``H``). Regions too large to reach ``min_iou`` (the background, or
    a leak through a gap in the edges) are skipped before any filling.
    """
    if not usable_polygon(polygons[index]):
        return None, 0.0, "not_found", []
    poly = np.asarray(polygons[index], float)
    labels, mask, sl = regions.candidates(poly)
    # IoU <= (polygon mask pixels) / (region pixels): larger regions cannot reach min_iou.
    max_area = int(mask.sum()) / max(min_iou, 1e-3)
    best, best_iou = None, 0.0
    filled_cands = []
    for lbl in labels:
        if regions.areas[lbl] > max_area:
            continue
        fs, fm = regions.filled(lbl)
        inter, na, nb = _overlap(sl, mask, fs, fm)
        iou = inter / max(1, na + nb - inter)
        filled_cands.append((lbl, fs, fm))
        if iou > best_iou:
            best, best_iou = lbl, iou
    if best is None or best_iou < min_iou:
        return None, best_iou, "not_found", []
    bsl, bm = regions.filled(best)
    merged: set[int] = set()
    for lbl, fs, fm in filled_cands:
        inter, na, nb = _overlap(bsl, bm, fs, fm)
        if inter < 0.9 * na:  # this region does not hold the chosen one
            continue
        for j, pj in enumerate(polygons):
            if j == index:
                continue
            pj = np.asarray(pj, float)
            if not usable_polygon(pj) or (pj.max(axis=0)[0] < fs[1].start or pj.min(axis=0)[0] > fs[1].stop
                    or pj.max(axis=0)[1] < fs[0].start or pj.min(axis=0)[1] > fs[0].stop):
                continue
            _, pmask, psl = regions.candidates(pj)
            if pmask.size and _overlap(psl, pmask, fs, fm)[0] >= 0.5 * max(1, int(pmask.sum())):
                merged.add(j)
    # Padded by one pixel so that a region reaching the image border is closed along it.
    cs = [c for c in coarse_contours(np.pad(bm, 1).astype(np.float32), 0.5, min_area=4.0) if c.closed]
    if not cs:
        return None, best_iou, "not_found", []
    c = max(cs, key=lambda x: abs(x.area)).points + [bsl[1].start - 1, bsl[0].start - 1]
    return c, best_iou, "ok", sorted(merged)


class CannyFallback:
    name = "canny"
    description = "Canny edges closed into regions per layout feature + sub-pixel edge refinement"

    def check_options(self, options: dict[str, Any]) -> None:
        """Validate ``--fallback-opt`` values once, before any image is read: :meth:`extract` parses
        every option before it looks at the image, and returns at once without features."""
        self.extract(None, [], **options)  # type: ignore[arg-type]

    def extract(self, image: SEMImage, features: Sequence[Feature], **options: Any) -> list[FeatureResult]:
        ropt = parse_refine_options(options)
        sigma = opt_float(options, "canny_sigma", 1.5, lo=0.0, hi=50.0)
        high_k = opt_float(options, "high_k", 4.0, lo=0.0)
        high_frac = opt_float(options, "high_frac", 0.2, lo=0.0, hi=1.0)
        min_iou = opt_float(options, "min_iou", 0.2, lo=0.0, hi=1.0)
        min_valid = opt_float(options, "min_valid", 0.5, lo=0.0, hi=1.0)
        tone_check = tone_check_enabled(options, ropt)
        layout_start_iou = opt_float(options, "layout_start_iou", 0.5, lo=0.0, hi=1.0)
        border_px = opt_float(options, "border_px", 3.0, lo=0.0, hi=20.0)
        seed_layout, retry_iou = retry_options(options)
        if len(features) == 0:
            return []
        frame_px = ropt.pop("frame_px")
        eimg = EdgeImage(image.pixels, image_sigma=ropt.pop("image_sigma"), frame_px=frame_px)
        edges = canny_edges(suppress_frame(image.pixels, frame_px), sigma=sigma, high_k=high_k, high_frac=high_frac)

        regions = EdgeRegions(edges)
        polys = [np.asarray(f.pixels, float) for f in features]
        found = [region_for_feature(regions, polys, i, min_iou=min_iou) for i in range(len(features))]
        # Where the edges enclose no good region (gaps, noise), start from the layout polygon.
        start: dict[int, np.ndarray] = {}
        coarse: dict[int, str] = {}
        for i, (c, iou, st, mw) in enumerate(found):
            if mw:
                continue
            if c is not None and iou >= layout_start_iou:
                snapped = snap_to_border(c, image.shape, border_px=border_px) if ropt["border"] else c
                start[i], coarse[i] = (snapped if usable_polygon(snapped) else c), "edges"
            elif usable_polygon(polys[i]):
                start[i], coarse[i] = polys[i], "layout"
        todo = sorted(start)
        refined = dict(zip(todo, refine_contours(eimg, [start[i] for i in todo], **ropt)))

        ious = dict(zip(todo, polygon_ious([refined[i].contour_uv for i in todo], [polys[i] for i in todo])))
        out: list[FeatureResult] = []
        for i, f in enumerate(features):
            c, iou, status, merged_with = found[i]
            extra: dict[str, Any] = {"region_iou": iou}
            if merged_with:
                extra["merged_with"] = [features[j].feature_id for j in merged_with]
                out.append(feature_result(f, None, source=self.name, image_shape=image.shape,
                                          status="merged", extra=extra))
            elif i in refined:
                extra["coarse"] = coarse[i]
                out.append(feature_result(f, refined[i], source=self.name, image_shape=image.shape,
                                          min_valid=min_valid, layout_iou=ious[i], extra=extra))
            else:
                out.append(feature_result(f, None, source=self.name, image_shape=image.shape,
                                          status=status, extra=extra))
        if tone_check:
            run_tone_check(eimg, features, out, ropt, source=self.name, min_valid=min_valid, image_shape=image.shape)
        if seed_layout:
            layout_retry(eimg, features, out, ropt, source=self.name, min_valid=min_valid, image_shape=image.shape,
                         retry_iou=retry_iou)
        return out


@hookimpl
def register_fallbacks(register):
    register(CannyFallback())
