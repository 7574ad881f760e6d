"""``kvseg reproduce --cv``: k-fold cross-validation as the verdict's design.

Every variant and seed is trained once per fold k with fold k held out; the model keeps its
**last epoch** (the run validates once, after the last epoch, so nothing is selected on the
held-out patients) and predicts fold k. The out-of-fold per-scan counts of the k runs are pooled
into one result row per variant and seed, so every patient enters once per seed and the
statistics (:mod:`kvseg.experiments.stats`) see all the dataset's patients.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from kvseg.experiments.results import ResultRow, as_rows
from kvseg.experiments.stats import scores_from_counts

#: Training options a CV run sets per fold (the rest is the preset's).
CV_KEYS = ("fold", "val_every")


def fold_options(train_opts: Mapping, fold: int) -> dict:
    """A fold's training options: validation = the held-out fold ``fold``, validated only after
    the last epoch (``val_every`` = epochs), so ``best.safetensors`` is the last epoch."""
    epochs = int(train_opts.get("epochs", 20))
    return {**train_opts, "fold": int(fold), "val_every": epochs}


def _pool(rows: Sequence[ResultRow]) -> ResultRow:
    first = rows[0]
    if any(r.status != "ok" or not r.cases for r in rows):
        bad = next((r.status for r in rows if r.status != "ok"), "ok")
        return ResultRow(**{**first.to_dict(), "jaccard": math.nan,
                            "weighted_jaccard": math.nan, "dice": math.nan, "hd95": math.nan,
                            "kaggle_score": math.nan, "hd95_penalized": math.nan,
                            "cases": None, "status": bad if bad != "ok" else "no per-scan counts"})
    cases = [c for r in rows for c in r.cases]
    tp, fp, fn = (np.sum([c[k] for c in cases], axis=0) for k in ("tp", "fp", "fn"))
    hd = np.array([[math.nan if v is None else v for v in c.get("hd95_mm", [])] for c in cases],
                  dtype=np.float64)
    finite = np.isfinite(hd)
    per_class = np.where(finite.any(0), np.where(finite, hd, 0).sum(0)
                         / np.maximum(finite.sum(0), 1), math.nan) if hd.size \
        else np.array([math.nan])
    n = [len(r.cases) for r in rows]

    def weighted(name: str) -> float:
        values = [getattr(r, name) for r in rows]
        return float(np.average(values, weights=n)) if all(map(math.isfinite, values)) \
            else math.nan

    return ResultRow(**{
        **first.to_dict(), "cases": cases,
        "jaccard": float(scores_from_counts(tp, fp, fn, "jaccard")),
        "weighted_jaccard": float(scores_from_counts(tp, fp, fn, "weighted_jaccard")),
        "dice": float(scores_from_counts(tp, fp, fn, "dice")),
        "hd95": float(np.nanmean(per_class)) if np.isfinite(per_class).any() else math.nan,
        "kaggle_score": weighted("kaggle_score"), "hd95_penalized": weighted("hd95_penalized"),
        "train_seconds": float(sum(r.train_seconds for r in rows)),
        "steps": sum(r.steps or 0 for r in rows),
        "missed": sum(r.missed or 0 for r in rows),
        "false_alarms": sum(r.false_alarms or 0 for r in rows)})


def pool_folds(rows_by_fold: Mapping[int, Sequence[ResultRow | Mapping]]) -> list[dict]:
    """One row per (model, seed) from the folds' rows (fold -> rows): the out-of-fold scans of
    every fold together; Jaccard, weighted Jaccard and Dice from the pooled counts, HD95 the
    mean over classes of the per-class mean over scans (as ``kvseg evaluate``), train seconds,
    steps, missed organs and false alarms summed. A patient in two folds is an error."""
    grouped: dict[tuple, list[ResultRow]] = {}
    for fold in sorted(rows_by_fold):
        for r in as_rows(rows_by_fold[fold]):
            grouped.setdefault((r.model, r.seed), []).append(r)
    out = []
    for (model, seed), rows in grouped.items():
        seen: dict[str, int] = {}
        for k, r in enumerate(rows):
            for c in r.cases or []:
                if seen.setdefault(str(c["case"]), k) != k:
                    raise ValueError(f"{model} seed {seed}: patient {c['case']} was scored in "
                                     "two folds")
        out.append(_pool(rows).to_dict())
    return out


__all__ = ["CV_KEYS", "fold_options", "pool_folds"]
