"""Segmentation metrics: every number is a formula on per-class counts.

Conventions (stated once, tested in ``tests/test_metrics.py``):

- Inputs are multi-label: one binary channel per class, shape (N, C, H, W). A logit counts as a
  prediction of class c where ``sigmoid(logit) >= threshold`` (0.5 by default). For a
  multi-class model (softmax over background + K classes, ``task="multiclass"``) a pixel's class
  is the argmax and the counts are over the K foreground classes (:func:`predicted_masks`,
  :func:`target_masks`); the background is never a reported class.
- Set-level metrics (``jaccard``, ``weighted_jaccard``, ``dice``) accumulate true positives,
  false positives and false negatives per class over **all pixels of all slices** of the
  evaluation set, then divide (they are not means of per-slice scores).
- A class absent from both prediction and ground truth (TP + FP + FN = 0) scores **1.0** in
  Jaccard and Dice: nothing to find and nothing found. This equals scikit-learn's
  ``jaccard_score(..., zero_division=1.0)`` and MONAI's ``DiceMetric(ignore_empty=False)``.
- ``weighted_jaccard`` weights each class's Jaccard by its ground-truth pixel count; if there is
  no ground-truth pixel of any class the weights are undefined and it falls back to the unweighted
  mean (scikit-learn's ``average="weighted"`` does the same).
- Per-case 3D Dice uses the same empty-both convention (1.0). HD95 (mm) is undefined when the
  prediction or the ground truth is empty and is returned as NaN (MONAI does the same); means over
  cases skip NaN.
- The Kaggle score (UW-Madison GI Tract 2022, as reimplemented by MLE-bench from the public
  description) is ``0.4 * mean Dice + 0.6 * (1 - mean normalised Hausdorff)``:
  Dice per (slice, class), skipping slices where both are empty; Hausdorff per case-day on the
  3D volume of the masks OR-ed over classes with slice depth 1, coordinates divided by the volume
  shape (unit cube) and the distance divided by sqrt(3) (the cube's diagonal) so it lies in
  [0, 1]; both empty -> skipped, exactly one empty -> 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from kvseg.training.distributed import all_reduce_sum

__all__ = [
    "CaseMetricsAccumulator",
    "SegmentationMetrics",
    "case_metrics",
    "confusion_counts",
    "dice",
    "dice_3d",
    "dice_from_counts",
    "dice_per_class",
    "hd95",
    "jaccard",
    "jaccard_from_counts",
    "jaccard_per_class",
    "kaggle_hausdorff",
    "kaggle_slice_dice",
    "predicted_masks",
    "target_masks",
    "weighted_jaccard",
    "weighted_jaccard_from_counts",
]


# --------------------------------------------------------------------------- counts
def _as_bool_tensor(x) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"expected a numpy array or torch tensor, got {type(x).__name__}")
    return x.bool() if x.dtype != torch.bool else x


def confusion_counts(pred, target) -> dict[str, torch.Tensor]:
    """Per-class pixel counts of binary masks.

    Args:
        pred, target: binary arrays or tensors of shape (N, C, H, W) (any trailing spatial dims);
            non-zero means "class present".

    Returns:
        dict with ``tp``, ``fp``, ``fn``, ``gt`` (ground-truth pixels = tp + fn), each an int64
        tensor of shape (C,) on the inputs' device.
    """
    p, t = _as_bool_tensor(pred), _as_bool_tensor(target)
    if p.shape != t.shape:
        raise ValueError(f"pred shape {tuple(p.shape)} != target shape {tuple(t.shape)}")
    if p.ndim < 2:
        raise ValueError(f"expected (N, C, ...) inputs, got shape {tuple(p.shape)}")
    dims = [0, *range(2, p.ndim)]
    tp = (p & t).sum(dim=dims, dtype=torch.int64)
    fp = (p & ~t).sum(dim=dims, dtype=torch.int64)
    fn = (~p & t).sum(dim=dims, dtype=torch.int64)
    return {"tp": tp, "fp": fp, "fn": fn, "gt": tp + fn}


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    num, den = num.double(), den.double()
    # empty-both convention: 0 / 0 -> 1.0
    return torch.where(den > 0, num / den.clamp(min=1), torch.ones_like(den))


def jaccard_from_counts(tp, fp, fn) -> torch.Tensor:
    """Per-class Jaccard TP / (TP + FP + FN), float64 (C,); 1.0 where the denominator is 0."""
    tp, fp, fn = (torch.as_tensor(v) for v in (tp, fp, fn))
    return _ratio(tp, tp + fp + fn)


def dice_from_counts(tp, fp, fn) -> torch.Tensor:
    """Per-class Dice 2TP / (2TP + FP + FN), float64 (C,); 1.0 where the denominator is 0."""
    tp, fp, fn = (torch.as_tensor(v) for v in (tp, fp, fn))
    return _ratio(2 * tp, 2 * tp + fp + fn)


def weighted_jaccard_from_counts(tp, fp, fn) -> float:
    """Per-class Jaccard weighted by ground-truth pixel count (TP + FN).

    Falls back to the unweighted mean when there is no ground-truth pixel at all.
    """
    tp, fp, fn = (torch.as_tensor(v) for v in (tp, fp, fn))
    per_class = jaccard_from_counts(tp, fp, fn)
    weights = (tp + fn).double()
    if weights.sum() == 0:
        return float(per_class.mean())
    return float((per_class * weights).sum() / weights.sum())


def jaccard_per_class(pred, target) -> list[float]:
    """Jaccard of each class over the whole set of (N, C, H, W) binary masks."""
    c = confusion_counts(pred, target)
    return jaccard_from_counts(c["tp"], c["fp"], c["fn"]).tolist()


def dice_per_class(pred, target) -> list[float]:
    """Dice of each class over the whole set of (N, C, H, W) binary masks."""
    c = confusion_counts(pred, target)
    return dice_from_counts(c["tp"], c["fp"], c["fn"]).tolist()


def jaccard(pred, target) -> float:
    """Mean over classes of the set-level Jaccard (sklearn ``average="macro"``)."""
    return float(np.mean(jaccard_per_class(pred, target)))


def weighted_jaccard(pred, target) -> float:
    """Set-level Jaccard weighted by ground-truth pixels (sklearn ``average="weighted"``)."""
    c = confusion_counts(pred, target)
    return weighted_jaccard_from_counts(c["tp"], c["fp"], c["fn"])


def dice(pred, target) -> float:
    """Mean over classes of the set-level Dice."""
    return float(np.mean(dice_per_class(pred, target)))


def predicted_masks(logits: torch.Tensor, task: str = "multilabel",
                    threshold: float = 0.5) -> torch.Tensor:
    """Binary class masks (N, K, ...) from logits: ``sigmoid >= threshold`` per channel
    (multi-label, K = C), or the one-hot argmax without the background channel 0 (multi-class,
    K = C - 1)."""
    if task == "multiclass":
        labels = logits.argmax(1)
        classes = torch.arange(1, logits.shape[1], device=logits.device)
        return labels.unsqueeze(1) == classes.view(1, -1, *([1] * (logits.ndim - 2)))
    if task != "multilabel":
        raise ValueError(f"task {task!r}: expected multilabel or multiclass")
    return torch.sigmoid(logits.float()) >= threshold


def target_masks(target: torch.Tensor, task: str = "multilabel") -> torch.Tensor:
    """Binary ground truth (N, K, ...): the target (multi-label) or its foreground channels
    (multi-class one-hot, background in channel 0)."""
    t = target > 0.5
    return t[:, 1:] if task == "multiclass" else t


# --------------------------------------------------------------------------- streaming
class SegmentationMetrics:
    """Streaming set-level metrics: keeps only four (C,) int64 count tensors.

    ``update(logits, target)`` adds the counts of a batch; ``compute()`` returns
    ``{"jaccard", "weighted_jaccard", "dice", "jaccard_per_class", "dice_per_class"}``.
    Under ``torch.distributed`` call ``compute(sync=True)`` on **every** rank: the counts are
    summed across ranks (an all-reduce of integers, so the result equals one process seeing all
    the data, whatever the sharding).

    ``num_classes`` is the model's output channels; with ``task="multiclass"`` the first is the
    background and the metrics are over the other ``num_classes - 1`` (:func:`predicted_masks`).
    """

    def __init__(self, num_classes: int, threshold: float = 0.5,
                 task: str = "multilabel") -> None:
        if num_classes < 1 + (task == "multiclass"):
            raise ValueError(f"num_classes must be >= {1 + (task == 'multiclass')}, got "
                             f"{num_classes}")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        if task not in ("multilabel", "multiclass"):
            raise ValueError(f"task {task!r}: expected multilabel or multiclass")
        self.num_classes = num_classes
        self.threshold = threshold
        self.task = task
        self.reset()

    def reset(self) -> None:
        k = self.num_classes - (self.task == "multiclass")
        self.counts = torch.zeros(4, k, dtype=torch.int64)  # tp, fp, fn, gt

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``logits`` (N, C, H, W) raw scores, ``target`` (N, C, H, W) in {0, 1}."""
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"logits have {logits.shape[1]} classes, expected {self.num_classes}")
        pred = predicted_masks(logits, self.task, self.threshold)
        c = confusion_counts(pred, target_masks(target, self.task))
        self.counts += torch.stack([c["tp"], c["fp"], c["fn"], c["gt"]]).cpu()

    def synced_counts(self) -> torch.Tensor:
        """The counts summed over all ranks (a copy; local counts are untouched)."""
        counts = self.counts.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            counts = all_reduce_sum(counts)
        return counts

    def compute(self, sync: bool = True) -> dict:
        counts = self.synced_counts() if sync else self.counts
        tp, fp, fn, _ = counts
        jpc = jaccard_from_counts(tp, fp, fn)
        dpc = dice_from_counts(tp, fp, fn)
        return {
            "jaccard": float(jpc.mean()),
            "weighted_jaccard": weighted_jaccard_from_counts(tp, fp, fn),
            "dice": float(dpc.mean()),
            "jaccard_per_class": jpc.tolist(),
            "dice_per_class": dpc.tolist(),
        }


