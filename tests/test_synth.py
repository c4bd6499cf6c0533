"""Tests of the CD-SEM simulator: printed shapes, exact rendering, dataset files, errors."""
from __future__ import annotations

import csv
import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import shapely
from shapely import affinity
from shapely.geometry import Point, Polygon, box

from segsem_cli.errors import SegsemError
from segsem_cli.synth.dataset import (
    make_dataset,
    parse_param_overrides,
    resolve_params,
    synthesize_image,
    write_sem_tiff,
)
from segsem_cli.synth.litho import (
    LithoParams,
    add_ler,
    make_bridge,
    make_neck,
    print_features,
    pull_back_line_ends,
    round_corners,
)
from segsem_cli.synth.render import RenderParams, apply_psf, edge_profile, render_clean, render_sem
from segsem_cli.transform import PixelTransform

CLEAN = RenderParams(blur_nm=0.0, charging=0.0, charging_dark=0.0, dose=0.0)
QUIET = ["dose=0", "blur_nm=0", "charging=0", "charging_dark=0", "read_noise=0", "scan_offset_sigma=0",
         "scan_gain_sigma=0", "drift_px=0", "gain_jitter=0", "offset_jitter=0", "bits=16"]


# --------------------------------------------------------------------------- helpers

def make_gds(path: Path, rects, layer=(1, 0)) -> Path:
    import gdstk

    lib = gdstk.Library(unit=1e-9, precision=1e-9)
    cell = lib.new_cell("TOP")
    for x0, y0, x1, y1 in rects:
        cell.add(gdstk.rectangle((x0, y0), (x1, y1), layer=layer[0], datatype=layer[1]))
    lib.write_gds(str(path))
    return path


def load(path, layer=(1, 0)):
    from segsem_cli.layout import load_layout

    return load_layout(path, layer=layer)


def mid_crossings(row: np.ndarray, level: float) -> list[float]:
    """Sub-pixel u positions (pixel-centre convention) where a profile crosses ``level`` upwards."""
    out = []
    for i in np.nonzero((row[:-1] < level) & (row[1:] >= level))[0]:
        out.append(i + 0.5 + (level - row[i]) / (row[i + 1] - row[i]))
    return out


# --------------------------------------------------------------------------- rendering

@pytest.mark.parametrize("angle", [0.0, 7.0, 30.0, 45.0])
@pytest.mark.parametrize("x_edge", [10.3, -4.77])
def test_clean_straight_edge_crosses_mid_level_at_truth(angle, x_edge):
    tr = PixelTransform(center_nm=(0.0, 0.0), pixel_nm=1.0, shape=(128, 128))
    half_plane = affinity.rotate(box(x_edge, -500, 600, 500), angle, origin=(x_edge, 0))
    clean = render_clean([half_plane], tr, params=CLEAN)
    mid = (CLEAN.substrate_level + CLEAN.edge_level) / 2
    a = math.radians(angle)
    errs = []
    for r in range(24, 104, 3):
        v = r + 0.5
        y = -(v - 64)
        u_true = x_edge - y * math.tan(a) + 64  # the edge line through (x_edge, 0) at this row
        (u_found,) = mid_crossings(clean.signal[r].astype(np.float64), mid)
        errs.append(u_found - u_true)
    assert np.max(np.abs(errs)) < 0.05  # the contract; the analytic area average makes it ~1e-6
    assert np.max(np.abs(errs)) < 1e-4


