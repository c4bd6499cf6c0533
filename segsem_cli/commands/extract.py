"""``segsem extract``: SEM images in, contours in layout coordinates out."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer

from ..errors import SegsemError

#: ``--scan-lines`` help, shared with ``segsem calibrate`` (both read images the same way).
SCAN_LINES_HELP = ("Scan-line (row) offset correction before alignment: auto (applied when the rows' offsets are "
                   "significant over pixel noise; about 5 ms per 1024² image; the default) or off.")


def parse_kv(pairs: list[str] | None, what: str) -> dict[str, str]:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}`` with a clear error naming the option."""
    out: dict[str, str] = {}
    for p in pairs or []:
        if "=" not in p:
            raise SegsemError(f"{what}: '{p}' is not key=value")
        k, v = p.split("=", 1)
        if not k.strip():
            raise SegsemError(f"{what}: '{p}' has an empty key")
        out[k.strip()] = v.strip()
    return out


def register(app: typer.Typer) -> None:
    @app.command("extract")
    def extract(
        manifest: Path = typer.Argument(..., help="Site manifest CSV: image,x_nm,y_nm,pixel_nm[,label,...]."),
        layout: Path = typer.Option(..., "--layout", "-l", help="Layout file (.gds or .oas)."),
        out: Path = typer.Option(..., "--out", "-o", help="Output folder (re-running resumes)."),
        export: str = typer.Option("gds", "--export", "-e", help="Exporter: gds, oasis, csv or a plugin's."),
        cell: Optional[str] = typer.Option(None, "--cell", help="Layout cell (default: the single top cell)."),
        layer: str = typer.Option("1/0", "--layer", help="Layout layer/datatype of the features."),
        gauges: Optional[Path] = typer.Option(None, "--gauges", "-g", help="Gauge CSV name,x1,y1,x2,y2 (nm): writes gauges.csv with wafer CDs."),
        fallback: str = typer.Option("threshold", "--fallback", "-f", help="Classical extractor: threshold, canny, active-contour or a plugin's."),
        fallback_opt: Optional[list[str]] = typer.Option(None, "--fallback-opt", help="Fallback option key=value (repeatable)."),
        model: Optional[Path] = typer.Option(None, "--model", "-m", help="Fine-tuned backbone checkpoint (segsem finetune). Without it the fallback runs alone."),
        backbone: str = typer.Option("sam2", "--backbone", help="Backbone plugin used with --model."),
        backbone_opt: Optional[list[str]] = typer.Option(None, "--backbone-opt", help="Backbone option key=value (repeatable)."),
        threshold: Optional[float] = typer.Option(None, "--threshold", "-t", min=0.0, max=1.0, help="Confidence threshold (default: the model's calibrated one, else 0.5)."),
        mode: str = typer.Option("hybrid", "--mode", help="With --model: hybrid (per-feature fallback), backbone (never fall back) or fallback (ignore the model); for comparisons."),
        device: str = typer.Option("cpu", "--device", help="Torch device for the backbone: cpu, cuda, cuda:1."),
        edge_opt: Optional[list[str]] = typer.Option(None, "--edge-opt", help="Edge refinement option key=value, e.g. threshold=0.5, edge=peak."),
        no_refine: bool = typer.Option(False, "--no-refine", help="Keep the backbone's raw mask contours (no sub-pixel refinement)."),
        polarity: str = typer.Option("auto", "--polarity", help="Layout polygons print bright (resist lines) or dark (holes): auto|bright|dark. Resolves line/space ambiguity in alignment."),
        border_margin: float = typer.Option(6.0, "--border-margin", help="Design polygons up to this many pixels outside the image are tried too: their print can still reach in (bias, roughness); kept only when a clean edge is found, flagged design_outside. 0 turns this off."),
        scan_lines: str = typer.Option("auto", "--scan-lines", help=SCAN_LINES_HELP),
        search_px: Optional[float] = typer.Option(None, "--search-px", min=0.0, help="Largest stage error searched by alignment (pixels; default 40 px or 40 nm, whichever is more pixels, tried once more over twice that when the match fails). Given, it is a hard limit."),
        no_align: bool = typer.Option(False, "--no-align", help="Trust the nominal centres (no alignment)."),
        no_edge_align: bool = typer.Option(False, "--no-edge-align", help="Keep the appearance alignment (no sub-pixel refinement from the midlines of the extracted straight features)."),
        out_layer: str = typer.Option("100/0", "--out-layer", help="Layer/datatype of the exported contours."),
        grid_nm: float = typer.Option(0.1, "--grid-nm", min=1e-6, help="Database unit of GDS/OASIS output, nm."),
        per_image_cells: bool = typer.Option(False, "--per-image-cells", help="Put each image's polygons in its own cell <cell>_<image>, placed in the top cell."),
        export_opt: Optional[list[str]] = typer.Option(None, "--export-opt", help="Exporter option key=value, e.g. holes=datatype, cell=TOP, max_vertices=8189."),
        workers: int = typer.Option(1, "--workers", "-w", min=1, help="Images processed in parallel (processes)."),
        force: bool = typer.Option(False, "--force", help="Redo images already finished in OUT."),
        overlays: bool = typer.Option(True, "--overlays/--no-overlays", help="Write overlay PNGs (contours over the SEM image)."),
        report: bool = typer.Option(False, "--report", help="Write report.html (self-contained review page) and report.json."),
    ):
        """Extract contours from SEM images, aligned to the layout, and export them.

        Example:

            segsem extract examples/data/manifest.csv --layout examples/opc_test.gds --export gds --out out/ --gauges examples/gauges.csv

        Writes OUT/contours.gds (or .oas/.csv), OUT/features.csv (source and confidence per feature),
        OUT/gauges.csv (with --gauges), OUT/summary.json, OUT/images/*.json and OUT/overlays/*.png.
        """
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from ..layout import parse_layer
        from ..pipeline import ExtractConfig, run_extract, tone_check_note
        from ..scanlines import SCAN_LINE_MODES

        console = Console(stderr=True)
        out_l, out_d = parse_layer(out_layer, what="--out-layer")
        if model is not None and not model.is_file():
            raise SegsemError(f"{model}: model file not found")
        cfg = ExtractConfig(
            manifest=manifest,
            layout=layout,
            out=out,
            cell=cell,
            layer=parse_layer(layer),
            export=export,
            export_options=dict(layer=out_l, datatype=out_d, grid_nm=grid_nm, per_image_cells=per_image_cells) | parse_kv(export_opt, "--export-opt"),
            fallback=fallback,
            fallback_options=parse_kv(fallback_opt, "--fallback-opt"),
            backbone=backbone,
            model=model,
            backbone_options=parse_kv(backbone_opt, "--backbone-opt"),
            threshold=threshold,
            mode=_choice(mode, "--mode", ("hybrid", "backbone", "fallback")),
            device=device,
            gauges=gauges,
            search_px=search_px, polarity=_polarity(polarity), scan_lines=_choice(scan_lines, "--scan-lines", SCAN_LINE_MODES),
            border_margin_px=_border_margin(border_margin),
            align=not no_align,
            edge_align=not no_edge_align,
            workers=workers,
            force=force,
            overlays=overlays,
            refine=not no_refine,
            edge_options=parse_kv(edge_opt, "--edge-opt"),
        )
        if not Path(manifest).is_file():  # before any output (progress bar, notes)
            raise SegsemError(f"{manifest}: manifest not found")
        if model is None:
            console.print(f"[yellow]note:[/] no --model given: running the '{fallback}' fallback alone.")
            if mode == "backbone":
                raise SegsemError("--mode backbone needs --model")
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=False) as prog:
            task = prog.add_task("extract", total=None)

            def on_start(n_todo, n_done):
                prog.update(task, total=n_todo)
                if n_done:
                    console.print(f"resuming: {n_done} image(s) already done in {out} (use --force to redo)")

            def on_image(rec):
                prog.advance(task)
                if rec.get("status") in ("failed", "error"):
                    console.print(f"[red]{rec['image']}[/]: {rec.get('status')}: {rec.get('message', '')}", highlight=False)

            summary = run_extract(cfg, progress=on_image, on_start=on_start)
        _print_summary(summary)
        note = tone_check_note(summary.images)
        if note:
            console.print(f"[yellow]note:[/] {note}", highlight=False)
        if summary.polarity_from_batch:
            tone = summary.batch_polarity
            console.print(f"polarity: {len(summary.polarity_from_batch)} image(s) whose own data could not tell the "
                          f"polygon tone re-run as '{tone['polarity']}', the tone of {tone['votes']} of the "
                          f"{tone['of']} images that could ({', '.join(summary.polarity_from_batch[:5])}"
                          f"{', ...' if len(summary.polarity_from_batch) > 5 else ''})", highlight=False)
        if report:
            from ..report import write_report

            paths = write_report(summary, cfg)
            console.print(f"report: {paths[0]}")
        failed = summary.counts.get("failed", 0) + summary.counts.get("error", 0)
        if failed and failed == len(summary.images):
            raise typer.Exit(1)


