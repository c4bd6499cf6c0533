"""Fallback ``active-contour``: a snake from the aligned layout polygon, then sub-pixel edge refinement.

For low-contrast and noisy images, where iso-lines and Canny edges break up:
the layout polygon (``Feature.pixels``) is a good prior for where the edge is.

Stages, per feature (in a crop around the polygon):

1. edge map: Sobel magnitude of the image smoothed with ``snake_sigma`` (2 px),
   scaled to [0, 1]. Heavy smoothing merges the two flanks of a bright rim
   into one band, so the snake is not torn between them;
2. :func:`skimage.segmentation.active_contour` (periodic snake) started on the
   layout polygon resampled every ``init_step_px``, pulled to the edge map
   (``w_edge = 1``) with tension ``alpha`` and stiffness ``beta``;
3. :func:`segsem_cli.edges.refine_contours` on all snakes at once (it finds
   the substrate-side flank whichever flank the snake settled on);
4. tone check (``tone_check``, on by default with ``substrate=auto``): the substrate
   side each contour decided is checked against the aligned layout, as for
   ``threshold`` (:func:`segsem_cli.tone.tone_check`);
5. layout-seeded retry (``seed_layout``, on by default), as for ``threshold`` and
   ``canny`` (:func:`segsem_cli.tone.layout_retry`): a feature whose snake led the
   refinement astray (``not_found``, ``low_contrast``, ``partial``, or ``ok`` with layout
   IoU below ``retry_iou`` (0.75) or clean edges on fewer than 80 % of its normals) is
   refined again straight from its layout polygon, and replaced only as
   :func:`segsem_cli.tone.retry_wins` decides.

A layout polygon cut by the field of view (vertices on the image border) keeps
its border part: only the runs of real edge between border points are snakes,
open ones with their ends held on the border (``boundary_condition="fixed"``),
so the snake cannot shrink away from the border. Points starting within
``search_px`` of the border are held too (a print reaching the border while
its layout polygon does not: refinement moves them onto the border). Refinement then keeps the
border part fixed too: the result is ``ok`` with ``extra["clipped"] = True``
and ``extra["border_fraction"]``.

Statuses: ``low_contrast`` (fewer than ``min_valid`` of the normals found a
clean edge: a snake always ends somewhere, refinement decides whether an
edge is really there), ``not_found`` (the refined shape overlaps the layout
polygon by IoU < ``min_iou``), ``clipped`` (an edge hugging the border, whose
normals leave the image), ``merged`` (as for ``canny``).

Options: ``snake_sigma`` (2.0), ``alpha`` (0.01), ``beta`` (0.1), ``gamma``
(0.01), ``max_iter`` (300), ``init_step_px`` (2.0), ``margin_px`` (12),
``min_iou`` (0.2), ``min_valid`` (0.5), ``tone_check`` (1), ``seed_layout`` (1), ``retry_iou`` (0.75),
and the refinement options of
:func:`segsem_cli.edges.parse_refine_options`.
"""
from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np

from segsem_cli import hookimpl
from segsem_cli.contours import (border_mask, border_runs, features_covered, orient, polygon_ious, resample_closed,
                                 snap_to_border, usable_polygon)
from segsem_cli.edges import (EdgeImage, feature_result, gaussian_smooth, opt_float, opt_int, parse_refine_options,
                              refine_contours, suppress_frame)
from segsem_cli.tone import layout_retry, retry_options, tone_check as run_tone_check, tone_check_enabled
from segsem_cli.types import Feature, FeatureResult, SEMImage


