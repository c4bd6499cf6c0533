#!/usr/bin/env python
"""Speed of ``segsem synth``: time to print and render one image, on one core.

Usage (from the repository root)::

    python benchmarks/bench_synth.py [--size 1024] [--repeat 3] [--threads 1]

Cases use the bundled layout ``examples/opc_test.gds``: a dense line/space
field (20/40 and 30/60 nm), the 2-D logic clip, and the contact-hole arrays
(layer 2/0, tone ``opening``), each at the three noise presets. Columns:
``features`` printed in the view, ``litho`` (printing + clipping),
``render`` (exact signed distance, analytic pixel averages, blur, charging,
noise), ``total`` per image (best of ``--repeat``), and the time of a
``make_dataset`` run writing TIFF/PNG/JSON per image.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--pixel-nm", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="threads for OpenCV/BLAS (default 1: one core)")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    import cv2
    import numpy as np

    cv2.setNumThreads(args.threads)
    from segsem_cli.layout import load_layout
    from segsem_cli.synth import dataset as ds
    from segsem_cli.synth.litho import print_features
    from segsem_cli.synth.render import render_sem
    from segsem_cli.transform import PixelTransform

    gds = ROOT / "examples" / "opc_test.gds"
    lines = load_layout(gds, layer=(1, 0))
    holes = load_layout(gds, layer=(2, 0))
    shape = (args.size, args.size)
    cases = [
        ("dense L/S 20/40 + 30/60", lines, (800.0, 400.0 + args.size / 2 * args.pixel_nm), "resist"),
        ("logic clip", lines, (800.0, 2800.0), "resist"),
        ("contact holes", holes, (1600.0, 3600.0), "opening"),
    ]
    print(f"segsem synth benchmark: {shape[0]}x{shape[1]} px at {args.pixel_nm:g} nm/px, "
          f"{args.threads} thread(s), best of {args.repeat}")
    head = f"{'case':<26}{'noise':<8}{'features':>9}{'litho s':>9}{'render s':>10}{'total s':>9}"
    print(head)
    print("-" * len(head))
    totals = []
    for name, lay, centre, tone in cases:
        for level in ds.NOISE_LEVELS:
            prm = ds.resolve_params(level)
            best = (np.inf, np.inf)
            nfeat = 0
            for rep in range(args.repeat):
                rng = np.random.default_rng([0, rep])
                tr = PixelTransform(center_nm=centre, pixel_nm=args.pixel_nm, shape=shape)
                t0 = time.perf_counter()
                render_box = tr.field_of_view_nm(prm.render.margin_nm() / args.pixel_nm + 2)
                m = prm.litho.margin_nm()
                lb = (render_box[0] - m, render_box[1] - m, render_box[2] + m, render_box[3] + m)
                from shapely.geometry import box as sbox

                win = sbox(*lb)
                design, idx = [], []
                for i in lay.query(lb):
                    for part in ds._clip_parts(lay.polygons[i], win):
                        design.append(part)
                        idx.append(i)
                printed = print_features(design, params=prm.litho, rng=rng, design_indices=idx, protect=lb)
                rwin = sbox(*render_box)
                shapes = [p for f in printed if f.shape is not None for p in ds._clip_parts(f.shape, rwin)]
                t1 = time.perf_counter()
                out = render_sem(shapes, tr, params=prm.render, rng=rng, tone=tone)
                t2 = time.perf_counter()
                nfeat = int(len(np.unique(out.clean.labels)) - 1)
                if t2 - t0 < sum(best):
                    best = (t1 - t0, t2 - t1)
            totals.append(sum(best))
            print(f"{name:<26}{level:<8}{nfeat:>9}{best[0]:>9.3f}{best[1]:>10.3f}{sum(best):>9.3f}")
    print("-" * len(head))
    print(f"{'mean per image':<43}{'':>19}{np.mean(totals):>9.3f}")

    # end to end, with file writing
    n = 6
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        ds.make_dataset(lines, Path(tmp) / "d", count=n, seed=1, image_size=shape, pixel_nm=args.pixel_nm,
                        noise="mixed")
        dt = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in (Path(tmp) / "d").iterdir())
    print(f"make_dataset: {n} images (random sites, mixed noise) in {dt:.2f} s = {dt / n:.3f} s/image, "
          f"{size / 1e6:.1f} MB written")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
