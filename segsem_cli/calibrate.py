"""Choosing the confidence threshold of the hybrid on labelled validation images.

For every feature of every validation image, both proposals are computed once
(:func:`segsem_cli.hybrid.candidates`: the refined, judged backbone contour and
the fallback's, with the evidence the hybrid decides on) and scored against
the truth: the RMS edge placement error (px) of each. Then, for each threshold
``T`` on a grid, the per-feature decision of :func:`segsem_cli.hybrid.decide`
(the same function ``segsem extract`` uses: gates, agreement, rescue) is
replayed and its expected cost is

    cost(T) = sqrt( mean over features of  EPE_chosen^2  or  penalty^2 if failed )

with ``penalty`` (default 3 px) the cost of a feature that ends up with no
contour (an exported wrong contour costs its full EPE, more than an honest
failure). The middle of the lowest-cost plateau is stored in the model file
(``segsem['threshold']``, with the whole curve under
``segsem['calibration_curve']``); ``segsem extract`` uses it by default.

Truth comes from ``truth.json`` beside the manifest (written by
``segsem synth``: exact contours in nm) when present, else from the
manifest's ``label`` masks (instance masks: contours at the pixel-centre level,
good to about a quarter pixel).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import SegsemError
from .hybrid import RULES, Evidence, Rules, decide
from .manifest import ManifestRow, read_manifest
from .transform import PixelTransform
from .types import SEMImage


@dataclass
class FeatureScore:
    """One feature's two proposals: their EPE against the truth and the evidence the hybrid decides on.

    Without ``backbone`` / ``fallback`` evidence (scores built by hand), the
    backbone counts as passing every gate and, when both have a contour, as
    agreeing with the fallback: the choice is then "backbone where its
    confidence reaches T, else the fallback".
    """

    image: str
    feature_id: str
    confidence: float | None  # backbone's judged confidence (None: backbone failed)
    epe_backbone: float | None  # RMS px; None when the backbone gave no contour
    epe_fallback: float | None
    backbone_source: str = "sam2"
    fallback_source: str = "threshold"
    backbone: Evidence | None = None
    fallback: Evidence | None = None
    distance_px: float | None = None

    def decision_inputs(self) -> tuple[Evidence | None, Evidence | None, float | None]:
        """``(backbone, fallback, distance_px)`` for :func:`segsem_cli.hybrid.decide`."""
        b = self.backbone
        if b is None and self.confidence is not None and self.epe_backbone is not None:
            b = Evidence(float(self.confidence), 1.0)
        f = self.fallback
        if f is None and self.epe_fallback is not None:
            f = Evidence(1.0, 1.0)
        d = self.distance_px
        if d is None and b is not None and f is not None:
            d = 0.0
        return b, f, d


@dataclass
class Calibration:
    threshold: float
    curve: list[dict[str, float]]
    n_features: int
    n_images: int
    penalty_px: float
    scores: list[FeatureScore] = field(default_factory=list)
    edge_threshold: float | None = None
    edge_curve: list[dict[str, float]] = field(default_factory=list)

    def to_meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {}
        if self.edge_threshold is not None:
            meta["edge_threshold"] = float(self.edge_threshold)
            meta["edge_threshold_curve"] = [{k: float(v) for k, v in row.items()} for row in self.edge_curve]
        if not self.curve:
            return meta
        return meta | {
            "threshold": float(self.threshold),
            "calibration_curve": [{k: float(v) for k, v in row.items()} for row in self.curve],
            "calibration_features": int(self.n_features),
            "calibration_images": int(self.n_images),
            "calibration_penalty_px": float(self.penalty_px),
        }


def _rms(d: np.ndarray) -> float:
    d = np.asarray(d, dtype=float)
    return float(np.sqrt(np.mean(d * d))) if d.size else float("nan")


def truth_contours_px(row: ManifestRow, pixels_shape, pixel_nm: float, truth: dict | None, feats) -> dict[str, list[np.ndarray]]:
    """Truth rings (px, ``(u, v)``) per layout feature id for one image.

    From ``truth.json`` (exact, mapped with the TRUE transform) when it lists
    the image, else from the instance label mask (associated to layout
    features by overlap). A printed piece of design polygon ``i`` (or of a
    bridge merging ``i`` with others) belongs to the feature in view it
    overlaps most: ``p<i>``, a part ``p<i>.1``, ... when the field of view
    cuts the polygon into several, or a merged polygon's feature.
    """
    from shapely.geometry import Polygon

    from .metrics import feature_rings

    if truth is not None and row.name in truth.get("images", {}):
        t_img = truth["images"][row.name]
        off = t_img.get("offset_nm", [0.0, 0.0])
        t = PixelTransform((row.x_nm, row.y_nm), pixel_nm, tuple(pixels_shape), (float(off[0]), float(off[1])))
        parts: dict[int, list] = {}
        for ft in feats:
            m = re.fullmatch(r"p(\d+)(?:\.\d+)?", str(ft.feature_id))
            if m:
                parts.setdefault(int(m.group(1)), []).append(ft)
        out: dict[str, list[np.ndarray]] = {}
        for f in t_img.get("features", []):
            if f.get("defect") == "missing" or f.get("design_index") is None:
                continue
            i = int(f["design_index"])
            rings = [t.to_pixel(r) for r in feature_rings(f)]
            # a bridge merges design polygons: its pieces in view may belong to any of them
            cands = [c for j in [i, *(int(k) for k in f.get("merged_design_indices") or [])] for c in parts.get(j, [])]
            if not cands:
                continue
            piece = Polygon(rings[0]).buffer(0)
            areas = [piece.intersection(Polygon(c.pixels).buffer(0)).area for c in cands]
            if max(areas) <= 0:
                continue  # a printed piece outside every feature in view
            out.setdefault(cands[int(np.argmax(areas))].feature_id, []).extend(rings)
        return out
    if row.label is None:
        raise SegsemError(f"{row.image}: no truth for this image (no truth.json entry and no label column)")
    from skimage.measure import find_contours

    from .images import read_label

    lab = read_label(row.label, tuple(pixels_shape))
    out = {}

    polys = {f.feature_id: Polygon(f.pixels) for f in feats if len(f.pixels) >= 3}
    for k in np.unique(lab):
        if k == 0:
            continue
        m = np.pad((lab == k).astype(float), 1)
        rings = [np.stack([c[:, 1] - 1 + 0.5, c[:, 0] - 1 + 0.5], axis=1)[:-1] for c in find_contours(m, 0.5) if len(c) > 4]
        if not rings:
            continue
        outer = max(rings, key=lambda r: Polygon(r).area)
        pk = Polygon(outer).buffer(0)
        best, best_a = None, 0.0
        for fid, pf in polys.items():
            a = pk.intersection(pf).area
            if a > best_a:
                best, best_a = fid, a
        if best is not None:
            out.setdefault(best, []).extend(rings)
    return out


def _prepare(row: ManifestRow, state, truth: dict | None):
    """Read, align and list the features of one image, with its truth rings in px (None if alignment failed)."""
    from .align import align_to_layout
    from .images import read_sem
    from .layout import features_in_view
    from .scanlines import correct_scan_lines

    cfg = state.cfg
    pixels, px = read_sem(row.image, row.pixel_nm)
    pixels, _ = correct_scan_lines(pixels, mode=cfg.scan_lines)
    transform = PixelTransform((row.x_nm, row.y_nm), px, pixels.shape)
    ar = align_to_layout(pixels, transform, state.layout, search_px=cfg.search_px, polarity=cfg.polarity)
    if ar.status == "failed":
        return None
    feats = features_in_view(state.layout, ar.transform)
    image = SEMImage(Path(row.image), pixels, ar.transform, dict(row.extra))
    return image, feats, truth_contours_px(row, pixels.shape, px, truth, feats)


def score_image(row: ManifestRow, state, truth: dict | None, prepared=None) -> list[FeatureScore]:
    """Both proposals of every feature of one image, scored against the truth."""
    from .hybrid import candidates

    cfg = state.cfg
    prepared = prepared if prepared is not None else _prepare(row, state, truth)
    if prepared is None:
        return []
    image, feats, truth_px = prepared
    cands, _ = candidates(image, feats, fallback=state.fallback, fallback_options=state.fallback_options, model=state.model,
                          refine=cfg.refine, edge_options=state.edge_options)
    out = []
    for f, c in zip(feats, cands):
        rings = truth_px.get(f.feature_id)
        if not rings or epe_inside(rings, rings[0], image.shape).size == 0:
            continue  # no truth away from the image border: nothing to score
        b = c.backbone
        eb = _rms(epe_inside(rings, b.contour_px, image.shape)) if b is not None and b.ok else None
        ef = _rms(epe_inside(rings, c.fallback.contour_px, image.shape)) if c.fallback.ok else None
        out.append(FeatureScore(row.name, f.feature_id, None if b is None or not b.ok else float(b.confidence), eb, ef,
                                b.source if b is not None else "", c.fallback.source,
                                c.backbone_evidence, c.fallback_evidence, c.distance_px))
    return out


BORDER_PX = 3.0
EDGE_GRID = tuple(np.round(np.arange(0.20, 1.001, 0.05), 3))


def epe_inside(rings: list[np.ndarray], contour: np.ndarray, shape, *, border_px: float = BORDER_PX) -> np.ndarray:
    """EPE (px) of truth samples lying inside the image, at least ``border_px`` from its border.

    Near the border a clipped contour runs along the border, not along an
    edge, and the truth of a feature cut by the field of view extends outside.
    """
    from .metrics import epe_samples, sample_ring

    d = epe_samples(rings, [contour], step_nm=0.5)
    pts = np.concatenate([sample_ring(np.asarray(rg, dtype=float), 0.5) for rg in rings])
    if len(pts) != len(d):
        return d
    h, w = shape
    keep = (pts[:, 0] > border_px) & (pts[:, 0] < w - border_px) & (pts[:, 1] > border_px) & (pts[:, 1] < h - border_px)
    return d[keep]


def edge_threshold_curve(prepared: list, state, *, grid=EDGE_GRID, cap_px: float = 3.0) -> list[dict[str, float]]:
    """EPE RMS (px) of the fallback's contours against the truth for each edge threshold ``t``.

    Each sample's EPE is capped at ``cap_px`` so that a gross failure (a
    bridge, a wrong association) does not decide where the edge is.
    """
    sums = np.zeros(len(grid))
    counts = np.zeros(len(grid))
    for image, feats, truth_px in prepared:
        h, w = image.shape
        for k, t in enumerate(grid):
            opts = dict(state.fallback_options)
            opts["threshold"] = str(float(t))
            res = state.fallback.extract(image, feats, **opts)
            for f, r in zip(feats, res):
                rings = truth_px.get(f.feature_id)
                if not rings or not r.ok:
                    continue
                d = np.minimum(epe_inside(rings, r.contour_px, (h, w)), cap_px)  # gross failures must not steer t
                sums[k] += float(np.sum(d * d))
                counts[k] += d.size
    return [{"edge_threshold": float(t), "epe_rms_px": float(np.sqrt(s / c)) if c else float("nan"), "samples": float(c)}
            for t, s, c in zip(grid, sums, counts)]


def choose_edge_threshold(curve: list[dict[str, float]]) -> float:
    """The grid minimum of the EPE curve, refined by a parabola through its neighbours."""
    ts = np.array([r["edge_threshold"] for r in curve])
    e = np.array([r["epe_rms_px"] for r in curve])
    if not np.isfinite(e).any():
        raise SegsemError("no fallback contour could be scored against the truth: cannot fit the edge threshold")
    e = np.where(np.isfinite(e), e, np.inf)
    k = int(np.argmin(e))
    if 0 < k < len(ts) - 1 and np.isfinite(e[k - 1]) and np.isfinite(e[k + 1]):
        den = e[k - 1] - 2 * e[k] + e[k + 1]
        if den > 0:
            step = ts[1] - ts[0]
            return float(np.clip(ts[k] + 0.5 * step * (e[k - 1] - e[k + 1]) / den, ts[k] - step, ts[k] + step))
    return float(ts[k])


def threshold_curve(scores: list[FeatureScore], *, grid=None, penalty_px: float = 3.0,
                    rules: Rules = RULES) -> list[dict[str, float]]:
    """Replay the hybrid's per-feature decision for each threshold: fallback rate, EPE RMS, failures, cost."""
    grid = np.round(np.linspace(0.0, 1.0, 51), 4) if grid is None else np.asarray(grid, dtype=float)
    eb = np.array([np.nan if s.epe_backbone is None else s.epe_backbone for s in scores])
    ef = np.array([np.nan if s.epe_fallback is None else s.epe_fallback for s in scores])
    inputs = [s.decision_inputs() for s in scores]
    rows = []
    n = max(len(scores), 1)
    for t in grid:
        choice = [decide(b, f, d, float(t), rules)[0] for b, f, d in inputs]
        use_b = np.array([c == "backbone" for c in choice], dtype=bool)
        use_f = np.array([c == "fallback" for c in choice], dtype=bool)
        chosen = np.where(use_b, eb, np.where(use_f, ef, np.nan))
        failed = ~np.isfinite(chosen)
        ok = ~failed
        cost = np.where(failed, penalty_px, chosen)  # a wrong contour exported costs more than an honest failure
        rows.append({
            "threshold": float(t),
            "fallback_rate": float(np.mean(use_f & ok)) if len(scores) else 0.0,
            "epe_rms_px": _rms(chosen[ok]) if ok.any() else float("nan"),
            "failures": float(failed.sum()),
            "cost_px": float(np.sqrt(np.sum(cost * cost) / n)),
        })
    return rows


