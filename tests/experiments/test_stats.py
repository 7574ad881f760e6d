"""kvseg.experiments.stats: the paired difference with its interval, checked on constructed
cases and against independent references (scipy's t interval, scikit-learn's Jaccard and
Dice, explicit loops)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import stats as sps
from sklearn.metrics import f1_score, jaccard_score

from kvseg.experiments import stats
from kvseg.experiments.stats import (
    Difference,
    holm,
    holm_adjust,
    p_values,
    paired_difference,
    patient_totals,
    pseudo_values,
    scores_from_counts,
    two_way,
    verdict,
    verdict_sentence,
)


def _scans(rng, patients=8, days=2, c=3, shift=0):
    """Per-scan count dicts: ``patients`` x ``days`` scans, counts around 50 per class."""
    return [{"case": p, "day": d, "tp": [int(v) for v in rng.integers(20 + shift, 80, c)],
             "fp": [int(v) for v in rng.integers(0, 30, c)],
             "fn": [int(v) for v in rng.integers(0, 30, c)]}
            for p in range(patients) for d in range(days)]


def _runs(seed=0, seeds=3, patients=8, days=2):
    rng = np.random.default_rng(seed)
    a = [_scans(rng, patients, days) for _ in range(seeds)]
    b = [_scans(rng, patients, days, shift=5) for _ in range(seeds)]
    return a, b


def _jaccard(scans):
    """The set-level Jaccard written out: counts summed over scans, per class, mean."""
    tp = np.sum([s["tp"] for s in scans], 0)
    den = tp + np.sum([s["fp"] for s in scans], 0) + np.sum([s["fn"] for s in scans], 0)
    return float(np.mean(tp / den))


def test_estimate_is_the_mean_over_seeds_of_the_set_level_difference():
    a, b = _runs(1)
    d = paired_difference(a, b)
    want = np.mean([100 * (_jaccard(y) - _jaccard(x)) for x, y in zip(a, b, strict=True)])
    assert d.estimate == pytest.approx(want, abs=1e-9)
    assert (d.seeds, d.patients, d.cases) == (3, 8, 16)
    assert d.low < d.estimate < d.high


def test_pseudo_values_are_the_jackknife_of_the_set_level_score():
    rng = np.random.default_rng(2)
    scans = _scans(rng, patients=5, days=3)
    _, _, totals = patient_totals(scans)
    pv = pseudo_values(totals)
    full = _jaccard(scans)
    loo = np.array([_jaccard([s for s in scans if s["case"] != p]) for p in range(5)])
    naive = 5 * full - 4 * loo  # jackknife pseudo-values, then centred on the full score
    assert pv == pytest.approx(naive - naive.mean() + full, abs=1e-12)
    assert pv.mean() == pytest.approx(full, abs=1e-12)


def test_identical_variants_give_zero():
    a, _ = _runs(3)
    d = paired_difference(a, a)
    assert d.estimate == pytest.approx(0, abs=1e-12)
    assert d.low == pytest.approx(0, abs=1e-9) and d.high == pytest.approx(0, abs=1e-9)


def test_a_constant_shift_is_the_interval():
    # every scan of A has Jaccard 0.5, of B 0.75, whatever the patient: a 25-point shift
    a = [{"case": p, "day": 0, "tp": [10, 10], "fp": [0, 0], "fn": [10, 10]} for p in range(6)]
    b = [{"case": p, "day": 0, "tp": [15, 15], "fp": [0, 0], "fn": [5, 5]} for p in range(6)]
    d = paired_difference([a, a], [b, b])
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
    assert d.cases == 0 and d.method == "seeds" and "no per-patient data" in d.note


def test_two_way_reduces_to_the_t_interval_of_each_margin():
    rng = np.random.default_rng(4)
    patient = rng.normal(0, 2, 9)  # every seed sees the same patient effects: a patient t
    d = np.tile(patient, (3, 1))
    fit = two_way(d)
    half = math.sqrt(sum(sps.t.ppf(0.975, df) ** 2 * v for v, df in fit.components))
    lo, hi = sps.t.interval(0.95, 8, loc=patient.mean(), scale=sps.sem(patient))
    assert (fit.mean - half, fit.mean + half) == pytest.approx((lo, hi))
    seed = rng.normal(0, 2, 4)  # every patient the same, seeds differ: a seed t
    fit = two_way(np.tile(seed[:, None], (1, 7)))
    half = math.sqrt(sum(sps.t.ppf(0.975, df) ** 2 * v for v, df in fit.components))
    lo, hi = sps.t.interval(0.95, 3, loc=seed.mean(), scale=sps.sem(seed))
    assert (fit.mean - half, fit.mean + half) == pytest.approx((lo, hi))


def test_two_way_variance_components_match_a_hand_written_anova():
    rng = np.random.default_rng(5)
    d = rng.normal(0, 1, (3, 6)) + rng.normal(0, 1, (1, 6)) + rng.normal(0, 2, (3, 1))
    s, p = d.shape
    g = d.mean()
    ss_s = sum(p * (d[i].mean() - g) ** 2 for i in range(s))
    ss_p = sum(s * (d[:, j].mean() - g) ** 2 for j in range(p))
    ss_e = sum((d[i, j] - d[i].mean() - d[:, j].mean() + g) ** 2
               for i in range(s) for j in range(p))
    ms_s, ms_p, ms_e = ss_s / (s - 1), ss_p / (p - 1), ss_e / ((s - 1) * (p - 1))
    fit = two_way(d)
    assert fit.var_resid == pytest.approx(ms_e)
    assert fit.var_seed == pytest.approx(max(ms_s - ms_e, 0) / p)
    assert fit.var_patient == pytest.approx(max(ms_p - ms_e, 0) / s)
    assert [v for v, _ in fit.components] == pytest.approx(
        [ms_s / (s * p), max(ms_p - ms_e, 0) / (s * p)])
    assert [df for _, df in fit.components] == [s - 1, p - 1]


def test_the_half_width_blends_banerjee_and_welch_by_hand():
    rng = np.random.default_rng(6)
    d = rng.normal(0, 1, (3, 8)) + rng.normal(0, 1.5, (1, 8)) + rng.normal(0, 1, (3, 1))
    fit = two_way(d)
    (v1, df1), (v2, df2) = fit.components
    assert v1 > 0 and v2 > 0
    banerjee = math.sqrt(sps.t.ppf(0.975, df1) ** 2 * v1 + sps.t.ppf(0.975, df2) ** 2 * v2)
    welch_df = (v1 + v2) ** 2 / (v1**2 / df1 + v2**2 / df2)
    welch = sps.t.ppf(0.975, welch_df) * math.sqrt(v1 + v2)
    assert welch < banerjee
    want = 0.7 * banerjee + 0.3 * welch
    assert stats._half_width(fit.components) == pytest.approx(want)
    lo, hi = stats._interval(fit.mean, fit.components)
    assert (lo, hi) == pytest.approx((fit.mean - want, fit.mean + want))


def test_splitting_scans_into_more_days_does_not_narrow_the_interval():
    a, b = _runs(6, days=1)

    def split(run):  # each scan's counts shared out over two days (half and the rest)
        out = []
        for x in run:
            half = {k: [v // 2 for v in x[k]] for k in ("tp", "fp", "fn")}
            out.append({"case": x["case"], "day": 0, **half})
            out.append({"case": x["case"], "day": 1,
                        **{k: [v - h for v, h in zip(x[k], half[k], strict=True)]
                           for k in ("tp", "fp", "fn")}})
        return out

    d1 = paired_difference(a, b)
    d2 = paired_difference([split(x) for x in a], [split(x) for x in b])
    assert d2.cases == 2 * d1.cases and d2.patients == d1.patients
    assert d2.high - d2.low >= (d1.high - d1.low) * (1 - 1e-9)
    assert (d2.estimate, d2.low, d2.high) == pytest.approx((d1.estimate, d1.low, d1.high))


def test_a_duplicated_patient_is_one_patient():
    a, b = _runs(7, patients=6, days=1)

    def dup(run):  # patient 0's scan listed a second time (another day label)
        return run + [{**run[0], "day": 5}]

    d = paired_difference([dup(x) for x in a], [dup(x) for x in b])
    assert d.patients == 6 and d.cases == 7
    merged = [[{**s, **{k: [2 * v for v in s[k]] for k in ("tp", "fp", "fn")}} if s["case"] == 0
               else s for s in x] for x in (*a, *b)]
    ref = paired_difference(merged[:3], merged[3:])  # the same patient with doubled counts
    assert (d.estimate, d.low, d.high) == pytest.approx((ref.estimate, ref.low, ref.high))


def test_two_patients_cannot_settle_a_margin():
    a, b = _runs(8, patients=2)
    d = paired_difference(a, b)
    assert d.patients == 2 and (d.low, d.high) == (-math.inf, math.inf)
    assert d.verdict() == "inconclusive" and "2 patients cannot settle" in d.reason
    assert "2 patients cannot settle" in verdict_sentence(d.verdict(), reason=d.reason)


def test_seeds_on_different_patients_fall_back_to_the_seeds():
    a, b = _runs(9, patients=6)
    a[1] = [{**s, "case": s["case"] + 100} for s in a[1]]
    b[1] = [{**s, "case": s["case"] + 100} for s in b[1]]
    d = paired_difference(a, b)
    assert d.method == "seeds" and "different patients" in d.note


def test_mixed_inputs_and_unknown_metric_are_errors():
    a, b = _runs(10)
    with pytest.raises(ValueError, match="either every run"):
        paired_difference([a[0], 0.5], [b[0], 0.6])
    with pytest.raises(ValueError, match="metric"):
        paired_difference(a, b, metric="iou")


def test_hd95_difference_is_the_difference_of_the_per_class_means():
    rng = np.random.default_rng(11)
    runs = []
    for _ in range(4):
        scans = _scans(rng, patients=5, days=2, c=2)
        for s in scans:
            s["hd95_mm"] = [float(v) for v in rng.uniform(2, 20, 2)]
        scans[0]["hd95_mm"][1] = None  # a missed organ: skipped, as kvseg.metrics does
        runs.append(scans)

    def hd(scans):
        vals = np.array([[np.nan if v is None else v for v in s["hd95_mm"]] for s in scans])
        return np.nanmean(vals, axis=0).mean()

    d = paired_difference(runs[:2], runs[2:], metric="hd95")
    want = np.mean([hd(y) - hd(x) for x, y in zip(runs[:2], runs[2:], strict=True)])
    assert d.estimate == pytest.approx(want)


def test_scores_from_counts_equal_scikit_learn():
    rng = np.random.default_rng(1)
    y = rng.random((500, 3)) < 0.3
    p = rng.random((500, 3)) < 0.35
    p[:, 2] = False
    y[:, 2] = False  # a class absent in both: score 1 by kvseg's (and zero_division=1) rule
    tp, fp, fn = (p & y).sum(0), (p & ~y).sum(0), (~p & y).sum(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert scores_from_counts(tp, fp, fn) == pytest.approx(
            jaccard_score(y, p, average="macro", zero_division=1.0))
        assert scores_from_counts(tp, fp, fn, "weighted_jaccard") == pytest.approx(
            jaccard_score(y, p, average="weighted", zero_division=1.0))
        assert scores_from_counts(tp, fp, fn, "dice") == pytest.approx(
            f1_score(y, p, average="macro", zero_division=1.0))


@pytest.mark.parametrize("low, high, margin, want", [
    (0.5, 3.0, 2, "better"), (-1.0, 3.0, 2, "not worse"), (-1.9, 0.0, 2, "not worse"),
    (-1.9, -0.1, 2, "worse within margin"), (-5.0, -0.5, 2, "worse"),
    (-2.0, -0.5, 2, "worse"), (-5.0, 1.0, 2, "inconclusive"), (-2.0, 1.0, 2, "inconclusive"),
    (-3.0, 1.0, 4, "not worse"), (math.nan, math.nan, 2, "inconclusive"),
    (-math.inf, math.inf, 2, "inconclusive"),
])
def test_verdict_rules(low, high, margin, want):
    assert verdict(low, high, margin) == want


def _normal(estimate, se):
    """A Difference whose interval is the normal one, estimate ± z se (df huge)."""
    z = sps.norm.ppf(0.975)
    return Difference(estimate, estimate - z * se, estimate + z * se, 3, 0, math.nan, math.nan,
                      se=se, df=math.inf, components=((se**2, 1e12),))


def test_holm_adjusted_p_values_by_hand():
    # sorted 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1, but >= 0.06)
    assert holm_adjust([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])


def test_shaffer_counts_each_exclusive_group_once():
    # groups a, a, b: sorted 0.01 (a), 0.02 (a), 0.03 (b) -> x2, x2 (a and b left), x1
    assert holm_adjust([0.01, 0.02, 0.03], groups=["a", "a", "b"]) == pytest.approx(
        [0.02, 0.04, 0.04])


def test_holm_verdicts_by_hand():
    # normal intervals; p_zero = 2(1 − Φ(|Δ|/se)), p_margin = 2(1 − Φ((Δ + 2)/se)):
    # 1: Δ 3.0 ± 1    -> better;    p_zero 0.00270, p_margin 5.7e-7
    # 2: Δ 2.2 ± 1    -> better;    p_zero 0.02781, p_margin 2.7e-5
    # 3: Δ −0.5 ± 0.75 -> not worse; p_zero 0.50499, p_margin 0.04550
    # sorted: 1M, 2M, 1Z (x3 comparisons left) = 0.0081; 2Z (x2: 2 and 3 left) = 0.0556;
    # 3M (x1) -> max(0.0556, 0.0455) = 0.0556; 3Z -> 0.505
    ds = [_normal(3.0, 1.0), _normal(2.2, 1.0), _normal(-0.5, 0.75)]
    assert [d.verdict() for d in ds] == ["better", "better", "not worse"]
    out = holm(ds)
    assert [h.verdict for h in out] == ["better", "not worse", "inconclusive"]
    assert [h.p_zero for h in out] == pytest.approx([0.00270, 0.02781, 0.50499], abs=1e-5)
    assert out[2].p_margin == pytest.approx(0.04550, abs=1e-5)
    assert [h.p_zero_adjusted for h in out] == pytest.approx([0.0081, 0.0556, 0.505], abs=2e-4)
    assert out[2].p_margin_adjusted == pytest.approx(0.0556, abs=2e-4)


def test_holm_of_one_comparison_is_the_unadjusted_verdict():
    for est, se in [(3.0, 1.0), (2.2, 1.0), (-0.5, 0.75), (-1.0, 0.3), (-4.0, 1.0), (0, 2)]:
        d = _normal(est, se)
        assert holm([d])[0].verdict == d.verdict()


def test_p_values_put_the_tested_value_on_the_interval_boundary():
    d = paired_difference(*_runs(12, seeds=3, patients=10))
    p_zero, p_margin = p_values(d)
    lo, _ = d.interval(1 - p_margin)
    assert lo == pytest.approx(-2.0, abs=1e-6)
    lo, hi = d.interval(1 - p_zero)
    assert min(abs(lo), abs(hi)) == pytest.approx(0, abs=1e-6)


def test_an_undefined_score_for_some_patients_is_inconclusive_not_an_error():
    """HD95 (one organ) that only one patient's scans define: leaving that patient out leaves no
    finite value, so its pseudo-value is undefined -> no interval, with the reason."""
    def run(shift):
        return [{"case": p, "day": 0, "tp": [5], "fp": [1], "fn": [1],
                 "hd95_mm": [3.0 + shift if p == 0 else None]} for p in range(4)]

    d = paired_difference([run(0), run(0.1)], [run(0.5), run(0.2)], metric="hd95")
    assert d.verdict() == "inconclusive" and "undefined" in d.reason
    assert math.isinf(d.low) and math.isfinite(d.estimate)
