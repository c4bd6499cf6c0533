"""``segsem evaluate``: score extracted contours (and gauge CDs) against a truth directory."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from ..errors import SegsemError


def _f(v: Any, nd: int = 3) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def print_report(result: dict[str, Any], console=None) -> None:
    """Print the per-image / overall EPE table and the gauge summary with rich."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(
        title="EPE (nm): distance from the true contour to the nearest predicted edge",
        title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 0, 0, 1), pad_edge=False,
    )
    t.add_column("image", no_wrap=True, overflow="fold")
    for col in ("true", "ok", "miss", "extra", "sliver", "rms", "p95", "max", "bias", "rms px", "max px"):
        t.add_column(col, justify="right", no_wrap=True)

    def add(name, d, **kw):
        t.add_row(
            name, str(d["n_true"]), str(d["n_matched"]), str(d["n_missing"]), str(d["n_extra"]),
            str(d.get("n_sliver", 0)), _f(d["epe_rms_nm"]), _f(d["epe_p95_nm"]), _f(d["epe_max_nm"]), _f(d["epe_bias_nm"]),
            _f(d["epe_rms_px"], 2), _f(d["epe_max_px"], 2), **kw,
        )

    for d in result["images"]:
        add(d["image"], d)
    add("overall", result["overall"], style="bold", end_section=True)
    console.print(t)
    if result.get("unassigned"):
        console.print(f"[yellow]{result['unassigned']} predicted contour(s) lie in no truth image[/]")
    g = result.get("gauges")
    if g is not None:
        gt = Table(title="Gauges (nm): error = measured - true CD", title_justify="left", box=box.SIMPLE_HEAD)
        for col in ("compared", "bias", "3 sigma", "max |err|", "rms", "missing", "spurious"):
            gt.add_column(col, justify="right", no_wrap=True)
        gt.add_row(str(g["n_compared"]), _f(g["bias_nm"]), _f(g["sigma3_nm"]), _f(g["max_abs_nm"]), _f(g["rms_nm"]),
                   str(g["n_missing"]), str(g["n_spurious"]))
        console.print(gt)


def register(app: typer.Typer) -> None:
    @app.command("evaluate")
    def evaluate(
        truth: Path = typer.Option(..., "--truth", help="Truth folder (segsem synth output: truth.json, manifest.csv, gauges_truth.csv)."),
        pred: Path = typer.Option(..., "--pred", help="Predicted contours: .csv, .gds or .oas (segsem extract output)."),
        gauges: Optional[Path] = typer.Option(None, "--gauges", help="Measured gauge table (gauges.csv from segsem extract) to compare with gauges_truth.csv."),
        json_out: Optional[Path] = typer.Option(None, "--json", help="Write all numbers to this JSON file."),
        overlays: Optional[Path] = typer.Option(None, "--overlays", help="Write <image>.png overlays here (truth green, prediction red)."),
        layer: str = typer.Option("100/0", "--layer", help="Layer/datatype of the contours in a GDS/OASIS file."),
        assign: str = typer.Option("auto", "--assign", help="How contours map to images: auto (CSV by name, layout files by field of view), name, fov."),
        match_dist_nm: Optional[float] = typer.Option(None, "--match-dist-nm", help="Distance beyond which an edge counts as unmatched (default 4 pixels)."),
        missing_frac: float = typer.Option(0.5, "--missing-frac", help="A feature is missing/extra when more than this fraction of its contour is unmatched."),
        step_nm: float = typer.Option(0.5, "--step-nm", help="Sample spacing along the true contours (nm)."),
        sliver_depth: float = typer.Option(3.0, "--sliver-depth", help="True features cut by the image border that reach on average less than this many pixels into the image (their sidewall top is out of view) are counted as slivers, not scored; 0 scores them all."),
    ):
        """Score extracted contours against ground truth: EPE per image and overall, missing and
        extra features, and (with --gauges) gauge CD bias, 3 sigma and max error.

        Example: segsem evaluate --truth synth/ --pred out/contours.csv --gauges out/gauges.csv --json score.json
        """
        from ..atomic import write_json
        from ..layout import parse_layer
        from ..metrics import evaluate_run

        lay = parse_layer(layer, what="--layer")
        result = evaluate_run(
            truth,
            pred,
            gauges_path=gauges,
            layer=lay,
            assign=assign,
            match_dist_nm=match_dist_nm,
            missing_frac=missing_frac,
            step_nm=step_nm,
            sliver_depth_px=sliver_depth,
            overlays_dir=overlays,
        )
        if not result["images"]:
            raise SegsemError(f"{truth / 'truth.json'}: no images")
        print_report(result)
        if json_out is not None:
            write_json(json_out, result)
