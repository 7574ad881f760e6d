"""kvseg.experiments.stats: the paired difference with its interval, checked on constructed cases
and against independent references (scipy's t interval, scikit-learn's Jaccard, a naive bootstrap
loop)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import stats as sps
from sklearn.metrics import jaccard_score

from kvseg.experiments.stats import paired_difference, scores_from_counts, verdict


def _cases(counts):
    """[(tp, fp, fn) per class] per case-day -> a row's ``cases`` list."""
    return [{"case": i, "day": 0, "tp": [c[0] for c in per], "fp": [c[1] for c in per],
             "fn": [c[2] for c in per]} for i, per in enumerate(counts)]


def _random_cases(rng, k=12, c=3):
    return _cases([[tuple(int(v) for v in rng.integers(0, 50, 3)) for _ in range(c)]
                   for _ in range(k)])


def test_identical_predictions_give_a_zero_width_interval_at_zero():
    rng = np.random.default_rng(0)
    runs = [_random_cases(rng) for _ in range(3)]
    d = paired_difference(runs, runs, resamples=500)
    assert (d.estimate, d.low, d.high) == (0.0, 0.0, 0.0)
    assert d.cases == 12 and d.seeds == 3


def test_a_constant_shift_is_the_interval():
    # every case-day of A has Jaccard 0.5, of B 0.75, in any resample: a 25-point shift
    a = _cases([[(10, 0, 10)] * 2 for _ in range(8)])
    b = _cases([[(15, 0, 5)] * 2 for _ in range(8)])
    d = paired_difference([a, a], [b, b], resamples=300)
    assert d.estimate == pytest.approx(25.0)
    assert d.low == pytest.approx(25.0) and d.high == pytest.approx(25.0)
    assert d.verdict() == "better"


def test_seeds_only_interval_is_the_t_interval_of_the_paired_differences():
    a, b = [0.50, 0.54, 0.52, 0.49], [0.53, 0.55, 0.57, 0.50]
    diffs = 100 * (np.array(b) - np.array(a))
    want = sps.t.interval(0.95, len(diffs) - 1, loc=diffs.mean(), scale=sps.sem(diffs))
    d = paired_difference(a, b)
    assert d.estimate == pytest.approx(diffs.mean())
    assert (d.low, d.high) == pytest.approx(want)
    assert d.cases == 0 and d.seed_sd == pytest.approx(diffs.std(ddof=1))


def test_case_bootstrap_matches_a_naive_loop():
    rng = np.random.default_rng(3)
    a, b = _random_cases(rng, k=9), _random_cases(rng, k=9)
    d = paired_difference([a], [b], resamples=400, seed=7)
    # the same draws, written out: multinomial counts -> summed counts -> Jaccard
    draws = np.random.default_rng(7).multinomial(9, np.full(9, 1 / 9), size=400)
    deltas = []
    for w in draws:
        def score(cases, w=w):
            tp = sum(wi * np.array(c["tp"]) for wi, c in zip(w, cases, strict=True))
            fp = sum(wi * np.array(c["fp"]) for wi, c in zip(w, cases, strict=True))
            fn = sum(wi * np.array(c["fn"]) for wi, c in zip(w, cases, strict=True))
            den = tp + fp + fn
            return np.mean([t / x if x else 1.0 for t, x in zip(tp, den, strict=True)])
        deltas.append(100 * (score(b) - score(a)))
    se = np.std(deltas, ddof=1)
    assert d.case_se == pytest.approx(se)
    assert (d.low, d.high) == pytest.approx((d.estimate - 1.959964 * se,
                                             d.estimate + 1.959964 * se), rel=1e-5)


def test_scores_from_counts_equal_scikit_learn():
    rng = np.random.default_rng(1)
    y = rng.random((500, 3)) < 0.3
    p = rng.random((500, 3)) < 0.35
    p[:, 2] = False
    y[:, 2] = False  # a class absent in both: Jaccard 1 by kvseg's (and zero_division=1) rule
    tp, fp, fn = (p & y).sum(0), (p & ~y).sum(0), (~p & y).sum(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert scores_from_counts(tp, fp, fn) == pytest.approx(
            jaccard_score(y, p, average="macro", zero_division=1.0))
        assert scores_from_counts(tp, fp, fn, "weighted_jaccard") == pytest.approx(
            jaccard_score(y, p, average="weighted", zero_division=1.0))


@pytest.mark.parametrize("low, high, margin, want", [
    (0.5, 3.0, 2, "better"), (-1.0, 3.0, 2, "not worse"), (-1.9, -0.1, 2, "not worse"),
    (-5.0, -0.5, 2, "worse"), (-5.0, 1.0, 2, "inconclusive"), (-3.0, 1.0, 4, "not worse"),
    (math.nan, math.nan, 2, "inconclusive"),
])
def test_verdict_rules(low, high, margin, want):
    assert verdict(low, high, margin) == want


def test_more_seeds_narrow_the_interval():
    rng = np.random.default_rng(5)
    base = [0.6 + 0.02 * rng.standard_normal() for _ in range(12)]
    shifted = [x + 0.01 + 0.01 * rng.standard_normal() for x in base]
    wide = paired_difference(base[:3], shifted[:3])
    narrow = paired_difference(base, shifted)
    assert narrow.high - narrow.low < wide.high - wide.low
