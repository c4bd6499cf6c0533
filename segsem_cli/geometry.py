"""Polygon helpers for layout-space contours: rings, repair, grid snapping, splitting, keyholes.

Conventions
-----------
* A *ring* is an ``(N, 2)`` float array of ``(x, y)`` vertices, closed
  implicitly (the last vertex is not a repeat of the first), ``N >= 3``.
  Layout coordinates are nm with ``y`` up (see :mod:`segsem_cli.transform`).
* Orientation follows the mathematical convention with ``y`` up: an exterior
  ring is counter-clockwise (positive signed area), a hole is clockwise.
* *Database units* (DBU) are integer multiples of the grid ``grid_nm``; a
  coordinate ``x`` nm is stored as ``round(x / grid_nm)``. The functions that
  work "in DBU" expect geometry already scaled by ``1 / grid_nm`` (see
  :func:`to_dbu_geometry`), so that the grid is the integer lattice.
* GDSII limits a polygon to 8,190 points including the repeated first point,
  i.e. 8,189 distinct vertices (:data:`GDS_MAX_VERTICES`); readers that take
  the record length as a signed 16-bit number (KLayout warns) need at most
  4,094 (:data:`SAFE_MAX_VERTICES`). GDSII also has no holes.
  :func:`split_polygon` and :func:`keyhole` deal with both without losing area.

All functions are plain functions over numpy arrays and shapely geometries.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import shapely
from shapely.geometry import GeometryCollection, LineString, MultiPolygon, Polygon, box
from shapely.geometry.base import BaseGeometry
from shapely.prepared import prep

from .errors import SegsemError

#: Most distinct vertices segsem puts in one GDSII BOUNDARY. The XY record of a
#: boundary repeats the first point at the end; 8,190 points in all is the
#: largest count the extended GDSII specification (and gdstk, without warning)
#: accepts, so 8,189 distinct vertices.
GDS_MAX_VERTICES = 8189
#: Most distinct vertices whose XY record (4 + 8 * (n + 1) bytes) stays below
#: 32,768 bytes, the limit of readers that take record lengths as signed 16-bit
#: numbers; KLayout reads longer records but warns. segsem's default.
SAFE_MAX_VERTICES = 4094


class GeometryWarning(UserWarning):
    """A contour was repaired or dropped while converting it to layout polygons."""


__all__ = [
    "GDS_MAX_VERTICES",
    "SAFE_MAX_VERTICES",
    "GeometryWarning",
    "as_ring",
    "signed_area",
    "orient_ring",
    "to_polygon",
    "polygon_parts",
    "repair",
    "polygon_rings",
    "check_grid_nm",
    "snap_to_grid",
    "to_dbu_geometry",
    "from_dbu",
    "vertex_count",
    "split_polygon",
    "keyhole",
    "unkeyhole",
    "keyhole_pieces",
]


# --------------------------------------------------------------------------- rings

def as_ring(xy, *, name: str = "contour") -> np.ndarray:
    """Validate and clean one ring.

    Parameters
    ----------
    xy : array_like, shape (N, 2)
        Vertices ``(x, y)`` (or ``(u, v)``); a repeated closing vertex and
        consecutive duplicate vertices are removed.
    name : str
        What the ring is, for the error message (e.g. ``"img3:7 hole 1"``).

    Returns
    -------
    numpy.ndarray
        ``(M, 2)`` float64 array, ``M >= 3``, closed implicitly.

    Raises
    ------
    SegsemError
        If the array is not ``(N, 2)``, holds non-finite values, or has fewer
        than 3 distinct vertices.
    """
    a = np.asarray(xy, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != 2:
        raise SegsemError(f"{name}: expected an (N, 2) array of vertices, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise SegsemError(f"{name}: vertices contain NaN or infinite values")
    if len(a) > 1:
        keep = np.ones(len(a), dtype=bool)
        keep[1:] = np.any(a[1:] != a[:-1], axis=1)
        a = a[keep]
    if len(a) > 1 and np.array_equal(a[0], a[-1]):
        a = a[:-1]
    if len(a) < 3:
        raise SegsemError(f"{name}: a ring needs at least 3 distinct vertices, got {len(a)}")
    return a


def signed_area(xy) -> float:
    """Signed area of a ring by the shoelace formula (positive when counter-clockwise, ``y`` up).

    Parameters
    ----------
    xy : array_like, shape (N, 2)
        Ring vertices, closed implicitly (a repeated closing vertex adds nothing).
    """
    a = np.asarray(xy, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != 2:
        raise SegsemError(f"ring: expected an (N, 2) array of vertices, got shape {a.shape}")
    if len(a) < 3:
        return 0.0
    x, y = a[:, 0], a[:, 1]
    # Centre first: keeps the products small for rings far from the origin.
    x = x - x.mean()
    y = y - y.mean()
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]) + x[-1] * y[0] - x[0] * y[-1])


def orient_ring(xy, *, ccw: bool = True) -> np.ndarray:
    """Return the ring with the requested orientation (reversed if needed).

    Parameters
    ----------
    xy : array_like, shape (N, 2)
        Ring vertices, closed implicitly.
    ccw : bool
        True for counter-clockwise (exterior, ``y`` up), False for clockwise (hole).
        A ring with zero signed area (e.g. a symmetric bow-tie) is left as is.
    """
    a = np.asarray(xy, dtype=np.float64)
    area = signed_area(a)
    if area != 0 and (area > 0) != ccw:
        a = a[::-1]
    return np.ascontiguousarray(a)


# --------------------------------------------------------------------- shapely

def to_polygon(exterior, holes: Sequence = (), *, name: str = "contour") -> Polygon:
    """Build a shapely polygon from ring arrays (no repair; see :func:`repair`).

    Parameters
    ----------
    exterior : array_like, shape (N, 2)
        Outer ring.
    holes : sequence of array_like
        Interior rings.
    name : str
        Used in error messages.
    """
    ext = as_ring(exterior, name=name)
    hs = [as_ring(h, name=f"{name} hole {i + 1}") for i, h in enumerate(holes)]
    return Polygon(ext, hs)


def polygon_parts(geom: BaseGeometry | None) -> list[Polygon]:
    """The non-empty polygons in ``geom`` (Polygon, MultiPolygon or any collection); lines and points are dropped."""
    if geom is None or geom.is_empty:
        return []
    if isinstance(geom, Polygon):
        return [geom] if geom.area > 0 else []
    if isinstance(geom, (MultiPolygon, GeometryCollection)):
        out: list[Polygon] = []
        for g in geom.geoms:
            out.extend(polygon_parts(g))
        return out
    return []


def repair(geom: BaseGeometry) -> list[Polygon]:
    """Make a polygonal geometry valid and return its polygons.

    Self-intersections are resolved with :func:`shapely.make_valid` (a bow-tie
    becomes its two triangles, a hole outside its exterior is dropped, zero-width
    bridges become proper holes); only polygonal parts with positive area are
    kept. A valid polygon comes back unchanged.

    Parameters
    ----------
    geom : shapely geometry
        Polygon, MultiPolygon or collection.

    Returns
    -------
    list of shapely.Polygon
        Valid polygons (possibly empty when nothing with area is left).
    """
    if geom is None or geom.is_empty:
        return []
    if not geom.is_valid:
        geom = shapely.make_valid(geom)
    parts = polygon_parts(geom)
    if len(parts) > 1 and not isinstance(geom, MultiPolygon):
        # a collection from make_valid may hold overlapping pieces: merge them
        parts = polygon_parts(shapely.unary_union(parts))
    return parts


def polygon_rings(poly: Polygon) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """Rings of a polygon as arrays: exterior counter-clockwise, holes clockwise, no closing vertex.

    Parameters
    ----------
    poly : shapely.Polygon
        A non-empty polygon.

    Returns
    -------
    (exterior, holes)
        ``exterior`` is ``(N, 2)``; ``holes`` a tuple of ``(M_i, 2)`` arrays.
    """
    if not isinstance(poly, Polygon) or poly.is_empty:
        raise SegsemError(f"polygon_rings: expected a non-empty Polygon, got {type(poly).__name__}")
    ext = orient_ring(np.asarray(poly.exterior.coords)[:-1], ccw=True)
    holes = tuple(orient_ring(np.asarray(r.coords)[:-1], ccw=False) for r in poly.interiors)
    return ext, holes


# ------------------------------------------------------------------------ grid

def check_grid_nm(grid_nm) -> float:
    """Validate a database grid in nm (a positive finite number) and return it as float.

    Raises
    ------
    SegsemError
        Naming ``grid_nm`` and the bad value.
    """
    try:
        g = float(grid_nm)
    except (TypeError, ValueError):
        raise SegsemError(f"grid_nm: {grid_nm!r} is not a number") from None
    if not (g > 0 and math.isfinite(g)):
        raise SegsemError(f"grid_nm: must be a positive number of nm, got {grid_nm!r}")
    return g


def to_dbu_geometry(geom: BaseGeometry, grid_nm: float) -> BaseGeometry:
    """Scale a geometry from nm to database units (``x / grid_nm``) and snap it to the integer lattice.

    Snapping uses :func:`shapely.set_precision` with grid 1, which rounds every
    vertex to the nearest integer and keeps the result valid (a sliver
    narrower than the grid collapses and is removed).

    Parameters
    ----------
    geom : shapely geometry
        Geometry in layout nm.
    grid_nm : float
        Database unit in nm (e.g. 0.1).

    Returns
    -------
    shapely geometry
        Geometry whose coordinates are integers (stored as float) in DBU.
    """
    g = check_grid_nm(grid_nm)
    scaled = shapely.transform(geom, lambda c: c / g)
    return shapely.set_precision(scaled, 1.0)


def snap_to_grid(xy, grid_nm: float) -> np.ndarray:
    """Round coordinates to the database grid and return them as integer DBU.

    Parameters
    ----------
    xy : array_like, shape (N, 2)
        Coordinates in nm.
    grid_nm : float
        Database unit in nm; e.g. with 0.1, ``10.04`` becomes ``100`` (10.0 nm).

    Returns
    -------
    numpy.ndarray of int64
        ``round(xy / grid_nm)`` (round half to even).
    """
    g = check_grid_nm(grid_nm)
    a = np.asarray(xy, dtype=np.float64)
    if not np.isfinite(a).all():
        raise SegsemError("snap_to_grid: coordinates contain NaN or infinite values")
    return np.rint(a / g).astype(np.int64)


def from_dbu(dbu, grid_nm: float) -> np.ndarray:
    """Convert integer database units back to nm (``dbu * grid_nm``, without float noise when ``1/grid_nm`` is whole).

    Parameters
    ----------
    dbu : array_like
        Integer (or integer-valued) coordinates in DBU.
    grid_nm : float
        Database unit in nm.
    """
    g = check_grid_nm(grid_nm)
    a = np.asarray(dbu, dtype=np.float64)
    inv = 1.0 / g
    if abs(inv - round(inv)) < 1e-9 * inv:
        return a / round(inv)  # 3 / 10 == 0.3 exactly-rounded, whereas 3 * 0.1 == 0.30000000000000004
    return a * g


# ------------------------------------------------------------ vertex limits

def vertex_count(poly: Polygon, *, keyhole: bool = True) -> int:
    """Distinct vertices the polygon needs in a GDSII/OASIS file.

    Parameters
    ----------
    poly : shapely.Polygon
    keyhole : bool
        True: holes are joined to the exterior by bridges (:func:`keyhole`),
        each adding 2 vertices; the count covers the whole keyholed ring.
        False: only the exterior ring is counted.
    """
    n = len(poly.exterior.coords) - 1
    if keyhole:
        n += sum(len(r.coords) - 1 + 2 for r in poly.interiors)
    return n


def split_polygon(poly: Polygon, max_vertices: int = SAFE_MAX_VERTICES, *, keyhole: bool = True,
                  grid_size: float | None = 1.0) -> list[Polygon]:
    """Cut a polygon into pieces of at most ``max_vertices`` vertices, never dropping area.

    The polygon is bisected recursively by an axis-parallel line (across its
    longer side, at the median vertex coordinate) until every piece fits. The
    pieces tile the original: their union equals it and they do not overlap
    (up to the snapping of the new vertices on the cut lines to ``grid_size``).

    Parameters
    ----------
    poly : shapely.Polygon
        A valid polygon (in DBU when ``grid_size`` is 1).
    max_vertices : int
        Limit per piece, counted with :func:`vertex_count` (``keyhole`` as given); at least 8.
    keyhole : bool
        Count hole vertices and bridges as :func:`keyhole` will emit them.
    grid_size : float or None
        Snap the pieces to this grid (the cut points fall between grid points);
        None keeps exact floating-point cuts.

    Returns
    -------
    list of shapely.Polygon
        One element (the input) when it already fits.
    """
    if not isinstance(poly, Polygon):
        raise SegsemError(f"split_polygon: expected a Polygon, got {type(poly).__name__}")
    if int(max_vertices) != max_vertices or max_vertices < 8:
        raise SegsemError(f"split_polygon: max_vertices must be an integer >= 8, got {max_vertices!r}")
    out: list[Polygon] = []
    stack: list[tuple[Polygon, int]] = [(poly, 0)]
    while stack:
        p, depth = stack.pop()
        if vertex_count(p, keyhole=keyhole) <= max_vertices:
            out.append(p)
            continue
        if depth > 64:  # cannot happen for sane input; refuse to loop forever
            raise SegsemError(f"split_polygon: could not split a {vertex_count(p, keyhole=keyhole)}-vertex polygon below {max_vertices}")
        for piece in _bisect(p, grid_size, use_median=depth < 32):
            stack.append((piece, depth + 1))
    return out


def _bisect(p: Polygon, grid_size: float | None, *, use_median: bool) -> list[Polygon]:
    minx, miny, maxx, maxy = p.bounds
    coords = [np.asarray(p.exterior.coords)[:-1]] + [np.asarray(r.coords)[:-1] for r in p.interiors]
    pts = np.concatenate(coords)
    axis = 0 if (maxx - minx) >= (maxy - miny) else 1
    lo, hi = (minx, maxx) if axis == 0 else (miny, maxy)
    cut = float(np.median(pts[:, axis])) if use_median else 0.5 * (lo + hi)
    if grid_size:
        cut = round(cut / grid_size) * grid_size
    if not lo < cut < hi:
        cut = 0.5 * (lo + hi)
    pad = max(maxx - minx, maxy - miny, 1.0)
    if axis == 0:
        half = box(minx - pad, miny - pad, cut, maxy + pad)
    else:
        half = box(minx - pad, miny - pad, maxx + pad, cut)
    kw = {"grid_size": grid_size} if grid_size else {}
    a = shapely.intersection(p, half, **kw)
    b = shapely.difference(p, half, **kw)
    return polygon_parts(a) + polygon_parts(b)


# ------------------------------------------------------------------ keyholes

def keyhole(poly: Polygon) -> np.ndarray:
    """Join the holes of a polygon to its exterior by zero-width bridges ("keyhole" cut).

    Holes are taken from the right-most one leftwards; each is connected from
    its right-most vertex to the nearest vertex of the ring built so far that
    it can see (the bridge stays inside the polygon and crosses no other
    bridge), and the ring walks out along the bridge, round the hole
    (clockwise) and back. The ring has the same area as the polygon (shoelace
    formula) and ``vertex_count(poly)`` vertices; the bridge edges coincide
    pairwise, so readers that fill polygons by the non-zero or even-odd rule
    fill exactly the polygon with its holes.

    Parameters
    ----------
    poly : shapely.Polygon
        A valid polygon; for file output its coordinates should already be on
        the database grid so the bridges are exact.

    Returns
    -------
    numpy.ndarray
        ``(N, 2)`` counter-clockwise ring, closed implicitly.

    Raises
    ------
    SegsemError
        If no bridge can be found for a hole (not expected for valid input);
        :func:`keyhole_pieces` falls back to cutting the polygon instead.
    """
    ext, holes = polygon_rings(poly)
    if not holes:
        return ext
    prepared = prep(poly)
    ring = ext
    bridges: list[LineString] = []
    for h in sorted(holes, key=lambda r: -float(r[:, 0].max())):
        i = int(np.lexsort((h[:, 1], h[:, 0]))[-1])  # right-most, then top-most vertex
        H = h[i]
        j = _find_bridge(ring, H, poly, bridges, prepared)
        if j is None:
            raise SegsemError("keyhole: no bridge found for a hole (polygon may be invalid)")
        O = ring[j]
        hole_walk = np.roll(h, -i, axis=0)  # starts at H, clockwise
        ring = np.concatenate([ring[: j + 1], hole_walk, H[None], O[None], ring[j + 1:]])
        bridges.append(LineString([H, O]))
    return ring


def _cross(o, a, b) -> float:
    return float((a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0]))


def _locally_inside(ring: np.ndarray, j: int, p) -> bool:
    """Does the direction from ring[j] towards p start inside the (counter-clockwise) ring's interior angle at j?"""
    n = len(ring)
    prv, cur, nxt = ring[(j - 1) % n], ring[j], ring[(j + 1) % n]
    if _cross(prv, cur, nxt) >= 0:  # convex (or straight) corner
        return _cross(prv, cur, p) >= 0 and _cross(cur, nxt, p) >= 0
    return _cross(prv, cur, p) >= 0 or _cross(cur, nxt, p) >= 0  # reflex corner


