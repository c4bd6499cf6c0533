"""Built-in exporters: ``gds``, ``oasis`` and ``csv``.

Registered through the ``segsem`` entry point ``exporters`` like any
third-party plugin. The file formats (layers, properties, hole handling,
vertex limits, CSV columns) are described in :mod:`segsem_cli.contour_io`,
which also reads them back (:func:`segsem_cli.contour_io.read_contours`).

Options (``export(records, path, **options)``; values may be strings, as they
come from the command line; unknown options are ignored):

gds / oasis
    ``layer`` (100), ``datatype`` (0), ``grid_nm`` (0.1), ``cell`` ("SEGSEM"),
    ``per_image_cells`` (False), ``holes`` ("keyhole" or "datatype"),
    ``hole_datatype`` (datatype + 1), ``max_vertices`` (4094, at most 8189).
csv
    ``decimals`` (4).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from segsem_cli import hookimpl
from segsem_cli.contour_io import write_contour_csv, write_layout
from segsem_cli.errors import SegsemError
from segsem_cli.geometry import SAFE_MAX_VERTICES
from segsem_cli.types import ContourRecord

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _as_int(options: dict, name: str, default: int | None) -> int | None:
    v = options.get(name, default)
    if v is None or isinstance(v, bool):
        return v if v is None else _bad(name, v, "an integer")
    if isinstance(v, str):
        try:
            return int(v.strip())
        except ValueError:
            _bad(name, v, "an integer")
    return v


def _as_float(options: dict, name: str, default: float) -> float:
    v = options.get(name, default)
    try:
        return float(v)
    except (TypeError, ValueError):
        _bad(name, v, "a number")


def _as_bool(options: dict, name: str, default: bool) -> bool:
    v = options.get(name, default)
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in _TRUE:
        return True
    if s in _FALSE:
        return False
    _bad(name, v, "true or false")


def _bad(name: str, value: Any, what: str):
    raise SegsemError(f"export option '{name}': expected {what}, got {value!r}")


class LayoutExporter:
    """GDSII or OASIS writer via gdstk (see :func:`segsem_cli.contour_io.write_layout`)."""

    def __init__(self, name: str, suffix: str, fmt: str, description: str):
        self.name = name
        self.suffix = suffix
        self.fmt = fmt
        self.description = description

    def export(self, records: Sequence[ContourRecord], path: Path, **options: Any) -> list[Path]:
        written = write_layout(
            records, path, fmt=self.fmt,
            layer=_as_int(options, "layer", 100),
            datatype=_as_int(options, "datatype", 0),
            grid_nm=_as_float(options, "grid_nm", 0.1),
            cell=str(options.get("cell", "SEGSEM")),
            per_image_cells=_as_bool(options, "per_image_cells", False),
            holes=str(options.get("holes", "keyhole")),
            hole_datatype=_as_int(options, "hole_datatype", None),
            max_vertices=_as_int(options, "max_vertices", SAFE_MAX_VERTICES),
        )
        return [written]


class CsvExporter:
    """Contour vertices as CSV (see :func:`segsem_cli.contour_io.contour_csv_text`)."""

    name = "csv"
    suffix = ".csv"
    description = "contour vertices per feature: image,feature_id,source,confidence,ring,point_index,x_nm,y_nm"

    def export(self, records: Sequence[ContourRecord], path: Path, **options: Any) -> list[Path]:
        return [write_contour_csv(records, path, decimals=_as_int(options, "decimals", 4))]


GDS = LayoutExporter("gds", ".gds", "gds", "GDSII polygons (gdstk), provenance as GDS properties 1-4")
OASIS = LayoutExporter("oasis", ".oas", "oasis", "OASIS polygons (gdstk), provenance as named properties")
CSV = CsvExporter()


@hookimpl
def register_exporters(register):
    """Register the built-in ``gds``, ``oasis`` and ``csv`` exporters."""
    for exporter in (GDS, OASIS, CSV):
        register(exporter)
