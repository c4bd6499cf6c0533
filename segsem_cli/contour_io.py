"""Write and read contour files: GDSII, OASIS (via gdstk) and the contour CSV.

The exporter plugins (``plugins/exporters.py``) call the writers; ``segsem
evaluate`` and notebooks call :func:`read_contours`. Coordinates are layout nm
(``x`` right, ``y`` up).

GDSII / OASIS layout
--------------------
* Library unit 1 nm (``unit=1e-9``), database unit ``grid_nm`` nm
  (``precision=grid_nm*1e-9``; default 0.1 nm). Every vertex is rounded to the
  database grid before anything else (:func:`segsem_cli.geometry.to_dbu_geometry`).
* All polygons on ``(layer, datatype)``, default ``(100, 0)``, in the top cell
  ``cell`` (default ``"SEGSEM"``), or with ``per_image_cells=True`` in one cell
  per image, ``<cell>_<image>`` (characters other than letters, digits, ``_``,
  ``$``, ``?`` become ``_``), each placed once in the top cell at the origin
  without transformation.
* Holes: ``holes="keyhole"`` (default) joins each hole to the outline by a
  zero-width bridge (:func:`segsem_cli.geometry.keyhole`), one polygon per
  contour, exact area. ``holes="datatype"`` writes the outline with its holes
  filled on ``datatype`` and each hole as its own polygon on ``hole_datatype``
  (default ``datatype + 1``); the contour is outline minus holes.
* A polygon with more than ``max_vertices`` distinct vertices (default 4,094,
  which keeps every GDSII record under 32 KiB; at most 8,189, i.e. the 8,190
  GDSII points with the repeated first point) is cut into pieces by axis-parallel lines
  (:func:`segsem_cli.geometry.split_polygon`); the pieces tile the contour.
* Invalid contours (self-intersecting, hole outside) are repaired with
  :func:`shapely.make_valid`; a contour with no area left is skipped. Both give
  a :class:`~segsem_cli.geometry.GeometryWarning`.
* Provenance on every polygon. GDSII properties (attribute number: string):
  :data:`GDS_PROPERTY_ATTRS` = 1 ``feature_id``, 2 ``source``, 3 ``confidence``
  (``%.6g``), 4 ``image``. OASIS named properties (:data:`OASIS_PROPERTY_NAMES`):
  ``feature_id``, ``source``, ``image`` (strings) and ``confidence`` (real).
  The GDSII specification allows 128 bytes of property values per element;
  longer names are still written (KLayout and gdstk read them) with a
  :class:`~segsem_cli.geometry.GeometryWarning`.

Contour CSV
-----------
Columns :data:`CSV_COLUMNS` = ``image,feature_id,source,confidence,ring,
point_index,x_nm,y_nm``; one row per vertex; ``ring`` 0 is the exterior
(counter-clockwise), 1, 2, ... the holes (clockwise); ``point_index`` counts
from 0 within a ring; rings are closed implicitly. ``x_nm``, ``y_nm`` and
``confidence`` have 4 decimals. No repair or snapping is applied.
"""
from __future__ import annotations

import csv
import io
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import gdstk
import numpy as np
import shapely
from shapely.geometry import Polygon

from .atomic import atomic_path, write_text
from .errors import SegsemError, where
from .geometry import (
    GDS_MAX_VERTICES,
    SAFE_MAX_VERTICES,
    GeometryWarning,
    as_ring,
    check_grid_nm,
    from_dbu,
    keyhole_pieces,
    orient_ring,
    polygon_parts,
    polygon_rings,
    repair,
    split_polygon,
    to_dbu_geometry,
    unkeyhole,
)
from .types import ContourRecord

#: GDSII property attribute number of each provenance field.
GDS_PROPERTY_ATTRS: dict[str, int] = {"feature_id": 1, "source": 2, "confidence": 3, "image": 4}
#: OASIS property name of each provenance field.
OASIS_PROPERTY_NAMES: dict[str, str] = {k: k for k in GDS_PROPERTY_ATTRS}
#: Columns of the contour CSV, in order.
CSV_COLUMNS = ("image", "feature_id", "source", "confidence", "ring", "point_index", "x_nm", "y_nm")
#: Suffixes :func:`read_contours` recognises.
LAYOUT_SUFFIXES = {".gds": "gds", ".gds2": "gds", ".gdsii": "gds", ".oas": "oasis", ".oasis": "oasis"}
HOLE_MODES = ("keyhole", "datatype")