def test_clean_profile_is_pixel_area_average_of_edge_model():
    tr = PixelTransform(center_nm=(0.0, 0.0), pixel_nm=1.0, shape=(64, 64))
    clean = render_clean([box(3.37, -300, 300, 300)], tr, params=CLEAN)
    u = np.arange(64) + 0.5
    d = u - 32 - 3.37  # signed distance into the resist, nm (= px)
    sub = (np.arange(4000) + 0.5) / 4000 - 0.5
    ref = np.array([edge_profile(di + sub, CLEAN).mean() for di in d])
    np.testing.assert_allclose(clean.signal[32], ref, atol=2e-4)
    # the levels of the model: substrate far left, resist far right, bright rim in between
    assert clean.signal[32, 2] == pytest.approx(CLEAN.substrate_level)
    assert clean.signal[32, 62] == pytest.approx(CLEAN.resist_level, abs=2e-3)
    assert clean.signal[32].max() > 0.85


def test_blurred_straight_edge_matches_continuous_convolution():
    px = 2.0
    prm = RenderParams(blur_nm=3.0, charging=0.0, charging_dark=0.0, dose=0.0)
    tr = PixelTransform(center_nm=(0.0, 0.0), pixel_nm=px, shape=(48, 48))
    clean = render_clean([box(1.3, -400, 400, 400)], tr, params=prm)
    img = apply_psf(clean.signal, prm.blur_nm / px, prm.blur_nm / px, 0.0)
    # reference: model profile convolved with the pixel box and the Gaussian, on a fine grid
    x = np.arange(-60.0, 60.0, 0.01)
    f = edge_profile(x - 1.3, prm)
    k = np.exp(-0.5 * (np.arange(-15, 15.001, 0.01) / prm.blur_nm) ** 2)
    k /= k.sum()
    g = np.convolve(f, k, mode="same")
    boxk = np.ones(int(px / 0.01)) / int(px / 0.01)
    g = np.convolve(g, boxk, mode="same")
    u_nm = (np.arange(48) + 0.5 - 24) * px
    ref = np.interp(u_nm, x, g)
    np.testing.assert_allclose(img[24, 8:40], ref[8:40], atol=3e-3)


def test_label_mask_is_exact_at_pixel_centres_and_area_within_perimeter():
    tr = PixelTransform(center_nm=(3.3, -2.1), pixel_nm=1.0, shape=(96, 96))
    blob = add_ler(Point(0, 0).buffer(25), sigma_nm=1.5, corr_nm=8, rng=np.random.default_rng(2))
    frame = Polygon(box(-44, -44, -30, 40).exterior, [Point(-37, 0).buffer(4).exterior.coords])  # with a hole
    shapes = [blob.difference(Point(25, 25).buffer(12)), box(30, -45, 44, 45), frame]
    clean = render_clean(shapes, tr, params=CLEAN)
    rr, cc = np.mgrid[0:96, 0:96]
    xy = tr.to_layout(np.stack([cc + 0.5, rr + 0.5], axis=-1))
    for k, shp in enumerate(shapes, start=1):
        inside = shapely.contains_xy(shp, xy[..., 0], xy[..., 1])
        assert np.array_equal(clean.labels == k, inside)
        area_px = shp.area / tr.pixel_nm ** 2
        assert abs((clean.labels == k).sum() - area_px) <= shp.length / tr.pixel_nm


def test_opening_tone_makes_dark_holes_in_bright_resist():
    tr = PixelTransform(center_nm=(0.0, 0.0), pixel_nm=1.0, shape=(64, 64))
    clean = render_clean([Point(0, 0).buffer(12)], tr, params=CLEAN, tone="opening")
    assert clean.signal[32, 32] == pytest.approx(CLEAN.substrate_level)
    assert clean.signal[2, 2] == pytest.approx(CLEAN.resist_level, abs=1e-3)
    assert clean.labels[32, 32] == 1 and clean.labels[2, 2] == 0
    mid = (CLEAN.substrate_level + CLEAN.edge_level) / 2
    # going right from the hole centre the signal rises through the mid level at the hole edge (r = 12)
    (u,) = mid_crossings(clean.signal[32, 32:].astype(np.float64)[::1], mid)
    assert abs((u + 32) - 32 - 12) < 0.05