def _find_bridge(ring: np.ndarray, H: np.ndarray, poly: Polygon, bridges: list[LineString], prepared) -> int | None:
    d2 = ((ring - H) ** 2).sum(axis=1)
    order = np.argsort(d2, kind="stable")
    fallback = None
    for j in order:
        j = int(j)
        O = ring[j]
        if d2[j] == 0 or not _locally_inside(ring, j, H):
            continue
        seg = LineString([H, O])
        if any(_bad_crossing(seg, b) for b in bridges):
            continue
        # strict: the bridge's interior lies in the polygon's interior (touches no boundary)
        if poly.relate_pattern(seg, "T**F**F**"):
            return j
        if fallback is None and prepared.covers(seg):
            fallback = j  # grazes a boundary vertex: still a weakly simple ring
    return fallback


def _bad_crossing(seg: LineString, other: LineString) -> bool:
    """True unless the two bridges are disjoint or meet only at a shared end point."""
    inter = seg.intersection(other)
    if inter.is_empty:
        return False
    if inter.geom_type != "Point":
        return True
    p = (inter.x, inter.y)
    return p not in {tuple(c) for c in seg.coords} or p not in {tuple(c) for c in other.coords}


def unkeyhole(ring) -> list[Polygon]:
    """Recover polygons with holes from a keyholed ring (the inverse of :func:`keyhole`).

    Parameters
    ----------
    ring : array_like, shape (N, 2)
        A ring that may contain zero-width bridges.

    Returns
    -------
    list of shapely.Polygon
        Valid polygons; a bridged hole comes back as a proper interior ring.
    """
    a = as_ring(ring)
    return repair(Polygon(a))


def keyhole_pieces(poly: Polygon, *, grid_size: float = 1.0) -> list[np.ndarray]:
    """Keyhole a polygon; if a bridge cannot be placed, cut the polygon through a hole and retry.

    Parameters
    ----------
    poly : shapely.Polygon
        A valid polygon, normally in DBU.
    grid_size : float
        Grid the cut pieces are snapped to (1 for DBU).

    Returns
    -------
    list of numpy.ndarray
        Rings without holes (counter-clockwise) whose total area equals the polygon's.
    """
    try:
        return [keyhole(poly)]
    except SegsemError:
        pass
    minx, miny, maxx, maxy = poly.interiors[0].bounds
    cut = round(0.5 * (minx + maxx) / grid_size) * grid_size
    pminx, pminy, pmaxx, pmaxy = poly.bounds
    half = box(pminx - 1, pminy - 1, cut, pmaxy + 1)
    pieces = polygon_parts(shapely.intersection(poly, half, grid_size=grid_size))
    pieces += polygon_parts(shapely.difference(poly, half, grid_size=grid_size))
    return [ring for piece in pieces for ring in keyhole_pieces(piece, grid_size=grid_size)]