_NM = 1e-9


@dataclass(frozen=True)
class LayoutPolygon:
    """One polygon ready for a layout file: integer DBU ring, target datatype, provenance."""

    record: ContourRecord
    dbu: np.ndarray  # (N, 2) int64, counter-clockwise, closed implicitly
    datatype: int


# ----------------------------------------------------------------- validation

def _check_int(name: str, value, lo: int, hi: int) -> int:
    try:
        v = int(value)
        ok = not isinstance(value, (bool, str)) and v == value
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise SegsemError(f"option '{name}': expected an integer, got {value!r}")
    if not lo <= v <= hi:
        raise SegsemError(f"option '{name}': {v} is outside {lo}..{hi}")
    return v


def _record_name(rec: ContourRecord) -> str:
    return f"image '{rec.image}' feature '{rec.feature_id}'"


def _check_records(records) -> list[ContourRecord]:
    out = list(records)
    for i, r in enumerate(out):
        if not isinstance(r, ContourRecord):
            raise SegsemError(f"records[{i}]: expected a ContourRecord, got {type(r).__name__}")
    return out


# ------------------------------------------------------------- to polygons

def layout_polygons(records: Sequence[ContourRecord], *, grid_nm: float = 0.1, datatype: int = 0,
                    holes: str = "keyhole", hole_datatype: int | None = None,
                    max_vertices: int = SAFE_MAX_VERTICES) -> list[LayoutPolygon]:
    """Turn contour records into hole-free, grid-snapped, size-limited polygons.

    Parameters
    ----------
    records : sequence of ContourRecord
        Contours in layout nm.
    grid_nm : float
        Database unit in nm; every vertex is rounded to it.
    datatype : int
        Datatype of the contour polygons.
    holes : {"keyhole", "datatype"}
        How holes are written (see the module docstring).
    hole_datatype : int or None
        Datatype of hole polygons with ``holes="datatype"``; None means ``datatype + 1``.
    max_vertices : int
        Largest number of vertices of one output polygon.

    Returns
    -------
    list of LayoutPolygon
        In record order. Repaired or skipped contours give a GeometryWarning.
    """
    if holes not in HOLE_MODES:
        raise SegsemError(f"option 'holes': {holes!r} is not one of {', '.join(HOLE_MODES)}")
    if hole_datatype is None:
        hole_datatype = datatype + 1
    out: list[LayoutPolygon] = []
    for rec in _check_records(records):
        name = _record_name(rec)
        try:
            raw = Polygon(as_ring(rec.xy_nm, name=name),
                          [as_ring(h, name=f"{name} hole {k + 1}") for k, h in enumerate(rec.holes_nm)])
        except SegsemError as exc:
            warnings.warn(f"{exc}; skipped", GeometryWarning, stacklevel=3)
            continue
        parts = repair(raw)
        if not raw.is_valid:
            warnings.warn(f"{name}: invalid contour ({shapely.is_valid_reason(raw)}); repaired into "
                          f"{len(parts)} polygon(s)", GeometryWarning, stacklevel=3)
        snapped = [q for p in parts for q in repair(to_dbu_geometry(p, grid_nm))]
        if not snapped:
            warnings.warn(f"{name}: contour has no area on the {grid_nm} nm grid; skipped",
                          GeometryWarning, stacklevel=3)
            continue
        for poly in snapped:
            if holes == "keyhole":
                for piece in split_polygon(poly, max_vertices, keyhole=True):
                    for ring in keyhole_pieces(piece):
                        out.append(LayoutPolygon(rec, _ints(ring), datatype))
            else:
                ext, hs = polygon_rings(poly)
                for ring, dt in [(ext, datatype)] + [(h, hole_datatype) for h in hs]:
                    for piece in split_polygon(Polygon(ring), max_vertices, keyhole=False):
                        out.append(LayoutPolygon(rec, _ints(polygon_rings(piece)[0]), dt))
    return out


def _ints(ring: np.ndarray) -> np.ndarray:
    return np.rint(ring).astype(np.int64)


