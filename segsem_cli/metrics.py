"""The ruler: edge placement error (EPE) of contours, feature counts, gauge CD errors.

Conventions
-----------
* Contours are closed rings in layout nm, ``(N, 2)`` arrays of ``(x, y)``
  (y up), closed implicitly. A feature is an exterior ring plus hole rings.
* EPE at a point of a true contour is its Euclidean distance to the nearest
  predicted boundary (any ring of any predicted contour), computed exactly as
  point-to-segment distance (shapely STRtree nearest query, vectorised).
  True contours are sampled uniformly by arc length, with spacing
  ``<= step_nm`` (sample ``k`` of a ring of length ``L`` split into ``n``
  pieces sits at arc length ``(k + 1/2) L / n``), so pooled statistics are
  arc-length weighted (RMS = sqrt of the mean of EPE^2 over the perimeter).
* Signed EPE is positive where the predicted contour lies outside the true
  one (the prediction is too large there), negative inside.
* A true feature is *missing* when more than ``missing_frac`` of its contour
  has no predicted boundary within ``match_dist_nm``; a predicted contour is
  *extra* when more than ``missing_frac`` of it has no true boundary within
  ``match_dist_nm``. EPE statistics pool the samples of the true features
  that are not missing (missing ones are counted, not averaged in).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .types import ContourRecord

DEFAULT_MATCH_PX = 4.0


# --------------------------------------------------------------------------- geometry helpers


def feature_rings(item: Any) -> list[np.ndarray]:
    """The rings (exterior first, then holes) of one feature in nm.

    Accepts an ``(N, 2)`` ring, an ``(exterior, holes)`` tuple, a dict with
    ``exterior`` (and optional ``holes``) as in ``truth.json``, a shapely
    Polygon or a :class:`~segsem_cli.types.ContourRecord`. A repeated closing
    vertex is dropped.
    """
    if isinstance(item, ContourRecord):
        rings = [item.xy_nm, *item.holes_nm]
    elif isinstance(item, Mapping):
        rings = [item["exterior"], *(item.get("holes") or [])]
    elif hasattr(item, "exterior") and hasattr(item, "interiors"):
        rings = [np.asarray(r.coords)[:-1] for r in [item.exterior, *item.interiors]]
    elif isinstance(item, tuple) and len(item) == 2 and np.asarray(item[0], dtype=object).ndim == 2:
        rings = [item[0], *item[1]]
    else:
        rings = [item]
    out = []
    for r in rings:
        a = np.asarray(r, dtype=np.float64)
        if a.ndim != 2 or a.shape[1] != 2:
            raise ValueError(f"a contour ring must be an (N, 2) array of x, y nm, got shape {a.shape}")
        if not np.isfinite(a).all():
            raise ValueError("a contour ring holds non-finite coordinates")
        if len(a) >= 2 and np.array_equal(a[0], a[-1]):
            a = a[:-1]
        if len(a) >= 2:
            out.append(a)
    return out


def sample_ring(ring: np.ndarray, step_nm: float) -> np.ndarray:
    """Points uniformly spaced by arc length along a closed ring (spacing ``<= step_nm``).

    Returns ``(n, 2)`` points at arc lengths ``(k + 1/2) L / n``, ``n = ceil(L / step_nm)``.
    """
    if not step_nm > 0:
        raise ValueError(f"step_nm must be > 0, got {step_nm!r}")
    ring = np.asarray(ring, dtype=np.float64)
    closed = np.vstack([ring, ring[:1]])
    seg = np.hypot(*np.diff(closed, axis=0).T)
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    total = cum[-1]
    if total <= 0:
        return ring[:1].copy()
    n = max(1, int(math.ceil(total / step_nm - 1e-9)))
    s = (np.arange(n) + 0.5) * (total / n)
    x = np.interp(s, cum, closed[:, 0])
    y = np.interp(s, cum, closed[:, 1])
    return np.stack([x, y], axis=1)


class _Boundary:
    """Exact nearest-boundary distances to a set of rings (STRtree of segments)."""

    def __init__(self, rings: Sequence[np.ndarray]):
        import shapely

        segs = []
        for r in rings:
            if len(r) >= 2:
                segs.append(np.stack([r, np.roll(r, -1, axis=0)], axis=1))
        self.segments = np.concatenate(segs) if segs else np.zeros((0, 2, 2))
        self.tree = shapely.STRtree(shapely.linestrings(self.segments)) if len(self.segments) else None

    def distance(self, points: np.ndarray) -> np.ndarray:
        import shapely

        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        out = np.full(len(points), np.inf)
        if self.tree is None or len(points) == 0:
            return out
        idx, dist = self.tree.query_nearest(shapely.points(points), return_distance=True, all_matches=False)
        out[idx[0]] = dist
        return out


def _region(features: Sequence[Any]):
    """Union of the features' areas (exterior minus holes), made valid; None if empty."""
    import shapely
    from shapely.geometry import Polygon

    polys = []
    for f in features:
        rings = feature_rings(f)
        if not rings or len(rings[0]) < 3:
            continue
        p = Polygon(rings[0], [h for h in rings[1:] if len(h) >= 3])
        if not p.is_valid:
            p = shapely.make_valid(p)
        polys.append(p)
    if not polys:
        return None
    reg = shapely.union_all(polys)
    shapely.prepare(reg)
    return reg


