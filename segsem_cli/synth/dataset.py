"""Synthetic CD-SEM datasets with exact ground truth (what ``segsem synth`` writes).

:func:`make_dataset` picks sites in a layout, prints the design polygons of each
field of view with :mod:`segsem_cli.synth.litho`, renders them with
:mod:`segsem_cli.synth.render` and writes, into ``out_dir``:

``img_NNNN.tif``
    The SEM image (8 or 16 bit). The pixel size is in the FEI/Thermo tag 34682
    (XML, ``<PixelWidth>`` in metres) and the Zeiss tag 34118
    (``Image Pixel Size = ... nm``), and in the TIFF resolution tags.
``img_NNNN_label.png``
    Instance label mask (uint16 PNG): 0 = background, 1..N = printed features,
    decided at pixel centres from the printed shape (exact, including drift).
``manifest.csv``
    ``image,x_nm,y_nm,pixel_nm,label,noise``; ``x_nm, y_nm`` are the NOMINAL
    image centres (what a CD-SEM recipe asked for).
``truth.json``
    ``{"format", "convention", "layout", "cell", "layer", "tone", "seed",
    "params": {preset: {...}}, "images": {name: {...}}}``. Per image:
    ``image``, ``label``, ``noise``, ``pixel_nm``, ``shape [H, W]``,
    ``center_nm`` (nominal), ``offset_nm = true centre - nominal centre``,
    ``true_center_nm``, ``imaging`` (PSF, gain, per-row drift) and
    ``features``: ``{id, design_index, design_id ("p<index>"), merged_design_indices,
    exterior [[x, y], ...] nm, holes [...], label, defect}`` with ``defect``
    None, ``"bridge"``, ``"neck"`` or ``"missing"`` (missing features have an
    empty exterior and label 0). Truth contours are the printed sidewall at
    mid-height, clipped to the true field of view plus 8 pixels.
``gauges_truth.csv`` (with ``gauges``)
    ``name,x1,y1,x2,y2,(extra columns),true_cd_nm,image,status``: the true CD
    (first to last crossing of the cutline with the truth contours, measured by
    :func:`segsem_cli.gauges.measure_cd`) on the image whose true field of view
    contains the whole cutline (nearest centre if several); ``status`` is
    ``ok``, ``single_crossing``, ``no_crossing`` or ``outside_images``.

Everything is validated before anything is written; files are written to a
staging folder next to ``out_dir`` and moved in at the end, so an error leaves
``out_dir`` untouched. Image ``i`` depends only on ``(seed, i)``.
"""
from __future__ import annotations

import csv
import math
import os
import shutil
import tempfile
import xml.sax.saxutils as xmlutils
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from shapely.geometry import Polygon, box

from ..atomic import atomic_path, json_default, write_text
from ..errors import SegsemError, where
from ..transform import PixelTransform
from .litho import LithoParams, print_features
from .render import TONES, RenderParams, render_sem

NOISE_LEVELS = ("easy", "medium", "hard")
NOISE_CHOICES = NOISE_LEVELS + ("mixed",)
TRUTH_MARGIN_PX = 8.0

#: Difficulty presets: only the keys that differ from the defaults of
#: :class:`LithoParams`, :class:`RenderParams` and :class:`StageParams`.
PRESETS: dict[str, dict[str, Any]] = {
    "easy": dict(dose=400.0, blur_nm=1.0, astig=1.0, charging=0.01, charging_dark=0.02, read_noise=0.0,
                 scan_offset_sigma=0.0, scan_gain_sigma=0.0, drift_px=0.0, gain_jitter=0.02,
                 offset_jitter=0.01, ler_sigma_nm=0.8, stage_error_nm=10.0),
    "medium": dict(dose=60.0, blur_nm=1.8, astig=1.25, charging=0.05, charging_dark=0.06, read_noise=0.005,
                   scan_offset_sigma=0.01, scan_gain_sigma=0.01, drift_px=0.25, gain_jitter=0.05,
                   offset_jitter=0.02, ler_sigma_nm=1.2, stage_error_nm=20.0),
    "hard": dict(dose=15.0, blur_nm=2.6, astig=1.5, charging=0.12, charging_dark=0.12, read_noise=0.02,
                 scan_offset_sigma=0.03, scan_gain_sigma=0.03, drift_px=0.6, gain_jitter=0.1,
                 offset_jitter=0.04, ler_sigma_nm=1.8, stage_error_nm=30.0),
}


