"""The statistics behind the report's verdicts: a paired difference between two variants with a
95% confidence interval whose coverage is measured (``benchmarks/stats_coverage.py``), what it
allows one to conclude, and Holm's correction over the comparisons of one report.

**Estimand.** For variants A (e.g. QKV) and B (e.g. KV) of one family, θ = the difference
B − A of the set-level score (Jaccard, weighted Jaccard, Dice: computed from pixel counts
summed over all scans; HD95: the mean of the per-scan values) over the *population of
patients*, averaged over training seeds. Points (100 × score) for the overlap scores, mm for
HD95. The **patient** (``case``) is the unit: all scans (``day``) and slices of a patient move
together; a case id that appears in several scans (or twice) is one patient.

**Method** (per-patient pseudo-values in a two-way crossed random-effects model):

1. Per seed and variant, the scans are summed per patient into additive totals (``tp, fp, fn``
   per class; for HD95 the sum and number of finite values per class). The set-level score is a
   smooth function ``f`` of the totals summed over patients — a ratio, not a mean of
   per-patient scores — so each patient's share is linearised by the jackknife: the pseudo-value
   ``P f(all) − (P − 1) f(all but p)``, centred so that the P pseudo-values average exactly to
   the set-level score of that seed.
2. ``D[s, p]`` = 100 × (pseudo-value of B − pseudo-value of A) for seed s and patient p: a
   seeds × patients table whose grand mean is the estimate Δ = mean over seeds of
   ``score_B(s) − score_A(s)`` (the naive formula).
3. ``D[s, p] = θ + a_s + b_p + e_sp`` (seed × variant, patient × variant and seed × patient ×
   variant effects). With the mean squares MS_s, MS_p, MS_e of the two-way table (S − 1, P − 1
   and (S − 1)(P − 1) degrees of freedom), ``Var(Δ) = σ²_e/(SP) + σ²_a/S + σ²_b/P`` is
   estimated in two parts: ``MS_s/(SP)`` (the seed rows' spread, unbiased for
   σ²_e/(SP) + σ²_a/S with S − 1 df: the seed means differ only by the i.i.d. a_s + ē_s, whatever
   the seed/interaction mix) and ``max(MS_p − MS_e, 0)/(SP)`` (the patients' shared part
   σ²_b/P, P − 1 df).
4. 95% interval ``Δ ± h``, ``h = 0.7·sqrt(Σ t²(0.975, df_i)·v_i) + 0.3·t(0.975, df_W)·sqrt(Σ v_i)``
   over the two parts: Banerjee's per-source quantiles (three seeds get t(2) however many
   patients there are; conservative, up to 0.97-0.98 when seeds and patients weigh alike)
   blended with Welch-Satterthwaite's df_W (liberal when a 2-df seed part is small by chance,
   down to 0.93). The weight 0.3 was chosen on the balanced normal model and the coverage is
   measured by ``benchmarks/stats_coverage.py``. With one part (one seed, or no patient part)
   both terms are that part's exact t interval.

One seed: the table has one row; ``SE² = MS_p / P`` with P − 1 degrees of freedom, and the
result notes that training noise is not in the interval. Fewer than :data:`MIN_PATIENTS` (3)
patients: one degree of freedom cannot estimate the patient variance, so the interval is
(−∞, +∞) and the verdict is inconclusive with that reason ("2 patients cannot settle a margin").
Without per-scan data (scores only, or runs that do not share their patients) the interval is
Student's t over the per-seed differences: training noise only, for these patients.

**Verdict** against a non-inferiority margin δ (points; default 2): ``better`` when the lower
bound > 0; ``worse`` when the upper bound < 0 (``worse within margin`` when the lower bound is
also > −δ); ``not worse`` when the lower bound > −δ and the interval reaches 0; otherwise
``inconclusive``.

**Multiplicity**: :func:`holm` gives family-wise 95% verdicts for the comparisons of one report:
Holm's step-down (with Shaffer's count) over each comparison's two tests, Δ = 0 and Δ ≤ −δ, from
the same noise components as the interval; the unadjusted interval stays in the Difference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

DEFAULT_MARGIN = 2.0
DEFAULT_RESAMPLES = 2000  # kept for callers; the interval is analytic and draws nothing
#: Fewer patients than this: no interval (one df cannot estimate the patient variance)
MIN_PATIENTS = 3
ALPHA = 0.05
#: Weight of the Welch-Satterthwaite half-width against Banerjee's in :func:`_half_width`:
#: chosen on the balanced normal two-way model (benchmarks/stats_blend.py: coverage 0.949-0.968
#: over the coverage benchmark's settings, up to 0.976 where seeds and patients weigh alike at
#: 3 seeds x 6 patients; 0 gives up to 0.981, 1 down to 0.926) and checked by
#: benchmarks/stats_coverage.py
WELCH_WEIGHT = 0.3
#: Metrics :func:`paired_difference` knows; the scale of their differences (points or mm).
METRICS = {"jaccard": 100.0, "weighted_jaccard": 100.0, "dice": 100.0, "hd95": 1.0}
VERDICTS = ("better", "not worse", "worse within margin", "worse", "inconclusive")


@dataclass(frozen=True)
class Difference:
    """A paired difference B − A (points; mm for HD95) with its 95% interval.

    Attributes:
        estimate: Δ, the mean over seeds of the set-level difference on all patients.
        low, high: the 95% confidence interval (±inf when it cannot be had: see ``reason``).
        seeds: number of paired seeds.
        cases: number of scans (case-days) behind each seed's score (0: no per-scan data).
        seed_sd: sample standard deviation of the per-seed differences (NaN with one seed).
        case_se: the patient part of the standard error, sqrt(σ²_b / P) (NaN without per-patient
            data).
        patients: number of patients (0: no per-scan data).
        se: the standard error of Δ; df: the degrees of freedom of the single t quantile
            that gives the same 95% interval (inf: the normal quantile).
        method: ``patients x seeds``, ``patients (one seed)``, ``seeds`` or ``none``.
        reason: why no conclusion is possible ('' when one is); makes the verdict inconclusive.
        note: a caveat that does not block the verdict ('' when none).
        components: (variance, degrees of freedom) of each source of noise in Var(Δ): the
            intervals at any level are made from them.
    """

    estimate: float
    low: float
    high: float
    seeds: int
    cases: int
    seed_sd: float
    case_se: float
    patients: int = 0
    se: float = math.nan
    df: float = math.nan
    method: str = "none"
    reason: str = ""
    note: str = ""
    components: Components = ()

    def verdict(self, margin: float = DEFAULT_MARGIN) -> str:
        """One of :data:`VERDICTS` (see the module docstring); inconclusive when ``reason``."""
        return "inconclusive" if self.reason else verdict(self.low, self.high, margin)

    def interval(self, level: float = 0.95) -> tuple[float, float]:
        """The two-sided interval at another confidence ``level`` (same SE and df)."""
        if self.reason:
            return -math.inf, math.inf
        return _interval(self.estimate, self.components, 1.0 - level)


def verdict(low: float, high: float, margin: float = DEFAULT_MARGIN) -> str:
    """What a 95% interval [low, high] of B − A (points) allows one to conclude."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return "inconclusive"
    if low > 0:
        return "better"
    if high < 0:
        return "worse within margin" if low > -margin else "worse"
    if low > -margin:
        return "not worse"  # low > −δ and the interval reaches 0
    return "inconclusive"


