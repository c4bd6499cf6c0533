"""The protocols plugin objects follow. Coordinates are those of :mod:`segsem_cli.transform`.

Fallback
    ``name: str`` (what ``--fallback NAME`` selects), ``description: str``, and
    ``extract(image, features, **options) -> list[FeatureResult]``.

    * ``image`` is a :class:`~segsem_cli.types.SEMImage`; ``image.pixels`` is
      the raw 2-D float32 grey-level array.
    * ``features`` are the aligned layout features
      (:class:`~segsem_cli.types.Feature`), whose ``pixels`` polygon is in
      ``(u, v)`` pixel coordinates of this image.
    * Return exactly one :class:`~segsem_cli.types.FeatureResult` per feature,
      in order, with the same ``feature_id``: a closed sub-pixel ``contour_px``
      in ``(u, v)``, ``source`` set to the fallback's name, ``confidence`` in
      [0, 1]. A feature that cannot be extracted gets ``status`` other than
      ``"ok"`` (e.g. ``"not_found"``) and ``contour_px=None``: never invent one.
    * ``options`` are the ``--fallback-opt key=value`` pairs (strings); accept
      ``**options`` and ignore the ones you do not know.

Backbone
    ``name: str``, ``description: str``, and
    ``load(model: Path | None, *, device: str = "cpu", **options) -> BackboneModel``.
    A ``BackboneModel`` has ``predict(image, features) -> list[FeatureResult]``
    with the same contract as a fallback (one result per feature, ``(u, v)``
    pixel contours, ``confidence`` in [0, 1]), and ``meta: dict`` (e.g. a
    stored confidence threshold under ``"threshold"``).

Exporter
    ``name: str`` (what ``--export NAME`` selects), ``suffix: str`` (file
    extension including the dot), ``description: str``, and
    ``export(records, path, **options) -> list[Path]``.

    * ``records`` is a list of :class:`~segsem_cli.types.ContourRecord`,
      contours already in layout nm (x right, y up).
    * ``path`` is the output file to write; write it atomically
      (:func:`segsem_cli.atomic.atomic_path`). Return the paths written.
    * Common ``options``: ``layer`` (int), ``datatype`` (int), ``grid_nm``
      (database unit in nm), ``cell`` (top cell name), ``per_image_cells``
      (bool). Ignore the ones you do not know.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

from .types import ContourRecord, Feature, FeatureResult, SEMImage


@runtime_checkable
class Fallback(Protocol):
    name: str
    description: str

    def extract(self, image: SEMImage, features: Sequence[Feature], **options: Any) -> list[FeatureResult]: ...

    # Optional, so not part of the checked protocol: ``check_options(options: dict) -> None``, called
    # by ``run_extract`` once before any image is read; raise SegsemError naming the bad key.


@runtime_checkable
class BackboneModel(Protocol):
    meta: dict

    def predict(self, image: SEMImage, features: Sequence[Feature]) -> list[FeatureResult]: ...


@runtime_checkable
class Backbone(Protocol):
    name: str
    description: str

    def load(self, model: Path | None, *, device: str = "cpu", **options: Any) -> BackboneModel: ...


@runtime_checkable
class Exporter(Protocol):
    name: str
    suffix: str
    description: str

    def export(self, records: Sequence[ContourRecord], path: Path, **options: Any) -> list[Path]: ...