@dataclass(frozen=True)
class StageParams:
    """Stage placement error between the nominal and the true image centre.

    ``stage_error_nm`` bounds the error on each axis; ``stage_error_dist`` is
    ``"uniform"`` (in ``[-e, e]``) or ``"normal"`` (sigma ``e / 2``, clipped to ``[-e, e]``).
    """

    stage_error_nm: float = 20.0
    stage_error_dist: str = "uniform"

    def __post_init__(self):
        if not (math.isfinite(self.stage_error_nm) and self.stage_error_nm >= 0):
            raise SegsemError(f"stage parameter 'stage_error_nm': {self.stage_error_nm!r} must be >= 0")
        if self.stage_error_dist not in ("uniform", "normal"):
            raise SegsemError(f"stage parameter 'stage_error_dist': {self.stage_error_dist!r} must be uniform or normal")

    def draw(self, rng: np.random.Generator) -> tuple[float, float]:
        e = self.stage_error_nm
        if e == 0:
            return (0.0, 0.0)
        if self.stage_error_dist == "uniform":
            d = rng.uniform(-e, e, size=2)
        else:
            d = np.clip(rng.normal(0.0, e / 2, size=2), -e, e)
        return (float(d[0]), float(d[1]))


@dataclass(frozen=True)
class SynthParams:
    """All parameters of one image: printing, rendering and stage."""

    litho: LithoParams
    render: RenderParams
    stage: StageParams

    def as_dict(self) -> dict[str, Any]:
        """All parameters in one flat dict (NaN, meaning "random per image", as None)."""
        d = {**asdict(self.litho), **asdict(self.render), **asdict(self.stage)}
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


def _param_fields() -> dict[str, tuple[str, type]]:
    out = {}
    for group, cls in (("litho", LithoParams), ("render", RenderParams), ("stage", StageParams)):
        for f in fields(cls):
            t = cls.__dataclass_fields__[f.name].type
            typ = {"float": float, "int": int, "str": str}.get(t if isinstance(t, str) else t.__name__, float)
            out[f.name] = (group, typ)
    return out


PARAM_NAMES = tuple(sorted(_param_fields()))


