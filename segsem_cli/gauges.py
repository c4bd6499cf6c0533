"""Gauges: read cutlines, measure CDs on contours, write the gauge table.

Conventions
-----------
* A gauge is a cutline segment ``p1 = (x1, y1) -> p2 = (x2, y2)`` in layout nm
  (x right, y up), read from a CSV with header ``name,x1,y1,x2,y2`` (any extra
  columns are kept in :attr:`Gauge.extra` and passed through to the output).
* Contours are closed rings in layout nm, ``(N, 2)`` arrays of ``(x, y)``,
  closed implicitly (no repeated last vertex). Holes are rings too.
* The CD of a gauge is the distance along the cutline between the first and
  the last crossing of the cutline with the contours (so a cutline across one
  line gives its width; across a space between two lines, the space). With one
  crossing the CD is undefined and with none there is nothing to measure: the
  CD is then ``None``, never a made-up number.
* Error rows are numbered as a spreadsheet shows them: the header is row 1.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .atomic import atomic_path
from .errors import SegsemError, where
from .manifest import parse_number
from .metrics import feature_rings
from .types import ContourRecord

GAUGE_FIELDS = ("name", "x1", "y1", "x2", "y2")
#: Columns the measured gauge table adds after the passed-through extra columns.
MEASURED_FIELDS = ("wafer_cd_nm", "image", "source", "confidence", "status")


@dataclass(frozen=True)
class Gauge:
    """One cutline in layout nm; ``extra`` holds the CSV's other columns (as strings)."""

    name: str
    x1: float
    y1: float
    x2: float
    y2: float
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def p1(self) -> np.ndarray:
        return np.array([self.x1, self.y1], dtype=np.float64)

    @property
    def p2(self) -> np.ndarray:
        return np.array([self.x2, self.y2], dtype=np.float64)

    @property
    def length_nm(self) -> float:
        return math.hypot(self.x2 - self.x1, self.y2 - self.y1)

    @property
    def midpoint(self) -> tuple[float, float]:
        return ((self.x1 + self.x2) / 2.0, (self.y1 + self.y2) / 2.0)


