"""The loss against written-out formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kvseg.training.losses import (
    BCEDiceLoss,
    CEDiceLoss,
    build_loss,
    soft_dice_loss,
    softmax_dice_loss,
)


def _naive(logits, target, bce_w, dice_w, smooth):
    x, t = logits.double().numpy(), target.double().numpy()
    n, c, h, w = x.shape
    bce = 0.0
    for idx in np.ndindex(n, c, h, w):
        p = 1 / (1 + math.exp(-x[idx]))
        bce -= t[idx] * math.log(p) + (1 - t[idx]) * math.log(1 - p)
    bce /= x.size
    dices = []
    for k in range(c):
        p = 1 / (1 + np.exp(-x[:, k]))
        dices.append((2 * (p * t[:, k]).sum() + smooth) / (p.sum() + t[:, k].sum() + smooth))
    return bce_w * bce + dice_w * (1 - np.mean(dices))


@pytest.mark.parametrize(("bce_w", "dice_w", "smooth"), [(1, 1, 1), (0.5, 2, 0.0), (1, 0, 1)])
def test_bce_dice_matches_naive_formula(bce_w, dice_w, smooth):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, 4, generator=g) * 3
    target = (torch.rand(2, 3, 5, 4, generator=g) < 0.4).float()
    got = BCEDiceLoss(bce_w, dice_w, smooth)(logits, target)
    assert float(got) == pytest.approx(_naive(logits, target, bce_w, dice_w, smooth), rel=1e-5)


def test_perfect_prediction_has_near_zero_dice_loss_and_gradients_flow():
    target = torch.zeros(1, 2, 4, 4)
    target[0, 0, 1:3, 1:3] = 1
    logits = (target * 2 - 1) * 50
    assert float(soft_dice_loss(logits, target)) == pytest.approx(0.0, abs=1e-6)
    x = torch.zeros(1, 2, 4, 4, requires_grad=True)
    BCEDiceLoss()(x, target).backward()
    assert x.grad.abs().sum() > 0


def test_bad_weights_and_shapes_raise():
    with pytest.raises(ValueError, match="weights"):
        BCEDiceLoss(0, 0)
    with pytest.raises(ValueError, match="shape"):
        BCEDiceLoss()(torch.zeros(1, 3, 4, 4), torch.zeros(1, 2, 4, 4))


# --------------------------------------------------------------------------- multi-class
def _one_hot(labels, k):
    return torch.nn.functional.one_hot(labels, k).permute(0, 3, 1, 2).float()


@pytest.mark.parametrize(("ce_w", "dice_w", "smooth"), [(1, 1, 1), (0.5, 2, 1e-5), (0, 1, 1)])
def test_ce_dice_matches_monai_dice_ce(ce_w, dice_w, smooth):
    from monai.losses import DiceCELoss

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 6, 5, generator=g) * 2
    target = _one_hot(torch.randint(0, 4, (2, 6, 5), generator=g), 4)
    ref = DiceCELoss(include_background=False, softmax=True, batch=True, smooth_nr=smooth,
                     smooth_dr=smooth, lambda_ce=ce_w, lambda_dice=dice_w)
    assert float(CEDiceLoss(ce_w, dice_w, smooth)(logits, target)) == pytest.approx(
        float(ref(logits, target)), rel=1e-5)


def test_ce_is_the_mean_negative_log_softmax_at_the_target_class():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 3, 2, 2, generator=g)
    labels = torch.tensor([[[0, 2], [1, 1]]])
    p = logits.double().softmax(1)
    naive = -np.mean([math.log(p[0, labels[0, i, j], i, j]) for i in range(2) for j in range(2)])
    got = CEDiceLoss(1, 0)(logits, _one_hot(labels, 3))
    assert float(got) == pytest.approx(naive, rel=1e-6)


def test_softmax_dice_ignores_background_and_build_loss_picks_by_task():
    target = _one_hot(torch.zeros(1, 4, 4, dtype=torch.long), 3)  # all background
    logits = torch.zeros(1, 3, 4, 4)
    logits[:, 0] = 50  # confident background: nothing predicted, nothing there
    assert float(softmax_dice_loss(logits, target)) == pytest.approx(0.0, abs=1e-6)
    assert isinstance(build_loss("multilabel"), BCEDiceLoss)
    assert isinstance(build_loss("multiclass", 2, 1), CEDiceLoss)
    with pytest.raises(ValueError, match="task"):
        build_loss("binary")
    with pytest.raises(ValueError, match="weights"):
        CEDiceLoss(0, 0)
    with pytest.raises(ValueError, match="same shape"):
        CEDiceLoss()(torch.zeros(1, 3, 4, 4), torch.zeros(1, 2, 4, 4))
