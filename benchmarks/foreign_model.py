"""A second CD-SEM image model, written apart from ``segsem_cli.synth.render``.

segsem's accuracy is also judged on SEM images from simulators other than its own. This
model renders the same printed shapes (so the truth, the mid-height contour, is the same)
with different physics and different imaging, to see what changes when the image is not
the one segsem was developed on. Nothing in it is fitted to segsem's results; its numbers
are textbook-plausible values chosen before the first run.

Signal, with ``d`` the signed distance to the mid-height contour (nm, + into the resist)
and a sidewall of footprint ``w = height / tan(swa)`` (50 nm at 88 deg: 1.75 nm):

* resist top (``d > w/2``): ``res_yield + edge_yield * exp(-(d - w/2) / escape_nm)``
  (secondary electrons escaping through the nearby sidewall);
* sidewall (``|d| <= w/2``): ``min(sec(swa), sec_cap) * res_yield + edge_yield``
  (the secant law of a tilted surface, capped: the brightest band sits ON the sidewall,
  not at its top as in segsem's model);
* substrate (``d < -w/2``): ``sub_yield * (1 - shadow * exp(-(-d - w/2) / shadow_nm))``
  (the wall blocks part of the electrons leaving the substrate next to its foot: a dark
  band segsem's model does not have).

Material contrast is low (resist top 0.34 against substrate 0.30): the edges carry the
image. The signal is evaluated on a grid ``ss`` times finer than the pixels (exact distance
near the edges, Euclidean distance transform further out), blurred by a two-Gaussian beam
(core plus a ``tail_frac`` share of a wide tail), averaged over each pixel's area, given a
linear charging gradient, Poisson shot noise (``electrons`` per pixel at yield 1),
Gaussian detector noise, and stretched to 8 bits between the 0.1 and 99.9 percentiles,
as an auto-contrast would. No drift, no scan-line noise, no astigmatism.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage

from segsem_cli.synth.render import RenderParams, SEMRender, render_clean
from segsem_cli.transform import PixelTransform


@dataclass(frozen=True)
class ForeignParams:
    height_nm: float = 50.0
    swa_deg: float = 88.0
    sub_yield: float = 0.30
    res_yield: float = 0.34
    edge_yield: float = 0.45
    escape_nm: float = 6.0
    sec_cap: float = 3.0
    shadow: float = 0.35
    shadow_nm: float = 10.0
    core_nm: float = 1.2
    tail_nm: float = 6.0
    tail_frac: float = 0.2
    electrons: float = 40.0
    read_noise: float = 0.01
    gradient: float = 0.08
    ss: int = 4


PRESETS = {
    "medium": ForeignParams(),
    "hard": ForeignParams(core_nm=2.0, tail_frac=0.3, electrons=12.0, read_noise=0.02, gradient=0.15),
}


def signal_of_distance(d_nm: np.ndarray, p: ForeignParams) -> np.ndarray:
    """The unblurred yield at signed distance ``d_nm`` (+ into the resist)."""
    w = p.height_nm / math.tan(math.radians(p.swa_deg))
    sec = min(1.0 / max(math.cos(math.radians(p.swa_deg)), 1e-9), p.sec_cap)
    top = p.res_yield + p.edge_yield * np.exp(-np.clip(d_nm - w / 2, 0, None) / p.escape_nm)
    wall = sec * p.res_yield + p.edge_yield
    sub = p.sub_yield * (1.0 - p.shadow * np.exp(-np.clip(-d_nm - w / 2, 0, None) / p.shadow_nm))
    return np.where(d_nm > w / 2, top, np.where(d_nm < -w / 2, sub, wall)).astype(np.float32)


def _signed_distance_nm(shapes, transform: PixelTransform, tone: str, ss: int):
    """Signed distance (nm, + into the resist) on the fine grid: exact near edges, EDT beyond."""
    h, w = transform.shape
    px = transform.pixel_nm / ss
    fine = PixelTransform(center_nm=transform.center_nm, pixel_nm=px, shape=(h * ss, w * ss),
                          offset_nm=transform.offset_nm)
    # render_clean gives the exact signed distance where its (tiny) rim model needs it
    clean = render_clean(shapes, fine, params=RenderParams(swa_deg=90.0, edge_decay_nm=px), tone=tone)
    resist = clean.resist
    edt = (ndimage.distance_transform_edt(resist) - ndimage.distance_transform_edt(~resist)).astype(np.float32)
    edt -= np.sign(edt) * 0.5  # pixel centre to the boundary between the centres
    d = np.where(np.isnan(clean.distance_px), edt, clean.distance_px)
    return d * np.float32(px)


def foreign_renderer(p: ForeignParams):
    """A ``renderer`` for :func:`segsem_cli.synth.dataset.make_dataset` (``params`` is ignored)."""

    def render(shapes, transform: PixelTransform, *, params=None, rng: np.random.Generator, tone: str = "resist"):
        h, w = transform.shape
        ss = p.ss
        d = _signed_distance_nm(shapes, transform, tone, ss)
        sig = signal_of_distance(d, p)
        del d
        fine_px = transform.pixel_nm / ss
        core = cv2.GaussianBlur(sig, (0, 0), sigmaX=p.core_nm / fine_px, borderType=cv2.BORDER_REFLECT)
        if p.tail_frac > 0:
            tail = cv2.GaussianBlur(sig, (0, 0), sigmaX=p.tail_nm / fine_px, borderType=cv2.BORDER_REFLECT)
            core = (1 - p.tail_frac) * core + p.tail_frac * tail
        img = cv2.resize(core, (w, h), interpolation=cv2.INTER_AREA).astype(np.float64)
        gx, gy = rng.uniform(-1, 1, 2)
        u = np.linspace(-1, 1, w)[None, :]
        v = np.linspace(-1, 1, h)[:, None]
        img = img * (1.0 + p.gradient * 0.5 * (gx * u + gy * v))
        img = rng.poisson(np.clip(img, 0, None) * p.electrons) / p.electrons
        img = img + rng.normal(0.0, p.read_noise, img.shape)
        lo, hi = np.percentile(img, [0.1, 99.9])
        grey = np.clip(np.rint((img - lo) / max(hi - lo, 1e-9) * 255), 0, 255).astype(np.uint8)
        labels = render_clean(shapes, transform, params=RenderParams(swa_deg=90.0, edge_decay_nm=0.1), tone=tone)
        return SEMRender(grey, labels, {"model": "foreign", **{k: getattr(p, k) for k in p.__dataclass_fields__},
                                        "gradient_dir": [float(gx), float(gy)], "row_shift_px": None})

    return render


__all__ = ["ForeignParams", "PRESETS", "foreign_renderer", "signal_of_distance"]
