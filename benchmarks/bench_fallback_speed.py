"""Speed of the classical fallbacks on synthetic CD-SEM images (one process, one thread).

Builds images like the tests do (tests/synthetic_helpers.py: discs and
rectangles with a bright rim, blur and noise), runs the fallbacks and prints:

1. per-stage times of the ``threshold`` fallback on a 1024 x 1024 image with ~50
   features (smooth, coarse contours, association, refinement) and images/s;
2. how the time grows with image size (512, 1024, 2048) at a fixed feature density;
3. how it grows with the feature count at 1024 x 1024;
4. the ``canny`` and ``active-contour`` fallbacks on the 1024 x 1024 image.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_fallback_speed.py [--repeat 5]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np  # noqa: E402

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--skip-slow", action="store_true", help="skip canny/active-contour and 2048 px")
    args = ap.parse_args()

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


if __name__ == "__main__":
    main()