def epe_samples(
    true_contour_nm: Any,
    pred_contours_nm: Sequence[Any],
    *,
    step_nm: float = 0.5,
    signed: bool = False,
) -> np.ndarray:
    """EPE (nm) at points sampled every ``<= step_nm`` along the true contour(s).

    Parameters
    ----------
    true_contour_nm : one ring ``(N, 2)``, or a list of rings / features (see
        :func:`feature_rings`); every ring is sampled.
    pred_contours_nm : predicted contours (rings, features or ContourRecords);
        all their rings, holes included, form the predicted boundary.
    step_nm : maximum arc-length spacing of the samples.
    signed : if True, positive where the prediction lies outside the truth.

    Returns
    -------
    numpy.ndarray
        One distance per sample, in order ring by ring; ``inf`` when there is
        no predicted boundary at all.
    """
    arr = None
    try:
        arr = np.asarray(true_contour_nm, dtype=np.float64)
    except (ValueError, TypeError):
        pass
    items = [arr] if arr is not None and arr.ndim == 2 else list(true_contour_nm)
    rings = [r for it in items for r in feature_rings(it)]
    pts = [sample_ring(r, step_nm) for r in rings]
    pts = np.concatenate(pts) if pts else np.zeros((0, 2))
    pred_rings = [r for it in pred_contours_nm for r in feature_rings(it)]
    d = _Boundary(pred_rings).distance(pts)
    if signed and len(pts):
        import shapely

        reg = _region(pred_contours_nm)
        inside = shapely.contains_xy(reg, pts[:, 0], pts[:, 1]) if reg is not None else np.zeros(len(pts), bool)
        d = np.where(inside, d, -d)
    return d


# --------------------------------------------------------------------------- per image


def _stats(d: np.ndarray) -> dict[str, float | None]:
    if len(d) == 0:
        return {"rms": None, "p95": None, "max": None, "mean": None}
    a = np.abs(d)
    return {
        "rms": float(np.sqrt(np.mean(a * a))),
        "p95": float(np.percentile(a, 95)),
        "max": float(a.max()),
        "mean": float(np.mean(d)),
    }


@dataclass
class ImageScore:
    """EPE statistics and feature counts for one image.

    ``epe_*_nm`` are over the samples of matched (not missing) true features:
    RMS, 95th percentile and max of |EPE|, and ``epe_bias_nm`` the signed mean
    (positive = prediction too large). ``*_px`` divide by ``pixel_nm``.
    ``samples_nm`` holds the signed EPE samples (not written to JSON).
    """

    name: str
    pixel_nm: float
    n_true: int
    n_pred: int
    n_matched: int
    n_missing: int
    n_extra: int
    n_samples: int
    epe_rms_nm: float | None
    epe_p95_nm: float | None
    epe_max_nm: float | None
    epe_bias_nm: float | None
    missing_ids: list[str] = field(default_factory=list)
    extra_ids: list[str] = field(default_factory=list)
    match_dist_nm: float = 0.0
    samples_nm: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    def _px(self, v: float | None) -> float | None:
        return None if v is None else v / self.pixel_nm

    @property
    def epe_rms_px(self) -> float | None:
        return self._px(self.epe_rms_nm)

    @property
    def epe_p95_px(self) -> float | None:
        return self._px(self.epe_p95_nm)

    @property
    def epe_max_px(self) -> float | None:
        return self._px(self.epe_max_nm)

    def to_dict(self) -> dict[str, Any]:
        return {
            "image": self.name,
            "pixel_nm": self.pixel_nm,
            "n_true": self.n_true,
            "n_pred": self.n_pred,
            "n_matched": self.n_matched,
            "n_missing": self.n_missing,
            "n_extra": self.n_extra,
            "n_samples": self.n_samples,
            "epe_rms_nm": self.epe_rms_nm,
            "epe_p95_nm": self.epe_p95_nm,
            "epe_max_nm": self.epe_max_nm,
            "epe_bias_nm": self.epe_bias_nm,
            "epe_rms_px": self.epe_rms_px,
            "epe_p95_px": self.epe_p95_px,
            "epe_max_px": self.epe_max_px,
            "match_dist_nm": self.match_dist_nm,
            "missing_ids": list(self.missing_ids),
            "extra_ids": list(self.extra_ids),
        }


