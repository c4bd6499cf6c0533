"""Tiny CD-SEM-like image generator with known sub-pixel edges (for tests and benchmarks).

Physical model (same as ``segsem synth``): the printed edge (truth) is the
resist sidewall at mid-height. Let ``e`` be the signed distance to the truth
edge, positive into the resist. The secondary-electron signal is

* substrate level ``S`` for ``e < -footprint/2``;
* a linear ramp from ``S`` to the rim peak ``P`` across the sidewall footprint
  ``-footprint/2 <= e <= footprint/2`` (truth at ``e = 0``, mid-footprint);
* the bright rim ``P`` for ``rim`` px at the sidewall top;
* then an exponential decay (length ``decay``) to the resist top level ``T``.

The signal is integrated over each pixel (``ss x ss`` supersampling), blurred
with a Gaussian beam (``blur`` px), and gets Gaussian read noise (``noise``,
grey levels) plus optional Poisson shot noise (``dose`` electrons per unit
signal). Pixel ``(r, c)`` has its centre at ``(u, v) = (c + .5, r + .5)``.

Lines are resist features (polygon interior = resist, bright on a dark
substrate); holes are openings in resist (polygon interior = substrate, dark
in bright resist).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter, gaussian_filter1d, uniform_filter1d


@dataclass(frozen=True)
class Rim:
    S: float = 0.2
    P: float = 1.0
    T: float = 0.55
    footprint: float = 2.0
    rim: float = 2.5
    decay: float = 3.0

    def profile(self, e: np.ndarray) -> np.ndarray:
        e = np.asarray(e, dtype=np.float64)
        h = self.footprint / 2.0
        ramp = self.S + (self.P - self.S) * np.clip((e + h) / self.footprint, 0.0, 1.0)
        tail = self.T + (self.P - self.T) * np.exp(-np.clip(e - h - self.rim, 0.0, None) / self.decay)
        return np.where(e <= h, ramp, np.where(e <= h + self.rim, self.P, tail))


# ----------------------------------------------------------------------------- signed distances (u, v)

def sdf_disc(u, v, cu, cv, r):
    """Signed distance to a disc, positive inside."""
    return r - np.hypot(u - cu, v - cv)


def sdf_rect(u, v, u0, v0, u1, v1):
    """Signed distance to an axis-aligned rectangle [u0,u1] x [v0,v1], positive inside."""
    cu, cv = (u0 + u1) / 2, (v0 + v1) / 2
    hu, hv = (u1 - u0) / 2, (v1 - v0) / 2
    du = np.abs(u - cu) - hu
    dv = np.abs(v - cv) - hv
    outside = np.hypot(np.maximum(du, 0), np.maximum(dv, 0))
    inside = np.minimum(np.maximum(du, dv), 0)
    return -(outside + inside)


@dataclass(frozen=True)
class Shape:
    kind: str  # "disc" | "rect"
    params: tuple

    def sdf(self, u, v):
        return sdf_disc(u, v, *self.params) if self.kind == "disc" else sdf_rect(u, v, *self.params)

    def bbox(self) -> tuple[float, float, float, float]:
        """(u0, v0, u1, v1) bounding box."""
        if self.kind == "disc":
            cu, cv, r = self.params
            return (cu - r, cv - r, cu + r, cv + r)
        return self.params

    def polygon(self, n: int = 64) -> np.ndarray:
        """The truth outline as a (u, v) polygon (for use as a layout polygon)."""
        if self.kind == "disc":
            cu, cv, r = self.params
            t = np.linspace(0, 2 * np.pi, n, endpoint=False)
            return np.column_stack([cu + r * np.cos(t), cv + r * np.sin(t)])
        u0, v0, u1, v1 = self.params
        return np.array([[u0, v0], [u1, v0], [u1, v1], [u0, v1]], dtype=float)


def disc(cu, cv, r) -> Shape:
    return Shape("disc", (float(cu), float(cv), float(r)))


def rect(u0, v0, u1, v1) -> Shape:
    return Shape("rect", (float(u0), float(v0), float(u1), float(v1)))


def render(shapes, shape=(128, 128), *, tone: str = "line", rim: Rim = Rim(), blur: float = 1.0,
           noise: float = 0.0, dose: float | None = None, ss: int = 4, seed: int = 0) -> np.ndarray:
    """Render shapes (union) as a float32 SEM-like image; see the module docstring."""
    h, w = shape
    off = (np.arange(ss) + 0.5) / ss
    img = np.zeros((h, w), dtype=np.float64)
    # Signed distances are only needed near each shape: beyond ``margin`` px the
    # profile has reached its substrate / resist-top plateau.
    margin = int(np.ceil(rim.footprint + rim.rim + 12 * rim.decay + 4))
    for dy in off:
        for dx in off:
            d = np.full((h, w), -float(margin))
            for s in shapes:
                u0, v0, u1, v1 = s.bbox()
                r0, r1 = max(0, int(v0) - margin), min(h, int(np.ceil(v1)) + margin)
                c0, c1 = max(0, int(u0) - margin), min(w, int(np.ceil(u1)) + margin)
                if r0 >= r1 or c0 >= c1:
                    continue
                u = np.arange(c0, c1)[None, :] + dx
                v = np.arange(r0, r1)[:, None] + dy
                d[r0:r1, c0:c1] = np.maximum(d[r0:r1, c0:c1], s.sdf(u, v))
            e = d if tone == "line" else -d
            img += rim.profile(e)
    img /= ss * ss
    if blur > 0:
        img = gaussian_filter(img, blur, mode="reflect")
    rng = np.random.default_rng(seed)
    if dose is not None:
        img = rng.poisson(np.clip(img, 0, None) * dose) / dose
    if noise > 0:
        img = img + rng.normal(0.0, noise, img.shape)
    return img.astype(np.float32)


def convention_edge(rim: Rim = Rim(), *, blur: float = 1.0, smooth_sigma: float = 1.0,
                    threshold: float = 0.5, dx: float = 0.005) -> float:
    """Where the threshold rule puts a straight edge, in px into the resist from the truth.

    Applies pixel integration (1 px box), beam blur and the analysis smoothing
    to the 1-D noise-free profile, then the rule of :mod:`segsem_cli.edges`:
    rim peak = largest rise over the running minimum, level
    ``min + t (peak - min)``, crossing on the substrate-side flank.
    """
    x = np.arange(-30.0, 30.0, dx)
    p = rim.profile(x)
    box = int(round(1.0 / dx))
    p = np.convolve(p, np.ones(box) / box, mode="same")
    sig = np.hypot(blur, smooth_sigma) / dx
    p = gaussian_filter1d(p, sig, mode="nearest")
    core = (x > -15) & (x < 15)
    x, p = x[core], p[core]
    rise = p - np.minimum.accumulate(p)
    k = int(np.argmax(rise))
    m = int(np.argmin(p[: k + 1]))
    level = p[m] + threshold * (p[k] - p[m])
    j = m + int(np.nonzero(p[m:k] < level)[0][-1])
    return float(x[j] + (level - p[j]) / (p[j + 1] - p[j]) * dx)


def line_to_line(row_means, window: int = 31) -> np.ndarray:
    """A row-mean series minus its running mean over ``window`` rows (its line-to-line part),
    without the ``window // 2`` rows at each end."""
    r = np.asarray(row_means, np.float64)
    h = window // 2
    return (r - uniform_filter1d(r, window, mode="nearest"))[h:len(r) - h]
