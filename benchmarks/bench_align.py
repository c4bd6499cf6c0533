"""Benchmark: SEM-to-layout alignment error and time on 1024 x 1024 synthetic images.

Each image shows a random clip (a line/space block with line ends, a contact
array, pads and an isolated line) printed with CD bias, corner rounding,
line-end pullback and roughness, imaged with bright edge rims, blur, noise
and charging, at a random non-integer stage error of up to +/-30 px in both
axes. Two renderers:

* ``simple``: the test-suite model (coverage * contrast + rim + blur + noise
  + linear charging ramp + scan-line noise), either polarity;
* ``synth``: the project's simulator (:mod:`segsem_cli.synth`: printed-shape
  model and physical SEM signal with asymmetric edge rims, Poisson noise,
  charging), when it is importable.

Run::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_align.py            # 4 images per case
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_align.py --n 10 --size 512

Prints one table row per case: status counts, the error of the recovered
content shift (|du|, |dv| per axis pooled: mean, RMS, max; pixels), the mean
reported ``residual_px`` and the mean time per image (alignment only).
"""
from __future__ import annotations

import argparse
import math
import time

import cv2
import numpy as np
from shapely import affinity
from shapely.geometry import Point, Polygon, box

from segsem_cli.align import align_image, render_layout
from segsem_cli.transform import PixelTransform

try:  # the project's simulator (optional)
    from segsem_cli.synth.litho import LithoParams, print_features
    from segsem_cli.synth.render import RenderParams, render_sem

    HAVE_SYNTH = True
except Exception:  # pragma: no cover - depends on the checkout
    HAVE_SYNTH = False


def random_clip(rng: np.random.Generator, size_nm: float) -> list[Polygon]:
    """A random test-pattern clip (nm, centred on 0) larger than the field of view."""
    s = size_nm / 1024.0  # scale the pattern with the field of view
    polys: list[Polygon] = []
    pitch = rng.uniform(36, 56) * s
    cd = pitch * rng.uniform(0.35, 0.5)
    x0 = rng.uniform(-420, -250) * s
    n_lines = int(rng.integers(8, 14))
    for k in range(n_lines):
        x = x0 + k * pitch
        top = rng.choice([rng.uniform(-100, 150) * s, 900 * s])  # some line ends in view
        polys.append(box(x - cd / 2, -900 * s, x + cd / 2, top))
    # contact array
    cx, cy = rng.uniform(80, 250) * s, rng.uniform(100, 250) * s
    cp = rng.uniform(50, 70) * s
    r = cp * rng.uniform(0.22, 0.3)
    for i in range(int(rng.integers(3, 5))):
        for j in range(int(rng.integers(2, 4))):
            polys.append(Point(cx + i * cp, cy + j * cp).buffer(r, 32))
    # pads and an isolated line
    polys.append(box(rng.uniform(30, 80) * s, rng.uniform(-470, -420) * s, rng.uniform(300, 380) * s, -250 * s))
    polys.append(box(-500 * s, rng.uniform(180, 220) * s, rng.uniform(-200, -120) * s, 270 * s))
    polys.append(box(100 * s, -150 * s, (100 + rng.uniform(25, 45)) * s, rng.uniform(60, 140) * s))
    return polys


def simple_sem(polys_nm, t_true: PixelTransform, rng, *, noise: float, polarity: int) -> np.ndarray:
    """The test-suite image model (see tests/test_align.py)."""
    h, w = t_true.shape
    px = [Polygon(t_true.to_pixel(np.asarray(p.exterior.coords))) for p in polys_nm]
    bias = rng.uniform(1.0, 3.0)
    printed = [p.buffer(bias + 3.0, join_style="round").buffer(-3.0, join_style="round") for p in px]
    cov = render_layout(printed, (h, w))
    g = cv2.GaussianBlur(cov, (0, 0), 1.0)
    rim = np.hypot(*np.gradient(g))
    rim /= max(float(rim.max()), 1e-9)
    base = cov if polarity > 0 else 1.0 - cov
    img = cv2.GaussianBlur((0.3 * base + 0.6 * rim).astype(np.float32), (0, 0), 1.0)
    vv, uu = np.mgrid[0:h, 0:w] / max(h, w)
    img = img + 0.5 * (0.6 * uu - 0.4 * vv) + rng.normal(0, noise, (h, w)) + 0.2 * noise * rng.normal(0, 1, (h, 1))
    return (img * 800 + 1000).astype(np.float32)


