"""Fine-tuning SAM2 on a few labelled SEM images (the SegSEM recipe: train the encoders).

Data
----
A manifest (:func:`segsem_cli.manifest.read_manifest`) with a ``label``
column: instance label images (0 = background, 1..N = objects) of the same
size as their SEM image. Validation: an explicit manifest, or a seeded split
by image (default 20 %, at least one image when there are two or more; a
single image is validated on itself and the checkpoint says so).

Training step
-------------
Each image of a step gives one view (the whole image resized to the model
input ``S``, or, for an image larger than ``tile_px``, a random ``tile_px``
window at native resolution: the same views inference uses), augmented with
flips, 90-degree rotations, brightness/contrast/gamma, Gaussian noise and blur.
Up to ``objects_per_image`` objects get a prompt each: their bounding box padded
by ``box_margin_px`` (as inference pads the layout box) with random jitter of
each side, and, with probability ``point_prob``, a positive point on the
object and sometimes a negative point in the box outside it. Loss (SAM2's
recipe): ``20 * focal + dice`` on the mask logits upsampled to ``S``, plus the
MSE between the predicted IoU and the IoU of the predicted mask.

Modes (``train``)
-----------------
``encoders`` (default): ``image_encoder`` and ``sam_prompt_encoder`` train,
everything else (``sam_mask_decoder`` with its IoU head, memory modules, ...)
stays bitwise frozen. ``decoder``: only ``sam_mask_decoder``. ``full``: all.
Or a comma list of module (or parameter) names, e.g. ``image_encoder.neck,sam_mask_decoder``.

Confidence
----------
In ``encoders`` mode the IoU head is frozen, so its scores drift from the
truth as the encoder changes. After training, the best model is run on the
validation images and a logistic calibration ``true IoU ~ sigmoid(a * predicted
IoU + b * stability + c)`` is fitted (:func:`segsem_cli.sam.predict.fit_calibration`)
and stored in the checkpoint metadata with a confidence ``threshold``
separating masks of IoU >= 0.9 from worse ones (when both occur). The
backbone plugin applies both.

Outputs
-------
``out`` (best epoch by validation IoU, then boundary EPE): ``{'model':
state_dict, 'segsem': metadata}``, loadable by ``sam2.build_sam.build_sam2``;
``<out stem>.log.csv`` (one row per epoch); ``<out stem>.resume.pt`` (latest
weights + optimizer state, plain tensors, loaded with ``weights_only=True``)
for ``resume``. All written atomically.
"""
from __future__ import annotations

import csv
import hashlib
import io
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic import write_text
from ..errors import SegsemError
from . import model as sam_model
from .predict import (
    View,
    autocast_for,
    confidence,
    decode_prompts,
    fit_calibration,
    fit_threshold,
    image_features,
    model_input,
    normalize_image,
    plan_views,
    predict_boxes,
)

TRAIN_MODES: dict[str, tuple[str, ...] | None] = {
    "encoders": ("image_encoder", "sam_prompt_encoder"),
    "decoder": ("sam_mask_decoder",),
    "full": None,
}
LOSS_WEIGHTS = {"focal": 20.0, "dice": 1.0, "iou": 1.0}
LOG_COLUMNS = ["epoch", "steps", "train_loss", "train_focal", "train_dice", "train_iou_mse", "val_iou", "val_epe_px",
               "val_found", "lr", "seconds", "best"]


# ----------------------------------------------------------------------------- data


@dataclass
class Sample:
    """One labelled image: ``image01`` normalised to [0, 1] (:func:`normalize_image`), ``label`` int32 instances."""

    name: str
    image01: np.ndarray
    label: np.ndarray
    object_ids: np.ndarray
    pixel_nm: float | None = None
    files: tuple[Path, ...] = ()


