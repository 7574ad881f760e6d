"""Training losses, one per task (:func:`build_loss`).

- multi-label (one sigmoid channel per class, classes may overlap): BCE-with-logits + soft Dice
  (:class:`BCEDiceLoss`);
- multi-class (softmax over background + classes, exactly one class per pixel): cross-entropy +
  soft Dice of the softmax probabilities over the foreground classes (:class:`CEDiceLoss`; the
  background channel is left out of the Dice, as MONAI's ``include_background=False``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 − mean over classes of the soft Dice of ``sigmoid(logits)`` and ``target``.

    Args:
        logits: (N, C, H, W) raw scores.
        target: (N, C, H, W) in {0, 1}.
        smooth: added to numerator and denominator; keeps a class absent from the batch (and
            predicted absent) at Dice ≈ 1 instead of 0/0.

    Each class's Dice pools all pixels of the batch: (2 Σ p·t + s) / (Σ p + Σ t + s). Computed
    in float32 whatever the autocast dtype.
    """
    return _dice_loss(torch.sigmoid(logits.float()), target.float(), smooth)


def _dice_loss(p: torch.Tensor, t: torch.Tensor, smooth: float) -> torch.Tensor:
    """1 − mean over channels of (2 Σ p·t + s) / (Σ p + Σ t + s), pooled over batch and pixels."""
    dims = [0, *range(2, p.ndim)]
    inter = (p * t).sum(dims)
    den = p.sum(dims) + t.sum(dims)
    return 1.0 - ((2.0 * inter + smooth) / (den + smooth)).mean()


def _check_weights(name: str, weight: float, dice_weight: float) -> None:
    if weight < 0 or dice_weight < 0 or weight + dice_weight == 0:
        raise ValueError(f"loss weights must be >= 0 and not both 0, got {name}={weight}, "
                         f"dice_weight={dice_weight}")


class BCEDiceLoss(nn.Module):
    """``bce_weight · BCEWithLogits + dice_weight · soft Dice loss`` (mean reduction).

    ``forward(logits (N, C, H, W), target (N, C, H, W) in {0, 1}) -> scalar``.
    """

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0,
                 smooth: float = 1.0) -> None:
        super().__init__()
        _check_weights("bce_weight", bce_weight, dice_weight)
        self.bce_weight, self.dice_weight, self.smooth = bce_weight, dice_weight, smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape != target.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} "
                             "differ in shape")
        loss = logits.new_zeros((), dtype=torch.float32)
        if self.bce_weight:
            loss = loss + self.bce_weight * F.binary_cross_entropy_with_logits(
                logits.float(), target.float())
        if self.dice_weight:
            loss = loss + self.dice_weight * soft_dice_loss(logits, target, self.smooth)
        return loss


def softmax_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0
                      ) -> torch.Tensor:
    """1 − mean over the foreground classes (channels 1..) of the soft Dice of
    ``softmax(logits)`` and the one-hot ``target``, pooled over the batch like
    :func:`soft_dice_loss`. Computed in float32."""
    return _dice_loss(torch.softmax(logits.float(), dim=1)[:, 1:], target.float()[:, 1:], smooth)


class CEDiceLoss(nn.Module):
    """``ce_weight · cross-entropy + dice_weight · softmax Dice loss`` (multi-class).

    ``forward(logits (N, K+1, H, W), target (N, K+1, H, W) one-hot, background in channel 0)
    -> scalar``; the cross-entropy is the mean over pixels of ``-log softmax`` at the target
    class.
    """

    def __init__(self, ce_weight: float = 1.0, dice_weight: float = 1.0,
                 smooth: float = 1.0) -> None:
        super().__init__()
        _check_weights("ce_weight", ce_weight, dice_weight)
        self.ce_weight, self.dice_weight, self.smooth = ce_weight, dice_weight, smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape != target.shape or logits.shape[1] < 2:
            raise ValueError(f"logits {tuple(logits.shape)} and one-hot target "
                             f"{tuple(target.shape)} must have the same shape, >= 2 channels")
        loss = logits.new_zeros((), dtype=torch.float32)
        if self.ce_weight:
            loss = loss + self.ce_weight * F.cross_entropy(logits.float(), target.argmax(1))
        if self.dice_weight:
            loss = loss + self.dice_weight * softmax_dice_loss(logits, target, self.smooth)
        return loss


def build_loss(task: str, bce_weight: float = 1.0, dice_weight: float = 1.0) -> nn.Module:
    """The loss of a task: ``multilabel`` -> :class:`BCEDiceLoss`, ``multiclass`` ->
    :class:`CEDiceLoss` (``bce_weight`` weighs the cross-entropy)."""
    if task == "multilabel":
        return BCEDiceLoss(bce_weight, dice_weight)
    if task == "multiclass":
        return CEDiceLoss(bce_weight, dice_weight)
    raise ValueError(f"task {task!r}: expected multilabel or multiclass")
