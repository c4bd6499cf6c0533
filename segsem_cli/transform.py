"""The pixel <-> layout transform. This module is the only place that knows it.

Conventions (used everywhere in segsem)
---------------------------------------
* Continuous pixel coordinates ``(u, v)``: ``u`` grows to the right (columns),
  ``v`` grows downwards (rows). Pixel ``(row r, column c)`` covers
  ``[c, c+1) x [r, r+1)``, so its centre is at ``(c + 0.5, r + 0.5)``.
  Contours in pixel space are ``(N, 2)`` float arrays of ``(u, v)``.
* Layout coordinates ``(x, y)`` are in nanometres, ``y`` up.
* For an image of width ``W`` and height ``H`` (pixels), pixel size ``p`` (nm)
  and image centre ``(Xc, Yc)`` in layout nm::

      x = Xc + (u - W/2) * p
      y = Yc - (v - H/2) * p

* Alignment refines the nominal centre with an offset ``(dx, dy)`` in nm and
  optionally a small rotation ``theta`` (radians, counter-clockwise in layout)
  about the image centre::

      a = (u - W/2) * p ;  b = -(v - H/2) * p
      x = Xc + dx + cos(theta) a - sin(theta) b
      y = Yc + dy + sin(theta) a + cos(theta) b
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np


@dataclass(frozen=True)
class PixelTransform:
    """Maps pixel ``(u, v)`` to layout ``(x, y)`` nm and back.

    Parameters
    ----------
    center_nm : nominal layout coordinate of the image centre ``(Xc, Yc)``.
    pixel_nm : pixel size in nm (square pixels).
    shape : image shape ``(H, W)`` in pixels.
    offset_nm : alignment correction ``(dx, dy)`` in nm added to the centre.
    rotation_rad : alignment rotation about the image centre.
    """

    center_nm: tuple[float, float]
    pixel_nm: float
    shape: tuple[int, int]
    offset_nm: tuple[float, float] = (0.0, 0.0)
    rotation_rad: float = 0.0

    def __post_init__(self):
        if not (self.pixel_nm > 0 and math.isfinite(self.pixel_nm)):
            raise ValueError(f"pixel size must be a positive number of nm, got {self.pixel_nm!r}")

    @property
    def true_center_nm(self) -> tuple[float, float]:
        """The aligned image centre ``(Xc + dx, Yc + dy)``."""
        return (self.center_nm[0] + self.offset_nm[0], self.center_nm[1] + self.offset_nm[1])

    def with_offset(self, offset_nm: tuple[float, float], rotation_rad: float | None = None) -> "PixelTransform":
        """A copy with the given alignment offset (and rotation, if given)."""
        return replace(
            self,
            offset_nm=(float(offset_nm[0]), float(offset_nm[1])),
            rotation_rad=self.rotation_rad if rotation_rad is None else float(rotation_rad),
        )

    def to_layout(self, uv) -> np.ndarray:
        """Pixel ``(u, v)`` array of shape ``(..., 2)`` to layout ``(x, y)`` nm."""
        uv = np.asarray(uv, dtype=np.float64)
        h, w = self.shape
        a = (uv[..., 0] - w / 2.0) * self.pixel_nm
        b = -(uv[..., 1] - h / 2.0) * self.pixel_nm
        c, s = math.cos(self.rotation_rad), math.sin(self.rotation_rad)
        xc, yc = self.true_center_nm
        return np.stack([xc + c * a - s * b, yc + s * a + c * b], axis=-1)

    def to_pixel(self, xy) -> np.ndarray:
        """Layout ``(x, y)`` nm array of shape ``(..., 2)`` to pixel ``(u, v)``."""
        xy = np.asarray(xy, dtype=np.float64)
        h, w = self.shape
        xc, yc = self.true_center_nm
        dx = xy[..., 0] - xc
        dy = xy[..., 1] - yc
        c, s = math.cos(self.rotation_rad), math.sin(self.rotation_rad)
        a = c * dx + s * dy
        b = -s * dx + c * dy
        return np.stack([a / self.pixel_nm + w / 2.0, -b / self.pixel_nm + h / 2.0], axis=-1)

    def field_of_view_nm(self, margin_px: float = 0.0) -> tuple[float, float, float, float]:
        """Axis-aligned bounding box ``(xmin, ymin, xmax, ymax)`` of the image in layout nm.

        ``margin_px`` grows the box on every side (e.g. by the largest stage error
        expected, so that features that slide into view after alignment are kept).
        """
        h, w = self.shape
        m = margin_px
        corners = np.array([[-m, -m], [w + m, -m], [w + m, h + m], [-m, h + m]], dtype=float)
        xy = self.to_layout(corners)
        return (float(xy[:, 0].min()), float(xy[:, 1].min()), float(xy[:, 0].max()), float(xy[:, 1].max()))
