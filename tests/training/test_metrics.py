"""Metrics against independent references: scikit-learn, MONAI, scipy, written-out formulas."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from scipy.spatial.distance import directed_hausdorff
from sklearn.metrics import jaccard_score

from kvseg.training import metrics as M


def _random_masks(seed, n=4, c=3, h=12, w=10, p=0.3, empty_classes=()):
    rng = np.random.default_rng(seed)
    pred = rng.random((n, c, h, w)) < p
    target = rng.random((n, c, h, w)) < p
    for k in empty_classes:
        pred[:, k] = False
        target[:, k] = False
    return pred, target


def _sk_indicators(pred, target):
    # one row per pixel, one column per class: the flattened multi-label indicator arrays
    c = pred.shape[1]
    return (target.transpose(0, 2, 3, 1).reshape(-1, c).astype(int),
            pred.transpose(0, 2, 3, 1).reshape(-1, c).astype(int))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("empty_classes", [(), (1,), (0, 2)])
def test_jaccard_matches_sklearn(seed, empty_classes):
    pred, target = _random_masks(seed, empty_classes=empty_classes)
    y, p = _sk_indicators(pred, target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_macro = jaccard_score(y, p, average="macro", zero_division=1.0)
        ref_weighted = jaccard_score(y, p, average="weighted", zero_division=1.0)
        ref_per = jaccard_score(y, p, average=None, zero_division=1.0)
    assert M.jaccard(pred, target) == pytest.approx(ref_macro, abs=1e-6)
    assert M.weighted_jaccard(pred, target) == pytest.approx(ref_weighted, abs=1e-6)
    np.testing.assert_allclose(M.jaccard_per_class(pred, target), ref_per, atol=1e-6)
    # torch tensors give the same numbers as numpy arrays
    assert M.jaccard(torch.from_numpy(pred), torch.from_numpy(target)) == M.jaccard(pred, target)


def test_weighted_jaccard_without_any_ground_truth_matches_sklearn():
    pred, _ = _random_masks(0)
    target = np.zeros_like(pred)
    pred[:, 1:] = False  # class 0 predicted (J=0), classes 1, 2 absent in both (J=1)
    y, p = _sk_indicators(pred, target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = jaccard_score(y, p, average="weighted", zero_division=1.0)
    assert M.weighted_jaccard(pred, target) == pytest.approx(ref, abs=1e-9)
    assert M.weighted_jaccard(pred, target) == pytest.approx(2 / 3)


def test_class_absent_in_both_scores_one():
    pred, target = _random_masks(3, empty_classes=(2,))
    assert M.jaccard_per_class(pred, target)[2] == 1.0
    assert M.dice_per_class(pred, target)[2] == 1.0
    # absent in the ground truth but predicted: zero
    pred[:, 2, 0, 0] = True
    assert M.jaccard_per_class(pred, target)[2] == 0.0
    assert M.dice_per_class(pred, target)[2] == 0.0


def test_counts_match_naive_loops():
    pred, target = _random_masks(7, n=2, c=2, h=5, w=4)
    c = M.confusion_counts(pred, target)
    for k in range(2):
        tp = fp = fn = 0
        for i, y, x in np.ndindex(2, 5, 4):
            a, b = pred[i, k, y, x], target[i, k, y, x]
            tp += a and b
            fp += a and not b
            fn += (not a) and b
        assert (c["tp"][k], c["fp"][k], c["fn"][k], c["gt"][k]) == (tp, fp, fn, tp + fn)
        assert M.dice_per_class(pred, target)[k] == pytest.approx(2 * tp / (2 * tp + fp + fn))


@pytest.mark.parametrize("seed", range(3))
def test_dice_matches_monai_set_level(seed):
    pred, target = _random_masks(seed, empty_classes=(1,))
    # MONAI computes Dice per (batch item, class); concatenating all slices into one image makes
    # its per-class value the set-level Dice.
    p = torch.from_numpy(np.concatenate(list(pred), axis=-1)[None]).float()
    t = torch.from_numpy(np.concatenate(list(target), axis=-1)[None]).float()
    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    ref = metric(p, t)[0].double().numpy()
    np.testing.assert_allclose(M.dice_per_class(pred, target), ref, atol=1e-6)
    assert M.dice(pred, target) == pytest.approx(ref.mean(), abs=1e-6)


def test_streaming_equals_one_shot_and_uses_sigmoid_threshold():
    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.normal(size=(6, 3, 8, 8))).float()
    target = torch.from_numpy(rng.random((6, 3, 8, 8)) < 0.4).float()
    sm = M.SegmentationMetrics(3)
    for i in range(0, 6, 4):  # uneven batches
        sm.update(logits[i:i + 4], target[i:i + 4])
    got = sm.compute()
    pred = torch.sigmoid(logits) >= 0.5
    assert got["jaccard"] == pytest.approx(M.jaccard(pred, target), abs=1e-12)
    assert got["weighted_jaccard"] == pytest.approx(M.weighted_jaccard(pred, target), abs=1e-12)
    assert got["dice"] == pytest.approx(M.dice(pred, target), abs=1e-12)
    assert got["jaccard_per_class"] == pytest.approx(M.jaccard_per_class(pred, target))
    # compute is repeatable and reset clears
    assert sm.compute() == got
    sm.reset()
    assert int(sm.counts.sum()) == 0
    sm2 = M.SegmentationMetrics(3, threshold=0.8)
    sm2.update(logits, target)
    pred8 = torch.sigmoid(logits) >= 0.8
    assert sm2.compute()["jaccard"] == pytest.approx(M.jaccard(pred8, target))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="shape"):
        M.jaccard(np.zeros((1, 3, 4, 4)), np.zeros((1, 3, 4, 5)))
    with pytest.raises(ValueError, match="threshold"):
        M.SegmentationMetrics(3, threshold=1.5)
    with pytest.raises(ValueError, match="classes"):
        M.SegmentationMetrics(3).update(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4))


def _blob_volume(rng, shape, center_jitter=2):
    d, h, w = shape
    zz, yy, xx = np.mgrid[:d, :h, :w]
    c = np.array(shape) / 2 + rng.integers(-center_jitter, center_jitter + 1, 3)
    r = rng.uniform(2.5, 4.5, 3)
    vol = ((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2 <= 1
    vol |= rng.random(shape) < 0.01  # a few outliers so the 95th percentile matters
    return vol


@pytest.mark.parametrize("seed", range(4))
def test_hd95_matches_monai(seed):
    rng = np.random.default_rng(seed)
    shape = (8, 20, 18)
    spacing = (3.0, 1.5, 1.63)
    pred, target = _blob_volume(rng, shape), _blob_volume(rng, shape)
    metric = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
    ref = metric(torch.from_numpy(pred)[None, None].float(),
                 torch.from_numpy(target)[None, None].float(), spacing=spacing)
    assert M.hd95(pred, target, spacing) == pytest.approx(float(ref), rel=1e-6)


def test_hd95_empty_conventions_match_monai():
    rng = np.random.default_rng(0)
    vol = _blob_volume(rng, (6, 12, 12))
    empty = np.zeros_like(vol)
    metric = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for a, b in [(vol, empty), (empty, vol), (empty, empty)]:
            ref = float(metric(torch.from_numpy(a)[None, None].float(),
                               torch.from_numpy(b)[None, None].float()))
            assert math.isnan(ref) and math.isnan(M.hd95(a, b, (1, 1, 1)))
    assert M.hd95(vol, vol, (3, 1, 1)) == 0.0


def test_dice_3d_matches_monai_and_empty_convention():
    rng = np.random.default_rng(1)
    a, b = _blob_volume(rng, (6, 12, 12)), _blob_volume(rng, (6, 12, 12))
    ref = DiceMetric(include_background=True, ignore_empty=False)(
        torch.from_numpy(a)[None, None].float(), torch.from_numpy(b)[None, None].float())
    assert M.dice_3d(a, b) == pytest.approx(float(ref), abs=1e-6)
    empty = np.zeros_like(a)
    assert M.dice_3d(empty, empty) == 1.0 and M.dice_3d(a, empty) == 0.0


def _kaggle_hausdorff_reference(pred, target):
    # the public definition: coordinates normalised by the volume shape, scipy's
    # directed_hausdorff both ways, divided by the unit cube's diagonal
    if not pred.any() and not target.any():
        return math.nan
    if not pred.any() or not target.any():
        return 1.0
    a = np.argwhere(pred) / np.array(pred.shape)
    b = np.argwhere(target) / np.array(target.shape)
    return max(directed_hausdorff(a, b)[0], directed_hausdorff(b, a)[0]) / math.sqrt(3)


@pytest.mark.parametrize("seed", range(3))
def test_kaggle_hausdorff_matches_scipy_definition(seed):
    rng = np.random.default_rng(seed)
    a, b = _blob_volume(rng, (7, 15, 13)), _blob_volume(rng, (7, 15, 13))
    assert M.kaggle_hausdorff(a, b) == pytest.approx(_kaggle_hausdorff_reference(a, b), abs=1e-9)
    empty = np.zeros_like(a)
    assert math.isnan(M.kaggle_hausdorff(empty, empty))
    assert M.kaggle_hausdorff(a, empty) == 1.0 == M.kaggle_hausdorff(empty, b)
    assert M.kaggle_hausdorff(a, a) == 0.0


def test_case_metrics_and_kaggle_score_by_hand():
    rng = np.random.default_rng(5)
    d, c, h, w = 5, 3, 10, 9
    pred = rng.random((d, c, h, w)) < 0.3
    target = rng.random((d, c, h, w)) < 0.3
    pred[:, 2] = target[:, 2] = False  # class 2 empty in both
    pred[0, 1] = target[0, 1] = False  # one empty-both row in class 1
    m = M.case_metrics(pred, target, (3.0, 1.5, 1.5), ["a", "b", "c"])
    rows = []
    for s, k in np.ndindex(d, c):
        den = pred[s, k].sum() + target[s, k].sum()
        if den:
            rows.append(2 * (pred[s, k] & target[s, k]).sum() / den)
    hd = _kaggle_hausdorff_reference(pred.any(1), target.any(1))
    assert m["kaggle_dice"] == pytest.approx(np.mean(rows))
    assert m["kaggle_hausdorff"] == pytest.approx(hd)
    assert m["kaggle_score"] == pytest.approx(0.4 * np.mean(rows) + 0.6 * (1 - hd))
    assert m["dice_3d"]["c"] == 1.0 and math.isnan(m["hd95_mm"]["c"])
    assert m["dice_3d"]["a"] == pytest.approx(M.dice_3d(pred[:, 0], target[:, 0]))


def test_case_accumulator_bounds_memory_to_one_case_and_sorts_slices():
    rng = np.random.default_rng(2)
    vols = {k: (rng.random((4, 2, 6, 6)) < 0.4, rng.random((4, 2, 6, 6)) < 0.4)
            for k in [(1, 0), (2, 3)]}
    acc = M.CaseMetricsAccumulator(["x", "y"], slice_thickness_mm=2.0)
    for key, (p, t) in vols.items():
        for s in [2, 0, 3, 1]:  # out of order within the case
            acc.add(key, s, p[s], t[s], (1.5, 1.5))
            assert len(acc._buf.preds) <= 4
        # the previous case was scored and dropped when this one started
    res = acc.finalize()
    assert [c["key"] for c in res["cases"]] == [(1, 0), (2, 3)]
    for case, (p, t) in zip(res["cases"], vols.values(), strict=True):
        ref = M.case_metrics(p, t, (2.0, 1.5, 1.5), ["x", "y"])
        assert case["kaggle_score"] == pytest.approx(ref["kaggle_score"])
        assert case["hd95_mm"]["x"] == pytest.approx(ref["hd95_mm"]["x"])
    with pytest.raises(ValueError, match="contiguous"):
        acc2 = M.CaseMetricsAccumulator(["x", "y"])
        p, t = vols[(1, 0)]
        acc2.add((1, 0), 0, p[0], t[0], (1, 1))
        acc2.add((2, 3), 0, p[0], t[0], (1, 1))
        acc2.add((1, 0), 1, p[1], t[1], (1, 1))


# --------------------------------------------------------------------------- multi-class
def test_multiclass_metrics_are_the_argmax_over_foreground_classes_like_sklearn():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 4, 8, 6, generator=g)
    labels = torch.randint(0, 4, (3, 8, 6), generator=g)
    target = torch.nn.functional.one_hot(labels, 4).permute(0, 3, 1, 2).float()
    pred = M.predicted_masks(logits, "multiclass")
    assert pred.shape == (3, 3, 8, 6) and not (pred.sum(1) > 1).any()
    np.testing.assert_array_equal(pred.numpy(), (logits.argmax(1)[:, None] ==
                                                 torch.arange(1, 4)[None, :, None, None]).numpy())
    assert torch.equal(M.target_masks(target, "multiclass"), target[:, 1:] > 0.5)
    m = M.SegmentationMetrics(4, task="multiclass")
    m.update(logits[:2], target[:2])
    m.update(logits[2:], target[2:])
    out = m.compute(sync=False)
    ref = jaccard_score(labels.flatten().numpy(), logits.argmax(1).flatten().numpy(),
                        labels=[1, 2, 3], average=None, zero_division=1.0)
    np.testing.assert_allclose(out["jaccard_per_class"], ref, atol=1e-9)
    assert out["jaccard"] == pytest.approx(ref.mean())
    # the multi-label path is untouched: sigmoid >= threshold per channel
    assert torch.equal(M.predicted_masks(logits, "multilabel", 0.3),
                       torch.sigmoid(logits) >= 0.3)
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        M.SegmentationMetrics(1, task="multiclass")


def test_case_accumulator_takes_each_volumes_own_slice_spacing():
    square = np.zeros((1, 6, 6), bool)
    square[0, 1:3, 1:3] = True
    empty = np.zeros_like(square)
    pred, target = np.stack([square, empty]), np.stack([square, square])  # (D, C, H, W)
    results = {}
    for slice_mm in (None, 7.0):
        acc = M.CaseMetricsAccumulator(["x"], slice_thickness_mm=3.0)
        for k in range(2):
            acc.add(("v", 0), k, pred[k], target[k], (1.0, 1.0), slice_mm=slice_mm)
        results[slice_mm] = acc.finalize()["cases"][0]["hd95_mm"]["x"]
    # the prediction lacks slice 1: the distance runs across one slice spacing
    assert results[7.0] == pytest.approx(M.hd95(pred[:, 0], target[:, 0], (7.0, 1.0, 1.0)))
    assert results[None] == pytest.approx(M.hd95(pred[:, 0], target[:, 0], (3.0, 1.0, 1.0)))
    assert results[7.0] > results[None]
