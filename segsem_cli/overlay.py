"""Overlay PNGs: the SEM image in grey with contours drawn in colour.

Contours are pixel-space ``(N, 2)`` arrays of ``(u, v)`` (see
:mod:`segsem_cli.transform`: pixel ``(r, c)`` covers ``[c, c+1) x [r, r+1)``).
They are drawn anti-aliased with sub-pixel precision (``cv2.polylines`` with
4 fractional bits) on the image upscaled ``scale`` times (nearest neighbour,
so the real pixels stay visible). In the upscaled image the point ``(u, v)``
lands at ``(u * scale - 1/2, v * scale - 1/2)`` in OpenCV's
pixel-centre coordinates.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .atomic import atomic_path
from .errors import SegsemError

#: Named colours (BGR, as OpenCV wants them).
COLORS: dict[str, tuple[int, int, int]] = {
    "green": (0, 200, 0),
    "red": (0, 0, 255),
    "blue": (255, 128, 0),
    "yellow": (0, 220, 255),
    "magenta": (255, 0, 255),
    "cyan": (255, 255, 0),
    "orange": (0, 140, 255),
    "white": (255, 255, 255),
}
_SHIFT = 4


def to_gray8(pixels: np.ndarray, *, lo_pct: float = 1.0, hi_pct: float = 99.0) -> np.ndarray:
    """Percentile-normalise a 2-D image to uint8 (``lo_pct`` -> 0, ``hi_pct`` -> 255)."""
    a = np.asarray(pixels, dtype=np.float64)
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"expected a non-empty 2-D image, got shape {a.shape}")
    finite = a[np.isfinite(a)]
    if finite.size == 0:
        return np.zeros(a.shape, np.uint8)
    lo, hi = np.percentile(finite, [lo_pct, hi_pct])
    if hi <= lo:
        lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        return np.full(a.shape, 128, np.uint8)
    out = (np.nan_to_num(a, nan=lo) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _color(c: Any) -> tuple[int, int, int] | None:
    if isinstance(c, str):
        return COLORS.get(c.lower())
    if isinstance(c, (tuple, list)) and len(c) == 3 and all(isinstance(v, (int, np.integer)) for v in c):
        return tuple(int(v) for v in c)  # type: ignore[return-value]
    return None


def _layers(contours_px_by_color: Mapping[Any, Any]) -> list[tuple[str, tuple[int, int, int], list]]:
    layers = []
    for key, val in contours_px_by_color.items():
        if isinstance(val, tuple) and len(val) == 2 and _color(val[0]) is not None:
            label, color, contours = str(key), _color(val[0]), val[1]
        else:
            color = _color(key)
            if color is None:
                raise ValueError(f"overlay colour {key!r}: use one of {', '.join(COLORS)} or a BGR tuple")
            label, contours = (key if isinstance(key, str) else ""), val
        layers.append((label, color, list(contours or [])))
    return layers


def render_overlay(
    pixels: np.ndarray,
    contours_px_by_color: Mapping[Any, Any],
    *,
    scale: int = 2,
    thickness: int = 1,
    legend: bool = True,
) -> np.ndarray:
    """Return the overlay as a BGR uint8 array of shape ``(H*scale, W*scale, 3)``.

    ``contours_px_by_color`` maps either a colour (name from :data:`COLORS`
    or a BGR tuple) to a list of contours, or a label to ``(colour, contours)``;
    labels are written as a legend in the top-left corner. Contours are
    ``(N, 2)`` ``(u, v)`` pixel arrays (closed); ``None`` or empty ones are skipped.
    """
    import cv2

    if not isinstance(scale, (int, np.integer)) or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    gray = to_gray8(pixels)
    if scale > 1:
        gray = cv2.resize(gray, (gray.shape[1] * scale, gray.shape[0] * scale), interpolation=cv2.INTER_NEAREST)
    img = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    layers = _layers(contours_px_by_color)
    f = float(1 << _SHIFT)
    for _, color, contours in layers:
        pts = []
        for c in contours:
            if c is None:
                continue
            a = np.asarray(c, dtype=np.float64)
            if a.ndim != 2 or a.shape[1] != 2 or len(a) < 2 or not np.isfinite(a).all():
                continue
            pts.append(np.rint((a * scale - 0.5) * f).astype(np.int32).reshape(-1, 1, 2))
        if pts:
            cv2.polylines(img, pts, True, color, thickness=thickness, lineType=cv2.LINE_AA, shift=_SHIFT)
    if legend:
        y = 14
        for label, color, _ in layers:
            if label:
                cv2.putText(img, label, (5, y), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 3, cv2.LINE_AA)
                cv2.putText(img, label, (5, y), cv2.FONT_HERSHEY_SIMPLEX, 0.4, color, 1, cv2.LINE_AA)
                y += 14
    return img


def draw_overlay(
    pixels: np.ndarray,
    contours_px_by_color: Mapping[Any, Any],
    path: str | Path,
    *,
    scale: int = 2,
    thickness: int = 1,
    legend: bool = True,
) -> Path:
    """Write an overlay PNG atomically (see :func:`render_overlay` for the arguments).

    Examples
    --------
    >>> draw_overlay(img, {"truth": ("green", truth_px), "pred": ("red", pred_px)}, "o.png")  # doctest: +SKIP
    """
    import cv2

    img = render_overlay(pixels, contours_px_by_color, scale=scale, thickness=thickness, legend=legend)
    path = Path(path)
    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), img):
            raise SegsemError(f"{path}: could not write the overlay PNG")
    return path


def contours_to_px(transform, rings_nm: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Map layout-nm rings to ``(u, v)`` pixels with the image's transform."""
    return [transform.to_pixel(np.asarray(r, dtype=np.float64)) for r in rings_nm]
