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
#: ``defect`` values of a truth feature that mean "not printed": excluded from the truth.
ABSENT_DEFECTS = frozenset({"missing", "absent", "removed", "not_printed"})


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

SLIVER_DEPTH_PX = 3.0  # border slivers reaching on average less than this into the image are not scored


def _border_depth(feature: Any, fov_nm: Any) -> float:
    """Mean depth (nm) to which a feature cut by the field of view reaches into it: the area of its
    part inside over the length of the field-of-view border that part lies on; ``inf`` for a
    feature not cut by the border."""
    import shapely

    reg = _region([feature])
    if reg is None or shapely.within(reg, fov_nm):
        return math.inf
    vis = shapely.intersection(reg, fov_nm)
    along = shapely.length(shapely.intersection(vis.boundary, fov_nm.exterior))
    if not along > 0:  # a rotated field of view: its edges and the clipped ones may differ by rounding
        along = shapely.length(shapely.intersection(vis.boundary, fov_nm.exterior.buffer(1e-9 * fov_nm.length)))
    if not along > 0:
        return math.inf
    return float(vis.area / along)


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
    sliver_ids: list[str] = field(default_factory=list)
    samples_nm: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    @property
    def n_sliver(self) -> int:
        """True features left out as border slivers (see :func:`evaluate_image`)."""
        return len(self.sliver_ids)

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
            "n_sliver": self.n_sliver,
            "sliver_ids": list(self.sliver_ids),
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
    sliver_depth_px: float = SLIVER_DEPTH_PX,
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
    sliver_depth_px : with ``fov_nm``, a true feature cut by the field of view
        whose part inside reaches on average less than this far into the image
        (visible area / visible length of the image border it covers) is a
        *border sliver*: its sidewall top, the rim that every edge rule needs,
        is not in view, so it is counted in ``n_sliver`` / ``sliver_ids`` and
        neither scored nor counted missing. 0 turns this off.
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
    sliver_ids: list[str] = []
    kept: list[np.ndarray] = []
    for i, (f, pts) in enumerate(zip(truth_features, samples_of(truth_features))):
        if len(pts) == 0:
            continue
        if fov_nm is not None and sliver_depth_px > 0 and _border_depth(f, fov_nm) < sliver_depth_px * pixel_nm:
            sliver_ids.append(_feature_id(f, i))
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
        sliver_ids=sliver_ids,
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
        "n_sliver": sum(s.n_sliver for s in scores),
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


# --------------------------------------------------------------------------- truth directories and runs


@dataclass
class TruthImage:
    """One image of a truth directory (``segsem synth`` output).

    ``transform`` is the image's *true* transform (nominal centre plus the
    stage offset), so ``fov_nm`` is where the image really looked.
    ``features`` are dicts with ``id``, ``exterior`` ``(N, 2)`` nm and
    ``holes`` (list of arrays), plus whatever else the file had.
    """

    name: str
    transform: Any
    features: list[dict[str, Any]]
    image_path: Any = None

    @property
    def pixel_nm(self) -> float:
        return float(self.transform.pixel_nm)

    @property
    def fov_nm(self):
        """The field of view as a shapely polygon in layout nm (rotation included)."""
        from shapely.geometry import Polygon

        h, w = self.transform.shape
        return Polygon(self.transform.to_layout(np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=float)))


def _pair(value, loc: str, what: str, *, positive: bool = False) -> tuple[float, float]:
    from .errors import SegsemError

    try:
        a = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        a = np.zeros(0)
    if a.shape != (2,) or not np.isfinite(a).all() or (positive and (a <= 0).any()):
        raise SegsemError(f"{loc} field '{what}': expected two {'positive ' if positive else ''}numbers, got {value!r}")
    return float(a[0]), float(a[1])


def _ring_field(value, loc: str, what: str) -> np.ndarray:
    from .errors import SegsemError

    try:
        a = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        a = np.zeros((0,))
    if a.ndim != 2 or a.shape[1] != 2 or len(a) < 3 or not np.isfinite(a).all():
        raise SegsemError(f"{loc} field '{what}': expected a list of at least 3 [x, y] nm pairs")
    if np.array_equal(a[0], a[-1]):
        a = a[:-1]
    return a


