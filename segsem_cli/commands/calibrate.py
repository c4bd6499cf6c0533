"""``segsem calibrate``: choose the hybrid's confidence threshold on labelled images."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .extract import SCAN_LINES_HELP


def register(app: typer.Typer) -> None:
    @app.command("calibrate")
    def calibrate_cmd(
        manifest: Path = typer.Argument(..., help="Labelled validation manifest (label column, or truth.json beside it)."),
        model: Optional[Path] = typer.Option(None, "--model", "-m", help="Fine-tuned checkpoint; the thresholds are stored in it. Without it only the edge threshold is fitted."),
        layout: Path = typer.Option(..., "--layout", "-l", help="Layout file (.gds or .oas)."),
        cell: Optional[str] = typer.Option(None, "--cell", help="Layout cell (default: the single top cell)."),
        layer: str = typer.Option("1/0", "--layer", help="Layout layer/datatype of the features."),
        fallback: str = typer.Option("threshold", "--fallback", "-f", help="Fallback used by the hybrid."),
        fallback_opt: Optional[list[str]] = typer.Option(None, "--fallback-opt", help="Fallback option key=value (repeatable)."),
        backbone: str = typer.Option("sam2", "--backbone", help="Backbone plugin."),
        backbone_opt: Optional[list[str]] = typer.Option(None, "--backbone-opt", help="Backbone option key=value (repeatable)."),
        edge_opt: Optional[list[str]] = typer.Option(None, "--edge-opt", help="Edge refinement option key=value."),
        truth: Optional[Path] = typer.Option(None, "--truth", help="truth.json (default: beside the manifest if present, else the label masks)."),
        penalty_px: float = typer.Option(3.0, "--penalty-px", min=0.0, help="Cost of a feature left without contour, in px of EPE."),
        device: str = typer.Option("cpu", "--device", help="Torch device."),
        polarity: str = typer.Option("auto", "--polarity", help="Layout polygons print bright (resist lines) or dark (holes): auto|bright|dark. Resolves line/space ambiguity in alignment."),
        scan_lines: str = typer.Option("auto", "--scan-lines", help=SCAN_LINES_HELP),
        search_px: Optional[float] = typer.Option(None, "--search-px", min=0.0, help="Largest stage error searched by alignment (pixels; default 40 px or 40 nm, whichever is more pixels)."),
        out: Optional[Path] = typer.Option(None, "--out", help="Write the calibrated model here instead of updating MODEL in place."),
        json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the curves as JSON."),
        edge: bool = typer.Option(True, "--edge/--no-edge", help="Also fit the edge threshold (where on the SEM profile the labelled edge lies)."),
    ):
        """Fit the edge threshold and pick the confidence threshold on labelled images; store them in the model.

        Example:

            segsem calibrate val/manifest.csv --model model.pt --layout chip.gds

        1. Edge threshold (--edge, default on): the fallback runs at thresholds 0.30..0.85 between the
           substrate minimum and the rim peak; the one whose contours best match the labels is kept.
        2. Confidence threshold (needs --model): prints the curve (threshold vs fallback rate vs EPE vs
           failures) and keeps the threshold of lowest cost.
        `segsem extract --model` then uses both unless --threshold / --fallback-opt threshold= are given.
        Without --model only step 1 runs and the value to pass as --fallback-opt threshold=T is printed.
        """
        from rich.console import Console
        from rich.table import Table

        from ..atomic import write_json
        from ..errors import SegsemError
        from ..calibrate import calibrate, store_threshold
        from ..commands.extract import _choice, _polarity, parse_kv
        from ..scanlines import SCAN_LINE_MODES
        from ..layout import parse_layer
        from ..pipeline import ExtractConfig

        cfg = ExtractConfig(
            manifest=manifest, layout=layout, out=Path("."), cell=cell, layer=parse_layer(layer), fallback=fallback,
            fallback_options=parse_kv(fallback_opt, "--fallback-opt"), backbone=backbone, model=model,
            backbone_options=parse_kv(backbone_opt, "--backbone-opt"), device=device, search_px=search_px, polarity=_polarity(polarity), scan_lines=_choice(scan_lines, "--scan-lines", SCAN_LINE_MODES),
            edge_options=parse_kv(edge_opt, "--edge-opt"), overlays=False,
        )
        console = Console()
        if model is None and not edge:
            raise SegsemError("nothing to calibrate: give --model, or keep --edge")
        with console.status("scoring on the labelled images..."):
            cal = calibrate(cfg, truth_path=truth, penalty_px=penalty_px, fit_edge=edge)
        if cal.edge_threshold is not None:
            et = Table(title=f"edge threshold: fallback '{fallback}' EPE vs threshold on {cal.n_images} images")
            et.add_column("edge threshold", justify="right")
            et.add_column("EPE RMS px", justify="right")
            for row in cal.edge_curve:
                et.add_row(f"{row['edge_threshold']:.2f}", f"{row['epe_rms_px']:.3f}")
            console.print(et)
            console.print(f"edge threshold {cal.edge_threshold:.3f} (use --fallback-opt threshold={cal.edge_threshold:.3f} without a model)")
        if cal.curve:
            table = Table(title=f"confidence threshold on {cal.n_images} images, {cal.n_features} features (penalty {penalty_px} px)")
            for c in ("threshold", "fallback rate", "EPE RMS px", "failures", "cost px"):
                table.add_column(c, justify="right")
            for row in cal.curve[::5] + ([cal.curve[-1]] if (len(cal.curve) - 1) % 5 else []):
                mark = " <" if abs(row["threshold"] - cal.threshold) < 1e-9 else ""
                table.add_row(f"{row['threshold']:.2f}{mark}", f"{row['fallback_rate']:.2f}", f"{row['epe_rms_px']:.3f}", f"{int(row['failures'])}", f"{row['cost_px']:.3f}")
            chosen = next(r for r in cal.curve if abs(r["threshold"] - cal.threshold) < 1e-9)
            console.print(table)
            console.print(
                f"chosen threshold {cal.threshold:.2f}: fallback rate {chosen['fallback_rate']:.2f}, "
                f"EPE RMS {chosen['epe_rms_px']:.3f} px, failures {int(chosen['failures'])}"
            )
        if model is not None:
            dest = store_threshold(model, cal, out)
            console.print(f"stored in {dest}")
        if json_out is not None:
            write_json(json_out, {"threshold": cal.threshold if cal.curve else None, "curve": cal.curve,
                                  "edge_threshold": cal.edge_threshold, "edge_curve": cal.edge_curve,
                                  "features": cal.n_features, "images": cal.n_images})