def _feature_id(item: Any, i: int) -> str:
    if isinstance(item, ContourRecord):
        return str(item.feature_id)
    if isinstance(item, Mapping) and item.get("id") is not None:
        return str(item["id"])
    return str(i)


def evaluate_image(
    truth_features: Sequence[Any],
    pred_records: Sequence[Any],
    *,
    pixel_nm: float,
    missing_frac: float = 0.5,
    match_dist_nm: float | None = None,
    step_nm: float = 0.5,
    fov_nm: Any = None,
    border_nm: float | None = None,
    name: str = "",
) -> ImageScore:
    """Score predicted contours of one image against the true features.

    Parameters
    ----------
    truth_features : true features in layout nm (see :func:`feature_rings`;
        dicts from ``truth.json`` keep their ``id``).
    pred_records : predicted contours (ContourRecords keep their ``feature_id``).
    pixel_nm : pixel size, for the ``*_px`` numbers and the default distances.
    missing_frac : a feature is missing (true) or extra (predicted) when more
        than this fraction of its contour is farther than ``match_dist_nm``
        from the other side's boundary.
    match_dist_nm : default ``4 * pixel_nm``.
    step_nm : sample spacing along contours.
    fov_nm : optional shapely polygon of the field of view (nm); samples
        closer than ``border_nm`` (default ``2 * pixel_nm``) to its edge or
        outside it are ignored (contours cut by the image border are not
        scored on the cut), and features with no sample left are not counted.
    name : the image name reported.
    """
    if not (pixel_nm > 0 and math.isfinite(pixel_nm)):
        raise ValueError(f"pixel_nm must be a positive number, got {pixel_nm!r}")
    if not 0.0 <= missing_frac < 1.0:
        raise ValueError(f"missing_frac must be in [0, 1), got {missing_frac!r}")
    match = DEFAULT_MATCH_PX * pixel_nm if match_dist_nm is None else float(match_dist_nm)
    if not match > 0:
        raise ValueError(f"match_dist_nm must be > 0, got {match_dist_nm!r}")
    keep = None
    if fov_nm is not None:
        import shapely

        border = 2.0 * pixel_nm if border_nm is None else float(border_nm)
        inner = fov_nm.buffer(-border, join_style="mitre") if border > 0 else fov_nm
        shapely.prepare(inner)

        def keep(pts):  # noqa: E306
            return shapely.contains_xy(inner, pts[:, 0], pts[:, 1]) if len(pts) else np.zeros(0, bool)

    def samples_of(items):
        per = []
        for it in items:
            rings = feature_rings(it)
            pts = np.concatenate([sample_ring(r, step_nm) for r in rings]) if rings else np.zeros((0, 2))
            if keep is not None and len(pts):
                pts = pts[keep(pts)]
            per.append(pts)
        return per

    true_rings = [r for f in truth_features for r in feature_rings(f)]
    pred_rings = [r for p in pred_records for r in feature_rings(p)]
    pred_boundary = _Boundary(pred_rings)
    true_boundary = _Boundary(true_rings)
    region = _region(pred_records)

    import shapely

    n_true = n_missing = 0
    missing_ids: list[str] = []
    kept: list[np.ndarray] = []
    for i, (f, pts) in enumerate(zip(truth_features, samples_of(truth_features))):
        if len(pts) == 0:
            continue
        n_true += 1
        d = pred_boundary.distance(pts)
        if np.mean(d > match) > missing_frac:
            n_missing += 1
            missing_ids.append(_feature_id(f, i))
            continue
        inside = shapely.contains_xy(region, pts[:, 0], pts[:, 1]) if region is not None else np.zeros(len(pts), bool)
        kept.append(np.where(inside, d, -d))
    n_pred = n_extra = 0
    extra_ids: list[str] = []
    for i, (p, pts) in enumerate(zip(pred_records, samples_of(pred_records))):
        if len(pts) == 0:
            continue
        n_pred += 1
        d = true_boundary.distance(pts)
        if np.mean(d > match) > missing_frac:
            n_extra += 1
            extra_ids.append(_feature_id(p, i))
    samples = np.concatenate(kept) if kept else np.zeros(0)
    st = _stats(samples)
    return ImageScore(
        name=name,
        pixel_nm=float(pixel_nm),
        n_true=n_true,
        n_pred=n_pred,
        n_matched=n_true - n_missing,
        n_missing=n_missing,
        n_extra=n_extra,
        n_samples=int(len(samples)),
        epe_rms_nm=st["rms"],
        epe_p95_nm=st["p95"],
        epe_max_nm=st["max"],
        epe_bias_nm=st["mean"],
        missing_ids=missing_ids,
        extra_ids=extra_ids,
        match_dist_nm=match,
        samples_nm=samples,
    )


