"""Calibration of the hybrid: confidence threshold curve, plateau choice, edge threshold, storage."""
import math
from pathlib import Path

import numpy as np
import pytest

from segsem_cli.calibrate import (
    Calibration,
    FeatureScore,
    choose_edge_threshold,
    choose_threshold,
    store_threshold,
    threshold_curve,
)
from segsem_cli.hybrid import Evidence

ROOT = Path(__file__).resolve().parents[1]


def fs(conf, eb, ef):
    return FeatureScore("img", "p", conf, eb, ef)


def test_threshold_curve_replays_the_choice():
    scores = [fs(0.9, 0.2, 0.4), fs(0.8, 0.3, 0.4), fs(0.3, 2.0, 0.5), fs(None, None, 0.6), fs(0.7, 0.25, None)]
    rows = {round(r["threshold"], 2): r for r in threshold_curve(scores, grid=[0.0, 0.5, 0.85], penalty_px=3.0)}
    # T = 0.5: backbone for 0.9, 0.8, 0.7; fallback for 0.3 and for the backbone failure
    r = rows[0.5]
    assert r["fallback_rate"] == pytest.approx(2 / 5)
    assert r["failures"] == 0
    assert r["cost_px"] == pytest.approx(math.sqrt((0.04 + 0.09 + 0.25 + 0.36 + 0.0625) / 5))
    # T = 0.85: only 0.9 keeps the backbone; the 0.7 feature has no fallback contour -> a failure
    r = rows[0.85]
    assert r["failures"] == 1
    assert r["cost_px"] == pytest.approx(math.sqrt((0.04 + 0.16 + 0.25 + 0.36 + 9.0) / 5))
    # T = 0: every backbone contour, even the poor one (EPE 2.0)
    assert rows[0.0]["cost_px"] == pytest.approx(math.sqrt((0.04 + 0.09 + 4.0 + 0.36 + 0.0625) / 5))


def test_a_wrong_contour_costs_more_than_a_failure():
    # the backbone's only contour is 13 px off and its confidence is 0.05; the fallback failed
    scores = [fs(0.05, 13.0, None), fs(0.9, 0.2, 0.3)]
    rows = threshold_curve(scores, grid=[0.0, 0.5], penalty_px=3.0)
    assert rows[1]["cost_px"] < rows[0]["cost_px"]
    assert choose_threshold(rows) == 0.5


def test_curve_replays_the_hybrid_gates():
    """With evidence, the curve replays hybrid.decide: a gate-failing contour is never chosen, at any T."""
    good = Evidence(0.85, 0.9, 0.0, 0.95, 20.0, 0.01)
    incomplete = Evidence(0.95, 0.65, 0.0, 0.9, 20.0, 0.3)  # confident, but leaves resist out
    scores = [
        # fallback failed; the backbone's contour is 12 px off and fails the support gate: a failure at every T
        FeatureScore("img", "a", 0.95, 12.0, None, backbone=incomplete, fallback=None),
        # fallback failed; a clean backbone contour rescues it while its confidence reaches T
        FeatureScore("img", "b", 0.85, 0.4, None, backbone=good, fallback=None),
        # both found and agree (0.3 px): backbone (0.2 px) when confident, else the fallback (0.5 px)
        FeatureScore("img", "c", 0.85, 0.2, 0.5, backbone=good, fallback=good, distance_px=0.3),
        # both found and disagree (6 px): the sane fallback wins whatever T
        FeatureScore("img", "d", 0.85, 5.0, 0.6, backbone=good, fallback=good, distance_px=6.0),
    ]
    rows = {r["threshold"]: r for r in threshold_curve(scores, grid=[0.0, 0.5, 0.9], penalty_px=3.0)}
    for t in (0.0, 0.5):
        assert rows[t]["failures"] == 1
        assert rows[t]["cost_px"] == pytest.approx(math.sqrt((9.0 + 0.16 + 0.04 + 0.36) / 4))
        assert rows[t]["fallback_rate"] == pytest.approx(1 / 4)
    # above the backbone's confidence: b fails, c falls back
    assert rows[0.9]["failures"] == 2
    assert rows[0.9]["cost_px"] == pytest.approx(math.sqrt((9.0 + 9.0 + 0.25 + 0.36) / 4))
    assert choose_threshold(list(rows.values())) in (0.0, 0.5)


