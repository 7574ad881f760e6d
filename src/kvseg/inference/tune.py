"""``kvseg tune``: post-processing chosen on the run's validation fold, nnU-Net style.

Two choices per class, each kept only where it raises that class's validation Jaccard
(set-level, at ``img_size``, as ``kvseg train`` validates; a tie keeps the default):

1. multi-label runs: the probability threshold, from :data:`THRESHOLDS` (default: the run's
   own, 0.5 unless trained otherwise); multi-class runs take the argmax;
2. the minimum size of a connected component (8-connected, pixels at ``img_size``), from
   :data:`MIN_SIZES` (0: keep every component); smaller components become background.

The search costs two passes over the validation set: the thresholds from counts at every
candidate, then the sizes from each predicted component's size and overlap with the ground
truth (removing a component of ``n`` pixels, ``k`` of them true, takes ``k`` from TP and adds it
to FN, and takes ``n - k`` from FP). The result is ``RUN_DIR/postprocess.json``
(:mod:`kvseg.inference.postprocess`, written atomically), applied by ``kvseg evaluate`` and
``kvseg predict`` when present. Tuned on the validation fold, it makes that fold's scores
optimistic: report them on other data (``--split`` / ``--data``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from tqdm.auto import tqdm

from kvseg.data import build_dataset
from kvseg.errors import ConfigError, DataError
from kvseg.inference.postprocess import Postprocess, write_postprocess
from kvseg.inference.tta import check_tta, tta_probabilities
from kvseg.training.checkpoint import open_run
from kvseg.training.metrics import jaccard_from_counts, target_masks
from kvseg.utils import check_number, resolve_device

log = logging.getLogger(__name__)

#: Candidate thresholds (multi-label).
THRESHOLDS = tuple(round(0.1 + 0.05 * i, 2) for i in range(17))
#: Candidate minimum component sizes, in pixels at the model's resolution.
MIN_SIZES = (0, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_CONNECTIVITY = np.ones((3, 3), dtype=bool)


def _batches(model, loader, tta: str, task: str, dev: torch.device, desc: str):
    """``(probabilities (B, C, S, S), target class masks (B, K, S, S) bool)`` on the CPU."""
    with torch.inference_mode():
        for batch in tqdm(loader, desc=desc, leave=False, disable=None):
            probs = tta_probabilities(model, batch["image"].to(dev), tta, task).cpu()
            yield probs, target_masks(batch["mask"] > 0.5, task)


def _masks(probs: torch.Tensor, task: str, thresholds: torch.Tensor | None) -> torch.Tensor:
    if task == "multiclass":
        labels = probs.argmax(1, keepdim=True)
        return labels == torch.arange(1, probs.shape[1]).view(1, -1, 1, 1)
    return probs >= thresholds.view(1, -1, 1, 1)


def _threshold_counts(batches, k: int, candidates: torch.Tensor) -> torch.Tensor:
    """(T, 3, K) TP, FP, FN of every candidate threshold."""
    counts = torch.zeros(len(candidates), 3, k, dtype=torch.int64)
    for probs, target in batches:
        for i, t in enumerate(candidates):
            pred = probs >= t
            counts[i, 0] += (pred & target).sum((0, 2, 3))
            counts[i, 1] += (pred & ~target).sum((0, 2, 3))
            counts[i, 2] += (~pred & target).sum((0, 2, 3))
    return counts


def _size_counts(batches, k: int, task: str, thresholds: torch.Tensor | None) -> torch.Tensor:
    """(len(MIN_SIZES), 3, K) TP, FP, FN after removing the components below each size."""
    base = torch.zeros(3, k, dtype=torch.int64)
    comps: list[list[tuple[int, int]]] = [[] for _ in range(k)]  # (size, true pixels)
    for probs, target in batches:
        pred = _masks(probs, task, thresholds)
        base += torch.stack([(pred & target).sum((0, 2, 3)), (pred & ~target).sum((0, 2, 3)),
                             (~pred & target).sum((0, 2, 3))])
        p, t = pred.numpy(), target.numpy()
        for b in range(p.shape[0]):
            for c in range(k):
                labels, n = ndimage.label(p[b, c], structure=_CONNECTIVITY)
                if n:
                    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
                    hits = np.bincount(labels.ravel(), weights=t[b, c].ravel(),
                                       minlength=n + 1)[1:]
                    comps[c] += zip(sizes.tolist(), hits.astype(int).tolist(), strict=True)
    out = base.repeat(len(MIN_SIZES), 1, 1)
    for c in range(k):
        sizes = np.array([s for s, _ in comps[c]], dtype=np.int64).reshape(-1)
        hits = np.array([h for _, h in comps[c]], dtype=np.int64).reshape(-1)
        for i, m in enumerate(MIN_SIZES):
            drop = sizes < m
            tp, n = int(hits[drop].sum()), int(sizes[drop].sum())
            out[i, :, c] += torch.tensor([-tp, -(n - tp), tp])
    return out


def _pick(counts: torch.Tensor, default: int) -> tuple[list[int], torch.Tensor]:
    """Per class, the candidate index of the best Jaccard (``default`` unless strictly better),
    and the Jaccard per class of the picks."""
    scores = torch.stack([jaccard_from_counts(*c) for c in counts])  # (N, K)
    picks = []
    for c in range(scores.shape[1]):
        best = int(scores[:, c].argmax())
        picks.append(best if scores[best, c] > scores[default, c] + 1e-12 else default)
    return picks, scores[picks, torch.arange(scores.shape[1])]


def tune_run(run: str | os.PathLike, data: str | None = None, tta: str = "none",
             device: str = "auto", batch_size: int = 8) -> str:
    """Choose and store the post-processing of ``run`` (see the module docstring); returns a
    short report (Jaccard per class before and after)."""
    check_tta(tta)
    check_number("batch_size", batch_size, integer=True, minimum=1)
    dev = resolve_device(device)
    model, config = open_run(run, map_location=dev)
    root = data or config.data
    if not root or not Path(root).is_dir():
        raise ConfigError(f"--data {root}: dataset root not found; pass --data DIR")
    ds = build_dataset({**config, "data": str(root)}, "val", augment=False)
    if len(ds) == 0:
        raise DataError(f"the validation split of {root} is empty")
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)
    task, k = config.task, len(config.classes)
    thresholds = None
    before = None
    if task == "multilabel":
        candidates = torch.tensor(sorted({*THRESHOLDS, config.threshold}))
        default = int((candidates - config.threshold).abs().argmin())
        counts = _threshold_counts(_batches(model, loader, tta, task, dev, "thresholds"), k,
                                   candidates)
        before = jaccard_from_counts(*counts[default])
        picks, _ = _pick(counts, default)
        thresholds = candidates[picks]
    counts = _size_counts(_batches(model, loader, tta, task, dev, "component sizes"), k, task,
                          thresholds)
    before = jaccard_from_counts(*counts[0]) if before is None else before
    picks, after = _pick(counts, 0)
    post = Postprocess(tuple(config.classes),
                       None if thresholds is None else tuple(round(float(t), 4)
                                                             for t in thresholds),
                       tuple(MIN_SIZES[i] for i in picks))
    path = write_postprocess(run, post, tuned_on=f"validation fold {config.fold} of "
                             f"{config.n_folds} ({len(ds)} slices)", tta=tta,
                             metric="jaccard", jaccard_before=before.tolist(),
                             jaccard_after=after.tolist())
    lines = [f"{'class':<16}{'threshold':>10}{'min size':>10}{'jaccard':>9}{'tuned':>9}"]
    for c, name in enumerate(config.classes):
        t = "-" if post.thresholds is None else f"{post.thresholds[c]:g}"
        lines.append(f"{name:<16}{t:>10}{post.min_size[c]:>10}{float(before[c]):>9.4f}"
                     f"{float(after[c]):>9.4f}")
    lines.append(f"mean jaccard {float(before.mean()):.4f} -> {float(after.mean()):.4f} on the "
                 f"validation fold it was tuned on (optimistic) -> {path}")
    return "\n".join(lines)


__all__ = ["MIN_SIZES", "THRESHOLDS", "tune_run"]
