"""The statistics behind the report's verdicts: a paired difference between two variants with a
95% confidence interval from both sources of noise, and what it allows one to conclude.

A comparison of variant B (e.g. KV) against A (QKV) of one family uses, per seed ``s`` (the
same seed means the same initial data order and the same validation cases), the per-case-day
pixel counts ``tp, fp, fn`` per class that ``kvseg evaluate`` stores (``cases`` in
results.json). The score of a set of case-days is computed from the summed counts (the Jaccard
of the whole validation set, as reported), so resampling case-days resamples exactly what the
score is made of.

- **Estimate**: Δ = mean over seeds of ``score_B(s) − score_A(s)`` on all validation cases.
- **Case noise**: a paired bootstrap over case-days: ``resamples`` draws of the case-days with
  replacement, the same draw for both variants and every seed; ``V_cases`` is the variance of
  Δ over the draws.
- **Seed (training) noise**: ``V_seeds = s² / n`` with ``s`` the sample standard deviation of
  the per-seed differences and ``n`` the number of paired seeds (needs n ≥ 2).
- **Interval**: Δ ± q · sqrt(V_cases + V_seeds), with q the 97.5% quantile of Student's t with
  the Welch-Satterthwaite degrees of freedom ``(V_cases + V_seeds)² (n − 1) / V_seeds²`` (the
  case part counts as known: many case-days; a normal quantile when V_seeds is 0). With one
  seed the interval holds the case noise only, and the report says so.

The two variances add because they are independent sources: which case-days were sampled into
validation, and how training went. With identical predictions the interval is [0, 0]; with a
constant shift it is that shift (tests).

**Verdict** against a non-inferiority margin δ (points; default 2):
``better`` when the lower bound > 0; ``not worse`` (non-inferior by δ) when the lower bound
> −δ; ``worse`` when the upper bound < 0; otherwise ``inconclusive`` (more seeds or data needed).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_MARGIN = 2.0
DEFAULT_RESAMPLES = 2000


@dataclass(frozen=True)
class Difference:
    """A paired difference B − A in points (100 × the score), with its 95% interval.

    Attributes:
        estimate: Δ on all cases, mean over seeds.
        low, high: the 95% confidence interval.
        seeds: number of paired seeds.
        cases: number of case-days resampled (0: no per-case data, seed noise only).
        seed_sd: sample standard deviation of the per-seed differences (NaN with one seed).
        case_se: standard error from the case bootstrap (NaN without per-case data).
    """

    estimate: float
    low: float
    high: float
    seeds: int
    cases: int
    seed_sd: float
    case_se: float

    def verdict(self, margin: float = DEFAULT_MARGIN) -> str:
        """``better``, ``not worse``, ``worse`` or ``inconclusive`` (see the module docstring)."""
        return verdict(self.low, self.high, margin)


def verdict(low: float, high: float, margin: float = DEFAULT_MARGIN) -> str:
    """What a 95% interval [low, high] of B − A (points) allows one to conclude."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return "inconclusive"
    if low > 0:
        return "better"
    if low > -margin:
        return "not worse"
    if high < 0:
        return "worse"
    return "inconclusive"


def verdict_sentence(v: str, margin: float = DEFAULT_MARGIN, what: str = "KV",
                     than: str = "QKV") -> str:
    """The verdict in words, as the report prints it."""
    return {
        "better": f"{what} better than {than} (the whole interval is above 0)",
        "not worse": f"{what} not worse than {than} (non-inferior by the {margin:g}-point "
                     "margin)",
        "worse": f"{what} worse than {than} (the whole interval is below 0)",
    }.get(v, "inconclusive — more seeds or data needed")


def scores_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray,
                       metric: str = "jaccard") -> np.ndarray:
    """Set-level scores from counts summed over cases: arrays (..., C) -> (...).

    ``jaccard``: mean over classes of TP / (TP + FP + FN) (1 where a class is absent in both);
    ``weighted_jaccard``: weighted by the ground-truth pixels TP + FN (the plain mean where there
    are none). The conventions of :mod:`kvseg.metrics`.
    """
    tp, fp, fn = (np.asarray(a, dtype=np.float64) for a in (tp, fp, fn))
    den = tp + fp + fn
    per_class = np.where(den > 0, tp / np.where(den > 0, den, 1.0), 1.0)
    if metric == "jaccard":
        return per_class.mean(axis=-1)
    if metric == "weighted_jaccard":
        w = tp + fn
        total = w.sum(axis=-1)
        weighted = (per_class * w).sum(axis=-1) / np.where(total > 0, total, 1.0)
        return np.where(total > 0, weighted, per_class.mean(axis=-1))
    raise ValueError(f"metric {metric!r}: expected jaccard or weighted_jaccard")


