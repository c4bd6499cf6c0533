"""SAM2 backbone: model building, safe checkpoints, prompted inference, fine-tuning (CPU, micro config)."""
from __future__ import annotations

import csv
import math
import os
import zipfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import cv2
import numpy as np
import pytest
import torch

from segsem_cli.errors import SegsemError
from segsem_cli.sam import model as sm
from segsem_cli.sam.predict import View, _contours, plan_views, predict_boxes, predict_polygons
from segsem_cli.sam.train import batch_loss, finetune, load_samples, make_train_view, side_paths
from segsem_cli.transform import PixelTransform
from segsem_cli.types import Feature, SEMImage

torch.set_num_threads(1)
SIZE = 128  # model input of the tests
N = 128  # synthetic image size
CENTRES = [(32.0, 34.0), (94.0, 40.0), (62.0, 96.0)]  # (u, v) nominal disc centres


def synth_image(seed: int, n: int = N):
    """Grey image with 3 bright discs (blurred edges, noise) and its instance labels; returns (img, label, discs)."""
    rng = np.random.default_rng(seed)
    vv, uu = np.mgrid[:n, :n] + 0.5
    img = np.full((n, n), 60.0)
    label = np.zeros((n, n), np.uint8)
    discs = []
    for k, (cu, cv) in enumerate(CENTRES):
        cu, cv, r = cu + rng.uniform(-4, 4), cv + rng.uniform(-4, 4), rng.uniform(10, 14)
        d = np.hypot(uu - cu, vv - cv)
        img += 120.0 / (1 + np.exp((d - r) / 0.7))
        label[d <= r] = k + 1
        discs.append((cu, cv, r))
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), label, discs


def write_dataset(folder: Path, seeds, *, name="train.csv") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in seeds:
        img, lab, _ = synth_image(s)
        cv2.imwrite(str(folder / f"img{s}.png"), img)
        cv2.imwrite(str(folder / f"lab{s}.png"), lab)
        rows.append({"image": f"img{s}.png", "x_nm": 0, "y_nm": 0, "pixel_nm": 1.0, "label": f"lab{s}.png"})
    path = folder / name
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["image", "x_nm", "y_nm", "pixel_nm", "label"])
        w.writeheader()
        w.writerows(rows)
    return path


def micro(seed: int = 0):
    torch.manual_seed(seed)
    return sm.build_model("segsem-micro", image_size=SIZE, device="cpu")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), [1, 2, 3, 4])


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    """Encoder fine-tuning of the micro model, 5 epochs (shared by several tests)."""
    out = tmp_path_factory.mktemp("run") / "model.pt"
    res = finetune(dataset, out, config="segsem-micro", image_size=SIZE, epochs=5, lr=2e-3, batch=2, seed=0,
                   device="cpu", progress=False)
    return res


# ----------------------------------------------------------------------------- model building


def test_micro_config_builds_small_model_through_official_path():
    m = micro()
    total = sum(p.numel() for p in m.parameters())
    assert 300_000 < total < 3_000_000
    assert m.image_size == SIZE
    feats = m.forward_image(torch.zeros(1, 3, SIZE, SIZE))["backbone_fpn"]
    assert [tuple(f.shape[-2:]) for f in feats] == [(SIZE // 4,) * 2, (SIZE // 8,) * 2, (SIZE // 16,) * 2]
    # official names map to the package's YAML files
    assert sm.resolve_config("sam2.1_hiera_b+").name == "sam2.1_hiera_b+.yaml"
    assert sm.resolve_config("sam2_hiera_l").parent.name == "sam2"
    with pytest.raises(SegsemError, match="unknown SAM2 config 'hiera_x'"):
        sm.resolve_config("hiera_x")
    with pytest.raises(SegsemError, match="multiple of 32"):
        sm.build_model("segsem-micro", image_size=100)


def test_checkpoint_round_trip_and_build_sam2(tmp_path):
    from sam2.build_sam import build_sam2

    m = micro(3)
    path = sm.save_checkpoint(tmp_path / "m.pt", m, {"config": "segsem-micro", "image_size": SIZE, "note": [1, 2.5, None]})
    m2 = sm.build_model(None, checkpoint=path)  # config and size from the metadata
    assert m2.segsem_meta["note"] == [1, 2.5, None] and m2.image_size == SIZE
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    img, _, discs = synth_image(7)
    boxes = [(u - r - 3, v - r - 3, u + r + 3, v + r + 3) for u, v, r in discs]
    p1 = predict_boxes(m, img.astype(np.float32), boxes)
    p2 = predict_boxes(m2, img.astype(np.float32), boxes)
    for a, b in zip(p1, p2):
        assert np.array_equal(a.logits_lowres, b.logits_lowres)
        assert a.predicted_iou == b.predicted_iou
    # SAM2's own builder loads segsem checkpoints (weights_only, strict)
    with sm.hydra_config_dir("segsem-micro") as name:
        m3 = build_sam2(name, str(path), device="cpu", hydra_overrides_extra=sm.image_size_overrides(SIZE))
    for (k, a), (_, b) in zip(m.state_dict().items(), m3.state_dict().items()):
        assert torch.equal(a, b), k
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(m.eval().forward_image(x)["vision_features"], m3.forward_image(x)["vision_features"])
    # Hydra is back on sam2's configs afterwards
    from hydra import compose

    assert compose(config_name="configs/sam2.1/sam2.1_hiera_t.yaml").model.image_size == 1024


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"import pathlib; pathlib.Path({str(self.marker)!r}).touch()",))


