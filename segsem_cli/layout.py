"""Layout input: GDS and OASIS through gdstk, flattened, in nm, clipped with shapely.

Polygons of one cell and one layer/datatype are read once, flattened through
references and repetitions, converted to nm and indexed with an STR-tree so
that each image asks only for the polygons in its field of view.

Feature ids are ``p<index>`` with ``index`` the polygon's position in
:attr:`Layout.polygons` (sorted by lower-left corner, so they are stable for a
given file): every output row carries this design reference.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import shapely
from shapely.geometry import Polygon, box

from .errors import SegsemError
from .transform import PixelTransform
from .types import Feature


def parse_layer(text: str, *, what: str = "--layer") -> tuple[int, int]:
    """Parse ``"L/D"`` (or ``"L"`` meaning datatype 0) into ``(layer, datatype)``."""
    s = str(text).strip()
    parts = s.split("/")
    try:
        if len(parts) == 1:
            layer, dt = int(parts[0]), 0
        elif len(parts) == 2:
            layer, dt = int(parts[0]), int(parts[1])
        else:
            raise ValueError
    except ValueError:
        raise SegsemError(f"{what}: '{text}' is not a layer/datatype like 1/0") from None
    if layer < 0 or dt < 0:
        raise SegsemError(f"{what}: '{text}' has a negative layer or datatype")
    return layer, dt


@dataclass
class Layout:
    """Polygons of one cell and layer in nm, with a spatial index."""

    path: Path
    cell_name: str
    layer: tuple[int, int]
    polygons: list[Polygon]
    _tree: shapely.STRtree | None = field(default=None, repr=False)

    def __post_init__(self):
        self._tree = shapely.STRtree(self.polygons)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """``(xmin, ymin, xmax, ymax)`` of all polygons in nm."""
        b = shapely.total_bounds(self.polygons)
        return (float(b[0]), float(b[1]), float(b[2]), float(b[3]))

    def query(self, bbox_nm: tuple[float, float, float, float]) -> list[int]:
        """Indices of the polygons that intersect the box ``(xmin, ymin, xmax, ymax)`` nm."""
        idx = self._tree.query(box(*bbox_nm), predicate="intersects")
        return sorted(int(i) for i in idx)

    def clip(self, bbox_nm: tuple[float, float, float, float]) -> list[tuple[int, Polygon, bool]]:
        """Polygons clipped to the box: ``(index, clipped polygon, was_clipped)``.

        A polygon that the box cuts into several parts (a comb whose spine lies
        outside the field of view) gives one entry per part, largest first.
        """
        win = box(*bbox_nm)
        out = []
        for i in self.query(bbox_nm):
            poly = self.polygons[i]
            if win.contains(poly):
                out.append((i, poly, False))
                continue
            part = poly.intersection(win)
            if part.is_empty:
                continue
            geoms = [g for g in getattr(part, "geoms", [part]) if isinstance(g, Polygon) and g.area > 0]
            if not geoms:
                continue
            out.extend((i, g, True) for g in sorted(geoms, key=lambda g: -g.area))
        return out


BORDER_MARGIN_PX = 6.0  # design polygons this close outside the field of view are border candidates
BORDER_SEED_PX = 4.0  # depth of a candidate's seed strip inside the image
BORDER_KEEPOUT_PX = 2.0  # the seed strip keeps this far from every other design polygon


def border_candidates(layout: Layout, transform: PixelTransform, *, margin_px: float = BORDER_MARGIN_PX,
                      seed_px: float = BORDER_SEED_PX) -> list[Feature]:
    """Design polygons just outside the field of view whose print may still reach into it.

    A printed shape is not its design polygon: bias, line-edge roughness,
    corner rounding and the residual stage error move its edges by a few
    pixels, so a polygon ending up to ``margin_px`` outside the image can
    print a sliver along the image border. :func:`features_in_view` does not
    return such polygons (nothing of the design is in view); this function
    does, as seeds for the extraction.

    Each candidate is a :class:`Feature` ``p<index>`` (the design reference)
    whose polygon is a *seed strip*: the design polygon grown by its gap to
    the field of view plus ``seed_px``, clipped to the field of view (so the
    strip reaches ``seed_px`` into the image, within the fallbacks' edge
    search of a print that protrudes up to about ``margin_px + seed_px``),
    minus every other design polygon grown by ``BORDER_KEEPOUT_PX`` (a
    neighbour's print is never taken for the candidate's). ``clipped`` is
    True. A candidate is kept in the output only when its extraction finds a
    clean edge (see :func:`segsem_cli.pipeline.process_image`); otherwise it
    is dropped without a report, since nothing of it was expected in view.
    """
    if not margin_px > 0:
        return []
    px = float(transform.pixel_nm)
    fov_bb = transform.field_of_view_nm()
    h, w = transform.shape
    fov = Polygon(transform.to_layout(np.array([[0.0, 0.0], [w, 0.0], [w, h], [0.0, h]])))
    near = layout.query(transform.field_of_view_nm(margin_px + BORDER_KEEPOUT_PX))
    inside = set(layout.query(fov_bb))
    keep = BORDER_KEEPOUT_PX * px
    out = []
    for i in near:
        if i in inside:
            continue
        poly = layout.polygons[i]
        gap = float(poly.distance(fov))
        if gap > margin_px * px:
            continue
        seed = poly.buffer(gap + seed_px * px, join_style="mitre").intersection(fov)
        if seed.is_empty:
            continue
        x0, y0, x1, y1 = seed.bounds
        others = [layout.polygons[j].buffer(keep, join_style="mitre")
                  for j in layout.query((x0 - keep, y0 - keep, x1 + keep, y1 + keep)) if j != i]
        others = [o for o in others if o.intersects(seed)]
        if others:
            seed = seed.difference(shapely.union_all(others))
        parts = [g for g in getattr(seed, "geoms", [seed]) if isinstance(g, Polygon) and g.area >= 2.0 * px * px]
        if not parts:
            continue
        part = max(parts, key=lambda g: g.area)
        ext = np.asarray(part.exterior.coords, dtype=float)[:-1]
        out.append(Feature(f"p{i}", ext, transform.to_pixel(ext), True))
    return out


def _read_library(path: Path):
    import gdstk

    suffix = path.suffix.lower()
    try:
        if suffix in (".gds", ".gds2", ".gdsii"):
            return gdstk.read_gds(str(path))
        if suffix in (".oas", ".oasis"):
            return gdstk.read_oas(str(path))
    except Exception as exc:  # noqa: BLE001 - gdstk raises RuntimeError and friends
        raise SegsemError(f"{path}: unreadable layout ({exc})") from None
    raise SegsemError(f"{path}: unsupported layout format '{path.suffix}' (use .gds or .oas)")


def load_layout(path: str | Path, *, cell: str | None = None, layer: tuple[int, int] = (1, 0)) -> Layout:
    """Read the polygons of ``cell`` on ``layer`` from a GDS or OASIS file, in nm.

    Parameters
    ----------
    path : ``.gds`` or ``.oas`` file.
    cell : cell name; default the single top cell (an error when there are several).
    layer : ``(layer, datatype)``, default ``(1, 0)``.
    """
    path = Path(path)
    if not path.is_file():
        raise SegsemError(f"{path}: layout file not found")
    lib = _read_library(path)
    cells = {c.name: c for c in lib.cells}
    if cell is None:
        tops = lib.top_level()
        if not tops:
            raise SegsemError(f"{path}: layout has no cells")
        if len(tops) > 1:
            names = ", ".join(sorted(c.name for c in tops))
            raise SegsemError(f"{path}: several top cells ({names}); choose one with --cell")
        top = tops[0]
    else:
        if cell not in cells:
            known = ", ".join(sorted(cells)[:10])
            raise SegsemError(f"{path}: no cell '{cell}' (cells: {known})")
        top = cells[cell]
    scale = lib.unit / 1e-9  # user units -> nm
    raw = top.get_polygons(apply_repetitions=True, include_paths=True, depth=None, layer=layer[0], datatype=layer[1])
    polys: list[Polygon] = []
    for p in raw:
        pts = np.asarray(p.points, dtype=float) * scale
        if len(pts) < 3:
            continue
        g = Polygon(pts)
        if not g.is_valid:
            g = shapely.make_valid(g)
            parts = [q for q in getattr(g, "geoms", [g]) if isinstance(q, Polygon) and q.area > 0]
            polys.extend(parts)
        elif g.area > 0:
            polys.append(g)
    if not polys:
        raise SegsemError(f"{path}: cell '{top.name}' has no polygons on layer {layer[0]}/{layer[1]}")
    polys.sort(key=lambda g: (round(g.bounds[0], 3), round(g.bounds[1], 3), round(g.area, 3)))
    return Layout(path=path, cell_name=top.name, layer=layer, polygons=polys)


def features_in_view(layout: Layout, transform: PixelTransform, *, margin_px: float = 0.0) -> list[Feature]:
    """The layout features in an image's field of view, as :class:`Feature` objects.

    The field of view is that of ``transform`` (use the aligned transform),
    grown by ``margin_px`` on every side. Polygons are clipped to it; their
    pixel polygons are mapped with ``transform.to_pixel``.

    Feature ids name the design polygon: ``p<index>`` (its index in the
    layer). A polygon that the field of view cuts into several parts gives
    one feature per part: ``p<index>`` for the largest, ``p<index>.1``,
    ``p<index>.2``, ... for the others by decreasing area, so every printed
    part in view is extracted and still carries its design reference.
    """
    fov = transform.field_of_view_nm(margin_px)
    out = []
    part: dict[int, int] = {}
    for i, poly, clipped in layout.clip(fov):
        k = part.get(i, 0)
        part[i] = k + 1
        ext = np.asarray(poly.exterior.coords, dtype=float)[:-1]
        out.append(Feature(f"p{i}" if k == 0 else f"p{i}.{k}", ext, transform.to_pixel(ext), clipped))
    return out


def context_pixels(layout: Layout, transform: PixelTransform, features: Sequence[Feature], *,
                   margin_px: float | None = None) -> list[np.ndarray]:
    """Each feature's design polygon clipped to the field of view grown by ``margin_px``, in pixels.

    :func:`features_in_view` clips the design to the image frame, so a line
    cut by the frame has sides that end there, shorter than the design's.
    Whoever judges the design's geometry (is this side long, or a line end?
    how far is a point from the side's corner?) needs the sides as drawn;
    this gives them, up to ``margin_px`` beyond the frame (default: half the
    image's larger side, at least 64 px). A feature that is one of several
    parts of its polygon in either clip (``p<i>.k``) keeps its frame-clipped
    polygon, since the parts do not map one to one.
    """
    in_view = {f.feature_id for f in features}
    todo = [k for k, f in enumerate(features)  # p<i> (features_in_view's names), one part in view
            if f.clipped and re.fullmatch(r"p\d+", f.feature_id) and f"{f.feature_id}.1" not in in_view
            and int(f.feature_id[1:]) < len(layout.polygons)]
    out = [f.pixels for f in features]
    if not todo:
        return out
    if margin_px is None:
        margin_px = max(64.0, 0.5 * max(transform.shape))
    win = box(*transform.field_of_view_nm(margin_px))
    polys = np.array([layout.polygons[int(features[k].feature_id[1:])] for k in todo])
    parts = np.where(shapely.contains(win, polys), polys, shapely.intersection(polys, win))  # as Layout.clip
    for k, part in zip(todo, parts):
        if isinstance(part, Polygon) and part.area > 0:  # still one piece (else: keep the frame clip)
            out[k] = transform.to_pixel(np.asarray(part.exterior.coords, dtype=float)[:-1])
    return out
