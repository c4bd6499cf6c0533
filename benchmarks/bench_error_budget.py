"""Error budget of `segsem extract` on the hard preset: what each imaging effect costs in EPE.

Regenerates the `bench_extract` hard set (same layout, seed, size and sites) with one
simulator parameter changed at a time, extracts each set the same way (defaults, the given
edge threshold) and prints EPE RMS, p95 and the mean signed error (positive: contour outside
the truth). The rows answer "what would the hard score be without this effect?"; they are
diagnostics, not a target.

    python benchmarks/bench_error_budget.py                  # 10 images, 1024 x 1024, t = 0.66
    python benchmarks/bench_error_budget.py --count 4 --size 512

Changing a parameter that draws random numbers (charging, drift) also changes the noise
realisation of what follows; those rows move by about +/-0.02 px for that reason alone.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import cv2  # noqa: E402

cv2.setNumThreads(1)

ROOT = Path(__file__).resolve().parents[1]

NOISE_FREE = {"dose": 1500.0, "scan_offset_sigma": 0.0, "scan_gain_sigma": 0.0, "drift_px": 0.0, "read_noise": 0.0}
MEDIUM_BLUR = {"blur_nm": 1.8, "astig": 1.25}
#: (label, simulator overrides on top of the hard preset, edge threshold or None for --threshold)
VARIANTS = [
    ("nothing changed", {}, None),
    ("no scan-line jitter", {"scan_offset_sigma": 0.0, "scan_gain_sigma": 0.0}, None),
    ("line-edge roughness 1.2 nm (hard: 1.8)", {"ler_sigma_nm": 1.2}, None),
    ("10x the dose (150 e-/px)", {"dose": 150.0}, None),
    ("medium blur (1.8 nm, astig 1.25)", MEDIUM_BLUR, None),
    ("no noise of any kind", NOISE_FREE, None),
    ("no noise, t = 0.70", NOISE_FREE, 0.70),
    ("no noise, medium blur", {**NOISE_FREE, **MEDIUM_BLUR}, None),
    ("nothing changed, t = 0.70", {}, 0.70),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=10)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=2028, help="bench_extract's hard set uses 2026 + 2")
    ap.add_argument("--threshold", type=float, default=0.66, help="edge threshold (bench_extract calibrates 0.66)")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from segsem_cli.layout import load_layout
    from segsem_cli.metrics import evaluate_run
    from segsem_cli.pipeline import ExtractConfig, run_extract
    from segsem_cli.synth.dataset import make_dataset

    layout_path = ROOT / "examples" / "opc_test.gds"
    layout = load_layout(layout_path)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="segsem-budget-"))
    table = Table(title=f"hard preset error budget: {args.count} images, {args.size}x{args.size} px, 1 nm/px, "
                        f"seed {args.seed}")
    for col in ("hard images regenerated with", "t", "EPE RMS px", "EPE p95 px", "mean signed nm", "missing"):
        table.add_column(col, justify="left" if col.startswith("hard") else "right")
    made: dict[str, Path] = {}
    t0 = time.perf_counter()
    for k, (label, params, t) in enumerate(VARIANTS):
        key = repr(sorted(params.items()))
        if key not in made:
            made[key] = work / f"set{len(made)}"
            make_dataset(layout, made[key], count=args.count, seed=args.seed, image_size=args.size, pixel_nm=1.0,
                         noise="hard", params=dict(params), overwrite=True)
        d = made[key]
        thr = args.threshold if t is None else t
        out = d / f"out{k}"
        run_extract(ExtractConfig(manifest=d / "manifest.csv", layout=layout_path, out=out, export="csv",
                                  fallback_options={"threshold": f"{thr:.4f}"}, overlays=False, force=True))
        ev = evaluate_run(d, out / "contours.csv")["overall"]
        table.add_row(label, f"{thr:.2f}", f"{ev['epe_rms_px']:.3f}", f"{ev['epe_p95_px']:.3f}",
                      f"{ev['epe_bias_nm']:+.3f}", str(ev["n_missing"]))
    Console(width=140).print(table)
    print(f"total {time.perf_counter() - t0:.0f} s; data in {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
