"""Test-time augmentation: the one implementation behind ``kvseg evaluate`` and ``kvseg predict``.

``tta`` names a set of mirrorings; the model sees the batch under each, every output is mirrored
back, turned into probabilities (sigmoid per class, or softmax over background + classes) and the
probabilities are averaged (nnU-Net's mirroring, on the two image axes):

- ``none``: the batch as it is;
- ``flip``: the batch and its horizontal mirror (the flip of the training augmentation);
- ``flips``: the batch, its horizontal, its vertical and its horizontal + vertical mirror.

:func:`probabilities_to_logits` is the inverse of the activation, so a wrapper that averages
probabilities (:mod:`kvseg.inference.ensemble`) can stand where a model's logits are expected
(thresholding or the argmax of its output equal those of the averaged probabilities).
"""

from __future__ import annotations

import torch

from kvseg.errors import ConfigError

#: The mirrorings of each TTA mode: the dimensions flipped (an empty tuple: the batch itself).
TTA_FLIPS: dict[str, tuple[tuple[int, ...], ...]] = {
    "none": ((),),
    "flip": ((), (-1,)),
    "flips": ((), (-1,), (-2,), (-2, -1)),
}
TTA_MODES = tuple(TTA_FLIPS)
#: Probabilities are clamped this far from 0 and 1 before the logit (float32 keeps ~1e-7).
_EPS = 1e-7


def check_tta(tta: str) -> str:
    """``tta`` if it is a TTA mode; :class:`~kvseg.errors.ConfigError` naming ``--tta`` if not."""
    if tta not in TTA_FLIPS:
        raise ConfigError(f"--tta {tta!r}: expected one of {', '.join(TTA_MODES)}")
    return tta


def activate(logits: torch.Tensor, task: str) -> torch.Tensor:
    """Probabilities from logits (B, C, H, W): softmax over C (multi-class) or sigmoid."""
    logits = logits.float()
    return logits.softmax(1) if task == "multiclass" else torch.sigmoid(logits)


def probabilities_to_logits(probs: torch.Tensor, task: str) -> torch.Tensor:
    """The inverse of :func:`activate`: ``log p`` (multi-class; softmax of it is ``p``) or
    ``log p - log(1 - p)`` (multi-label), with ``p`` clamped to [1e-7, 1 - 1e-7]."""
    p = probs.float().clamp(_EPS, 1 - _EPS)
    return p.log() if task == "multiclass" else p.log() - (-p).log1p()


def tta_probabilities(model, batch: torch.Tensor, tta: str = "none",
                      task: str = "multilabel") -> torch.Tensor:
    """Mean probabilities (B, C, H, W) of ``model`` over the mirrorings of ``tta`` (each output
    mirrored back before it is averaged); ``batch`` (B, C_in, H, W)."""
    flips = TTA_FLIPS[check_tta(tta)]
    total = None
    for dims in flips:
        x = batch.flip(dims) if dims else batch
        p = activate(model(x), task)
        p = p.flip(dims) if dims else p
        total = p if total is None else total + p
    return total / len(flips)


__all__ = ["TTA_FLIPS", "TTA_MODES", "activate", "check_tta", "probabilities_to_logits",
           "tta_probabilities"]
