"""Benchmark: SEM-to-layout alignment error and time per image on the project's simulator.

Main table: ``segsem synth`` images (``make_dataset`` on ``examples/opc_test.gds``, random
sites, 1024 x 1024 px at 1 nm/px by default) at the easy / medium / hard presets, half
resist and half opening tone, with the stage error widened to +/-38 px on both axes (the
presets use 10-30 nm). Every image is read back from its TIFF and aligned exactly as
``segsem extract`` does (layout polygons queried in the field of view grown by
``--search`` px, polarity auto).

Per noise level it prints the status counts, the error of the recovered offset against the
simulator's truth (per axis, pooled; pixels), the mean reported ``residual_px`` and the time
per image (wall clock and CPU time of the process; by default OpenCV is held to one
thread, so both are single-core figures).

Optional tables: ``--sites`` aligns the 20 named sites of ``examples/sites.csv`` (512 px,
periodic line/space and contact arrays: how many are flagged ambiguous, and where);
``--clips`` runs the older random-clip cases (a simple test-suite renderer, the simulator's
printing model, and a rotated case).

Run::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_align.py                  # 8 images per level
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_align.py --count 4 --size 512 --sites --clips

Note: the simulator's beam drift (``drift_px``: 0.25 px medium, 0.6 px hard) shifts rows
by a smooth random curve; the "true" offset is its row average, so part of the hard-level
error along ``u`` is the drift's own spread, not an alignment error.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from shapely.geometry import Point, Polygon, box  # noqa: E402

from segsem_cli.align import align_image, render_layout  # noqa: E402
from segsem_cli.transform import PixelTransform  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- simulator datasets


def make_set(layout, out: Path, *, count: int, size: int, pixel_nm: float, level: str, seed: int,
             stage_px: float, sites=None) -> list[dict]:
    """Generate a ``segsem synth`` set (half resist, half opening tone); return the images with their truth."""
    from segsem_cli.images import read_sem
    from segsem_cli.manifest import read_manifest
    from segsem_cli.synth.dataset import make_dataset

    items = []
    n_res = (count + 1) // 2 if sites is None else None
    for k, tone in enumerate(("resist", "opening")):
        n = None if sites is not None else (n_res if tone == "resist" else count - n_res)
        if n == 0:
            continue
        d = out / f"{level}_{tone}"
        make_dataset(layout, d, count=n, seed=seed + 7919 * k, image_size=size, pixel_nm=pixel_nm, noise=level,
                     tone=tone, sites=sites, params={"stage_error_nm": stage_px * pixel_nm}, overwrite=True)
        truth = json.loads((d / "truth.json").read_text())["images"]
        for row in read_manifest(d / "manifest.csv"):
            pixels, px = read_sem(row.image, row.pixel_nm)
            items.append(dict(name=f"{level}/{tone}/{row.name}", pixels=pixels, pixel_nm=px,
                              center=(row.x_nm, row.y_nm), offset_nm=truth[row.name]["offset_nm"], tone=tone))
        if sites is not None:
            break  # one tone for the named sites
    return items


def align_set(layout, items, *, search_px: float) -> dict:
    """Align every image; errors (per axis, pixels), statuses, residuals and times."""
    errs, res, wall, cpu = [], [], [], []
    stats = {"ok": 0, "ambiguous": 0, "failed": 0}
    for it in items:
        t = PixelTransform(it["center"], it["pixel_nm"], it["pixels"].shape)
        polys = [layout.polygons[i] for i in layout.query(t.field_of_view_nm(search_px))]
        t0, c0 = time.perf_counter(), time.process_time()
        r = align_image(it["pixels"], t, polys, search_px=search_px)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        stats[r.status] += 1
        if r.status == "ok":
            errs.extend((np.subtract(r.offset_nm, it["offset_nm"]) / it["pixel_nm"]).tolist())
            res.append(r.residual_px)
    return dict(errs=np.abs(errs), res=res, wall=np.asarray(wall), cpu=np.asarray(cpu), stats=stats, n=len(items))


def print_table(title: str, rows: list[tuple[str, dict]]) -> None:
    print(f"\n{title}\n")
    print("| case | n | ok/amb/fail | err RMS px (ok) | err max px (ok) | mean residual_px "
          "| time/img wall ms (mean / max) | CPU ms |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        e = r["errs"]
        rms = math.sqrt(float(np.mean(e ** 2))) if e.size else float("nan")
        mx = float(e.max()) if e.size else float("nan")
        s = r["stats"]
        print(f"| {name} | {r['n']} | {s['ok']}/{s['ambiguous']}/{s['failed']} | {rms:.3f} | {mx:.3f} | "
              f"{np.mean(r['res']) if r['res'] else float('nan'):.3f} | {1e3 * r['wall'].mean():.0f} / "
              f"{1e3 * r['wall'].max():.0f} | {1e3 * r['cpu'].mean():.0f} |", flush=True)


# ----------------------------------------------------------------------------- random clips (older cases)


def random_clip(rng: np.random.Generator, size_nm: float) -> list[Polygon]:
    """A random test-pattern clip (nm, centred on 0) larger than the field of view."""
    s = size_nm / 1024.0
    polys: list[Polygon] = []
    pitch = rng.uniform(36, 56) * s
    cd = pitch * rng.uniform(0.35, 0.5)
    x0 = rng.uniform(-420, -250) * s
    for k in range(int(rng.integers(8, 14))):
        x = x0 + k * pitch
        top = rng.choice([rng.uniform(-100, 150) * s, 900 * s])  # some line ends in view
        polys.append(box(x - cd / 2, -900 * s, x + cd / 2, top))
    cx, cy = rng.uniform(80, 250) * s, rng.uniform(100, 250) * s
    cp = rng.uniform(50, 70) * s
    r = cp * rng.uniform(0.22, 0.3)
    for i in range(int(rng.integers(3, 5))):
        for j in range(int(rng.integers(2, 4))):
            polys.append(Point(cx + i * cp, cy + j * cp).buffer(r, 32))
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


def synth_clip_sem(polys_nm, t_true: PixelTransform, rng, *, dose: float, tone: str) -> np.ndarray:
    from segsem_cli.synth.litho import LithoParams, print_features
    from segsem_cli.synth.render import RenderParams, render_sem

    litho = LithoParams(bias_nm=float(rng.uniform(-2, 3)), pullback_nm=5.0, ler_sigma_nm=1.0)
    feats = print_features(polys_nm, params=litho, rng=rng)
    shapes = [f.shape for f in feats if f.shape is not None]
    return render_sem(shapes, t_true, params=RenderParams(dose=dose), rng=rng, tone=tone).image


def clip_case(n, size, make, rng, *, rotation=False, max_rot_deg=0.0, **align_kw) -> dict:
    t_nom = PixelTransform((0.0, 0.0), 1.0, (size, size))
    errs, res, wall, cpu, stats = [], [], [], [], {"ok": 0, "ambiguous": 0, "failed": 0}
    c = np.array([size / 2.0, size / 2.0])
    for _ in range(n):
        polys = random_clip(rng, size)
        du, dv = rng.uniform(-30, 30, 2)
        theta = math.radians(rng.uniform(-max_rot_deg, max_rot_deg))
        t_shift = t_nom.with_offset((0.0, 0.0), theta)
        off = t_shift.to_layout(c) - t_shift.to_layout(c + (du, dv))
        t_true = t_nom.with_offset(tuple(off), theta)
        img = make(polys, t_true, rng)
        t0, c0 = time.perf_counter(), time.process_time()
        r = align_image(img, t_nom, polys, search_px=40.0, rotation=rotation, **align_kw)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        stats[r.status] += 1
        if r.status != "failed":
            truth = t_true.to_pixel(t_nom.to_layout(c)) - c
            got = r.transform.to_pixel(t_nom.to_layout(c)) - c
            errs.extend(np.abs(got - truth).tolist())
            res.append(r.residual_px)
    return dict(errs=np.asarray(errs), res=res, wall=np.asarray(wall), cpu=np.asarray(cpu), stats=stats, n=n)


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


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=8, help="images per noise level")
    ap.add_argument("--size", type=int, default=1024, help="image side, pixels")
    ap.add_argument("--pixel-nm", type=float, default=1.0)
    ap.add_argument("--levels", default="easy,medium,hard")
    ap.add_argument("--stage-px", type=float, default=38.0, help="largest stage error per axis, pixels")
    ap.add_argument("--search", type=float, default=40.0, help="search_px passed to align_image")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="OpenCV threads (1: single-core figures)")
    ap.add_argument("--sites", action="store_true", help="also align the named sites of examples/sites.csv")
    ap.add_argument("--clips", action="store_true", help="also run the older random-clip cases")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the generated images here")
    args = ap.parse_args()
    cv2.setNumThreads(args.threads)

    from segsem_cli.layout import load_layout

    layout = load_layout(ROOT / "examples" / "opc_test.gds")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="segsem-bench-align-"))
    rows = []
    for k, level in enumerate(args.levels.split(",")):
        items = make_set(layout, work, count=args.count, size=args.size, pixel_nm=args.pixel_nm, level=level,
                         seed=args.seed + 101 * k, stage_px=args.stage_px)
        align_set(layout, items[:1], search_px=args.search)  # warm-up (imports, caches)
        rows.append((f"synth {level}", align_set(layout, items, search_px=args.search)))
    print_table(f"align_image on segsem synth images: {args.size}x{args.size} px, {args.pixel_nm} nm/px, opc_test.gds, "
                f"stage error up to +/-{args.stage_px:g} px, search_px={args.search:g}, OpenCV threads={args.threads}",
                rows)
    if args.sites:
        # the named sites sit near the layout's edges: 512 px fields, the preset's 20 px stage error
        size = min(args.size, 512)
        x0, y0, x1, y1 = layout.bounds
        m = (size / 2 + 20.0) * args.pixel_nm
        with open(ROOT / "examples" / "sites.csv", newline="") as fh:
            sites = [(float(r["x_nm"]), float(r["y_nm"])) for r in csv.DictReader(fh)]
        sites = [(x, y) for x, y in sites if x0 + m <= x <= x1 - m and y0 + m <= y <= y1 - m]  # inside the layout
        items = make_set(layout, work, count=None, size=size, pixel_nm=args.pixel_nm, level="medium",
                         seed=args.seed + 999, stage_px=20.0, sites=sites)
        print_table(f"named sites (examples/sites.csv), medium, {size} x {size} px, stage error up to +/-20 px: "
                    "periodic arrays are expected to be flagged ambiguous",
                    [("sites medium", align_set(layout, items, search_px=args.search))])
        for it in items:
            t = PixelTransform(it["center"], it["pixel_nm"], it["pixels"].shape)
            polys = [layout.polygons[i] for i in layout.query(t.field_of_view_nm(args.search))]
            r = align_image(it["pixels"], t, polys, search_px=args.search)
            e = np.subtract(r.offset_nm, it["offset_nm"]) / it["pixel_nm"]
            print(f"  {it['name']:<32} {r.status:<9} err ({e[0]:+.2f}, {e[1]:+.2f}) px  {r.message[:90]}")
    if args.clips:
        rng = np.random.default_rng(args.seed)
        bench_render(args.size)
        crow = []
        for noise in (0.02, 0.06, 0.15):
            for pol in (1, -1):
                crow.append((f"simple noise={noise} {'bright' if pol > 0 else 'dark'}", clip_case(
                    max(2, args.count // 2), args.size,
                    lambda p, t, g, noise=noise, pol=pol: simple_sem(p, t, g, noise=noise, polarity=pol), rng)))
        for dose in (200.0, 50.0, 15.0):
            for tone in ("resist", "opening"):
                crow.append((f"clip synth dose={dose:g} {tone}", clip_case(
                    max(2, args.count // 2), args.size,
                    lambda p, t, g, dose=dose, tone=tone: synth_clip_sem(p, t, g, dose=dose, tone=tone), rng)))
        crow.append(("clip synth dose=50, rotation<=0.3 deg", clip_case(
            max(2, args.count // 2), args.size, lambda p, t, g: synth_clip_sem(p, t, g, dose=50.0, tone="resist"), rng,
            rotation=True, max_rot_deg=0.3)))
        print_table("random clips (errors over all non-failed images)", crow)


if __name__ == "__main__":
    main()