def case_counts(cases: Sequence[Mapping]) -> tuple[list[tuple], np.ndarray]:
    """``(keys, counts (K, 3, C))`` from a row's ``cases`` (tp, fp, fn per case-day)."""
    keys = [(int(c["case"]), int(c["day"])) for c in cases]
    counts = np.array([[c["tp"], c["fp"], c["fn"]] for c in cases], dtype=np.float64)
    return keys, counts


Run = Sequence[Mapping] | float  # one seed's per-case counts, or its score


def paired_difference(a: Sequence[Run], b: Sequence[Run], *, metric: str = "jaccard",
                      resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> Difference:
    """Δ = B − A in points with its 95% interval (see the module docstring).

    Args:
        a, b: per paired seed (same order), either the run's ``cases`` list (per case-day
            ``case``, ``day``, ``tp``, ``fp``, ``fn``) or, when no per-case data exists, the
            run's score (0–1). Per-case data is used only when every run has it for the same
            case-days.
        metric: ``jaccard`` or ``weighted_jaccard``.
        resamples: bootstrap draws of the case-days.
        seed: the bootstrap's random seed (the interval is reproducible).
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"need the same number (>= 1) of paired seeds, got {len(a)} and {len(b)}")
    n = len(a)
    with_cases = all(isinstance(x, Sequence) and not isinstance(x, str) and len(x) > 0
                     for x in (*a, *b))
    if with_cases:
        keys_a = [case_counts(x)[0] for x in a]
        keys_b = [case_counts(x)[0] for x in b]
        with_cases = all(k == keys_a[0] for k in keys_a + keys_b)
    if with_cases:
        ca = np.stack([case_counts(x)[1] for x in a])  # (S, K, 3, C)
        cb = np.stack([case_counts(x)[1] for x in b])
        k = ca.shape[1]
        full_a = scores_from_counts(*np.moveaxis(ca.sum(axis=1), -2, 0), metric=metric)
        full_b = scores_from_counts(*np.moveaxis(cb.sum(axis=1), -2, 0), metric=metric)
        per_seed = 100.0 * (full_b - full_a)  # (S,)
        rng = np.random.default_rng(seed)
        weights = rng.multinomial(k, np.full(k, 1.0 / k), size=resamples).astype(np.float64)
        # (B, K) x (S, K, 3, C) -> (B, S, 3, C): the counts of each resampled validation set
        sa = np.einsum("bk,skxc->bsxc", weights, ca)
        sb = np.einsum("bk,skxc->bsxc", weights, cb)
        boot = 100.0 * (scores_from_counts(*np.moveaxis(sb, -2, 0), metric=metric)
                        - scores_from_counts(*np.moveaxis(sa, -2, 0), metric=metric))
        v_cases = float(boot.mean(axis=1).var(ddof=1)) if resamples > 1 else 0.0
    else:
        k = 0
        per_seed = 100.0 * (np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64))
        v_cases = math.nan
    estimate = float(per_seed.mean())
    seed_sd = float(per_seed.std(ddof=1)) if n > 1 else math.nan
    v_seeds = seed_sd**2 / n if n > 1 else math.nan
    low, high = _interval(estimate, v_cases, v_seeds, n)
    return Difference(estimate, low, high, n, k, seed_sd,
                      math.sqrt(v_cases) if math.isfinite(v_cases) else math.nan)


def _interval(estimate: float, v_cases: float, v_seeds: float, n: int) -> tuple[float, float]:
    from scipy import stats

    vc = v_cases if math.isfinite(v_cases) else 0.0
    vs = v_seeds if math.isfinite(v_seeds) else 0.0
    if not math.isfinite(v_cases) and not math.isfinite(v_seeds):
        return math.nan, math.nan  # one seed and no per-case data: no noise estimate at all
    total = vc + vs
    if vs > 0:
        df = total**2 * (n - 1) / vs**2
        q = float(stats.t.ppf(0.975, df))
    else:
        q = float(stats.norm.ppf(0.975))
    half = q * math.sqrt(total)
    return estimate - half, estimate + half


__all__ = ["DEFAULT_MARGIN", "DEFAULT_RESAMPLES", "Difference", "case_counts",
           "paired_difference", "scores_from_counts", "verdict", "verdict_sentence"]
