"""Backbone ``sam2``: SAM2 prompted with the aligned layout, one box per feature.

``load(model, device=..., **options)`` builds SAM2 from a checkpoint (a segsem
fine-tuned model from ``segsem finetune``, or official SAM2 weights with
``config=``) and returns an object whose ``predict(image, features)`` gives
one :class:`~segsem_cli.types.FeatureResult` per feature:

* ``contour_px``: the 0-level contour of the mask logits upsampled bilinearly
  to image resolution, ``(u, v)`` pixels (largest contour overlapping the
  prompt), ``holes_px`` its interior boundaries;
* ``confidence``: the checkpoint's calibrated estimate of the mask IoU from
  SAM2's predicted IoU and the stability score
  (:func:`segsem_cli.sam.predict.confidence`; uncalibrated:
  ``predicted_iou * stability``);
* ``status``: ``ok``, ``not_found`` (no positive mask where the prompt is)
  or ``outside`` (the feature's box is not in the image);
* ``extra``: ``predicted_iou``, ``stability``, ``logits_lowres`` (model
  resolution ``S/4``), ``mask`` (bool, image resolution over
  ``mask_window`` = ``(r0, c0, h, w)``), ``view``, ``box_px``, ``point_px``.

``meta``: the checkpoint's segsem metadata (config, image_size, calibration,
``threshold`` when one was fitted, metrics, ...) plus ``checkpoint``.

Options (``--backbone-opt key=value``; strings accepted): ``config`` (name or
YAML; default from the checkpoint), ``image_size`` (default: checkpoint's),
``points`` (add a positive point inside each feature; default: as trained),
``box_margin_px`` (padding of the layout box; default: as trained, else 3),
``large`` (``tile`` | ``resize``), ``tile_px``, ``tile_overlap_px``,
``multimask`` (3 masks, keep the best), ``prompt_batch`` (32).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from segsem_cli import hookimpl
from segsem_cli.errors import SegsemError
from segsem_cli.types import Feature, FeatureResult, SEMImage

def _bool(key: str, v: Any) -> bool:
    from segsem_cli.edges import parse_bool

    b = parse_bool(v)
    if b is None:
        raise SegsemError(f"backbone option '{key}': '{v}' is not a boolean (true/false)")
    return b


def _num(key: str, v: Any, kind=float, lo: float | None = None):
    try:
        x = kind(float(v)) if kind is int else float(v)
    except (TypeError, ValueError):
        raise SegsemError(f"backbone option '{key}': '{v}' is not a number") from None
    if kind is int and float(v) != x:
        raise SegsemError(f"backbone option '{key}': '{v}' is not an integer")
    if lo is not None and x < lo:
        raise SegsemError(f"backbone option '{key}': must be >= {lo}, got {v}")
    return x


class Sam2Model:
    """A loaded SAM2 with the prompt settings; see the module docstring."""

    def __init__(self, model, meta: dict, *, points: bool, box_margin_px: float, large: str, tile_px: int | None,
                 tile_overlap_px: int | None, multimask: bool, prompt_batch: int) -> None:
        self.model = model
        self.meta = meta
        self.points = points
        self.box_margin_px = box_margin_px
        self.large = large
        self.tile_px = tile_px
        self.tile_overlap_px = tile_overlap_px
        self.multimask = multimask
        self.prompt_batch = prompt_batch

    def predict(self, image: SEMImage, features: Sequence[Feature]) -> list[FeatureResult]:
        from segsem_cli.sam.predict import confidence, predict_polygons

        features = list(features)
        if not features:
            return []
        preds = predict_polygons(
            self.model, image.pixels, [f.pixels for f in features], box_margin_px=self.box_margin_px,
            points=self.points, multimask_output=self.multimask, large=self.large, tile_px=self.tile_px,
            tile_overlap_px=self.tile_overlap_px, prompt_batch=self.prompt_batch,
        )
        cal = self.meta.get("calibration")
        out = []
        for f, p in zip(features, preds):
            if p is None:
                out.append(FeatureResult(f.feature_id, None, "sam2", 0.0, status="outside"))
                continue
            conf = confidence(p.predicted_iou, p.stability, cal)
            extra = {
                "predicted_iou": p.predicted_iou,
                "stability": p.stability,
                "logits_lowres": p.logits_lowres,
                "mask": p.mask,
                "mask_window": p.mask_window,
                "view": p.view,
                "box_px": p.box_px,
                "point_px": p.point_px,
            }
            if p.contour_px is None:
                out.append(FeatureResult(f.feature_id, None, "sam2", conf, status="not_found", extra=extra))
            else:
                out.append(FeatureResult(f.feature_id, p.contour_px, "sam2", conf, "ok", tuple(p.holes_px), extra))
        return out


class Sam2Backbone:
    name = "sam2"
    description = "SAM2 prompted with one layout box per feature (fine-tune it with `segsem finetune`)"

    def load(self, model: Path | None, *, device: str = "cpu", **options: Any) -> Sam2Model:
        """Build the model; ``model`` is a checkpoint (None: random weights, needs ``config``; for tests)."""
        from segsem_cli.sam.model import build_model

        config = options.get("config") or None
        image_size = _num("image_size", options["image_size"], int, 64) if options.get("image_size") not in (None, "") else None
        if model is None and config is None:
            raise SegsemError("backbone sam2: needs a model checkpoint (segsem finetune --out MODEL) or a config option")
        net = build_model(config, checkpoint=model, image_size=image_size, device=device, mode="eval")
        meta = dict(net.segsem_meta)
        meta.setdefault("config", net.segsem_config)
        meta["image_size"] = int(net.image_size)
        meta["checkpoint"] = str(model) if model is not None else None
        if model is None:
            meta["random_init"] = True
        points = _bool("points", options["points"]) if "points" in options else bool(meta.get("points", False))
        margin = _num("box_margin_px", options.get("box_margin_px", meta.get("box_margin_px", 3.0)), float, 0.0)
        large = str(options.get("large", meta.get("large", "tile"))).strip().lower()
        if large not in ("tile", "resize"):
            raise SegsemError(f"backbone option 'large': '{large}' must be tile or resize")
        tile_px = options.get("tile_px", meta.get("tile_px"))
        tile_px = _num("tile_px", tile_px, int, 32) if tile_px not in (None, "") else None
        ov = options.get("tile_overlap_px")
        ov = _num("tile_overlap_px", ov, int, 0) if ov not in (None, "") else None
        multimask = _bool("multimask", options.get("multimask", False))
        batch = _num("prompt_batch", options.get("prompt_batch", 32), int, 1)
        return Sam2Model(net, meta, points=points, box_margin_px=margin, large=large, tile_px=tile_px,
                         tile_overlap_px=ov, multimask=multimask, prompt_batch=batch)


@hookimpl
def register_backbones(register):
    register(Sam2Backbone())
