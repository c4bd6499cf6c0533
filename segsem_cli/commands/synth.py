"""``segsem synth``: a realistic CD-SEM simulator with exact ground truth."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..errors import SegsemError


def parse_size(text: str) -> tuple[int, int]:
    """``"1024"`` -> (1024, 1024); ``"384x512"`` -> (H=384, W=512)."""
    s = str(text).lower().replace(" ", "")
    try:
        if "x" in s:
            h, w = s.split("x", 1)
            return int(h), int(w)
        n = int(s)
        return n, n
    except ValueError:
        raise SegsemError(f"--size: '{text}' is not N or HxW (pixels)") from None


def register(app: typer.Typer) -> None:
    @app.command("synth")
    def synth(
        layout: Path = typer.Argument(..., help="Layout file (.gds or .oas), polygons in one cell/layer."),
        out: Optional[Path] = typer.Option(None, "--out", help="Output folder (images, labels, manifest.csv, truth.json); required."),
        count: Optional[int] = typer.Option(None, "--count", help="Number of images (default: one per --sites row)."),
        seed: int = typer.Option(0, "--seed", help="Random seed; image i depends only on (seed, i)."),
        cell: Optional[str] = typer.Option(None, "--cell", help="Cell name (default: the single top cell)."),
        layer: str = typer.Option("1/0", "--layer", help="Layer/datatype of the printed features."),
        tone: str = typer.Option("resist", "--tone", help="resist: polygons print as resist; opening: polygons are holes/trenches in resist."),
        size: str = typer.Option("1024", "--size", help="Image size in pixels: N or HxW."),
        pixel_nm: float = typer.Option(1.0, "--pixel-nm", help="Pixel size in nm."),
        noise: str = typer.Option("medium", "--noise", help="Difficulty preset: easy, medium, hard or mixed (cycles the three)."),
        param: Optional[List[str]] = typer.Option(None, "--param", help="Override a model parameter, NAME=VALUE (repeatable), e.g. --param dose=20 --param blur_nm=2."),
        sites: Optional[Path] = typer.Option(None, "--sites", help="CSV of nominal image centres (x_nm,y_nm); default random sites."),
        gauges: Optional[Path] = typer.Option(None, "--gauges", help="Gauge cutlines CSV (name,x1,y1,x2,y2 nm): writes gauges_truth.csv."),
        defects: Optional[float] = typer.Option(None, "--defects", help="Probability per feature of a defect (bridge, neck or missing)."),
        force: bool = typer.Option(False, "--force", help="Replace a dataset already in --out."),
        list_params: bool = typer.Option(False, "--list-params", help="Print every parameter with its preset values and exit."),
    ):
        """Simulate CD-SEM images of a layout with exact ground truth contours.

        Prints the design polygons (bias, corner rounding, line-end pullback,
        line-edge roughness, optional defects), renders them with a physical
        SEM edge model (truth = resist sidewall at mid-height) and imaging
        effects (beam blur, charging, shot and scan-line noise, drift, stage
        error), and writes TIFF images with the pixel size in their metadata,
        instance label masks, manifest.csv (nominal centres), truth.json and,
        with --gauges, gauges_truth.csv.

        Example: segsem synth examples/opc_test.gds --out synth/ --count 30 --size 1024 --noise hard --gauges examples/gauges.csv
        """
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        from ..synth.dataset import NOISE_LEVELS, PRESETS, make_dataset, resolve_params

        console = Console()
        if list_params:
            rows = {lvl: resolve_params(lvl).as_dict() for lvl in NOISE_LEVELS}
            console.print(f"{'parameter':<20}" + "".join(f"{lvl:>12}" for lvl in NOISE_LEVELS))
            for k in rows["easy"]:
                mark = "*" if any(k in PRESETS[lvl] for lvl in NOISE_LEVELS) else " "
                console.print(f"{k:<19}{mark}" + "".join(f"{str(rows[lvl][k]):>12}" for lvl in NOISE_LEVELS),
                              highlight=False)
            console.print("(* set by the presets; every parameter can be overridden with --param NAME=VALUE)")
            return

        from ..layout import load_layout, parse_layer

        if out is None:
            raise SegsemError("--out: an output folder is required")

        shape = parse_size(size)
        lay = load_layout(layout, cell=cell, layer=parse_layer(layer))
        with Progress(TextColumn("synth"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=console, transient=True) as bar:
            task = bar.add_task("synth", total=count or 0)

            def progress(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            res = make_dataset(
                lay, out, count=count, seed=seed, image_size=shape, pixel_nm=pixel_nm, noise=noise, tone=tone,
                sites=sites, gauges=gauges, params=param or None, defect_rate=defects, overwrite=force,
                progress=progress,
            )
        extra = ", gauges_truth.csv" if res["gauges_truth"] is not None else ""
        console.print(f"wrote {len(res['images'])} images ({shape[0]}x{shape[1]} px, {pixel_nm:g} nm/px, "
                      f"noise {noise}) to {res['out_dir']}: manifest.csv, truth.json{extra}", highlight=False)
