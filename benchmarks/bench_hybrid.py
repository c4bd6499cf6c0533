"""Backbone-only vs fallback-only vs hybrid, side by side in one run.

1. fine-tunes a SAM2 model on a synthetic training set (default: the micro config from random
   weights on CPU, since no official checkpoint can be downloaded here; pass --checkpoint and
   --config sam2.1_hiera_t to start from an official one),
2. calibrates it (`segsem calibrate`: edge threshold + confidence threshold) on a separate
   labelled validation set,
3. extracts an easy test set and a hard one (low dose, strong charging, bridges, necks and
   missing features) in four modes: fallback only, backbone only before refinement, backbone
   only refined, hybrid; scores each with `segsem evaluate`.

    python benchmarks/bench_hybrid.py                       # CPU, micro config, ~10 minutes
    python benchmarks/bench_hybrid.py --config sam2.1_hiera_t --checkpoint sam2.1_hiera_tiny.pt --device cuda

Targets (issue 6): the hybrid has no more failures than the better of the two and an EPE no worse
than fallback-only; refinement brings SAM2-sourced EPE within 10 % of the threshold fallback's on
easy images.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="segsem-micro")
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--train", default=None, help="default: full for random init, encoders from a checkpoint")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--image-size", type=int, default=256, help="model input size")
    ap.add_argument("--size", type=int, default=384, help="test image size (px)")
    ap.add_argument("--train-count", type=int, default=12)
    ap.add_argument("--val-count", type=int, default=4)
    ap.add_argument("--test-count", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from segsem_cli.calibrate import calibrate, store_threshold
    from segsem_cli.layout import load_layout
    from segsem_cli.metrics import evaluate_run
    from segsem_cli.pipeline import ExtractConfig, run_extract
    from segsem_cli.sam.train import finetune
    from segsem_cli.synth.dataset import make_dataset

    console = Console(width=200)
    layout_path = ROOT / "examples" / "opc_test.gds"
    gauges = ROOT / "examples" / "gauges.csv"
    layout = load_layout(layout_path)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="segsem-hybrid-"))
    work.mkdir(parents=True, exist_ok=True)

    hard = {"dose": 8.0, "charging": 0.25, "charging_dark": 0.2}
    sets = {
        "train": dict(count=args.train_count, noise="mixed", defect_rate=0.05),
        "val": dict(count=args.val_count, noise="mixed", defect_rate=0.05),
        "easy": dict(count=args.test_count, noise="easy"),
        "hard": dict(count=args.test_count, noise="hard", params=hard, defect_rate=0.15),
    }
    for k, (name, kw) in enumerate(sets.items()):
        if not (work / name / "manifest.csv").is_file():
            make_dataset(layout, work / name, seed=args.seed * 100 + k, image_size=args.size, pixel_nm=1.0,
                         gauges=gauges, overwrite=True, **kw)

    model = work / "model.pt"
    t0 = time.perf_counter()
    if not model.is_file():
        train = args.train or ("encoders" if args.checkpoint else "full")
        finetune(work / "train" / "manifest.csv", model, config=args.config, checkpoint=args.checkpoint, train=train,
                 val=work / "val" / "manifest.csv", epochs=args.epochs, lr=2e-3 if args.checkpoint is None else 1e-5,
                 image_size=args.image_size, seed=args.seed, device=args.device,
                 loss_weights={"focal": 1.0, "dice": 1.0, "iou": 1.0} if args.checkpoint is None else None, progress=False)
        cal = calibrate(ExtractConfig(manifest=work / "val" / "manifest.csv", layout=layout_path, out=work / "cal",
                                      model=model, device=args.device))
        store_threshold(model, cal)
    t_train = time.perf_counter() - t0
    meta_thr = _meta(model)
    console.print(f"model {model} (train+calibrate {t_train:.0f} s): edge threshold {meta_thr.get('edge_threshold')}, "
                  f"confidence threshold {meta_thr.get('threshold')}")
    edge_t = meta_thr.get("edge_threshold")

    modes = [
        ("fallback only", dict(model=None, fallback_options={"threshold": f"{edge_t:.4f}"} if edge_t else {})),
        ("backbone only, raw mask", dict(model=model, mode="backbone", refine=False)),
        ("backbone only, refined", dict(model=model, mode="backbone")),
        ("hybrid", dict(model=model, mode="hybrid")),
    ]
    table = Table(title=f"hybrid benchmark: {args.test_count} test images per set, {args.size} px, model {args.config} "
                        f"({'official weights' if args.checkpoint else 'random init'}), device {args.device}")
    for col in ("set", "mode", "EPE RMS px", "EPE p95 px", "EPE RMS sam2-sourced px", "missing", "extra", "failed features",
                "fallback rate", "CD bias nm", "CD 3σ nm", "s / image"):
        table.add_column(col, justify="right")
    results = {}
    for set_name in ("easy", "hard"):
        d = work / set_name
        for mode_name, kw in modes:
            out = d / ("out_" + mode_name.replace(" ", "_").replace(",", ""))
            cfg = ExtractConfig(manifest=d / "manifest.csv", layout=layout_path, out=out, export="csv", gauges=gauges,
                                overlays=False, force=True, device=args.device, **kw)
            t0 = time.perf_counter()
            summary = run_extract(cfg)
            dt = (time.perf_counter() - t0) / max(len(summary.images), 1)
            ev = evaluate_run(d, out / "contours.csv", gauges_path=out / "gauges.csv")
            sam_only = _source_subset(out / "contours.csv", "sam2")
            ev_sam = evaluate_run(d, sam_only) if sam_only else None
            feats = [f for im in summary.images for f in [im]]
            n_fail = sum(int(im.get("n_features") or 0) - int(im.get("n_ok") or 0) for im in feats)
            srcs: dict[str, int] = {}
            for im in summary.images:
                for s, n in (im.get("sources") or {}).items():
                    srcs[s] = srcs.get(s, 0) + n
            n_src = sum(srcs.values())
            fb_rate = (n_src - srcs.get("sam2", 0)) / n_src if n_src else float("nan")
            o, g = ev["overall"], ev.get("gauges") or {}
            table.add_row(set_name, mode_name, f"{o['epe_rms_px']:.3f}", f"{o['epe_p95_px']:.3f}",
                          f"{ev_sam['overall']['epe_rms_px']:.3f}" if ev_sam else "-",
                          str(o["n_missing"]), str(o["n_extra"]), str(n_fail), f"{fb_rate:.2f}",
                          f"{g['bias_nm']:+.3f}" if g.get("bias_nm") is not None else "-",
                          f"{g['sigma3_nm']:.3f}" if g.get("sigma3_nm") is not None else "-", f"{dt:.2f}")
            results[f"{set_name}/{mode_name}"] = dict(epe_rms_px=o["epe_rms_px"], missing=o["n_missing"], extra=o["n_extra"],
                                                      failed=n_fail, fallback_rate=fb_rate, s_per_image=dt,
                                                      sam2_epe_rms_px=ev_sam["overall"]["epe_rms_px"] if ev_sam else None,
                                                      gauges=g)
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float))
    return 0


def _meta(model: Path) -> dict:
    from segsem_cli.sam.model import load_checkpoint

    return load_checkpoint(model)[1]


def _source_subset(contours_csv: Path, source: str) -> Path | None:
    """The rows of a contour CSV whose source is ``source`` (None when there are none)."""
    import csv

    rows = list(csv.DictReader(contours_csv.open()))
    keep = [r for r in rows if r["source"] == source]
    if not keep:
        return None
    p = contours_csv.with_name(contours_csv.stem + f"_{source}.csv")
    with p.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(keep)
    return p


if __name__ == "__main__":
    sys.exit(main())
