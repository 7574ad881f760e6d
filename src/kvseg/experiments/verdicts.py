"""The comparisons of a report: every mode against QKV per family, with intervals and verdicts
(unadjusted 95% and Holm's family-wise 95%), per-organ differences, per-patient differences, and
the method and limits paragraphs that say what they mean. The statistics themselves are
:mod:`kvseg.experiments.stats`; the estimand, the method and the rules are docs/reproduce.md's
"Statistics" section.

Pure functions of result rows (:class:`~kvseg.experiments.results.ResultRow` or mappings).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from kvseg.experiments.results import ResultRow, as_rows, md_table, mean_std
from kvseg.experiments.stats import (
    DEFAULT_MARGIN,
    METRICS,
    VERDICTS,
    WELCH_WEIGHT,
    Difference,
    holm,
    paired_difference,
    patient_totals,
    scores_from_counts,
    verdict_sentence,
)
from kvseg.layers.attention import MODE_LABELS, MODES

#: The metrics every comparison gets an interval for (Jaccard is the primary: its verdicts).
STAT_KEYS = ("jaccard", "weighted_jaccard", "dice", "hd95")
#: The metrics with a verdict (higher is better); HD95 (lower is better) gets an interval only.
VERDICT_KEYS = ("jaccard", "weighted_jaccard")
NO_SCORE = "no score (a run diverged)"


def _pairs(rows: Sequence[ResultRow | Mapping]):
    """(family, mode, [(seed, qkv row, mode row)] paired by seed) for every mode but QKV."""
    index = {(r.family, r.attention, r.seed): r for r in as_rows(rows)}
    for family in sorted({f for f, _, _ in index}):
        base = {seed: r for (f, m, seed), r in index.items() if f == family and m == "qkv"}
        for mode in MODES:
            pairs = sorted(((s, base[s], r) for (f, m, s), r in index.items()
                            if f == family and m == mode != "qkv" and s in base),
                           key=lambda t: t[0])
            if pairs:
                yield family, mode, base, pairs


def _usable(row: ResultRow, key: str) -> bool:
    return bool(row.cases) and (key != "hd95" or all("hd95_mm" in c for c in row.cases))


def _difference(pairs, key: str, select=None) -> Difference:
    """B − A of ``key`` over the paired seeds: from the per-scan counts when every run has them
    (``select`` maps a scan to the part compared, e.g. one class), else from the rows' values."""
    runs = [r for _, q, b in pairs for r in (q, b)]
    if all(_usable(r, key) for r in runs):
        pick = select or (lambda c: c)
        return paired_difference([[pick(c) for c in q.cases] for _, q, _ in pairs],
                                 [[pick(c) for c in b.cases] for _, _, b in pairs], metric=key)
    if select is not None:
        raise ValueError("per-class differences need every run's per-scan counts")
    return paired_difference([getattr(q, key) for _, q, _ in pairs],
                             [getattr(b, key) for _, _, b in pairs], metric=key)


def comparisons(rows: Sequence[ResultRow | Mapping], *, margin: float = DEFAULT_MARGIN
                ) -> list[tuple[dict, Difference | None]]:
    """:func:`family_deltas`' entries before Holm, each with its Jaccard :class:`Difference`
    (None when a run has no score)."""
    out = []
    for family, mode, base, pairs in _pairs(rows):
        _, q0, r0 = pairs[0]
        d = {"family": family, "attention": mode, "seeds": len(pairs),
             "params_pct": 100.0 * (r0.params - q0.params) / q0.params,
             "macs_pct": 100.0 * (r0.macs - q0.macs) / q0.macs, "patients": 0, "scans": 0,
             "df": math.nan, "method": "none", "reason": "", "note": ""}
        jaccard = None
        for key in STAT_KEYS:
            scale = METRICS[key]
            diffs = [scale * (getattr(r, key) - getattr(q, key)) for _, q, r in pairs]
            d[f"{key}_pts"], d[f"{key}_pts_std"], _ = mean_std(diffs)
            if not math.isfinite(d[f"{key}_pts"]):
                d[f"{key}_low"] = d[f"{key}_high"] = math.nan
                d[f"{key}_verdict"] = NO_SCORE
                continue
            diff = _difference(pairs, key)
            d[f"{key}_low"], d[f"{key}_high"] = diff.low, diff.high
            if key in VERDICT_KEYS:
                d[f"{key}_verdict"] = diff.verdict(margin)
            if key == "jaccard":
                jaccard = diff
                d.update(patients=diff.patients, scans=diff.cases, df=diff.df,
                         method=diff.method, reason=diff.reason, note=diff.note)
        d["qkv_jaccard_std"] = 100.0 * mean_std(b.jaccard for b in base.values())[1]
        out.append((d, jaccard))
    return out