def read_truth(truth_dir) -> tuple[list[TruthImage], Any]:
    """Read a truth directory written by ``segsem synth``.

    Reads ``truth.json`` (required) = ``{"images": {name: {"pixel_nm", "shape":
    [H, W], "center_nm": [x, y], "offset_nm": [dx, dy], "features": [{"id",
    "exterior", "holes", ...}]}}}``; ``images`` may also be a list of entries
    with a ``name``. Missing ``center_nm`` / ``pixel_nm`` / image path are
    taken from ``manifest.csv`` (row whose image stem is the name), a missing
    ``shape`` from the image file. ``rotation_rad`` is honoured when present.
    Features whose ``defect`` is one of :data:`ABSENT_DEFECTS` (a design
    feature that did not print) or whose exterior is empty are left out: the
    truth is what is on the wafer.

    Returns
    -------
    (images, gauges_truth_path)
        ``gauges_truth_path`` is ``truth_dir/gauges_truth.csv`` or None.
    """
    import json
    from pathlib import Path

    from .errors import SegsemError
    from .transform import PixelTransform

    d = Path(truth_dir)
    tj = d / "truth.json"
    if not d.is_dir():
        raise SegsemError(f"{d}: truth directory not found")
    if not tj.is_file():
        raise SegsemError(f"{tj}: not found (a truth directory holds truth.json, as written by segsem synth)")
    try:
        doc = json.loads(tj.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise SegsemError(f"{tj}: not valid JSON ({str(exc).splitlines()[0]})") from None
    images = doc.get("images") if isinstance(doc, dict) else None
    if isinstance(images, list):
        entries = []
        for i, e in enumerate(images):
            if not isinstance(e, dict) or not (e.get("name") or e.get("image")):
                raise SegsemError(f"{tj} images[{i}] field 'name': missing")
            entries.append((str(e.get("name") or Path(str(e["image"])).stem), e))
    elif isinstance(images, dict):
        entries = [(str(k), v) for k, v in images.items()]
    else:
        raise SegsemError(f"{tj} field 'images': missing or not an object")
    manifest = {}
    mp = d / "manifest.csv"
    if mp.is_file():
        from .manifest import read_manifest

        manifest = {r.name: r for r in read_manifest(mp)}
    out: list[TruthImage] = []
    for name, e in entries:
        loc = f"{tj} image '{name}'"
        if not isinstance(e, dict):
            raise SegsemError(f"{loc}: expected an object")
        row = manifest.get(name) or manifest.get(Path(name).stem)
        img_path = None
        if e.get("image") or e.get("path"):
            img_path = d / str(e.get("image") or e.get("path"))
        elif row is not None:
            img_path = row.image
        pixel = e.get("pixel_nm", row.pixel_nm if row is not None else None)
        try:
            pixel = float(pixel)
        except (TypeError, ValueError):
            raise SegsemError(f"{loc} field 'pixel_nm': {pixel!r} is not a number") from None
        if not (pixel > 0 and math.isfinite(pixel)):
            raise SegsemError(f"{loc} field 'pixel_nm': must be a positive number of nm, got {pixel!r}")
        if e.get("center_nm") is not None:
            center = _pair(e["center_nm"], loc, "center_nm")
        elif row is not None:
            center = (row.x_nm, row.y_nm)
        else:
            raise SegsemError(f"{loc} field 'center_nm': missing (and no manifest.csv row for the image)")
        offset = _pair(e.get("offset_nm", (0.0, 0.0)), loc, "offset_nm")
        if e.get("shape") is not None:
            hw = _pair(e["shape"], loc, "shape", positive=True)
            shape = (int(hw[0]), int(hw[1]))
        elif img_path is not None:
            from .images import read_sem

            shape = tuple(read_sem(img_path, pixel)[0].shape)
        else:
            raise SegsemError(f"{loc} field 'shape': missing (and no image file to read it from)")
        rot = float(e.get("rotation_rad", math.radians(float(e.get("rotation_deg", 0.0)))))
        tr = PixelTransform(center_nm=center, pixel_nm=pixel, shape=shape, offset_nm=offset, rotation_rad=rot)
        feats = []
        for k, f in enumerate(e.get("features") or []):
            floc = f"{loc} feature {k}"
            if not isinstance(f, dict) or "exterior" not in f:
                raise SegsemError(f"{floc} field 'exterior': missing")
            if str(f.get("defect") or "").lower() in ABSENT_DEFECTS or not f["exterior"]:
                continue  # a design feature that is not on the wafer: nothing to find
            ext = _ring_field(f["exterior"], floc, "exterior")
            holes = [_ring_field(h, floc, f"holes[{j}]") for j, h in enumerate(f.get("holes") or [])]
            feats.append({**f, "id": str(f.get("id", f"{name}:{k}")), "exterior": ext, "holes": holes})
        out.append(TruthImage(name, tr, feats, img_path))
    gp = d / "gauges_truth.csv"
    return out, (gp if gp.is_file() else None)


def assign_records(
    records: Sequence[ContourRecord], images: Sequence[TruthImage], *, by: str = "auto"
) -> tuple[dict[str, list[ContourRecord]], int]:
    """Assign predicted contours to truth images.

    ``by="name"``: a record goes to the image whose name (or file stem) equals
    its ``image``. ``by="fov"``: to every image whose true field of view
    contains the contour's representative point (layout files carry no
    reliable image name). ``by="auto"``: by name when the name matches an
    image, otherwise by field of view. Returns the mapping (every image
    present) and the number of records assigned to no image.
    """
    import shapely
    from pathlib import Path
    from shapely.geometry import Polygon

    if by not in ("auto", "name", "fov"):
        raise ValueError(f"by must be 'auto', 'name' or 'fov', got {by!r}")
    out: dict[str, list[ContourRecord]] = {im.name: [] for im in images}
    alias: dict[str, str] = {}
    for im in images:
        alias.setdefault(im.name, im.name)
        alias.setdefault(Path(im.name).stem, im.name)
    pending: list[ContourRecord] = []
    unassigned = 0
    for r in records:
        key = alias.get(str(r.image)) or alias.get(Path(str(r.image)).stem)
        if by == "fov" or (by == "auto" and key is None):
            pending.append(r)
        elif key is not None:
            out[key].append(r)
        else:
            unassigned += 1
    if pending and images:
        pts = []
        for r in pending:
            ring = np.asarray(r.xy_nm, dtype=np.float64)
            p = Polygon(ring) if len(ring) >= 3 else None
            if p is None or p.is_empty:
                pts.append(shapely.points(ring.mean(axis=0)) if len(ring) else shapely.points(np.nan, np.nan))
            else:
                pts.append(p.representative_point() if p.is_valid else shapely.points(ring.mean(axis=0)))
        tree = shapely.STRtree([im.fov_nm for im in images])
        src, dst = tree.query(np.array(pts, dtype=object), predicate="within")
        hit = np.zeros(len(pending), bool)
        for i, j in zip(src, dst):
            out[images[j].name].append(pending[i])
            hit[i] = True
        unassigned += int((~hit).sum())
    elif pending:
        unassigned += len(pending)
    return out, unassigned


def evaluate_run(
    truth_dir,
    pred_path,
    *,
    gauges_path=None,
    layer: tuple[int, int] = (100, 0),
    assign: str = "auto",
    match_dist_nm: float | None = None,
    missing_frac: float = 0.5,
    step_nm: float = 0.5,
    sliver_depth_px: float = SLIVER_DEPTH_PX,
    overlays_dir=None,
) -> dict[str, Any]:
    """Score a contour file against a truth directory (what ``segsem evaluate`` runs).

    Parameters
    ----------
    truth_dir : folder with ``truth.json`` (and ``manifest.csv``,
        ``gauges_truth.csv``), see :func:`read_truth`.
    pred_path : contours (``.csv``, ``.gds``, ``.oas``), read with
        :func:`segsem_cli.contour_io.read_contours` on ``layer``.
    gauges_path : optional measured gauge table (``wafer_cd_nm`` column),
        compared with ``gauges_truth.csv`` (``true_cd_nm``).
    assign : ``"auto"`` (CSV: by image name, falling back to field of view;
        layout files: by field of view), ``"name"`` or ``"fov"``.
    sliver_depth_px : border slivers shallower than this are counted apart,
        not scored (see :func:`evaluate_image`); 0 scores every feature.
    overlays_dir : if given, write ``<image>.png`` overlays there (truth
        green, prediction red).

    Returns
    -------
    dict
        JSON-ready: ``images`` (one :meth:`ImageScore.to_dict` each),
        ``overall`` (:func:`aggregate`), ``gauges`` (:meth:`GaugeScore.to_dict`
        or None), ``unassigned`` (predicted contours in no image), ``settings``.
    """
    from pathlib import Path

    from .contour_io import read_contours
    from .errors import SegsemError

    if step_nm is None or not step_nm > 0:
        raise SegsemError(f"--step-nm: must be > 0, got {step_nm!r}")
    if not 0.0 <= missing_frac < 1.0:
        raise SegsemError(f"--missing-frac: must be in [0, 1), got {missing_frac!r}")
    if match_dist_nm is not None and not match_dist_nm > 0:
        raise SegsemError(f"--match-dist-nm: must be > 0, got {match_dist_nm!r}")
    if assign not in ("auto", "name", "fov"):
        raise SegsemError(f"--assign: {assign!r} is not one of auto, name, fov")
    images, gauges_truth = read_truth(truth_dir)
    pred_path = Path(pred_path)
    records = read_contours(pred_path, layer=int(layer[0]), datatype=int(layer[1]))
    how = assign
    if assign == "auto" and pred_path.suffix.lower() != ".csv":
        how = "fov"
    per_image, unassigned = assign_records(records, images, by=how)
    scores = [
        evaluate_image(
            im.features,
            per_image[im.name],
            pixel_nm=im.pixel_nm,
            missing_frac=missing_frac,
            match_dist_nm=match_dist_nm,
            step_nm=step_nm,
            fov_nm=im.fov_nm,
            sliver_depth_px=sliver_depth_px,
            name=im.name,
        )
        for im in images
    ]
    gscore = None
    if gauges_path is not None:
        from .gauges import read_gauge_table

        if gauges_truth is None:
            raise SegsemError(f"{Path(truth_dir) / 'gauges_truth.csv'}: not found (needed to score --gauges)")
        truth_rows = read_gauge_table(gauges_truth)
        meas_rows = read_gauge_table(gauges_path)
        if truth_rows and "true_cd_nm" not in truth_rows[0]:
            raise SegsemError(f"{gauges_truth} row 1 field 'true_cd_nm': missing column")
        if meas_rows and "wafer_cd_nm" not in meas_rows[0]:
            raise SegsemError(f"{gauges_path} row 1 field 'wafer_cd_nm': missing column")
        gscore = compare_gauges(truth_rows, meas_rows)
    if overlays_dir is not None:
        from .images import read_sem
        from .overlay import contours_to_px, draw_overlay

        for im in images:
            if im.image_path is None:
                raise SegsemError(f"truth image '{im.name}': no image file known (add it to manifest.csv) for --overlays")
            pixels, _ = read_sem(im.image_path, im.pixel_nm)
            truth_px = contours_to_px(im.transform, [r for f in im.features for r in feature_rings(f)])
            pred_px = contours_to_px(im.transform, [r for p in per_image[im.name] for r in feature_rings(p)])
            draw_overlay(pixels, {"truth": ("green", truth_px), "pred": ("red", pred_px)}, Path(overlays_dir) / f"{im.name}.png")
    return {
        "truth": str(truth_dir),
        "pred": str(pred_path),
        "settings": {
            "assign": how,
            "layer": f"{int(layer[0])}/{int(layer[1])}",
            "match_dist_nm": match_dist_nm,
            "match_dist_px": DEFAULT_MATCH_PX if match_dist_nm is None else None,
            "missing_frac": missing_frac,
            "step_nm": step_nm,
            "sliver_depth_px": sliver_depth_px,
        },
        "n_pred_records": len(records),
        "unassigned": unassigned,
        "images": [s.to_dict() for s in scores],
        "overall": aggregate(scores),
        "gauges": gscore.to_dict() if gscore is not None else None,
    }