def test_render_sem_is_deterministic_and_noisy():
    tr = PixelTransform(center_nm=(0.0, 0.0), pixel_nm=1.0, shape=(64, 64))
    shapes = [box(-10, -40, 10, 40)]
    prm = resolve_params("hard").render
    a = render_sem(shapes, tr, params=prm, rng=np.random.default_rng(5)).image
    b = render_sem(shapes, tr, params=prm, rng=np.random.default_rng(5)).image
    c = render_sem(shapes, tr, params=prm, rng=np.random.default_rng(6)).image
    assert a.dtype == np.uint8 and a.shape == (64, 64)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # the line is brighter than the substrate on average despite the noise
    assert a[:, 28:36].mean() > a[:, :10].mean() + 10


# --------------------------------------------------------------------------- printed shapes

def test_line_end_pullback_and_protected_clip_edges():
    line = box(0, 0, 30, 400)
    p = pull_back_line_ends(line, 6.0, max_end_nm=80)
    assert p.bounds == pytest.approx((0, 6, 30, 394))
    # a square is not elongated: no pullback
    assert pull_back_line_ends(box(0, 0, 40, 40), 6.0, max_end_nm=80).equals(box(0, 0, 40, 40))
    # the end lying on the clip box is where the caller cut the line: kept
    q = pull_back_line_ends(line, 6.0, max_end_nm=80, protect=(-100, 0, 100, 1000))
    assert q.bounds == pytest.approx((0, 0, 30, 394))


def test_corner_rounding_small_square_prints_as_circle():
    (sq,) = round_corners(box(0, 0, 24, 24), 15.0, 5.0)
    assert sq.area == pytest.approx(math.pi * 12 ** 2, rel=0.01)
    (big,) = round_corners(box(0, 0, 100, 60), 8.0, 5.0)
    assert big.area == pytest.approx(6000 - 4 * (1 - math.pi / 4) * 64, rel=1e-3)
    # a thin arm of an L-shape survives a radius larger than its half width
    ell = Polygon([(0, 0), (200, 0), (200, 20), (20, 20), (20, 200), (0, 200)])
    (r,) = round_corners(ell, 14.0, 5.0)
    assert r.area > 0.95 * ell.area and r.bounds[2] > 190 and r.bounds[3] > 190


def test_ler_has_requested_sigma():
    devs = []
    for s in range(10):
        rough = add_ler(box(0, 0, 30, 10000), sigma_nm=1.5, corr_nm=15, rng=np.random.default_rng(s))
        xy = np.asarray(rough.exterior.coords)
        m = (xy[:, 0] > 15) & (xy[:, 1] > 100) & (xy[:, 1] < 9900)
        devs.append(xy[m, 0] - 30)
    assert np.concatenate(devs).std() == pytest.approx(1.5, rel=0.1)


def test_neck_and_bridge_defects():
    rng = np.random.default_rng(0)
    line = box(0, 0, 30, 400)
    neck = make_neck(line, rng)
    widths = [neck.intersection(box(-1, y, 31, y + 0.5)).area / 0.5 for y in np.arange(50, 350, 1.0)]
    assert 0.3 * 30 < min(widths) < 0.7 * 30
    merged = make_bridge(line, box(70, 0, 100, 400), rng)
    assert isinstance(merged, Polygon) and merged.area > 2 * line.area
    assert merged.intersects(box(40, 0, 60, 400))  # material in the gap


def test_print_features_missing_and_deterministic():
    polys = [box(0, 0, 40, 40), box(500, 0, 540, 40)]
    prm = LithoParams(defect_rate=1.0)
    a = print_features(polys, params=prm, rng=np.random.default_rng(1))
    b = print_features(polys, params=prm, rng=np.random.default_rng(1))
    assert [f.defect for f in a] == ["missing", "missing"]  # isolated squares: neither neck nor bridge possible
    assert all(f.shape is None for f in a)
    lines = [box(0, 0, 30, 400), box(60, 0, 90, 400)]
    c = print_features(lines, params=LithoParams(), rng=np.random.default_rng(3))
    d = print_features(lines, params=LithoParams(), rng=np.random.default_rng(3))
    assert all(x.shape.equals_exact(y.shape, 0) for x, y in zip(c, d))
    assert [f.defect for f in a] == [f.defect for f in b]


