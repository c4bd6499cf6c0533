"""Per-feature judge: backbone or fallback, decided on measured evidence.

For each layout feature the backbone (SAM2) proposes a mask contour and the
fallback a classical contour. The backbone contour is refined to sub-pixel
precision along its normals with the same edge convention as the ``threshold``
fallback (:func:`segsem_cli.edges.refine_contours`; the substrate side is decided per
contour, except for a feature whose side the fallback's tone check settled against the
layout, :mod:`segsem_cli.tone`: its backbone contour is refined on that side), so both
candidates are judged on the same evidence (:class:`Evidence`):

* ``edge_valid``: fraction of the contour's normals that found a clean edge
  (border points of a clipped shape excluded), ``edge_snr`` their median SNR;
* ``layout_iou``: IoU of the filled contour with the aligned layout polygon;
* ``unsupported``: the fraction of the layout area where the contour departs
  from the layout and the image does not show it (:func:`unsupported_fraction`:
  design left out that looks like resist, or contour added that looks like
  substrate); a real printing deviation (bias, rounding, pull-back) costs nothing;
* ``spill``: the largest fraction of ANOTHER feature's layout polygon that the
  contour covers;
* and, between the two, ``distance_px``: their mean symmetric distance (points
  every 1 px on each contour, to the other).

A contour passes the **sanity gates** (:func:`gate`, the same for both) when
``edge_valid >= 0.7``, ``spill <= 0.1``, ``layout_iou >= 0.5`` and
``unsupported <= 0.1`` (:class:`Rules`). The backbone contour's confidence is
its own evidence:

    confidence = c_model^0.5 * c_layout^0.25 * c_edge^0.25 * c_excl

with ``c_model`` the backbone's calibrated confidence (predicted IoU and
stability, calibrated at fine-tuning time), ``c_layout = clip((IoU - 0.3) /
0.5, 0, 1)``, ``c_edge = edge_valid`` (1 when not refined) and ``c_excl =
clip(1 - (spill - 0.1) / 0.3, 0, 1)``. Per feature (:func:`decide`; ``T`` is the
threshold calibrated by ``segsem calibrate``):

1. backbone failed: the fallback's contour, else ``failed``;
2. **rescue** (the fallback failed): the backbone contour if it passes the
   gates and its confidence reaches ``T``, else ``failed`` (never a guess);
3. **agree** (``distance_px <= 1.5``: the same shape to within the edge noise
   of a low-dose image): the backbone's if confident and it passes the gates,
   else the fallback's (the mean distance hides a local departure, such as a
   line end cut 5 px short, which the gates see);
4. **disagree**: the fallback's if it passes the gates; a fallback that fails
   them is replaced only by a confident backbone contour that passes them and
   is at least as good on edges, support, spill and layout IoU; otherwise the
   fallback's (it passed its own checks).

A contour failing a gate is never exported by the backbone's word, whatever
``T``: the threshold only chooses among sane alternatives. Mask holes are not
exported (they are not refined and layout features have none;
``extra["holes_dropped"]``). Results keep ``source`` (who drew the contour)
and ``confidence`` (the exported contour's own); ``extra["decision"]`` names
the rule applied (``agree``, ``rescue``, ``rescue_rejected_unsupported``, ...).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .contours import polygon_iou
from .types import Feature, FeatureResult, SEMImage

WEIGHTS = {"model": 0.5, "layout": 0.25, "edge": 0.25}
#: Gaussian sigma (px) of the smoothing before :func:`unsupported_fraction` (shot noise).
SMOOTH_SIGMA = 1.5


@dataclass(frozen=True)
class Rules:
    """The thresholds of :func:`decide` (see the module docstring).

    agree_px : mean symmetric distance (px) under which the two contours are the same shape.
    min_edge : the sanity gates (:func:`gate`, the same for both candidates): clean edges found on at
        least this fraction of the contour's normals,
    min_iou : ... and reach this IoU with the aligned layout polygon (it is this feature),
    max_unsupported : ... and depart from the layout without support from the image on at most
        this fraction of the layout area (:func:`unsupported_fraction`),
    max_spill : ... and cover at most this fraction of another feature's layout polygon.
    """

    agree_px: float = 1.5
    min_edge: float = 0.7
    min_iou: float = 0.5
    max_unsupported: float = 0.1
    max_spill: float = 0.1


RULES = Rules()


@dataclass(frozen=True)
class Evidence:
    """What was measured about one candidate contour (after sub-pixel refinement).

    ``confidence`` (the candidate's own), ``layout_iou``, ``spill``,
    ``edge_valid``, ``edge_snr`` and ``unsupported`` as in the module
    docstring. ``edge_valid`` / ``edge_snr`` are None when unknown (a fallback
    that does not report them, an unrefined backbone contour): the edge gate
    then passes.
    """

    confidence: float
    layout_iou: float
    spill: float = 0.0
    edge_valid: float | None = None
    edge_snr: float | None = None
    unsupported: float = 0.0


def _poly(contour: np.ndarray):
    from shapely.geometry import Polygon
    from shapely.validation import make_valid

    p = Polygon(contour)
    if not p.is_valid:
        p = make_valid(p)
    return p


def mean_contour_distance(a: np.ndarray, b: np.ndarray, *, step_px: float = 1.0) -> float:
    """Mean symmetric distance (px) between two closed contours.

    Points every ``<= step_px`` along each contour (by arc length, so that
    vertex density does not weigh in) are measured to the other contour; the
    result is the mean of the two directions' means.
    """
    import shapely

    from .metrics import sample_ring

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ra, rb = shapely.LinearRing(a), shapely.LinearRing(b)
    da = shapely.distance(shapely.points(sample_ring(a, step_px)), rb)
    db = shapely.distance(shapely.points(sample_ring(b, step_px)), ra)
    return float((da.mean() + db.mean()) / 2.0)


def _fill(shape: tuple[int, int], poly: np.ndarray, origin: tuple[int, int]) -> np.ndarray:
    """Pixels of a window (``shape``, top-left pixel ``origin = (u0, v0)``) whose centres lie inside ``poly``."""
    import cv2

    m = np.zeros(shape, np.uint8)
    pts = np.rint((np.asarray(poly, np.float64) - 0.5 - np.asarray(origin, np.float64)) * 16.0).astype(np.int32)
    cv2.fillPoly(m, [pts.reshape(-1, 1, 2)], 1, lineType=cv2.LINE_8, shift=4)
    return m.astype(bool)


def unsupported_fraction(smoothed: np.ndarray, contour: np.ndarray, layout: np.ndarray, *, core_px: int = 2,
                         band_px: tuple[int, int] = (3, 8), local_px: int = 10, min_region_px: int = 4) -> float:
    """Fraction of a feature's layout area where the contour departs from the layout WITHOUT support from the image.

    A printed shape differs from its design (bias, corner rounding, line-end
    pull-back), but where a contour leaves part of the design out, that part
    must look like the outside (substrate), and where it covers more than the
    design, the extra must look like the inside. Each connected region of
    ``layout \\ contour`` and ``contour \\ layout`` (pixels whose centres are
    inside, eroded by 1 px against edge blur, at least ``min_region_px``) gets
    ``t = (mean - out) / (in - out)`` clipped to [0, 1], with ``in`` the median
    of the agreed interior (``contour & layout`` eroded by ``core_px``) and
    ``out`` the median of a band ``band_px`` px outside both, each taken within
    ``local_px`` of the region (charging makes the background vary). Missing
    regions count ``t`` of their area, extra regions ``1 - t``.

    Parameters
    ----------
    smoothed : the SEM image, smoothed against shot noise (2-D array, pixel ``(r, c)``
        covers ``[c, c+1) x [r, r+1)``).
    contour, layout : closed ``(N, 2)`` ``(u, v)`` pixel polygons.

    Returns
    -------
    float
        The unsupported area over the layout area (0: every departure from the
        design is what the image shows). 1 when it cannot be measured (no agreed
        interior or no background around the shape).
    """
    import cv2

    img = np.asarray(smoothed)
    if img.ndim != 2:
        raise ValueError(f"unsupported_fraction: expected a 2-D image, got shape {img.shape}")
    c, lay = np.asarray(contour, np.float64), np.asarray(layout, np.float64)
    if c.ndim != 2 or lay.ndim != 2 or len(c) < 3 or len(lay) < 3:
        return 1.0
    h, w = img.shape
    pad = band_px[1] + local_px + 2
    pts = np.vstack([c, lay])
    u0, v0 = int(max(0, np.floor(pts[:, 0].min()) - pad)), int(max(0, np.floor(pts[:, 1].min()) - pad))
    u1, v1 = int(min(w, np.ceil(pts[:, 0].max()) + pad)), int(min(h, np.ceil(pts[:, 1].max()) + pad))
    if u1 - u0 < 3 or v1 - v0 < 3:
        return 1.0
    win = img[v0:v1, u0:u1].astype(np.float64)
    C, L = _fill(win.shape, c, (u0, v0)), _fill(win.shape, lay, (u0, v0))
    k3 = np.ones((3, 3), np.uint8)

    def grow(m: np.ndarray, n: int) -> np.ndarray:
        return cv2.dilate(m.astype(np.uint8), k3, iterations=n).astype(bool) if n > 0 else m

    def shrink(m: np.ndarray, n: int) -> np.ndarray:
        return cv2.erode(m.astype(np.uint8), k3, iterations=n, borderType=cv2.BORDER_REPLICATE).astype(bool) if n > 0 else m

    both = C & L
    core = shrink(both, core_px)
    if core.sum() < 5:
        core = both
    union = C | L
    band = grow(union, band_px[1]) & ~grow(union, band_px[0])
    if core.sum() < 5 or band.sum() < 5 or not L.any():
        return 1.0
    g_in, g_out = float(np.median(win[core])), float(np.median(win[band]))
    bad = 0.0
    for region, inside in ((shrink(L & ~C, 1), False), (shrink(C & ~L, 1), True)):
        n, lab, stats, _ = cv2.connectedComponentsWithStats(region.astype(np.uint8), connectivity=8)
        for k in range(1, n):
            x, y, bw, bh, area = (int(v) for v in stats[k])
            if area < min_region_px:
                continue
            # the region's neighbourhood, on a crop around it
            ys = slice(max(0, y - local_px - 1), y + bh + local_px + 1)
            xs = slice(max(0, x - local_px - 1), x + bw + local_px + 1)
            m = lab[ys, xs] == k
            near = grow(m, local_px)
            w_c = win[ys, xs]
            ci, co = core[ys, xs] & near, band[ys, xs] & near
            m_in = float(np.median(w_c[ci])) if ci.sum() >= 5 else g_in
            m_out = float(np.median(w_c[co])) if co.sum() >= 5 else g_out
            if abs(m_in - m_out) < 1e-12:
                continue  # no contrast here: the image says nothing either way
            t = float(np.clip((w_c[m].mean() - m_out) / (m_in - m_out), 0.0, 1.0))
            bad += area * ((1.0 - t) if inside else t)
    return float(bad / L.sum())


def judge(model_conf: float, layout_iou: float, edge_valid: float, spill: float = 0.0) -> dict[str, float]:
    """The backbone contour's confidence and its parts (see the module docstring)."""
    parts = {
        "model": float(np.clip(model_conf, 0.0, 1.0)),
        "layout": float(np.clip((layout_iou - 0.3) / 0.5, 0.0, 1.0)),
        "edge": float(np.clip(edge_valid, 0.0, 1.0)),
        "excl": float(np.clip(1.0 - (spill - 0.1) / 0.3, 0.0, 1.0)),
    }
    conf = parts["excl"]
    for k, w in WEIGHTS.items():
        conf *= max(parts[k], 1e-6) ** w
    parts["confidence"] = float(conf)
    return parts


def gate(ev: Evidence, rules: Rules = RULES) -> str | None:
    """The first sanity gate a candidate contour fails (``edges``, ``spill``, ``layout``, ``unsupported``), or None.

    The same gates apply to both candidates; an unknown edge validity (None) passes.
    """
    if ev.edge_valid is not None and ev.edge_valid < rules.min_edge:
        return "edges"
    if ev.spill > rules.max_spill:
        return "spill"
    if ev.layout_iou < rules.min_iou:
        return "layout"
    if ev.unsupported > rules.max_unsupported:
        return "unsupported"
    return None


def decide(backbone: Evidence | None, fallback: Evidence | None, distance_px: float | None, threshold: float,
           rules: Rules = RULES) -> tuple[str, str]:
    """Which contour a feature keeps: ``("backbone" | "fallback" | "failed", reason)``.

    ``backbone`` / ``fallback`` are None where that candidate found no
    contour; ``distance_px`` is their mean symmetric distance (None unless
    both found one). The rule is the module docstring's; the reasons are
    ``backbone_failed``, ``both_failed``, ``rescue``, ``rescue_rejected_<gate>``,
    ``rescue_low_confidence``, ``agree``, ``agree_low_confidence``, ``agree_rejected_<gate>``,
    ``disagree_fallback_trusted``, ``override_weak_fallback``, ``disagree``.
    """
    if backbone is None:
        return ("fallback", "backbone_failed") if fallback is not None else ("failed", "both_failed")
    confident = backbone.confidence >= threshold
    if fallback is None:
        g = gate(backbone, rules)
        if g is not None:
            return "failed", f"rescue_rejected_{g}"
        return ("backbone", "rescue") if confident else ("failed", "rescue_low_confidence")
    if distance_px is not None and distance_px <= rules.agree_px:
        if not confident:
            return "fallback", "agree_low_confidence"
        g = gate(backbone, rules)  # a mean distance hides a local departure (a line end cut short)
        return ("backbone", "agree") if g is None else ("fallback", f"agree_rejected_{g}")
    if gate(fallback, rules) is None:
        return "fallback", "disagree_fallback_trusted"
    # a weak fallback: a sane, confident backbone contour at least as good on every count replaces it
    edges_ok = backbone.edge_valid is None or fallback.edge_valid is None or backbone.edge_valid >= fallback.edge_valid
    dominates = edges_ok and backbone.unsupported <= fallback.unsupported and backbone.spill <= fallback.spill \
        and backbone.layout_iou >= fallback.layout_iou
    if confident and gate(backbone, rules) is None and dominates:
        return "backbone", "override_weak_fallback"
    return "fallback", "disagree"


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
    """Both proposals for one feature with their evidence.

    ``backbone`` is the refined backbone result (confidence from :func:`judge`,
    None without a model); ``backbone_evidence`` / ``fallback_evidence`` are
    None where that candidate found no contour (a found contour without
    evidence, as built by hand, counts as passing every gate);
    ``distance_px`` is the mean symmetric distance between the two contours
    when both exist (computed by :func:`select` when missing).
    """

    feature_id: str
    backbone: FeatureResult | None
    fallback: FeatureResult
    backbone_evidence: Evidence | None = None
    fallback_evidence: Evidence | None = None
    distance_px: float | None = None


def _finite_or_none(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


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

    The backbone results carry the confidence of :func:`judge` and, in
    ``extra``, its parts (``c_model``, ``c_layout``, ``c_edge``, ``c_excl``)
    and evidence (``valid_fraction``, ``median_snr``, ``layout_iou``,
    ``spill``). Returns the candidates and the time per stage (``fallback``,
    ``segment``, ``refine``, ``judge``) in s. With ``run_fallback=False``
    (backbone-only mode, needs a model) the fallback is skipped: its results
    are ``skipped``.
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

    from .edges import border_extra, gaussian_smooth, parse_refine_options, refine_contours, suppress_frame

    t0 = time.perf_counter()
    refined: dict[int, Any] = {}
    if refine:
        idx = [i for i, b in enumerate(bb) if b.ok]
        if idx:
            # the substrate side is decided from the data per contour (polarity-agnostic), except where
            # the fallback's tone check decided a feature's side against the layout (a resist darker
            # than the substrate fools the per-contour decision for the backbone's contour just the same)
            ropt = parse_refine_options(edge_options or {})
            if ropt.get("substrate", "auto") == "auto":
                sides = [fb[i].extra.get("substrate", "auto") if fb[i].ok and fb[i].extra.get("tone_check") else "auto"
                         for i in idx]
                if any(sd != "auto" for sd in sides):
                    ropt["substrate"] = sides
            res = refine_contours(image.pixels, [bb[i].contour_px for i in idx], **ropt)
            refined = dict(zip(idx, res))
    timings["refine"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    smoothed = gaussian_smooth(suppress_frame(image.pixels, 1), SMOOTH_SIGMA)
    layouts = [f.pixels for f in features]
    final = [(refined[i].contour_uv if i in refined else b.contour_px) if b.ok else None for i, b in enumerate(bb)]
    spills_b = spill_fractions(final, layouts)
    spills_f = spill_fractions([c.contour_px if c.ok else None for c in fb], layouts)
    out: list[Candidate] = []
    for i, (f, b, c) in enumerate(zip(features, bb, fb)):
        f_ev = None
        if c.ok:
            iou_f = _finite_or_none(c.extra.get("layout_iou"))
            f_ev = Evidence(float(c.confidence), iou_f if iou_f is not None else polygon_iou(c.contour_px, f.pixels),
                            spills_f[i], _finite_or_none(c.extra.get("valid_fraction")),
                            _finite_or_none(c.extra.get("median_snr")),
                            unsupported_fraction(smoothed, c.contour_px, f.pixels))
        if not b.ok:
            out.append(Candidate(f.feature_id, b, c, None, f_ev))
            continue
        raw = b.contour_px
        contour = final[i]
        valid = refined[i].valid_fraction if i in refined else 1.0
        snr = refined[i].median_snr if i in refined else None
        lay_iou = polygon_iou(contour, f.pixels)
        unsup = unsupported_fraction(smoothed, contour, f.pixels)
        parts = judge(b.confidence, lay_iou, valid, spills_b[i])
        extra = {k: v for k, v in b.extra.items() if isinstance(v, (int, float, str, bool))}
        extra.update({f"c_{k}": round(v, 4) for k, v in parts.items() if k != "confidence"})
        extra.update(model_confidence=round(float(b.confidence), 4), valid_fraction=round(float(valid), 4),
                     layout_iou=round(float(lay_iou), 4), spill=round(float(spills_b[i]), 4),
                     unsupported=round(float(unsup), 4))
        if snr is not None:
            extra["median_snr"] = round(float(snr), 4)
            rough = refined[i].roughness_px
            if np.isfinite(rough):
                extra["roughness_px"] = round(float(rough), 4)
        if i in refined:
            extra.update(border_extra(refined[i]))
            extra["refine_shift_px"] = round(mean_contour_distance(raw, contour), 4)
            extra["_raw_contour"] = raw
        b_ev = Evidence(parts["confidence"], float(lay_iou), spills_b[i], float(valid) if i in refined else None, snr, unsup)
        dist = mean_contour_distance(contour, c.contour_px) if c.ok else None
        out.append(Candidate(f.feature_id, FeatureResult(f.feature_id, contour, b.source, parts["confidence"], "ok",
                                                         b.holes_px, extra), c, b_ev, f_ev, dist))
    timings["judge"] = time.perf_counter() - t0
    return out, timings


def _decision_inputs(cand: Candidate) -> tuple[Evidence | None, Evidence | None, float | None]:
    """The candidate's evidence; a found contour without evidence (built by hand) passes every gate."""
    b, c = cand.backbone, cand.fallback
    b_ev = cand.backbone_evidence if cand.backbone_evidence is not None or b is None or not b.ok \
        else Evidence(float(b.confidence), 1.0)
    f_ev = cand.fallback_evidence if cand.fallback_evidence is not None or not c.ok else Evidence(float(c.confidence), 1.0)
    dist = cand.distance_px
    if dist is None and b_ev is not None and f_ev is not None:
        dist = mean_contour_distance(b.contour_px, c.contour_px)
    return b_ev, f_ev, dist


def select(cands: Sequence[Candidate], threshold: float, *, mode: str = "hybrid", rules: Rules = RULES) -> list[FeatureResult]:
    """One result per feature: the choice of :func:`decide` (``mode="hybrid"``).

    ``mode="backbone"`` keeps every backbone contour and never falls back
    (for comparison); ``mode="fallback"`` keeps the fallback's. A feature
    without a backbone candidate (no model) keeps the fallback's result.
    """
    out: list[FeatureResult] = []
    for cand in cands:
        b, c = cand.backbone, cand.fallback
        if b is None or mode == "fallback":
            out.append(c)
            continue
        if mode == "backbone":
            out.append(b if b.ok else FeatureResult(cand.feature_id, None, b.source, float(b.confidence), "failed", (), dict(b.extra)))
            continue
        b_ev, f_ev, dist = _decision_inputs(cand)
        choice, reason = decide(b_ev, f_ev, dist, threshold, rules)
        common: dict[str, Any] = {"decision": reason}
        if cand.distance_px is not None:
            common["agree_px"] = round(float(cand.distance_px), 4)
        if choice == "backbone":
            # mask holes are not refined and the layout feature has none: not exported
            if b.holes_px:
                common["holes_dropped"] = len(b.holes_px)
            out.append(FeatureResult(b.feature_id, b.contour_px, b.source, b.confidence, "ok", (), {**b.extra, **common}))
        elif choice == "fallback":
            extra = {**c.extra, **common, "backbone_confidence": round(float(b.confidence), 4)}
            if b.ok:
                extra["backbone_layout_iou"] = b.extra.get("layout_iou")
            out.append(FeatureResult(c.feature_id, c.contour_px, c.source, c.confidence, "ok", c.holes_px, extra))
        else:
            extra = {**common, "backbone_status": b.status, "fallback_status": c.status,
                     "backbone_confidence": round(float(b.confidence), 4)}
            for k in ("layout_iou", "valid_fraction", "spill"):
                if k in b.extra:
                    extra[f"backbone_{k}"] = b.extra[k]
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
    rules: Rules = RULES,
) -> tuple[list[FeatureResult], dict[str, float]]:
    """One result per feature: the fallback alone, or the backbone judged against it (see :func:`select`)."""
    cands, timings = candidates(image, features, fallback=fallback, fallback_options=fallback_options, model=model,
                                refine=refine, edge_options=edge_options, run_fallback=mode != "backbone")
    return select(cands, threshold, mode=mode, rules=rules), timings