def test_pickled_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.pt"
    torch.save({"model": micro().state_dict(), "segsem": {"config": "segsem-micro"}, "x": _Evil(marker)}, bad)
    with zipfile.ZipFile(bad) as z:  # the payload really is in the file
        assert any(b"exec" in z.read(n) for n in z.namelist() if n.endswith(".pkl"))
    with pytest.raises(SegsemError, match=r"evil\.pt: refused to load: not a plain weights file"):
        sm.load_checkpoint(bad)
    with pytest.raises(SegsemError, match="evil.pt"):
        sm.build_model("segsem-micro", checkpoint=bad, image_size=SIZE)
    from segsem_plugins.sam2_backbone import Sam2Backbone

    with pytest.raises(SegsemError, match="evil.pt"):
        Sam2Backbone().load(bad, device="cpu")
    assert not marker.exists()


def test_mismatching_checkpoint_lists_keys(tmp_path):
    path = sm.save_checkpoint(tmp_path / "m.pt", micro(), {"config": "segsem-micro"})
    yaml = sm.resolve_config("segsem-micro").read_text().replace("stages: [1, 1, 2, 1]", "stages: [1, 1, 3, 1]")
    other = tmp_path / "deeper.yaml"
    other.write_text(yaml)
    with pytest.raises(SegsemError, match=r"m\.pt: weights do not match the model config: \d+ missing \(e\.g\. image_encoder\.trunk\.blocks"):
        sm.build_model(other, checkpoint=path, image_size=SIZE)
    torch.save({"model": {"a": torch.zeros(1)}}, tmp_path / "tiny.pt")
    with pytest.raises(SegsemError, match="unexpected \\(e.g. a\\)"):
        sm.build_model("segsem-micro", checkpoint=tmp_path / "tiny.pt", image_size=SIZE)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(SegsemError, match="not a SAM2 checkpoint"):
        sm.load_checkpoint(tmp_path / "list.pt")


# ----------------------------------------------------------------------------- inference geometry


def _spy_prompts(model):
    seen = []
    orig = model.sam_prompt_encoder.forward

    def spy(points, boxes, masks):
        seen.append(points[0].detach().clone())
        return orig(points, boxes, masks)

    model.sam_prompt_encoder.forward = spy
    return seen


