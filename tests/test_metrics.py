"""The ruler: EPE on shapes whose answer is known exactly, feature counts, gauge statistics."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import integrate
from shapely.geometry import box

from segsem_cli.metrics import aggregate, compare_gauges, epe_samples, evaluate_image, sample_ring
from segsem_cli.types import ContourRecord


def circle(r, n=50_000, c=(0.0, 0.0), phase=0.0):
    th = phase + 2 * np.pi * np.arange(n) / n
    return np.c_[c[0] + r * np.cos(th), c[1] + r * np.sin(th)]


def rect(x0, y0, x1, y1):
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=float)


# chord error of the 50k-gon "circles" below: R (1 - cos(pi / n)) ~ 1e-7 nm at R = 50
TOL = 1e-6


def test_sample_ring_spacing_and_positions():
    pts = sample_ring(rect(0, 0, 10, 5), 0.5)
    assert len(pts) == 60  # perimeter 30 / 0.5
    np.testing.assert_allclose(pts[0], [0.25, 0.0])
    np.testing.assert_allclose(pts[20], [10.0, 0.25])  # arc length 10.25 is on the right edge
    steps = np.hypot(*np.diff(pts, axis=0).T)
    assert steps.max() <= 0.5 + 1e-12
    assert len(sample_ring(rect(0, 0, 10, 5), 0.7)) == 43  # ceil(30 / 0.7)


def test_exact_truth_scores_zero():
    c = circle(50, 4000)
    d = epe_samples(c, [c])
    assert len(d) >= 2 * np.pi * 50 / 0.5
    assert np.abs(d).max() < 1e-9
    s = evaluate_image([{"id": "f", "exterior": c.tolist(), "holes": []}], [ContourRecord("i", "p", c, "t", 1.0)], pixel_nm=1.0)
    assert s.epe_rms_nm < 1e-9 and s.epe_max_nm < 1e-9
    assert (s.n_true, s.n_pred, s.n_matched, s.n_missing, s.n_extra) == (1, 1, 1, 0, 0)


@pytest.mark.parametrize("d", [0.7, -0.35, 2.5])
def test_scaled_circle_scores_d_everywhere(d):
    R = 50.0
    e = epe_samples(circle(R), [circle(R + d, phase=1e-3)], signed=True)
    np.testing.assert_allclose(e, d, atol=TOL)
    s = evaluate_image([circle(R)], [circle(R + d, phase=1e-3)], pixel_nm=0.5, match_dist_nm=3.0)
    assert s.epe_rms_nm == pytest.approx(abs(d), abs=TOL)
    assert s.epe_max_nm == pytest.approx(abs(d), abs=TOL)
    assert s.epe_p95_nm == pytest.approx(abs(d), abs=TOL)
    assert s.epe_bias_nm == pytest.approx(d, abs=TOL)  # positive: prediction too large
    assert s.epe_rms_px == pytest.approx(abs(d) / 0.5, abs=TOL)


@pytest.mark.parametrize("N", [8, 24])
def test_circle_against_inscribed_ngon_scores_the_sagitta(N):
    R = 50.0
    ngon = circle(R, N)
    sag = R * (1 - np.cos(np.pi / N))
    # truth circle, prediction N-gon: EPE(phi) = R cos(phi) - R cos(pi/N), phi uniform in [-pi/N, pi/N]
    e = epe_samples(circle(R), [ngon], step_nm=0.05)
    assert e.max() == pytest.approx(sag, rel=1e-5)
    ms, _ = integrate.quad(lambda p: (R * np.cos(p) - R * np.cos(np.pi / N)) ** 2, -np.pi / N, np.pi / N)
    rms_exact = np.sqrt(ms / (2 * np.pi / N))
    assert np.sqrt(np.mean(e**2)) == pytest.approx(rms_exact, rel=1e-4)
    # truth N-gon, prediction circle: along an edge of half-length h at distance a from the centre,
    # EPE(x) = R - sqrt(a^2 + x^2), x uniform in [-h, h]
    a, h = R * np.cos(np.pi / N), R * np.sin(np.pi / N)
    e2 = epe_samples(ngon, [circle(R)], step_nm=0.05, signed=True)
    assert e2.max() == pytest.approx(sag, rel=1e-5)
    assert e2.min() > -1e-9  # the circle is outside the inscribed polygon everywhere
    ms2, _ = integrate.quad(lambda x: (R - np.sqrt(a * a + x * x)) ** 2, -h, h)
    assert np.sqrt(np.mean(e2**2)) == pytest.approx(np.sqrt(ms2 / (2 * h)), rel=1e-4)


def test_rectangle_shifted_in_x():
    W, H, s = 40.0, 100.0, 0.7
    e = epe_samples(rect(0, 0, W, H), [rect(s, 0, W + s, H)], step_nm=0.01)
    # left edge: exactly s. Right edge (x = W): s, except within s of its ends, where the prediction's
    # bottom/top edge (which passes through the truth's corner) is nearer: EPE = y there.
    # Top and bottom edges: 0, except a stretch of length s at their left end where the distance
    # falls linearly from s to 0. Sum of EPE^2 over arc length:
    #   2 H s^2 - 2 * int_0^s (s^2 - y^2) dy + 2 * int_0^s (s - x)^2 dx = 2 H s^2 - 4 s^3/3 + 2 s^3/3
    exact_ms = (2 * H * s * s - 2 * s**3 / 3) / (2 * (W + H))
    assert np.sqrt(np.mean(e**2)) == pytest.approx(np.sqrt(exact_ms), rel=1e-4)
    assert e.max() == pytest.approx(s, abs=1e-9)
    assert np.mean(np.isclose(e, s, atol=1e-9)) == pytest.approx((2 * H - 2 * s) / (2 * (W + H)), abs=1e-3)


def test_holes_are_part_of_the_boundary():
    ext, hole = rect(0, 0, 100, 100), rect(40, 40, 60, 60)
    truth = [{"id": "ring", "exterior": ext.tolist(), "holes": [hole.tolist()]}]
    pred = [ContourRecord("i", "r", ext, "t", 1.0, holes_nm=(rect(39, 39, 61, 61),))]  # hole 1 nm larger each side
    s = evaluate_image(truth, pred, pixel_nm=1.0, step_nm=0.25)
    # 400 nm of exterior at EPE 0 and the 80 nm hole at exactly 1 nm everywhere (corners included:
    # the truth corner (40, 40) is 1 nm from the predicted edges x = 39 and y = 39)
    assert s.epe_max_nm == pytest.approx(1.0, abs=1e-12)
    assert s.epe_rms_nm == pytest.approx(np.sqrt(80 / 480), abs=1e-12)
    assert s.epe_bias_nm == pytest.approx(-80 / 480, abs=1e-12)  # the hole grew: the solid part shrank
    assert s.n_missing == 0 and s.n_extra == 0


def test_missing_and_extra_features():
    truth = [{"id": f"t{i}", "exterior": rect(100 * i, 0, 100 * i + 40, 40).tolist()} for i in range(3)]
    pred = [
        ContourRecord("img", "p0", rect(0.5, 0, 40.5, 40), "sam2", 0.9),
        ContourRecord("img", "p2", rect(200, 0, 240, 40), "sam2", 0.9),
        ContourRecord("img", "junk", rect(0, 200, 30, 230), "canny", 0.3),
    ]
    s = evaluate_image(truth, pred, pixel_nm=1.0)
    assert (s.n_true, s.n_pred, s.n_matched, s.n_missing, s.n_extra) == (3, 3, 2, 1, 1)
    assert s.missing_ids == ["t1"] and s.extra_ids == ["junk"]
    # EPE pools only the two matched features: p0 is shifted 0.5 nm -> max 0.5; p2 exact
    assert s.epe_max_nm == pytest.approx(0.5, abs=1e-9)
    assert 0 < s.epe_rms_nm < 0.5


def test_fov_border_samples_are_ignored():
    # truth runs past the image; the prediction is cut at the image border (x = 50)
    truth = [rect(0, 0, 100, 20)]
    pred = [rect(0, 0, 50, 20)]
    fov = box(-10, -10, 50, 30)
    s = evaluate_image(truth, pred, pixel_nm=1.0, fov_nm=fov, border_nm=2.0)
    assert s.epe_max_nm == pytest.approx(0.0, abs=1e-9)
    assert s.n_missing == 0 and s.n_extra == 0
    outside = evaluate_image([rect(200, 0, 220, 20)], [], pixel_nm=1.0, fov_nm=fov)
    assert outside.n_true == 0 and outside.n_missing == 0 and outside.epe_rms_nm is None


def test_border_slivers_are_counted_apart():
    fov = box(0, 0, 100, 100)
    # a print reaching 1-4 px into the top of the image (sawtooth inner edge, mean depth 2.5 px):
    # some of its samples lie beyond the 2 px border band, but its sidewall top is out of view
    saw = [(20 + 5 * k, 96.0 if k % 2 else 99.0) for k in range(13)]
    sliver = np.array(saw + [(80, 130), (20, 130)], dtype=float)
    s = evaluate_image([sliver], [], pixel_nm=1.0, fov_nm=fov)
    assert (s.n_sliver, s.n_true, s.n_missing) == (1, 0, 0) and s.sliver_ids == ["0"]
    assert s.to_dict()["n_sliver"] == 1 and aggregate([s])["n_sliver"] == 1
    # the same feature scored when the rule is off: nothing predicted, so missing
    s0 = evaluate_image([sliver], [], pixel_nm=1.0, fov_nm=fov, sliver_depth_px=0)
    assert (s0.n_sliver, s0.n_true, s0.n_missing) == (0, 1, 1)
    # a 2 nm pixel halves the depth in pixels: 5 nm deep is a sliver at 2 nm/px, not at 1 nm/px
    five = rect(20, 95, 80, 130)
    assert evaluate_image([five], [], pixel_nm=1.0, fov_nm=fov).n_missing == 1
    assert evaluate_image([five], [], pixel_nm=2.0, fov_nm=fov).n_sliver == 1
    # a feature cut at a corner: depth = area inside / border length covered = 400 / 40 nm
    from segsem_cli.metrics import _border_depth
    assert _border_depth({"exterior": rect(-10, -10, 20, 20)}, fov) == pytest.approx(10.0)
    assert _border_depth({"exterior": rect(10, 10, 20, 20)}, fov) == float("inf")


def test_aggregate_pools_samples():
    a = evaluate_image([circle(20, 20000)], [circle(21, 20000)], pixel_nm=1.0)
    b = evaluate_image([circle(40, 20000)], [circle(43, 20000)], pixel_nm=2.0)
    agg = aggregate([a, b])
    na, nb = a.n_samples, b.n_samples
    assert agg["n_samples"] == na + nb
    assert agg["epe_rms_nm"] == pytest.approx(np.sqrt((na * 1 + nb * 9) / (na + nb)), rel=1e-5)
    assert agg["epe_rms_px"] == pytest.approx(np.sqrt((na * 1 + nb * 2.25) / (na + nb)), rel=1e-5)
    assert agg["epe_max_nm"] == pytest.approx(3.0, rel=1e-5)
    assert agg["n_true"] == 2 and agg["n_missing"] == 0


def test_no_prediction_at_all_is_all_missing():
    s = evaluate_image([rect(0, 0, 10, 10)], [], pixel_nm=1.0)
    assert s.n_missing == 1 and s.n_matched == 0 and s.epe_rms_nm is None
    assert np.isinf(epe_samples(rect(0, 0, 10, 10), [])).all()


def test_compare_gauges_known_numbers():
    truth = [
        {"name": "a", "true_cd_nm": "40"},
        {"name": "b", "true_cd_nm": "50"},
        {"name": "c", "true_cd_nm": "60"},
        {"name": "d", "true_cd_nm": "70"},
        {"name": "e", "true_cd_nm": ""},  # no true CD (e.g. gauge off every feature)
    ]
    measured = [
        {"name": "a", "wafer_cd_nm": "41"},
        {"name": "b", "wafer_cd_nm": "49"},
        {"name": "c", "wafer_cd_nm": "63"},
        {"name": "d", "wafer_cd_nm": ""},
        {"name": "e", "wafer_cd_nm": "12"},
    ]
    g = compare_gauges(truth, measured)
    # errors +1, -1, +3: mean 1, sample std sqrt(((0)^2 + (-2)^2 + 2^2) / 2) = 2
    assert g.errors_nm == {"a": 1.0, "b": -1.0, "c": 3.0}
    assert g.bias_nm == pytest.approx(1.0)
    assert g.sigma3_nm == pytest.approx(6.0)
    assert g.max_abs_nm == pytest.approx(3.0)
    assert g.rms_nm == pytest.approx(np.sqrt(11 / 3))
    assert (g.n_truth, g.n_measured, g.n_compared, g.n_missing, g.n_spurious) == (4, 4, 3, 1, 1)
    assert g.missing == ["d"] and g.spurious == ["e"]


# ------------------------------------------------------------------ overlay


def test_overlay_draws_subpixel_contours(tmp_path):
    import cv2

    from segsem_cli.overlay import draw_overlay

    px = np.tile(np.linspace(0, 1, 40), (30, 1)).astype(np.float32)
    # a vertical edge at u = 10 lands at x = 19.5 in the 2x image: columns 19 and 20 share it
    out = draw_overlay(px, {"red": [rect(10, 5, 30, 25)]}, tmp_path / "o.png", legend=False)
    img = cv2.imread(str(out))
    assert img.shape == (60, 80, 3)
    red = img[30, :, 2].astype(int) - img[30, :, 1].astype(int)
    assert red[19] > 100 and red[20] > 100 and abs(red[19] - red[20]) < 30
    assert red[17] < 20 and red[22] < 20
    assert [p.name for p in tmp_path.iterdir()] == ["o.png"]


# ------------------------------------------------------------------ evaluate command, end to end


def _rect_rows(image, fid, r, source="sam2", conf=0.9):
    return [f"{image},{fid},{source},{conf},0,{k},{x},{y}" for k, (x, y) in enumerate(r)]


def _make_truth(tmp_path):
    import json

    import cv2

    d = tmp_path / "truth"
    d.mkdir()
    cv2.imwrite(str(d / "A.png"), np.full((64, 64), 100, np.uint8))
    cv2.imwrite(str(d / "B.png"), np.full((32, 32), 100, np.uint8))
    (d / "manifest.csv").write_text("image,x_nm,y_nm,pixel_nm,label\nA.png,0,0,1.0,\nB.png,1000,0,2.0,\n")
    truth = {
        "images": {
            "A": {
                "offset_nm": [0.5, -0.25], "pixel_nm": 1.0, "shape": [64, 64], "center_nm": [0, 0],
                "features": [
                    {"id": "A:0", "design_index": 0, "exterior": rect(-20, -20, -5, 20).tolist(), "holes": [], "label": 1, "defect": None},
                    {"id": "A:1", "design_index": 1, "exterior": rect(5, -20, 20, 20).tolist(), "holes": [], "label": 2, "defect": None},
                    # a design feature that did not print: not part of the wafer truth, so not "missing"
                    {"id": "A:2", "design_index": 3, "exterior": rect(24, -5, 28, 5).tolist(), "holes": [], "label": 0, "defect": "missing"},
                ],
            },
            "B": {
                "offset_nm": [0, 0], "pixel_nm": 2.0, "shape": [32, 32], "center_nm": [1000, 0],
                "features": [{"id": "B:0", "design_index": 2, "exterior": rect(990, -10, 1010, 10).tolist(), "holes": [], "label": 1, "defect": None}],
            },
        }
    }
    (d / "truth.json").write_text(json.dumps(truth))
    (d / "gauges_truth.csv").write_text("name,x1,y1,x2,y2,true_cd_nm\ng1,-25,0,0,0,15\ng2,0,0,25,0,15\ng3,985,0,1015,0,20\n")
    lines = ["image,feature_id,source,confidence,ring,point_index,x_nm,y_nm"]
    lines += _rect_rows("A", "A:0", rect(-20.5, -20.5, -4.5, 20.5))  # grown by 0.5 nm on every side
    lines += _rect_rows("A.tif", "A:1", rect(5, -20, 20, 20))  # exact; image named by its file name
    lines += _rect_rows("B", "junk", rect(1015, 15, 1025, 25), "threshold", 0.2)  # B:0 missing, junk extra
    (tmp_path / "contours.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "gauges.csv").write_text(
        "name,x1,y1,x2,y2,wafer_cd_nm,image,source,confidence,status\n"
        "g1,-25,0,0,0,16,A,sam2,0.9,ok\ng2,0,0,25,0,14.5,A,sam2,0.9,ok\ng3,985,0,1015,0,,B,,,no_crossing\n"
    )
    return d


def _app():
    import typer

    from segsem_cli.commands.evaluate import register

    app = typer.Typer()

    @app.callback()
    def _root():
        """test root"""

    register(app)
    return app


def test_evaluate_command_end_to_end(tmp_path):
    import json

    import cv2
    from typer.testing import CliRunner

    d = _make_truth(tmp_path)
    res = CliRunner().invoke(
        _app(),
        ["evaluate", "--truth", str(d), "--pred", str(tmp_path / "contours.csv"), "--gauges", str(tmp_path / "gauges.csv"),
         "--json", str(tmp_path / "score.json"), "--overlays", str(tmp_path / "ov")],
    )
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "overall" in res.output and "3 sigma" in res.output
    j = json.loads((tmp_path / "score.json").read_text())
    a, b = j["images"]
    # A: feature A:0 is 0.5 nm off everywhere, A:1 exact, equal perimeters -> RMS sqrt(0.25 / 2)
    assert a["image"] == "A" and (a["n_true"], a["n_matched"], a["n_missing"], a["n_extra"]) == (2, 2, 0, 0)
    assert a["epe_rms_nm"] == pytest.approx(np.sqrt(0.125), abs=1e-9)
    assert a["epe_max_nm"] == pytest.approx(0.5, abs=1e-9)
    assert a["epe_bias_nm"] == pytest.approx(0.25, abs=1e-9)
    assert a["epe_rms_px"] == pytest.approx(np.sqrt(0.125), abs=1e-9)
    assert b["image"] == "B" and (b["n_true"], b["n_missing"], b["n_extra"]) == (1, 1, 1)
    assert b["missing_ids"] == ["B:0"] and b["extra_ids"] == ["junk"] and b["epe_rms_nm"] is None
    o = j["overall"]
    assert (o["n_true"], o["n_matched"], o["n_missing"], o["n_extra"]) == (3, 2, 1, 1)
    assert o["epe_rms_nm"] == pytest.approx(np.sqrt(0.125), abs=1e-9)
    g = j["gauges"]
    assert g["bias_nm"] == pytest.approx(0.25) and g["max_abs_nm"] == pytest.approx(1.0)
    assert g["sigma3_nm"] == pytest.approx(3 * np.std([1.0, -0.5], ddof=1))
    assert g["missing"] == ["g3"] and g["n_compared"] == 2
    assert j["unassigned"] == 0
    # overlays: B's missing truth edge x = 990 nm is u = 11 px -> x = 21.5 in the 2x image, drawn green
    ov = cv2.imread(str(tmp_path / "ov" / "B.png"))
    assert ov.shape == (64, 64, 3)
    assert ov[32, 21, 1] > ov[32, 21, 2] + 50 and ov[32, 22, 1] > ov[32, 22, 2] + 50
    assert (tmp_path / "ov" / "A.png").is_file()


def test_evaluate_assigns_by_field_of_view_and_reports_bad_input(tmp_path):
    import json

    from typer.testing import CliRunner

    from segsem_cli.errors import SegsemError

    d = _make_truth(tmp_path)
    out = tmp_path / "fov.json"
    res = CliRunner().invoke(_app(), ["evaluate", "--truth", str(d), "--pred", str(tmp_path / "contours.csv"),
                                      "--assign", "fov", "--json", str(out)])
    assert res.exit_code == 0, repr(res.exception)
    a, b = json.loads(out.read_text())["images"]
    assert a["n_pred"] == 2 and b["n_pred"] == 1 and b["n_extra"] == 1
    # a GDS without image names: contours go to the image whose field of view holds them
    import gdstk

    lib = gdstk.Library(unit=1e-9, precision=1e-10)
    cell = lib.new_cell("TOP")
    for r in (rect(-20.5, -20.5, -4.5, 20.5), rect(5, -20, 20, 20), rect(1015, 15, 1025, 25)):
        cell.add(gdstk.Polygon(r, layer=100, datatype=0))
    cell.add(gdstk.Polygon(rect(5000, 0, 5010, 10), layer=100, datatype=0))  # in no image
    cell.add(gdstk.Polygon(rect(990, -10, 1010, 10), layer=7, datatype=0))  # other layer: ignored
    lib.write_gds(tmp_path / "pred.gds")
    res = CliRunner().invoke(_app(), ["evaluate", "--truth", str(d), "--pred", str(tmp_path / "pred.gds"), "--json", str(out)])
    assert res.exit_code == 0, repr(res.exception)
    j = json.loads(out.read_text())
    a, b = j["images"]
    assert j["settings"]["assign"] == "fov" and j["unassigned"] == 1
    assert a["n_pred"] == 2 and a["epe_rms_nm"] == pytest.approx(np.sqrt(0.125), abs=1e-6)
    assert (b["n_missing"], b["n_extra"]) == (1, 1)
    # bad input: one SegsemError line naming the file
    (d / "truth.json").write_text('{"images": {"A": {"pixel_nm": 1, "shape": [64, 64], "center_nm": [0, 0], '
                                  '"features": [{"id": "x", "exterior": [[0, 0], [1, 1]]}]}}}')
    res = CliRunner().invoke(_app(), ["evaluate", "--truth", str(d), "--pred", str(tmp_path / "contours.csv")])
    assert isinstance(res.exception, SegsemError)
    assert "truth.json image 'A' feature 0 field 'exterior'" in str(res.exception)
    res = CliRunner().invoke(_app(), ["evaluate", "--truth", str(tmp_path / "nope"), "--pred", str(tmp_path / "contours.csv")])
    assert isinstance(res.exception, SegsemError) and "truth directory not found" in str(res.exception)


def test_evaluate_on_a_synth_dataset_scores_its_own_truth_zero_and_a_grown_copy_one_nm(tmp_path):
    """Round trip with the real ``segsem synth`` output format (truth.json, manifest, gauges_truth.csv)."""
    dataset = pytest.importorskip("segsem_cli.synth.dataset")
    import csv
    import json

    import gdstk
    from shapely.geometry import Polygon

    from segsem_cli.contour_io import write_contour_csv
    from segsem_cli.layout import load_layout
    from segsem_cli.metrics import evaluate_run, read_truth

    lib = gdstk.Library(unit=1e-9, precision=1e-12)
    cell = lib.new_cell("TOP")
    for i in range(12):
        cell.add(gdstk.rectangle((i * 80, -300), (i * 80 + 40, 300), layer=1))
    lib.write_gds(tmp_path / "l.gds")
    (tmp_path / "g.csv").write_text("name,x1,y1,x2,y2\n" + "".join(f"g{i},{i * 80 - 15},0,{i * 80 + 55},0\n" for i in range(3, 9)))
    dataset.make_dataset(load_layout(tmp_path / "l.gds", layer=(1, 0)), tmp_path / "syn", count=2, image_size=96,
                         pixel_nm=2.0, sites=[(400, 0), (480, 60)], gauges=tmp_path / "g.csv", defect_rate=0.0)
    images, gauges_truth = read_truth(tmp_path / "syn")
    assert len(images) == 2 and gauges_truth is not None and all(im.image_path.is_file() for im in images)
    recs = [ContourRecord(im.name, str(f["id"]), f["exterior"], "truth", 1.0, tuple(f["holes"])) for im in images for f in im.features]
    write_contour_csv(recs, tmp_path / "c.csv")
    rows = list(csv.DictReader(open(gauges_truth)))
    with open(tmp_path / "m.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["name", "wafer_cd_nm"])
        w.writerows([r["name"], r["true_cd_nm"]] for r in rows)
    res = evaluate_run(tmp_path / "syn", tmp_path / "c.csv", gauges_path=tmp_path / "m.csv")
    o = res["overall"]
    assert o["n_true"] > 0 and o["n_missing"] == 0 and o["n_extra"] == 0
    assert o["epe_max_nm"] < 1e-4  # the contour CSV keeps 4 decimals
    assert res["gauges"]["n_compared"] >= 2 and res["gauges"]["max_abs_nm"] < 1e-5
    grown = [ContourRecord(r.image, r.feature_id, np.asarray(Polygon(r.xy_nm).buffer(1.0, join_style="mitre").exterior.coords)[:-1],
                           "grown", 1.0) for r in recs]
    write_contour_csv(grown, tmp_path / "c2.csv")
    o2 = evaluate_run(tmp_path / "syn", tmp_path / "c2.csv")["overall"]
    assert o2["epe_rms_nm"] == pytest.approx(1.0, abs=2e-3) and o2["epe_bias_nm"] == pytest.approx(1.0, abs=2e-3)
    assert o2["epe_rms_px"] == pytest.approx(0.5, abs=1e-3)
    json.dumps(res)  # JSON-ready
