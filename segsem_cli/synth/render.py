"""CD-SEM image rendering with an exact, documented edge convention.

Edge convention (used by the whole project)
-------------------------------------------
The printed contour (the truth) is the resist sidewall at **mid-height**. A
resist of height ``h`` with side-wall angle ``SWA`` has a sidewall footprint
``w = h / tan(SWA)`` (40 nm at 85 deg: 3.5 nm). With ``d`` the signed distance
to the truth contour, positive into the resist, the secondary-electron signal is

* ``d < -w/2`` (substrate): ``substrate_level``;
* ``-w/2 <= d <= w/2`` (sidewall): a linear ramp from ``substrate_level`` up to
  ``edge_level`` (the bright rim at the top of the sidewall);
* ``d > w/2`` (resist top): ``resist_level + (edge_level - resist_level) *
  exp(-(d - w/2) / edge_decay_nm)``.

The truth contour is therefore where the noise-free, unblurred signal crosses
``(substrate_level + edge_level) / 2``. Resist is brighter than substrate by
default, so lines are bright on a dark substrate and holes are dark in bright
resist; which side is resist comes from the ``tone`` (``"resist"``: the
polygons are resist, ``"opening"``: they are openings in resist).

Sub-pixel exactness
-------------------
``d`` is computed exactly (nearest segment of the contour polylines, with a
KD-tree over their vertices) at the centres of all pixels where the signal is
not constant, and each pixel is the **area average** of the signal over its
square, integrated analytically: within a pixel ``d`` is taken as linear, so the
average is the signal convolved with the trapezoid that the unit square projects
to along the distance gradient. For a straight edge this is exact, so a noise-
and blur-free render crosses the mid level at the truth to machine precision.

Imaging (in this order, see :func:`render_sem`): beam blur (Gaussian PSF with
astigmatism), charging (a smooth background plus darkening near large resist
areas), shot noise (Poisson at ``dose`` secondary electrons per pixel at
``edge_level``), detector noise, scan-line noise (per-row gain and offset),
grey-level gain/offset and quantisation to 8 or 16 bits. Beam drift shifts each
row horizontally by a smooth sub-pixel amount; it is applied to the geometry
(so the label mask follows the image) and reported, while the truth stays the
printed shape.

Pixel coordinates follow :mod:`segsem_cli.transform`; all pixel <-> layout
mapping goes through :class:`~segsem_cli.transform.PixelTransform`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Sequence

import cv2
import numpy as np
from scipy.spatial import cKDTree
from shapely.geometry import Polygon

from ..errors import SegsemError
from ..transform import PixelTransform

TONES = ("resist", "opening")


@dataclass(frozen=True)
class RenderParams:
    """SEM signal and imaging parameters.

    Attributes
    ----------
    resist_height_nm, swa_deg : resist height and side-wall angle; footprint ``w = h / tan(SWA)``.
    edge_decay_nm : decay length of the edge brightness into the resist top.
    substrate_level, resist_level, edge_level : signal levels (SE yield, edge_level = 1 is the brightest).
    blur_nm : beam blur, standard deviation of the Gaussian PSF (geometric mean of the two axes).
    astig : ratio of the PSF's major to minor standard deviation (1 = round beam).
    astig_angle_deg : orientation of the major axis (degrees from +u); NaN = random per image.
    dose : detected secondary electrons per pixel at ``edge_level`` (Poisson); 0 = no shot noise.
    read_noise : detector noise, standard deviation in signal units.
    charging : amplitude of the smooth charging background (signal units).
    charging_dark : darkening where the local resist coverage is 1.
    charging_scale_nm : length over which resist coverage charges (Gaussian sigma).
    scan_offset_sigma, scan_gain_sigma : per-row offset (signal units) and relative gain jitter.
    drift_px : largest horizontal shift of a row from beam drift (pixels, smooth along rows).
    gain, offset : grey = (offset + gain * signal) * full scale (before quantisation).
    gain_jitter, offset_jitter : per-image standard deviations of gain (relative) and offset.
    bits : 8 or 16 bit output.
    """

    resist_height_nm: float = 40.0
    swa_deg: float = 85.0
    edge_decay_nm: float = 4.0
    substrate_level: float = 0.25
    resist_level: float = 0.45
    edge_level: float = 1.0
    blur_nm: float = 1.5
    astig: float = 1.0
    astig_angle_deg: float = float("nan")
    dose: float = 100.0
    read_noise: float = 0.0
    charging: float = 0.03
    charging_dark: float = 0.03
    charging_scale_nm: float = 80.0
    scan_offset_sigma: float = 0.0
    scan_gain_sigma: float = 0.0
    drift_px: float = 0.0
    gain: float = 0.6
    offset: float = 0.1
    gain_jitter: float = 0.0
    offset_jitter: float = 0.0
    bits: int = 8

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "astig_angle_deg":
                if not (math.isnan(v) or math.isfinite(v)):
                    raise SegsemError(f"render parameter 'astig_angle_deg': {v!r} is not a number")
                continue
            if not math.isfinite(v):
                raise SegsemError(f"render parameter '{f.name}': {v!r} is not a finite number")
        for name in ("resist_height_nm", "edge_decay_nm", "blur_nm", "dose", "read_noise", "charging",
                     "charging_dark", "scan_offset_sigma", "scan_gain_sigma", "drift_px", "gain_jitter",
                     "offset_jitter"):
            if getattr(self, name) < 0:
                raise SegsemError(f"render parameter '{name}': {getattr(self, name)!r} must be >= 0")
        if not 0 < self.swa_deg <= 90:
            raise SegsemError(f"render parameter 'swa_deg': {self.swa_deg!r} must be in (0, 90]")
        if self.astig < 1:
            raise SegsemError(f"render parameter 'astig': {self.astig!r} must be >= 1 (major/minor ratio)")
        if self.charging_scale_nm <= 0:
            raise SegsemError(f"render parameter 'charging_scale_nm': {self.charging_scale_nm!r} must be > 0")
        if self.gain <= 0:
            raise SegsemError(f"render parameter 'gain': {self.gain!r} must be > 0")
        if self.bits not in (8, 16):
            raise SegsemError(f"render parameter 'bits': {self.bits!r} must be 8 or 16")

    @property
    def footprint_nm(self) -> float:
        """Sidewall footprint ``w = h / tan(SWA)`` in nm."""
        if self.swa_deg >= 90:
            return 0.0
        return self.resist_height_nm / math.tan(math.radians(self.swa_deg))

    def margin_nm(self) -> float:
        """How far beyond the image a contour still changes pixel values."""
        sig = self.blur_nm * math.sqrt(self.astig)
        return self.footprint_nm / 2 + 9 * self.edge_decay_nm + 5 * sig + self.drift_px + 2.0


@dataclass(frozen=True)
class CleanRender:
    """A noise-free render: ``signal`` (H, W) float32 pixel-area averages before blur,
    ``labels`` (H, W) uint16 instance ids at pixel centres (0 = background, i = ``shapes[i-1]``),
    ``resist`` (H, W) bool resist at pixel centres, ``distance_px`` (H, W) float32 signed
    distance into the resist (exact where ``|d|`` matters, NaN where the signal is constant)."""

    signal: np.ndarray
    labels: np.ndarray
    resist: np.ndarray
    distance_px: np.ndarray


@dataclass(frozen=True)
class SEMRender:
    """A rendered SEM image: ``image`` (uint8/uint16), the ``clean`` render it came from,
    and ``meta`` (drift per row, PSF, gain/offset actually used)."""

    image: np.ndarray
    clean: CleanRender
    meta: dict


# ----------------------------------------------------------------------------
# the edge profile and its analytic pixel average
# ----------------------------------------------------------------------------

def edge_profile(d_nm, params: RenderParams) -> np.ndarray:
    """The unblurred signal as a function of signed distance ``d`` (nm, positive into resist)."""
    d = np.asarray(d_nm, dtype=np.float64)
    w = max(params.footprint_nm, 1e-9)
    lam = max(params.edge_decay_nm, 1e-9)
    s, p, r = params.substrate_level, params.edge_level, params.resist_level
    out = np.full(d.shape, s, dtype=np.float64)
    ramp = (d >= -w / 2) & (d <= w / 2)
    out[ramp] = s + (p - s) * (d[ramp] + w / 2) / w
    top = d > w / 2
    out[top] = r + (p - r) * np.exp(-(d[top] - w / 2) / lam)
    return out


def _g2(x: np.ndarray, a: float, w: float, lam: float, s: float, p: float, r: float) -> np.ndarray:
    """Second antiderivative of ``profile - s`` (zero below the foot ``a = -w/2``), distances in px."""
    b = a + w
    k = (p - s) / w
    out = np.zeros_like(x)
    m = (x >= a) & (x <= b)
    y = x[m] - a
    out[m] = k * y * y * y / 6.0
    m = x > b
    y = x[m] - b
    g1b = k * w * w / 2.0
    g2b = k * w * w * w / 6.0
    out[m] = g2b + g1b * y + (r - s) * y * y / 2.0 + (p - r) * lam * (y - lam * (-np.expm1(-y / lam)))
    return out


def _pixel_average(d: np.ndarray, gu: np.ndarray, gv: np.ndarray, *, w: float, lam: float,
                   s: float, p: float, r: float) -> np.ndarray:
    """Area average of the profile over unit pixels with centre distance ``d`` (px) and unit gradient ``g``."""
    a_ = np.maximum(np.abs(gu), 1e-3)
    b_ = np.maximum(np.abs(gv), 1e-3)
    h1 = (a_ + b_) / 2
    h2 = (a_ - b_) / 2
    a0 = -w / 2
    tot = (_g2(d + h1, a0, w, lam, s, p, r) - _g2(d + h2, a0, w, lam, s, p, r)
           - _g2(d - h2, a0, w, lam, s, p, r) + _g2(d - h1, a0, w, lam, s, p, r))
    return s + tot / (a_ * b_)


# ----------------------------------------------------------------------------
# geometry -> exact signed distance at pixel centres
# ----------------------------------------------------------------------------

def _ring_arrays(shapes_px: Sequence[tuple[np.ndarray, list[np.ndarray]]], max_seg: float):
    """Stack all rings (densified to segments <= max_seg px), oriented with the feature on the left.

    Returns vertices (n, 2), next index (n,), prev index (n,), feature index (n,).
    """
    verts, nxt, prv, fid = [], [], [], []
    base = 0
    for k, (ext, holes) in enumerate(shapes_px):
        for j, ring in enumerate([ext, *holes]):
            ring = np.asarray(ring, dtype=np.float64)
            if len(ring) > 1 and np.allclose(ring[0], ring[-1]):
                ring = ring[:-1]
            if len(ring) < 3:
                continue
            area2 = np.sum(ring[:, 0] * np.roll(ring[:, 1], -1) - np.roll(ring[:, 0], -1) * ring[:, 1])
            want_positive = j == 0  # exterior: interior on the left <=> positive shoelace area in (u, v)
            if (area2 > 0) != want_positive:
                ring = ring[::-1]
            dense = _densify(ring, max_seg)
            n = len(dense)
            idx = np.arange(n)
            verts.append(dense)
            nxt.append(base + (idx + 1) % n)
            prv.append(base + (idx - 1) % n)
            fid.append(np.full(n, k, dtype=np.int64))
            base += n
    if not verts:
        z = np.zeros(0, dtype=np.int64)
        return np.zeros((0, 2)), z, z, z
    return np.concatenate(verts), np.concatenate(nxt), np.concatenate(prv), np.concatenate(fid)


def _seg_dist(p, a, b):
    """Distance from points p to segments a-b; returns (dist, t, foot)."""
    ab = b - a
    l2 = np.einsum("ij,ij->i", ab, ab)
    l2 = np.where(l2 > 0, l2, 1.0)
    t = np.clip(np.einsum("ij,ij->i", p - a, ab) / l2, 0.0, 1.0)
    foot = a + ab * t[:, None]
    diff = p - foot
    return np.hypot(diff[:, 0], diff[:, 1]), t, foot


def _signed_distance(points: np.ndarray, verts, nxt, prv, tree):
    """Exact signed distance (positive on the left of the rings = inside features) of points to the rings.

    Returns (d, gu, gv, vertex) with (gu, gv) the unit gradient of d and the nearest vertex index.
    """
    _, j = tree.query(points, k=1)
    j = np.asarray(j, dtype=np.int64)
    a0, b0 = verts[prv[j]], verts[j]  # segment prev(j) -> j
    a1, b1 = verts[j], verts[nxt[j]]  # segment j -> next(j)
    d0, t0, f0 = _seg_dist(points, a0, b0)
    d1, t1, f1 = _seg_dist(points, a1, b1)
    use1 = d1 < d0
    dist = np.where(use1, d1, d0)
    foot = np.where(use1[:, None], f1, f0)
    t = np.where(use1, t1, t0)
    sa = np.where(use1[:, None], a1, a0)
    sb = np.where(use1[:, None], b1, b0)
    tang = sb - sa
    tl = np.hypot(tang[:, 0], tang[:, 1])
    tl = np.where(tl > 0, tl, 1.0)
    left = np.stack([-tang[:, 1], tang[:, 0]], axis=1) / tl[:, None]
    # foot at a vertex: use the pseudo-normal (sum of the two adjacent unit left normals)
    at_start = t <= 0.0
    at_end = t >= 1.0
    vidx = np.where(use1, np.where(at_start, j, nxt[j]), np.where(at_start, prv[j], j))
    at_vertex = at_start | at_end
    if np.any(at_vertex):
        vv = vidx[at_vertex]
        pa, pc, pb = verts[prv[vv]], verts[vv], verts[nxt[vv]]
        e0 = pc - pa
        e1 = pb - pc
        n0 = np.stack([-e0[:, 1], e0[:, 0]], axis=1) / np.maximum(np.hypot(e0[:, 0], e0[:, 1]), 1e-12)[:, None]
        n1 = np.stack([-e1[:, 1], e1[:, 0]], axis=1) / np.maximum(np.hypot(e1[:, 0], e1[:, 1]), 1e-12)[:, None]
        left[at_vertex] = n0 + n1
    diff = points - foot
    side = np.einsum("ij,ij->i", diff, left)
    sign = np.where(side >= 0, 1.0, -1.0)
    d = sign * dist
    far = dist > 1e-9
    safe = np.where(far, dist, 1.0)
    gu = np.where(far, sign * diff[:, 0] / safe, left[:, 0])
    gv = np.where(far, sign * diff[:, 1] / safe, left[:, 1])
    gn = np.hypot(gu, gv)
    gn = np.where(gn > 0, gn, 1.0)
    return d, gu / gn, gv / gn, j


def _densify(ring: np.ndarray, max_seg: float) -> np.ndarray:
    """Insert vertices so that no segment of the closed ring is longer than ``max_seg``."""
    seg = np.roll(ring, -1, axis=0) - ring
    nsub = np.maximum(1, np.ceil(np.hypot(seg[:, 0], seg[:, 1]) / max_seg).astype(int))
    if np.all(nsub == 1):
        return ring
    rep = np.repeat(np.arange(len(ring)), nsub)
    start = np.repeat(np.cumsum(nsub) - nsub, nsub)
    frac = (np.arange(rep.size) - start) / np.repeat(nsub, nsub)
    return ring[rep] + seg[rep] * frac[:, None]


def polygons_to_pixels(shapes: Sequence[Polygon], transform: PixelTransform,
                       row_shift_px: np.ndarray | None = None) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """Map polygons (layout nm) to pixel rings ``(exterior, [holes])`` in ``(u, v)``.

    ``row_shift_px`` (length H) shifts every point horizontally by the drift of
    the row it falls on (linear interpolation between row centres).
    """
    out = []
    h = transform.shape[0]
    for poly in shapes:
        rings = [np.asarray(poly.exterior.coords)[:-1]] + [np.asarray(r.coords)[:-1] for r in poly.interiors]
        px = []
        for ring in rings:
            if ring.shape[0] < 3:
                px.append(np.zeros((0, 2)))
                continue
            uv = transform.to_pixel(ring)
            if row_shift_px is not None:
                uv = _densify(uv, 1.0)  # the shift varies along long edges: give them vertices on every row
                uv[:, 0] += np.interp(uv[:, 1] - 0.5, np.arange(h), row_shift_px)
            px.append(uv)
        out.append((px[0], px[1:]))
    return out


def _fill(mask: np.ndarray, rings: list[np.ndarray], value: int) -> None:
    """cv2 scan-fill of rings (even-odd), pixel centre (c + .5, r + .5) = cv2 integer point (c, r)."""
    pts = [np.round((r - 0.5) * 256).astype(np.int32) for r in rings if len(r) >= 3]
    if pts:
        cv2.fillPoly(mask, pts, value, lineType=cv2.LINE_8, shift=8)


def render_clean(shapes: Sequence[Polygon], transform: PixelTransform, *, params: RenderParams,
                 tone: str = "resist", row_shift_px: np.ndarray | None = None) -> CleanRender:
    """Render the noise-free, unblurred pixel-area-averaged SEM signal of printed shapes.

    Parameters
    ----------
    shapes : printed polygons in layout nm (the truth); they must not overlap.
    transform : the TRUE pixel transform of the image (nominal centre + stage offset).
    params : signal parameters (levels, footprint, decay).
    tone : ``"resist"`` (shapes are resist) or ``"opening"`` (shapes are holes in resist).
    row_shift_px : optional per-row horizontal drift (pixels) applied to the geometry.

    Returns
    -------
    CleanRender. Labels number the shapes 1..len(shapes) at pixel centres.
    """
    if tone not in TONES:
        raise SegsemError(f"tone: {tone!r} must be one of {', '.join(TONES)}")
    h, w_img = transform.shape
    if len(shapes) >= 65535:
        raise SegsemError(f"render: {len(shapes)} features in one image; at most 65534 fit a uint16 label mask")
    px = float(transform.pixel_nm)
    w = max(params.footprint_nm / px, 1e-6)
    lam = max(params.edge_decay_nm / px, 1e-6)
    s_lvl, p_lvl, r_lvl = params.substrate_level, params.edge_level, params.resist_level
    inside_val = 1.0 if tone == "resist" else -1.0

    shapes_px = polygons_to_pixels(shapes, transform, row_shift_px)
    reach_res = w / 2 + 9 * lam + 2.5  # beyond: resist level to 1e-4
    reach_sub = w / 2 + 2.5           # beyond: substrate level exactly
    # work on a padded grid so that contours just outside the image still reach its border pixels
    pad = int(math.ceil(max(reach_res, reach_sub))) + 2
    shifted = [(ext + pad, [hh + pad for hh in holes]) for ext, holes in shapes_px]
    hp, wp = h + 2 * pad, w_img + 2 * pad
    labels = np.zeros((hp, wp), dtype=np.uint16)
    for k, (ext, holes) in enumerate(shifted):
        _fill(labels, [ext], k + 1)
        if holes:
            _fill(labels, holes, 0)
    inside_p = labels > 0
    labels = labels[pad:pad + h, pad:pad + w_img].copy()
    inside = labels > 0

    signal = np.where(inside == (tone == "resist"), np.float32(r_lvl), np.float32(s_lvl)).astype(np.float32)
    dist = np.full((h, w_img), np.nan, dtype=np.float32)

    verts, nxt, prv, fid = _ring_arrays(shifted, max_seg=1.0)
    if len(verts) == 0:
        return CleanRender(signal, labels, inside == (tone == "resist"), dist)

    # coarse distance to the boundary (to the nearest pixel centre of the other side)
    u8 = inside_p.astype(np.uint8)
    din = cv2.distanceTransform(u8, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[pad:pad + h, pad:pad + w_img]
    dout = cv2.distanceTransform(1 - u8, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[pad:pad + h, pad:pad + w_img]
    if tone == "resist":
        near = (inside & (din <= reach_res)) | (~inside & (dout <= reach_sub))
    else:
        near = (inside & (din <= reach_sub)) | (~inside & (dout <= reach_res))
    rr, cc = np.nonzero(near)
    if rr.size:
        pts = np.stack([cc + (0.5 + pad), rr + (0.5 + pad)], axis=1).astype(np.float64)
        tree = cKDTree(verts, leafsize=16)
        d, gu, gv, j = _signed_distance(pts, verts, nxt, prv, tree)
        dres = d * inside_val
        vals = _pixel_average(dres, gu, gv, w=w, lam=lam, s=s_lvl, p=p_lvl, r=r_lvl)
        signal[rr, cc] = vals.astype(np.float32)
        dist[rr, cc] = dres.astype(np.float32)
        # exact membership at pixel centres near the boundary
        edge = np.abs(d) < 1.5
        er, ec = rr[edge], cc[edge]
        lab = np.where(d[edge] > 0, fid[j[edge]] + 1, 0).astype(np.uint16)
        labels[er, ec] = lab
        inside[er, ec] = lab > 0
    return CleanRender(signal, labels, inside == (tone == "resist"), dist)


# ----------------------------------------------------------------------------
# imaging
# ----------------------------------------------------------------------------

def psf_kernel(sigma_major_px: float, sigma_minor_px: float, angle_rad: float) -> np.ndarray:
    """A normalised 2-D Gaussian kernel (rows = v, columns = u), major axis at ``angle_rad`` from +u."""
    smax = max(sigma_major_px, sigma_minor_px)
    rad = max(1, int(math.ceil(4 * smax)))
    y, x = np.mgrid[-rad:rad + 1, -rad:rad + 1].astype(np.float64)
    c, s = math.cos(angle_rad), math.sin(angle_rad)
    a = c * x + s * y
    b = -s * x + c * y
    k = np.exp(-0.5 * ((a / max(sigma_major_px, 1e-6)) ** 2 + (b / max(sigma_minor_px, 1e-6)) ** 2))
    return (k / k.sum()).astype(np.float32)


def apply_psf(img: np.ndarray, sigma_major_px: float, sigma_minor_px: float, angle_rad: float) -> np.ndarray:
    """Convolve with the (possibly astigmatic) Gaussian beam (mirror borders)."""
    if max(sigma_major_px, sigma_minor_px) < 0.05:
        return img.astype(np.float32, copy=True)
    img = img.astype(np.float32, copy=False)
    ca, sa = abs(math.cos(angle_rad)), abs(math.sin(angle_rad))
    if abs(sigma_major_px - sigma_minor_px) < 1e-6 or min(ca, sa) < 1e-6:
        sx, sy = (sigma_major_px, sigma_minor_px) if ca >= sa else (sigma_minor_px, sigma_major_px)
        kx = 2 * int(math.ceil(4 * sx)) + 1
        ky = 2 * int(math.ceil(4 * sy)) + 1
        return cv2.GaussianBlur(img, (kx, ky), sigmaX=sx, sigmaY=sy, borderType=cv2.BORDER_REFLECT)
    return cv2.filter2D(img, -1, psf_kernel(sigma_major_px, sigma_minor_px, angle_rad),
                        borderType=cv2.BORDER_REFLECT)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], cells: int = 4) -> np.ndarray:
    """A smooth random field of unit peak amplitude: a random plane plus bicubic-upsampled noise."""
    h, w = shape
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    field = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    gx, gy = rng.standard_normal(2)
    u = np.linspace(-1, 1, w, dtype=np.float32)[None, :]
    v = np.linspace(-1, 1, h, dtype=np.float32)[:, None]
    field = field + np.float32(gx) * u + np.float32(gy) * v
    field -= field.mean()
    peak = float(np.abs(field).max())
    return field / peak if peak > 0 else field


def _coverage(resist: np.ndarray, sigma_px: float) -> np.ndarray:
    """Local resist coverage: resist mask blurred at a large scale (computed on a coarse grid)."""
    h, w = resist.shape
    f = max(1, int(sigma_px // 4))
    small = cv2.resize(resist.astype(np.float32), (max(1, w // f), max(1, h // f)), interpolation=cv2.INTER_AREA)
    s = sigma_px / f
    k = 2 * int(math.ceil(3 * s)) + 1
    small = cv2.GaussianBlur(small, (k, k), sigmaX=s, sigmaY=s, borderType=cv2.BORDER_REFLECT)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def drift_profile(rng: np.random.Generator, rows: int, amplitude_px: float) -> np.ndarray | None:
    """Smooth horizontal drift per row (pixels): a slow random curve with peak ``|amplitude_px|``."""
    if amplitude_px <= 0:
        return None
    t = np.linspace(0.0, 1.0, rows)
    curve = rng.normal() * t
    for k in (1, 2, 3):
        curve = curve + rng.normal() / k * np.sin(math.pi * k * t + rng.uniform(0, 2 * math.pi))
    curve -= curve.mean()
    peak = float(np.abs(curve).max())
    return (curve / peak * amplitude_px) if peak > 0 else np.zeros(rows)


def render_sem(shapes: Sequence[Polygon], transform: PixelTransform, *, params: RenderParams,
               rng: np.random.Generator, tone: str = "resist") -> SEMRender:
    """Render a full CD-SEM image of printed shapes (see the module docstring for the model).

    Parameters
    ----------
    shapes : printed polygons (truth) in layout nm, non-overlapping.
    transform : the TRUE transform of the image (nominal centre + stage offset).
    params : signal and imaging parameters.
    rng : source of all randomness (drift, PSF angle, charging, noise).
    tone : ``"resist"`` or ``"opening"``.

    Returns
    -------
    SEMRender with a uint8 or uint16 ``image`` (H, W) and its clean render.
    """
    h, w = transform.shape
    px = float(transform.pixel_nm)
    # all random draws in a fixed order
    row_shift = drift_profile(rng, h, params.drift_px)
    angle = (rng.uniform(0.0, math.pi) if math.isnan(params.astig_angle_deg)
             else math.radians(params.astig_angle_deg))
    gain = params.gain * (1.0 + params.gain_jitter * rng.standard_normal())
    gain = max(gain, 0.05)
    offset = params.offset + params.offset_jitter * rng.standard_normal()

    clean = render_clean(shapes, transform, params=params, tone=tone, row_shift_px=row_shift)
    sig = params.blur_nm / px
    s_major, s_minor = sig * math.sqrt(params.astig), sig / math.sqrt(params.astig)
    img = apply_psf(clean.signal, s_major, s_minor, angle)

    if params.charging > 0:
        img += np.float32(params.charging) * _smooth_field(rng, (h, w))
    if params.charging_dark > 0:
        img -= np.float32(params.charging_dark) * _coverage(clean.resist, params.charging_scale_nm / px)
    np.maximum(img, 0.0, out=img)
    if params.dose > 0:
        lam = img.astype(np.float64) * params.dose
        img = (rng.poisson(lam) / params.dose).astype(np.float32)
    if params.read_noise > 0:
        img += rng.normal(0.0, params.read_noise, size=img.shape).astype(np.float32)
    if params.scan_gain_sigma > 0 or params.scan_offset_sigma > 0:
        rg = (1.0 + params.scan_gain_sigma * rng.standard_normal(h)).astype(np.float32)
        ro = (params.scan_offset_sigma * rng.standard_normal(h)).astype(np.float32)
        img = img * rg[:, None] + ro[:, None]
    full = float(2 ** params.bits - 1)
    grey = (np.float32(offset) + np.float32(gain) * img) * np.float32(full)
    np.clip(np.rint(grey), 0, full, out=grey)
    image = grey.astype(np.uint8 if params.bits == 8 else np.uint16)
    meta = {
        "psf_sigma_px": [s_major, s_minor],
        "psf_angle_deg": math.degrees(angle),
        "gain": gain,
        "offset": offset,
        "row_shift_px": None if row_shift is None else [round(float(x), 4) for x in row_shift],
    }
    return SEMRender(image, clean, meta)


__all__ = [
    "CleanRender", "RenderParams", "SEMRender", "TONES", "apply_psf", "drift_profile", "edge_profile",
    "polygons_to_pixels", "psf_kernel", "render_clean", "render_sem",
]