def synth_sem(polys_nm, t_true: PixelTransform, rng, *, dose: float, tone: str) -> np.ndarray:
    litho = LithoParams(bias_nm=float(rng.uniform(-2, 3)), pullback_nm=5.0, ler_sigma_nm=1.0)
    feats = print_features(polys_nm, params=litho, rng=rng)
    shapes = [f.shape for f in feats if f.shape is not None]
    return render_sem(shapes, t_true, params=RenderParams(dose=dose), rng=rng, tone=tone).image


def run_case(name, n, size, make, rng, *, rotation=False, max_rot_deg=0.0, **align_kw):
    pix = 1.0
    t_nom = PixelTransform((0.0, 0.0), pix, (size, size))
    errs, res, times, stats = [], [], [], {"ok": 0, "ambiguous": 0, "failed": 0}
    rot_errs = []
    c = np.array([size / 2.0, size / 2.0])
    for _ in range(n):
        polys = random_clip(rng, size * pix)
        du, dv = rng.uniform(-30, 30, 2)
        theta = math.radians(rng.uniform(-max_rot_deg, max_rot_deg))
        t_shift = t_nom.with_offset((0.0, 0.0), theta)
        # true transform: content appears (du, dv) px away from the nominal position
        off = t_shift.to_layout(c) - t_shift.to_layout(c + (du, dv))
        t_true = t_nom.with_offset(tuple(off), theta)
        img = make(polys, t_true, rng)
        t0 = time.perf_counter()
        r = align_image(img, t_nom, polys, search_px=40.0, rotation=rotation, **align_kw)
        times.append(time.perf_counter() - t0)
        stats[r.status] += 1
        if r.status != "failed":
            truth = t_true.to_pixel(t_nom.to_layout(c)) - c
            got = r.transform.to_pixel(t_nom.to_layout(c)) - c
            errs.extend(np.abs(got - truth).tolist())
            res.append(r.residual_px)
            if rotation:
                rot_errs.append(abs(r.rotation_rad - theta))
    e = np.asarray(errs) if errs else np.array([np.nan])
    row = (f"| {name:<34} | {n:>2} | {stats['ok']:>2}/{stats['ambiguous']:>2}/{stats['failed']:>2} "
           f"| {e.mean():6.3f} | {math.sqrt(float(np.mean(e ** 2))):6.3f} | {e.max():6.3f} "
           f"| {np.nanmean(res) if res else float('nan'):6.3f} | {np.mean(times):5.2f} |")
    if rotation and rot_errs:
        row += f" rot err max {math.degrees(max(rot_errs)):.3f} deg"
    print(row, flush=True)


def bench_render(size: int) -> None:
    rng = np.random.default_rng(0)
    polys = [Point(*rng.uniform(0, size, 2)).buffer(rng.uniform(10, 60), 16) for _ in range(40)]
    polys += [box(0, i * size / 10 + 3.3, size, i * size / 10 + 43.7) for i in range(10)]
    for label, ss in (("exact", None), ("supersample 4", 4)):
        render_layout(polys, (size, size), supersample=ss)
        t0 = time.perf_counter()
        for _ in range(5):
            render_layout(polys, (size, size), supersample=ss)
        print(f"render_layout {size}x{size}, 50 polygons, {label}: {(time.perf_counter() - t0) / 5 * 1e3:.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=4, help="images per case")
    ap.add_argument("--size", type=int, default=1024, help="image side, pixels")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    bench_render(args.size)
    print()
    print("| case                               |  n | ok/amb/fail | mean err | rms | max err | est. residual | time s |")
    print("|---|---|---|---|---|---|---|---|")
    for noise in (0.02, 0.06, 0.15):
        for pol in (1, -1):
            run_case(f"simple noise={noise} {'bright' if pol > 0 else 'dark'}", args.n, args.size,
                     lambda p, t, g, noise=noise, pol=pol: simple_sem(p, t, g, noise=noise, polarity=pol), rng)
    if HAVE_SYNTH:
        for dose in (200.0, 50.0, 15.0):
            for tone in ("resist", "opening"):
                run_case(f"synth dose={dose:g} {tone}", args.n, args.size,
                         lambda p, t, g, dose=dose, tone=tone: synth_sem(p, t, g, dose=dose, tone=tone), rng)
        run_case("synth dose=50 resist, rot<=0.3deg", args.n, args.size,
                 lambda p, t, g: synth_sem(p, t, g, dose=50.0, tone="resist"), rng,
                 rotation=True, max_rot_deg=0.3)
        run_case("synth dose=50 resist, robust=False", args.n, args.size,
                 lambda p, t, g: synth_sem(p, t, g, dose=50.0, tone="resist"), rng, robust=False)
    else:
        print("(segsem_cli.synth not importable: synth cases skipped)")


if __name__ == "__main__":
    main()