@dataclass(frozen=True)
class CdResult:
    """The outcome of measuring one cutline.

    ``cd_nm`` is None unless ``status == "ok"``. ``crossings_t`` are the
    crossing positions as distances from ``p1`` along the cutline (nm, sorted),
    ``crossings_xy`` the same points as ``(K, 2)`` layout nm, and ``features``
    the sorted indices (into the ``contours_nm`` list given) of the contours
    crossed; ``crossing_features`` gives the index for each crossing.
    """

    status: str
    cd_nm: float | None
    crossings_t: np.ndarray
    crossings_xy: np.ndarray
    features: tuple[int, ...]
    crossing_features: tuple[int, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# --------------------------------------------------------------------------- reading


def read_gauges(path: str | Path) -> list[Gauge]:
    """Read a gauge (cutline) CSV with header ``name,x1,y1,x2,y2`` in layout nm.

    Extra columns are kept, as strings, in :attr:`Gauge.extra` (column order is
    preserved). Blank lines are skipped.

    Raises
    ------
    SegsemError
        One line naming the file, row (header = row 1) and field: missing file
        or column, empty or non-numeric coordinate, empty or duplicate name,
        zero-length cutline.
    """
    path = Path(path)
    if not path.is_file():
        raise SegsemError(f"{path}: gauge file not found")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = None
        for raw in reader:
            if any(c.strip() for c in raw):
                header = [c.strip() for c in raw]
                break
        if header is None:
            raise SegsemError(f"{path}: empty gauge file, expected header {','.join(GAUGE_FIELDS)}")
        header_row = reader.line_num
        for col in GAUGE_FIELDS:
            if col not in header:
                raise SegsemError(
                    f"{where(path, header_row, col)}: missing column (header must contain {','.join(GAUGE_FIELDS)})"
                )
        dup = {c for c in header if header.count(c) > 1}
        if dup:
            raise SegsemError(f"{where(path, header_row, sorted(dup)[0])}: column appears twice in the header")
        gauges: list[Gauge] = []
        seen: dict[str, int] = {}
        for raw in reader:
            row = reader.line_num
            if not any(c.strip() for c in raw):
                continue
            if len(raw) > len(header):
                raise SegsemError(f"{where(path, row)}: {len(raw)} fields but the header has {len(header)}")
            values = dict(zip(header, [c.strip() for c in raw] + [""] * (len(header) - len(raw))))
            name = values["name"]
            if not name:
                raise SegsemError(f"{where(path, row, 'name')}: empty gauge name")
            if name in seen:
                raise SegsemError(f"{where(path, row, 'name')}: duplicate gauge name {name!r} (first at row {seen[name]})")
            seen[name] = row
            x1, y1, x2, y2 = (parse_number(values[k], path, row, k) for k in ("x1", "y1", "x2", "y2"))
            if x1 == x2 and y1 == y2:
                raise SegsemError(f"{where(path, row, 'x2')}: zero-length cutline (p1 == p2)")
            extra = {k: v for k, v in values.items() if k not in GAUGE_FIELDS}
            gauges.append(Gauge(name, x1, y1, x2, y2, extra))
    return gauges


def read_gauge_table(path: str | Path) -> list[dict[str, str]]:
    """Read any gauge table (truth or measured) as a list of string dicts.

    Requires a ``name`` column; used by :func:`segsem_cli.metrics.compare_gauges`.
    """
    path = Path(path)
    if not path.is_file():
        raise SegsemError(f"{path}: gauge table not found")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or "name" not in [f.strip() for f in reader.fieldnames]:
            raise SegsemError(f"{where(path, 1, 'name')}: missing column")
        rows = []
        for r in reader:
            if not any((v or "").strip() for v in r.values() if isinstance(v, str)):
                continue
            d = {(k or "").strip(): (v or "").strip() if isinstance(v, str) else "" for k, v in r.items() if k}
            d["_row"] = str(reader.line_num)
            rows.append(d)
    return rows


# --------------------------------------------------------------------------- measuring


def _edges(contours_nm: Sequence[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Edge start points, edge vectors and owning contour index of every ring."""
    starts, vecs, owner = [], [], []
    for i, item in enumerate(contours_nm):
        for ring in feature_rings(item):
            if ring.ndim != 2 or ring.shape[1] != 2:
                raise ValueError(f"contour {i}: expected an (N, 2) array of x, y nm, got shape {ring.shape}")
            nxt = np.roll(ring, -1, axis=0)
            starts.append(ring)
            vecs.append(nxt - ring)
            owner.append(np.full(len(ring), i, dtype=np.int64))
    if not starts:
        return np.zeros((0, 2)), np.zeros((0, 2)), np.zeros(0, dtype=np.int64)
    return np.concatenate(starts), np.concatenate(vecs), np.concatenate(owner)


def measure_cd(p1, p2, contours_nm: Sequence[Any]) -> CdResult:
    """Measure the CD along the cutline ``p1 -> p2`` on closed contours.

    Parameters
    ----------
    p1, p2 : cutline end points ``(x, y)`` in layout nm.
    contours_nm : closed contours in layout nm: each item an ``(N, 2)`` ring,
        an ``(exterior, holes)`` tuple, a shapely Polygon or a
        :class:`~segsem_cli.types.ContourRecord` (its holes count as part of
        the same feature).

    Returns
    -------
    CdResult
        Crossings are exact segment-segment intersections (vectorised over all
        edges). Each edge owns its start vertex but not its end vertex, so a
        cutline through a vertex counts once; edges collinear with the cutline
        add no crossing (their neighbours do). ``status`` is ``"ok"`` (two or
        more crossings, CD = distance from the first to the last),
        ``"single_crossing"`` or ``"no_crossing"`` (``cd_nm`` None).
    """
    p1, p2 = _cutline(p1, p2)
    return _measure_on_edges(p1, p2, *_edges(contours_nm))


def _cutline(p1, p2) -> tuple[np.ndarray, np.ndarray]:
    p1 = np.asarray(p1, dtype=np.float64).reshape(-1)
    p2 = np.asarray(p2, dtype=np.float64).reshape(-1)
    if p1.shape != (2,) or p2.shape != (2,) or not (np.isfinite(p1).all() and np.isfinite(p2).all()):
        raise ValueError(f"cutline end points must be finite (x, y) pairs, got {p1!r} and {p2!r}")
    if float(np.hypot(*(p2 - p1))) == 0.0:
        raise ValueError("zero-length cutline (p1 == p2)")
    return p1, p2


class _EdgeIndex:
    """The edges of one image's contours (:func:`_edges`) with their bounding boxes, measured
    against many cutlines: each cutline only looks at the edges whose box meets its own."""

    #: margin (nm) around a cutline's box: edges farther away cannot cross it, whatever the rounding
    MARGIN_NM = 1.0

    def __init__(self, contours_nm: Sequence[Any]):
        self.a, self.e, self.owner = _edges(contours_nm)
        b = self.a + self.e
        self.lo = np.minimum(self.a, b)
        self.hi = np.maximum(self.a, b)

    def measure(self, p1: np.ndarray, p2: np.ndarray) -> CdResult:
        m = self.MARGIN_NM + 1e-9 * float(np.max(np.abs(np.concatenate([p1, p2]))))
        lo = np.minimum(p1, p2) - m
        hi = np.maximum(p1, p2) + m
        near = np.nonzero((self.hi[:, 0] >= lo[0]) & (self.lo[:, 0] <= hi[0])
                          & (self.hi[:, 1] >= lo[1]) & (self.lo[:, 1] <= hi[1]))[0]
        # kept edges stay in order, so the (stable) sort of the crossings is unchanged
        return _measure_on_edges(p1, p2, self.a[near], self.e[near], self.owner[near])


def _measure_on_edges(p1: np.ndarray, p2: np.ndarray, a: np.ndarray, e: np.ndarray,
                      owner: np.ndarray) -> CdResult:
    """:func:`measure_cd` on edges given as start points ``a``, vectors ``e`` and owning contour."""
    d = p2 - p1
    length = float(np.hypot(*d))
    empty = CdResult("no_crossing", None, np.zeros(0), np.zeros((0, 2)), (), ())
    if len(a) == 0:
        return empty
    # p1 + t d = a + s e  ->  t (d x e) = (a - p1) x e ;  s (d x e) = (a - p1) x d
    w = a - p1
    den = d[0] * e[:, 1] - d[1] * e[:, 0]
    tn = w[:, 0] * e[:, 1] - w[:, 1] * e[:, 0]
    sn = w[:, 0] * d[1] - w[:, 1] * d[0]
    scale = np.hypot(e[:, 0], e[:, 1]) * length
    ok = np.abs(den) > 1e-12 * np.maximum(scale, 1e-300)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(ok, tn / np.where(ok, den, 1.0), np.nan)
        s = np.where(ok, sn / np.where(ok, den, 1.0), np.nan)
    hit = ok & (t >= 0.0) & (t <= 1.0) & (s >= 0.0) & (s < 1.0)
    if not hit.any():
        return empty
    th = t[hit]
    own = owner[hit]
    order = np.argsort(th, kind="stable")
    th = th[order]
    own = own[order]
    pos = th * length
    xy = p1[None, :] + th[:, None] * d[None, :]
    feats = tuple(int(i) for i in np.unique(own))
    crossing_features = tuple(int(i) for i in own)
    if len(th) == 1:
        return CdResult("single_crossing", None, pos, xy, feats, crossing_features)
    return CdResult("ok", float(pos[-1] - pos[0]), pos, xy, feats, crossing_features)


# --------------------------------------------------------------------------- per-image gauge table


def gauge_rows(
    gauges: Sequence[Gauge],
    per_image_contours: Mapping[str, Sequence[ContourRecord]],
    fov_polys: Mapping[str, Any],
) -> list[dict[str, Any]]:
    """Measure every gauge on the image whose field of view holds its cutline.

    Parameters
    ----------
    gauges : the cutlines (:func:`read_gauges`).
    per_image_contours : image name -> contours (layout nm) extracted from it.
    fov_polys : image name -> field of view as a shapely polygon in layout nm.

    Returns
    -------
    list of dict
        One row per gauge, in order: ``name, x1, y1, x2, y2``, the gauge's extra
        columns, then ``wafer_cd_nm`` (float, or ``""`` when undefined),
        ``image``, ``source`` (the crossed features' sources joined by ``+``),
        ``confidence`` (min over the crossed features, ``""`` when none) and
        ``status``: ``"ok"``, ``"outside_images"`` (no field of view fully
        contains the cutline), ``"no_crossing"`` or ``"single_crossing"``.
        Among images that contain the cutline, the one whose centre is nearest
        the cutline midpoint is used.
    """
    import shapely

    names = list(fov_polys)
    polys = [fov_polys[n] for n in names]
    for n, p in zip(names, polys):
        if not isinstance(p, shapely.Geometry):
            raise TypeError(f"field of view of image {n!r} must be a shapely polygon, got {type(p).__name__}")
    gauges = list(gauges)
    if gauges and names:
        # every gauge against every field of view at once (same predicates and distances as one by one)
        lines = shapely.linestrings([[(g.x1, g.y1), (g.x2, g.y2)] for g in gauges])
        mids = shapely.points([g.midpoint for g in gauges])
        fov = np.array(polys, dtype=object)
        covers = shapely.covers(fov[None, :], lines[:, None])
        dist = np.where(covers, shapely.distance(shapely.centroid(fov)[None, :], mids[:, None]), np.inf)
        best_of = np.argmin(dist, axis=1)  # first of the nearest, as a strict '<' scan
        has = covers.any(axis=1)
    indexes: dict[str, _EdgeIndex] = {}
    records_of: dict[str, list] = {}
    rows: list[dict[str, Any]] = []
    for gi, g in enumerate(gauges):
        row: dict[str, Any] = {"name": g.name, "x1": g.x1, "y1": g.y1, "x2": g.x2, "y2": g.y2}
        row.update(g.extra)
        if not names or not has[gi]:
            row.update(wafer_cd_nm="", image="", source="", confidence="", status="outside_images")
            rows.append(row)
            continue
        best = names[int(best_of[gi])]
        if best not in indexes:
            records_of[best] = list(per_image_contours.get(best, ()))
            indexes[best] = _EdgeIndex(records_of[best])
        records = records_of[best]
        p1, p2 = _cutline(g.p1, g.p2)
        res = indexes[best].measure(p1, p2)
        crossed = [records[i] for i in res.features]
        sources = sorted({r.source for r in crossed})
        row.update(
            wafer_cd_nm=res.cd_nm if res.cd_nm is not None else "",
            image=best,
            source="+".join(sources),
            confidence=min(float(r.confidence) for r in crossed) if crossed else "",
            status=res.status,
        )
        rows.append(row)
    return rows


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if not math.isfinite(v):
            return ""
        text = f"{v:.6f}".rstrip("0").rstrip(".")
        return "0" if text in ("-0", "") else text
    if isinstance(value, (np.integer,)):
        return str(int(value))
    return str(value)


def write_gauge_csv(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Atomically write gauge rows (dicts) as CSV.

    Columns are the union of the rows' keys in first-seen order (so
    ``name,x1,y1,x2,y2``, extras, then the measured columns for rows from
    :func:`gauge_rows`). Floats are written with 6 decimals, trailing zeros
    trimmed; ``None`` and NaN are written as empty cells.
    """
    rows = list(rows)
    columns: list[str] = []
    for r in rows:
        for k in r:
            if k not in columns and not str(k).startswith("_"):
                columns.append(k)
    if not columns:
        columns = list(GAUGE_FIELDS) + list(MEASURED_FIELDS)
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(columns)
            for r in rows:
                w.writerow([_fmt(r.get(c, "")) for c in columns])
    return Path(path)