def make_sample(name: str, pixels: np.ndarray, label: np.ndarray, *, pixel_nm: float | None = None,
                files: tuple[Path, ...] = ()) -> Sample:
    """A :class:`Sample` from arrays (validates shapes and label values)."""
    pixels = np.asarray(pixels)
    label = np.asarray(label)
    if pixels.ndim != 2:
        raise SegsemError(f"{name}: image must be 2-D, got shape {pixels.shape}")
    if label.shape != pixels.shape:
        raise SegsemError(f"{name}: label size {label.shape[1]}x{label.shape[0]} does not match its image "
                          f"{pixels.shape[1]}x{pixels.shape[0]}" if label.ndim == 2 else f"{name}: label must be 2-D")
    if not np.issubdtype(label.dtype, np.integer) or (label.size and label.min() < 0):
        raise SegsemError(f"{name}: label must hold non-negative integers (0 = background, 1..N = objects)")
    label = label.astype(np.int32)
    ids = np.unique(label)
    return Sample(name, normalize_image(pixels), label, ids[ids > 0], pixel_nm, files)


def load_samples(manifest: str | Path, *, scan_lines: str = "auto") -> list[Sample]:
    """Read a training manifest (``label`` column required) into samples; SegsemError on any bad row.

    ``scan_lines`` (``auto`` | ``off``) removes significant scan-line offsets as ``segsem extract``
    does before the backbone sees an image (:mod:`segsem_cli.scanlines`), so the model trains on
    images prepared the way it will be shown them.
    """
    from ..images import read_label, read_sem
    from ..manifest import read_manifest
    from ..scanlines import correct_scan_lines

    rows = read_manifest(manifest, require_label=True)
    out = []
    for r in rows:
        if r.label is None:
            raise SegsemError(f"{manifest} row {r.row} field 'label': empty value (training needs a label mask per image)")
        try:
            pixels, px = read_sem(r.image, r.pixel_nm)
        except SegsemError:
            if r.pixel_nm is not None:
                raise
            pixels, px = read_sem(r.image, 1.0)  # pixel size is not needed to train
            px = None
        label = read_label(r.label, shape=pixels.shape)
        pixels, _ = correct_scan_lines(pixels, mode=scan_lines)
        out.append(make_sample(r.name, pixels, label, pixel_nm=px, files=(Path(r.image), Path(r.label))))
    return out


def data_hash(samples: Sequence[Sample]) -> str:
    """SHA-256 over the names, normalised images and labels of ``samples`` (order matters)."""
    h = hashlib.sha256()
    for s in samples:
        h.update(s.name.encode())
        h.update(np.ascontiguousarray(s.image01).tobytes())
        h.update(np.ascontiguousarray(s.label).tobytes())
    return h.hexdigest()


def split_samples(samples: Sequence[Sample], *, val_fraction: float = 0.2, seed: int = 0) -> tuple[list[Sample], list[Sample], bool]:
    """Seeded split by image: ``(train, val, val_on_train)``.

    At least one validation image when there are two or more images and
    ``val_fraction > 0``; otherwise validation runs on the training images
    (``val_on_train`` True).
    """
    if not 0 <= val_fraction < 1:
        raise SegsemError(f"validation fraction must be in [0, 1), got {val_fraction}")
    n = len(samples)
    if n < 2 or val_fraction == 0:
        return list(samples), list(samples), True
    k = min(n - 1, max(1, int(round(val_fraction * n))))
    perm = np.random.default_rng(seed).permutation(n)
    val_idx = set(perm[:k].tolist())
    return [s for i, s in enumerate(samples) if i not in val_idx], [s for i, s in enumerate(samples) if i in val_idx], False


# ----------------------------------------------------------------------------- views, prompts, augmentation


@dataclass
class TrainView:
    """One augmented view with its prompts: ``image01`` ``(h, w)``, ``masks`` ``(n, h, w)`` bool,
    ``boxes`` ``(n, 4)`` view pixels, ``points`` ``(n, 2, 2)`` and ``point_labels`` ``(n, 2)`` (-1 = none)."""

    image01: np.ndarray
    masks: np.ndarray
    boxes: np.ndarray
    points: np.ndarray
    point_labels: np.ndarray