def apply_holm(entries: Sequence[tuple[dict, Difference | None]],
               margin: float = DEFAULT_MARGIN) -> list[dict]:
    """Holm's family-wise 95% verdicts over all ``entries`` (one report's comparisons): each
    dict gains ``jaccard_holm_verdict``, ``jaccard_p_zero`` / ``jaccard_p_margin`` (unadjusted)
    and their ``_holm`` (adjusted) values (:func:`kvseg.experiments.stats.holm`)."""
    tested = [(d, diff) for d, diff in entries if diff is not None]
    for (d, _), adj in zip(tested, holm([diff for _, diff in tested], margin), strict=True):
        d.update(jaccard_holm_verdict=adj.verdict, jaccard_p_zero=adj.p_zero,
                 jaccard_p_margin=adj.p_margin, jaccard_p_zero_holm=adj.p_zero_adjusted,
                 jaccard_p_margin_holm=adj.p_margin_adjusted)
    for d, diff in entries:
        if diff is None:
            d.update(jaccard_holm_verdict=NO_SCORE, jaccard_p_zero=math.nan,
                     jaccard_p_margin=math.nan, jaccard_p_zero_holm=math.nan,
                     jaccard_p_margin_holm=math.nan)
    return [d for d, _ in entries]


def family_deltas(rows: Sequence[ResultRow | Mapping], *,
                  margin: float = DEFAULT_MARGIN) -> list[dict]:
    """Every other mode against QKV, per family, with Holm over all of them.

    Keys: family, attention, params_pct, macs_pct, seeds (paired), patients and scans behind
    each seed's score (0 without per-scan data), df (effective), method, reason (why no
    conclusion is possible), note (a caveat), qkv_jaccard_std; for each of :data:`STAT_KEYS`:
    ``<key>_pts`` (Δ: points; mm for HD95), ``<key>_pts_std`` (sample std of the per-seed
    differences), ``<key>_low`` / ``<key>_high`` (unadjusted 95% interval) and
    ``<key>_verdict`` (unadjusted, against ``margin`` points; :data:`VERDICT_KEYS` only: HD95,
    lower = better and in mm, gets its interval only); and :func:`apply_holm`'s keys.
    """
    return apply_holm(comparisons(rows, margin=margin), margin)


def _class_part(c: Mapping, k: int) -> dict:
    part = {"case": c["case"], "day": c["day"], "tp": [c["tp"][k]], "fp": [c["fp"][k]],
            "fn": [c["fn"][k]]}
    if "hd95_mm" in c:
        hd = c["hd95_mm"]
        part["hd95_mm"] = [list(hd.values())[k] if isinstance(hd, Mapping) else hd[k]]
    return part


def class_deltas(rows: Sequence[ResultRow | Mapping]) -> list[dict]:
    """Per family, mode and class (organ): Δ Jaccard (points) and Δ HD95 (mm) of that class with
    unadjusted 95% intervals (exploratory: no verdict, no multiplicity correction). Needs
    every run's per-scan counts; comparisons without them are skipped. Keys: family,
    attention, class (index), jaccard_pts / _low / _high, hd95_pts / _low / _high."""
    out = []
    for family, mode, _, pairs in _pairs(rows):
        runs = [r for _, q, b in pairs for r in (q, b)]
        if not all(_usable(r, "jaccard") for r in runs):
            continue
        for k in range(len(pairs[0][1].cases[0]["tp"])):
            d = {"family": family, "attention": mode, "class": k}
            for key in ("jaccard", "hd95"):
                if not all(_usable(r, key) for r in runs):
                    d[f"{key}_pts"] = d[f"{key}_low"] = d[f"{key}_high"] = math.nan
                    continue
                diff = _difference(pairs, key, select=lambda c, k=k: _class_part(c, k))
                d[f"{key}_pts"], d[f"{key}_low"], d[f"{key}_high"] = (diff.estimate, diff.low,
                                                                      diff.high)
            out.append(d)
    return out


