"""Model files: ``best.safetensors`` with the training config embedded, and run directories.

The safetensors metadata key ``config`` holds the JSON of the resolved training config; the keys
needed to rebuild the network are ``model``, ``size``, ``img_size``, ``in_channels``,
``num_classes`` and ``model_overrides`` (plus ``head`` for SETR, folded into the overrides).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from kvseg.utils import atomic_path

BEST = "best.safetensors"


def _unwrap(model: nn.Module) -> nn.Module:
    # DistributedDataParallel / torch.compile wrappers keep the real module here
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def save_model(path: str | os.PathLike, model: nn.Module, config: dict) -> None:
    """Write ``model``'s weights to ``path`` (safetensors, atomically) with ``config`` as JSON
    in the metadata key ``config``. Tied/shared tensors are stored as separate copies."""
    state = {k: v.detach().to("cpu").contiguous().clone()
             for k, v in _unwrap(model).state_dict().items()}
    meta = {"config": json.dumps(config, sort_keys=True), "format": "pt"}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)


def read_config(path: str | os.PathLike) -> dict:
    """The config embedded in a safetensors file written by :func:`save_model`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise ValueError(f"{path}: no 'config' in the safetensors metadata (not a kvseg model)")
    return json.loads(meta["config"])


def build_model(config: dict) -> nn.Module:
    """Rebuild the (untrained) network a config describes, via :func:`kvseg.create_model`."""
    from kvseg import create_model

    missing = [k for k in ("model", "size", "img_size", "in_channels", "num_classes")
               if k not in config]
    if missing:
        raise ValueError(f"model config lacks {', '.join(missing)}")
    overrides = dict(config.get("model_overrides") or {})
    if config.get("head") is not None:
        overrides["head"] = config["head"]
    return create_model(config["model"], num_classes=int(config["num_classes"]),
                        in_channels=int(config["in_channels"]), img_size=int(config["img_size"]),
                        size=config["size"], **overrides)


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu"
               ) -> tuple[nn.Module, dict]:
    """Load a model file: ``(model in eval mode on map_location, config dict)``."""
    config = read_config(path)
    model = build_model(config)
    state = load_file(str(path), device="cpu")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit {config['model']} "
                         f"({str(e).splitlines()[0]})") from None
    return model.to(map_location).eval(), config


def load_run(run_dir: str | os.PathLike, map_location: str | torch.device = "cpu"
             ) -> tuple[nn.Module, dict]:
    """Load ``RUN_DIR/best.safetensors`` (written by ``kvseg train``): ``(model, config)``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: run directory not found")
    path = run_dir / BEST
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {BEST} (has a training run finished an epoch "
                                "with validation here?)")
    return load_model(path, map_location)
