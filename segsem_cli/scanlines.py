"""Scan-line offset correction: remove the line-to-line grey-level jitter of a raster-scanned SEM image.

A CD-SEM image is written one scan line at a time (rows: the fast scan runs
along ``u``). Beam-current and detector fluctuations between lines add an offset
to each whole row. That noise is constant along a row, so the along-edge
averaging that beats pixel noise on vertical edges cannot reduce it on
horizontal edges: it shifts their threshold crossings together, row by row.

Estimate (:func:`scan_line_offsets`), on the means of ``col_bin`` (4) adjacent
columns: a row offset is the same in every column, so binning keeps all of it,
uses every pixel and quarters the work. The noise that decides what is
significant is measured on the binned image itself, so pixel noise that is
correlated along the scan (a detector's limited bandwidth) is not taken for
stripes:

1. *flat pixels*: a pixel counts where the 2-D smoothed image (Gaussian, 2 px)
   changes little along ``v`` anywhere within ``+/- 2 * sigma_lines`` rows (at
   or below the image's median of that change). Horizontal edges, rims and
   line ends are excluded, so a row that lies along an edge (a horizontal
   line/space array) is not mistaken for an offset;
2. each row's offset is the robust mean (clipped at 3 noise sigma, two
   iterations) over its flat pixels of the row minus a Gaussian average of its
   neighbouring rows (``sigma_lines``); applied twice, the second time on the
   corrected image. Rows with fewer than ``min_flat`` flat pixels get 0;
3. only the line-to-line part is estimated: offsets that drift slowly over
   many rows look like a smooth background, which the edge rule (local
   minimum and peak per profile) already ignores.

Decision (:func:`correct_scan_lines`, ``mode="auto"``): the offsets' mean square
is compared with what pixel noise alone gives the estimator
(``(1.1 * noise)^2 / flat pixels``, per row). Only when it exceeds that
``significance`` (2) times are the offsets subtracted, and then shrunk by
``1 - expected / observed`` (the estimator's noise is not added back as
stripes). Images without scan-line jitter are returned unchanged. Offsets are
rounded to 1/4 grey level. ``mode="off"`` skips the step.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .errors import SegsemError

SCAN_LINE_MODES = ("auto", "off")


@dataclass(frozen=True)
class ScanLineCorrection:
    """What :func:`correct_scan_lines` measured and did (JSON-ready with :meth:`to_dict`)."""

    applied: bool
    rms_grey: float  # RMS of the estimated line offsets (grey levels)
    noise_floor_grey: float  # RMS the estimator gives on pixel noise alone
    shrink: float  # factor applied to the offsets (0 when not applied)
    lines_measured: int  # rows with enough flat pixels

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _gauss_kernel(sigma: float) -> np.ndarray:
    r = max(1, int(np.ceil(3.0 * sigma)))
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


#: Flatness test: Gaussian smoothing (px) along u and v before the vertical change is taken, and the
#: multiple of that change's noise-and-stripe sigma below which a pixel counts as flat.
FLAT_SIGMA_U, FLAT_SIGMA_V, FLAT_K = 4.0, 3.0, 4.5


def _column_bins(a0: np.ndarray, col_bin: int) -> np.ndarray:
    """Mean of each run of ``col_bin`` adjacent columns (float32; a last partial run is dropped)."""
    w = a0.shape[1] // col_bin * col_bin
    a = np.asarray(a0[:, :w])
    out = a[:, 0::col_bin].astype(np.float32)
    for j in range(1, col_bin):
        out += a[:, j::col_bin]
    return out * np.float32(1.0 / col_bin) if col_bin > 1 else out


def scan_line_offsets(pixels: np.ndarray, *, sigma_lines: float = 3.0, min_flat: int = 32,
                      col_bin: int = 4, iterations: int = 2) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-row additive offsets of an image (grey levels), see the module docstring.

    The estimate works on the means of ``col_bin`` adjacent columns: a row offset
    is the same in every column, so binning loses none of it, and every pixel is used.

    Returns ``(offsets, flat_counts, noise)``: offsets (float32, length H; 0 for rows
    with fewer than ``min_flat`` flat pixels), the number of flat pixels used per row
    (a multiple of ``col_bin``), and the noise sigma per pixel implied by the noise of
    the binned image (``sqrt(col_bin)`` times it; the pixel noise itself when it is
    white, more when neighbouring pixels are correlated).
    """
    import cv2

    from .edges import estimate_noise

    a0 = np.asarray(pixels)
    if a0.ndim != 2:
        raise SegsemError(f"scan_line_offsets: expected a 2-D image, got shape {a0.shape}")
    if sigma_lines <= 0 or col_bin < 1 or min_flat < 1:
        raise SegsemError("scan_line_offsets: sigma_lines must be > 0, col_bin and min_flat >= 1")
    h = a0.shape[0]
    if h < 3 or a0.shape[1] // col_bin * col_bin < min_flat:
        return np.zeros(h, np.float32), np.zeros(h, np.int64), 0.0
    a = _column_bins(a0, col_bin)
    noise_b = float(estimate_noise(a, stride=4))  # of a binned pixel
    if noise_b <= 0:
        return np.zeros(h, np.float32), np.zeros(h, np.int64), 0.0
    min_bins = max(1, -(-int(min_flat) // col_bin))
    # flatness: vertical change of a smoothed copy, against what noise and stripes alone give it
    kx = _gauss_kernel(max(FLAT_SIGMA_U / col_bin, 0.5))
    ky = _gauss_kernel(FLAT_SIGMA_V)
    kd = (np.r_[ky, 0.0, 0.0] - np.r_[0.0, 0.0, ky]).astype(np.float32) / np.float32(2.0)
    gy = np.abs(cv2.sepFilter2D(a, -1, kx, kd, borderType=cv2.BORDER_REFLECT))
    reach = int(2 * np.ceil(2.0 * sigma_lines) + 1)
    gy = cv2.dilate(gy, np.ones((reach, 1), np.uint8), borderType=cv2.BORDER_REPLICATE)
    stripe_var = max(0.0, estimate_noise(a, stride=4, axis=0) ** 2 - noise_b ** 2)  # line-to-line variance, roughly
    gy_sigma = float(np.sqrt(np.sum(kd.astype(np.float64) ** 2)
                             * (noise_b ** 2 * np.sum(kx.astype(np.float64) ** 2) + stripe_var)))
    flat = (gy <= np.float32(FLAT_K * gy_sigma)).astype(np.float32)
    counts = flat.sum(axis=1)
    kern = _gauss_kernel(sigma_lines)
    clip = np.float32(3.0 * noise_b)
    total = np.zeros(h, np.float32)
    use = counts >= min_bins
    inv = np.float32(1.0) / np.maximum(counts, np.float32(1.0))
    # row minus the Gaussian average of its neighbours; after removing offsets o the same
    # residual is resid - (o - gauss(o)) per row (the filter is linear; numpy 'symmetric' is cv2's
    # BORDER_REFLECT), so it is computed once
    resid = a - cv2.sepFilter2D(a, -1, np.ones(1, np.float32), kern, borderType=cv2.BORDER_REFLECT)
    shift = np.zeros(h, np.float32)  # (total - gauss(total)) per row
    for _ in range(max(1, int(iterations))):
        o = np.zeros(h, np.float32)
        for _k in range(2):  # robust mean: residuals clipped at 3 sigma around the current estimate
            rc = np.clip(resid - (shift + o)[:, None], -clip, clip)
            o += np.einsum("ij,ij->i", rc, flat) * inv
        o[~use] = 0.0
        total += o
        shift = total - np.convolve(np.pad(total, len(kern) // 2, mode="symmetric"), kern, mode="valid")
    pixels_used = np.where(use, counts, 0).astype(np.int64) * col_bin
    return total, pixels_used, noise_b * float(np.sqrt(col_bin))


def correct_scan_lines(pixels: np.ndarray, *, mode: str = "auto", significance: float = 2.0,
                       **kwargs: Any) -> tuple[np.ndarray, ScanLineCorrection]:
    """Subtract significant scan-line offsets (see the module docstring).

    Returns ``(pixels_out, report)``: the input array itself when nothing is
    applied, else a float32 copy with the (shrunk, 1/4-grey-rounded) offsets removed.
    """
    if mode not in SCAN_LINE_MODES:
        raise SegsemError(f"scan-line correction: mode must be one of {', '.join(SCAN_LINE_MODES)}, got {mode!r}")
    if mode == "off":
        return pixels, ScanLineCorrection(False, 0.0, 0.0, 0.0, 0)
    off, counts, noise = scan_line_offsets(pixels, **kwargs)
    used = counts > 0
    n_used = int(used.sum())
    if n_used < 8:
        return pixels, ScanLineCorrection(False, 0.0, 0.0, 0.0, n_used)
    observed = float(np.mean(off[used].astype(np.float64) ** 2))
    expected = float(np.mean((1.1 * noise) ** 2 / counts[used]))  # variance of a clipped mean of n pixels
    applied = observed > significance * expected
    shrink = 1.0 - expected / observed if applied else 0.0
    report = ScanLineCorrection(bool(applied), float(np.sqrt(observed)), float(np.sqrt(expected)),
                                float(shrink), n_used)
    if not applied:
        return pixels, report
    step = np.rint(off * np.float32(4.0 * shrink)) / np.float32(4.0)  # multiples of 1/4 grey level
    return np.asarray(pixels, dtype=np.float32) - step[:, None], report


__all__ = ["SCAN_LINE_MODES", "ScanLineCorrection", "correct_scan_lines", "scan_line_offsets"]
