"""Weights and training state on disk.

- Model files: ``best.safetensors`` with the training config embedded. The safetensors metadata
  key ``config`` holds the JSON of the resolved training config; the keys needed to rebuild the
  network are ``model``, ``size``, ``img_size``, ``in_channels``, ``num_classes`` and
  ``model_overrides`` (plus ``head`` for SETR, folded into the overrides).
- Training state: ``last.ckpt`` (:func:`save_training_state` / :func:`load_training_state`),
  a ``torch.save`` dict of plain tensors and Python values, read with ``weights_only=True``
  (a file never executes), including the random number generator states
  (:func:`capture_rng_state` / :func:`restore_rng_state`).

A corrupt, truncated, empty or foreign file is one :class:`~kvseg.errors.CheckpointError` naming
the file and what to do; nothing is ever loaded with ``weights_only=False``.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from kvseg.config import RunConfig
from kvseg.errors import CheckpointError
from kvseg.models.pretrained import fit_problems
from kvseg.models.registry import create_model
from kvseg.training.rundir import BEST
from kvseg.utils import atomic_path


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
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(e)}); "
                              "it may be truncated or corrupt: re-copy it or train again") from None
    if "config" not in meta:
        raise CheckpointError(f"{path}: no 'config' in the safetensors metadata (not a kvseg "
                              "model)")
    try:
        config = json.loads(meta["config"])
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: its embedded config is not valid JSON") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: its embedded config is not a mapping")
    return config


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def build_model(config: dict) -> nn.Module:
    """Rebuild the (untrained) network a config describes (registry.create_model)."""
    missing = [k for k in ("model", "size", "img_size", "in_channels", "num_classes")
               if k not in config]
    if missing:
        raise CheckpointError(f"model config lacks {', '.join(missing)}")
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
    try:
        model = build_model(config)
    except ValueError as e:
        raise CheckpointError(f"{path}: its config does not describe a model ({e})") from None
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: the weights cannot be read ({_first_line(e)}); the file "
                              "may be truncated or corrupt") from None
    bad = next((k for k, v in state.items()
                if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise CheckpointError(f"{path}: tensor {bad!r} holds NaN or infinite values; the model "
                              "would predict nothing (a diverged or damaged run): use another "
                              "run or train again")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        raise CheckpointError(f"{path}: weights do not fit {config['model']} as its config "
                              f"describes it: {fit_problems(model.state_dict(), state)}") from None
    return model.to(map_location).eval(), config


def load_run(run_dir: str | os.PathLike, map_location: str | torch.device = "cpu"
             ) -> tuple[nn.Module, dict]:
    """Load ``RUN_DIR/best.safetensors`` (written by ``kvseg train``): ``(model, config)``."""
    return load_model(_best(run_dir), map_location)


def open_run(run_dir: str | os.PathLike, map_location: str | torch.device = "cpu"
             ) -> tuple[nn.Module, RunConfig]:
    """:func:`load_run` with the typed config (:meth:`RunConfig.from_dict`: the defaults of
    runs written by older versions applied)."""
    path = _best(run_dir)
    model, config = load_model(path, map_location)
    return model, RunConfig.from_dict(config, source=str(path))


def read_run_config(path: str | os.PathLike) -> RunConfig:
    """The typed config of a model file or of a run folder's ``best.safetensors``."""
    path = Path(path)
    path = _best(path) if path.is_dir() else path
    return RunConfig.from_dict(read_config(path), source=str(path))


def _best(run_dir: str | os.PathLike) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: run directory not found")
    path = run_dir / BEST
    if not path.is_file():
        if (run_dir / "model.safetensors").is_file() and (run_dir / "config.json").is_file():
            raise FileNotFoundError(f"{run_dir}: a kvseg package, not a run folder: this "
                                    "command needs the run folder it was packaged from (kvseg "
                                    "evaluate and predict take packages)")
        raise FileNotFoundError(f"{run_dir}: no {BEST} (has a training run finished an epoch "
                                "with validation here?)")
    return path


# --------------------------------------------------------------------------- training state
def save_training_state(path: str | os.PathLike, state: dict) -> None:
    """Write the training state dict (tensors and plain Python values) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_training_state(path: str | os.PathLike, required: tuple[str, ...] = ()) -> dict:
    """Read a state written by :func:`save_training_state` (``weights_only=True``).

    Raises FileNotFoundError if absent and :class:`CheckpointError` naming the file when it is
    empty, truncated, corrupt, not a kvseg training state or lacks one of ``required``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: nothing to resume from")
    hint = ("it may be truncated or corrupt (a full disk, an interrupted copy); start a new run "
            "in another folder, or restore the file from a backup")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file; {hint}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip, pickle and unpickler errors: all mean "not a valid state"
        raise CheckpointError(f"{path}: not a readable kvseg checkpoint "
                              f"({type(e).__name__}); {hint}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a kvseg training state (a {type(state).__name__}); "
                              f"{hint}")
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a kvseg training state (lacks {', '.join(missing)})")
    return state


def capture_rng_state(gen: torch.Generator, device: torch.device | None = None) -> dict:
    """Python, NumPy, torch CPU and ``gen`` (the DataLoader's) RNG states as plain values.

    With a CUDA ``device``, that device's CUDA RNG state too (only the training device's: a
    resume with fewer visible GPUs or on the CPU must not fail on it). Plain lists, so
    ``all_gather_object`` and ``weights_only`` loading accept them.
    """
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
        "loader": gen.get_state().tolist(),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device).tolist()
    return state


def restore_rng_state(state: dict, gen: torch.Generator,
                      device: torch.device | None = None) -> None:
    """Inverse of :func:`capture_rng_state` (the CUDA state only when training on CUDA)."""
    def byte_tensor(values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.uint8)

    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(byte_tensor(state["torch"]))
    gen.set_state(byte_tensor(state["loader"]))
    cuda = state.get("cuda")
    if device is not None and device.type == "cuda" and cuda is not None:
        if cuda and isinstance(cuda[0], list):  # older checkpoints: one state per visible GPU
            cuda = cuda[device.index or 0] if (device.index or 0) < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(byte_tensor(cuda), device)
