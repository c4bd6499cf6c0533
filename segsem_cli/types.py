"""Small immutable types that carry data between the pipeline stages.

read -> align -> prompt -> segment -> judge -> fall back -> refine -> measure -> export

All contours in pixel space are ``(N, 2)`` arrays of ``(u, v)`` (see
:mod:`segsem_cli.transform` for the convention); all contours in layout space
are ``(N, 2)`` arrays of ``(x, y)`` in nm. Contours are closed implicitly (the
last vertex is not a repeat of the first).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .transform import PixelTransform


@dataclass(frozen=True)
class SEMImage:
    """One SEM image with its place in the layout.

    ``pixels`` is a 2-D float32 array (row, column) with the grey levels as
    read (not rescaled). ``transform`` maps its pixels to layout nm.
    ``meta`` holds the manifest row's extra columns (passed through to outputs).
    """

    path: Path
    pixels: np.ndarray
    transform: PixelTransform
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.pixels.shape)  # type: ignore[return-value]


@dataclass(frozen=True)
class Feature:
    """A layout feature seen in one image.

    ``feature_id`` is stable within a run (``<image>:<n>`` numbering of the
    clipped layout polygons). ``layout_nm`` is the design polygon (exterior,
    ``(N, 2)`` x/y nm, clipped to the field of view) and ``pixels`` the same
    polygon mapped to ``(u, v)`` with the image's (aligned) transform.
    ``clipped`` is True when the polygon runs out of the field of view.
    """

    feature_id: str
    layout_nm: np.ndarray
    pixels: np.ndarray
    clipped: bool = False


@dataclass(frozen=True)
class FeatureResult:
    """What a backbone or fallback made of one feature.

    ``contour_px`` is a closed sub-pixel contour in ``(u, v)`` pixels, or None
    when ``status`` is not ``"ok"``. ``source`` names the plugin that produced
    it; ``confidence`` is in [0, 1]. ``holes_px`` are interior boundaries.
    """

    feature_id: str
    contour_px: np.ndarray | None
    source: str
    confidence: float
    status: str = "ok"
    holes_px: tuple[np.ndarray, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.contour_px is not None


@dataclass(frozen=True)
class ContourRecord:
    """An exported contour in layout nm, with its provenance (what exporters receive)."""

    image: str
    feature_id: str
    xy_nm: np.ndarray
    source: str
    confidence: float
    holes_nm: tuple[np.ndarray, ...] = ()
