"""Several runs (seeds, cross-validation folds) as one model; TTA and post-processing around it.

:func:`open_runs` opens run folders or packaged models (``kvseg package``) and refuses runs that
would not average: a different task, class list, input channels, image size, 2.5D context or
input preparation is one :class:`~kvseg.errors.ConfigError` naming both runs.
:class:`AveragedModel` averages the probabilities of its models, each under the TTA mirrorings
(:mod:`kvseg.inference.tta`), applies the run's tuned post-processing
(:mod:`kvseg.inference.postprocess`) if given, and returns them as logits
(:func:`~kvseg.inference.tta.probabilities_to_logits`), so it stands wherever a run's model does
(evaluate's metrics, predict's masks).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from kvseg.config import RunConfig
from kvseg.errors import ConfigError
from kvseg.inference.package import is_package, open_package
from kvseg.inference.postprocess import POSTPROCESS, Postprocess, read_postprocess
from kvseg.inference.tta import check_tta, probabilities_to_logits, tta_probabilities
from kvseg.training.checkpoint import open_run

log = logging.getLogger(__name__)

#: What every member of an ensemble must share (the model's input and output).
MUST_AGREE = ("task", "classes", "in_channels", "num_classes", "img_size", "context",
              "preprocess")


def open_model(path: str | os.PathLike, map_location: str | torch.device = "cpu"
               ) -> tuple[nn.Module, RunConfig]:
    """A run folder's best model or a packaged model's: ``(model in eval mode, RunConfig)``."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--run {path}: no such run folder")
    if is_package(path):
        return open_package(path, map_location)
    return open_run(path, map_location)


def check_compatible(configs: Sequence[RunConfig], names: Sequence[str]) -> None:
    """One :class:`ConfigError` naming the first two runs that disagree on :data:`MUST_AGREE`."""
    first, name0 = configs[0], names[0]
    for config, name in zip(configs[1:], names[1:], strict=True):
        for key in MUST_AGREE:
            a, b = getattr(first, key), getattr(config, key)
            if a != b:
                raise ConfigError(f"--run: {name0} and {name} cannot be averaged: {key} is "
                                  f"{a!r} in {name0} and {b!r} in {name}")


def open_runs(paths: Sequence[str | os.PathLike], map_location: str | torch.device = "cpu"
              ) -> tuple[list[nn.Module], RunConfig]:
    """Every run's model and the first run's config, after :func:`check_compatible`."""
    if not paths:
        raise ConfigError("--run: name at least one run folder")
    if len({Path(p).resolve() for p in paths}) < len(paths):
        raise ConfigError("--run: a run is named twice")
    opened = [open_model(p, map_location) for p in paths]
    check_compatible([c for _, c in opened], [str(p) for p in paths])
    return [m for m, _ in opened], opened[0][1]


class AveragedModel(nn.Module):
    """Logits whose activation is the mean probability of ``models`` under ``tta``, then
    ``post`` (see the module docstring). ``(B, C_in, S, S) -> (B, C, S, S)``."""

    def __init__(self, models: Sequence[nn.Module], task: str, tta: str = "none",
                 post: Postprocess | None = None) -> None:
        super().__init__()
        # a plain list: a member may be a CPU runtime (ONNX Runtime int8), not an nn.Module;
        # every member is already on its device and in eval mode
        self.members = list(models)
        self.task, self.tta, self.post = task, check_tta(tta), post

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = sum(tta_probabilities(m, x, self.tta, self.task) for m in self.members)
        probs = probs / len(self.members)
        if self.post is not None:
            probs = self.post.apply(probs, self.task)
        return probabilities_to_logits(probs, self.task)


def combine(models: Sequence[nn.Module], task: str, tta: str = "none",
            post: Postprocess | None = None) -> nn.Module:
    """The one model to run: ``models[0]`` itself when there is nothing to combine (one model,
    no TTA, no post-processing: outputs exactly as before), else an :class:`AveragedModel`."""
    if len(models) == 1 and check_tta(tta) == "none" and post is None:
        return models[0]
    return AveragedModel(models, task, tta, post).eval()


def tuned_postprocess(paths: Sequence[str | os.PathLike], config: RunConfig,
                      threshold: float | None, enabled: bool = True
                      ) -> tuple[Postprocess | None, float]:
    """``(post-processing to apply or None, threshold to use)`` for the runs ``paths``.

    A single run's ``postprocess.json`` (``kvseg tune``) is applied when ``enabled``, and said
    so in the log; ``threshold`` (``--threshold``) overrides its thresholds (its component
    sizes still apply). Multi-label post-processing maps every class's threshold to 0.5, so the
    threshold to use is then 0.5. An ensemble gets none: each run's was tuned for that run alone.
    """
    plain = config.threshold if threshold is None else threshold
    if not enabled:
        return None, plain
    if len(paths) > 1:
        if any((Path(p) / POSTPROCESS).is_file() for p in paths):
            log.info("post-processing of single runs is not applied to an ensemble")
        return None, plain
    post = read_postprocess(paths[0], config.classes, config.task)
    if post is None:
        return None, plain
    if config.task == "multilabel" and (threshold is not None or post.thresholds is None):
        if threshold is not None:
            log.info("--threshold %g overrides the tuned thresholds", threshold)
        post = replace(post, thresholds=(plain,) * len(post.classes))
    log.info("applying the post-processing tuned on validation (%s): %s", post.source,
             post.describe())
    return post, 0.5 if config.task == "multilabel" else plain


__all__ = ["MUST_AGREE", "AveragedModel", "check_compatible", "combine", "open_model",
           "open_runs", "tuned_postprocess"]
