"""How well can the layout offset be known at all? Edge alignment fed with the TRUE printed shapes.

For each image of a ``segsem synth`` dataset, :func:`segsem_cli.edge_align.refine_offset`
(the estimator ``segsem extract`` uses after appearance alignment) is given the true printed
contours (from ``truth.json``) and the design polygons, both placed with the true transform,
so a perfect extraction and a perfect appearance match are assumed. Its remaining shift is
the part of the alignment error that comes from the print itself: line-edge roughness moves
each feature's midline, and beam drift (applied row by row) moves whole rows; neither is a
stage error. Printed with the drift left out and with it applied, next to what
``segsem extract`` reported on the same images when a run folder is given.

    python benchmarks/bench_align_bound.py DATASET_DIR [--run EXTRACT_OUT_DIR]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from bench_extract import align_errors  # same folder: the run's errors, as bench_extract scores them
from segsem_cli.edge_align import refine_offset
from segsem_cli.layout import load_layout
from segsem_cli.metrics import read_truth


def bound(dataset: Path, layout: Path) -> dict[str, dict[str, float]]:
    ims, _ = read_truth(dataset)
    truth = json.loads((dataset / "truth.json").read_text())["images"]
    lay = load_layout(layout)
    out = {}
    for im in ims:
        t = truth[im.name]
        h, w = t["shape"]
        drift = np.asarray(t["imaging"].get("row_shift_px") or np.zeros(h), float)
        cs, ds = [], []
        for f in t["features"]:
            if f.get("defect") or f.get("merged_design_indices"):
                continue
            ext = f["exterior"]
            ext = np.asarray(json.loads(ext) if isinstance(ext, str) else ext, float)
            poly = lay.polygons[f["design_index"]]
            pe = np.asarray(poly.exterior.coords if hasattr(poly, "exterior") else poly, float)[:, :2]
            cs.append(im.transform.to_pixel(ext))
            ds.append(im.transform.to_pixel(pe))
        r0 = refine_offset(cs, ds, (h, w))
        rows = [np.clip(c[:, 1].astype(int), 0, len(drift) - 1) for c in cs]
        cd = [c + np.stack([drift[r], np.zeros(len(c))], 1) for c, r in zip(cs, rows)]
        r1 = refine_offset(cd, ds, (h, w))
        out[im.name] = {"no_drift": float(np.hypot(*r0.shift_px)), "drift": float(np.hypot(*r1.shift_px))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", type=Path, nargs="+", help="segsem synth output folder(s)")
    ap.add_argument("--run", type=Path, nargs="*", default=[], help="segsem extract --out folder per dataset")
    ap.add_argument("--layout", type=Path, default=Path(__file__).resolve().parents[1] / "examples" / "opc_test.gds")
    a = ap.parse_args()
    tab = Table(title="alignment error (px) of edge alignment given the TRUE printed shapes, mean / max")
    for c in ("dataset", "images", "true shapes, no drift", "true shapes + drift", "segsem extract"):
        tab.add_column(c, justify="right")
    for i, d in enumerate(a.dataset):
        b = bound(d, a.layout)
        e0 = np.array([v["no_drift"] for v in b.values()])
        e1 = np.array([v["drift"] for v in b.values()])
        ours = "-"
        if i < len(a.run):
            ex = np.array(align_errors(a.run[i], d))
            ours = f"{ex.mean():.3f} / {ex.max():.3f}" if len(ex) else "-"
        tab.add_row(d.name, str(len(b)), f"{e0.mean():.3f} / {e0.max():.3f}", f"{e1.mean():.3f} / {e1.max():.3f}", ours)
    Console(width=150).print(tab)


if __name__ == "__main__":
    main()
