"""`segsem extract` end to end on the bundled example (classical path), through the real CLI."""
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from segsem_cli.cli import main

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"
LAYOUT = ROOT / "examples" / "opc_test.gds"
GAUGES = ROOT / "examples" / "gauges.csv"


def small_manifest(tmp_path, names=("img_0000", "img_0003"), extra_rows=()):
    """A manifest over copies of some bundled images (plus optional bad rows)."""
    d = tmp_path / "data"
    d.mkdir(exist_ok=True)
    rows = list(csv.DictReader((DATA / "manifest.csv").open()))
    keep = [r for r in rows if Path(r["image"]).stem in names]
    for r in keep:
        shutil.copy(DATA / r["image"], d / r["image"])
    with (d / "manifest.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["image", "x_nm", "y_nm", "pixel_nm", "lot"])
        w.writeheader()
        for r in keep:
            w.writerow({"image": r["image"], "x_nm": r["x_nm"], "y_nm": r["y_nm"], "pixel_nm": r["pixel_nm"], "lot": "L7"})
        for r in extra_rows:
            w.writerow(r)
    shutil.copy(DATA / "truth.json", d / "truth.json")
    return d / "manifest.csv"


def run(args):
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ex")
    m = small_manifest(tmp)
    out = tmp / "out"
    rc = run(["extract", m, "--layout", LAYOUT, "--export", "gds", "--out", out, "--gauges", GAUGES,
              "--fallback-opt", "threshold=0.63"])
    assert rc == 0
    return m, out


def test_outputs_written(extracted):
    m, out = extracted
    for name in ("contours.gds", "features.csv", "gauges.csv", "summary.json", "images/img_0000.json", "overlays/img_0000.png"):
        assert (out / name).is_file(), name
    assert not list(out.rglob("*.part*")), "temporary files left behind"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["ok"] + summary["counts"]["ambiguous"] == 2


def test_alignment_evidence_is_reported_and_weak_axes_flag_the_image(extracted):
    m, out = extracted
    for p in sorted((out / "images").glob("*.json")):
        rec = json.loads(p.read_text())
        ev = rec["align_evidence"]
        assert len(ev) == 2 and set(ev) <= {"sides", "ends", "one-sided", "none"}
        if set(ev) & {"one-sided", "none"}:  # an axis only line ends facing one way can fix
            assert rec["status"] == "ambiguous" and "no straight feature sides fix" in rec["align_message"]


def test_scan_line_report(extracted, tmp_path):
    m, out = extracted  # default: --scan-lines auto
    sl = json.loads((out / "images" / "img_0000.json").read_text())["scan_lines"]
    assert set(sl) == {"applied", "rms_grey", "noise_floor_grey", "shrink", "lines_measured"}
    assert sl["lines_measured"] > 0 and sl["noise_floor_grey"] > 0
    if sl["applied"]:  # the bundled medium-noise images carry line-to-line offsets of about 1.5 grey levels
        assert sl["rms_grey"] ** 2 > 1.99 * sl["noise_floor_grey"] ** 2 and 0 < sl["shrink"] < 1
    else:
        assert sl["shrink"] == 0
    m1 = small_manifest(tmp_path, names=("img_0000",))
    rc = run(["extract", m1, "--layout", LAYOUT, "--export", "csv", "--out", tmp_path / "o", "--no-overlays",
              "--scan-lines", "off"])
    assert rc == 0
    off = json.loads((tmp_path / "o" / "images" / "img_0000.json").read_text())["scan_lines"]
    assert off == {"applied": False, "rms_grey": 0.0, "noise_floor_grey": 0.0, "shrink": 0.0, "lines_measured": 0}


def test_alignment_recovers_stage_error(extracted):
    m, out = extracted
    truth = json.loads((m.parent / "truth.json").read_text())["images"]
    for name in ("img_0000", "img_0003"):
        rec = json.loads((out / "images" / f"{name}.json").read_text())
        err = np.abs(np.subtract(rec["offset_nm"], truth[name]["offset_nm"])) / rec["pixel_nm"]
        if rec["align_status"] == "ok":
            assert np.hypot(*err) < 0.5, (name, rec["offset_nm"], truth[name]["offset_nm"])
        else:  # e.g. lines crossing the whole image leave one axis undetermined: flagged, the other axis found
            assert rec["align_status"] == "ambiguous" and rec["status"] == "ambiguous"
            assert err.min() < 0.5, (name, rec["offset_nm"], truth[name]["offset_nm"])


def test_gds_readable_by_klayout_with_feature_count(extracted):
    import klayout.db as db

    m, out = extracted
    feats = list(csv.DictReader((out / "features.csv").open()))
    n_ok = sum(1 for f in feats if f["status"] == "ok")
    assert n_ok > 0
    ly = db.Layout()
    ly.read(str(out / "contours.gds"))
    top = ly.top_cell()
    n = sum(1 for _ in top.begin_shapes_rec(ly.layer(100, 0)))
    assert n >= n_ok  # long contours may be split, never dropped
    assert all(f["source"] == "threshold" for f in feats if f["status"] == "ok")
    # a layout-seeded retry is marked with the status it replaced; others leave both empty
    assert all(f["seed"] in ("", "layout") and (f["seed"] == "") == (f["first_status"] == "") for f in feats)
    # the local-level split of a charging-merged region is marked too (none in these images)
    assert all(f["split_level"] == "" or (f["first_status"] == "merged" and float(f["split_level"]) > 0) for f in feats)
    # every extracted feature says which side its substrate is on (resist lines: outside). An
    # unprinted line (truth: defect "missing") leaves a wide space bounded by its neighbours' edges,
    # which alone would come out "ok" with the substrate inside: one layer, one tone, so it is
    # tried on the image's side, finds no edge, and is reported not found.
    assert {f["substrate"] for f in feats if f["status"] == "ok"} == {"outside"}
    truth = json.loads((DATA / "truth.json").read_text())["images"]
    unprinted = {(im, f"p{f['design_index']}") for im, t in truth.items() for f in t["features"] if f.get("defect") == "missing"}
    flagged = {(f["image"], f["feature_id"]): f for f in feats if f["tone_check"]}
    assert flagged and set(flagged) <= unprinted
    assert all(f["status"] == "not_found" and f["tone_check"] == "minority" for f in flagged.values())
    assert not any(f["status"] == "ok" for f in feats if (f["image"], f["feature_id"]) in unprinted)
    # the summary counts what the check changed per image, and the run ends with a note saying so
    from segsem_cli.pipeline import tone_check_note

    images = json.loads((out / "summary.json").read_text())["images"]
    per_image = {r["image"]: r.get("tone_check", {}) for r in images}
    for im in per_image:
        assert per_image[im].get("minority", 0) == sum(1 for k in flagged if k[0] == im)
    note = tone_check_note(images)
    assert f"{len(flagged)} feature(s)" in note and "reported not_found" in note and "substrate=outside" in note


def test_tone_check_note_is_silent_when_nothing_changed():
    from segsem_cli.pipeline import tone_check_note

    assert tone_check_note([{"image": "a"}, {"image": "b", "tone_check": {}}]) is None
    note = tone_check_note([{"image": "a", "tone_check": {"flipped": 3}}, {"image": "b", "tone_check": {"flipped": 2, "majority": 1}}])
    assert "6 feature(s) in 2 image(s)" in note and "5 flipped" in note and "1 set to the image's majority" in note


def test_contours_match_truth(extracted):
    from segsem_cli.metrics import evaluate_run

    m, out = extracted
    ev = evaluate_run(m.parent, out / "contours.gds")
    # easy-noise images with the edge threshold that matches the simulator's convention
    assert ev["overall"]["epe_rms_px"] < 0.6, ev["overall"]


def test_gauge_table(extracted):
    m, out = extracted
    rows = list(csv.DictReader((out / "gauges.csv").open()))
    assert [r["name"] for r in rows] == [r["name"] for r in csv.DictReader(GAUGES.open())]
    for r in rows:
        assert r["status"] in ("ok", "outside_images", "no_crossing", "single_crossing")
        if r["status"] == "ok":
            assert float(r["wafer_cd_nm"]) > 0 and r["image"] and r["source"] == "threshold"
        else:
            assert r["wafer_cd_nm"] == ""
    assert "kind" in rows[0]  # extra columns passed through
    truth = {r["name"]: r for r in csv.DictReader((DATA / "gauges_truth.csv").open())}
    errs = [float(r["wafer_cd_nm"]) - float(truth[r["name"]]["true_cd_nm"]) for r in rows
            if r["status"] == "ok" and truth[r["name"]]["true_cd_nm"] and truth[r["name"]]["image"] in ("img_0000", "img_0003")]
    assert errs, "no gauge measured on the easy images"
    assert abs(np.mean(errs)) < 1.0 and np.max(np.abs(errs)) < 3.0, errs


def test_resume_and_force(extracted, capsys):
    m, out = extracted
    before = (out / "images" / "img_0000.json").stat().st_mtime_ns
    assert run(["extract", m, "--layout", LAYOUT, "--export", "gds", "--out", out, "--gauges", GAUGES,
                "--fallback-opt", "threshold=0.63"]) == 0
    assert (out / "images" / "img_0000.json").stat().st_mtime_ns == before
    assert json.loads((out / "summary.json").read_text())["counts"]["resumed"] == 2
    # other options: images are redone
    assert run(["extract", m, "--layout", LAYOUT, "--export", "gds", "--out", out, "--no-overlays"]) == 0
    assert (out / "images" / "img_0000.json").stat().st_mtime_ns != before


def test_bad_images_do_not_sink_the_batch(tmp_path):
    import tifffile

    bad = [
        {"image": "corrupt.tif", "x_nm": 1200, "y_nm": 400, "pixel_nm": 1},
        {"image": "blank.tif", "x_nm": 1200, "y_nm": 400, "pixel_nm": 1},
        {"image": "missing.tif", "x_nm": 1200, "y_nm": 400, "pixel_nm": 1},
    ]
    m = small_manifest(tmp_path, names=("img_0000",), extra_rows=bad)
    (m.parent / "corrupt.tif").write_bytes(b"II*\x00not a tiff at all")
    tifffile.imwrite(m.parent / "blank.tif", np.full((64, 64), 7, np.uint8))
    out = tmp_path / "out"
    assert run(["extract", m, "--layout", LAYOUT, "--export", "csv", "--out", out, "--no-overlays"]) == 0
    recs = {p.stem: json.loads(p.read_text()) for p in (out / "images").glob("*.json")}
    assert recs["img_0000"]["status"] in ("ok", "ambiguous")
    assert recs["corrupt"]["status"] == "error" and "unreadable TIFF" in recs["corrupt"]["message"]
    assert recs["blank"]["status"] == "error" and "blank image" in recs["blank"]["message"]
    assert recs["missing"]["status"] == "error" and "file not found" in recs["missing"]["message"]
    rows = list(csv.DictReader((out / "contours.csv").open()))
    assert rows and {r["image"] for r in rows} == {"img_0000"}


def test_workers_give_the_same_contours(tmp_path):
    m = small_manifest(tmp_path)
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(["extract", m, "--layout", LAYOUT, "--export", "csv", "--out", a, "--no-overlays"]) == 0
    assert run(["extract", m, "--layout", LAYOUT, "--export", "csv", "--out", b, "--no-overlays", "--workers", "2"]) == 0
    assert (a / "contours.csv").read_text() == (b / "contours.csv").read_text()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--layer", "9/0"], "has no polygons on layer 9/0"),
        (["--fallback", "nope"], "unknown fallback 'nope'"),
        (["--export", "dxf"], "unknown exporter 'dxf'"),
        (["--cell", "NOPE"], "no cell 'NOPE'"),
        (["--fallback-opt", "threshold"], "--fallback-opt: 'threshold' is not key=value"),
        (["--no-such-option"], "No such option: --no-such-option"),  # a usage error, not a traceback
        (["--workers", "many"], "Invalid value for '--workers'"),
        (["--scan-lines", "rows"], "--scan-lines: 'rows' is not one of auto, off"),
        (["--border-margin", "-1"], "--border-margin: must be between 0 and 64 pixels, got -1.0"),
    ],
)
def test_bad_options_one_line_error(tmp_path, capsys, args, message):
    m = small_manifest(tmp_path, names=("img_0000",))
    rc = run(["extract", m, "--layout", LAYOUT, "--out", tmp_path / "o", *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in " ".join(err.split())


@pytest.mark.parametrize("fallback", ["threshold", "canny", "active-contour"])
def test_a_bad_fallback_option_value_stops_before_any_image(tmp_path, capsys, fallback):
    """Each built-in fallback checks its option values once (``check_options``), before an image is read."""
    m = small_manifest(tmp_path, names=("img_0000",))
    out = tmp_path / "o"
    rc = run(["extract", m, "--layout", LAYOUT, "--out", out, "--no-overlays", "--fallback", fallback,
              "--fallback-opt", "repass_matched=maybe"])
    assert rc == 2
    assert "--fallback-opt repass_matched='maybe': must be true or false" in " ".join(capsys.readouterr().err.split())
    assert not (out / "images").exists()


def test_a_batch_where_every_image_failed_exits_non_zero(tmp_path, capsys):
    """Per-image failures are reported and the others complete; when none succeeded the exit status
    is 1 (a command's typer.Exit code used to be dropped on the way to the shell: it exited 0)."""
    m = small_manifest(tmp_path, names=(), extra_rows=[{"image": "broken.tif", "x_nm": 0, "y_nm": 0, "pixel_nm": 1}])
    (m.parent / "broken.tif").write_bytes(b"not a tiff")
    rc = run(["extract", m, "--layout", LAYOUT, "--out", tmp_path / "o", "--no-overlays"])
    assert rc == 1
    assert "broken" in capsys.readouterr().err


def test_bad_manifest_names_row_and_field(tmp_path, capsys):
    m = tmp_path / "m.csv"
    m.write_text("image,x_nm,y_nm,pixel_nm\na.tif,12,abc,1\n")
    rc = run(["extract", m, "--layout", LAYOUT, "--out", tmp_path / "o"])
    assert rc == 2
    assert "m.csv row 2 field 'y_nm': 'abc' is not a number" in " ".join(capsys.readouterr().err.split())


def test_edge_alignment_corrects_a_residual_misalignment(tmp_path, monkeypatch):
    """The appearance alignment is perturbed by 0.8 px in u and -0.6 px in v; the midlines of
    the extracted straight features bring the offset back onto the truth, and the exported
    contours move with it. With --no-edge-align the perturbation stays."""
    import segsem_cli.align as align_mod
    from segsem_cli.align import _content_shift_to_offset
    from segsem_cli.pipeline import ExtractConfig, run_extract

    real = align_mod.align_image

    def perturbed(pixels, transform, polys, **kw):
        ar = real(pixels, transform, polys, **kw)
        t = ar.transform.with_offset(_content_shift_to_offset(ar.transform, (0.8, -0.6)))
        return type(ar)(**{**ar.__dict__, "transform": t, "offset_nm": tuple(np.subtract(t.offset_nm, transform.offset_nm))})

    monkeypatch.setattr(align_mod, "align_image", perturbed)
    m = small_manifest(tmp_path, names=("img_0000",))
    truth = json.loads((m.parent / "truth.json").read_text())["images"]["img_0000"]
    errs = {}
    for edge_align in (False, True):
        out = tmp_path / f"out{int(edge_align)}"
        run_extract(ExtractConfig(manifest=m, layout=LAYOUT, out=out, export="csv", overlays=False,
                                  fallback_options={"threshold": "0.63"}, edge_align=edge_align))
        rec = json.loads((out / "images" / "img_0000.json").read_text())
        errs[edge_align] = np.subtract(rec["offset_nm"], truth["offset_nm"]) / rec["pixel_nm"]
    assert np.hypot(*errs[False]) > 0.8  # the perturbation is there without the refinement
    ea = json.loads((tmp_path / "out1" / "images" / "img_0000.json").read_text())["edge_align"]
    assert any(ea["applied"])
    for axis in (0, 1):
        if ea["applied"][axis]:
            assert abs(errs[True][axis]) < 0.25, (axis, errs[True], ea)


def write_scene(tmp_path, img, rects_nm) -> None:
    """``a.tif`` (``img``, 16 bit), manifest ``m.csv`` (centred on (0, 0) nm, 1 nm/px) and layout
    ``l.gds`` with the rectangles ``(x0, y0, x1, y1)`` nm on layer 1/0, in ``tmp_path``."""
    import gdstk
    import tifffile

    tifffile.imwrite(tmp_path / "a.tif", np.round(img * 40000).astype(np.uint16))
    (tmp_path / "m.csv").write_text("image,x_nm,y_nm,pixel_nm\na.tif,0,0,1.0\n")
    lib = gdstk.Library(unit=1e-9, precision=1e-12)
    top = lib.new_cell("TOP")
    for x0, y0, x1, y1 in rects_nm:
        top.add(gdstk.rectangle((x0, y0), (x1, y1), layer=1))
    lib.write_gds(tmp_path / "l.gds")


def test_print_reaching_in_from_a_design_polygon_outside_the_image(tmp_path):
    """A design polygon 2 px beyond the top border prints 7 px into the image (a biased print):
    it is extracted as a border candidate, carries its design reference and `design_outside`.
    A polygon 3 px beyond the left border that did not print is tried and dropped, unreported."""
    from segsem_cli.pipeline import ExtractConfig, run_extract
    from synthetic_helpers import Rim, convention_edge, rect, render

    rim, blur = Rim(rim=4.0), 0.8
    # 128 x 128 px at 1 nm/px centred on (0, 0) nm: u = x + 64, v = 64 - y
    printed = [rect(34, 44, 74, 104), rect(44, -36, 104, 7.0)]
    img = render(printed, (128, 128), rim=rim, blur=blur, noise=0.01, seed=1)
    write_scene(tmp_path, img, [(-30, -40, 10, 20),     # in view, printed as drawn
                                (-20, 66, 40, 100),     # 2 px beyond the top border; its print reaches v = 7
                                (-100, -30, -67, 30)])  # 3 px beyond the left border, not printed
    outs = {}
    for margin in (0.0, 6.0):
        out = tmp_path / f"out{margin:g}"
        run_extract(ExtractConfig(manifest=tmp_path / "m.csv", layout=tmp_path / "l.gds", out=out, export="csv",
                                  overlays=False, align=False, border_margin_px=margin))
        outs[margin] = json.loads((out / "images" / "a.json").read_text())
    ids = {p: [f["feature_id"] for f in rec["features"]] for p, rec in outs.items()}
    lay = __import__("segsem_cli.layout", fromlist=["load_layout"]).load_layout(tmp_path / "l.gds")
    top_id = next(f"p{i}" for i, p in enumerate(lay.polygons) if p.bounds[1] == 66.0)
    assert top_id not in ids[0.0] and len(ids[0.0]) == 1
    assert outs[6.0]["border_candidates"] == {"tried": 2, "kept": 1}
    f = next(f for f in outs[6.0]["features"] if f["feature_id"] == top_id)
    assert f["status"] == "ok" and f["design_outside"] and f["clipped"]
    xy = np.asarray(f["exterior_nm"])
    edge_y = 64.0 - (7.0 + convention_edge(rim, blur=blur))  # where the rule puts the printed edge
    inner = xy[(xy[:, 1] < 62.0) & (xy[:, 0] > -15) & (xy[:, 0] < 35)]
    assert len(inner) > 20 and np.abs(inner[:, 1] - edge_y).max() < 0.3, (inner[:, 1].min(), inner[:, 1].max(), edge_y)
    assert xy[:, 1].max() == pytest.approx(64.0)  # closed along the top border


def _align_error_px(out, truth, name):
    rec = json.loads((out / "images" / f"{name}.json").read_text())
    return float(np.hypot(*np.subtract(rec["offset_nm"], truth[name]["offset_nm"]))) / truth[name]["pixel_nm"], rec


def test_images_that_cannot_tell_the_tone_take_the_batch_tone(tmp_path, capsys):
    """Opening-tone images (polygons print dark): on some the swapped tone also fits, 30-60 px away,
    and alone they keep the prior (polygons bright). In a batch they take the tone that the images
    whose own data fixed it agree on, and land within a pixel; a resumed run does not redo them."""
    from segsem_cli.layout import load_layout
    from segsem_cli.metrics import evaluate_run
    from segsem_cli.pipeline import batch_polarity
    from segsem_cli.synth.dataset import make_dataset

    d = tmp_path / "open"
    make_dataset(load_layout(LAYOUT), d, count=6, seed=77, image_size=512, noise="medium", tone="opening")
    truth = json.loads((d / "truth.json").read_text())["images"]
    out = tmp_path / "out"
    assert run(["extract", d / "manifest.csv", "--layout", LAYOUT, "--export", "csv", "--out", out,
                "--no-overlays"]) == 0
    said = capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    retoned = summary["polarity_from_batch"]
    assert len(retoned) >= 2 and summary["counts"]["polarity_from_batch"] == len(retoned)
    assert summary["batch_polarity"]["polarity"] == "dark"
    assert summary["batch_polarity"]["votes"] == summary["batch_polarity"]["of"] >= 2
    assert "re-run as 'dark'" in " ".join(said.split())
    epe = {r["image"]: r for r in evaluate_run(d, out / "contours.csv")["images"]}
    for name in truth:
        err, rec = _align_error_px(out, truth, name)
        assert rec["polarity"] == "dark", name
        # (an axis fixed only by line ends stays a few px off; the contours do not care, see EPE)
        assert err < 6.0 and epe[name]["n_missing"] == 0 and epe[name]["epe_rms_px"] < 1.5, (name, err)
        assert (rec.get("polarity_source") == "batch") == (name in retoned)
        if name in retoned:
            assert rec["tone_ambiguous"] and "taken from the batch (" in rec["align_message"]
    # alone, a re-toned image cannot tell: it keeps the prior and lands a swap away
    with (d / "manifest.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    one = d / "one.csv"
    with one.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([r for r in rows if Path(r["image"]).stem == retoned[0]])
    alone = tmp_path / "alone"
    assert run(["extract", one, "--layout", LAYOUT, "--export", "csv", "--out", alone, "--no-overlays"]) == 0
    err, rec = _align_error_px(alone, truth, retoned[0])
    assert rec["polarity"] == "bright" and rec["tone_ambiguous"] and err > 20.0
    assert json.loads((alone / "summary.json").read_text())["batch_polarity"] is None
    # resume: nothing to redo, the same tone
    assert run(["extract", d / "manifest.csv", "--layout", LAYOUT, "--export", "csv", "--out", out,
                "--no-overlays"]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["counts"]["resumed"] == 6 and again["polarity_from_batch"] == []
    assert again["batch_polarity"] == summary["batch_polarity"]
    # the vote itself
    ok = {"status": "ok", "polarity": "dark"}
    assert batch_polarity([ok]) is None  # one image is not a batch
    assert batch_polarity([ok, ok, {"status": "ok", "polarity": "bright"}]) is None  # 2 of 3 < 75 %
    assert batch_polarity([ok, ok, ok, {"status": "ambiguous", "polarity": "bright"}]) == {
        "polarity": "dark", "votes": 3, "of": 4}
    assert batch_polarity([ok, dict(ok, tone_ambiguous=True), dict(ok, status="failed")]) is None


def test_batch_tone_that_fails_on_an_image_keeps_its_own_result(tmp_path, monkeypatch):
    """The batch's tone is tried once on a tone-ambiguous image; when alignment then fails, the
    image keeps its own result (marked, so a resumed run does not try again)."""
    import segsem_cli.pipeline as P

    calls = []

    def fake(row, state, polarity=None):
        calls.append((row.name, polarity))
        if polarity == "dark":
            raise P.SegsemError("alignment failed: no significant match")
        amb = row.name == "img_0003"
        return dict(image=row.name, path=str(row.image), status="ambiguous" if amb else "ok",
                    polarity="bright" if amb else "dark", tone_ambiguous=amb, align_message="m", features=[])

    monkeypatch.setattr(P, "process_image", fake)
    monkeypatch.setattr(P, "_State", lambda cfg: type("S", (), {"threshold": 0.5})())
    m = small_manifest(tmp_path, names=("img_0000", "img_0001", "img_0003"))
    cfg = P.ExtractConfig(manifest=m, layout=LAYOUT, out=tmp_path / "o", export="csv", overlays=False)
    s = P.run_extract(cfg)
    assert s.batch_polarity == {"polarity": "dark", "votes": 2, "of": 2}
    assert calls[-1] == ("img_0003", "dark") and s.polarity_from_batch == ["img_0003"]
    rec = json.loads((tmp_path / "o" / "images" / "img_0003.json").read_text())
    assert rec["status"] == "ambiguous" and rec["polarity"] == "bright"
    assert rec["batch_polarity_failed"] == "dark" and "no significant match" in rec["align_message"]
    calls.clear()
    P.run_extract(cfg)
    assert calls == []  # resumed, and the failed tone is not tried again


def test_lines_cut_by_the_image_frame_fix_the_offset_with_their_drawn_sides(tmp_path):
    """Two vertical lines run out of the bottom of the image, 58 px of them in view for a width
    of 30: clipped to the frame, their sides look shorter than twice the width (line ends, not
    sides). The design as drawn beyond the frame (layout.context_pixels) keeps them long sides:
    they fix x, so the image is not flagged ambiguous and edge alignment uses both lines."""
    from segsem_cli.pipeline import ExtractConfig, run_extract
    from synthetic_helpers import Rim, rect, render

    # 128 x 128 px at 1 nm/px centred on (0, 0) nm: u = x + 64, v = 64 - y
    designs = [(-50, -200, -20, -6), (10, -200, 40, -6),   # vertical lines, v = 70 .. beyond 128
               (-50, 44, 40, 54), (-50, 20, 40, 30)]       # horizontal bars: y evidence
    shift = (0.4, -0.3)  # printed content moved by (du, dv) px: x + 0.4, y + 0.3
    printed = [rect(x0 + 64 + shift[0], 64 - y1 + shift[1], x1 + 64 + shift[0], 64 - y0 + shift[1])
               for x0, y0, x1, y1 in designs]  # (u, v) px
    img = render(printed, (128, 128), rim=Rim(rim=4.0), blur=0.8, noise=0.01, seed=3)
    write_scene(tmp_path, img, designs)
    out = tmp_path / "out"
    run_extract(ExtractConfig(manifest=tmp_path / "m.csv", layout=tmp_path / "l.gds", out=out, export="csv",
                              overlays=False, search_px=4.0))
    rec = json.loads((out / "images" / "a.json").read_text())
    assert rec["align_evidence"] == ["sides", "sides"] and not rec["ambiguous"], rec["align_message"]
    ea = rec["edge_align"]
    assert ea["basis"] == ["sides", "sides"] and ea["n_features"] == [2, 2], ea
    # the print's offset from the design: x + 0.4 nm, y + 0.3 nm (true centre = nominal - content shift)
    assert rec["offset_nm"] == pytest.approx([-0.4, -0.3], abs=0.1), rec["offset_nm"]
