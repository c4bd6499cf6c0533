"""Per-feature judge: backbone or fallback, refined on the SEM signal.

For each layout feature the backbone (SAM2) proposes a mask contour and the
fallback a classical contour. The backbone contour is refined to sub-pixel
precision along its normals with the same edge convention as the ``threshold``
fallback (:func:`segsem_cli.edges.refine_contour`). The feature's confidence is

    confidence = c_model^0.4 * c_layout^0.2 * c_agree^0.2 * c_edge^0.2 * c_excl

* ``c_model``: the backbone's calibrated confidence (predicted IoU and
  stability, calibrated on validation data at fine-tuning time);
* ``c_layout``: agreement of the mask with the layout shape,
  ``clip((IoU(mask, layout) - 0.3) / 0.5, 0, 1)`` (printed shapes differ from
  the design by bias and rounding, so an IoU of 0.8 already counts as full
  agreement, while a mask spilling onto neighbours scores low);
* ``c_agree``: agreement with the fallback's contour,
  ``exp(-d / 1 px)`` with ``d`` the mean symmetric distance between the two
  contours (0.5 when the fallback found nothing);
* ``c_edge``: fraction of the refined contour's normals that found a clean edge;
* ``c_excl``: a gate against masks spilling onto neighbours:
  ``clip(1 - (spill - 0.1) / 0.3, 0, 1)`` with ``spill`` the largest fraction
  of another feature's layout polygon that the contour covers (0.4 or more: 0).

Where ``confidence >= threshold`` the refined backbone contour is kept
(``source = backbone name``); otherwise the fallback's contour if it has one
(``source = fallback name``, its own confidence); where both fail the feature
is reported ``failed``, never exported as a guess.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .contours import polygon_iou
from .types import Feature, FeatureResult, SEMImage

WEIGHTS = {"model": 0.4, "layout": 0.2, "agree": 0.2, "edge": 0.2}


def _poly(contour: np.ndarray):
    from shapely.geometry import Polygon
    from shapely.validation import make_valid

    p = Polygon(contour)
    if not p.is_valid:
        p = make_valid(p)
    return p


def mean_contour_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean symmetric distance between the vertices of two closed contours and the other contour."""
    import shapely

    ra, rb = shapely.LinearRing(a), shapely.LinearRing(b)
    da = shapely.distance(shapely.points(a), rb)
    db = shapely.distance(shapely.points(b), ra)
    return float((da.mean() + db.mean()) / 2.0)


def judge(model_conf: float, layout_iou: float, agree_dist_px: float | None, edge_valid: float,
          spill: float = 0.0) -> dict[str, float]:
    """The per-feature confidence and its parts (see the module docstring)."""
    parts = {
        "model": float(np.clip(model_conf, 0.0, 1.0)),
        "layout": float(np.clip((layout_iou - 0.3) / 0.5, 0.0, 1.0)),
        "agree": 0.5 if agree_dist_px is None else float(np.exp(-agree_dist_px / 1.0)),
        "edge": float(np.clip(edge_valid, 0.0, 1.0)),
        "excl": float(np.clip(1.0 - (spill - 0.1) / 0.3, 0.0, 1.0)),
    }
    conf = parts["excl"]
    for k, w in WEIGHTS.items():
        conf *= max(parts[k], 1e-6) ** w
    parts["confidence"] = float(conf)
    return parts


def spill_fractions(contours: Sequence[np.ndarray | None], layout_px: Sequence[np.ndarray]) -> list[float]:
    """For each contour, the largest fraction of ANOTHER feature's layout polygon it covers (0 for None)."""
    import shapely

    lays = [_poly(p) if len(p) >= 3 else None for p in layout_px]
    valid = [i for i, g in enumerate(lays) if g is not None and g.area > 0]
    tree = shapely.STRtree([lays[i] for i in valid]) if valid else None
    out = []
    for i, c in enumerate(contours):
        if c is None or tree is None or len(c) < 3:
            out.append(0.0)
            continue
        pc = _poly(c)
        best = 0.0
        for k in tree.query(pc, predicate="intersects"):
            j = valid[int(k)]
            if j == i:
                continue
            best = max(best, pc.intersection(lays[j]).area / lays[j].area)
        out.append(float(best))
    return out


@dataclass(frozen=True)
class Candidate:
    """Both proposals for one feature: the judged, refined backbone result and the fallback's."""

    feature_id: str
    backbone: FeatureResult | None
    fallback: FeatureResult