def _print_summary(summary) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"segsem extract -> {summary.out}")
    for c in ("image", "status", "offset px (u, v)", "score", "features ok", "sources", "time s"):
        t.add_column(c)
    for r in summary.images:
        off = r.get("offset_px")
        off_s = f"{off[0]:+.2f}, {off[1]:+.2f}" if off else ""
        score = r.get("align_score")
        t.add_row(
            r["image"],
            r.get("status", ""),
            off_s,
            f"{score:.3f}" if isinstance(score, (int, float)) else "",
            f"{r.get('n_ok', 0)}/{r.get('n_features', 0)}",
            ", ".join(f"{k}:{v}" for k, v in sorted(r.get("sources", {}).items())),
            f"{r.get('elapsed_s', 0):.2f}",
        )
    c = Console()
    c.print(t)
    for k, v in summary.outputs.items():
        c.print(f"{k}: {v}")


def _choice(value: str, option: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise SegsemError(f"{option}: '{value}' is not one of {', '.join(choices)}")
    return value


def _polarity(value: str) -> str:
    return _choice(value, "--polarity", ("auto", "bright", "dark"))


def _border_margin(value: float) -> float:
    if not (math.isfinite(value) and 0.0 <= value <= 64.0):
        raise SegsemError(f"--border-margin: must be between 0 and 64 pixels, got {value!r}")
    return float(value)