# --------------------------------------------------------------------------- files

def test_tiff_pixel_size_round_trips(tmp_path):
    import tifffile

    from segsem_cli.images import read_sem

    img = (np.arange(64 * 48) % 251).astype(np.uint8).reshape(48, 64)
    p = write_sem_tiff(tmp_path / "a.tif", img, 1.5)
    with tifffile.TiffFile(p) as tif:
        tags = tif.pages[0].tags
        tag = tags[34682]  # tifffile parses this tag as FEI INI: read its raw bytes
        tif.filehandle.seek(tag.valueoffset)
        root = ET.fromstring(tif.filehandle.read(tag.count).rstrip(b"\x00"))
        (pw,) = [el for el in root.iter() if el.tag == "PixelWidth"]
        assert float(pw.text) == pytest.approx(1.5e-9, rel=1e-12)
        assert 34118 in tags
        assert np.array_equal(tif.pages[0].asarray(), img)
    pixels, px = read_sem(p)
    assert px == pytest.approx(1.5)


@pytest.fixture(scope="module")
def lines_layout(tmp_path_factory):
    d = tmp_path_factory.mktemp("layout")
    rects = [(x, 0, x + 30, 1000) for x in range(100, 900, 90)]  # vertical lines CD 30, pitch 90
    rects += [(1000, 0, 1040, 1000)]
    return load(make_gds(d / "lines.gds", rects))


