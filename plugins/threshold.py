"""Fallback ``threshold``: iso-contours of the smoothed image, then sub-pixel edge refinement.

Stages (all vectorised; one pass over the image, one batched refinement):

1. smooth (Gaussian ``coarse_sigma``) and pick a two-class level (Otsu by
   default, or ``level=<grey>``);
2. iso-contours at that level (marching squares); they lie somewhere on the
   rise to the rim, possibly on the rim's far flank, which refinement fixes.
   Iso-lines that run out of the image are closed along the image border
   (:func:`segsem_cli.contours.close_along_border`): every region they cut the
   image into, bright or dark, becomes a candidate whose border part lies
   exactly on ``u = 0``, ``u = W``, ``v = 0`` or ``v = H``;
3. associate each layout feature with the contour that overlaps its polygon
   best (IoU of filled shapes, at least ``min_iou``);
4. :func:`segsem_cli.edges.refine_contours` moves every associated contour
   onto the physical edge (``edge``/``threshold`` rule, see docs/edge-convention.md);
   border segments stay fixed and do not count in the confidence.

A shape cut by the image border (a line crossing the field of view) is
returned ``ok`` with its part inside the image, ``extra["clipped"] = True``
and ``extra["border_fraction"]``. Statuses otherwise: ``not_found`` (no
contour overlaps the feature), ``clipped`` (an edge hugging the border, whose
normals leave the image), ``merged`` (one printed
shape covers several layout features, e.g. a bridge; the refined shape is in
``extra["merged_contour_px"]`` and the other ids in ``extra["merged_with"]``),
``low_contrast`` (fewer than ``min_valid`` of the normals found a clean edge).

Options (``--fallback-opt key=value``): ``coarse_sigma`` (2.0), ``level``
(Otsu), ``min_iou`` (0.2), ``min_valid`` (0.5), ``min_area`` (4 px^2), and the
refinement options of :func:`segsem_cli.edges.parse_refine_options` (here
``passes`` defaults to 1: the iso-lines already run parallel to the edge).
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np

from segsem_cli import hookimpl
from segsem_cli.contours import (associate, close_along_border, coarse_contours, polygon_area, polygon_ious,
                                 usable_polygon)
from segsem_cli.edges import (EdgeImage, feature_result, gaussian_smooth, opt_float, parse_refine_options,
                              refine_contours, suppress_frame)
from segsem_cli.types import Feature, FeatureResult, SEMImage


def otsu_level(img: np.ndarray, *, max_samples: int = 262144) -> float:
    """Otsu's two-class level of an image (on a regular subsample for speed)."""
    from skimage.filters import threshold_otsu

    a = np.asarray(img)
    step = max(1, int(np.sqrt(a.size / max_samples)))
    return float(threshold_otsu(a[::step, ::step]))


class ThresholdFallback:
    name = "threshold"
    description = "Otsu iso-contours of the smoothed image + sub-pixel edge refinement (fast)"

    def __init__(self) -> None:
        self.last_timings: dict[str, float] = {}

    def extract(self, image: SEMImage, features: Sequence[Feature], **options: Any) -> list[FeatureResult]:
        t0 = time.perf_counter()
        ropt = parse_refine_options(options)
        if "passes" not in options:  # iso-lines already run parallel to the edge: one pass is enough
            ropt["passes"] = 1
        coarse_sigma = opt_float(options, "coarse_sigma", 2.0, lo=0.0, hi=50.0)
        min_iou = opt_float(options, "min_iou", 0.2, lo=0.0, hi=1.0)
        min_valid = opt_float(options, "min_valid", 0.5, lo=0.0, hi=1.0)
        min_area = opt_float(options, "min_area", 4.0, lo=0.0)

        frame_px = ropt.pop("frame_px")
        eimg = EdgeImage(image.pixels, image_sigma=ropt.pop("image_sigma"), frame_px=frame_px)
        coarse = gaussian_smooth(suppress_frame(image.pixels, frame_px), coarse_sigma)
        level = opt_float(options, "level", float("nan"))
        if not np.isfinite(level):
            level = otsu_level(coarse)
        t1 = time.perf_counter()

        found = coarse_contours(coarse, level, min_area=min_area)
        t2 = time.perf_counter()

        cands = [c.points for c in found if c.closed]
        open_ = [c.points for c in found if not c.closed]
        polys = [f.pixels for f in features]
        if open_:
            # Iso-lines running out of the image: close the regions they cut it into along
            # the border. A region can only reach IoU >= min_iou with a feature of at least
            # min_iou times its area, so larger ones (the background) are not candidates.
            areas = [polygon_area(np.asarray(p, float)) for p in polys if usable_polygon(p)]
            amax = max(areas) if areas else 0.0
            cands += [r for r in close_along_border(open_, image.shape, min_area=min_area)
                      if polygon_area(r) * max(min_iou, 1e-3) <= amax]
        assoc = associate(polys, cands, min_iou=min_iou)
        t3 = time.perf_counter()

        # Refine every contour that is some feature's best match.
        todo = sorted({a.index for a in assoc if a.index >= 0})
        refined = dict(zip(todo, refine_contours(eimg, [cands[i] for i in todo], **ropt)))
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
                extra["merged_contour_px"] = res.contour_uv
                out.append(feature_result(f, None, source=self.name, image_shape=image.shape,
                                          status="merged", extra=extra))
                continue
            out.append(feature_result(f, res, source=self.name, image_shape=image.shape, min_valid=min_valid,
                                      layout_iou=ious[i], extra=extra))
        t5 = time.perf_counter()
        self.last_timings = {"smooth": t1 - t0, "coarse_contours": t2 - t1, "association": t3 - t2,
                             "refinement": t4 - t3, "results": t5 - t4, "total": t5 - t0}
        return out


@hookimpl
def register_fallbacks(register):
    register(ThresholdFallback())
