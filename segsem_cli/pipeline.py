"""The extraction pipeline: one function a notebook can call, the CLI is a thin layer over it.

read -> align -> prompt -> segment -> judge -> fall back -> refine -> measure -> export

Per image, :func:`process_image` reads the SEM image, aligns it to the layout,
asks the backbone (if any) and the fallback for one contour per layout feature,
decides per feature which to keep (:mod:`segsem_cli.hybrid`) and maps the
contours to layout nm. Its result is written to ``OUT/images/<name>.json``
atomically: that file is the resume marker. :func:`run_extract` then gathers
all per-image results into the exported contours, the gauge table, the
feature table and the summary.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .atomic import json_default, write_json, write_text
from .errors import SegsemError
from .manifest import ManifestRow, read_manifest
from .transform import PixelTransform
from .types import ContourRecord, SEMImage

#: Statuses of an image whose result is final (skipped on re-run unless --force).
DONE_STATUSES = ("ok", "ambiguous")


@dataclass
class ExtractConfig:
    """Everything :func:`run_extract` needs, as plain values (picklable for worker processes)."""

    manifest: Path
    layout: Path
    out: Path
    cell: str | None = None
    layer: tuple[int, int] = (1, 0)
    export: str = "gds"
    export_options: dict[str, Any] = field(default_factory=dict)
    fallback: str = "threshold"
    fallback_options: dict[str, str] = field(default_factory=dict)
    backbone: str = "sam2"
    model: Path | None = None
    backbone_options: dict[str, str] = field(default_factory=dict)
    threshold: float | None = None
    mode: str = "hybrid"
    device: str = "cpu"
    gauges: Path | None = None
    search_px: float | None = None  # None: align.search_range_px (40 px or 40 nm, whichever is more)
    polarity: str = "auto"
    scan_lines: str = "auto"  # scan-line offset correction (segsem_cli.scanlines): auto | off
    border_margin_px: float = 6.0  # design polygons this close outside the image are tried (layout.border_candidates)
    align: bool = True
    edge_align: bool = True
    workers: int = 1
    force: bool = False
    overlays: bool = True
    refine: bool = True
    edge_options: dict[str, str] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """Hash of the options that change an image's result (resume only reuses matching results)."""
        keys = dict(
            layout=str(Path(self.layout).resolve()),
            cell=self.cell,
            layer=list(self.layer),
            fallback=self.fallback,
            fallback_options=self.fallback_options,
            backbone=self.backbone if self.model else None,
            model=_file_digest(self.model) if self.model else None,
            backbone_options=self.backbone_options,
            threshold=self.threshold,
            mode=self.mode,
            search_px=self.search_px,
            polarity=self.polarity,
            scan_lines=self.scan_lines,
            border_margin_px=self.border_margin_px,
            align=self.align,
            edge_align=self.edge_align,
            refine=self.refine,
            edge_options=self.edge_options,
        )
        return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_digest(path: Path | None) -> str | None:
    if path is None:
        return None
    st = Path(path).stat()
    return f"{Path(path).resolve()}:{st.st_size}:{int(st.st_mtime)}"


# ----------------------------------------------------------------------------- worker state


class _State:
    """Per-process state: the layout, plugins and model, loaded once."""

    def __init__(self, cfg: ExtractConfig):
        from .layout import load_layout
        from .plugins import get_backbone, get_fallback

        self.cfg = cfg
        self.layout = load_layout(cfg.layout, cell=cfg.cell, layer=cfg.layer)
        self.fallback = get_fallback(cfg.fallback)
        self.model = None
        if cfg.model is not None:
            self.model = get_backbone(cfg.backbone).load(Path(cfg.model), device=cfg.device, **cfg.backbone_options)
        self.threshold = resolve_threshold(cfg.threshold, self.model)
        self.fallback_options = dict(cfg.fallback_options)
        self.edge_options = dict(cfg.edge_options)
        if self.model is not None:
            # the edge threshold fitted by `segsem calibrate` on the user's labels, unless given explicitly
            et = (getattr(self.model, "meta", None) or {}).get("edge_threshold")
            if et is not None:
                self.fallback_options.setdefault("threshold", f"{float(et):.4f}")
                self.edge_options.setdefault("threshold", f"{float(et):.4f}")