def augment(image01: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random flips, 90-degree rotations (image and label), then brightness/contrast/gamma, noise, blur (image only)."""
    from scipy.ndimage import gaussian_filter

    k = int(rng.integers(4))
    img, lab = np.rot90(image01, k), np.rot90(label, k)
    if rng.random() < 0.5:
        img, lab = img[:, ::-1], lab[:, ::-1]
    img = np.ascontiguousarray(img, dtype=np.float32)
    lab = np.ascontiguousarray(lab)
    if rng.random() < 0.8:
        c = rng.uniform(0.7, 1.3)
        b = rng.uniform(-0.15, 0.15)
        img = np.clip((img - 0.5) * c + 0.5 + b, 0, 1)
    if rng.random() < 0.5:
        img = np.clip(img, 0, 1) ** rng.uniform(0.7, 1.5)
    if rng.random() < 0.3:
        img = gaussian_filter(img, sigma=rng.uniform(0.3, 1.2))
    if rng.random() < 0.5:
        img = img + rng.normal(0, rng.uniform(0.005, 0.05), img.shape)
    return np.clip(img, 0, 1).astype(np.float32), lab


def _window(sample: Sample, tile: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = sample.label.shape
    if h <= tile and w <= tile:
        return sample.image01, sample.label
    th, tw = min(tile, h), min(tile, w)
    # Centre the window near a random object (random offset) so that most windows hold objects.
    if sample.object_ids.size:
        oid = rng.choice(sample.object_ids)
        rr, cc = np.nonzero(sample.label == oid)
        i = int(rng.integers(len(rr)))
        r0 = int(np.clip(rr[i] - rng.integers(th), 0, h - th))
        c0 = int(np.clip(cc[i] - rng.integers(tw), 0, w - tw))
    else:
        r0, c0 = int(rng.integers(h - th + 1)), int(rng.integers(w - tw + 1))
    return sample.image01[r0:r0 + th, c0:c0 + tw], sample.label[r0:r0 + th, c0:c0 + tw]


def make_train_view(sample: Sample, rng: np.random.Generator, *, tile_px: int, objects_per_image: int = 8,
                    box_margin_px: float = 3.0, point_prob: float = 0.5, do_augment: bool = True,
                    min_area_px: int = 4) -> TrainView | None:
    """One training view of ``sample`` with prompts for up to ``objects_per_image`` objects (None if it has none)."""
    img, lab = _window(sample, tile_px, rng)
    if do_augment:
        img, lab = augment(img, lab, rng)
    h, w = lab.shape
    ids, counts = np.unique(lab, return_counts=True)
    keep = (ids > 0) & (counts >= min_area_px)
    ids = ids[keep]
    if ids.size == 0:
        return None
    if ids.size > objects_per_image:
        ids = rng.choice(ids, size=objects_per_image, replace=False)
    masks, boxes, points, plabels = [], [], [], []
    for oid in ids:
        m = lab == oid
        rr, cc = np.nonzero(m)
        u0, u1, v0, v1 = cc.min(), cc.max() + 1.0, rr.min(), rr.max() + 1.0
        size = min(u1 - u0, v1 - v0)
        jit = box_margin_px + 0.05 * size
        side = box_margin_px + rng.uniform(-1, 1, 4) * jit
        b = np.array([u0 - side[0], v0 - side[1], u1 + side[2], v1 + side[3]], dtype=np.float64)
        b[[0, 2]] = np.clip(b[[0, 2]], 0, w)
        b[[1, 3]] = np.clip(b[[1, 3]], 0, h)
        if b[2] - b[0] < 1:
            b[0], b[2] = max(0.0, b[0] - 1), min(float(w), b[2] + 1)
        if b[3] - b[1] < 1:
            b[1], b[3] = max(0.0, b[1] - 1), min(float(h), b[3] + 1)
        pts = np.zeros((2, 2))
        pl = np.array([-1, -1])
        if rng.random() < point_prob:
            i = int(rng.integers(len(rr)))
            pts[0] = (cc[i] + 0.5, rr[i] + 0.5)
            pl[0] = 1
            if rng.random() < 0.5:
                bi = np.zeros_like(m)
                bi[int(b[1]):int(math.ceil(b[3])), int(b[0]):int(math.ceil(b[2]))] = True
                nr, nc = np.nonzero(bi & (lab != oid))
                if len(nr):
                    j = int(rng.integers(len(nr)))
                    pts[1] = (nc[j] + 0.5, nr[j] + 0.5)
                    pl[1] = 0
        masks.append(m)
        boxes.append(b)
        points.append(pts)
        plabels.append(pl)
    return TrainView(img, np.stack(masks), np.stack(boxes), np.stack(points), np.stack(plabels))


# ----------------------------------------------------------------------------- loss


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, *, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Per-object focal loss (mean over pixels) of ``(N, H, W)`` logits vs soft targets."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.flatten(1).mean(1)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-object soft dice loss of ``(N, H, W)`` logits vs targets."""
    p = torch.sigmoid(logits).flatten(1)
    t = targets.flatten(1)
    return 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)


