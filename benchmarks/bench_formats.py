"""Alignment and extraction across image formats: is a wrong answer ever reported as `ok`?

The accuracy benchmark (`bench_extract.py`) runs square 1024 px images at 1 nm/px. Users'
CD-SEM images come in other shapes and pixel sizes, and a smaller or narrower field of view
sees fewer features: an axis may then be fixed only by line ends (which print pulled back) or
by a few feature sides cut by the border. This script generates `segsem synth` sets of
`examples/opc_test.gds` in several formats (non-square, 512 px, 0.5-1 nm/px; medium and hard
noise), runs `segsem extract` (`threshold`, the edge threshold of the benchmark, 0.665) and
prints, per set, the alignment statuses, the alignment error of the `ok` and of the
`ambiguous` images, how many images are `ok` yet more than 2 px off (gross silent failures:
the number that must be 0; up to about 1 px is the print's own midline spread, see
`bench_align_bound.py`), and the EPE against the simulator's truth.

    python benchmarks/bench_formats.py                 # 11 sets, 114 images, about 4 min on 2 cores
    python benchmarks/bench_formats.py --workdir /tmp/formats --workers 2
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402

cv2.setNumThreads(1)

ROOT = Path(__file__).resolve().parents[1]

#: ((height, width), nm/px, noise, seed, images): the sets of the twenty-second round's check
SETS = [
    ((768, 1024), 1.0, "medium", 77, 6), ((1024, 640), 0.75, "medium", 77, 6), ((1024, 1024), 1.0, "medium", 77, 6),
    ((600, 900), 1.0, "medium", 11, 12), ((600, 900), 1.0, "hard", 12, 12), ((512, 512), 1.0, "medium", 13, 12),
    ((512, 512), 0.5, "medium", 14, 12), ((768, 1024), 1.0, "hard", 15, 12), ((1024, 768), 1.0, "medium", 16, 12),
    ((1024, 1024), 1.0, "hard", 17, 12), ((900, 600), 0.75, "medium", 18, 12),
]


def run_set(work: Path, layout_path: Path, size, px: float, noise: str, seed: int, count: int, workers: int,
            threshold: float) -> dict:
    from bench_extract import align_error  # same folder: the error as the accuracy benchmark scores it
    from segsem_cli.layout import load_layout
    from segsem_cli.metrics import evaluate_run
    from segsem_cli.pipeline import ExtractConfig, run_extract
    from segsem_cli.synth.dataset import make_dataset

    d = work / f"{size[0]}x{size[1]}_{px:g}nm_{noise}_{seed}"
    if not (d / "manifest.csv").is_file():
        make_dataset(load_layout(layout_path), d, count=count, seed=seed, image_size=size, pixel_nm=px, noise=noise,
                     overwrite=True)
    out = d / "out"
    run_extract(ExtractConfig(manifest=d / "manifest.csv", layout=layout_path, out=out, export="csv", overlays=False,
                              fallback="threshold", fallback_options={"threshold": f"{threshold}"}, force=True,
                              workers=workers))
    truth = json.loads((d / "truth.json").read_text())["images"]
    errs: dict[str, list[float]] = {"ok": [], "ambiguous": [], "failed": []}
    for name, t in truth.items():
        rec = json.loads((out / "images" / f"{name}.json").read_text())
        st = rec.get("align_status") or rec.get("status")
        if rec.get("offset_nm") is None or st == "failed":
            errs["failed"].append(float("nan"))
            continue
        errs["ambiguous" if st == "ambiguous" else "ok"].append(align_error(rec, t))
    ev = evaluate_run(d, out / "contours.csv")["overall"]
    return {"set": d.name, "images": len(truth), "errs": errs, "epe": ev["epe_rms_px"], "p95": ev["epe_p95_px"],
            "missing": ev["n_missing"]}


def main(argv=None) -> int:
    from rich.console import Console
    from rich.table import Table

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None, help="keep the generated sets here")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threshold", type=float, default=0.665, help="edge threshold (bench_extract's calibrated one)")
    ap.add_argument("--layout", type=Path, default=ROOT / "examples" / "opc_test.gds")
    args = ap.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="segsem-formats-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = [run_set(work, args.layout, *s, workers=args.workers, threshold=args.threshold) for s in SETS]

    def mm(v):
        return f"{np.mean(v):.2f} / {np.max(v):.2f}" if v else "-"

    tab = Table(title=f"segsem extract (threshold, t = {args.threshold}) on synth images of opc_test.gds in other "
                      "formats: alignment error px (mean / max) and EPE RMS px")
    for c in ("set", "images", "ok / ambiguous / failed", "ok: error", "ok but > 2 px off", "ambiguous: error",
              "EPE RMS", "EPE p95", "missing"):
        tab.add_column(c, justify="right")
    tot = {"images": 0, "ok": 0, "amb": 0, "fail": 0, "silent": 0}
    for r in rows:
        e = r["errs"]
        silent = sum(x > 2.0 for x in e["ok"])
        tot["images"] += r["images"]
        tot["ok"] += len(e["ok"])
        tot["amb"] += len(e["ambiguous"])
        tot["fail"] += len(e["failed"])
        tot["silent"] += silent
        tab.add_row(r["set"], str(r["images"]), f"{len(e['ok'])} / {len(e['ambiguous'])} / {len(e['failed'])}",
                    mm(e["ok"]), str(silent), mm(e["ambiguous"]), f"{r['epe']:.3f}", f"{r['p95']:.3f}",
                    str(r["missing"]))
    tab.add_row("all", str(tot["images"]), f"{tot['ok']} / {tot['amb']} / {tot['fail']}", "", str(tot["silent"]),
                "", "", "", "")
    Console(width=200).print(tab)
    print(f"data: {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