_STATE: _State | None = None


def _init_worker(cfg: ExtractConfig) -> None:
    global _STATE
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _STATE = _State(cfg)


def resolve_threshold(threshold: float | None, model) -> float:
    """The confidence threshold: the option, else the model's calibrated one, else 0.5."""
    if threshold is not None:
        return float(threshold)
    if model is not None:
        t = (getattr(model, "meta", None) or {}).get("threshold")
        if t is not None:
            return float(t)
    return 0.5


# ----------------------------------------------------------------------------- one image


def process_image(row: ManifestRow, state: _State, polarity: str | None = None) -> dict:
    """Run the whole pipeline on one image. Returns the per-image record (JSON-ready).

    ``polarity`` overrides ``cfg.polarity`` for this image (the batch's tone, see :func:`batch_polarity`).
    """
    from .align import align_to_layout
    from .hybrid import combine
    from .images import read_sem
    from .layout import border_candidates, context_pixels, features_in_view
    from .scanlines import correct_scan_lines

    cfg = state.cfg
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    pixels, px = read_sem(row.image, row.pixel_nm)
    if float(pixels.std()) == 0.0:
        raise SegsemError(f"{row.image}: blank image (all pixels {float(pixels.flat[0])})")
    timings["read"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pixels, scan = correct_scan_lines(pixels, mode=cfg.scan_lines)
    timings["scan_lines"] = time.perf_counter() - t0
    transform = PixelTransform((row.x_nm, row.y_nm), px, pixels.shape)
    rec: dict[str, Any] = dict(
        image=row.name,
        path=str(row.image),
        center_nm=[row.x_nm, row.y_nm],
        pixel_nm=px,
        shape=list(pixels.shape),
        meta=row.extra,
        scan_lines=scan.to_dict(),
    )

    t0 = time.perf_counter()
    if cfg.align:
        ar = align_to_layout(pixels, transform, state.layout, search_px=cfg.search_px,
                             polarity=polarity or cfg.polarity)
        rec.update(
            offset_nm=list(ar.offset_nm),
            offset_px=list(ar.offset_px),
            align_score=ar.score,
            residual_px=ar.residual_px,
            ambiguous=bool(ar.ambiguous),
            align_status=ar.status,
            align_message=ar.message,
            polarity=ar.polarity or None,
            tone_ambiguous=bool(ar.tone_ambiguous),
        )
        if ar.status == "failed":
            rec.update(status="failed", message=f"alignment failed: {ar.message}", features=[], timings=timings)
            return rec
        transform = ar.transform
    else:
        rec.update(offset_nm=[0.0, 0.0], offset_px=[0.0, 0.0], align_score=None, residual_px=None,
                   ambiguous=False, align_status="skipped", align_message="alignment disabled")
    timings["align"] = time.perf_counter() - t0

    feats = features_in_view(state.layout, transform)
    if not feats:
        rec.update(status="failed", message="no layout features in the field of view", features=[], timings=timings)
        return rec
    image = SEMImage(Path(row.image), pixels, transform, dict(row.extra))
    near = border_candidates(state.layout, transform, margin_px=cfg.border_margin_px)

    def run(fs):
        return combine(image, fs, fallback=state.fallback, fallback_options=state.fallback_options, model=state.model,
                       threshold=state.threshold, refine=cfg.refine, edge_options=state.edge_options, mode=cfg.mode)

    results, stage_times = run(feats + near)
    near_results = results[len(feats):]
    results = results[:len(feats)]
    near_ids = {f.feature_id for f in near}
    if any(near_ids.intersection(r.extra.get("merged_with") or ()) for r in results):
        # a border candidate shared a printed shape with a feature in view: that shape is the
        # in-view feature's alone, so extract the in-view features again without candidates
        results, stage_times = run(feats)
        near_results = []
    timings.update(stage_times)

    # the design as drawn beyond the image frame: a side the frame cuts is still a long side
    designs = context_pixels(state.layout, transform, feats) if cfg.align else None
    if cfg.align and cfg.edge_align:
        # Residual misalignment from the extracted edges (bias-free midlines of straight
        # features, segsem_cli.edge_align): the layout is moved onto the print.
        from .align import _content_shift_to_offset
        from .edge_align import refine_offset

        t0 = time.perf_counter()
        ea = refine_offset([r.contour_px if r.ok else None for r in results], designs, pixels.shape)
        rec["edge_align"] = ea.to_json()
        if any(ea.applied):
            transform = transform.with_offset(_content_shift_to_offset(transform, ea.shift_px))
            rec["offset_nm"] = [float(x) for x in transform.offset_nm]
            rec["offset_px"] = [float(a + b) for a, b in zip(rec["offset_px"], ea.shift_px)]
        timings["edge_align"] = time.perf_counter() - t0

    if cfg.align:
        # What in the design can fix each axis at all: an axis held only by line ends facing one
        # way is biased by the printed pullback (a few nm, whatever the image quality).
        from .edge_align import design_evidence

        ev = design_evidence(designs, pixels.shape)
        rec["align_evidence"] = list(ev)
        weak = [f"{ax} ({e})" for ax, e in zip("xy", ev) if e in ("one-sided", "none")]
        if weak:
            what = " and ".join(weak)
            note = (f"no straight feature sides fix {what}: only line ends or corners facing one way, "
                    f"which print pulled back, or nothing at all")
            if rec.get("ambiguous"):
                rec["align_message"] = f"{rec['align_message']}; also {note}"
            else:
                rec["align_message"] = f"ambiguous alignment: {note}"
            rec["ambiguous"] = True
            rec["align_status"] = "ambiguous"

    # border candidates enter the output only with a clean extracted edge (nothing of them was expected)
    kept = [(f, r) for f, r in zip(near, near_results) if r.ok]
    rec["border_candidates"] = {"tried": len(near), "kept": len(kept)}
    feats = feats + [f for f, _ in kept]
    results = list(results) + [r for _, r in kept]
    kept_ids = {f.feature_id for f, _ in kept}

    t0 = time.perf_counter()
    out_feats = []
    for f, r in zip(feats, results):
        item: dict[str, Any] = dict(
            feature_id=f.feature_id,
            source=r.source,
            confidence=round(float(r.confidence), 4),
            status=r.status,
            clipped=bool(f.clipped or r.extra.get("clipped")),
        )
        if f.feature_id in kept_ids:
            item["design_outside"] = True  # its design polygon lies outside the image; only the print reaches in
        for k, v in r.extra.items():
            if isinstance(v, (int, float, str, bool)) and k not in item:
                item[k] = round(v, 4) if isinstance(v, float) else v
        if r.ok:
            # arrays: written to the image JSON as lists (atomic.json_default), used as arrays by the exports
            item["exterior_nm"] = np.round(transform.to_layout(r.contour_px), 4)
            item["holes_nm"] = [np.round(transform.to_layout(h), 4) for h in r.holes_px]
        out_feats.append(item)
    n_ok = sum(1 for r in results if r.ok)
    rec.update(
        status="ambiguous" if rec.get("ambiguous") else "ok",
        message="" if n_ok else "no feature could be extracted",
        features=out_feats,
        n_features=len(feats),
        n_ok=n_ok,
        threshold=state.threshold,
    )
    if n_ok == 0:
        rec["status"] = "failed"
    timings["map"] = time.perf_counter() - t0

    if cfg.overlays:
        t0 = time.perf_counter()
        _write_overlay(cfg.out / "overlays" / f"{row.name}.png", pixels, feats, results)
        timings["overlay"] = time.perf_counter() - t0
    rec["timings"] = {k: round(v, 4) for k, v in timings.items()}
    return rec


def _write_overlay(path: Path, pixels, feats, results) -> None:
    from .overlay import draw_overlay

    layout = [f.pixels for f in feats]
    by_source: dict[str, list[np.ndarray]] = {}
    for r in results:
        if r.ok:
            by_source.setdefault(r.source, []).append(r.contour_px)
    layers = {"layout": ("blue", layout)}
    palette = ["red", "green", "magenta", "yellow"]
    for i, (src, cs) in enumerate(sorted(by_source.items())):
        layers[src] = (palette[i % len(palette)], cs)
    draw_overlay(pixels, layers, path, scale=2 if max(pixels.shape) <= 512 else 1)


def _safe_process(row: ManifestRow, state: _State, polarity: str | None = None) -> dict:
    """process_image that never raises: one bad image never sinks a batch."""
    t0 = time.perf_counter()
    try:
        rec = process_image(row, state, polarity)
    except SegsemError as exc:
        rec = dict(image=row.name, path=str(row.image), status="error", message=str(exc), features=[])
    except Exception as exc:  # noqa: BLE001
        msg = f"{type(exc).__name__}: {exc}".splitlines()[0]
        rec = dict(image=row.name, path=str(row.image), status="error", message=msg, features=[])
        if os.environ.get("SEGSEM_VERBOSE"):
            rec["traceback"] = traceback.format_exc()
    rec["elapsed_s"] = round(time.perf_counter() - t0, 4)
    return rec


def _worker_task(row: ManifestRow, polarity: str | None = None) -> dict:
    assert _STATE is not None
    return _safe_process(row, _STATE, polarity)


#: The batch's polygon tone needs at least this many images whose own data fixed their tone,
#: and this share of them agreeing (:func:`batch_polarity`).
BATCH_TONE_MIN_VOTES = 2
BATCH_TONE_SHARE = 0.75


def batch_polarity(images: list[dict]) -> dict | None:
    """The polygon tone of a batch, from the images whose own data fixed it.

    All images of a run show one layer, so they share its tone (resist lines print bright;
    holes and trenches print dark). An image whose alignment could not tell the tone
    (``tone_ambiguous``: lines and spaces, or holes and the resist between them, swapped
    match nearly as well) takes the tone the other images found, when at least
    :data:`BATCH_TONE_MIN_VOTES` of them found one and :data:`BATCH_TONE_SHARE` agree.
    Returns ``{"polarity", "votes", "of"}`` or None.
    """
    votes = [r["polarity"] for r in images
             if r.get("status") in DONE_STATUSES and r.get("polarity") in ("bright", "dark")
             and not r.get("tone_ambiguous")]
    if len(votes) < BATCH_TONE_MIN_VOTES:
        return None
    top = max(("bright", "dark"), key=votes.count)
    n = votes.count(top)
    if n < BATCH_TONE_SHARE * len(votes):
        return None
    return {"polarity": top, "votes": n, "of": len(votes)}


# ----------------------------------------------------------------------------- the batch


@dataclass
class ExtractSummary:
    out: Path
    images: list[dict]
    outputs: dict[str, str]
    counts: dict[str, int]
    threshold: float
    model: str | None
    #: Seconds spent writing outputs in this run: ``image_records`` (the per-image JSON
    #: files, all images together), ``contours`` (the exporter), ``features`` and ``gauges``.
    timings: dict[str, float] = field(default_factory=dict)
    #: With ``--polarity auto``: the batch's polygon tone (:func:`batch_polarity`) or None, and
    #: the images re-run with it in this run because their own data could not tell it.
    batch_polarity: dict | None = None
    polarity_from_batch: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


def image_record_path(out: Path, name: str) -> Path:
    return Path(out) / "images" / f"{name}.json"


def load_done(out: Path, rows: list[ManifestRow], fingerprint: str) -> dict[str, dict]:
    """Per-image results from an earlier run with the same options (the resume set)."""
    done = {}
    for r in rows:
        p = image_record_path(out, r.name)
        if not p.is_file():
            continue
        try:
            rec = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if rec.get("status") in DONE_STATUSES and rec.get("fingerprint") == fingerprint:
            done[r.name] = rec
    return done


def run_extract(cfg: ExtractConfig, *, progress: Callable[[dict], None] | None = None, on_start: Callable[[int, int], None] | None = None) -> ExtractSummary:
    """Extract contours for every image of the manifest and write all outputs under ``cfg.out``.

    Outputs: ``contours<suffix>`` (the exporter's file), ``features.csv``
    (per feature: source, confidence, status), ``gauges.csv`` (with
    ``--gauges``), ``summary.json``, ``images/<name>.json`` (per image, the
    resume markers) and ``overlays/<name>.png``.
    """
    from .plugins import get_exporter, get_fallback

    rows = read_manifest(cfg.manifest)
    exporter = get_exporter(cfg.export)  # fail early on an unknown exporter name
    check = getattr(get_fallback(cfg.fallback), "check_options", None)
    if callable(check):  # ... and on fallback option values the plugin rejects (optional plugin method)
        check(dict(cfg.fallback_options))
    gauges = None
    if cfg.gauges is not None:
        from .gauges import read_gauges

        gauges = read_gauges(cfg.gauges)
    cfg.out = Path(cfg.out)
    cfg.out.mkdir(parents=True, exist_ok=True)
    fp = cfg.fingerprint()
    done = {} if cfg.force else load_done(cfg.out, rows, fp)
    todo = [r for r in rows if r.name not in done]
    if on_start:
        on_start(len(todo), len(done))

    results: dict[str, dict] = dict(done)
    out_times = {"image_records": 0.0}
    state = _process_rows(cfg, todo, fp, results, out_times, None, progress)

    # second pass: images that could not tell the polygon tone take the batch's (one layer, one tone)
    tone = None
    retoned: list[str] = []
    if cfg.align and cfg.polarity == "auto":
        tone = batch_polarity([results[r.name] for r in rows if r.name in results])
        if tone is not None:
            pol = tone["polarity"]

            def takes_tone(rec: dict) -> bool:  # could not tell, took the other tone, not yet tried with this one
                return (bool(rec.get("tone_ambiguous")) and rec.get("status") in DONE_STATUSES
                        and rec.get("polarity") != pol and rec.get("batch_polarity_failed") != pol)

            redo = [r for r in rows if r.name in results and takes_tone(results[r.name])]
            if redo:
                state = _process_rows(cfg, redo, fp, results, out_times, state, None, tone=tone)
                retoned = [r.name for r in redo]

    ordered = [results[r.name] for r in rows if r.name in results]
    threshold = state.threshold if state is not None else next((r.get("threshold") for r in ordered if r.get("threshold") is not None), resolve_threshold(cfg.threshold, None))
    outputs = write_outputs(cfg, ordered, exporter, gauges, timings=out_times)
    counts = {s: sum(1 for r in ordered if r.get("status") == s) for s in ("ok", "ambiguous", "failed", "error")}
    counts["features_ok"] = sum(int(r.get("n_ok", 0)) for r in ordered)
    counts["features"] = sum(int(r.get("n_features", 0)) for r in ordered)
    counts["resumed"] = len(done)
    counts["polarity_from_batch"] = len(retoned)
    summary = ExtractSummary(cfg.out, [_brief(r) for r in ordered], outputs, counts, threshold,
                             str(cfg.model) if cfg.model else None, {k: round(v, 4) for k, v in out_times.items()},
                             tone, retoned)
    write_json(cfg.out / "summary.json", summary.to_json())
    return summary


def _process_rows(cfg: ExtractConfig, rows: list[ManifestRow], fp: str, results: dict[str, dict],
                  out_times: dict[str, float], state: "_State | None", progress, tone: dict | None = None):
    """Process ``rows`` (in worker processes with ``cfg.workers > 1``), write each record and
    put it in ``results``. ``tone``: the batch's polarity for images that could not tell theirs.
    Returns the in-process state (created on first use) for reuse."""
    if not rows:
        return state
    pol = tone["polarity"] if tone else None

    def done(row: ManifestRow, rec: dict) -> None:
        if tone and rec.get("status") not in DONE_STATUSES:
            # the batch's tone does not fit this image at all: keep its own result, say so, and
            # do not try again on the next run
            msg = rec.get("message", "")
            rec = dict(results[row.name])
            rec["batch_polarity_failed"] = pol
            rec["align_message"] = f"{rec.get('align_message', '')}; the batch's polygon tone '{pol}' failed: {msg}"
        elif tone:
            rec["tone_ambiguous"] = True  # its own data could not tell; it never votes
            rec["polarity_source"] = "batch"
            note = (f"polygon tone '{pol}' taken from the batch ({tone['votes']} of {tone['of']} images "
                    f"whose own data fixed the tone)")
            rec["align_message"] = f"{rec['align_message']}; {note}" if rec.get("align_message") else note
        t0 = time.perf_counter()
        rec = _finish(cfg, row, rec, fp)
        out_times["image_records"] += time.perf_counter() - t0
        results[row.name] = rec
        if progress:
            progress(rec)

    if cfg.workers <= 1 or len(rows) == 1:
        state = state or _State(cfg)
        for row in rows:
            done(row, _safe_process(row, state, pol))
        return state
    import multiprocessing as mp

    ctx = mp.get_context("spawn" if cfg.model is not None else "fork")
    with ProcessPoolExecutor(max_workers=cfg.workers, mp_context=ctx, initializer=_init_worker, initargs=(cfg,)) as pool:
        futs = {pool.submit(_worker_task, row, pol): row for row in rows}
        for fut in as_completed(futs):
            row = futs[fut]
            try:
                rec = fut.result()
            except Exception as exc:  # noqa: BLE001 - a worker died
                rec = dict(image=row.name, path=str(row.image), status="error", message=f"worker failed: {exc}", features=[])
            done(row, rec)
    return state


def _finish(cfg: ExtractConfig, row: ManifestRow, rec: dict, fp: str) -> dict:
    rec["fingerprint"] = fp
    write_text(image_record_path(cfg.out, row.name), record_json(rec))  # holds every contour vertex
    return rec


_VERTICES = "\x00vertices\x00"  # placeholder for a vertex array while the record is encoded


def record_json(rec: dict) -> str:
    """A per-image record as one line of JSON (as ``write_json(..., compact=True)``), fast for contours.

    The contour vertices (``(N, 2)`` float arrays whose values are rounded to 4
    decimals, in nm) are written with ``%.4f``: the same numbers as the shortest
    repr ``json.dumps`` would write (trailing zeros aside), formatted in one pass
    per array instead of one repr per number. Other values go through ``json.dumps``.
    """
    arrays: list[np.ndarray] = []

    def swap(o):  # same traversal order as json.dumps: dict insertion order, list order
        if isinstance(o, dict):
            return {k: swap(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [swap(v) for v in o]
        if (isinstance(o, np.ndarray) and o.ndim == 2 and o.shape[1] == 2 and o.dtype.kind == "f"
                and np.isfinite(o).all() and float(np.abs(o).max(initial=0.0)) < 1e9
                and np.array_equal(np.round(o, 4), o)):  # 4-decimal values: %.4f is exact
            arrays.append(o)
            return _VERTICES
        return o

    parts = json.dumps(swap(rec), separators=(",", ":"), default=json_default).split(json.dumps(_VERTICES))
    if len(parts) != len(arrays) + 1:  # a placeholder inside some string: encode plainly
        return json.dumps(rec, separators=(",", ":"), default=json_default) + "\n"
    out = [parts[0]]
    for a, rest in zip(arrays, parts[1:]):
        out.append(("[" + ",".join(["[%.4f,%.4f]"] * len(a)) + "]") % tuple(a.ravel().tolist()) if len(a) else "[]")
        out.append(rest)
    return "".join(out) + "\n"


def _brief(rec: dict) -> dict:
    keys = ("image", "status", "message", "offset_nm", "offset_px", "align_score", "residual_px", "ambiguous",
            "polarity", "polarity_source", "n_features", "n_ok", "timings", "elapsed_s")
    d = {k: rec.get(k) for k in keys if k in rec}
    srcs: dict[str, int] = {}
    marks: dict[str, int] = {}  # what the tone check changed (segsem_cli.tone)
    for f in rec.get("features", []):
        if f.get("status") == "ok":
            srcs[f["source"]] = srcs.get(f["source"], 0) + 1
        if f.get("tone_check"):
            marks[f["tone_check"]] = marks.get(f["tone_check"], 0) + 1
    d["sources"] = srcs
    if marks:
        d["tone_check"] = marks
    return d


def tone_check_note(images: list[dict]) -> str | None:
    """One line for the end of a run when the tone check changed features (``images``: the
    summary's per-image records), or None: a print biased by about a rim width against its
    layout is flipped wrongly, and the user may know the layer's tone."""
    counts: dict[str, int] = {}
    n_img = 0
    for r in images:
        marks = r.get("tone_check") or {}
        n_img += bool(marks)
        for k, v in marks.items():
            counts[k] = counts.get(k, 0) + int(v)
    if not counts:
        return None
    what = {"flipped": "flipped", "majority": "set to the image's majority", "minority": "reported not_found"}
    parts = ", ".join(f"{counts[k]} {what.get(k, k)}" for k in sorted(counts))
    return (f"tone check: the substrate side of {sum(counts.values())} feature(s) in {n_img} image(s) was checked "
            f"against the layout and changed ({parts}; features.csv column tone_check). A print biased by about "
            f"a rim width against its layout is flipped wrongly: if you know the layer's tone, pass "
            f"--fallback-opt substrate=outside (resist polygons) or substrate=inside (openings).")


def records_from_results(images: list[dict]) -> dict[str, list[ContourRecord]]:
    """Per image, the extracted contours as :class:`ContourRecord` in layout nm."""
    out: dict[str, list[ContourRecord]] = {}
    for rec in images:
        lst = []
        for f in rec.get("features", []):
            if f.get("status") != "ok" or "exterior_nm" not in f:
                continue
            lst.append(
                ContourRecord(
                    image=rec["image"],
                    feature_id=f["feature_id"],
                    xy_nm=np.asarray(f["exterior_nm"], dtype=float),
                    source=f["source"],
                    confidence=float(f["confidence"]),
                    holes_nm=tuple(np.asarray(h, dtype=float) for h in f.get("holes_nm", [])),
                )
            )
        out[rec["image"]] = lst
    return out


def fov_polygon(rec: dict):
    """The aligned field of view of an image record as a shapely polygon in nm."""
    from shapely.geometry import Polygon

    h, w = rec["shape"]
    t = PixelTransform(tuple(rec["center_nm"]), rec["pixel_nm"], (h, w), tuple(rec.get("offset_nm") or (0.0, 0.0)))
    return Polygon(t.to_layout(np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=float)))


def write_outputs(cfg: ExtractConfig, images: list[dict], exporter, gauges,
                  timings: dict[str, float] | None = None) -> dict[str, str]:
    """Write the aggregated outputs from all per-image records (atomically).

    ``timings``, when given, receives the seconds spent on ``contours`` (building the
    records and exporting), ``features`` and ``gauges``.
    """
    import csv
    import io

    timings = {} if timings is None else timings
    t0 = time.perf_counter()
    outputs: dict[str, str] = {}
    per_image = records_from_results(images)
    records = [r for lst in per_image.values() for r in lst]
    path = cfg.out / f"contours{exporter.suffix}"
    written = exporter.export(records, path, **cfg.export_options)
    outputs["contours"] = str(written[0] if written else path)
    t1 = time.perf_counter()
    timings["contours"] = t1 - t0

    from .geometry import signed_area as ring_signed_area

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image", "feature_id", "source", "confidence", "status", "clipped", "border_fraction", "area_nm2",
                "seed", "first_status", "split_level", "substrate", "tone_check"])
    for rec in images:
        for f in rec.get("features", []):
            area = ""
            if "exterior_nm" in f:
                xy = np.asarray(f["exterior_nm"])
                area = f"{abs(ring_signed_area(xy)):.2f}"
            bf = f.get("border_fraction")
            w.writerow([rec["image"], f["feature_id"], f["source"], f"{f['confidence']:.4f}", f["status"], int(bool(f.get("clipped"))),
                        "" if bf is None else f"{float(bf):.4f}", area, f.get("seed", ""), f.get("first_status", ""),
                        "" if f.get("split_level") is None else f"{float(f['split_level']):.4f}",
                        f.get("substrate") or "", f.get("tone_check", "")])
    write_text(cfg.out / "features.csv", buf.getvalue())
    outputs["features"] = str(cfg.out / "features.csv")
    t2 = time.perf_counter()
    timings["features"] = t2 - t1

    if gauges is not None:
        from .gauges import gauge_rows, write_gauge_csv

        usable = [r for r in images if r.get("status") in DONE_STATUSES and "shape" in r]
        # a cutline must lie 2 px inside the image: contours cut by the border are closed along it,
        # and those border segments are not edges
        fovs = {r["image"]: fov_polygon(r).buffer(-2.0 * float(r["pixel_nm"]), join_style=2) for r in usable}
        rows = gauge_rows(gauges, {k: per_image.get(k, []) for k in fovs}, fovs)
        write_gauge_csv(cfg.out / "gauges.csv", rows)
        outputs["gauges"] = str(cfg.out / "gauges.csv")
        timings["gauges"] = time.perf_counter() - t2
    return outputs