def test_prompt_coordinates_tiles_and_resize():
    m = micro()
    h, w = 200, 300  # larger than the model input: tiles of 128 px overlapping by 32
    views = plan_views((h, w), SIZE)
    assert {(v.r0, v.c0) for v in views} == {(r, c) for r in (0, 72) for c in (0, 96, 172)}
    assert all((v.h, v.w) == (SIZE, SIZE) for v in views)
    img = np.random.default_rng(0).normal(size=(h, w)).astype(np.float32)
    box = (250.0, 150.0, 290.0, 190.0)  # best held by the tile at rows 72.., cols 172..
    seen = _spy_prompts(m)
    (p,) = predict_boxes(m, img, [box], [(270.0, 170.0)])
    assert p.view == (72, 172, 128, 128)
    got = seen[-1][0].numpy()
    exp = np.array([[250 - 172, 150 - 72], [290 - 172, 190 - 72], [270 - 172, 170 - 72]], float) - 0.5
    np.testing.assert_allclose(got[:3], exp, atol=1e-5)  # then SAM's padding point
    # A box no tile holds is decoded on the whole image resized (never cropped).
    (q,) = predict_boxes(m, img, [(10.0, 10.0, 290.0, 190.0)])
    assert q.view == (0, 0, h, w)
    np.testing.assert_allclose(seen[-1][0, :2].numpy(), [[10 * SIZE / w - 0.5, 10 * SIZE / h - 0.5],
                                                          [290 * SIZE / w - 0.5, 190 * SIZE / h - 0.5]], atol=1e-5)
    # large="resize": one view of the whole image
    (r,) = predict_boxes(m, img, [box], large="resize")
    assert r.view == (0, 0, h, w) and r.logits_lowres.shape == (SIZE // 4, SIZE // 4)


def test_contour_follows_pixel_centre_convention():
    """Low-res logits of a disc (signed distance) give a contour of the right centre and radius in (u, v)."""
    view = View(10, 20, 128, 128, SIZE)  # a window at rows 10.., cols 20..
    L = SIZE // 4
    cu, cv, r = 60.3, 70.7, 15.0  # image (u, v)
    jj, ii = np.meshgrid(np.arange(L), np.arange(L))
    u = view.c0 + (jj + 0.5) * view.w / L
    v = view.r0 + (ii + 0.5) * view.h / L
    logits = torch.tensor(r - np.hypot(u - cu, v - cv), dtype=torch.float32)
    mask, window, contour, holes = _contours(logits, view, (cu - r - 3, cv - r - 3, cu + r + 3, cv + r + 3), None)
    assert contour is not None and holes == ()
    rad = np.hypot(contour[:, 0] - cu, contour[:, 1] - cv)
    assert abs(rad.mean() - r) < 0.15 and rad.std() < 0.2
    from shapely.geometry import Polygon

    c = Polygon(contour).centroid  # an off-by-half-pixel error would show here
    assert abs(c.x - cu) < 0.03 and abs(c.y - cv) < 0.03
    # the binary mask at image resolution: pixel centres inside the disc
    r0, c0, mh, mw = window
    vv, uu = np.mgrid[r0:r0 + mh, c0:c0 + mw] + 0.5
    d = np.hypot(uu - cu, vv - cv)
    assert mask.sum() == pytest.approx(math.pi * r * r, rel=0.02)
    assert np.all(np.abs(d - r)[mask != (d < r)] < 0.3)  # disagreements only at the rim


def test_training_images_get_the_scan_line_correction_extract_applies(tmp_path):
    # finetune must show the model images prepared as segsem extract prepares them (--scan-lines auto)
    img, lab, _ = synth_image(7)
    stripes = np.random.default_rng(8).normal(0.0, 6.0, N)
    striped = np.clip(img + stripes[:, None], 0, 255).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "img.png"), striped)
    cv2.imwrite(str(tmp_path / "lab.png"), lab)
    (tmp_path / "t.csv").write_text("image,x_nm,y_nm,pixel_nm,label\nimg.png,0,0,1.0,lab.png\n")
    auto, = load_samples(tmp_path / "t.csv")
    off, = load_samples(tmp_path / "t.csv", scan_lines="off")
    from segsem_cli.sam.predict import normalize_image
    from synthetic_helpers import line_to_line
    assert np.array_equal(off.image01, normalize_image(striped))  # off: the image as read

    def stripes_left(a):  # row means of the background columns right of the discs, minus their running mean
        return np.std(line_to_line(a[:, 110:].mean(axis=1), 9))

    assert stripes_left(auto.image01) < 0.5 * stripes_left(off.image01)
    assert np.array_equal(auto.label, off.label)


# ----------------------------------------------------------------------------- fine-tuning