def test_dataset_manifest_truth_offset_and_labels(tmp_path, lines_layout):
    out = tmp_path / "ds"
    res = make_dataset(lines_layout, out, count=2, seed=3, image_size=(128, 160), pixel_nm=1.25, noise="easy",
                       params=QUIET + ["ler_sigma_nm=0", "stage_error_nm=25"])
    with open(out / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["image", "x_nm", "y_nm", "pixel_nm", "label", "noise"]
    truth = json.loads((out / "truth.json").read_text())
    assert truth["tone"] == "resist" and set(truth["images"]) == {"img_0000", "img_0001"}
    import cv2
    import tifffile

    for row in rows:
        name = Path(row["image"]).stem
        t = truth["images"][name]
        nominal = (float(row["x_nm"]), float(row["y_nm"]))
        assert t["center_nm"] == pytest.approx(nominal, abs=1e-5)
        assert t["true_center_nm"] == pytest.approx(
            (nominal[0] + t["offset_nm"][0], nominal[1] + t["offset_nm"][1]), abs=1e-5)
        assert max(abs(v) for v in t["offset_nm"]) <= 25 and math.hypot(*t["offset_nm"]) > 0
        assert float(row["pixel_nm"]) == 1.25 and t["shape"] == [128, 160]
        img = tifffile.imread(out / row["image"])
        lab = cv2.imread(str(out / row["label"]), cv2.IMREAD_UNCHANGED)
        assert img.shape == lab.shape == (128, 160) and lab.dtype == np.uint16
        labels = sorted(f["label"] for f in t["features"] if f["label"] > 0)
        assert sorted(set(np.unique(lab)) - {0}) == sorted(set(labels)) == list(range(1, len(set(labels)) + 1))
        # the label mask is the truth at pixel centres under the TRUE transform (nominal + offset)
        tr = PixelTransform(center_nm=nominal, pixel_nm=1.25, shape=(128, 160), offset_nm=tuple(t["offset_nm"]))
        rr, cc = np.mgrid[0:128, 0:160]
        xy = tr.to_layout(np.stack([cc + 0.5, rr + 0.5], axis=-1))
        for f in t["features"]:
            poly = Polygon(f["exterior"], f["holes"])
            inside = shapely.contains_xy(poly, xy[..., 0], xy[..., 1])
            assert np.array_equal(lab == f["label"], inside)
        # and the bright edges sit on the truth: the mean of each labelled region's grey level is the line's
        if labels:
            assert img[lab > 0].mean() > img[lab == 0].mean()
    assert res["gauges_truth"] is None and not (out / "gauges_truth.csv").exists()


def test_dataset_is_deterministic_per_seed(tmp_path, lines_layout):
    kw = dict(count=2, image_size=96, pixel_nm=1.0, noise="hard")
    make_dataset(lines_layout, tmp_path / "a", seed=11, **kw)
    make_dataset(lines_layout, tmp_path / "b", seed=11, **kw)
    make_dataset(lines_layout, tmp_path / "c", seed=12, **kw)
    for f in ("img_0000.tif", "img_0001_label.png", "truth.json", "manifest.csv"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    assert (tmp_path / "a" / "img_0000.tif").read_bytes() != (tmp_path / "c" / "img_0000.tif").read_bytes()
    # image i depends on (seed, i) only: the first image of a longer run is the same
    make_dataset(lines_layout, tmp_path / "d", seed=11, **{**kw, "count": 3})
    assert (tmp_path / "a" / "img_0001.tif").read_bytes() == (tmp_path / "d" / "img_0001.tif").read_bytes()


def test_gauges_truth_cd_and_outside(tmp_path):
    gds = make_gds(tmp_path / "one.gds", [(-15, -300, 15, 300), (-400, -400, -380, 400), (380, -400, 400, 400)])
    lay = load(gds)
    gpath = tmp_path / "g.csv"
    gpath.write_text("name,x1,y1,x2,y2,kind\nline,-30,0,30,0,line\nfar,5000,0,5050,0,x\n"
                     "space,0,100,-390,100,space\n")
    make_dataset(lay, tmp_path / "ds", count=None, sites=[(0.0, 0.0)], seed=0, image_size=128, pixel_nm=1.0,
                 noise="easy", gauges=gpath, params=QUIET + ["ler_sigma_nm=0", "bias_nm=2", "stage_error_nm=5"])
    with open(tmp_path / "ds" / "gauges_truth.csv", newline="") as fh:
        rows = {r["name"]: r for r in csv.DictReader(fh)}
    assert rows["line"]["status"] == "ok" and rows["line"]["image"] == "img_0000"
    assert float(rows["line"]["true_cd_nm"]) == pytest.approx(34.0, abs=1e-3)  # 30 nm + 2 x 2 nm bias
    assert rows["line"]["kind"] == "line"
    assert rows["far"]["status"] == "outside_images" and rows["far"]["true_cd_nm"] == ""
    assert rows["space"]["status"] == "outside_images"  # reaches x = -390: beyond the 128 nm field of view


def test_missing_defect_absent_from_image_and_labels(tmp_path):
    # isolated squares far apart: with defect_rate 1 every one is "missing"
    gds = make_gds(tmp_path / "sq.gds", [(x, y, x + 40, y + 40) for x in (-300, -20, 260) for y in (-300, -20, 260)])
    out = tmp_path / "ds"
    make_dataset(load(gds), out, count=None, sites=[(0.0, 0.0)], image_size=128, pixel_nm=1.0, noise="easy",
                 params=QUIET + ["stage_error_nm=0"], defect_rate=1.0)
    import cv2
    import tifffile

    t = json.loads((out / "truth.json").read_text())["images"]["img_0000"]
    (f,) = t["features"]
    assert f["defect"] == "missing" and f["label"] == 0 and f["exterior"] == []
    assert not cv2.imread(str(out / "img_0000_label.png"), cv2.IMREAD_UNCHANGED).any()
    img = tifffile.imread(out / "img_0000.tif").astype(float)
    assert img.std() < 0.01 * img.mean()  # bare substrate: no feature, no edge


def test_cli_synth_end_to_end(tmp_path):
    from segsem_cli.cli import main

    gds = make_gds(tmp_path / "l.gds", [(x, 0, x + 30, 800) for x in range(0, 800, 80)])
    out = tmp_path / "out"
    rc = main(["synth", str(gds), "--out", str(out), "--count", "2", "--size", "96x128", "--noise", "mixed",
               "--param", "dose=50", "--defects", "0.05", "--seed", "4"])
    assert rc == 0
    with open(out / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["noise"] for r in rows] == ["easy", "medium"]
    t = json.loads((out / "truth.json").read_text())
    assert t["params"]["easy"]["dose"] == 50 and t["params"]["medium"]["defect_rate"] == 0.05
    assert t["images"]["img_0000"]["shape"] == [96, 128]


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs, message", [
    (dict(count=0), "--count"),
    (dict(count=-3), "--count"),
    (dict(count=1, pixel_nm=-1.0), "--pixel-nm"),
    (dict(count=1, pixel_nm=float("nan")), "--pixel-nm"),
    (dict(count=1, image_size=8), "--size"),
    (dict(count=1, noise="extreme"), "--noise"),
    (dict(count=1, tone="positive"), "--tone"),
    (dict(count=1, params=["dose=abc"]), "dose"),
    (dict(count=1, params=["nope=1"]), "unknown parameter"),
    (dict(count=1, params=["swa_deg=120"]), "swa_deg"),
    (dict(count=2, sites=[(500.0, 500.0)]), "--count"),
    (dict(count=None), "--count"),
    (dict(count=1, image_size=4096), "too small"),
])
def test_bad_options_raise_and_write_nothing(tmp_path, lines_layout, kwargs, message):
    out = tmp_path / "never"
    with pytest.raises(SegsemError, match=message):
        make_dataset(lines_layout, out, **kwargs)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_site_too_close_to_layout_edge(tmp_path, lines_layout):
    sites = tmp_path / "sites.csv"
    sites.write_text("x_nm,y_nm\n500,500\n105,500\n")
    out = tmp_path / "ds"
    with pytest.raises(SegsemError, match=r"sites.csv row 3: site .* too close to the layout edge"):
        make_dataset(lines_layout, out, count=None, sites=sites, image_size=128)
    assert not out.exists()


