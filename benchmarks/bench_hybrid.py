"""Backbone-only vs fallback-only vs hybrid, side by side in one run.

1. fine-tunes a SAM2 model on a synthetic training set (default: the micro config from random
   weights on CPU, since no official checkpoint can be downloaded here; pass --checkpoint and
   --config sam2.1_hiera_t to start from an official one),
2. calibrates it (`segsem calibrate`: edge threshold + confidence threshold) on a separate
   labelled validation set (every run: the threshold depends on the hybrid's decision rule),
3. extracts an easy test set and a hard one (low dose, strong charging, bridges, necks and
   missing features) in four modes with `segsem extract`: fallback only, backbone only before
   refinement, backbone only refined, hybrid at the calibrated threshold T and at T -/+ 0.1;
4. scores each run twice: with `segsem evaluate` (pooled EPE of matched truth features, missing /
   extra contours, gauge CDs), and per layout feature against the truth of that feature (below);
5. replays the hybrid's per-feature decision (same candidates, :func:`segsem_cli.hybrid.select`)
   over a range of thresholds and with each decision rule loosened / tightened: sensitivity.

Per-feature scoring (features whose truth lies in the image; the truth is matched to the layout
feature by its design index): samples every 0.5 nm along the feature's true contour, at least
2 px inside the field of view, measured to the contour exported FOR THAT FEATURE.
* ``EPE all``: RMS over every feature the mode exported a contour for (wrong ones included),
* ``EPE common``: RMS over the features exported both by the mode and by fallback-only,
* ``no contour``: features left without a contour, ``wrong``: exported contours farther than
  4 px from more than half of the feature's truth (the `evaluate` missing rule), ``RMS > 4 px``:
  exported contours whose RMS EPE exceeds that match distance (stricter: a contour covering
  half of a line is not ``wrong`` but is counted here),
* ``spurious``: contours exported for a design feature that did not print (a ``missing`` defect).
``failures = no contour + wrong``: a contour 50 px off is not a success.

    python benchmarks/bench_hybrid.py --workdir /tmp/segsem-hybrid   # CPU, micro config, ~5 min (training ~3 of them)
    python benchmarks/bench_hybrid.py --config sam2.1_hiera_t --checkpoint sam2.1_hiera_tiny.pt --device cuda

``--workdir`` keeps the datasets and the trained model between runs (the model is retrained
only when ``model.pt`` is missing; calibration runs every time).

Targets (issue 6): on the hard set the hybrid has no more failures than the better of the two and
an EPE (all extracted features) no worse than fallback-only; refinement brings SAM2-sourced EPE
within 10 % of the threshold fallback's on easy images.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

ROOT = Path(__file__).resolve().parents[1]
MATCH_PX = 4.0  # evaluate's default match distance


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="segsem-micro")
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--train", default=None, help="default: full for random init, encoders from a checkpoint")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--lr", type=float, default=None, help="default: 2e-3 from random init, 1e-5 from a checkpoint")
    ap.add_argument("--image-size", type=int, default=256, help="model input size")
    ap.add_argument("--size", type=int, default=384, help="test image size (px)")
    ap.add_argument("--train-count", type=int, default=12)
    ap.add_argument("--val-count", type=int, default=4)
    ap.add_argument("--easy-count", type=int, default=6)
    ap.add_argument("--hard-count", type=int, default=16)
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

    t_start = time.perf_counter()
    console = Console(width=240)
    layout_path = ROOT / "examples" / "opc_test.gds"
    gauges = ROOT / "examples" / "gauges.csv"
    layout = load_layout(layout_path)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="segsem-hybrid-"))
    work.mkdir(parents=True, exist_ok=True)

    hard = {"dose": 8.0, "charging": 0.25, "charging_dark": 0.2}
    sets = {
        "train": dict(count=args.train_count, noise="mixed", defect_rate=0.05),
        "val": dict(count=args.val_count, noise="mixed", defect_rate=0.05),
        "easy": dict(count=args.easy_count, noise="easy"),
        "hard": dict(count=args.hard_count, noise="hard", params=hard, defect_rate=0.15),
    }
    for k, (name, kw) in enumerate(sets.items()):
        # image i depends only on (seed, i): a larger set keeps the smaller one's images
        if _count(work / name / "manifest.csv") != kw["count"]:
            make_dataset(layout, work / name, seed=args.seed * 100 + k, image_size=args.size, pixel_nm=1.0,
                         gauges=gauges, overwrite=True, **kw)

    model = work / "model.pt"
    t0 = time.perf_counter()
    if not model.is_file():
        train = args.train or ("encoders" if args.checkpoint else "full")
        finetune(work / "train" / "manifest.csv", model, config=args.config, checkpoint=args.checkpoint, train=train,
                 val=work / "val" / "manifest.csv", epochs=args.epochs,
                 lr=args.lr if args.lr is not None else (2e-3 if args.checkpoint is None else 1e-5),
                 image_size=args.image_size, seed=args.seed, device=args.device,
                 loss_weights={"focal": 1.0, "dice": 1.0, "iou": 1.0} if args.checkpoint is None else None, progress=False)
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    cal = calibrate(ExtractConfig(manifest=work / "val" / "manifest.csv", layout=layout_path, out=work / "cal",
                                  model=model, device=args.device))
    store_threshold(model, cal)
    t_cal = time.perf_counter() - t0
    thr = float(cal.threshold)
    edge_t = cal.edge_threshold
    console.print(f"model {model} (training {t_train:.0f} s, calibration {t_cal:.0f} s on {cal.n_images} images, "
                  f"{cal.n_features} features): edge threshold {edge_t:.4f}, confidence threshold {thr:.2f}")
    _print_curve(console, cal)

    modes = [
        ("fallback only", None, dict(model=None, fallback_options={"threshold": f"{edge_t:.4f}"} if edge_t else {})),
        ("backbone only, raw mask", None, dict(model=model, mode="backbone", refine=False)),
        ("backbone only, refined", None, dict(model=model, mode="backbone")),
        ("hybrid", thr, dict(model=model, mode="hybrid")),
        ("hybrid, T - 0.1", max(thr - 0.1, 0.0), dict(model=model, mode="hybrid", threshold=max(thr - 0.1, 0.0))),
        ("hybrid, T + 0.1", min(thr + 0.1, 1.0), dict(model=model, mode="hybrid", threshold=min(thr + 0.1, 1.0))),
    ]
    table = Table(title=f"hybrid benchmark: {args.easy_count} easy + {args.hard_count} hard test images, {args.size} px, "
                        f"model {args.config} ({'official weights' if args.checkpoint else 'random init'}), device {args.device}")
    for col in ("set", "mode", "T", "EPE all px", "EPE common px (n)", "EPE p95 px", "SAM2-src EPE px", "exported / scored",
                "no contour", "wrong", "failures", "RMS > 4 px", "spurious", "missing", "extra", "fallback rate",
                "CD bias nm", "CD 3σ nm", "s / image"):
        table.add_column(col, justify="right")
    results: dict = {"threshold": thr, "edge_threshold": edge_t, "calibration_curve": cal.curve, "modes": {}}
    for set_name in ("easy", "hard"):
        d = work / set_name
        truth = _truth(d, layout)
        per_mode: dict[str, dict] = {}
        for mode_name, t_used, kw in modes:
            out = d / ("out_" + mode_name.replace(" ", "_").replace(",", "").replace("+", "p").replace("-", "m").replace(".", ""))
            cfg = ExtractConfig(manifest=d / "manifest.csv", layout=layout_path, out=out, export="csv", gauges=gauges,
                                overlays=False, force=True, device=args.device, **kw)
            t0 = time.perf_counter()
            summary = run_extract(cfg)
            dt = (time.perf_counter() - t0) / max(len(summary.images), 1)
            ev = evaluate_run(d, out / "contours.csv", gauges_path=out / "gauges.csv")
            sam_only = _source_subset(out / "contours.csv", "sam2")
            ev_sam = evaluate_run(d, sam_only) if sam_only else None
            recs = [json.loads((out / "images" / f"{im['image']}.json").read_text()) for im in summary.images]
            contours = {r["image"]: {f["feature_id"]: _rings(f) for f in r.get("features", []) if f.get("status") == "ok"}
                        for r in recs}
            per_mode[mode_name] = dict(feats=score_features(truth, contours), dt=dt, ev=ev, ev_sam=ev_sam, recs=recs, t=t_used)
        base = per_mode["fallback only"]["feats"]
        for mode_name, t_used, _ in modes:
            m = per_mode[mode_name]
            s = summarise(m["feats"], base)
            srcs: dict[str, int] = {}
            for r in m["recs"]:
                for f in r.get("features", []):
                    if f.get("status") == "ok":
                        srcs[f["source"]] = srcs.get(f["source"], 0) + 1
            n_src = sum(srcs.values())
            fb_rate = (n_src - srcs.get("sam2", 0)) / n_src if n_src else float("nan")
            o, g = m["ev"]["overall"], m["ev"].get("gauges") or {}
            sam_epe = m["ev_sam"]["overall"]["epe_rms_px"] if m["ev_sam"] else None
            table.add_row(set_name, mode_name, "-" if t_used is None else f"{t_used:.2f}", _f(s["epe_all_px"]),
                          f"{_f(s['epe_common_px'])} ({s['n_common']})", _f(o["epe_p95_px"]), _f(sam_epe),
                          f"{s['exported']} / {s['scored']}", str(s["no_contour"]), str(s["wrong"]), str(s["failures"]),
                          str(s["rms_over_4px"]), str(s["spurious"]), str(o["n_missing"]), str(o["n_extra"]), f"{fb_rate:.2f}",
                          f"{g['bias_nm']:+.3f}" if g.get("bias_nm") is not None else "-",
                          f"{g['sigma3_nm']:.3f}" if g.get("sigma3_nm") is not None else "-", f"{m['dt']:.2f}")
            results["modes"][f"{set_name}/{mode_name}"] = dict(
                threshold=t_used, **s, eval_epe_rms_px=o["epe_rms_px"], eval_epe_p95_px=o["epe_p95_px"],
                missing=o["n_missing"], extra=o["n_extra"], fallback_rate=fb_rate, s_per_image=m["dt"],
                sam2_epe_rms_px=sam_epe, gauges=g)
        table.add_section()
        if set_name == "hard":
            hard_records = per_mode["hybrid"]["recs"]
    console.print(table)

    # sensitivity: the same candidates, the decision replayed
    t0 = time.perf_counter()
    offsets = {r["image"]: r["offset_nm"] for r in hard_records if r.get("offset_nm") is not None}
    sens = sensitivity(work / "hard", layout, layout_path, model, thr, device=args.device, offsets=offsets)
    results["sensitivity"] = sens
    st = Table(title=f"hard set: hybrid decision replayed on the same candidates (calibrated T = {thr:.2f}; "
                     f"{time.perf_counter() - t0:.0f} s)")
    for col in ("variant", "EPE all px", "EPE common px (n)", "no contour", "wrong", "failures", "RMS > 4 px", "spurious",
                "sam2-sourced"):
        st.add_column(col, justify="right")
    for row in sens:
        st.add_row(row["variant"], _f(row["epe_all_px"]), f"{_f(row['epe_common_px'])} ({row['n_common']})",
                   str(row["no_contour"]), str(row["wrong"]), str(row["failures"]), str(row["rms_over_4px"]),
                   str(row["spurious"]), str(row["sam2"]))
    console.print(st)
    console.print(f"total {time.perf_counter() - t_start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float))
    return 0


# ----------------------------------------------------------------------------- per-feature scoring


def _truth(d: Path, layout) -> dict:
    """Per image: the field of view (nm, shrunk by 2 px), pixel size, and per layout feature id its truth rings.

    Feature ids follow :func:`segsem_cli.layout.features_in_view`: ``p<i>``, and ``p<i>.1``, ... for
    the further parts of a polygon that the field of view cuts into several; a printed piece of
    polygon ``i`` (or of a bridge merging ``i`` with others) is the truth of the feature in view it
    overlaps most (of none: not scored, in every mode).
    ``missing`` marks a design feature that did not print.
    """
    from shapely.geometry import Polygon

    from segsem_cli.metrics import read_truth

    images, _ = read_truth(d)
    raw = json.loads((d / "truth.json").read_text())["images"]
    out = {}
    for im in images:
        fov = im.fov_nm
        parts: dict[int, list] = {}
        for i, part, _ in layout.clip(fov.bounds):
            k = len(parts.setdefault(i, []))
            parts[i].append((f"p{i}" if k == 0 else f"p{i}.{k}", part))
        feats: dict[str, dict] = {}
        for f in raw[im.name].get("features", []):
            if f.get("design_index") is None:
                continue
            i = int(f["design_index"])
            if f.get("defect") == "missing" or not f.get("exterior"):
                for fid, _ in parts.get(i) or [(f"p{i}", None)]:
                    feats.setdefault(fid, {"rings": [], "missing": False})["missing"] = True
                continue
            # a bridge merges design polygons: its pieces in view may belong to any of them
            cands = [c for j in [i, *(int(k) for k in f.get("merged_design_indices") or [])] for c in parts.get(j, [])]
            if not cands:
                continue
            piece = Polygon(f["exterior"]).buffer(0)
            areas = [piece.intersection(g).area for _, g in cands]
            if max(areas) <= 0:
                continue
            fid = cands[max(range(len(areas)), key=areas.__getitem__)][0]
            e = feats.setdefault(fid, {"rings": [], "missing": False})
            e["rings"].append(f["exterior"])
            e["rings"].extend(f.get("holes") or [])
        px = im.pixel_nm
        out[im.name] = dict(fov=fov.buffer(-2.0 * px, join_style="mitre"), pixel_nm=px, features=feats)
    return out


def _rings(f: dict) -> list:
    import numpy as np

    return [np.asarray(f["exterior_nm"], float)] + [np.asarray(h, float) for h in f.get("holes_nm", [])]


def score_features(truth: dict, contours: dict[str, dict[str, list]]) -> dict[tuple[str, str], dict]:
    """Per (image, feature id) with truth: exported?, EPE samples (px) of its truth to ITS contour, wrong?"""
    import numpy as np
    import shapely

    from segsem_cli.metrics import epe_samples, sample_ring

    out = {}
    for name, t in truth.items():
        mine = contours.get(name, {})
        px = t["pixel_nm"]
        shapely.prepare(t["fov"])
        for fid, tf in t["features"].items():
            if not tf["rings"]:  # a design feature that did not print
                if tf["missing"]:
                    out[(name, fid)] = dict(truth=False, exported=fid in mine)
                continue
            pts = np.concatenate([sample_ring(np.asarray(r, float), 0.5) for r in tf["rings"]])
            keep = shapely.contains_xy(t["fov"], pts[:, 0], pts[:, 1])
            if not keep.any():
                continue
            if fid not in mine:
                out[(name, fid)] = dict(truth=True, exported=False)
                continue
            d = epe_samples([np.asarray(r, float) for r in tf["rings"]], mine[fid], step_nm=0.5)[keep] / px
            out[(name, fid)] = dict(truth=True, exported=True, d=d, wrong=bool(np.mean(d > MATCH_PX) > 0.5))
    return out


def summarise(feats: dict, base: dict) -> dict:
    """Table numbers of one mode; ``base`` is fallback-only's per-feature scores (for the common set)."""
    import numpy as np

    def rms(ds):
        a = np.concatenate(ds) if ds else np.zeros(0)
        return float(np.sqrt(np.mean(a * a))) if a.size else None

    scored = [k for k, v in feats.items() if v["truth"]]
    exported = [k for k in scored if feats[k]["exported"]]
    common = [k for k in exported if base.get(k, {}).get("exported")]
    wrong = sum(1 for k in exported if feats[k]["wrong"])
    off = sum(1 for k in exported if float(np.sqrt(np.mean(feats[k]["d"] ** 2))) > MATCH_PX)
    no_contour = len(scored) - len(exported)
    return dict(scored=len(scored), exported=len(exported), no_contour=no_contour, wrong=wrong,
                failures=no_contour + wrong, rms_over_4px=off, spurious=sum(1 for v in feats.values() if not v["truth"] and v["exported"]),
                epe_all_px=rms([feats[k]["d"] for k in exported]),
                epe_common_px=rms([feats[k]["d"] for k in common]), n_common=len(common))