def test_finetune_encoders_lowers_loss_and_freezes_decoder(dataset, trained):
    init = micro(0)  # finetune seeds torch with seed=0 before building: same initial weights
    sd_best, meta = sm.load_checkpoint(trained.model_path)
    sd_last, _ = sm.load_checkpoint(trained.resume_path)
    init_sd = init.state_dict()
    for sd in (sd_best, sd_last):
        for k, v in init_sd.items():
            if k.startswith(("sam_mask_decoder.", "memory_encoder.", "memory_attention.", "obj_ptr", "mask_downsample",
                             "no_mem_embed", "maskmem_tpos_enc")):
                assert torch.equal(v, sd[k]), f"{k} changed in encoders mode"
    changed = [k for k, v in init_sd.items() if k.startswith("image_encoder.") and not torch.equal(v, sd_last[k])]
    assert len(changed) > 0.9 * sum(k.startswith("image_encoder.") for k in init_sd)
    assert trained.trainable_params == sum(p.numel() for n, p in init.named_parameters()
                                           if n.startswith(("image_encoder.", "sam_prompt_encoder.")))
    # the loss on a fixed batch is lower after training
    samples = load_samples(dataset)
    rng = np.random.default_rng(123)
    views = [make_train_view(s, rng, tile_px=SIZE, do_augment=False) for s in samples]
    last = micro(0)
    last.load_state_dict(sd_last)
    with torch.no_grad():
        before, _ = batch_loss(init, views)
        after, _ = batch_loss(last, views)
    assert float(after) < 0.8 * float(before)
    assert trained.log[-1]["train_loss"] < trained.log[0]["train_loss"]
    # metadata and side files
    assert meta["config"] == "segsem-micro" and meta["image_size"] == SIZE
    assert meta["trained_modules"] == ["image_encoder", "sam_prompt_encoder"]
    assert len(meta["data_hash"]) == 64 and meta["metrics"]["epoch"] >= 1
    assert "calibration" in meta and 0 <= meta["metrics"]["val_iou"] <= 1
    rows = list(csv.DictReader(trained.log_path.open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5]
    assert all(float(r["val_epe_px"]) >= 0 for r in rows)


def test_finetune_decoder_mode_freezes_encoders(dataset, tmp_path):
    res = finetune(dataset, tmp_path / "dec.pt", config="segsem-micro", image_size=SIZE, train="decoder", epochs=1,
                   lr=1e-3, seed=1, device="cpu", progress=False)
    init = micro(1)
    sd, meta = sm.load_checkpoint(res.resume_path)
    for k, v in init.state_dict().items():
        if k.startswith(("image_encoder.", "sam_prompt_encoder.", "memory_")):
            assert torch.equal(v, sd[k]), k
    dec = [k for k in sd if k.startswith("sam_mask_decoder.") and "weight" in k]
    assert sum(not torch.equal(init.state_dict()[k], sd[k]) for k in dec) > 0.8 * len(dec)
    assert res.trainable_params == sum(p.numel() for p in init.sam_mask_decoder.parameters())


def test_inference_puts_one_mask_per_feature_in_place(trained):
    from segsem_plugins.sam2_backbone import Sam2Backbone

    bb = Sam2Backbone().load(trained.model_path, device="cpu")
    assert bb.meta["config"] == "segsem-micro" and bb.meta["image_size"] == SIZE
    img, _, discs = synth_image(99)
    tr = PixelTransform((0.0, 0.0), 1.0, img.shape)
    feats = []
    for i, (u, v, r) in enumerate(discs):
        sq = np.array([[u - r, v - r], [u + r, v - r], [u + r, v + r], [u - r, v + r]])
        feats.append(Feature(f"img:{i}", tr.to_layout(sq), sq))
    far = np.array([[300.0, 300], [320, 300], [320, 320]])
    feats.append(Feature("img:far", tr.to_layout(far), far, clipped=True))
    res = bb.predict(SEMImage(Path("img.png"), img.astype(np.float32), tr), feats)
    assert [r.feature_id for r in res] == [f.feature_id for f in feats]
    assert res[-1].status == "outside" and res[-1].contour_px is None
    from shapely.geometry import Point, Polygon

    for r, (u, v, rad) in zip(res[:3], discs):
        assert r.ok and r.source == "sam2" and 0 <= r.confidence <= 1
        assert {"predicted_iou", "stability", "logits_lowres", "mask"} <= set(r.extra)
        pg = Polygon(r.contour_px)
        disc = Point(u, v).buffer(rad)
        assert pg.distance(Point(u, v)) == 0  # the contour surrounds its own disc...
        assert pg.intersection(disc).area / pg.union(disc).area > 0.4  # ...and roughly matches it
        for (ou, ov, orad) in discs:
            if (ou, ov) != (u, v):
                assert not pg.intersects(Point(ou, ov).buffer(orad * 0.5))  # and not its neighbours
    # the same through the lower-level API, with points
    preds = predict_polygons(bb.model, img, [f.pixels for f in feats[:3]], points=True)
    assert all(p.point_px is not None and p.contour_px is not None for p in preds)


def test_resume_continues_and_checks_the_run(dataset, tmp_path):
    out = tmp_path / "m.pt"
    kw = dict(config="segsem-micro", image_size=SIZE, lr=1e-3, device="cpu", progress=False)
    finetune(dataset, out, epochs=1, **kw)
    res = finetune(dataset, out, epochs=2, resume=True, **kw)
    assert [r["epoch"] for r in res.log] == [1, 2]
    assert [int(r["epoch"]) for r in csv.DictReader(side_paths(out)[0].open())] == [1, 2]
    with pytest.raises(SegsemError, match="cannot resume: 'batch' differs"):
        finetune(dataset, out, epochs=3, resume=True, batch=1, **kw)
    with pytest.raises(SegsemError, match="nothing to resume"):
        finetune(dataset, tmp_path / "other.pt", epochs=1, resume=True, **kw)


def test_bad_training_input_fails_before_training(tmp_path, dataset):
    kw = dict(config="segsem-micro", image_size=SIZE, epochs=1, device="cpu", progress=False)
    folder = dataset.parent
    out = tmp_path / "never.pt"

    def manifest(name, rows):
        p = folder / name
        p.write_text("image,x_nm,y_nm,pixel_nm,label\n" + "".join(f"{r}\n" for r in rows))
        return p

    with pytest.raises(SegsemError, match="missing.png: label file not found"):
        finetune(manifest("m1.csv", ["img1.png,0,0,1,missing.png"]), out, **kw)
    cv2.imwrite(str(folder / "small.png"), np.zeros((64, 64), np.uint8))
    with pytest.raises(SegsemError, match="label size 64x64 does not match its image 128x128"):
        finetune(manifest("m2.csv", ["img1.png,0,0,1,small.png"]), out, **kw)
    cv2.imwrite(str(folder / "zeros.png"), np.zeros((N, N), np.uint8))
    with pytest.raises(SegsemError, match="no labelled objects"):
        finetune(manifest("m3.csv", ["img1.png,0,0,1,zeros.png"]), out, **kw)
    with pytest.raises(SegsemError, match="manifest has no rows"):
        finetune(manifest("m4.csv", []), out, **kw)
    with pytest.raises(SegsemError, match="train: unknown module 'nope'"):
        finetune(dataset, out, train="image_encoder,nope", **kw)
    other = sm.save_checkpoint(tmp_path / "t.pt", micro(), {})
    yaml = tmp_path / "deeper.yaml"
    yaml.write_text(sm.resolve_config("segsem-micro").read_text().replace("stages: [1, 1, 2, 1]", "stages: [1, 1, 3, 1]"))
    with pytest.raises(SegsemError, match="weights do not match"):
        finetune(dataset, out, **{**kw, "config": str(yaml)}, checkpoint=other)
    assert not out.exists() and not side_paths(out)[0].exists()


def test_finetune_command(dataset, tmp_path, capsys):
    from segsem_cli.cli import main

    out = tmp_path / "cli.pt"
    rc = main(["finetune", str(dataset), "--config", "segsem-micro", "--image-size", str(SIZE), "--out", str(out),
               "--epochs", "1", "--lr", "1e-3", "--device", "cpu", "--quiet", "--loss-weights", "focal=5,dice=1"])
    assert rc == 0 and out.is_file()
    assert f"wrote {out}" in capsys.readouterr().out
    rc = main(["finetune", str(dataset), "--config", "hiera_x", "--out", str(tmp_path / "x.pt"), "--device", "cpu"])
    assert rc == 2
    assert "unknown SAM2 config 'hiera_x'" in capsys.readouterr().err
    rc = main(["finetune", str(dataset), "--config", "segsem-micro", "--out", str(tmp_path / "y.pt"), "--loss-weights", "focall=1"])
    assert rc == 2 and "unknown term 'focall'" in capsys.readouterr().err


def test_confidence_calibration_fits_true_iou():
    from segsem_cli.sam.predict import confidence, fit_calibration, fit_threshold

    rng = np.random.default_rng(0)
    piou = rng.uniform(0.2, 0.9, 60)
    stab = rng.uniform(0.5, 1.0, 60)
    true = np.clip(1 / (1 + np.exp(-(6 * stab - 2 * piou - 2))) + rng.normal(0, 0.02, 60), 0, 1)  # IoU head misleading
    cal = fit_calibration(piou, stab, true)
    assert cal["kind"] == "logistic" and cal["n"] == 60
    assert cal["mae_after"] < 0.03 < cal["mae_before"]
    assert cal["w_stability"] > 0 > cal["w_iou"]
    conf = [confidence(p, s, cal) for p, s in zip(piou, stab)]
    assert all(0 <= c <= 1 for c in conf)
    thr = fit_threshold(conf, true, good_iou=0.8)
    good = true >= 0.8
    assert np.mean((np.array(conf) >= thr) == good) > 0.9
    assert confidence(0.8, 0.5) == pytest.approx(0.4)  # uncalibrated: product
    assert fit_calibration([0.5] * 3, [0.5] * 3, [0.1, 0.5, 0.9]) is None  # too few samples
    assert fit_threshold([0.2, 0.9], [0.95, 0.99]) is None  # all good: no threshold