def test_sites_csv_errors_name_row_and_field(tmp_path, lines_layout):
    sites = tmp_path / "s.csv"
    sites.write_text("x_nm,y_nm\n500,abc\n")
    with pytest.raises(SegsemError, match=r"s.csv row 2 field 'y_nm'"):
        make_dataset(lines_layout, tmp_path / "ds", count=None, sites=sites, image_size=128)


def test_layout_without_polygons_on_layer_is_an_error(tmp_path):
    gds = make_gds(tmp_path / "l.gds", [(0, 0, 100, 100)], layer=(1, 0))
    with pytest.raises(SegsemError, match="no polygons on layer 7/0"):
        load(gds, layer=(7, 0))

    class Empty:
        path, polygons, bounds = "empty.gds", [], (0, 0, 0, 0)

    with pytest.raises(SegsemError, match="no polygons"):
        make_dataset(Empty(), tmp_path / "x", count=1)
    assert not (tmp_path / "x").exists()


def test_error_during_generation_leaves_nothing(tmp_path, lines_layout, monkeypatch):
    import segsem_cli.synth.dataset as ds

    calls = {"n": 0}
    real = ds.synthesize_image

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("disk on fire")
        return real(*a, **k)

    monkeypatch.setattr(ds, "synthesize_image", flaky)
    with pytest.raises(RuntimeError):
        make_dataset(lines_layout, tmp_path / "ds", count=3, image_size=64)
    assert list(tmp_path.iterdir()) == []  # no output folder, no staging folder left behind


