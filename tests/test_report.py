"""The review report: self-contained HTML, checked by rendering it in headless Chromium."""
import json
import shutil
import subprocess

import numpy as np
import pytest

from segsem_cli.overlay import draw_overlay
from segsem_cli.report import build_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def fake_run(tmp_path):
    ov = tmp_path / "overlays"
    img = np.random.default_rng(0).normal(100, 10, (48, 64)).astype(np.float32)
    square = np.array([[10, 10], [30, 10], [30, 30], [10, 30]], float)
    draw_overlay(img, {"layout": ("blue", [square]), "sam2": ("red", [square + 1])}, ov / "a.png")
    draw_overlay(img, {"threshold": ("green", [square])}, ov / "b.png")
    images = [
        dict(image="a", status="ok", offset_nm=[1.5, -2.0], align_score=0.93, n_features=2, n_ok=2, elapsed_s=0.3,
             features=[dict(feature_id="p1", source="sam2", confidence=0.91, status="ok"),
                       dict(feature_id="p2", source="threshold", confidence=0.77, status="ok")]),
        dict(image="b", status="ok", offset_nm=[0.0, 0.5], align_score=0.88, n_features=2, n_ok=1, elapsed_s=0.2,
             features=[dict(feature_id="p3", source="sam2", confidence=0.95, status="ok"),
                       dict(feature_id="p4", source="sam2", confidence=0.12, status="failed")]),
        dict(image="c", status="error", message="c.tif: unreadable TIFF", features=[]),
    ]
    return images, ov


def test_report_content_and_json(tmp_path):
    images, ov = fake_run(tmp_path)
    html, data = build_report(images, title="t", threshold=0.6, model="m.pt", overlays_dir=ov)
    assert html.count("data:image/png;base64,") == 2
    assert "http://" not in html and "https://" not in html  # self-contained
    assert data["features"] == 4 and data["features_ok"] == 3
    assert data["sources"] == {"sam2": 1 + 1, "threshold": 1}
    assert data["fallback_rate"] == pytest.approx(1 / 3)
    fails = {(f["image"], f["feature_id"]) for f in data["failures"]}
    assert fails == {("b", "p4"), ("c", "")}
    json.dumps(data)


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (CI installs it)")
def test_report_renders_in_headless_chromium(tmp_path):
    images, ov = fake_run(tmp_path)
    html, _ = build_report(images, title="t", threshold=0.6, model="m.pt", overlays_dir=ov)
    page = tmp_path / "report.html"
    page.write_text(html)
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=3000", "--dump-dom", page.as_uri()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    dom = r.stdout
    assert 'data-images-total="2"' in dom and 'data-images-loaded="2"' in dom, dom[:500]
    assert "unreadable TIFF" in dom
    shot = tmp_path / "shot.png"
    r = subprocess.run(cmd[:-2] + [f"--screenshot={shot}", "--window-size=1000,1400", page.as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and shot.stat().st_size > 5000