# --------------------------------------------------------------------------- 3D, per case
def dice_3d(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice of two binary volumes (any shape); 1.0 when both are empty."""
    p, t = np.asarray(pred, bool), np.asarray(target, bool)
    den = int(p.sum()) + int(t.sum())
    return 1.0 if den == 0 else 2.0 * int((p & t).sum()) / den


def _edges(mask: np.ndarray) -> np.ndarray:
    # surface voxels: the mask minus its erosion (cross structuring element, outside = 0)
    return mask & ~ndimage.binary_erosion(mask)


def _surface_distances(a_edges: np.ndarray, b_edges: np.ndarray,
                       spacing: Sequence[float]) -> np.ndarray:
    # exact Euclidean distance from every surface voxel of a to the nearest surface voxel of b
    dist = ndimage.distance_transform_edt(~b_edges, sampling=spacing)
    return dist[a_edges]


def hd95(pred: np.ndarray, target: np.ndarray, spacing: Sequence[float]) -> float:
    """Symmetric 95th-percentile Hausdorff distance between the surfaces of two binary volumes.

    Args:
        pred, target: binary arrays of the same shape (D, H, W) (or (H, W)).
        spacing: voxel size per axis in mm, e.g. ``(slice_thickness, row_mm, col_mm)``.

    Returns:
        max(p95(d(pred -> target)), p95(d(target -> pred))) in mm, where d are the Euclidean
        distances between surface voxels (MONAI ``HausdorffDistanceMetric(percentile=95)``).
        NaN when either volume is empty.
    """
    p, t = np.asarray(pred, bool), np.asarray(target, bool)
    if p.shape != t.shape:
        raise ValueError(f"pred shape {p.shape} != target shape {t.shape}")
    if len(spacing) != p.ndim:
        raise ValueError(f"spacing {tuple(spacing)} has {len(spacing)} values for {p.ndim}-D masks")
    if not p.any() or not t.any():
        return math.nan
    pe, te = _edges(p), _edges(t)
    d_pt = _surface_distances(pe, te, spacing)
    d_tp = _surface_distances(te, pe, spacing)
    return float(max(np.percentile(d_pt, 95), np.percentile(d_tp, 95)))


def volume_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """The diagonal of a volume of ``shape`` voxels of size ``spacing`` mm: the largest distance
    two of its voxels can have, the HD95 penalty for a missed organ or a false alarm."""
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing, strict=True))))


def penalized(hd95_mm: float, pred_any: bool, target_any: bool, penalty_mm: float) -> float:
    """HD95 that counts missed organs and false alarms instead of skipping them.

    Both present: ``hd95_mm``. Exactly one present (a missed organ: in the ground truth, not
    predicted; or a false alarm: predicted, not there): ``penalty_mm`` (the volume diagonal, the
    worst distance possible; the convention MONAI's docs and the Kaggle metric discuss for an
    empty side). Both empty: NaN (nothing to measure; skipped in means).
    """
    if pred_any and target_any:
        return hd95_mm
    if pred_any or target_any:
        return penalty_mm
    return math.nan


def kaggle_hausdorff(pred: np.ndarray, target: np.ndarray) -> float:
    """Normalised 3D Hausdorff distance of the Kaggle UW-Madison score, in [0, 1].

    ``pred``, ``target``: binary (D, H, W) volumes of one case-day (classes already OR-ed).
    Voxel coordinates are divided by the volume shape (slice depth 1, unit cube) and the
    symmetric (max) Hausdorff distance is divided by sqrt(3). Both empty -> NaN (skipped),
    exactly one empty -> 1.0.
    """
    p, t = np.asarray(pred, bool), np.asarray(target, bool)
    if p.shape != t.shape:
        raise ValueError(f"pred shape {p.shape} != target shape {t.shape}")
    if not p.any() and not t.any():
        return math.nan
    if not p.any() or not t.any():
        return 1.0
    sampling = [1.0 / s for s in p.shape]
    # directed Hausdorff = max over a's voxels of the exact distance to the nearest voxel of b
    d_pt = ndimage.distance_transform_edt(~t, sampling=sampling)[p].max()
    d_tp = ndimage.distance_transform_edt(~p, sampling=sampling)[t].max()
    return float(max(d_pt, d_tp) / math.sqrt(p.ndim))


def kaggle_slice_dice(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Kaggle per-row Dice: one value per (slice, class) of (N, C, H, W) masks; NaN where both
    are empty (those rows are skipped by the score)."""
    p, t = np.asarray(pred, bool), np.asarray(target, bool)
    axes = tuple(range(2, p.ndim))
    inter = (p & t).sum(axis=axes).astype(np.float64)
    den = p.sum(axis=axes).astype(np.float64) + t.sum(axis=axes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, 2 * inter / np.where(den > 0, den, 1), np.nan)


def case_metrics(pred: np.ndarray, target: np.ndarray, spacing_mm: Sequence[float],
                 classes: Sequence[str]) -> dict:
    """3D metrics of one case-day.

    Args:
        pred, target: binary (D, C, H, W) volumes, slices in order along D.
        spacing_mm: (slice_thickness, row_mm, col_mm) of the voxels.
        classes: class names, length C.

    Returns:
        dict with ``dice_3d``, ``hd95_mm`` and ``hd95_penalized_mm`` (class name -> float; see
        :func:`penalized`), ``tp``/``fp``/``fn`` (voxel counts per class, list in class order:
        the case's share of the set-level counts, enough to bootstrap over cases and to tell a
        missed organ, ``tp + fn > 0 == tp + fp``, from a false alarm), ``kaggle_dice_rows``
        (the per-(slice, class) Dice values, NaN rows included, for pooling over cases),
        ``kaggle_dice`` (their nanmean), ``kaggle_hausdorff`` and ``kaggle_score`` for this case.
    """
    p, t = np.asarray(pred, bool), np.asarray(target, bool)
    if p.ndim != 4 or p.shape != t.shape or p.shape[1] != len(classes):
        raise ValueError(f"expected (D, {len(classes)}, H, W) volumes, got {p.shape} and {t.shape}")
    out = {"dice_3d": {}, "hd95_mm": {}, "hd95_penalized_mm": {}, "tp": [], "fp": [], "fn": []}
    penalty = volume_diagonal_mm(p.shape[:1] + p.shape[2:], spacing_mm)
    for c, name in enumerate(classes):
        out["dice_3d"][name] = dice_3d(p[:, c], t[:, c])
        out["hd95_mm"][name] = hd95(p[:, c], t[:, c], spacing_mm)
        out["hd95_penalized_mm"][name] = penalized(out["hd95_mm"][name], bool(p[:, c].any()),
                                                   bool(t[:, c].any()), penalty)
        out["tp"].append(int((p[:, c] & t[:, c]).sum()))
        out["fp"].append(int((p[:, c] & ~t[:, c]).sum()))
        out["fn"].append(int((~p[:, c] & t[:, c]).sum()))
    rows = kaggle_slice_dice(p, t).ravel()
    hd = kaggle_hausdorff(p.any(axis=1), t.any(axis=1))
    out["kaggle_dice_rows"] = rows
    out["kaggle_dice"] = _nanmean(rows)
    out["kaggle_hausdorff"] = hd
    out["kaggle_score"] = kaggle_score(rows, [hd])
    return out


def _nanmean(values) -> float:
    a = np.asarray(values, dtype=np.float64)
    a = a[~np.isnan(a)]
    return float(a.mean()) if a.size else math.nan


def kaggle_score(dice_rows, hausdorffs) -> float:
    """0.4 * nanmean(per-row Dice) + 0.6 * (1 - nanmean(per-case normalised Hausdorff)).

    A term with no defined value (all rows / cases empty-both) counts as perfect (Dice 1,
    Hausdorff 0), so an all-empty prediction of an all-empty set scores 1.
    """
    d = _nanmean(dice_rows)
    h = _nanmean(hausdorffs)
    d = 1.0 if math.isnan(d) else d
    h = 0.0 if math.isnan(h) else h
    return 0.4 * d + 0.6 * (1.0 - h)


@dataclass
class _CaseBuffer:
    key: tuple
    spacing_mm: tuple[float, float, float]
    slices: list[int]
    preds: list[np.ndarray]
    targets: list[np.ndarray]


class CaseMetricsAccumulator:
    """Per-case 3D metrics from a stream of slices, holding **one case-day at a time**.

    Feed slices in an order where each case-day is contiguous (the validation set is read case by
    case); when the key changes the buffered volume is scored and dropped, so memory is bounded
    by one case-day volume at the evaluation resolution (D × C × S × S booleans, e.g. 144 × 3 ×
    256 × 256 ≈ 28 MB), not by the dataset. A case-day that reappears after it was closed is an
    error (its volume would be split).
    """

    def __init__(self, classes: Sequence[str], slice_thickness_mm: float = 3.0) -> None:
        if slice_thickness_mm <= 0:
            raise ValueError(f"slice_thickness_mm must be > 0, got {slice_thickness_mm}")
        self.classes = list(classes)
        self.slice_thickness_mm = slice_thickness_mm
        self.cases: list[dict] = []
        self._buf: _CaseBuffer | None = None
        self._done: set[tuple] = set()

    def add(self, key: tuple, slice_index: int, pred: np.ndarray, target: np.ndarray,
            pixel_mm: tuple[float, float], slice_mm: float | None = None) -> None:
        """Add one slice: ``pred``/``target`` binary (C, H, W); ``pixel_mm`` = (row, col) size
        of a pixel of these arrays in mm (the original spacing scaled by the resize);
        ``slice_mm``: this volume's slice spacing (default ``slice_thickness_mm``)."""
        if self._buf is None or self._buf.key != key:
            self._flush()
            if key in self._done:
                raise ValueError(f"case-day {key} is not contiguous in the evaluation order")
            depth = self.slice_thickness_mm if slice_mm is None else float(slice_mm)
            spacing = (depth, float(pixel_mm[0]), float(pixel_mm[1]))
            self._buf = _CaseBuffer(key, spacing, [], [], [])
        self._buf.slices.append(int(slice_index))
        self._buf.preds.append(np.asarray(pred, bool))
        self._buf.targets.append(np.asarray(target, bool))

    def _flush(self) -> None:
        if self._buf is None:
            return
        b, self._buf = self._buf, None
        order = np.argsort(b.slices, kind="stable")
        pred = np.stack([b.preds[i] for i in order])
        target = np.stack([b.targets[i] for i in order])
        m = case_metrics(pred, target, b.spacing_mm, self.classes)
        m["key"] = b.key
        m["n_slices"] = len(order)
        self.cases.append(m)
        self._done.add(b.key)

    def finalize(self) -> dict:
        """Score the last case and return ``{"cases": [...], "summary": {...}}``; the summary has
        the mean 3D Dice, HD95 and penalised HD95 per class (NaN skipped), per class the number
        of case-days where the organ was missed (in the ground truth, none predicted) and of
        false alarms (predicted, not in the ground truth), and the Kaggle score over all cases."""
        self._flush()
        summary = {"dice_3d": {}, "hd95_mm": {}, "hd95_penalized_mm": {}, "missed": {},
                   "false_alarms": {}}
        for k, name in enumerate(self.classes):
            for key in ("dice_3d", "hd95_mm", "hd95_penalized_mm"):
                summary[key][name] = _nanmean([c[key][name] for c in self.cases])
            summary["missed"][name] = sum(c["tp"][k] + c["fn"][k] > 0 and c["tp"][k] + c["fp"][k]
                                          == 0 for c in self.cases)
            summary["false_alarms"][name] = sum(c["tp"][k] + c["fn"][k] == 0
                                                and c["tp"][k] + c["fp"][k] > 0
                                                for c in self.cases)
        summary["dice_3d_mean"] = _nanmean(list(summary["dice_3d"].values()))
        summary["hd95_mm_mean"] = _nanmean(list(summary["hd95_mm"].values()))
        summary["hd95_penalized_mm_mean"] = _nanmean(list(summary["hd95_penalized_mm"].values()))
        rows = np.concatenate([c["kaggle_dice_rows"] for c in self.cases]) if self.cases else []
        hds = [c["kaggle_hausdorff"] for c in self.cases]
        summary["kaggle_dice"] = _nanmean(rows)
        summary["kaggle_hausdorff"] = _nanmean(hds)
        summary["kaggle_score"] = kaggle_score(rows, hds)
        cases = [{k: v for k, v in c.items() if k != "kaggle_dice_rows"} for c in self.cases]
        return {"cases": cases, "summary": summary}