def verdict_sentence(v: str, margin: float = DEFAULT_MARGIN, what: str = "KV",
                     than: str = "QKV", reason: str = "") -> str:
    """The verdict in words, as the report prints it."""
    return {
        "better": f"{what} better than {than} (the whole interval is above 0)",
        "not worse": f"{what} not worse than {than} (non-inferior by the {margin:g}-point "
                     "margin)",
        "worse within margin": f"{what} worse than {than}, within the {margin:g}-point margin "
                               "(the whole interval is between −margin and 0)",
        "worse": f"{what} worse than {than} (the whole interval is below 0)",
    }.get(v, f"inconclusive — {reason}" if reason else "inconclusive — more seeds or data needed")


# --------------------------------------------------------------------------- scores
def scores_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray,
                       metric: str = "jaccard") -> np.ndarray:
    """Set-level scores from counts summed over cases: arrays (..., C) -> (...).

    ``jaccard``: mean over classes of TP / (TP + FP + FN) (1 where a class is absent in both);
    ``weighted_jaccard``: weighted by the ground-truth pixels TP + FN (the plain mean where there
    are none); ``dice``: mean over classes of 2 TP / (2 TP + FP + FN). The conventions of
    :mod:`kvseg.metrics`.
    """
    tp, fp, fn = (np.asarray(a, dtype=np.float64) for a in (tp, fp, fn))
    if metric == "dice":
        den = 2 * tp + fp + fn
        return np.where(den > 0, 2 * tp / np.where(den > 0, den, 1.0), 1.0).mean(axis=-1)
    den = tp + fp + fn
    per_class = np.where(den > 0, tp / np.where(den > 0, den, 1.0), 1.0)
    if metric == "jaccard":
        return per_class.mean(axis=-1)
    if metric == "weighted_jaccard":
        w = tp + fn
        total = w.sum(axis=-1)
        weighted = (per_class * w).sum(axis=-1) / np.where(total > 0, total, 1.0)
        return np.where(total > 0, weighted, per_class.mean(axis=-1))
    raise ValueError(f"metric {metric!r}: expected one of {', '.join(METRICS)}")


