"""Initialise a model from a local weights file (nothing is ever downloaded).

Accepted files: ``.safetensors`` (e.g. a kvseg ``best.safetensors``), or a ``torch.save`` file
(``.pt``/``.pth``/``.ckpt``) holding a state dict or a dict with one under ``model``,
``state_dict`` or ``model_state_dict`` (a kvseg ``last.ckpt`` works). A ``module.`` prefix (DDP)
is stripped. Tensors whose name is absent from the model, or whose shape differs (a head with
another number of classes, a stem with other input channels, a position table of another
grid), are skipped and reported, so a checkpoint of one task initialises a model of another.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from kvseg.errors import CheckpointError

log = logging.getLogger(__name__)


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did: tensor names loaded, missing in the file, skipped."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the file
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model
    mismatched: list[str] = field(default_factory=list)  # same name, other shape

    def summary(self) -> str:
        return (f"{len(self.loaded)} tensors loaded, {len(self.missing)} missing, "
                f"{len(self.unexpected)} unexpected, {len(self.mismatched)} shape mismatches")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, by name (see the module docstring for the formats)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: pretrained weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or foreign file: one line naming it
        raise CheckpointError(f"{path}: not a readable weights file "
                              f"({type(e).__name__}: {e})") from e
    if isinstance(state, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise CheckpointError(f"{path}: holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_pretrained(model: nn.Module, path: str | os.PathLike, *,
                    strict: bool = False) -> LoadReport:
    """Copy the matching tensors of ``path`` into ``model`` in place; return what was done.

    ``strict=True`` raises :class:`CheckpointError` unless every model tensor is loaded with its
    shape. A file sharing no tensor with the model is always an error (the wrong file, most
    likely).
    """
    state = read_state_dict(path)
    own = model.state_dict()
    report = LoadReport()
    to_load = {}
    for name, tensor in state.items():
        if name not in own:
            report.unexpected.append(name)
        elif own[name].shape != tensor.shape:
            report.mismatched.append(f"{name} {tuple(tensor.shape)}->{tuple(own[name].shape)}")
        else:
            to_load[name] = tensor
    report.loaded = sorted(to_load)
    report.missing = sorted(set(own) - set(to_load) - {m.split(" ")[0] for m in report.mismatched})
    if not to_load:
        raise CheckpointError(f"{path}: no tensor matches the model by name and shape")
    if strict and (report.missing or report.mismatched):
        raise CheckpointError(f"{path}: strict load failed: {report.summary()}")
    model.load_state_dict(to_load, strict=False)
    log.info("pretrained %s: %s", path, report.summary())
    return report
