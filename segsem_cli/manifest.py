"""The site manifest: CSV with header ``image,x_nm,y_nm,pixel_nm`` (+ optional ``label``).

* ``image``: path of the SEM image, relative to the manifest's folder.
* ``x_nm, y_nm``: nominal layout coordinate of the image centre (nm).
* ``pixel_nm``: pixel size in nm; may be empty when the TIFF carries it.
* ``label`` (optional): path of an instance label mask (training, evaluation).
* Any other columns are kept in :attr:`ManifestRow.extra` and passed through.

Row numbers in errors count the header as row 1 (as a spreadsheet shows them).
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import SegsemError, where

REQUIRED = ("image", "x_nm", "y_nm", "pixel_nm")


@dataclass(frozen=True)
class ManifestRow:
    image: Path
    x_nm: float
    y_nm: float
    pixel_nm: float | None
    label: Path | None = None
    extra: dict[str, str] = field(default_factory=dict)
    row: int = 0

    @property
    def name(self) -> str:
        return self.image.stem


def parse_number(text: str | None, path, row: int, fld: str, *, optional: bool = False) -> float | None:
    """A finite float from a CSV cell, or a SegsemError naming file, row and field (None for an optional empty cell)."""
    s = (text or "").strip()
    if not s:
        if optional:
            return None
        raise SegsemError(f"{where(path, row, fld)}: empty value (a number is required)")
    try:
        v = float(s)
    except ValueError:
        raise SegsemError(f"{where(path, row, fld)}: '{s}' is not a number") from None
    if not math.isfinite(v):
        raise SegsemError(f"{where(path, row, fld)}: '{s}' is not a finite number")
    return v


def read_manifest(path: str | Path, *, require_label: bool = False) -> list[ManifestRow]:
    """Read and validate a manifest. Paths in it are resolved relative to its folder."""
    path = Path(path)
    if not path.is_file():
        raise SegsemError(f"{path}: manifest not found")
    base = path.parent
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        if not header:
            raise SegsemError(f"{path}: empty manifest (expected header {','.join(REQUIRED)})")
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise SegsemError(f"{path} row 1: missing column '{missing[0]}' (header must include {','.join(REQUIRED)})")
        if require_label and "label" not in header:
            raise SegsemError(f"{path} row 1: missing column 'label' (training needs instance label masks)")
        rows: list[ManifestRow] = []
        seen: dict[str, int] = {}
        for i, raw in enumerate(reader, start=2):
            rec = {(k or "").strip(): (v or "").strip() if isinstance(v, str) else "" for k, v in raw.items()}
            if not any(rec.values()):
                continue
            img = rec.get("image", "")
            if not img:
                raise SegsemError(f"{where(path, i, 'image')}: empty value (an image path is required)")
            x = parse_number(rec.get("x_nm", ""), path, i, "x_nm")
            y = parse_number(rec.get("y_nm", ""), path, i, "y_nm")
            p = parse_number(rec.get("pixel_nm", ""), path, i, "pixel_nm", optional=True)
            if p is not None and p <= 0:
                raise SegsemError(f"{where(path, i, 'pixel_nm')}: pixel size must be positive, got {p}")
            label = None
            if "label" in header:
                lab = rec.get("label", "")
                if lab:
                    label = base / lab
                elif require_label:
                    raise SegsemError(f"{where(path, i, 'label')}: empty value (training needs a label mask per image)")
            image_path = base / img
            key = str(image_path.resolve())
            if key in seen:
                raise SegsemError(f"{where(path, i, 'image')}: '{img}' already listed in row {seen[key]}")
            seen[key] = i
            extra = {k: v for k, v in rec.items() if k not in REQUIRED and k != "label"}
            rows.append(ManifestRow(image_path, x, y, p, label, extra, i))
    if not rows:
        raise SegsemError(f"{path}: manifest has no rows")
    names: dict[str, int] = {}
    for r in rows:
        if r.name in names:
            raise SegsemError(
                f"{where(path, r.row, 'image')}: image name '{r.name}' repeats row {names[r.name]} "
                "(outputs are named after the image file stem)"
            )
        names[r.name] = r.row
    return rows


def write_manifest(path: str | Path, rows: list[dict], extra_columns: list[str] | None = None) -> Path:
    """Atomically write a manifest from dicts with keys image, x_nm, y_nm, pixel_nm (, label, ...)."""
    import io

    from .atomic import write_text

    cols = list(REQUIRED)
    if any("label" in r for r in rows):
        cols.append("label")
    for c in extra_columns or []:
        if c not in cols:
            cols.append(c)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return write_text(path, buf.getvalue())
