"""Training loss: BCE-with-logits + soft Dice, multi-label (one sigmoid channel per class)."""

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
    p = torch.sigmoid(logits.float())
    t = target.float()
    dims = [0, *range(2, p.ndim)]
    inter = (p * t).sum(dims)
    den = p.sum(dims) + t.sum(dims)
    return 1.0 - ((2.0 * inter + smooth) / (den + smooth)).mean()


class BCEDiceLoss(nn.Module):
    """``bce_weight · BCEWithLogits + dice_weight · soft Dice loss`` (mean reduction).

    ``forward(logits (N, C, H, W), target (N, C, H, W) in {0, 1}) -> scalar``.
    """

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0,
                 smooth: float = 1.0) -> None:
        super().__init__()
        if bce_weight < 0 or dice_weight < 0 or bce_weight + dice_weight == 0:
            raise ValueError(f"loss weights must be >= 0 and not both 0, got bce_weight="
                             f"{bce_weight}, dice_weight={dice_weight}")
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