def choose_threshold(curve: list[dict[str, float]], *, tol: float = 0.01) -> float:
    """The middle of the lowest-cost plateau.

    Thresholds whose cost is within ``tol`` (relative) of the minimum form
    plateaus along the grid; the one holding the minimum is taken and its
    middle returned, so that a flat curve (backbone and fallback equally good
    on the validation images) does not push the threshold to an extreme where
    a small change of the data changes every decision.
    """
    costs = np.array([r["cost_px"] for r in curve], dtype=float)
    ts = np.array([r["threshold"] for r in curve], dtype=float)
    k = int(np.nanargmin(costs))
    near = costs <= costs[k] * (1.0 + tol) + 1e-12
    lo = k
    while lo > 0 and near[lo - 1]:
        lo -= 1
    hi = k
    while hi < len(ts) - 1 and near[hi + 1]:
        hi += 1
    return float(ts[(lo + hi) // 2])


def calibrate(cfg, *, truth_path: Path | None = None, penalty_px: float = 3.0, fit_edge: bool = True,
              progress: Callable[[str], None] | None = None) -> Calibration:
    """Fit the edge threshold (optional) and the confidence threshold on labelled images.

    1. With ``fit_edge``, the fallback is run at edge thresholds 0.20..1.00 (1: the rim peak) and
       the one with the lowest EPE against the truth is kept (the labels define
       where the user's edge is); it is then used by the fallback and by the
       refinement of SAM2 contours.
    2. With a model, the confidence threshold is chosen as described in the
       module docstring.
    """
    from .pipeline import _State

    rows = read_manifest(cfg.manifest)
    truth = None
    tp = truth_path if truth_path is not None else Path(cfg.manifest).parent / "truth.json"
    if tp.is_file():
        try:
            truth = json.loads(tp.read_text())
        except json.JSONDecodeError as exc:
            raise SegsemError(f"{tp}: not valid JSON ({exc})") from None
    elif truth_path is not None:
        raise SegsemError(f"{truth_path}: truth file not found")
    state = _State(cfg)
    prepared = []
    for row in rows:
        p = _prepare(row, state, truth)
        if p is not None:
            prepared.append(p)
    if not prepared:
        raise SegsemError(f"{cfg.manifest}: no image could be aligned to the layout")
    edge_t, edge_curve = None, []
    if fit_edge:
        edge_curve = edge_threshold_curve(prepared, state)
        edge_t = choose_edge_threshold(edge_curve)
        state.fallback_options["threshold"] = f"{edge_t:.4f}"
        state.edge_options["threshold"] = f"{edge_t:.4f}"
    scores: list[FeatureScore] = []
    curve: list[dict[str, float]] = []
    threshold = None
    if state.model is not None:
        for row, p in zip(rows, prepared):
            scores.extend(score_image(row, state, truth, prepared=p))
            if progress:
                progress(row.name)
        if not scores:
            raise SegsemError(f"{cfg.manifest}: no feature could be scored against the truth (check labels / truth.json)")
        curve = threshold_curve(scores, penalty_px=penalty_px)
        threshold = choose_threshold(curve)
    n_feat = len(scores) if scores else sum(len(t) for _, _, t in prepared)
    return Calibration(threshold if threshold is not None else float("nan"), curve, n_feat, len(prepared), penalty_px,
                       scores, edge_threshold=edge_t, edge_curve=edge_curve)


def store_threshold(model_path: Path, calib: Calibration, out: Path | None = None) -> Path:
    """Write the threshold and curve into the checkpoint's segsem metadata (atomically)."""
    import torch

    from .atomic import atomic_path
    from .sam.model import META_KEY, _check_plain, load_checkpoint

    sd, meta = load_checkpoint(model_path)
    meta = dict(meta)
    meta.update(calib.to_meta())
    _check_plain(meta, META_KEY)
    dest = Path(out) if out is not None else Path(model_path)
    with atomic_path(dest) as tmp:
        torch.save({"model": sd, META_KEY: meta}, tmp)
    return dest