def test_choose_threshold_takes_the_middle_of_the_plateau():
    curve = [{"threshold": t, "cost_px": c} for t, c in zip([0.0, 0.2, 0.4, 0.6, 0.8, 1.0], [3.0, 2.0, 1.0, 1.005, 1.0, 2.0])]
    assert choose_threshold(curve) == pytest.approx(0.6)
    curve[3]["cost_px"] = 1.5  # plateau broken: the minimum's own run is [0.4]
    assert choose_threshold(curve) == pytest.approx(0.4)


def test_choose_edge_threshold_parabola():
    ts = np.round(np.arange(0.30, 0.851, 0.05), 3)
    curve = [{"edge_threshold": float(t), "epe_rms_px": float((t - 0.62) ** 2 + 0.1)} for t in ts]
    assert choose_edge_threshold(curve) == pytest.approx(0.62, abs=1e-6)


def test_store_threshold_round_trip(tmp_path):
    from segsem_cli.sam.model import build_model, load_checkpoint, save_checkpoint

    model = build_model("segsem-micro", image_size=128)
    p = save_checkpoint(tmp_path / "m.pt", model, {"config": "segsem-micro", "image_size": 128})
    curve = [{"threshold": 0.5, "fallback_rate": 0.2, "epe_rms_px": 0.3, "failures": 0.0, "cost_px": 0.3}]
    cal = Calibration(0.5, curve, 10, 2, 3.0, edge_threshold=0.64, edge_curve=[{"edge_threshold": 0.64, "epe_rms_px": 0.2, "samples": 5.0}])
    store_threshold(p, cal)
    sd, meta = load_checkpoint(p)
    assert meta["threshold"] == 0.5 and meta["edge_threshold"] == pytest.approx(0.64)
    assert meta["config"] == "segsem-micro" and meta["calibration_curve"][0]["epe_rms_px"] == pytest.approx(0.3)
    assert set(sd) == set(model.state_dict())


def test_edge_threshold_fitted_on_the_bundled_labels(capsys):
    """The simulator places the truth at mid-sidewall; blur lowers the rim, so the fitted t is above 0.5."""
    from segsem_cli.cli import main

    rc = main(["calibrate", str(ROOT / "examples" / "data" / "manifest.csv"), "--layout", str(ROOT / "examples" / "opc_test.gds")])
    out = capsys.readouterr().out
    assert rc == 0
    line = next(ln for ln in out.splitlines() if ln.startswith("edge threshold "))
    t = float(line.split()[2])
    assert 0.55 < t < 0.75, line


def test_edge_threshold_reaches_the_rim_peak(tmp_path):
    """Another image model may put the labelled edge at the top of the sidewall, on the rim peak.

    Rendered with every shape grown by half the sidewall footprint, the truth sits where the
    bright rim starts: the fit must go beyond 0.85 (the old grid's end) and find it."""
    from shapely.geometry import JOIN_STYLE

    from segsem_cli.calibrate import calibrate
    from segsem_cli.layout import load_layout
    from segsem_cli.pipeline import ExtractConfig
    from segsem_cli.synth.dataset import make_dataset
    from segsem_cli.synth.render import render_sem

    def top_edge(shapes, transform, *, params, rng, tone="resist"):
        grown = [s.buffer(params.footprint_nm / 2, join_style=JOIN_STYLE.mitre) for s in shapes]
        return render_sem(grown, transform, params=params, rng=rng, tone=tone)

    layout = ROOT / "examples" / "opc_test.gds"
    make_dataset(load_layout(layout), tmp_path / "d", count=2, seed=3, image_size=256, noise="easy", renderer=top_edge)
    cal = calibrate(ExtractConfig(manifest=tmp_path / "d" / "manifest.csv", layout=layout, out=tmp_path / "out"))
    epe = {round(r["edge_threshold"], 2): r["epe_rms_px"] for r in cal.edge_curve}
    assert 0.9 < cal.edge_threshold < 1.0
    assert min(epe.values()) == epe[0.95] < 0.3 < epe[0.85]