def _hd95_from_totals(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Mean over classes of the per-class mean HD95 ((..., C) sums and counts of finite values);
    classes without a finite value are skipped (NaN if none has one), as :mod:`kvseg.metrics`."""
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(counts > 0, sums / np.where(counts > 0, counts, 1.0), np.nan)
        n = np.isfinite(per_class).sum(axis=-1)
        return np.where(n > 0, np.nansum(per_class, axis=-1) / np.maximum(n, 1), np.nan)


def _score_fn(metric: str) -> Callable[[np.ndarray], np.ndarray]:
    """totals (..., 3 or 2, C) -> score (...)."""
    if metric == "hd95":
        return lambda t: _hd95_from_totals(t[..., 0, :], t[..., 1, :])
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r}: expected one of {', '.join(METRICS)}")
    return lambda t: scores_from_counts(t[..., 0, :], t[..., 1, :], t[..., 2, :], metric)


def case_counts(cases: Sequence[Mapping]) -> tuple[list[tuple], np.ndarray]:
    """``(keys, counts (K, 3, C))`` from a row's ``cases`` (tp, fp, fn per case-day)."""
    keys = [(_case_id(c["case"]), c["day"]) for c in cases]
    counts = np.array([[c["tp"], c["fp"], c["fn"]] for c in cases], dtype=np.float64)
    return keys, counts


def _case_id(value) -> str:
    """A patient's id as text, so that 3, 3.0 and "3" (a JSON round trip) are one patient."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def _scan_totals(scan: Mapping, metric: str) -> list:
    if metric != "hd95":
        return [scan["tp"], scan["fp"], scan["fn"]]
    if "hd95_mm" not in scan:
        raise ValueError("metric 'hd95' needs per-scan 'hd95_mm' values (one per class)")
    values = scan["hd95_mm"]
    values = list(values.values()) if isinstance(values, Mapping) else values  # class -> mm
    hd = np.array([math.nan if v is None else v for v in values], dtype=np.float64)
    ok = np.isfinite(hd)
    return [np.where(ok, hd, 0.0), ok.astype(np.float64)]


def patient_totals(cases: Sequence[Mapping], metric: str = "jaccard"
                   ) -> tuple[list[str], list[tuple], np.ndarray]:
    """One run's scans summed per patient: ``(patients (sorted), scan keys (sorted),
    totals (P, 3 or 2, C))``. Scans of the same case id add up, whatever their day."""
    by_patient: dict[str, np.ndarray] = {}
    scans = []
    for c in cases:
        pid = _case_id(c["case"])
        scans.append((pid, str(c["day"])))
        t = np.asarray(_scan_totals(c, metric), dtype=np.float64)
        by_patient[pid] = by_patient[pid] + t if pid in by_patient else t
    patients = sorted(by_patient)
    return patients, sorted(scans), np.stack([by_patient[p] for p in patients])


def pseudo_values(totals: np.ndarray, metric: str = "jaccard") -> np.ndarray:
    """Per-patient jackknife pseudo-values of the set-level score, (P, ...) -> (P,), centred so
    that their mean is the score of all patients (a ratio's per-patient linearisation)."""
    f = _score_fn(metric)
    n = totals.shape[0]
    full = float(f(totals.sum(axis=0)))
    if n < 2:
        return np.full(n, full)
    loo = f(totals.sum(axis=0, keepdims=True) - totals)  # (P,): the score without patient p
    pseudo = n * full - (n - 1) * loo
    return pseudo - pseudo.mean() + full


# --------------------------------------------------------------------------- the interval
Components = tuple[tuple[float, float], ...]  # (variance of Δ, degrees of freedom) per source


@dataclass(frozen=True)
class TwoWay:
    """The method-of-moments fit of a seeds × patients table (see the module docstring)."""

    mean: float
    components: Components  # seed-row and patient parts of Var(Δ) (patient only: one seed)
    var_seed: float  # σ²_a, truncated at 0 (NaN with one seed)
    var_patient: float  # σ²_b, truncated at 0 (with one seed: σ²_b + σ²_e)
    var_resid: float  # σ²_e (NaN with one seed)


def two_way(table: np.ndarray) -> TwoWay:
    """Crossed random effects ``D[s, p] = θ + a_s + b_p + e_sp`` of an (S, P) table, P ≥ 2:
    the grand mean and ``Var(mean) = σ²_e/(SP) + σ²_a/S + σ²_b/P`` as two components with
    their degrees of freedom: ``MS_s/(SP)`` (S − 1) and ``max(MS_p − MS_e, 0)/(SP)`` (P − 1)."""
    d = np.asarray(table, dtype=np.float64)
    s, p = d.shape
    mean = float(d.mean())
    if p < 2:
        raise ValueError(f"need >= 2 patients for a patient variance, got {p}")
    if s == 1:
        ms_p = float(d[0].var(ddof=1))
        return TwoWay(mean, ((ms_p / p, float(p - 1)),), math.nan, ms_p, math.nan)
    row, col = d.mean(axis=1), d.mean(axis=0)
    ms_s = p * float(((row - mean) ** 2).sum()) / (s - 1)
    ms_p = s * float(((col - mean) ** 2).sum()) / (p - 1)
    ms_e = float(((d - row[:, None] - col[None, :] + mean) ** 2).sum()) / ((s - 1) * (p - 1))
    var_a, var_b = max(ms_s - ms_e, 0.0) / p, max(ms_p - ms_e, 0.0) / s
    # the seed rows' mean square is unbiased for σ²_e/(SP) + σ²_a/S, with S − 1 df
    parts = ((ms_s / (s * p), float(s - 1)), (var_b / p, float(p - 1)))
    return TwoWay(mean, parts, var_a, var_b, ms_e)


def _half_width(parts: Components, alpha: float = ALPHA) -> float:
    """The (1 − α) half-width: ``(1 − w)·sqrt(Σ t²(df_i) v_i) + w·t(df_W)·sqrt(Σ v_i)`` with
    ``w`` = :data:`WELCH_WEIGHT`. The first term gives each source the quantile of its own
    degrees of freedom (Banerjee: conservative, up to 0.97-0.98 when seeds and patients weigh
    alike); the second is Welch-Satterthwaite's (liberal when a 2-df seed part is small by
    chance, down to 0.93). One source: both are its exact t interval."""
    live = [(v, df) for v, df in parts if v > 0]
    if not live:
        return 0.0
    q = 1 - alpha / 2
    banerjee = math.sqrt(sum(float(stats.t.ppf(q, df)) ** 2 * v for v, df in live))
    if len(live) == 1:
        return banerjee
    total = sum(v for v, _ in live)
    df_w = total**2 / sum(v**2 / df for v, df in live)
    welch = float(stats.t.ppf(q, df_w)) * math.sqrt(total)
    return (1 - WELCH_WEIGHT) * banerjee + WELCH_WEIGHT * welch


def _effective_df(parts: Components) -> float:
    """The df of the single t quantile that gives the same 95% half-width (for the report)."""
    se = math.sqrt(sum(v for v, _ in parts))
    if se == 0:
        return math.inf
    ratio = _half_width(parts) / se
    if ratio <= float(stats.norm.ppf(1 - ALPHA / 2)) * (1 + 1e-9):
        return math.inf
    return float(optimize.brentq(lambda df: stats.t.ppf(1 - ALPHA / 2, df) - ratio, 1e-3, 1e9))


def _interval(estimate: float, parts: Components, alpha: float = ALPHA) -> tuple[float, float]:
    if not parts or not all(math.isfinite(v) and df > 0 for v, df in parts):
        return math.nan, math.nan
    half = _half_width(parts, alpha)
    return estimate - half, estimate + half


Run = Sequence[Mapping] | float  # one seed's per-scan counts, or its score


def _per_scan(run) -> bool:
    return isinstance(run, Sequence) and not isinstance(run, str) and len(run) > 0 \
        and all(isinstance(c, Mapping) for c in run)


def paired_difference(a: Sequence[Run], b: Sequence[Run], *, metric: str = "jaccard",
                      resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> Difference:
    """Δ = B − A (points; mm for HD95) with its 95% interval (see the module docstring).

    Args:
        a, b: per paired seed (same order), either the run's ``cases`` list (per scan ``case``,
            ``day``, ``tp``, ``fp``, ``fn`` per class; ``hd95_mm`` per class for HD95) or, when
            no per-scan data exists, the run's score (0–1; mm for HD95). The patient model is
            used when every run has per-scan data, A and B of a seed have the same scans and
            every seed has the same patients.
        metric: ``jaccard``, ``weighted_jaccard``, ``dice`` or ``hd95``.
        resamples, seed: accepted for compatibility; the interval is analytic (no draws).
    """
    del resamples, seed
    if len(a) != len(b) or not a:
        raise ValueError(f"need the same number (>= 1) of paired seeds, got {len(a)} and {len(b)}")
    scale = METRICS.get(metric)
    if scale is None:
        raise ValueError(f"metric {metric!r}: expected one of {', '.join(METRICS)}")
    if all(_per_scan(x) for x in (*a, *b)):
        runs = [(patient_totals(x, metric), patient_totals(y, metric))
                for x, y in zip(a, b, strict=True)]
        paired = all(ra[1] == rb[1] for ra, rb in runs)
        crossed = paired and all(ra[0] == runs[0][0][0] for ra, _ in runs)
        if crossed:
            return _patient_model(runs, metric, scale)
        why = ("A and B of a seed were scored on different scans" if not paired
               else "the seeds were scored on different patients")
        per_seed = np.array([scale * float(_score_fn(metric)(rb[2].sum(0))
                                           - _score_fn(metric)(ra[2].sum(0)))
                             for ra, rb in runs])
        return _seeds_only(per_seed, note=f"{why}: seeds-only interval")
    if any(_per_scan(x) for x in (*a, *b)):
        raise ValueError("pass either every run's per-scan cases or every run's score")
    per_seed = scale * (np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64))
    return _seeds_only(per_seed, note="no per-patient data: training noise only, for these "
                                      "patients")


def _seeds_only(per_seed: np.ndarray, note: str) -> Difference:
    """Student's t over the per-seed differences (S − 1 df)."""
    n = len(per_seed)
    est = float(per_seed.mean())
    sd = float(per_seed.std(ddof=1)) if n > 1 else math.nan
    parts = ((sd**2 / n, float(n - 1)),) if n > 1 else ()
    low, high = _interval(est, parts)
    reason = "" if n > 1 else "one seed and no per-patient data: no noise estimate"
    return Difference(est, low, high, n, 0, sd, math.nan, se=sd / math.sqrt(n),
                      df=float(n - 1) if n > 1 else math.nan, method="seeds", reason=reason,
                      note=note, components=parts)


def _patient_model(runs, metric: str, scale: float) -> Difference:
    patients = runs[0][0][0]
    n_seeds, n_pat, n_scans = len(runs), len(patients), len(runs[0][0][1])
    f = _score_fn(metric)
    per_seed = np.array([scale * float(f(rb[2].sum(0)) - f(ra[2].sum(0))) for ra, rb in runs])
    est = float(per_seed.mean())
    seed_sd = float(per_seed.std(ddof=1)) if n_seeds > 1 else math.nan
    common = dict(seeds=n_seeds, cases=n_scans, seed_sd=seed_sd, patients=n_pat)
    if n_pat < MIN_PATIENTS:
        return Difference(est, -math.inf, math.inf, case_se=math.nan, method="patients x seeds",
                          reason=f"{n_pat} patient{'s' * (n_pat != 1)} cannot settle a margin "
                                 f"(the patient variance needs at least {MIN_PATIENTS})",
                          **common)
    table = np.stack([scale * (pseudo_values(rb[2], metric) - pseudo_values(ra[2], metric))
                      for ra, rb in runs])  # (S, P); its grand mean is est
    if not np.isfinite(table).all():  # e.g. HD95 of an organ that few patients' scans show
        return Difference(est, -math.inf, math.inf, case_se=math.nan, method="patients x seeds",
                          reason=f"the {metric} of some patients (or of all but one) is "
                                 "undefined", **common)
    fit = two_way(table)
    low, high = _interval(est, fit.components)
    one = n_seeds == 1
    return Difference(est, low, high, case_se=math.sqrt(fit.var_patient / n_pat),
                      se=math.sqrt(sum(v for v, _ in fit.components)),
                      df=_effective_df(fit.components),
                      method="patients (one seed)" if one else "patients x seeds",
                      note="one seed: training noise not in the interval" if one else "",
                      components=fit.components, **common)


# --------------------------------------------------------------------------- multiplicity
def _p_at(d: Difference, distance: float) -> float:
    """The α at which the (1 − α) interval's half-width equals ``distance``: the two-sided
    p-value of the value ``distance`` away from Δ (consistent with the intervals at all levels)."""
    if distance <= 0:
        return 1.0
    if _half_width(d.components, 1e-15) <= distance:
        return 0.0
    return float(optimize.brentq(lambda a: _half_width(d.components, a) - distance, 1e-15, 1.0,
                                 xtol=1e-14))


def p_values(d: Difference, margin: float = DEFAULT_MARGIN) -> tuple[float, float]:
    """``(p_zero, p_margin)``: the two-sided p-value of Δ = 0 and the one-sided p-value of
    Δ ≤ −margin, doubled, from the same noise components as the interval — each below α exactly
    when the (1 − α) interval excludes 0, or lies above −margin. (1, 1) without an interval."""
    if d.reason or not d.components or not math.isfinite(d.low):
        return 1.0, 1.0
    return _p_at(d, abs(d.estimate)), _p_at(d, d.estimate + margin)


def holm_adjust(p_values: Sequence[float], groups: Sequence | None = None) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order. With ``groups`` (one label per
    hypothesis, hypotheses of one group logically exclusive: at most one is true), Shaffer's
    refinement: the j-th smallest p-value is multiplied by the number of groups that still have
    a hypothesis at or after position j, not by the number of hypotheses left."""
    p = np.asarray(p_values, dtype=np.float64)
    k = len(p)
    labels = list(range(k)) if groups is None else list(groups)
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(k)
    running = 0.0
    for rank, i in enumerate(order):
        left = len({labels[m] for m in order[rank:]})
        running = max(running, min(1.0, left * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


@dataclass(frozen=True)
class Adjusted:
    """A comparison's verdict at the family-wise level (:func:`holm`) and the p-values behind it
    (unadjusted and adjusted) of its two tests: Δ = 0 and Δ ≤ −margin."""

    verdict: str
    p_zero: float
    p_margin: float
    p_zero_adjusted: float
    p_margin_adjusted: float


def holm(diffs: Sequence[Difference], margin: float = DEFAULT_MARGIN,
         alpha: float = ALPHA) -> list[Adjusted]:
    """Family-wise (1 − α) verdicts for the comparisons of one report, in the input order.

    Every comparison brings the two tests its verdict can rest on (:func:`p_values`): Δ = 0
    (*better* / *worse*) and Δ ≤ −margin (*not worse*, *within margin*). Holm's step-down runs
    over all 2k of them with Shaffer's count (the two nulls of one comparison cannot both be
    true, so each comparison counts once while one of its tests is left), and the verdict is
    read from what is rejected: Δ = 0 rejected -> better (Δ > 0) or worse (Δ < 0, *within
    margin* if Δ ≤ −margin is rejected too); else Δ ≤ −margin rejected -> not worse; else
    inconclusive. With one comparison this is the unadjusted verdict.
    """
    pv = [p_values(d, margin) for d in diffs]
    flat = [p for pair in pv for p in pair]
    adj = holm_adjust(flat, groups=[i for i in range(len(diffs)) for _ in range(2)]) \
        if diffs else []
    out = []
    for i, d in enumerate(diffs):
        zero, beyond = adj[2 * i] < alpha, adj[2 * i + 1] < alpha
        if zero and d.estimate > 0:
            v = "better"
        elif zero and d.estimate < 0:
            v = "worse within margin" if beyond else "worse"
        else:
            v = "not worse" if beyond else "inconclusive"
        out.append(Adjusted(v, pv[i][0], pv[i][1], adj[2 * i], adj[2 * i + 1]))
    return out


__all__ = ["ALPHA", "DEFAULT_MARGIN", "DEFAULT_RESAMPLES", "METRICS", "MIN_PATIENTS", "VERDICTS",
           "WELCH_WEIGHT",
           "Adjusted", "Difference", "TwoWay", "case_counts", "holm", "holm_adjust",
           "p_values", "paired_difference", "patient_totals", "pseudo_values",
           "scores_from_counts", "two_way", "verdict", "verdict_sentence"]