def aggregate(scores: Iterable[ImageScore]) -> dict[str, Any]:
    """Overall numbers: EPE pooled over all samples of all images, counts summed.

    ``*_px`` statistics pool each image's samples divided by its own pixel size.
    """
    scores = list(scores)
    nm = np.concatenate([s.samples_nm for s in scores]) if scores else np.zeros(0)
    px = np.concatenate([s.samples_nm / s.pixel_nm for s in scores]) if scores else np.zeros(0)
    st, sp = _stats(nm), _stats(px)
    return {
        "n_images": len(scores),
        "n_true": sum(s.n_true for s in scores),
        "n_pred": sum(s.n_pred for s in scores),
        "n_matched": sum(s.n_matched for s in scores),
        "n_missing": sum(s.n_missing for s in scores),
        "n_extra": sum(s.n_extra for s in scores),
        "n_samples": int(len(nm)),
        "epe_rms_nm": st["rms"],
        "epe_p95_nm": st["p95"],
        "epe_max_nm": st["max"],
        "epe_bias_nm": st["mean"],
        "epe_rms_px": sp["rms"],
        "epe_p95_px": sp["p95"],
        "epe_max_px": sp["max"],
    }


# --------------------------------------------------------------------------- gauges


@dataclass
class GaugeScore:
    """Measured gauge CDs against true CDs (errors = measured - true, nm).

    ``sigma3_nm`` is three times the sample standard deviation (ddof=1; 0 for
    a single gauge). ``missing``: truth has a CD, the measurement is empty or
    the gauge absent; ``spurious``: a CD measured where the truth has none.
    """

    n_truth: int
    n_measured: int
    n_compared: int
    n_missing: int
    n_spurious: int
    bias_nm: float | None
    sigma3_nm: float | None
    max_abs_nm: float | None
    rms_nm: float | None
    missing: list[str] = field(default_factory=list)
    spurious: list[str] = field(default_factory=list)
    errors_nm: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_truth": self.n_truth,
            "n_measured": self.n_measured,
            "n_compared": self.n_compared,
            "n_missing": self.n_missing,
            "n_spurious": self.n_spurious,
            "bias_nm": self.bias_nm,
            "sigma3_nm": self.sigma3_nm,
            "max_abs_nm": self.max_abs_nm,
            "rms_nm": self.rms_nm,
            "missing": list(self.missing),
            "spurious": list(self.spurious),
            "errors_nm": dict(self.errors_nm),
        }


def _cd(row: Mapping[str, Any], keys: Sequence[str]) -> float | None:
    for k in keys:
        if k in row:
            v = row[k]
            if v is None or (isinstance(v, str) and v.strip() == ""):
                return None
            try:
                f = float(v)
            except (TypeError, ValueError):
                from .errors import SegsemError

                rown = row.get("_row")
                loc = f"gauge {row.get('name')!r}" + (f" (row {rown})" if rown else "")
                raise SegsemError(f"{loc} field '{k}': {v!r} is not a number") from None
            return f if math.isfinite(f) else None
    return None


def compare_gauges(
    truth_rows: Sequence[Mapping[str, Any]],
    measured_rows: Sequence[Mapping[str, Any]],
    *,
    truth_key: str = "true_cd_nm",
    measured_key: str = "wafer_cd_nm",
) -> GaugeScore:
    """Compare measured gauge CDs with true ones, matching rows by ``name``.

    Truth rows take the CD from ``truth_key`` (``true_cd_nm``); measured rows
    from ``measured_key`` (``wafer_cd_nm``). Empty cells mean "no CD".
    """
    truth = {str(r["name"]): _cd(r, [truth_key]) for r in truth_rows}
    meas = {str(r["name"]): _cd(r, [measured_key]) for r in measured_rows}
    errors: dict[str, float] = {}
    missing, spurious = [], []
    for name, t in truth.items():
        m = meas.get(name)
        if t is None:
            if m is not None:
                spurious.append(name)
            continue
        if m is None:
            missing.append(name)
            continue
        errors[name] = m - t
    for name, m in meas.items():
        if name not in truth and m is not None:
            spurious.append(name)
    e = np.array(list(errors.values()), dtype=np.float64)
    n = len(e)
    return GaugeScore(
        n_truth=sum(v is not None for v in truth.values()),
        n_measured=sum(v is not None for v in meas.values()),
        n_compared=n,
        n_missing=len(missing),
        n_spurious=len(spurious),
        bias_nm=float(e.mean()) if n else None,
        sigma3_nm=(3.0 * float(e.std(ddof=1)) if n > 1 else 0.0) if n else None,
        max_abs_nm=float(np.abs(e).max()) if n else None,
        rms_nm=float(np.sqrt(np.mean(e * e))) if n else None,
        missing=missing,
        spurious=spurious,
        errors_nm=errors,
    )