def test_existing_dataset_needs_force(tmp_path, lines_layout):
    out = tmp_path / "ds"
    make_dataset(lines_layout, out, count=2, image_size=64)
    with pytest.raises(SegsemError, match="--force"):
        make_dataset(lines_layout, out, count=1, image_size=64)
    make_dataset(lines_layout, out, count=1, image_size=64, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["img_0000.tif", "img_0000_label.png", "manifest.csv", "truth.json"]


def test_param_parsing():
    assert parse_param_overrides(["dose=20", "bits=16", "stage_error_dist=normal"]) == {
        "dose": 20.0, "bits": 16, "stage_error_dist": "normal"}
    with pytest.raises(SegsemError, match="NAME=VALUE"):
        parse_param_overrides(["dose"])
    with pytest.raises(SegsemError, match="'bits'"):
        parse_param_overrides(["bits=8.5"])
    p = resolve_params("hard", {"dose": 3.0})
    assert p.render.dose == 3.0 and p.render.blur_nm == resolve_params("hard").render.blur_nm


def test_synthesize_image_truth_matches_image_geometry(lines_layout):
    """With a clean render, the bright rim midpoints of the line in the image map onto the truth edges."""
    prm = resolve_params("easy", parse_param_overrides(QUIET + ["ler_sigma_nm=0", "stage_error_nm=20"]))
    res = synthesize_image(lines_layout, (1020.0, 500.0), shape=(64, 128), pixel_nm=1.0, params=prm,
                           rng=np.random.default_rng(0))
    img = res.image.astype(np.float64)
    full = 2 ** 16 - 1
    lv = lambda s: (prm.render.offset + prm.render.gain * s) * full  # noqa: E731
    mid = lv((prm.render.substrate_level + prm.render.edge_level) / 2)
    (feat,) = [f for f in res.features if f["design_index"] == len(lines_layout.polygons) - 1]
    xs = np.asarray(feat["exterior"])[:, 0]
    left_edge_nm = xs.min()
    (u,) = mid_crossings(img[32, :64], mid)
    x = res.transform.to_layout(np.array([u, 32.5]))[0]
    assert x == pytest.approx(left_edge_nm, abs=0.05)
    # the nominal transform would be off by the stage offset
    nominal = PixelTransform(center_nm=(1020.0, 500.0), pixel_nm=1.0, shape=(64, 128))
    assert abs(nominal.to_layout(np.array([u, 32.5]))[0] - left_edge_nm) == pytest.approx(
        abs(res.transform.offset_nm[0]), abs=0.06)


def test_drift_shifts_each_row_of_a_long_edge():
    from segsem_cli.synth.render import polygons_to_pixels

    tr = PixelTransform(center_nm=(0.0, 0.0), pixel_nm=1.0, shape=(64, 64))
    shift = np.linspace(-0.5, 0.5, 64)
    (ext, _), = polygons_to_pixels([box(-5, -100, 5, 100)], tr, row_shift_px=shift)
    left = ext[np.abs(ext[:, 0] - 27) < 1]  # the left edge at u = 27 + shift(v)
    inside = (left[:, 1] > 0.5) & (left[:, 1] < 63.5)
    np.testing.assert_allclose(left[inside, 0], 27 + np.interp(left[inside, 1] - 0.5, np.arange(64), shift))
    assert inside.sum() >= 60
    # and the clean render of a drifted straight edge crosses the mid level at the shifted position
    clean = render_clean([box(0.25, -100, 100, 100)], tr, params=CLEAN, row_shift_px=shift)
    mid = (CLEAN.substrate_level + CLEAN.edge_level) / 2
    for r in (5, 32, 60):
        (u,) = mid_crossings(clean.signal[r].astype(np.float64), mid)
        assert u == pytest.approx(32.25 + shift[r], abs=0.02)
