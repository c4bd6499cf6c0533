"""``segsem calibrate``: choose the hybrid's confidence threshold on labelled images."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("calibrate")
    def calibrate_cmd(
        manifest: Path = typer.Argument(..., help="Labelled validation manifest (label column, or truth.json beside it)."),
        model: Path = typer.Option(..., "--model", "-m", help="Fine-tuned checkpoint; the threshold is stored in it."),
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
        search_px: float = typer.Option(40.0, "--search-px", min=0.0, help="Alignment search range (px)."),
        out: Optional[Path] = typer.Option(None, "--out", help="Write the calibrated model here instead of updating MODEL in place."),
        json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the curve as JSON."),
    ):
        """Pick the confidence threshold that minimises EPE and failures; store it in the model.

        Example:

            segsem calibrate val/manifest.csv --model model.pt --layout chip.gds

        Prints the curve (threshold vs fallback rate vs EPE vs failures); `segsem extract --model`
        then uses the stored threshold unless --threshold is given.
        """
        from rich.console import Console
        from rich.table import Table

        from ..atomic import write_json
        from ..calibrate import calibrate, store_threshold
        from ..commands.extract import parse_kv
        from ..layout import parse_layer
        from ..pipeline import ExtractConfig

        cfg = ExtractConfig(
            manifest=manifest, layout=layout, out=Path("."), cell=cell, layer=parse_layer(layer), fallback=fallback,
            fallback_options=parse_kv(fallback_opt, "--fallback-opt"), backbone=backbone, model=model,
            backbone_options=parse_kv(backbone_opt, "--backbone-opt"), device=device, search_px=search_px,
            edge_options=parse_kv(edge_opt, "--edge-opt"), overlays=False,
        )
        console = Console()
        with console.status("scoring backbone and fallback on the validation images..."):
            cal = calibrate(cfg, truth_path=truth, penalty_px=penalty_px)
        table = Table(title=f"calibration on {cal.n_images} images, {cal.n_features} features (penalty {penalty_px} px)")
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
        dest = store_threshold(model, cal, out)
        console.print(f"stored in {dest}")
        if json_out is not None:
            write_json(json_out, {"threshold": cal.threshold, "curve": cal.curve, "features": cal.n_features, "images": cal.n_images})