def parse_param_overrides(items: Sequence[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    """Parse ``["dose=20", "blur_nm=2"]`` (or a mapping) into typed parameter overrides.

    Raises SegsemError naming the parameter for an unknown name or a bad value.
    """
    if not items:
        return {}
    known = _param_fields()
    pairs: list[tuple[str, Any]] = []
    if isinstance(items, Mapping):
        pairs = list(items.items())
    else:
        for it in items:
            if "=" not in str(it):
                raise SegsemError(f"--param '{it}': expected NAME=VALUE, e.g. dose=20")
            k, v = str(it).split("=", 1)
            pairs.append((k.strip(), v.strip()))
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k not in known:
            raise SegsemError(f"--param '{k}': unknown parameter (known: {', '.join(PARAM_NAMES)})")
        typ = known[k][1]
        try:
            if typ is int:
                fv = float(v)
                if fv != int(fv):
                    raise ValueError
                val: Any = int(fv)
            elif typ is float:
                val = float(v)
            else:
                val = str(v)
        except (TypeError, ValueError):
            raise SegsemError(f"--param '{k}': {v!r} is not a valid {typ.__name__}") from None
        out[k] = val
    return out


def resolve_params(noise: str, overrides: Mapping[str, Any] | None = None) -> SynthParams:
    """The parameters of a difficulty preset with explicit overrides applied (overrides win)."""
    if noise not in PRESETS:
        raise SegsemError(f"--noise: {noise!r} is not one of {', '.join(NOISE_CHOICES)}")
    values = {**PRESETS[noise], **(overrides or {})}
    known = _param_fields()
    groups: dict[str, dict[str, Any]] = {"litho": {}, "render": {}, "stage": {}}
    for k, v in values.items():
        if k not in known:
            raise SegsemError(f"--param '{k}': unknown parameter (known: {', '.join(PARAM_NAMES)})")
        groups[known[k][0]][k] = v
    return SynthParams(LithoParams(**groups["litho"]), RenderParams(**groups["render"]),
                       StageParams(**groups["stage"]))


# ----------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------

def read_sites(path: str | Path) -> list[tuple[float, float]]:
    """Read site centres from a CSV with columns ``x_nm,y_nm`` (other columns ignored)."""
    path = Path(path)
    if not path.is_file():
        raise SegsemError(f"{path}: sites file not found")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        for col in ("x_nm", "y_nm"):
            if col not in header:
                raise SegsemError(f"{where(path, 1, col)}: missing column (header must include x_nm,y_nm)")
        out = []
        for i, raw in enumerate(reader, start=2):
            rec = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if isinstance(v, str)}
            if not any(rec.values()):
                continue
            xy = []
            for col in ("x_nm", "y_nm"):
                try:
                    v = float(rec.get(col, ""))
                except ValueError:
                    raise SegsemError(f"{where(path, i, col)}: {rec.get(col, '')!r} is not a number") from None
                if not math.isfinite(v):
                    raise SegsemError(f"{where(path, i, col)}: {rec.get(col)!r} is not a finite number")
                xy.append(v)
            out.append((xy[0], xy[1]))
    if not out:
        raise SegsemError(f"{path}: no sites (expected rows x_nm,y_nm)")
    return out


def _fov_half(shape: tuple[int, int], pixel_nm: float) -> tuple[float, float]:
    return shape[1] * pixel_nm / 2.0, shape[0] * pixel_nm / 2.0


def _site_box(bounds, half, stage_nm) -> tuple[float, float, float, float]:
    """Allowed region of nominal centres: the FOV plus stage error stays inside the layout bounds."""
    x0, y0, x1, y1 = bounds
    hx, hy = half
    return (x0 + hx + stage_nm, y0 + hy + stage_nm, x1 - hx - stage_nm, y1 - hy - stage_nm)


def _pick_site(layout, rng: np.random.Generator, allowed, half) -> tuple[float, float]:
    """A random nominal centre in ``allowed`` whose field of view holds design polygons.

    Up to 40 candidates are drawn; the first with at least 15 % of the field of
    view covered by design polygons wins, otherwise the best-covered one.
    """
    ax0, ay0, ax1, ay1 = allowed
    best, best_cov = None, -1.0
    hx, hy = half
    for _ in range(40):
        c = (float(rng.uniform(ax0, ax1)), float(rng.uniform(ay0, ay1)))
        fov = (c[0] - hx, c[1] - hy, c[0] + hx, c[1] + hy)
        idx = layout.query(fov)
        if idx:
            win = box(*fov)
            cov = sum(layout.polygons[i].intersection(win).area for i in idx) / win.area
        else:
            cov = 0.0
        if cov > best_cov:
            best, best_cov = c, cov
        if cov >= 0.15:
            break
    return best


def _validate_layout(layout) -> tuple[float, float, float, float]:
    polys = getattr(layout, "polygons", None)
    if not polys:
        raise SegsemError(f"{getattr(layout, 'path', 'layout')}: no polygons in the layout (cell/layer)")
    return tuple(float(v) for v in layout.bounds)


# ----------------------------------------------------------------------------
# one image
# ----------------------------------------------------------------------------

@dataclass
class ImageResult:
    """What :func:`synthesize_image` produces for one site."""

    image: np.ndarray
    labels: np.ndarray
    transform: PixelTransform
    features: list[dict[str, Any]]
    truth_shapes: list[Polygon | None]
    imaging: dict[str, Any]


def _clip_parts(poly: Polygon, win: Polygon) -> list[Polygon]:
    if win.contains(poly):
        return [poly]
    g = poly.intersection(win)
    return [p for p in getattr(g, "geoms", [g]) if isinstance(p, Polygon) and p.area > 1e-6]


def _ring_list(ring) -> list[list[float]]:
    xy = np.asarray(ring.coords)[:-1]
    return np.round(xy, 3).tolist()


def synthesize_image(layout, center_nm: tuple[float, float], *, shape: tuple[int, int], pixel_nm: float,
                     params: SynthParams, rng: np.random.Generator, tone: str = "resist",
                     renderer: Callable[..., Any] = render_sem) -> ImageResult:
    """Print and render one site. ``center_nm`` is the nominal centre; the stage error is drawn from ``rng``.

    ``renderer`` turns the printed shapes into the image; it is called like
    :func:`segsem_cli.synth.render.render_sem` (``renderer(shapes, transform, params=,
    rng=, tone=)``) and returns an object with ``image``, ``clean.labels`` (1..len(shapes)
    at pixel centres) and ``meta``. Another image model plugs in here and keeps the
    printed-shape model, the truth and the files.

    Returns the image, the (1..N) label mask, the TRUE transform and the truth
    features (see the module docstring for their fields).
    """
    offset = params.stage.draw(rng)
    tr = PixelTransform(center_nm=(float(center_nm[0]), float(center_nm[1])), pixel_nm=float(pixel_nm),
                        shape=(int(shape[0]), int(shape[1])), offset_nm=offset)
    fov = tr.field_of_view_nm()
    render_box = tr.field_of_view_nm(params.render.margin_nm() / pixel_nm + 2.0)
    m = params.litho.margin_nm()
    litho_box = (render_box[0] - m, render_box[1] - m, render_box[2] + m, render_box[3] + m)
    win = box(*litho_box)
    design, design_idx = [], []
    for i in layout.query(litho_box):
        for part in _clip_parts(layout.polygons[i], win):
            design.append(part)
            design_idx.append(i)
    printed = print_features(design, params=params.litho, rng=rng, design_indices=design_idx, protect=litho_box)

    rwin = box(*render_box)
    fov_poly = box(*fov)
    truth_win = box(*tr.field_of_view_nm(TRUTH_MARGIN_PX))
    render_shapes: list[Polygon] = []
    render_owner: list[int] = []
    for k, f in enumerate(printed):
        if f.shape is None:
            continue
        for part in _clip_parts(f.shape, rwin):
            render_shapes.append(part)
            render_owner.append(k)
    out = renderer(render_shapes, tr, params=params.render, rng=rng, tone=tone)

    # relabel: features with pixels in the image get 1..N in order of the printed features
    raw = out.clean.labels
    present = np.unique(raw)
    present = present[present > 0]
    owner_label: dict[int, int] = {}
    for r in present.tolist():
        k = render_owner[r - 1]
        owner_label.setdefault(k, 0)
    for n, k in enumerate(sorted(owner_label), start=1):
        owner_label[k] = n
    lut = np.zeros(len(render_shapes) + 1, dtype=np.uint16)
    for r in range(1, len(render_shapes) + 1):
        lut[r] = owner_label.get(render_owner[r - 1], 0)
    labels = lut[raw]

    features: list[dict[str, Any]] = []
    truth_shapes: list[Polygon | None] = []
    for k, f in enumerate(printed):
        if f.shape is None:
            if not layout.polygons[f.design_index].intersects(fov_poly):
                continue
            parts: list[Polygon | None] = [None]
        else:
            if not f.shape.intersects(fov_poly):
                continue
            parts = [p for p in _clip_parts(f.shape, truth_win) if p.intersects(fov_poly)]
        for shp in parts:  # a feature cut in several parts by the window: one entry per part, same label
            truth_shapes.append(shp)
            features.append({
                "id": len(features) + 1,
                "design_index": int(f.design_index),
                "design_id": f"p{f.design_index}",
                "merged_design_indices": [int(i) for i in f.merged],
                "exterior": [] if shp is None else _ring_list(shp.exterior),
                "holes": [] if shp is None else [_ring_list(h) for h in shp.interiors],
                "label": int(owner_label.get(k, 0)) if shp is not None else 0,
                "defect": f.defect,
            })
    return ImageResult(out.image, labels, tr, features, truth_shapes, out.meta)


# ----------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------

def _fmt(v: float) -> str:
    t = f"{float(v):.6f}".rstrip("0").rstrip(".")
    return "0" if t in ("", "-0") else t


def fei_xml(pixel_nm: float, extra: Mapping[str, Any] | None = None) -> str:
    """FEI/Thermo-style XML for TIFF tag 34682 with ``PixelWidth``/``PixelHeight`` in metres."""
    m = repr(float(pixel_nm) * 1e-9)
    items = "".join(f"<{k}>{xmlutils.escape(str(v))}</{k}>" for k, v in (extra or {}).items())
    return ('<?xml version="1.0" encoding="utf-8"?>'
            "<Metadata><Instrument><Manufacturer>segsem synth</Manufacturer></Instrument>"
            f"<Scan><PixelWidth>{m}</PixelWidth><PixelHeight>{m}</PixelHeight></Scan>"
            f"<BinaryResult><PixelSize><X unit=\"m\">{m}</X><Y unit=\"m\">{m}</Y></PixelSize></BinaryResult>"
            f"<Segsem>{items}</Segsem></Metadata>")


def zeiss_text(pixel_nm: float) -> str:
    """Zeiss SmartSEM-style text for TIFF tag 34118 (``Image Pixel Size = ... nm``)."""
    return f"0\r\nAP_IMAGE_PIXEL_SIZE\r\nImage Pixel Size = {float(pixel_nm):.6g} nm\r\n"


def write_sem_tiff(path: str | Path, image: np.ndarray, pixel_nm: float, extra: Mapping[str, Any] | None = None) -> Path:
    """Atomically write a grey TIFF with the pixel size in FEI (34682), Zeiss (34118) and resolution tags."""
    import tifffile

    px_per_cm = 1e7 / float(pixel_nm)
    with atomic_path(path) as tmp:
        tifffile.imwrite(
            tmp, image, photometric="minisblack", metadata=None,
            resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER",
            extratags=[(34682, "s", 0, fei_xml(pixel_nm, extra), True),
                       (34118, "s", 0, zeiss_text(pixel_nm), True)],
        )
    return Path(path)


def write_label_png(path: str | Path, labels: np.ndarray) -> Path:
    """Atomically write a uint16 instance label PNG."""
    import cv2

    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), labels.astype(np.uint16)):
            raise SegsemError(f"{path}: could not write the label PNG")
    return Path(path)