def patient_differences(rows: Sequence[ResultRow | Mapping]) -> dict[str, dict[str, list]]:
    """``"family KV" -> patient -> [B − A of that patient's own Jaccard (points), per seed]``:
    each patient's scans pooled (set-level Jaccard of its summed counts). For the per-patient
    plot; comparisons without per-scan counts are skipped."""
    out: dict[str, dict[str, list]] = {}
    for family, mode, _, pairs in _pairs(rows):
        if not all(_usable(r, "jaccard") for _, q, b in pairs for r in (q, b)):
            continue
        per: dict[str, list] = {}
        for _, q, b in pairs:
            jq, jb = _per_patient_jaccard(q.cases), _per_patient_jaccard(b.cases)
            for p in sorted(set(jq) & set(jb)):
                per.setdefault(p, []).append(100.0 * (jb[p] - jq[p]))
        out[f"{family} {MODE_LABELS.get(mode, mode)}"] = per
    return out


def _per_patient_jaccard(cases: Sequence[Mapping]) -> dict[str, float]:
    patients, _, totals = patient_totals(cases, "jaccard")
    scores = scores_from_counts(totals[:, 0], totals[:, 1], totals[:, 2])
    return dict(zip(patients, np.asarray(scores).tolist(), strict=True))


# --------------------------------------------------------------------------- text
def ci_text(d: Mapping, key: str, digits: int = 2) -> str:
    """``Δ [low, high]`` of an entry (``Δ`` alone without an interval, – without a score)."""
    est, low, high = d[f"{key}_pts"], d[f"{key}_low"], d[f"{key}_high"]
    if not math.isfinite(est):
        return "–"
    if not (math.isfinite(low) and math.isfinite(high)):
        return f"{est:+.{digits}f} (no interval)"
    return f"{est:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def verdict_text(d: Mapping, margin: float, key: str = "jaccard_holm_verdict") -> str:
    """An entry's verdict in words (by default the Holm one), with its reason and note."""
    v = d[key]
    if v in VERDICTS:
        v = verdict_sentence(v, margin, MODE_LABELS[d["attention"]], reason=d.get("reason", ""))
    if d.get("note") and v != NO_SCORE:
        v += f"; {d['note']}"
    return v


def design_text(d: Mapping) -> str:
    """``patients / scans / seeds`` of an entry (– for what is unknown)."""
    return " / ".join(str(n) if n else "–" for n in (d["patients"], d["scans"], d["seeds"]))


DELTA_HEADER = ["Δ Jaccard (pts) [95% CI]", "Δ weighted Jaccard (pts) [95% CI]",
                "Δ Dice (pts) [95% CI]", "Δ HD95 (mm) [95% CI]"]
VERDICT_HEADER = ["patients / scans / seeds", "verdict (95%)",
                  "verdict (Holm, family-wise 95%)"]


def delta_cells(d: Mapping, margin: float) -> list[str]:
    """The interval, design and verdict cells of one entry (:data:`DELTA_HEADER` and
    :data:`VERDICT_HEADER` minus its first cell, after the design cell)."""
    return [ci_text(d, "jaccard"), ci_text(d, "weighted_jaccard"), ci_text(d, "dice"),
            ci_text(d, "hd95", 1), design_text(d), d["jaccard_verdict"],
            verdict_text(d, margin)]


def deltas_table(rows: Sequence[ResultRow | Mapping], *, margin: float = DEFAULT_MARGIN) -> str:
    """Per family, each mode against QKV: intervals, design and both verdicts (markdown)."""
    body = []
    for d in family_deltas(rows, margin=margin):
        cells = delta_cells(d, margin)
        std = d["qkv_jaccard_std"]
        body.append([d["family"], MODE_LABELS[d["attention"]], f"{d['params_pct']:+.2f} %",
                     f"{d['macs_pct']:+.2f} %", *cells[:4],
                     f"{std:.2f}" if math.isfinite(std) else "–", *cells[4:]])
    header = ["family", "vs QKV", "params", "MACs", *DELTA_HEADER, "QKV Jaccard seed std (pts)",
              *VERDICT_HEADER]
    return md_table(header, body)