# ---------------------------------------------------------------- GDS / OASIS

def _cell_name(base: str, image: str, used: set[str]) -> str:
    name = f"{base}_{re.sub(r'[^A-Za-z0-9_$?]', '_', image) or 'image'}"
    cand, k = name, 2
    while cand in used:
        cand, k = f"{name}_{k}", k + 1
    used.add(cand)
    return cand


def build_library(polys: Sequence[LayoutPolygon], *, fmt: str, layer: int = 100, grid_nm: float = 0.1,
                  cell: str = "SEGSEM", per_image_cells: bool = False) -> gdstk.Library:
    """Assemble a gdstk library (unit 1 nm, precision ``grid_nm`` nm) with provenance properties.

    Parameters
    ----------
    polys : sequence of LayoutPolygon
        From :func:`layout_polygons` with the same ``grid_nm``.
    fmt : {"gds", "oasis"}
        Decides the property flavour (numbered GDSII properties or named OASIS ones).
    layer, grid_nm, cell, per_image_cells
        See the module docstring.
    """
    if fmt not in ("gds", "oasis"):
        raise SegsemError(f"build_library: fmt must be 'gds' or 'oasis', got {fmt!r}")
    if not isinstance(cell, str) or not cell.strip():
        raise SegsemError(f"option 'cell': expected a non-empty cell name, got {cell!r}")
    lib = gdstk.Library(name="SEGSEM", unit=_NM, precision=float(grid_nm) * _NM)
    top = lib.new_cell(cell)
    image_cells: dict[str, gdstk.Cell] = {}
    used = {cell}
    for lp in polys:
        rec = lp.record
        pts = from_dbu(lp.dbu, grid_nm)
        poly = gdstk.Polygon(pts, layer=layer, datatype=lp.datatype)
        values = {"feature_id": str(rec.feature_id), "source": str(rec.source),
                  "confidence": float(rec.confidence), "image": str(rec.image)}
        if fmt == "gds":
            for key, attr in GDS_PROPERTY_ATTRS.items():
                v = values[key]
                poly.set_gds_property(attr, f"{v:.6g}" if isinstance(v, float) else v)
        else:
            for key, pname in OASIS_PROPERTY_NAMES.items():
                poly.set_property(pname, values[key])
        target = top
        if per_image_cells:
            target = image_cells.get(rec.image)
            if target is None:
                target = image_cells[rec.image] = lib.new_cell(_cell_name(cell, rec.image, used))
                top.add(gdstk.Reference(target))
        target.add(poly)
    return lib


def _write_library(lib: gdstk.Library, tmp: Path, fmt: str) -> None:
    """Let gdstk write the file (a separate function so tests can interrupt it)."""
    if fmt == "gds":
        lib.write_gds(str(tmp), max_points=GDS_MAX_VERTICES)
    else:
        lib.write_oas(str(tmp))


