"""Layout-prompted SAM2 inference without torchvision.

Pipeline for one grey-level image and its layout features:

1. ``normalize_image``: robust percentile scaling to [0, 1] over the whole image.
2. Views (:func:`plan_views`): the image, or windows of it, each resized to the
   model input ``S x S`` with ``torch.nn.functional.interpolate`` (bilinear,
   antialiased when shrinking), replicated to 3 channels and normalised with
   the ImageNet mean/std that SAM2 expects (:func:`model_input`).
3. ``model.forward_image`` once per view, features prepared as in
   ``SAM2ImagePredictor.set_image`` (``_prepare_backbone_features``,
   ``no_mem_embed`` added, high-resolution features) by :func:`image_features`.
4. All prompts of a view decoded at once (:func:`decode_prompts`, chunks of
   ``prompt_batch``): prompt encoder + mask decoder with ``repeat_image``.
5. Per prompt: the low-res logits (``S/4``), the binary mask at image
   resolution, the predicted IoU, the stability score and a sub-pixel contour.

Images larger than the model input
----------------------------------
``large="tile"`` (default): windows of ``tile_px`` image pixels (default ``S``,
i.e. native resolution) overlapping by ``tile_overlap_px`` (default ``tile_px //
4``) cover the image; each feature is decoded in the one window that contains
its whole prompt box with the widest margin, so no stitching is needed and no
feature is cut. A feature whose box fits in no window is decoded on the whole
image resized to ``S`` (reported in ``MaskPrediction.view``). ``large="resize"``
always resizes the whole image to ``S`` (coarser: the logits are then ``S/4``
for the whole field). Nothing is ever cropped away silently. Images not larger
than ``tile_px`` are resized to ``S`` as one view (non-square images are
stretched, as SAM2's own transform does).

Coordinates
-----------
Pixel ``(u, v)`` as in :mod:`segsem_cli.transform` (pixel centres at ``+0.5``).
A view covers image rows ``r0 .. r0+h`` and columns ``c0 .. c0+w`` and maps
continuous coordinates by ``u' = (u - c0) * S / w``. SAM's prompt encoder adds
0.5 to its inputs (it takes pixel indices), so prompts are passed as
``u' - 0.5``. Logits are upsampled bilinearly (``align_corners=False``, the
same pixel-centre convention) and contoured at level 0 with
``skimage.measure.find_contours``; ``(row, col)`` becomes
``(u, v) = (col + 0.5, row + 0.5)``.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import SegsemError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- image preparation


def normalize_image(pixels: np.ndarray, *, low_pct: float = 0.5, high_pct: float = 99.5) -> np.ndarray:
    """Scale grey levels robustly to [0, 1]: the ``low_pct`` percentile -> 0, ``high_pct`` -> 1, clipped.

    A constant image gives zeros. Returns float32 of the same shape.
    """
    a = np.asarray(pixels, dtype=np.float32)
    if a.ndim != 2 or a.size == 0:
        raise SegsemError(f"image must be a non-empty 2-D array, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise SegsemError("image contains NaN or infinite values")
    lo, hi = np.percentile(a, [low_pct, high_pct])
    if not hi > lo:
        return np.zeros_like(a)
    return np.clip((a - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class View:
    """A window of the image (rows ``r0:r0+h``, cols ``c0:c0+w``) resized to ``size x size``."""

    r0: int
    c0: int
    h: int
    w: int
    size: int

    def to_model(self, uv: np.ndarray) -> np.ndarray:
        """Image ``(u, v)`` -> SAM prompt coordinates (pixel-index convention, i.e. ``u' - 0.5``)."""
        uv = np.asarray(uv, dtype=np.float64)
        out = np.empty_like(uv)
        out[..., 0] = (uv[..., 0] - self.c0) * (self.size / self.w) - 0.5
        out[..., 1] = (uv[..., 1] - self.r0) * (self.size / self.h) - 0.5
        return out

    def contains_box(self, box: Sequence[float]) -> float:
        """Smallest margin (image px) between ``box`` (u0, v0, u1, v1) and this window's edges; < 0 if outside."""
        u0, v0, u1, v1 = box
        return min(u0 - self.c0, v0 - self.r0, self.c0 + self.w - u1, self.r0 + self.h - v1)

    @property
    def window(self) -> tuple[int, int, int, int]:
        return (self.r0, self.c0, self.h, self.w)


def _starts(n: int, tile: int, overlap: int) -> list[int]:
    if n <= tile:
        return [0]
    step = max(1, tile - overlap)
    starts = list(range(0, n - tile + 1, step))
    if starts[-1] != n - tile:
        starts.append(n - tile)
    return starts


def plan_views(shape: tuple[int, int], image_size: int, *, large: str = "tile", tile_px: int | None = None,
               tile_overlap_px: int | None = None) -> list[View]:
    """The views covering an image of ``shape`` ``(H, W)`` (see the module docstring).

    Returns one full-image view when the image is not larger than ``tile_px``
    or ``large == "resize"``, else overlapping tiles of ``tile_px`` pixels.
    """
    h, w = int(shape[0]), int(shape[1])
    if large not in ("tile", "resize"):
        raise SegsemError(f"large must be 'tile' or 'resize', got {large!r}")
    tile = int(tile_px) if tile_px else int(image_size)
    if tile < 32:
        raise SegsemError(f"tile_px must be at least 32, got {tile_px!r}")
    overlap = tile // 4 if tile_overlap_px is None else int(tile_overlap_px)
    if not 0 <= overlap < tile:
        raise SegsemError(f"tile_overlap_px must be in [0, tile_px), got {tile_overlap_px!r}")
    if large == "resize" or (h <= tile and w <= tile):
        return [View(0, 0, h, w, image_size)]
    th, tw = min(tile, h), min(tile, w)
    return [View(r, c, th, tw, image_size) for r in _starts(h, th, overlap) for c in _starts(w, tw, overlap)]


def model_input(image01: torch.Tensor, views: Sequence[View]) -> torch.Tensor:
    """Crop, resize and normalise views of a [0, 1] image ``(H, W)`` -> ``(B, 3, S, S)``.

    Bilinear, ``align_corners=False`` (pixel-centre convention), antialiased
    when shrinking; ImageNet mean/std per channel.
    """
    outs = []
    for v in views:
        crop = image01[v.r0:v.r0 + v.h, v.c0:v.c0 + v.w][None, None]
        if (v.h, v.w) != (v.size, v.size):
            shrink = v.h > v.size or v.w > v.size
            crop = F.interpolate(crop, size=(v.size, v.size), mode="bilinear", align_corners=False, antialias=shrink)
        outs.append(crop[0, 0])
    x = torch.stack(outs)[:, None].expand(-1, 3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


# ----------------------------------------------------------------------------- model calls


def autocast_for(device: torch.device | str):
    """bf16 autocast on CUDA, nothing on CPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def image_features(model, batch: torch.Tensor) -> dict[str, Any]:
    """Backbone features of a ``(B, 3, S, S)`` batch, prepared like ``SAM2ImagePredictor.set_image_batch``.

    Returns ``{"image_embed": (B, C, S/16, S/16), "high_res_feats": [(B, C/8, S/4, S/4), (B, C/4, S/8, S/8)]}``.
    Runs with gradients when the caller enables them (training uses this too).
    """
    b = batch.shape[0]
    backbone_out = model.forward_image(batch)
    _, vision_feats, _, feat_sizes = model._prepare_backbone_features(backbone_out)
    if model.directly_add_no_mem_embed:
        vision_feats[-1] = vision_feats[-1] + model.no_mem_embed
    feats = [f.permute(1, 2, 0).reshape(b, -1, *hw) for f, hw in zip(vision_feats, feat_sizes)]
    return {"image_embed": feats[-1], "high_res_feats": feats[:-1]}


def decode_prompts(model, feats: dict[str, Any], index: int, boxes: torch.Tensor, points: torch.Tensor | None = None,
                   point_labels: torch.Tensor | None = None, *, multimask_output: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode ``N`` prompts on image ``index`` of ``feats`` in one batch.

    Parameters
    ----------
    boxes : ``(N, 4)`` x0, y0, x1, y1 in SAM prompt coordinates (see :meth:`View.to_model`).
    points, point_labels : optional ``(N, P, 2)`` coordinates and ``(N, P)`` labels
        (1 positive, 0 negative, -1 padding).

    Returns
    -------
    logits : ``(N, K, S/4, S/4)`` (K = 1, or 3 with ``multimask_output``).
    iou : ``(N, K)`` predicted IoU.
    """
    n = boxes.shape[0]
    coords = boxes.reshape(n, 2, 2)
    labels = torch.tensor([[2, 3]], dtype=torch.int, device=boxes.device).repeat(n, 1)
    if points is not None:
        coords = torch.cat([coords, points.to(coords.dtype)], dim=1)
        labels = torch.cat([labels, point_labels.to(torch.int)], dim=1)
    sparse, dense = model.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    high_res = [f[index:index + 1] for f in feats["high_res_feats"]]
    logits, iou, _, _ = model.sam_mask_decoder(
        image_embeddings=feats["image_embed"][index:index + 1],
        image_pe=model.sam_prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask_output,
        repeat_image=True,
        high_res_features=high_res,
    )
    return logits, iou


def stability_score(logits: torch.Tensor, *, threshold: float = 0.0, offset: float = 1.0) -> torch.Tensor:
    """SAM's stability score: IoU of the masks ``logits > t + offset`` and ``logits > t - offset``.

    Computed over the last two dimensions; an empty mask scores 0.
    """
    inner = (logits > threshold + offset).flatten(-2).sum(-1).float()
    outer = (logits > threshold - offset).flatten(-2).sum(-1).float()
    return torch.where(outer > 0, inner / outer.clamp(min=1), torch.zeros_like(outer))


def upsample_logits(lowres: torch.Tensor, out_hw: tuple[int, int], rows: tuple[int, int] | None = None,
                    cols: tuple[int, int] | None = None) -> torch.Tensor:
    """Bilinear upsampling of ``(L, L)`` logits to ``out_hw``, optionally only rows/cols ``[a, b)``.

    Identical to ``F.interpolate(..., size=out_hw, mode="bilinear", align_corners=False)``
    cropped, but computes only the requested region (``grid_sample``).
    """
    h, w = out_hw
    r0, r1 = rows or (0, h)
    c0, c1 = cols or (0, w)
    dev = lowres.device
    ys = (torch.arange(r0, r1, device=dev, dtype=torch.float32) + 0.5) / h * 2 - 1
    xs = (torch.arange(c0, c1, device=dev, dtype=torch.float32) + 0.5) / w * 2 - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    grid = torch.stack([gx, gy], dim=-1)[None]
    out = F.grid_sample(lowres.float()[None, None], grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[0, 0]


# ----------------------------------------------------------------------------- results


@dataclass
class MaskPrediction:
    """SAM2's answer to one prompt.

    ``logits_lowres`` are the mask logits at model resolution (``S/4``) of the
    view ``view`` (``(r0, c0, h, w)`` image window resized to ``S``). ``mask`` is
    the binary mask at image resolution over ``mask_window`` ``(r0, c0, h, w)``
    (a region of the image; :meth:`full_mask` pastes it into an image-size
    array); outside it the logits are negative. ``contour_px`` is the outer
    sub-pixel contour ``(N, 2)`` in image ``(u, v)`` (None if the mask is empty
    where the prompt is), ``holes_px`` its interior boundaries.
    """

    box_px: tuple[float, float, float, float]
    point_px: tuple[float, float] | None
    view: tuple[int, int, int, int]
    logits_lowres: np.ndarray
    mask: np.ndarray
    mask_window: tuple[int, int, int, int]
    predicted_iou: float
    stability: float
    contour_px: np.ndarray | None
    holes_px: tuple[np.ndarray, ...] = ()
    multimask_ious: tuple[float, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def full_mask(self, shape: tuple[int, int]) -> np.ndarray:
        """The binary mask as a bool array of the image's ``shape``."""
        out = np.zeros(shape, dtype=bool)
        r0, c0, h, w = self.mask_window
        out[r0:r0 + h, c0:c0 + w] = self.mask
        return out


def _ring_area(uv: np.ndarray) -> float:
    x, y = uv[:, 0], uv[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def _contours(lowres: torch.Tensor, view: View, box_px: Sequence[float], point_px, *, min_hole_area: float = 4.0):
    """Mask, its window, outer contour and holes for one prompt (image coordinates).

    The mask kept is one 8-connected component of ``logits > 0`` at image
    resolution: the one holding the prompt point if any, else the one with
    most pixels inside the prompt box. Other components are discarded (their
    logits set negative, which cannot move this component's contour: no
    marching-squares cell touches two components). Its outer contour is the
    largest ring, the others are its holes; holes smaller than ``min_hole_area``
    px (noise) are filled first.
    """
    import scipy.ndimage as ndi
    from skimage.measure import find_contours

    L = lowres.shape[-1]
    empty = (np.zeros((0, 0), bool), (view.r0, view.c0, 0, 0), None, ())
    pos = (lowres > 0).cpu().numpy()
    # Low-res cells of the box (+1), to find the positive components touching the prompt.
    sy, sx = L / view.h, L / view.w
    u0, v0, u1, v1 = box_px
    bc0 = max(0, int(math.floor((u0 - view.c0) * sx)) - 1)
    bc1 = min(L, int(math.ceil((u1 - view.c0) * sx)) + 1)
    br0 = max(0, int(math.floor((v0 - view.r0) * sy)) - 1)
    br1 = min(L, int(math.ceil((v1 - view.r0) * sy)) + 1)
    eight = np.ones((3, 3), bool)
    lab, _ = ndi.label(pos, structure=eight)
    ids = np.unique(lab[br0:br1, bc0:bc1])
    ids = ids[ids > 0]
    if ids.size == 0:
        return empty
    rr, cc = np.nonzero(np.isin(lab, ids))
    # Crop (low-res cells +2) mapped to window pixels, upsampled there only.
    lr0, lr1 = max(0, rr.min() - 2), min(L, rr.max() + 3)
    lc0, lc1 = max(0, cc.min() - 2), min(L, cc.max() + 3)
    pr0, pr1 = int(math.floor(lr0 / sy)), min(view.h, int(math.ceil(lr1 / sy)))
    pc0, pc1 = int(math.floor(lc0 / sx)), min(view.w, int(math.ceil(lc1 / sx)))
    logits = upsample_logits(lowres, (view.h, view.w), rows=(pr0, pr1), cols=(pc0, pc1)).cpu().numpy()
    wr0, wc0 = view.r0 + pr0, view.c0 + pc0
    comp, n = ndi.label(logits > 0, structure=eight)
    if n == 0:
        return empty
    keep = 0
    if point_px is not None:
        r, c = int(math.floor(point_px[1])) - wr0, int(math.floor(point_px[0])) - wc0
        if 0 <= r < comp.shape[0] and 0 <= c < comp.shape[1]:
            keep = int(comp[r, c])
    if keep == 0:
        r0 = max(0, int(math.floor(v0)) - wr0)
        r1 = min(comp.shape[0], int(math.ceil(v1)) - wr0)
        c0 = max(0, int(math.floor(u0)) - wc0)
        c1 = min(comp.shape[1], int(math.ceil(u1)) - wc0)
        inside = comp[r0:r1, c0:c1] if r1 > r0 and c1 > c0 else np.zeros(0, int)
        counts = np.bincount(inside.ravel(), minlength=n + 1)
        counts[0] = 0
        if counts.max() == 0:
            return empty
        keep = int(np.argmax(counts))
    sel = comp == keep
    rows, cols = np.nonzero(sel.any(axis=1))[0], np.nonzero(sel.any(axis=0))[0]
    a0, a1 = max(0, rows[0] - 1), min(sel.shape[0], rows[-1] + 2)
    b0, b1 = max(0, cols[0] - 1), min(sel.shape[1], cols[-1] + 2)
    sel = sel[a0:a1, b0:b1]
    lg = logits[a0:a1, b0:b1]
    low = float(min(-1.0, lg.min()))
    lg = np.where(sel | (lg <= 0), lg, low)  # other components -> negative
    if min_hole_area > 0:  # fill holes smaller than min_hole_area px (noise): they would not be kept anyway
        holes_lab, nh = ndi.label(~sel)
        if nh:
            area = np.bincount(holes_lab.ravel(), minlength=nh + 1)
            border = np.unique(np.concatenate([holes_lab[0], holes_lab[-1], holes_lab[:, 0], holes_lab[:, -1]]))
            small = area < min_hole_area
            small[0] = False
            small[border] = False
            if small.any():
                fill = small[holes_lab]
                lg = np.where(fill, max(1.0, float(lg.max())), lg)
                sel = sel | fill
    window = (wr0 + a0, wc0 + b0, a1 - a0, b1 - b0)
    rings = []
    for c in find_contours(np.pad(lg, 1, mode="constant", constant_values=low), 0.0):
        if len(c) < 4:
            continue
        uv = np.stack([c[:, 1] - 1 + 0.5 + window[1], c[:, 0] - 1 + 0.5 + window[0]], axis=1)
        if uv[0, 0] == uv[-1, 0] and uv[0, 1] == uv[-1, 1]:
            uv = uv[:-1]
        if len(uv) >= 3:
            rings.append((abs(_ring_area(uv)), uv))
    if not rings:
        return sel, window, None, ()
    rings.sort(key=lambda t: -t[0])
    holes = tuple(uv for a, uv in rings[1:] if a >= 0.5 * min_hole_area)
    return sel, window, rings[0][1], holes


def polygon_prompt(polygon_uv: np.ndarray, shape: tuple[int, int], *, box_margin_px: float = 3.0,
                   point: bool = False) -> tuple[tuple[float, float, float, float] | None, tuple[float, float] | None]:
    """Box (u0, v0, u1, v1) of a layout polygon in pixels, padded by ``box_margin_px`` and clipped to the image,
    and (with ``point``) a positive point inside it (shapely ``representative_point``).

    Returns ``(None, None)`` when the polygon lies outside the image.
    """
    from shapely.geometry import Polygon, box as sbox

    p = np.asarray(polygon_uv, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 2 or len(p) < 3 or not np.all(np.isfinite(p)):
        raise SegsemError(f"feature polygon must be an (N>=3, 2) array of finite (u, v), got shape {p.shape}")
    h, w = shape
    m = float(box_margin_px)
    u0, v0 = max(0.0, p[:, 0].min() - m), max(0.0, p[:, 1].min() - m)
    u1, v1 = min(float(w), p[:, 0].max() + m), min(float(h), p[:, 1].max() + m)
    if u1 - u0 < 1.0 or v1 - v0 < 1.0:
        return None, None
    pt = None
    if point:
        pg = Polygon(p)
        if not pg.is_valid:
            pg = pg.buffer(0)
        pg = pg.intersection(sbox(0, 0, w, h))
        if not pg.is_empty:
            rp = pg.representative_point()
            pt = (float(rp.x), float(rp.y))
    return (float(u0), float(v0), float(u1), float(v1)), pt


def predict_boxes(
    model,
    pixels: np.ndarray,
    boxes_px: Sequence[Sequence[float] | None],
    points_px: Sequence[tuple[float, float] | None] | None = None,
    *,
    multimask_output: bool = False,
    large: str = "tile",
    tile_px: int | None = None,
    tile_overlap_px: int | None = None,
    stability_offset: float = 1.0,
    prompt_batch: int = 32,
    low_pct: float = 0.5,
    high_pct: float = 99.5,
) -> list[MaskPrediction | None]:
    """Segment one image with box prompts (and optional positive points).

    Parameters
    ----------
    model : a SAM2Base (see :func:`segsem_cli.sam.model.build_model`); its
        device is used, bf16 autocast on CUDA.
    pixels : 2-D grey-level image ``(H, W)`` (any float range).
    boxes_px : per prompt ``(u0, v0, u1, v1)`` in image pixels, or None (no prediction).
    points_px : per prompt a positive point ``(u, v)`` or None.
    multimask_output : ask for 3 masks and keep the one with the highest predicted IoU.
    large, tile_px, tile_overlap_px : handling of images larger than the model input
        (see the module docstring).
    stability_offset : logit offset of the stability score.
    prompt_batch : prompts decoded together (memory bound).

    Returns
    -------
    One :class:`MaskPrediction` per box (None where the box was None).
    """
    img = np.asarray(pixels)
    if img.ndim != 2:
        raise SegsemError(f"image must be 2-D (grey levels), got shape {img.shape}")
    h, w = img.shape
    if points_px is not None and len(points_px) != len(boxes_px):
        raise SegsemError(f"{len(points_px)} points for {len(boxes_px)} boxes")
    S = int(model.image_size)
    dev = next(model.parameters()).device
    views = plan_views((h, w), S, large=large, tile_px=tile_px, tile_overlap_px=tile_overlap_px)
    full = View(0, 0, h, w, S)
    # Assign every prompt to the view that holds its box with the widest margin.
    assign: dict[View, list[int]] = {}
    for i, b in enumerate(boxes_px):
        if b is None:
            continue
        u0, v0, u1, v1 = (float(x) for x in b)
        if not (u1 > u0 and v1 > v0):
            raise SegsemError(f"prompt {i}: empty box {tuple(b)}")
        margins = [v.contains_box(b) for v in views]
        k = int(np.argmax(margins))
        assign.setdefault(views[k] if margins[k] >= 0 else full, []).append(i)
    results: list[MaskPrediction | None] = [None] * len(boxes_px)
    if not assign:
        return results
    was_training = model.training
    model.eval()
    image01 = torch.from_numpy(normalize_image(img, low_pct=low_pct, high_pct=high_pct)).to(dev)
    try:
        with torch.inference_mode(), autocast_for(dev):
            for view, idx in assign.items():
                feats = image_features(model, model_input(image01, [view]))
                for s in range(0, len(idx), max(1, int(prompt_batch))):
                    chunk = idx[s:s + prompt_batch]
                    bx = torch.tensor(np.array([view.to_model(np.reshape(boxes_px[i], (2, 2))).ravel() for i in chunk]),
                                      dtype=torch.float32, device=dev)
                    pts = lab = None
                    if points_px is not None and any(points_px[i] is not None for i in chunk):
                        pts = torch.tensor(np.array([view.to_model(np.asarray(points_px[i] if points_px[i] is not None else (0.0, 0.0)))[None]
                                                     for i in chunk]), dtype=torch.float32, device=dev)
                        lab = torch.tensor([[1 if points_px[i] is not None else -1] for i in chunk], dtype=torch.int, device=dev)
                    logits, iou = decode_prompts(model, feats, 0, bx, pts, lab, multimask_output=multimask_output)
                    logits = logits.float()
                    iou = iou.float()
                    best = iou.argmax(dim=1) if multimask_output else torch.zeros(len(chunk), dtype=torch.long, device=dev)
                    sel = logits[torch.arange(len(chunk), device=dev), best]
                    stab = stability_score(sel, offset=stability_offset)
                    for j, i in enumerate(chunk):
                        pt = None if points_px is None or points_px[i] is None else tuple(map(float, points_px[i]))
                        box = tuple(float(x) for x in boxes_px[i])
                        mask, window, contour, holes = _contours(sel[j], view, box, pt)
                        results[i] = MaskPrediction(
                            box_px=box,  # type: ignore[arg-type]
                            point_px=pt,  # type: ignore[arg-type]
                            view=view.window,
                            logits_lowres=sel[j].cpu().numpy().astype(np.float32),
                            mask=mask,
                            mask_window=window,
                            predicted_iou=float(iou[j, best[j]]),
                            stability=float(stab[j]),
                            contour_px=contour,
                            holes_px=holes,
                            multimask_ious=tuple(float(x) for x in iou[j]) if multimask_output else (),
                        )
    finally:
        model.train(was_training)
    return results


def predict_polygons(model, pixels: np.ndarray, polygons_uv: Sequence[np.ndarray], *, box_margin_px: float = 3.0,
                     points: bool = False, **kwargs) -> list[MaskPrediction | None]:
    """Segment one image with one prompt per layout polygon (``(N, 2)`` ``(u, v)`` pixels).

    The box is the polygon's bounding box padded by ``box_margin_px`` (for
    bias and rounding between layout and silicon) and clipped to the image;
    with ``points`` a positive point at the polygon's representative point is
    added. Polygons outside the image give None. Other keyword arguments go to
    :func:`predict_boxes`.
    """
    shape = np.asarray(pixels).shape
    prompts = [polygon_prompt(p, shape, box_margin_px=box_margin_px, point=points) for p in polygons_uv]
    boxes = [b for b, _ in prompts]
    pts = [p for _, p in prompts] if points else None
    return predict_boxes(model, pixels, boxes, pts, **kwargs)


# ----------------------------------------------------------------------------- confidence


def confidence(predicted_iou: float, stability: float, calibration: dict | None = None) -> float:
    """Confidence in [0, 1] that a mask is right, from SAM2's predicted IoU and the stability score.

    Without ``calibration``: ``clip(predicted_iou) * stability`` (both in [0, 1];
    a mask must be both predicted good and stable). With a calibration fitted
    by :func:`fit_calibration` (stored in segsem checkpoints):
    ``sigmoid(a * predicted_iou + b * stability + c)``, an estimate of the
    mask's true IoU on data like the validation images.
    """
    p = float(np.clip(predicted_iou, 0.0, 1.0))
    s = float(np.clip(stability, 0.0, 1.0))
    if not calibration:
        return p * s
    if calibration.get("kind") != "logistic":
        raise SegsemError(f"unknown confidence calibration kind {calibration.get('kind')!r}")
    z = float(calibration["w_iou"]) * p + float(calibration["w_stability"]) * s + float(calibration["bias"])
    return float(1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, z)))))


def fit_calibration(predicted_iou, stability, true_iou, *, l2: float = 1e-5, min_samples: int = 4) -> dict | None:
    """Fit ``true_iou ~ sigmoid(a * predicted_iou + b * stability + c)`` by least squares (L2 on a, b).

    Returns a plain dict (stored in checkpoint metadata) with the fitted
    parameters, the number of samples and the mean absolute error of the
    confidence before (uncalibrated formula) and after; None when there are
    fewer than ``min_samples`` samples or the true IoUs do not vary.
    """
    from scipy.optimize import minimize

    p = np.clip(np.asarray(predicted_iou, dtype=np.float64), 0, 1)
    s = np.clip(np.asarray(stability, dtype=np.float64), 0, 1)
    y = np.clip(np.asarray(true_iou, dtype=np.float64), 0, 1)
    if not (p.shape == s.shape == y.shape and p.ndim == 1):
        raise SegsemError("calibration inputs must be 1-D arrays of the same length")
    ok = np.isfinite(p) & np.isfinite(s) & np.isfinite(y)
    p, s, y = p[ok], s[ok], y[ok]
    if len(y) < min_samples or np.ptp(y) < 1e-3:
        return None

    def f(theta):
        a, b, c = theta
        z = np.clip(a * p + b * s + c, -50, 50)
        q = 1 / (1 + np.exp(-z))
        r = q - y
        loss = np.mean(r ** 2) + l2 * (a * a + b * b)
        g = 2 * r * q * (1 - q) / len(y)
        return loss, np.array([np.sum(g * p) + 2 * l2 * a, np.sum(g * s) + 2 * l2 * b, np.sum(g)])

    ym = float(np.clip(y.mean(), 1e-3, 1 - 1e-3))
    res = minimize(f, x0=np.array([0.0, 0.0, math.log(ym / (1 - ym))]), jac=True, method="L-BFGS-B")
    a, b, c = (float(x) for x in res.x)
    cal = {"kind": "logistic", "w_iou": a, "w_stability": b, "bias": c, "n": int(len(y))}
    before = np.mean(np.abs(p * s - y))
    after = np.mean(np.abs(np.array([confidence(pi, si, cal) for pi, si in zip(p, s)]) - y))
    cal["mae_before"] = float(before)
    cal["mae_after"] = float(after)
    return cal


def fit_threshold(conf, true_iou, *, good_iou: float = 0.9) -> float | None:
    """The confidence cut that best separates masks with ``true_iou >= good_iou`` from the rest
    (maximum of sensitivity + specificity); None unless both kinds occur."""
    c = np.asarray(conf, dtype=np.float64)
    good = np.asarray(true_iou, dtype=np.float64) >= good_iou
    if good.all() or not good.any():
        return None
    best, best_t = -1.0, None
    for t in np.unique(c):
        pred = c >= t
        j = pred[good].mean() + (~pred[~good]).mean()
        if j > best:
            best, best_t = j, float(t)
    return best_t