def batch_loss(model, views: Sequence[TrainView], *, weights: dict[str, float] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one training step on ``views`` (with gradients). Returns ``(loss, parts)``."""
    wts = {**LOSS_WEIGHTS, **(weights or {})}
    dev = next(model.parameters()).device
    S = int(model.image_size)
    vs = [View(0, 0, v.image01.shape[0], v.image01.shape[1], S) for v in views]
    with autocast_for(dev):
        x = torch.cat([model_input(torch.from_numpy(v.image01).to(dev), [vw]) for v, vw in zip(views, vs)])
        feats = image_features(model, x)
    focal_all, dice_all, iou_all = [], [], []
    for i, (v, vw) in enumerate(zip(views, vs)):
        boxes = torch.tensor(vw.to_model(v.boxes.reshape(-1, 2, 2)).reshape(-1, 4), dtype=torch.float32, device=dev)
        has_pts = bool((v.point_labels >= 0).any())
        pts = torch.tensor(vw.to_model(v.points), dtype=torch.float32, device=dev) if has_pts else None
        lab = torch.tensor(v.point_labels, dtype=torch.int, device=dev) if has_pts else None
        with autocast_for(dev):
            logits, iou = decode_prompts(model, feats, i, boxes, pts, lab, multimask_output=False)
        logits = F.interpolate(logits.float(), size=(S, S), mode="bilinear", align_corners=False)[:, 0]
        tgt = torch.from_numpy(v.masks.astype(np.float32)).to(dev)[:, None]
        shrink = tgt.shape[-2] > S or tgt.shape[-1] > S
        tgt = F.interpolate(tgt, size=(S, S), mode="bilinear", align_corners=False, antialias=shrink)[:, 0].clamp(0, 1)
        focal_all.append(sigmoid_focal_loss(logits, tgt))
        dice_all.append(dice_loss(logits, tgt))
        with torch.no_grad():
            pm, tm = logits > 0, tgt > 0.5
            inter = (pm & tm).flatten(1).sum(1).float()
            union = (pm | tm).flatten(1).sum(1).float()
            true_iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
        iou_all.append((iou.float()[:, 0] - true_iou) ** 2)
    focal = torch.cat(focal_all).mean()
    dice = torch.cat(dice_all).mean()
    iou_mse = torch.cat(iou_all).mean()
    loss = wts["focal"] * focal + wts["dice"] * dice + wts["iou"] * iou_mse
    return loss, {"loss": float(loss.detach()), "focal": float(focal.detach()), "dice": float(dice.detach()),
                  "iou_mse": float(iou_mse.detach())}


# ----------------------------------------------------------------------------- trainable selection


def select_trainable(model: torch.nn.Module, train: str) -> list[str]:
    """Freeze everything, then unfreeze per ``train`` (mode name or comma list). Returns the trained names."""
    spec = (train or "").strip()
    if not spec:
        raise SegsemError("train: empty (use encoders, decoder, full or a comma list of module names)")
    if spec in TRAIN_MODES:
        names = TRAIN_MODES[spec]
        if names is None:
            for p in model.parameters():
                p.requires_grad_(True)
            return ["(all)"]
    else:
        names = tuple(s.strip() for s in spec.split(",") if s.strip())
    for p in model.parameters():
        p.requires_grad_(False)
    top = ", ".join(n for n, _ in model.named_children())
    for n in names:
        try:
            target = model.get_submodule(n)
            params = list(target.parameters())
        except AttributeError:
            try:
                params = [model.get_parameter(n)]
            except AttributeError:
                raise SegsemError(f"train: unknown module '{n}' (modes: encoders, decoder, full; modules: {top})") from None
        if not params:
            raise SegsemError(f"train: module '{n}' has no parameters")
        for p in params:
            p.requires_grad_(True)
    return list(names)


def _set_train_mode(model: torch.nn.Module) -> None:
    """Modules with trainable parameters in train mode, the rest in eval mode."""
    model.eval()
    for mod in model.modules():
        if any(p.requires_grad for p in mod.parameters(recurse=False)):
            mod.train()


# ----------------------------------------------------------------------------- evaluation


def boundary_epe(pred_uv: np.ndarray, true_uv: np.ndarray) -> float:
    """Symmetric mean distance (px) between two closed contours' vertices and the other contour."""
    import shapely

    a = shapely.linearrings(np.vstack([pred_uv, pred_uv[:1]]))
    b = shapely.linearrings(np.vstack([true_uv, true_uv[:1]]))
    da = shapely.distance(b, shapely.points(pred_uv))
    db = shapely.distance(a, shapely.points(true_uv))
    return float(0.5 * (da.mean() + db.mean()))


def label_contour(mask: np.ndarray) -> np.ndarray | None:
    """Outer boundary ``(N, 2)`` ``(u, v)`` of a binary mask along pixel edges' midpoints (largest contour)."""
    from skimage.measure import find_contours

    cs = find_contours(np.pad(mask.astype(np.float32), 1), 0.5)
    if not cs:
        return None
    c = max(cs, key=len)
    uv = np.stack([c[:, 1] - 1 + 0.5, c[:, 0] - 1 + 0.5], axis=1)
    return uv[:-1] if np.allclose(uv[0], uv[-1]) else uv


def evaluate(model, samples: Sequence[Sample], *, box_margin_px: float = 3.0, points: bool = False,
             large: str = "tile", tile_px: int | None = None, min_area_px: int = 4) -> dict[str, Any]:
    """Validation: every labelled object prompted with its padded bounding box (no jitter).

    Returns ``{"iou": mean IoU, "epe_px": mean boundary EPE of found objects,
    "found": fraction with a contour, "n": objects, "records": [(predicted_iou,
    stability, true_iou), ...]}``.
    """
    from ..sam.predict import polygon_prompt

    records, ious, epes, found = [], [], [], 0
    for s in samples:
        ids, counts = np.unique(s.label, return_counts=True)
        ids = ids[(ids > 0) & (counts >= min_area_px)]
        if ids.size == 0:
            continue
        h, w = s.label.shape
        boxes, pts, masks = [], [], []
        for oid in ids:
            m = s.label == oid
            rr, cc = np.nonzero(m)
            poly = np.array([[cc.min(), rr.min()], [cc.max() + 1, rr.min()], [cc.max() + 1, rr.max() + 1], [cc.min(), rr.max() + 1]], float)
            b, _ = polygon_prompt(poly, (h, w), box_margin_px=box_margin_px)
            boxes.append(b)
            pts.append((cc[len(cc) // 2] + 0.5, rr[len(rr) // 2] + 0.5) if points else None)
            masks.append(m)
        preds = predict_boxes(model, s.image01, boxes, pts if points else None, large=large, tile_px=tile_px,
                              low_pct=0.0, high_pct=100.0)
        for m, pr in zip(masks, preds):
            assert pr is not None
            r0, c0, mh, mw = pr.mask_window
            inter = int(np.count_nonzero(pr.mask & m[r0:r0 + mh, c0:c0 + mw]))
            union = int(np.count_nonzero(m)) + int(np.count_nonzero(pr.mask)) - inter
            iou = inter / union if union else 1.0
            ious.append(iou)
            records.append((pr.predicted_iou, pr.stability, iou))
            if pr.contour_px is not None:
                found += 1
                gt = label_contour(m)
                if gt is not None:
                    epes.append(boundary_epe(pr.contour_px, gt))
    n = len(ious)
    return {
        "iou": float(np.mean(ious)) if n else float("nan"),
        "epe_px": float(np.mean(epes)) if epes else float("nan"),
        "found": found / n if n else float("nan"),
        "n": n,
        "records": records,
    }


# ----------------------------------------------------------------------------- the run


def _lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _better(m: dict, best: dict | None) -> bool:
    if best is None:
        return True
    a, b = m["val_iou"], best["val_iou"]
    if not math.isfinite(a):
        return False
    if not math.isfinite(b) or a > b + 1e-9:
        return True
    if abs(a - b) <= 1e-9:
        e, f = m["val_epe_px"], best["val_epe_px"]
        return math.isfinite(e) and (not math.isfinite(f) or e < f)
    return False


def _log_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=LOG_COLUMNS, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def side_paths(out: str | Path) -> tuple[Path, Path]:
    """``(log_csv, resume_file)`` written next to the model ``out``."""
    out = Path(out)
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    return out.with_name(f"{stem}.log.csv"), out.with_name(f"{stem}.resume.pt")


@dataclass
class FinetuneResult:
    """What :func:`finetune` did: paths written, parameter counts, best metrics, the epoch log."""

    model_path: Path
    log_path: Path
    resume_path: Path
    trainable_params: int
    total_params: int
    best: dict[str, Any]
    calibration: dict | None
    threshold: float | None
    log: list[dict] = field(default_factory=list)


def finetune(
    dataset: str | Path | Sequence[Sample],
    out: str | Path,
    *,
    config: str | Path | None = None,
    checkpoint: str | Path | None = None,
    train: str = "encoders",
    val: str | Path | Sequence[Sample] | None = None,
    val_fraction: float = 0.2,
    epochs: int = 20,
    lr: float = 1e-5,
    batch: int = 2,
    image_size: int | None = None,
    seed: int = 0,
    device: str = "auto",
    grad_clip: float | None = 1.0,
    resume: bool = False,
    objects_per_image: int = 8,
    box_margin_px: float = 3.0,
    point_prob: float = 0.5,
    do_augment: bool = True,
    weight_decay: float = 0.01,
    loss_weights: dict[str, float] | None = None,
    large: str = "tile",
    tile_px: int | None = None,
    progress: bool = True,
    console=None,
    scan_lines: str = "auto",
) -> FinetuneResult:
    """Fine-tune SAM2 on labelled images and write the best model to ``out``.

    Parameters
    ----------
    dataset : training manifest (``label`` column) or a list of :class:`Sample`.
    out : model file to write (see the module docstring for the side files).
    config : SAM2 config name or YAML (None: from ``checkpoint``'s metadata).
    checkpoint : starting weights (official SAM2 or segsem); None = random init.
    train : ``encoders`` | ``decoder`` | ``full`` | comma list of module names.
    val : validation manifest or samples; None = seeded split of ``val_fraction``.
    epochs, lr, batch, seed, weight_decay, grad_clip : optimisation (AdamW,
        5 % linear warm-up then cosine decay to ``lr / 10``; ``batch`` images per step).
    image_size : model input size S (multiple of 32); None = checkpoint's or config's.
    device : cpu | cuda | cuda:N | auto (bf16 autocast on CUDA).
    resume : continue from ``<out stem>.resume.pt`` (same data, config and modes);
        a larger ``epochs`` extends a finished run.
    objects_per_image, box_margin_px, point_prob, do_augment : prompts and augmentation.
    loss_weights : override of :data:`LOSS_WEIGHTS` (``focal``, ``dice``, ``iou``).
    large, tile_px : view handling for images larger than the model input (as in inference).
    progress : show a rich progress bar (on ``console``, default stderr).
    scan_lines : scan-line offset correction of manifest images (``auto`` | ``off``, as in
        ``segsem extract``; see :func:`load_samples`).

    Every input problem raises SegsemError before training starts.
    """
    from rich.console import Console

    console = console or Console(stderr=True)
    out = Path(out)
    log_path, resume_path = side_paths(out)
    for name, v, lo in (("epochs", epochs, 1), ("batch", batch, 1), ("objects_per_image", objects_per_image, 1)):
        if not isinstance(v, int) or v < lo:
            raise SegsemError(f"{name} must be an integer >= {lo}, got {v!r}")
    if not (lr > 0 and math.isfinite(lr)):
        raise SegsemError(f"lr must be a positive number, got {lr!r}")
    if grad_clip is not None and not grad_clip > 0:
        raise SegsemError(f"grad clip must be positive (or None), got {grad_clip!r}")
    if out.exists() and out.is_dir():
        raise SegsemError(f"{out}: output model path is a folder")

    # --- data
    samples = load_samples(dataset, scan_lines=scan_lines) if isinstance(dataset, (str, Path)) else list(dataset)
    if not samples:
        raise SegsemError(f"{dataset}: empty training set")
    if val is not None:
        val_samples = load_samples(val, scan_lines=scan_lines) if isinstance(val, (str, Path)) else list(val)
        if not val_samples:
            raise SegsemError(f"{val}: empty validation set")
        train_samples, val_on_train = samples, False
    else:
        train_samples, val_samples, val_on_train = split_samples(samples, val_fraction=val_fraction, seed=seed)
    train_samples = [s for s in train_samples if s.object_ids.size]
    if not train_samples:
        raise SegsemError(f"{dataset}: no labelled objects in the training images (labels are all 0)")
    dhash = hashlib.sha256(f"train:{data_hash(train_samples)} val:{data_hash(val_samples)}".encode()).hexdigest()

    # --- model
    torch.manual_seed(seed)
    model = sam_model.build_model(config, checkpoint=checkpoint, image_size=image_size, device=device, mode="train")
    S = int(model.image_size)
    tile = int(tile_px) if tile_px else S
    plan_views((tile + 1, tile + 1), S, large=large, tile_px=tile)  # validates large/tile
    dev = next(model.parameters()).device
    trained = select_trainable(model, train)
    counts = sam_model.parameter_counts(model)
    n_train, n_total = counts["total"]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train_samples) / batch)
    options = {
        "config": model.segsem_config, "train": train, "trained_modules": trained, "image_size": S,
        "data_hash": dhash, "batch": batch, "lr": lr, "seed": seed, "weight_decay": weight_decay,
        "objects_per_image": objects_per_image, "box_margin_px": box_margin_px, "point_prob": point_prob,
        "augment": do_augment, "large": large, "tile_px": tile, "loss_weights": {**LOSS_WEIGHTS, **(loss_weights or {})},
    }

    # --- resume
    start_epoch, best, log_rows = 0, None, []
    if resume:
        if not resume_path.is_file():
            raise SegsemError(f"{resume_path}: nothing to resume (no resume file next to {out})")
        sd, rmeta = sam_model.load_checkpoint(resume_path)
        ropt = rmeta.get("options", {})
        for k in ("config", "train", "image_size", "data_hash", "batch", "seed"):
            if ropt.get(k) != options[k]:
                raise SegsemError(f"{resume_path}: cannot resume: '{k}' differs from the interrupted run "
                                  f"({ropt.get(k)!r} there, {options[k]!r} now)")
        sam_model.load_state_dict_checked(model, sd, source=resume_path)
        try:
            ostate = torch.load(resume_path.with_suffix(".optim.pt"), map_location=dev, weights_only=True)
            opt.load_state_dict(ostate)
        except Exception as exc:  # noqa: BLE001
            raise SegsemError(f"{resume_path.with_suffix('.optim.pt')}: unreadable optimizer state ({exc})".splitlines()[0]) from None
        start_epoch = int(rmeta.get("epochs_done", 0))
        best = rmeta.get("best")
        log_rows = list(rmeta.get("log", []))
    total_steps = epochs * steps_per_epoch
    warmup = max(1, int(0.05 * total_steps))

    console.print(f"SAM2 {model.segsem_config} at {S} px on {dev}: training {', '.join(trained)}: "
                  f"{n_train:,} of {n_total:,} parameters trainable")
    console.print(f"{len(train_samples)} training images, {len(val_samples)} validation images"
                  + (" (validating on the training images)" if val_on_train else ""))

    def save_resume(epochs_done: int) -> None:
        meta = {"options": options, "epochs_done": epochs_done, "best": best, "log": log_rows}
        sam_model.save_checkpoint(resume_path, model, meta)
        from ..atomic import atomic_path

        with atomic_path(resume_path.with_suffix(".optim.pt")) as tmp:
            torch.save(opt.state_dict(), tmp)

    base_meta = {
        "format": "segsem-sam2/1",
        "config": model.segsem_config,
        "config_yaml": model.segsem_config_yaml,
        "image_size": S,
        "train_mode": train,
        "trained_modules": trained,
        "trainable_params": n_train,
        "total_params": n_total,
        "data_hash": dhash,
        "train_images": [s.name for s in train_samples],
        "val_images": [s.name for s in val_samples],
        "val_on_train": val_on_train,
        "base_checkpoint": str(checkpoint) if checkpoint else None,
        "box_margin_px": float(box_margin_px),
        "points": False,
        "large": large,
        "tile_px": tile,
        "options": options,
    }

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), console=console, disable=not progress, transient=False) as bar:
        task = bar.add_task("fine-tuning", total=max(0, (epochs - start_epoch)) * steps_per_epoch, info="")
        for epoch in range(start_epoch, epochs):
            t0 = time.perf_counter()
            rng = np.random.default_rng([seed, epoch])
            _set_train_mode(model)
            order = rng.permutation(len(train_samples))
            sums = {"loss": 0.0, "focal": 0.0, "dice": 0.0, "iou_mse": 0.0}
            nsteps = 0
            for k in range(steps_per_epoch):
                step = epoch * steps_per_epoch + k
                views = []
                for i in order[k * batch:(k + 1) * batch]:
                    v = make_train_view(train_samples[i], rng, tile_px=tile, objects_per_image=objects_per_image,
                                        box_margin_px=box_margin_px, point_prob=point_prob, do_augment=do_augment)
                    if v is not None:
                        views.append(v)
                if not views:
                    bar.advance(task)
                    continue
                cur_lr = _lr_at(step, total_steps, lr, warmup)
                for g in opt.param_groups:
                    g["lr"] = cur_lr
                opt.zero_grad(set_to_none=True)
                loss, parts = batch_loss(model, views, weights=loss_weights)
                if not torch.isfinite(loss):
                    raise SegsemError(f"training diverged at epoch {epoch + 1} step {k + 1} (loss {parts['loss']}); lower --lr")
                loss.backward()
                if grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, grad_clip)
                opt.step()
                for key in sums:
                    sums[key] += parts[key]
                nsteps += 1
                bar.update(task, advance=1, info=f"epoch {epoch + 1}/{epochs} loss {parts['loss']:.4f}")
            metrics = evaluate(model, val_samples, box_margin_px=box_margin_px, large=large, tile_px=tile)
            row = {
                "epoch": epoch + 1, "steps": nsteps,
                "train_loss": sums["loss"] / max(1, nsteps), "train_focal": sums["focal"] / max(1, nsteps),
                "train_dice": sums["dice"] / max(1, nsteps), "train_iou_mse": sums["iou_mse"] / max(1, nsteps),
                "val_iou": metrics["iou"], "val_epe_px": metrics["epe_px"], "val_found": metrics["found"],
                "lr": _lr_at((epoch + 1) * steps_per_epoch - 1, total_steps, lr, warmup),
                "seconds": time.perf_counter() - t0, "best": 0,
            }
            if _better(row, best):
                best = {"epoch": epoch + 1, "val_iou": row["val_iou"], "val_epe_px": row["val_epe_px"],
                        "val_found": row["val_found"], "train_loss": row["train_loss"]}
                row["best"] = 1
                sam_model.save_checkpoint(out, model, {**base_meta, "metrics": best, "epochs_done": epoch + 1,
                                                       "calibration": None, "created": _now()})
            log_rows.append(row)
            write_text(log_path, _log_csv(log_rows))
            save_resume(epoch + 1)
            bar.update(task, info=f"epoch {epoch + 1}/{epochs} loss {row['train_loss']:.4f} "
                                  f"val IoU {row['val_iou']:.3f} EPE {row['val_epe_px']:.2f}px")

    if best is None or not out.is_file():
        raise SegsemError(f"{out}: no epoch produced a valid model (validation IoU was not finite)")

    # --- calibration of the confidence on the validation images, with the best model
    sd, _ = sam_model.load_checkpoint(out)
    sam_model.load_state_dict_checked(model, sd, source=out)
    metrics = evaluate(model, val_samples, box_margin_px=box_margin_px, large=large, tile_px=tile)
    rec = np.array(metrics["records"], dtype=np.float64).reshape(-1, 3)
    cal = fit_calibration(rec[:, 0], rec[:, 1], rec[:, 2]) if len(rec) else None
    thr = None
    if len(rec):
        conf = [confidence(p, s, cal) for p, s in rec[:, :2]]
        thr = fit_threshold(conf, rec[:, 2])
    meta = {**base_meta, "metrics": best, "epochs_done": len(log_rows), "calibration": cal, "created": _now()}
    if thr is not None:
        meta["threshold"] = thr
    sam_model.save_checkpoint(out, model, meta)
    console.print(f"best epoch {best['epoch']}: val IoU {best['val_iou']:.4f}, boundary EPE {best['val_epe_px']:.3f} px; "
                  f"wrote {out}")
    return FinetuneResult(out, log_path, resume_path, n_train, n_total, best, cal, thr, log_rows)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