def write_layout(records: Sequence[ContourRecord], path: str | Path, *, fmt: str | None = None,
                 layer: int = 100, datatype: int = 0, grid_nm: float = 0.1, cell: str = "SEGSEM",
                 per_image_cells: bool = False, holes: str = "keyhole", hole_datatype: int | None = None,
                 max_vertices: int = SAFE_MAX_VERTICES) -> Path:
    """Write contour records to a GDSII or OASIS file, atomically.

    Parameters
    ----------
    records : sequence of ContourRecord
        Contours in layout nm.
    path : path
        Output file; written through :func:`segsem_cli.atomic.atomic_path`.
    fmt : {"gds", "oasis"} or None
        None: from the suffix (``.gds``/``.gds2``/``.gdsii`` or ``.oas``/``.oasis``).
    layer, datatype : int
        Target layer/datatype (0..65535).
    grid_nm : float
        Database unit in nm (vertices are rounded to it).
    cell : str
        Top cell name.
    per_image_cells : bool
        One sub-cell per image (see the module docstring).
    holes : {"keyhole", "datatype"}
        Hole handling; ``hole_datatype`` defaults to ``datatype + 1``.
    max_vertices : int
        Distinct vertices per polygon, 8..8189 (GDSII's 8,190 points minus the repeated
        first point); the default 4094 keeps records below 32 KiB for strict readers.

    Returns
    -------
    pathlib.Path
        The file written.
    """
    path = Path(path)
    if fmt is None:
        fmt = LAYOUT_SUFFIXES.get(path.suffix.lower())
        if fmt is None:
            raise SegsemError(f"{path}: unknown layout suffix '{path.suffix}' (use .gds or .oas)")
    layer = _check_int("layer", layer, 0, 65535)
    datatype = _check_int("datatype", datatype, 0, 65535)
    hole_datatype = _check_int("hole_datatype", datatype + 1 if hole_datatype is None else hole_datatype, 0, 65535)
    if holes == "datatype" and hole_datatype == datatype:
        raise SegsemError(f"option 'hole_datatype': must differ from datatype {datatype}")
    grid_nm = check_grid_nm(grid_nm)
    max_vertices = _check_int("max_vertices", max_vertices, 8, GDS_MAX_VERTICES)
    polys = layout_polygons(records, grid_nm=grid_nm, datatype=datatype, holes=holes,
                            hole_datatype=hole_datatype, max_vertices=max_vertices)
    lib = build_library(polys, fmt=fmt, layer=layer, grid_nm=grid_nm, cell=cell, per_image_cells=per_image_cells)
    with atomic_path(path) as tmp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _write_library(lib, tmp, fmt)
    for w in caught:
        if "unofficially supported" in str(w.message):
            # polygons are kept below the vertex limit, so this is the 128-byte property budget
            warnings.warn(f"{path}: the GDSII properties of some polygons exceed the 128 bytes the GDSII "
                          f"specification allows per element (long image or feature names); KLayout and gdstk "
                          f"read them, stricter tools may drop them", GeometryWarning, stacklevel=2)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return path


# ----------------------------------------------------------------------- CSV

def _fmt(v: float, decimals: int) -> str:
    s = f"{float(v):.{decimals}f}"
    if s[0] == "-" and not s.strip("-0."):
        s = s[1:]  # no "-0.0000"
    return s


def contour_csv_text(records: Sequence[ContourRecord], *, decimals: int = 4) -> str:
    """The contour CSV for ``records`` as text (see the module docstring for the format).

    Exteriors are written counter-clockwise and holes clockwise; a record with
    an unusable ring (fewer than 3 vertices, NaN) is skipped with a GeometryWarning.
    """
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for rec in _check_records(records):
        name = _record_name(rec)
        try:
            rings = [orient_ring(as_ring(rec.xy_nm, name=name), ccw=True)]
            rings += [orient_ring(as_ring(h, name=f"{name} hole {k + 1}"), ccw=False)
                      for k, h in enumerate(rec.holes_nm)]
        except SegsemError as exc:
            warnings.warn(f"{exc}; skipped", GeometryWarning, stacklevel=3)
            continue
        head = io.StringIO()
        csv.writer(head, lineterminator="").writerow(
            [rec.image, rec.feature_id, rec.source, _fmt(rec.confidence, decimals)])
        prefix = head.getvalue().replace("%", "%%")
        for ring_no, ring in enumerate(rings):
            buf.write(_ring_rows(prefix, ring_no, ring, decimals))
    return buf.getvalue()


def _ring_rows(prefix: str, ring_no: int, ring: np.ndarray, decimals: int) -> str:
    """The CSV rows of one ring, ``prefix,ring_no,k,x,y``, with :func:`_fmt` numbers.

    One ``%``-format over the whole ring (``prefix`` has its ``%`` doubled); the
    few values that would print as a negative zero are set to 0 first, which is
    what :func:`_fmt` does to their text.
    """
    xy = np.array(ring, dtype=np.float64)
    small = (xy < 0) & (xy > -(10.0 ** -decimals))
    if small.any():
        for i, j in zip(*np.nonzero(small)):
            if float(xy[i, j]) != 0.0 and not f"{float(xy[i, j]):.{decimals}f}".strip("-0."):
                xy[i, j] = 0.0
    xy[xy == 0] = 0.0  # -0.0 -> 0.0
    n = len(xy)
    vals = np.column_stack([np.arange(n, dtype=np.float64), xy]).ravel().tolist()  # %d prints 3.0 as 3
    line = f"{prefix},{ring_no},%d,%.{decimals}f,%.{decimals}f\n"
    return (line * n) % tuple(vals)


