"""Building SAM2 models and loading/saving checkpoints safely.

Configs
-------
``config`` is either a name from :data:`CONFIG_NAMES` (the official configs
shipped in the ``sam2`` package, e.g. ``sam2.1_hiera_t``, plus segsem's own
``segsem-micro``) or the path of a SAM2 model YAML (same layout as the official
ones: a top-level ``model:`` with ``_target_: sam2.modeling.sam2_base.SAM2Base``).
Every config goes through the same code path: ``OmegaConf.load`` -> overrides
-> ``hydra.utils.instantiate``. (``sam2.build_sam.build_sam2`` additionally
switches on the decoder's "dynamic multimask via stability" fallback; segsem
does not, because its prompts are boxes and it trains the single-mask output.)

Image size
----------
``image_size`` overrides ``model.image_size`` and the RoPE ``feat_sizes`` of
the memory attention (``[S/16, S/16]``). It must be a multiple of 32. The
backbone feature maps are then ``S/4``, ``S/8``, ``S/16`` and the mask logits
``S/4`` (256 for the official 1024).

Checkpoints
-----------
Loaded with ``torch.load(path, map_location=..., weights_only=True)`` only: a
file that needs anything beyond tensors and plain containers (a pickle with a
code-running object) is refused with :class:`~segsem_cli.errors.SegsemError`
and never executed. Accepted: the official ``{'model': state_dict}``, segsem's
``{'model': state_dict, 'segsem': metadata}`` (metadata of plain types), or a
bare state dict.
"""
from __future__ import annotations

import contextlib
import importlib.resources
from pathlib import Path
from typing import Any, Iterator

import torch

from ..atomic import atomic_path
from ..errors import SegsemError

SEGSEM_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

# name -> (where, relative path): "sam2" = inside the sam2 package, "segsem" = segsem_cli/configs
CONFIG_NAMES: dict[str, tuple[str, str]] = {
    **{f"sam2.1_hiera_{s}": ("sam2", f"configs/sam2.1/sam2.1_hiera_{s}.yaml") for s in ("t", "s", "b+", "l")},
    **{f"sam2_hiera_{s}": ("sam2", f"configs/sam2/sam2_hiera_{s}.yaml") for s in ("t", "s", "b+", "l")},
    "segsem-micro": ("segsem", "segsem_micro.yaml"),
}

# Checkpoint metadata key used by segsem.
META_KEY = "segsem"


def config_names() -> list[str]:
    """The config names :func:`resolve_config` knows."""
    return sorted(CONFIG_NAMES)


def resolve_config(config: str | Path) -> Path:
    """Path of the YAML file for a config name or path.

    Raises SegsemError for an unknown name or a missing file.
    """
    if isinstance(config, str) and config in CONFIG_NAMES:
        where, rel = CONFIG_NAMES[config]
        if where == "segsem":
            return SEGSEM_CONFIG_DIR / rel
        return Path(str(importlib.resources.files("sam2").joinpath(rel)))
    s = str(config)
    p = Path(s)
    if p.suffix.lower() in (".yaml", ".yml"):
        if not p.is_file():
            raise SegsemError(f"{p}: config file not found")
        return p
    raise SegsemError(f"unknown SAM2 config '{s}' (known: {', '.join(config_names())}, or a path to a .yaml file)")


def image_size_overrides(image_size: int) -> list[str]:
    """Hydra override strings that set the model's input size (for ``build_sam2``)."""
    s = check_image_size(image_size)
    f = s // 16
    return [
        f"++model.image_size={s}",
        f"++model.memory_attention.layer.self_attention.feat_sizes=[{f},{f}]",
        f"++model.memory_attention.layer.cross_attention.feat_sizes=[{f},{f}]",
    ]


def check_image_size(image_size: Any) -> int:
    try:
        s = int(image_size)
    except (TypeError, ValueError):
        raise SegsemError(f"image size must be an integer, got {image_size!r}") from None
    if s != image_size or s < 64 or s % 32:
        raise SegsemError(f"image size must be a multiple of 32 and at least 64, got {image_size!r}")
    return s