def candidates(
    image: SEMImage,
    features: Sequence[Feature],
    *,
    fallback,
    fallback_options: dict[str, Any] | None = None,
    model=None,
    refine: bool = True,
    edge_options: dict[str, Any] | None = None,
    run_fallback: bool = True,
) -> tuple[list[Candidate], dict[str, float]]:
    """Run the fallback (and the backbone, refined and judged) on every feature.

    The backbone results carry the judged confidence (see the module
    docstring) and, in ``extra``, its parts. Returns the candidates and the
    time per stage (``fallback``, ``segment``, ``refine``, ``judge``) in s.
    With ``run_fallback=False`` (backbone-only mode, needs a model) the
    fallback is skipped: its results are ``skipped`` and the agreement term is neutral.
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if run_fallback or model is None:
        fb = fallback.extract(image, list(features), **(fallback_options or {}))
    else:
        fb = [FeatureResult(f.feature_id, None, fallback.name, 0.0, "skipped") for f in features]
    timings["fallback"] = time.perf_counter() - t0
    if len(fb) != len(features):
        raise RuntimeError(f"fallback '{fallback.name}' returned {len(fb)} results for {len(features)} features")
    if model is None:
        return [Candidate(f.feature_id, None, c) for f, c in zip(features, fb)], timings

    t0 = time.perf_counter()
    bb = model.predict(image, list(features))
    timings["segment"] = time.perf_counter() - t0
    if len(bb) != len(features):
        raise RuntimeError(f"backbone returned {len(bb)} results for {len(features)} features")

    from .edges import parse_refine_options, refine_contours

    t0 = time.perf_counter()
    refined: dict[int, Any] = {}
    if refine:
        idx = [i for i, b in enumerate(bb) if b.ok]
        if idx:
            # the substrate side is decided from the data per contour (polarity-agnostic)
            res = refine_contours(image.pixels, [bb[i].contour_px for i in idx], **parse_refine_options(edge_options or {}))
            refined = dict(zip(idx, res))
    timings["refine"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    final = [(refined[i].contour_uv if i in refined else b.contour_px) if b.ok else None for i, b in enumerate(bb)]
    spills = spill_fractions(final, [f.pixels for f in features])
    out: list[Candidate] = []
    for i, (f, b, c) in enumerate(zip(features, bb, fb)):
        if not b.ok:
            out.append(Candidate(f.feature_id, b, c))
            continue
        raw = b.contour_px
        contour, valid = final[i], (refined[i].valid_fraction if i in refined else 1.0)
        lay_iou = polygon_iou(contour, f.pixels)
        agree = mean_contour_distance(contour, c.contour_px) if c.ok else None
        parts = judge(b.confidence, lay_iou, agree, valid, spills[i])
        extra = {k: v for k, v in b.extra.items() if isinstance(v, (int, float, str, bool))}
        extra.update({f"c_{k}": round(v, 4) for k, v in parts.items() if k != "confidence"})
        extra["model_confidence"] = round(float(b.confidence), 4)
        if i in refined:
            from .edges import border_extra

            extra.update(border_extra(refined[i]))
            extra["refine_shift_px"] = round(mean_contour_distance(raw, contour), 4)
            extra["_raw_contour"] = raw
        out.append(Candidate(f.feature_id, FeatureResult(f.feature_id, contour, b.source, parts["confidence"], "ok", b.holes_px, extra), c))
    timings["judge"] = time.perf_counter() - t0
    return out, timings


def select(cands: Sequence[Candidate], threshold: float, *, mode: str = "hybrid") -> list[FeatureResult]:
    """Per feature: the backbone where its confidence reaches ``threshold``, else the fallback, else failed.

    ``mode="backbone"`` keeps every backbone contour and never falls back
    (for comparison); ``mode="fallback"`` keeps the fallback's.
    """
    out: list[FeatureResult] = []
    for cand in cands:
        b, c = cand.backbone, cand.fallback
        if b is None or mode == "fallback":
            out.append(c)
        elif mode == "backbone":
            out.append(b if b.ok else FeatureResult(cand.feature_id, None, b.source, float(b.confidence), "failed", (), dict(b.extra)))
        elif b.ok and b.confidence >= threshold:
            out.append(b)
        elif c.ok:
            extra = dict(c.extra)
            extra["backbone_confidence"] = round(float(b.confidence), 4)
            out.append(FeatureResult(c.feature_id, c.contour_px, c.source, c.confidence, "ok", c.holes_px, extra))
        else:
            extra = {"backbone_status": b.status, "fallback_status": c.status, "backbone_confidence": round(float(b.confidence), 4)}
            out.append(FeatureResult(cand.feature_id, None, b.source, float(b.confidence), "failed", (), extra))
    return out


def combine(
    image: SEMImage,
    features: Sequence[Feature],
    *,
    fallback,
    fallback_options: dict[str, Any] | None = None,
    model=None,
    threshold: float = 0.5,
    refine: bool = True,
    edge_options: dict[str, Any] | None = None,
    mode: str = "hybrid",
) -> tuple[list[FeatureResult], dict[str, float]]:
    """One result per feature: the fallback alone, or the backbone judged against it (see :func:`select`)."""
    cands, timings = candidates(image, features, fallback=fallback, fallback_options=fallback_options, model=model,
                                refine=refine, edge_options=edge_options, run_fallback=mode != "backbone")
    return select(cands, threshold, mode=mode), timings