def write_contour_csv(records: Sequence[ContourRecord], path: str | Path, *, decimals: int = 4) -> Path:
    """Write the contour CSV atomically; returns the path. See :func:`contour_csv_text`."""
    decimals = _check_int("decimals", decimals, 0, 12)
    return write_text(path, contour_csv_text(records, decimals=decimals))


# -------------------------------------------------------------------- reading

def read_contours(path: str | Path, *, layer: int = 100, datatype: int = 0,
                  hole_datatype: int | None = None) -> list[ContourRecord]:
    """Read contours written by segsem (or any GDSII/OASIS polygons, or a contour CSV).

    Parameters
    ----------
    path : path
        ``.gds``/``.gds2``/``.gdsii``, ``.oas``/``.oasis`` or ``.csv``.
    layer, datatype : int
        Layout layer/datatype to read (ignored for CSV).
    hole_datatype : int or None
        For files written with ``holes="datatype"``: polygons on this datatype
        are cut out of the contour with the same provenance (or, without
        provenance, out of every contour they overlap).

    Returns
    -------
    list of ContourRecord
        Layout nm, exterior counter-clockwise, holes clockwise. From layout
        files, references are flattened, keyholes are turned back into holes,
        and the pieces of a split contour (same image, feature_id, source and
        confidence) are merged. Polygons without segsem properties get
        ``image`` = file stem, ``feature_id`` = ``<stem>:<n>``, ``source`` =
        ``"layout"`` and ``confidence`` = NaN.

    Raises
    ------
    SegsemError
        Missing or unreadable file, unknown suffix, bad CSV row.
    """
    path = Path(path)
    if not path.is_file():
        raise SegsemError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _read_csv(path)
    fmt = LAYOUT_SUFFIXES.get(suffix)
    if fmt is None:
        raise SegsemError(f"{path}: unknown contour file suffix '{path.suffix}' (use .gds, .oas or .csv)")
    return _read_layout(path, fmt, layer, datatype, hole_datatype)


def _prop_value(poly: gdstk.Polygon, key: str) -> str | float | None:
    vals = poly.get_property(OASIS_PROPERTY_NAMES[key])
    if vals:
        v = vals[0]
        return v.decode("utf-8", "replace").rstrip("\0") if isinstance(v, bytes) else v
    v = poly.get_gds_property(GDS_PROPERTY_ATTRS[key])
    return None if v is None else v.rstrip("\0")  # gdstk pads GDSII strings with NUL


def _provenance(poly: gdstk.Polygon) -> tuple[str, str, str, str] | None:
    """(image, feature_id, source, repr(confidence)) from the polygon's properties, or None."""
    fid = _prop_value(poly, "feature_id")
    if fid is None:
        return None
    image = _prop_value(poly, "image")
    source = _prop_value(poly, "source")
    conf = _prop_value(poly, "confidence")
    try:
        conf_f = float(conf) if conf is not None else math.nan
    except (TypeError, ValueError):
        conf_f = math.nan
    return ("" if image is None else str(image), str(fid), "" if source is None else str(source), repr(conf_f))