def edge_map(pixels: np.ndarray, sigma: float) -> np.ndarray:
    """Sobel gradient magnitude of the smoothed image, scaled to [0, 1] (float32)."""
    import cv2

    sm = gaussian_smooth(pixels, sigma)
    g = np.hypot(cv2.Sobel(sm, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(sm, cv2.CV_32F, 0, 1, ksize=3))
    top = float(np.percentile(g, 99.9)) if g.size else 0.0
    return np.clip(g / top, 0, 1).astype(np.float32) if top > 0 else np.zeros_like(g)


def snake_from_polygon(edges: np.ndarray, polygon_uv: np.ndarray, *, margin_px: float = 12.0,
                       init_step_px: float = 2.0, alpha: float = 0.01, beta: float = 0.1, gamma: float = 0.01,
                       max_iter: int = 300, border_px: float = 2.0, hold_px: float = 0.0) -> np.ndarray | None:
    """Run a snake on ``edges`` from a ``(u, v)`` polygon; returns the snake in ``(u, v)`` or None.

    The polygon is clamped into the image and vertices within ``border_px`` of
    the border are put onto it (:func:`segsem_cli.contours.snap_to_border`).
    Points within ``hold_px`` of the border (at least the border points) are
    held where they are: without an edge to pull them, a snake shrinks away
    from the border where the printed shape runs out of the image. Without
    held points the snake is periodic; otherwise each run of points between
    held ones is an open snake whose two ends (the neighbouring held points)
    are fixed.
    """
    from skimage.segmentation import active_contour

    if not usable_polygon(polygon_uv):
        return None
    h, w = edges.shape
    poly = snap_to_border(np.asarray(polygon_uv, dtype=np.float64), (h, w), border_px=border_px)
    if not usable_polygon(poly):
        return None
    u0, v0 = np.floor(poly.min(axis=0) - margin_px).astype(int)
    u1, v1 = np.ceil(poly.max(axis=0) + margin_px).astype(int)
    c0, r0, c1, r1 = max(0, u0), max(0, v0), min(w, u1), min(h, v1)
    if c1 - c0 < 4 or r1 - r0 < 4:
        return None
    init = orient(resample_closed(poly, init_step_px, min_points=12))
    crop = edges[r0:r1, c0:c1]
    kw = dict(alpha=alpha, beta=beta, gamma=gamma, w_line=0.0, w_edge=1.0, max_num_iter=int(max_iter))

    def run(pts: np.ndarray, bc: str) -> np.ndarray:
        rc = np.column_stack([pts[:, 1] - 0.5 - r0, pts[:, 0] - 0.5 - c0])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            snake = active_contour(crop, rc, boundary_condition=bc, **kw)
        return np.column_stack([snake[:, 1] + 0.5 + c0, snake[:, 0] + 0.5 + r0])

    b = border_mask(init, (h, w))
    if hold_px > 0:
        b |= np.minimum(np.minimum(init[:, 0], w - init[:, 0]), np.minimum(init[:, 1], h - init[:, 1])) <= hold_px
    if b.all():
        return init
    if not b.any():
        return run(init, "periodic")
    out = init.copy()
    n = len(init)
    for r in border_runs(b):
        if len(r) < 2:
            continue
        ends = [(r[0] - 1) % n, (r[-1] + 1) % n]
        out[r] = run(init[np.r_[ends[0], r, ends[1]]], "fixed")[1:-1]
    return out


class ActiveContourFallback:
    name = "active-contour"
    description = "Snake from the aligned layout polygon on an edge map + sub-pixel edge refinement (low contrast)"

    def check_options(self, options: dict[str, Any]) -> None:
        """Validate ``--fallback-opt`` values once, before any image is read: :meth:`extract` parses
        every option before it looks at the image, and returns at once without features."""
        self.extract(None, [], **options)  # type: ignore[arg-type]

    def extract(self, image: SEMImage, features: Sequence[Feature], **options: Any) -> list[FeatureResult]:
        ropt = parse_refine_options(options)
        sigma = opt_float(options, "snake_sigma", 2.0, lo=0.0, hi=50.0)
        kw = dict(alpha=opt_float(options, "alpha", 0.01, lo=0.0), beta=opt_float(options, "beta", 0.1, lo=0.0),
                  gamma=opt_float(options, "gamma", 0.01, lo=1e-6), max_iter=opt_int(options, "max_iter", 300, lo=1),
                  init_step_px=opt_float(options, "init_step_px", 2.0, lo=0.2),
                  margin_px=opt_float(options, "margin_px", 12.0, lo=0.0))
        min_iou = opt_float(options, "min_iou", 0.2, lo=0.0, hi=1.0)
        min_valid = opt_float(options, "min_valid", 0.5, lo=0.0, hi=1.0)
        tone_check = tone_check_enabled(options, ropt)
        seed_layout, retry_iou = retry_options(options)
        if len(features) == 0:
            return []
        frame_px = ropt.pop("frame_px")
        eimg = EdgeImage(image.pixels, image_sigma=ropt.pop("image_sigma"), frame_px=frame_px)
        edges = edge_map(suppress_frame(image.pixels, frame_px), sigma)

        # Points starting within the search window of the border are held: refinement then finds
        # the edge there, or moves them onto the border where the print runs out of the image.
        hold = ropt["search_px"] if ropt["border"] else 0.0
        snakes = [snake_from_polygon(edges, np.asarray(f.pixels, float), hold_px=hold, **kw) for f in features]
        todo = [i for i, s in enumerate(snakes) if s is not None]
        refined = dict(zip(todo, refine_contours(eimg, [snakes[i] for i in todo], **ropt)))
        cover = dict(zip(todo, features_covered([refined[i].contour_uv for i in todo],
                                                [f.pixels for f in features])))

        ious = dict(zip(todo, polygon_ious([refined[i].contour_uv for i in todo], [features[i].pixels for i in todo])))
        out: list[FeatureResult] = []
        for i, f in enumerate(features):
            if i not in refined:
                out.append(feature_result(f, None, source=self.name, image_shape=image.shape, status="not_found"))
                continue
            res = refined[i]
            iou = float(ious[i])
            extra: dict[str, Any] = {"layout_iou": iou}
            if res.valid_fraction >= min_valid and iou < min_iou:
                out.append(feature_result(f, None, source=self.name, image_shape=image.shape,
                                          status="not_found", extra=extra))
                continue
            others = [j for j in cover[i] if j != i]
            if others and res.valid_fraction >= min_valid:
                extra["merged_with"] = [features[j].feature_id for j in others]
                extra["merged_contour_px"] = res.contour_uv
                out.append(feature_result(f, None, source=self.name, image_shape=image.shape,
                                          status="merged", extra=extra))
                continue
            out.append(feature_result(f, res, source=self.name, image_shape=image.shape, min_valid=min_valid,
                                      layout_iou=iou, extra=extra))
        if tone_check:
            run_tone_check(eimg, features, out, ropt, source=self.name, min_valid=min_valid, image_shape=image.shape)
        if seed_layout:
            layout_retry(eimg, features, out, ropt, source=self.name, min_valid=min_valid, image_shape=image.shape,
                         retry_iou=retry_iou)
        return out


@hookimpl
def register_fallbacks(register):
    register(ActiveContourFallback())