# ----------------------------------------------------------------------------
# the dataset
# ----------------------------------------------------------------------------

def make_dataset(layout, out_dir: str | Path, *, count: int | None, seed: int = 0,
                 image_size: tuple[int, int] | int = (512, 512), pixel_nm: float = 1.0,
                 noise: str = "medium", tone: str = "resist", sites=None, gauges=None,
                 params: Mapping[str, Any] | Sequence[str] | None = None, defect_rate: float | None = None,
                 overwrite: bool = False, progress: Callable[[int, int], None] | None = None,
                 renderer: Callable[..., Any] = render_sem) -> dict[str, Any]:
    """Generate a synthetic CD-SEM dataset with exact truth (see the module docstring for the files).

    Parameters
    ----------
    layout : a :class:`segsem_cli.layout.Layout` (``polygons`` in nm, ``bounds``, ``query(bbox)``).
    out_dir : output folder (created; must not hold a dataset unless ``overwrite``).
    count : number of images; with ``sites`` it may be None (one image per site) and must
        otherwise equal the number of sites.
    seed : image ``i`` is a function of ``(seed, i)`` only.
    image_size : ``(H, W)`` pixels, or one int for square images.
    pixel_nm : pixel size in nm.
    noise : ``"easy"``, ``"medium"``, ``"hard"`` or ``"mixed"`` (cycles the three).
    tone : ``"resist"`` (layout polygons print as resist) or ``"opening"`` (holes/trenches in resist).
    sites : CSV path (``x_nm,y_nm``) or a sequence of nominal centres; default random sites.
    gauges : gauge CSV path (``name,x1,y1,x2,y2`` nm) or a list of
        :class:`segsem_cli.gauges.Gauge`; writes ``gauges_truth.csv``.
    params : parameter overrides (``{"dose": 20}`` or ``["dose=20"]``) applied on top of the preset.
    defect_rate : shortcut for the ``defect_rate`` parameter.
    overwrite : replace an existing dataset in ``out_dir``.
    progress : called as ``progress(done, total)`` after each image.
    renderer : the image model (default :func:`segsem_cli.synth.render.render_sem`); see
        :func:`synthesize_image`.

    Returns
    -------
    dict with ``out_dir``, ``images`` (names), ``manifest``, ``truth``, ``gauges_truth`` paths.
    """
    # ---- validate everything before writing anything
    if isinstance(count, bool) or (count is not None and (not isinstance(count, (int, np.integer)) or count < 1)):
        raise SegsemError(f"--count: {count!r} must be a positive number of images")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SegsemError(f"--seed: {seed!r} must be a non-negative integer")
    if isinstance(image_size, (int, np.integer)):
        image_size = (int(image_size), int(image_size))
    if len(tuple(image_size)) != 2 or any(int(s) != s or not 16 <= s <= 16384 for s in image_size):
        raise SegsemError(f"--size: {image_size!r} must be between 16 and 16384 pixels")
    shape = (int(image_size[0]), int(image_size[1]))
    try:
        pixel_nm = float(pixel_nm)
    except (TypeError, ValueError):
        raise SegsemError(f"--pixel-nm: {pixel_nm!r} is not a number") from None
    if not (math.isfinite(pixel_nm) and pixel_nm > 0):
        raise SegsemError(f"--pixel-nm: {pixel_nm!r} must be a positive number of nm")
    if noise not in NOISE_CHOICES:
        raise SegsemError(f"--noise: {noise!r} is not one of {', '.join(NOISE_CHOICES)}")
    if tone not in TONES:
        raise SegsemError(f"--tone: {tone!r} is not one of {', '.join(TONES)}")
    overrides = parse_param_overrides(params)
    if defect_rate is not None:
        overrides["defect_rate"] = float(defect_rate)
    presets = list(NOISE_LEVELS) if noise == "mixed" else [noise]
    resolved = {p: resolve_params(p, overrides) for p in presets}
    bounds = _validate_layout(layout)
    half = _fov_half(shape, pixel_nm)
    stage_max = max(r.stage.stage_error_nm for r in resolved.values())
    allowed = _site_box(bounds, half, stage_max)

    site_list: list[tuple[float, float]] | None = None
    sites_name = "sites"
    if sites is not None:
        if isinstance(sites, (str, os.PathLike)):
            sites_name = str(sites)
            site_list = read_sites(sites)
        else:
            site_list = [(float(x), float(y)) for x, y in sites]
            if not site_list:
                raise SegsemError("sites: no sites given")
        if count is None:
            count = len(site_list)
        elif count != len(site_list):
            raise SegsemError(f"--count: {count} images but {len(site_list)} sites in {sites_name} (give one or make them agree)")
        for i, (x, y) in enumerate(site_list):
            if not (allowed[0] <= x <= allowed[2] and allowed[1] <= y <= allowed[3]):
                row = f" row {i + 2}" if isinstance(sites, (str, os.PathLike)) else f" site {i}"
                raise SegsemError(
                    f"{sites_name}{row}: site ({_fmt(x)}, {_fmt(y)}) nm too close to the layout edge (the field of view "
                    f"{2 * half[0]:g}x{2 * half[1]:g} nm plus stage error {stage_max:g} nm must stay inside the layout "
                    f"extent {tuple(round(b, 3) for b in bounds)})")
    else:
        if count is None:
            raise SegsemError("--count: required when no --sites are given")
        if allowed[0] > allowed[2] or allowed[1] > allowed[3]:
            raise SegsemError(
                f"layout extent {tuple(round(b, 3) for b in bounds)} nm is too small for a field of view of "
                f"{2 * half[0]:g}x{2 * half[1]:g} nm plus stage error {stage_max:g} nm (use smaller --size or --pixel-nm)")

    gauge_list = None
    if gauges is not None:
        from ..gauges import read_gauges

        gauge_list = read_gauges(gauges) if isinstance(gauges, (str, os.PathLike)) else list(gauges)

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise SegsemError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and not overwrite and any((out_dir / n).exists() for n in ("manifest.csv", "truth.json")):
        raise SegsemError(f"{out_dir}: already holds a dataset (manifest.csv/truth.json); use --force to replace it")

    # ---- generate into a staging folder
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.synth-", dir=out_dir.parent))
    try:
        width = max(4, len(str(count - 1)))
        manifest_rows, truth_images, fovs, truth_by_image = [], {}, {}, {}
        for i in range(count):
            level = presets[i % len(presets)]
            prm = resolved[level]
            rng = np.random.default_rng([int(seed), i])
            centre = site_list[i] if site_list is not None else _pick_site(layout, rng, allowed, half)
            res = synthesize_image(layout, centre, shape=shape, pixel_nm=pixel_nm, params=prm, rng=rng, tone=tone,
                                   renderer=renderer)
            name = f"img_{i:0{width}d}"
            img_file, lab_file = f"{name}.tif", f"{name}_label.png"
            write_sem_tiff(stage_dir / img_file, res.image, pixel_nm,
                           {"NominalCenterXnm": _fmt(centre[0]), "NominalCenterYnm": _fmt(centre[1]),
                            "Noise": level, "Seed": f"{seed},{i}"})
            write_label_png(stage_dir / lab_file, res.labels)
            manifest_rows.append({"image": img_file, "x_nm": _fmt(centre[0]), "y_nm": _fmt(centre[1]),
                                  "pixel_nm": _fmt(pixel_nm), "label": lab_file, "noise": level})
            tc = res.transform.true_center_nm
            truth_images[name] = {
                "image": img_file, "label": lab_file, "noise": level, "index": i, "seed": [int(seed), i],
                "pixel_nm": pixel_nm, "shape": list(shape),
                "center_nm": [float(centre[0]), float(centre[1])],
                "offset_nm": [round(res.transform.offset_nm[0], 6), round(res.transform.offset_nm[1], 6)],
                "true_center_nm": [round(tc[0], 6), round(tc[1], 6)],
                "imaging": res.imaging,
                "features": res.features,
            }
            corners = res.transform.to_layout(np.array([[0, 0], [shape[1], 0], [shape[1], shape[0]], [0, shape[0]]], float))
            fovs[name] = (Polygon(corners), tc)
            truth_by_image[name] = [s for s in res.truth_shapes if s is not None]
            if progress is not None:
                progress(i + 1, count)

        from ..manifest import write_manifest

        write_manifest(stage_dir / "manifest.csv", manifest_rows, extra_columns=["noise"])
        truth = {
            "format": "segsem-synth/1",
            "convention": (
                "Truth contours are the printed resist sidewall at mid-height, in layout nm (x right, y up), "
                "clipped to the true field of view plus 8 pixels. offset_nm = true image centre - nominal centre "
                "(center_nm = manifest x_nm,y_nm); pixel (u, v) <-> layout through segsem_cli.transform."
                "PixelTransform(center_nm, pixel_nm, shape, offset_nm). Signal model: substrate level for "
                "d < -w/2, linear ramp to the edge level across the sidewall footprint w = h / tan(SWA), "
                "exponential decay to the resist level for d > w/2 (d = signed distance into the resist)."),
            "layout": str(getattr(layout, "path", "")),
            "cell": getattr(layout, "cell_name", None),
            "layer": "/".join(str(v) for v in getattr(layout, "layer", ())) or None,
            "tone": tone,
            "seed": int(seed),
            "count": count,
            "params": {p: resolved[p].as_dict() for p in presets},
            "images": truth_images,
        }
        write_text(stage_dir / "truth.json", truth_json_text(truth))
        if gauge_list is not None:
            _write_gauges_truth(stage_dir / "gauges_truth.csv", gauge_list, fovs, truth_by_image)

        # ---- move into place
        out_dir.mkdir(parents=True, exist_ok=True)
        new_names = {p.name for p in stage_dir.iterdir()}
        order = sorted(new_names - {"manifest.csv", "truth.json", "gauges_truth.csv"}) + \
            [n for n in ("gauges_truth.csv", "truth.json", "manifest.csv") if n in new_names]
        if overwrite:
            for old in list(out_dir.glob("img_*.tif")) + list(out_dir.glob("img_*_label.png")) + \
                    [out_dir / "gauges_truth.csv"]:
                if old.name not in new_names and old.is_file():
                    old.unlink()
        mode = 0o666 & ~_umask()
        for n in order:
            os.chmod(stage_dir / n, mode)  # temporary files are created private; give them normal permissions
            os.replace(stage_dir / n, out_dir / n)
    finally:
        shutil.rmtree(stage_dir, ignore_errors=True)
    return {
        "out_dir": out_dir,
        "images": list(truth_images),
        "manifest": out_dir / "manifest.csv",
        "truth": out_dir / "truth.json",
        "gauges_truth": (out_dir / "gauges_truth.csv") if gauge_list is not None else None,
    }


