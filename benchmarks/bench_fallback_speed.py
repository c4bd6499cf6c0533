"""Speed of the classical fallbacks on synthetic CD-SEM images (one process, one thread).

Builds images like the tests do (tests/synthetic_helpers.py: discs and
rectangles with a bright rim, blur and noise), runs the fallbacks and prints:

1. per-stage times of the ``threshold`` fallback on a 1024 x 1024 image with ~50
   features (smooth, coarse contours, association, refinement) and images/s;
2. how the time grows with image size (512, 1024, 2048) at a fixed feature density;
3. how it grows with the feature count at 1024 x 1024;
4. the ``canny`` and ``active-contour`` fallbacks on the 1024 x 1024 image;
5. END TO END: the whole ``run_extract`` (read, align, fallback, map, per-image
   records, CSV export, features table, gauges; no overlays, one worker) on
   ``segsem synth`` images (:func:`segsem_cli.synth.dataset.make_dataset`, medium
   noise, 1024 x 1024 px at 1 nm/px) of two layouts:

   * ``islands``: a layout written here (:func:`islands_layout`): rectangles,
     L-shapes and short bars on a 160 nm grid, about 50 features per field of view,
     with one gauge across each feature;
   * ``opc_test``: ``examples/opc_test.gds`` layer 1/0 with ``examples/gauges.csv``
     (line/space arrays, line ends, logic: fewer but long features).

   Per-stage ms/image (median over ``--repeat`` runs of the whole set) and images/s.

OpenCV runs single-threaded here (``cv2.setNumThreads(1)``) like numpy
(``OMP_NUM_THREADS=1``), so the figures are per core. The machine may be shared:
medians of several runs damp, but do not remove, contention.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_fallback_speed.py [--repeat 5] [--e2e-count 10]
    .venv/bin/python benchmarks/bench_fallback_speed.py --only-e2e      # just section 5
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

cv2.setNumThreads(1)  # per-core figures: OpenCV's own thread pool ignores OMP_NUM_THREADS

from synthetic_helpers import Rim, disc, rect, render  # noqa: E402

from segsem_cli.transform import PixelTransform  # noqa: E402
from segsem_cli.types import Feature, SEMImage  # noqa: E402


def scene(size: int, n_features: int, seed: int = 0):
    """~n_features discs and rectangles on a jittered grid over a size x size image."""
    rng = np.random.default_rng(seed)
    k = int(np.ceil(np.sqrt(n_features)))
    pitch = (size - 40) / k
    shapes = []
    for i in range(k * k):
        if len(shapes) >= n_features:
            break
        cu = 20 + (i % k + 0.5) * pitch + rng.uniform(-2, 2)
        cv = 20 + (i // k + 0.5) * pitch + rng.uniform(-2, 2)
        s = min(0.3 * pitch, 40)
        if i % 2:
            shapes.append(disc(cu, cv, s * rng.uniform(0.7, 1.0)))
        else:
            a, b = s * rng.uniform(0.6, 1.0), s * rng.uniform(0.6, 1.0)
            shapes.append(rect(cu - a, cv - b, cu + a, cv + b))
    return shapes


def make(size: int, n_features: int, noise: float = 0.05):
    shapes = scene(size, n_features)
    px = render(shapes, (size, size), rim=Rim(rim=4.0), blur=1.0, noise=noise, ss=2, seed=1)
    img = SEMImage(Path("bench.tif"), px, PixelTransform((0.0, 0.0), 1.0, px.shape))
    feats = [Feature(f"bench:{i}", np.zeros((0, 2)), s.polygon() + [0.7, -0.5]) for i, s in enumerate(shapes)]
    return img, feats, shapes


def time_it(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def islands_layout(path: Path, gauges_path: Path, *, extent_nm: float = 4400.0, pitch_nm: float = 160.0,
                   seed: int = 3) -> int:
    """Write a GDS (layer 1/0, top cell ``TOP``) of rectangles, L-shapes and short bars on a jittered
    ``pitch_nm`` grid (about 50 per 1024 nm field of view), and one gauge across each feature
    (``name,x1,y1,x2,y2`` nm, horizontal through the feature's bar). Returns the feature count."""
    import gdstk

    rng = np.random.default_rng(seed)
    lib = gdstk.Library(unit=1e-9, precision=1e-12)
    top = lib.new_cell("TOP")
    n = int(extent_nm // pitch_nm)
    rows = []
    for i in range(n):
        for j in range(n):
            cx = (i + 0.5) * pitch_nm + rng.uniform(-6, 6)
            cy = (j + 0.5) * pitch_nm + rng.uniform(-6, 6)
            kind = (i + 2 * j) % 3
            w = float(rng.uniform(30, 60))
            if kind == 0:  # rectangle
                h = float(rng.uniform(30, 80))
                top.add(gdstk.rectangle((cx - w / 2, cy - h / 2), (cx + w / 2, cy + h / 2), layer=1))
            elif kind == 1:  # L-shape: a bar w wide and 80 high with a foot 70 long
                pts = [(cx - 35, cy - 40), (cx + 35, cy - 40), (cx + 35, cy - 40 + 0.6 * w),
                       (cx - 35 + w, cy - 40 + 0.6 * w), (cx - 35 + w, cy + 40), (cx - 35, cy + 40)]
                top.add(gdstk.Polygon(pts, layer=1))
                cx = cx - 35 + w / 2  # the gauge crosses the vertical bar
            else:  # short vertical bar
                top.add(gdstk.rectangle((cx - w / 4, cy - 50), (cx + w / 4, cy + 50), layer=1))
                w = w / 2
            rows.append((f"F{i}_{j}", round(cx - w / 2 - 15, 3), round(cy + 10, 3), round(cx + w / 2 + 15, 3),
                         round(cy + 10, 3)))
    lib.write_gds(path)
    with open(gauges_path, "w", newline="") as fh:
        w_ = csv.writer(fh)
        w_.writerow(["name", "x1", "y1", "x2", "y2"])
        w_.writerows(rows)
    return n * n


def end_to_end(count: int, repeat: int, work: Path) -> None:
    """Section 5: run_extract on synth sets; per-stage ms/image (median of ``repeat`` runs)."""
    from segsem_cli.layout import load_layout
    from segsem_cli.pipeline import ExtractConfig, run_extract
    from segsem_cli.synth.dataset import make_dataset

    isl, isl_g = work / "islands.gds", work / "islands_gauges.csv"
    islands_layout(isl, isl_g)
    scenes = [("islands", isl, isl_g), ("opc_test", ROOT / "examples" / "opc_test.gds", ROOT / "examples" / "gauges.csv")]
    per_stage = ("read", "align", "fallback", "map")
    out_stage = ("image_records", "contours", "features", "gauges")
    print(f"END TO END: run_extract (threshold fallback, CSV export + gauges, no overlays, workers=1), "
          f"{count} synth images/scene, 1024 x 1024 px, 1 nm/px, medium noise; ms/image, median of {repeat} runs")
    rows = []
    for name, lay_path, g_path in scenes:
        d = work / name
        make_dataset(load_layout(lay_path), d, count=count, seed=2027, image_size=1024, pixel_nm=1.0,
                     noise="medium", overwrite=True)
        cfg = ExtractConfig(manifest=d / "manifest.csv", layout=lay_path, out=d / "out", export="csv", gauges=g_path,
                            fallback="threshold", overlays=False, force=True, workers=1)
        run_extract(cfg)  # warm-up: imports, layout index, noise-factor cache
        runs: list[dict[str, float]] = []
        for _ in range(repeat):
            t0, c0 = time.perf_counter(), time.process_time()
            s = run_extract(cfg)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            n = len(s.images)
            keys = list(per_stage) + sorted({k for im in s.images for k in (im.get("timings") or {})} - set(per_stage))
            r = {k: sum((im.get("timings") or {}).get(k, 0.0) for im in s.images) / n for k in keys}
            r.update({k: s.timings.get(k, 0.0) / n for k in out_stage})
            r["other"] = wall / n - sum(r.values())
            r["total"] = wall / n
            r["cpu"] = cpu / n
            runs.append(r)
        feats = np.mean([im.get("n_features", 0) for im in s.images])
        ok = sum(int(im.get("n_ok", 0)) for im in s.images)
        med = {k: float(np.median([r.get(k, 0.0) for r in runs])) for k in runs[0]}
        rows.append((f"{name} ({feats:.0f} features/img, {ok}/{int(feats * len(s.images))} ok)", med))
    keys = list(dict.fromkeys(k for _, med in rows for k in med))
    print("| stage | " + " | ".join(r[0] for r in rows) + " |")
    print("|---|" + "---:|" * len(rows))
    for k in keys:
        label = {"total": "total (wall)", "cpu": "process CPU time", "image_records": "per-image JSON", "contours": "export (contours.csv)",
                 "features": "features.csv", "other": "other (manifest, summary, ...)"}.get(k, k)
        print(f"| {label} | " + " | ".join(f"{1000 * r[1].get(k, 0.0):.1f}" for r in rows) + " |")
    print("| images/s (wall) | " + " | ".join(f"{1.0 / r[1]['total']:.2f}" for r in rows) + " |")
    print("| images/s (CPU time) | " + " | ".join(f"{1.0 / r[1]['cpu']:.2f}" for r in rows) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--skip-slow", action="store_true", help="skip canny/active-contour and 2048 px")
    ap.add_argument("--e2e-count", type=int, default=10, help="images per scene in the end-to-end section")
    ap.add_argument("--only-e2e", action="store_true", help="run only the end-to-end section")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the end-to-end data here")
    args = ap.parse_args()
    if args.only_e2e:
        run_e2e(args)
        return

    from segsem_plugins.threshold import ThresholdFallback

    fb = ThresholdFallback()
    img, feats, _ = make(1024, 50)
    fb.extract(img, feats)  # warm-up (imports, noise-factor cache)
    stages: dict[str, list[float]] = {}
    for _ in range(args.repeat):
        res = fb.extract(img, feats)
        for k, v in fb.last_timings.items():
            stages.setdefault(k, []).append(v)
    n_ok = sum(r.ok for r in res)
    print(f"threshold fallback, 1024 x 1024, {len(feats)} features ({n_ok} ok), median of {args.repeat} runs")
    print("| stage | ms |\n|---|---:|")
    for k, v in stages.items():
        print(f"| {k} | {1000 * np.median(v):.1f} |")
    tot = np.median(stages["total"])
    print(f"\nimages/s (one core): {1.0 / tot:.1f}\n")

    print("scaling with image size (feature density as 50 per 1024^2)")
    print("| size | features | ms | images/s |\n|---:|---:|---:|---:|")
    for size in (512, 1024) + (() if args.skip_slow else (2048,)):
        n = max(4, int(round(50 * (size / 1024) ** 2)))
        im, fs, _ = make(size, n)
        t, _ = time_it(lambda: fb.extract(im, fs), args.repeat)
        print(f"| {size} | {n} | {1000 * t:.1f} | {1 / t:.1f} |")

    print("\nscaling with feature count at 1024 x 1024")
    print("| features | ms | refinement ms | ms/feature |\n|---:|---:|---:|---:|")
    for n in (10, 50, 100, 200):
        im, fs, _ = make(1024, n)
        t, _ = time_it(lambda: fb.extract(im, fs), args.repeat)
        print(f"| {n} | {1000 * t:.1f} | {1000 * fb.last_timings['refinement']:.1f} | {1000 * t / n:.2f} |")

    if not args.skip_slow:
        from segsem_cli.plugins import get_registry

        print("\nother fallbacks, 1024 x 1024, 50 features")
        print("| fallback | ms | images/s | ok |\n|---|---:|---:|---:|")
        for name in ("threshold", "canny", "active-contour"):
            try:
                other = get_registry().get("fallback", name)
            except Exception as exc:  # noqa: BLE001 - report and go on
                print(f"| {name} | - | - | {exc} |")
                continue
            t, r = time_it(lambda: other.extract(img, feats), max(1, args.repeat // 2))
            print(f"| {name} | {1000 * t:.1f} | {1 / t:.2f} | {sum(x.ok for x in r)}/{len(r)} |")
    print()
    run_e2e(args)


def run_e2e(args) -> None:
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        end_to_end(args.e2e_count, args.repeat, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="segsem-e2e-") as tmp:
            end_to_end(args.e2e_count, args.repeat, Path(tmp))


if __name__ == "__main__":
    main()