def load_model_config(config: str | Path, *, image_size: int | None = None, yaml_text: str | None = None):
    """The OmegaConf ``model`` node of a config, with the image-size overrides applied.

    ``yaml_text`` (the config YAML stored in a segsem checkpoint) takes the place of the file.
    """
    from omegaconf import OmegaConf

    if yaml_text is not None:
        src = f"{config} (stored in checkpoint)"
        try:
            cfg = OmegaConf.create(yaml_text)
        except Exception as exc:  # noqa: BLE001
            raise SegsemError(f"{src}: unreadable config YAML ({exc})".splitlines()[0]) from None
    else:
        path = resolve_config(config)
        src = str(path)
        try:
            cfg = OmegaConf.load(path)
        except Exception as exc:  # noqa: BLE001
            raise SegsemError(f"{path}: unreadable config YAML ({str(exc).splitlines()[0]})") from None
    model_cfg = cfg.get("model") if hasattr(cfg, "get") else None
    if model_cfg is None or "_target_" not in model_cfg:
        raise SegsemError(f"{src}: not a SAM2 model config (needs a top-level 'model:' with '_target_')")
    if image_size is not None:
        s = check_image_size(image_size)
        model_cfg.image_size = s
        f = s // 16
        for key in ("memory_attention.layer.self_attention.feat_sizes", "memory_attention.layer.cross_attention.feat_sizes"):
            if OmegaConf.select(model_cfg, key) is not None:
                OmegaConf.update(model_cfg, key, [f, f], merge=False)
    else:
        check_image_size(model_cfg.get("image_size", 1024))
    OmegaConf.resolve(cfg)
    return cfg.model


def config_yaml(model_cfg) -> str:
    """YAML text of a model config node (stored in checkpoints so they are self-contained)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create({"model": model_cfg}))


def parse_device(device: str | torch.device | None) -> torch.device:
    """A torch device from a string; ``"auto"`` picks CUDA when available. SegsemError if unusable."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise SegsemError(f"unknown device '{device}' (use cpu, cuda, cuda:N or auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SegsemError(f"device '{device}' requested but CUDA is not available (use --device cpu)")
    if dev.type not in ("cpu", "cuda"):
        raise SegsemError(f"device '{device}' is not supported (use cpu, cuda, cuda:N or auto)")
    return dev


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint safely; return ``(state_dict, segsem_metadata)``.

    Only ``torch.load(..., weights_only=True)`` is used: any file holding an
    object that is not a tensor or plain container is refused with a
    SegsemError naming the file (its code never runs). Metadata is ``{}`` for
    official checkpoints.
    """
    path = Path(path)
    if not path.is_file():
        raise SegsemError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError, zip errors...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SegsemError(
            f"{path}: refused to load: not a plain weights file (weights_only load failed: {first[:200]})"
        ) from None
    if not isinstance(obj, dict):
        raise SegsemError(f"{path}: not a SAM2 checkpoint (expected a dict with key 'model', got {type(obj).__name__})")
    meta: dict[str, Any] = {}
    if "model" in obj:
        sd = obj["model"]
        m = obj.get(META_KEY, {})
        if m is not None and not isinstance(m, dict):
            raise SegsemError(f"{path}: checkpoint field '{META_KEY}' must be a dict, got {type(m).__name__}")
        meta = dict(m or {})
    elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd = obj
    else:
        keys = ", ".join(list(map(str, obj))[:5])
        raise SegsemError(f"{path}: not a SAM2 checkpoint (no 'model' key; keys: {keys})")
    if not isinstance(sd, dict) or not sd or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise SegsemError(f"{path}: checkpoint field 'model' is not a state dict of tensors")
    return sd, meta


def load_state_dict_checked(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], *, source: str | Path) -> None:
    """Load weights strictly; on mismatch raise SegsemError listing a few missing/unexpected keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            parts.append(f"{len(wrong)} with wrong shape (e.g. {'; '.join(wrong[:2])})")
        raise SegsemError(f"{source}: weights do not match the model config: {'; '.join(parts)}")
    model.load_state_dict(state_dict, strict=True)


def build_model(
    config: str | Path | None = None,
    *,
    checkpoint: str | Path | None = None,
    image_size: int | None = None,
    device: str | torch.device = "cpu",
    mode: str = "eval",
):
    """Build a SAM2 model (``sam2.modeling.sam2_base.SAM2Base``), optionally with weights.

    Parameters
    ----------
    config : config name (see :func:`config_names`) or YAML path. When None,
        taken from the checkpoint's segsem metadata (its stored YAML if the
        name is not known here).
    checkpoint : weights file (see :func:`load_checkpoint`); None = random init.
    image_size : model input size S (multiple of 32); None = checkpoint
        metadata's, else the config's.
    device : "cpu", "cuda", "cuda:N" or "auto".
    mode : "eval" or "train".

    Returns
    -------
    The model, with ``model.segsem_meta`` (checkpoint metadata, ``{}`` if
    none) and ``model.segsem_config`` (the config name or path used).
    """
    from hydra.utils import instantiate

    if mode not in ("eval", "train"):
        raise SegsemError(f"mode must be 'eval' or 'train', got {mode!r}")
    dev = parse_device(device)
    sd, meta = (None, {})
    if checkpoint is not None:
        sd, meta = load_checkpoint(checkpoint)
    if image_size is None and meta.get("image_size") is not None:
        image_size = int(meta["image_size"])
    yaml_text = None
    if config is None:
        config = meta.get("config")
        if config is None:
            raise SegsemError(
                f"{checkpoint}: checkpoint names no config; pass one (e.g. --config sam2.1_hiera_t)"
                if checkpoint is not None else "no SAM2 config given (e.g. sam2.1_hiera_t)"
            )
        if not (str(config) in CONFIG_NAMES or Path(str(config)).is_file()) and meta.get("config_yaml"):
            yaml_text = str(meta["config_yaml"])
    model_cfg = load_model_config(config, image_size=image_size, yaml_text=yaml_text)
    try:
        model = instantiate(model_cfg, _recursive_=True)
    except Exception as exc:  # noqa: BLE001 - hydra wraps the real error
        msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SegsemError(f"{config}: cannot build the model from this config ({msg[:300]})") from None
    if sd is not None:
        load_state_dict_checked(model, sd, source=checkpoint)
    model = model.to(dev)
    model.train(mode == "train")
    model.segsem_meta = meta
    model.segsem_config = str(config)
    model.segsem_config_yaml = config_yaml(model_cfg)
    return model


def save_checkpoint(path: str | Path, model: torch.nn.Module, meta: dict[str, Any]) -> Path:
    """Atomically write ``{'model': state_dict, 'segsem': meta}`` (loadable by ``build_sam2``).

    ``meta`` must hold plain types only (dict, list, str, int, float, bool, None)
    so that the file loads with ``weights_only=True``.
    """
    _check_plain(meta, "segsem")
    sd = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"model": sd, META_KEY: meta}, tmp)
    return Path(path)