def _read_layout(path: Path, fmt: str, layer: int, datatype: int, hole_datatype: int | None) -> list[ContourRecord]:
    try:
        lib = gdstk.read_gds(str(path)) if fmt == "gds" else gdstk.read_oas(str(path))
    except Exception as exc:  # noqa: BLE001 - gdstk raises various errors on bad files
        raise SegsemError(f"{path}: cannot read {fmt.upper()} file: {exc}") from None
    scale = lib.unit / lib.precision  # user units -> DBU
    grid_nm = lib.precision / _NM

    def polygons(dt: int):
        for top in lib.top_level():
            if isinstance(top, gdstk.Cell):
                yield from top.get_polygons(layer=layer, datatype=dt)

    def shapes(dt: int):
        """(provenance key or None, valid polygons in DBU) of each polygon on (layer, dt)."""
        for p in polygons(dt):
            try:
                parts = unkeyhole(np.rint(p.points * scale))
            except SegsemError:  # fewer than 3 distinct vertices on the grid
                continue
            if parts:
                yield _provenance(p), parts

    # pieces of one contour (split, or one polygon per hole-free part) share the provenance key
    groups: dict[tuple, list[Polygon]] = {}
    n_anon = 0
    for key, parts in shapes(datatype):
        if key is None:
            n_anon += 1
            key = (path.stem, f"{path.stem}:{n_anon}", "layout", "nan", "anonymous")
        groups.setdefault(key, []).extend(parts)
    if hole_datatype is not None:
        for key, parts in shapes(hole_datatype):
            hole = shapely.union_all(parts)
            if key is not None:
                targets = [key] if key in groups else []
            else:
                targets = [k for k, ps in groups.items() if any(q.intersects(hole) for q in ps)]
            for k in targets:
                groups[k] = polygon_parts(shapely.difference(shapely.union_all(groups[k]), hole, grid_size=1))
    out: list[ContourRecord] = []
    for key, parts in groups.items():
        merged = polygon_parts(shapely.union_all(parts, grid_size=1)) if len(parts) > 1 else parts
        for poly in merged:
            ext, holes = polygon_rings(poly)
            out.append(ContourRecord(image=key[0], feature_id=key[1], source=key[2], confidence=float(key[3]),
                                     xy_nm=from_dbu(ext, grid_nm),
                                     holes_nm=tuple(from_dbu(h, grid_nm) for h in holes)))
    return out


def _read_csv(path: Path) -> list[ContourRecord]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SegsemError(f"{path}: cannot read: {exc}") from None
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None or [h.strip() for h in header] != list(CSV_COLUMNS):
        raise SegsemError(f"{where(path, 1)}: header must be {','.join(CSV_COLUMNS)}")
    feats: dict[tuple[str, str], dict] = {}
    n_cols = len(CSV_COLUMNS)
    for line_no, row in enumerate(reader, start=2):
        if not row:
            continue
        if len(row) != n_cols:
            raise SegsemError(f"{where(path, line_no)}: expected {n_cols} fields, got {len(row)}")
        try:
            ring, idx, x, y = int(row[4]), int(row[5]), float(row[6]), float(row[7])
            ok = ring >= 0 and idx >= 0 and math.isfinite(x) and math.isfinite(y)
        except ValueError:
            ok = False
        if not ok:
            _csv_row_error(path, line_no, row)
        f = feats.get((row[0], row[1]))
        if f is None:
            try:
                conf = float(row[3])
            except ValueError:
                raise SegsemError(f"{where(path, line_no, 'confidence')}: {row[3]!r} is not a number") from None
            f = feats[(row[0], row[1])] = {"source": row[2], "confidence": conf, "rings": {}}
        f["rings"].setdefault(ring, []).append((idx, x, y))
    out: list[ContourRecord] = []
    for (image, fid), f in feats.items():
        rings = f["rings"]
        if 0 not in rings:
            raise SegsemError(f"{path}: feature '{fid}' of image '{image}' has no ring 0 (exterior)")
        arrays = {}
        for r, pts in rings.items():
            pts.sort()
            arrays[r] = np.array([(px, py) for _, px, py in pts], dtype=np.float64)
            if len(arrays[r]) < 3:
                raise SegsemError(f"{path}: feature '{fid}' of image '{image}' ring {r} has {len(pts)} point(s), "
                                  f"needs at least 3")
        out.append(ContourRecord(image=image, feature_id=fid, source=f["source"], confidence=f["confidence"],
                                 xy_nm=arrays[0], holes_nm=tuple(arrays[r] for r in sorted(arrays) if r != 0)))
    return out


def _csv_row_error(path: Path, line_no: int, row: list[str]):
    """Raise the SegsemError naming the first bad numeric field of a contour CSV row."""
    for col, kind in (("ring", int), ("point_index", int), ("x_nm", float), ("y_nm", float)):
        value = row[CSV_COLUMNS.index(col)]
        try:
            v = kind(value)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise SegsemError(f"{where(path, line_no, col)}: {value!r} is not {what}") from None
        if (kind is int and v < 0) or (kind is float and not math.isfinite(v)):
            what = "negative" if kind is int else "not finite"
            raise SegsemError(f"{where(path, line_no, col)}: {value!r} is {what}")
    raise AssertionError("unreachable")  # pragma: no cover