def sensitivity(d: Path, layout, layout_path: Path, model: Path, thr: float, *, device: str = "cpu",
                offsets: dict[str, list[float]] | None = None) -> list[dict]:
    """Replay :func:`segsem_cli.hybrid.select` on one set's candidates for thresholds and rule variants.

    Contours are mapped to nm with ``offsets`` (per image, the final alignment offset of the
    hybrid run, which `extract` refines from the extracted edges after the decision), so that
    every variant is scored with the same alignment and the calibrated one reproduces the table.
    """
    from segsem_cli.calibrate import _prepare
    from segsem_cli.hybrid import RULES, candidates, select
    from segsem_cli.manifest import read_manifest
    from segsem_cli.pipeline import ExtractConfig, _State

    cfg = ExtractConfig(manifest=d / "manifest.csv", layout=layout_path, out=d / "out_replay", model=model, device=device)
    state = _State(cfg)
    truth = _truth(d, layout)
    truth_doc = json.loads((d / "truth.json").read_text())
    per_image = []
    for row in read_manifest(cfg.manifest):
        p = _prepare(row, state, truth_doc)
        if p is None:
            continue
        image, feats, _ = p
        if offsets and row.name in offsets:
            image = replace(image, transform=image.transform.with_offset(tuple(offsets[row.name])))
        cands, _ = candidates(image, feats, fallback=state.fallback, fallback_options=state.fallback_options,
                              model=state.model, refine=cfg.refine, edge_options=state.edge_options)
        per_image.append((row.name, image, cands))

    def run(t, rules, mode="hybrid"):
        contours = {}
        n_sam = 0
        for name, image, cands in per_image:
            res = select(cands, t, mode=mode, rules=rules)
            contours[name] = {r.feature_id: [image.transform.to_layout(r.contour_px)]
                              + [image.transform.to_layout(h) for h in r.holes_px] for r in res if r.ok}
            n_sam += sum(1 for r in res if r.ok and r.source == "sam2")
        return score_features(truth, contours), n_sam

    base, _ = run(thr, RULES, mode="fallback")
    ts = sorted({round(min(max(thr + k, 0.0), 1.0), 4) for k in (-0.2, -0.1, 0.0, 0.1, 0.2)} | {0.0, 0.6, 0.8, 0.9})
    variants = [(f"T = {t:.2f}" + (" (calibrated)" if abs(t - thr) < 1e-9 else ""), t, RULES) for t in ts]
    for field, lo, hi in (("agree_px", 1.0, 2.5), ("min_edge", 0.6, 0.8), ("min_iou", 0.4, 0.6),
                          ("max_unsupported", 0.05, 0.2), ("max_spill", 0.05, 0.2)):
        for v in (lo, hi):
            variants.append((f"{field} = {v} (default {getattr(RULES, field)})", thr, replace(RULES, **{field: v})))
    rows = []
    for label, t, rules in variants:
        feats, n_sam = run(t, rules)
        rows.append(dict(variant=label, threshold=t, sam2=n_sam, **summarise(feats, base)))
    return rows


# ----------------------------------------------------------------------------- helpers


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _count(manifest: Path) -> int:
    if not manifest.is_file():
        return -1
    return max(0, len(manifest.read_text().strip().splitlines()) - 1)


def _print_curve(console, cal) -> None:
    rows = [r for r in cal.curve if abs(r["threshold"] * 10 - round(r["threshold"] * 10)) < 1e-9]
    console.print("calibration curve: " + ", ".join(
        f"T={r['threshold']:.1f}: cost {r['cost_px']:.3f} (fb {r['fallback_rate']:.2f}, fail {int(r['failures'])})" for r in rows))


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