def _check_plain(obj: Any, where: str) -> None:
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"checkpoint metadata {where}: key {k!r} is not a string")
            _check_plain(v, f"{where}.{k}")
        return
    raise TypeError(f"checkpoint metadata {where}: {type(obj).__name__} is not a plain type")


@contextlib.contextmanager
def hydra_config_dir(config: str | Path) -> Iterator[str]:
    """Let ``sam2.build_sam.build_sam2`` find a config that is not inside the sam2 package.

    Yields the ``config_file`` argument to pass to ``build_sam2`` (for an
    official name, its usual ``configs/...`` path and nothing is changed).
    Hydra's global state is restored to sam2's on exit::

        with hydra_config_dir("segsem-micro") as name:
            model = build_sam2(name, "model.pt", device="cpu",
                               hydra_overrides_extra=image_size_overrides(256))
    """
    if isinstance(config, str) and config in CONFIG_NAMES and CONFIG_NAMES[config][0] == "sam2":
        yield CONFIG_NAMES[config][1]
        return
    from hydra import initialize_config_dir, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    path = resolve_config(config).resolve()
    GlobalHydra.instance().clear()
    try:
        initialize_config_dir(config_dir=str(path.parent), version_base="1.2")
        yield path.name
    finally:
        GlobalHydra.instance().clear()
        initialize_config_module("sam2", version_base="1.2")


def parameter_counts(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """``{top-level module name: (trainable, total)}`` plus ``'total'``."""
    out: dict[str, tuple[int, int]] = {}
    seen: set[int] = set()
    for name, mod in model.named_children():
        ps = [p for p in mod.parameters() if id(p) not in seen]
        seen.update(id(p) for p in ps)
        if ps:
            out[name] = (sum(p.numel() for p in ps if p.requires_grad), sum(p.numel() for p in ps))
    rest = [p for p in model.parameters() if id(p) not in seen]
    if rest:
        out["(other)"] = (sum(p.numel() for p in rest if p.requires_grad), sum(p.numel() for p in rest))
    out["total"] = (sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters()))
    return out