def class_table(rows: Sequence[ResultRow | Mapping], classes: Sequence[str] = ()) -> str:
    """Per organ: Δ Jaccard and Δ HD95 with unadjusted 95% intervals ('' without per-scan
    data)."""
    entries = class_deltas(rows)
    if not entries:
        return ""
    body = [[d["family"], MODE_LABELS[d["attention"]],
             (classes[d["class"]] if d["class"] < len(classes) else f"class {d['class']}")
             .replace("_", " "), ci_text(d, "jaccard"), ci_text(d, "hd95", 1)]
            for d in entries]
    return md_table(["family", "vs QKV", "organ", "Δ Jaccard (pts) [95% CI]",
                      "Δ HD95 (mm) [95% CI]"], body)


def statistics_text(margin: float = DEFAULT_MARGIN, *, family: str = "report") -> list[str]:
    """How the intervals and verdicts are made, in words (the report's method paragraph)."""
    return [
        "**Estimand.** Δ: the difference (mode − QKV) of the set-level Jaccard (and weighted "
        "Jaccard, Dice, in points; HD95 in mm) over the population of patients, averaged over "
        "training seeds. Parameters and MACs: relative change.",
        "**Unit and method.** The patient is the unit: all scans and slices of a patient move "
        "together. Per seed, each patient's share of the set-level score is its jackknife "
        "pseudo-value; the seeds × patients table of paired differences is fitted by a two-way "
        "crossed random-effects model (seed, patient and seed × patient effects, method of "
        "moments). Var(Δ) has two parts: the spread of the seeds' means (seeds − 1 degrees of "
        "freedom: seed and seed × patient noise) and the patients' shared part (patients − 1); "
        f"the 95% half-width is {1 - WELCH_WEIGHT:g} × the per-part t quantiles (Banerjee) + "
        f"{WELCH_WEIGHT:g} × one Welch-Satterthwaite t, a blend chosen by simulation. Fewer than 3 "
        "patients give no interval (inconclusive); one seed gives an interval without training "
        "noise (noted). Runs without per-scan counts fall back to Student's t over the "
        "per-seed differences (noted). Its coverage is measured by simulation "
        "(`benchmarks/stats_coverage.py`, docs/reproduce.md).",
        f"**Verdicts** (Jaccard), with a non-inferiority margin of {margin:g} points: *better* "
        f"if the whole interval is above 0; *worse* if it is below 0 (*worse within margin* if "
        f"it also lies above −{margin:g}); *not worse* (non-inferior) if it lies above "
        f"−{margin:g} and reaches 0; otherwise *inconclusive*. **Multiplicity**: the headline "
        f"verdicts are family-wise 95% over all comparisons of this {family} (Holm's "
        "step-down with Shaffer's count over each comparison's two tests, Δ = 0 and "
        f"Δ ≤ −{margin:g}); the table keeps the unadjusted 95% interval and verdict beside "
        "them. The per-organ table is exploratory (unadjusted, no verdicts).",
    ]


def limits_text(selection: str = "") -> list[str]:
    """What the intervals include and exclude (the report's limits paragraph); ``selection``
    says which patients the verdicts used and what saw them."""
    return [
        "**Limits.** The interval includes the noise of sampling patients and of training seeds. "
        "It excludes: that the data are synthetic (a twin of UW-Madison, not CT/MRI of "
        "patients); that the models are micro-sized (not the paper's base models); that the "
        "recipe was tuned for QKV (its seed agreement), not for KV; and any selection on the "
        "patients scored (below). *Not worse* is not *equivalent*.",
        *([selection] if selection else []),
    ]


__all__ = ["DELTA_HEADER", "NO_SCORE", "STAT_KEYS", "VERDICT_HEADER", "VERDICT_KEYS",
           "apply_holm", "ci_text", "class_deltas", "class_table", "comparisons",
           "delta_cells", "deltas_table", "design_text", "family_deltas", "limits_text",
           "patient_differences", "statistics_text", "verdict_text"]