def _umask() -> int:
    m = os.umask(0o022)
    os.umask(m)
    return m


def truth_json_text(truth: Mapping[str, Any]) -> str:
    """``truth.json`` text: indented structure, but every list of numbers (or of
    ``[x, y]`` pairs: a ring, the per-row drift) on one line."""
    import json
    import re

    store: list[str] = []

    def is_num(v) -> bool:
        return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)

    def compact(o):
        if isinstance(o, dict):
            return {k: compact(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            if o and (all(is_num(v) for v in o) or all(isinstance(v, (list, tuple)) and all(is_num(w) for w in v)
                                                         for v in o)):
                store.append(json.dumps(o, separators=(",", ":"), default=json_default))
                return f"\x00{len(store) - 1}\x00"
            return [compact(v) for v in o]
        return o

    text = json.dumps(compact(truth), indent=1, default=json_default)
    text = re.sub(r'"\\u0000(\d+)\\u0000"', lambda m: store[int(m.group(1))], text)
    return text + "\n"


def _write_gauges_truth(path: Path, gauges, fovs: Mapping[str, tuple[Polygon, tuple[float, float]]],
                        truth_by_image: Mapping[str, list[Polygon]]) -> None:
    """One row per gauge: its true CD on the image whose TRUE field of view holds the cutline."""
    from shapely.geometry import LineString, Point

    from ..gauges import measure_cd, write_gauge_csv

    rows = []
    for g in gauges:
        row: dict[str, Any] = {"name": g.name, "x1": g.x1, "y1": g.y1, "x2": g.x2, "y2": g.y2}
        row.update(getattr(g, "extra", {}) or {})
        line = LineString([(g.x1, g.y1), (g.x2, g.y2)])
        mid = Point((g.x1 + g.x2) / 2, (g.y1 + g.y2) / 2)
        best, best_d = None, math.inf
        for name, (poly, centre) in fovs.items():
            if poly.covers(line):
                d = Point(centre).distance(mid)
                if d < best_d:
                    best, best_d = name, d
        if best is None:
            row.update(true_cd_nm="", image="", status="outside_images")
        else:
            res = measure_cd(g.p1, g.p2, truth_by_image[best])
            row.update(true_cd_nm=res.cd_nm if res.cd_nm is not None else "", image=best, status=res.status)
        rows.append(row)
    write_gauge_csv(path, rows)


__all__ = [
    "NOISE_CHOICES", "NOISE_LEVELS", "PARAM_NAMES", "PRESETS", "ImageResult", "StageParams", "SynthParams",
    "fei_xml", "make_dataset", "parse_param_overrides", "read_sites", "resolve_params", "synthesize_image",
    "write_label_png", "write_sem_tiff", "zeiss_text",
]
