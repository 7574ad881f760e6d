"""The reference rows of a comparison: each family's QKV variant against the CNN reference
(``dynunet``, MONAI's DynUNet planned as nnU-Net's 2D U-Net), in points, with its 95% interval
(:func:`kvseg.experiments.stats.paired_difference`) and without a verdict.

The KV verdicts stay per family (:func:`kvseg.experiments.report.family_deltas`: UNETR's and
SwinUNETR's modes against their own QKV, like the paper's three). The reference answers another
question: does the transformer, as trained here, beat a U-Net trained the same way? It has no
attention mode to be "not worse" in, so the table gives the difference and its interval only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from kvseg.experiments.results import ResultRow, as_rows, md_table, mean_std
from kvseg.experiments.stats import paired_difference
from kvseg.experiments.verdicts import ci_text

#: The CNN reference row's model name (its ``attention`` is ``none``).
REFERENCE = "dynunet"


def reference_deltas(rows: Sequence[ResultRow | Mapping], *,
                     reference: str = REFERENCE) -> list[dict]:
    """Each family's QKV minus ``reference``, paired by seed; [] without reference rows.

    Keys: family, model (the QKV variant), seeds (paired), cases (case-days behind each score;
    0 without per-case data), params_pct / macs_pct (relative to the reference),
    qkv_jaccard / reference_jaccard (means over the paired seeds), and for ``jaccard`` and
    ``weighted_jaccard``: ``<key>_pts`` (Δ in points, QKV − reference), ``<key>_pts_std``,
    ``<key>_low`` / ``<key>_high`` (95% interval; NaN when a run diverged), and ``note``
    (why the interval is missing or what it leaves out; '' when nothing).
    """
    parsed = as_rows(rows)
    ref = {r.seed: r for r in parsed if r.model == reference}
    out: list[dict] = []
    if not ref:
        return out
    for family in sorted({r.family for r in parsed if r.attention == "qkv"}):
        qkv = {r.seed: r for r in parsed if r.family == family and r.attention == "qkv"}
        seeds = sorted(set(qkv) & set(ref))
        if not seeds:
            continue
        a, b = [ref[s] for s in seeds], [qkv[s] for s in seeds]
        d = {"family": family, "model": b[0].model, "seeds": len(seeds), "cases": 0,
             "params_pct": 100.0 * (b[0].params - a[0].params) / a[0].params,
             "macs_pct": 100.0 * (b[0].macs - a[0].macs) / a[0].macs,
             "qkv_jaccard": mean_std(r.jaccard for r in b)[0],
             "reference_jaccard": mean_std(r.jaccard for r in a)[0], "note": ""}
        per_case = all(r.cases for r in (*a, *b))
        for key in ("jaccard", "weighted_jaccard"):
            diffs = [100.0 * (getattr(y, key) - getattr(x, key)) for x, y in zip(a, b, strict=True)]
            d[f"{key}_pts"], d[f"{key}_pts_std"], _ = mean_std(diffs)
            d[f"{key}_low"] = d[f"{key}_high"] = math.nan
            if not math.isfinite(d[f"{key}_pts"]):
                d["note"] = "no score (a run diverged)"
                continue
            diff = paired_difference([x.cases if per_case else getattr(x, key) for x in a],
                                     [y.cases if per_case else getattr(y, key) for y in b],
                                     metric=key)
            d[f"{key}_low"], d[f"{key}_high"], d["cases"] = diff.low, diff.high, diff.cases
            if key == "jaccard":
                d["note"] = diff.reason or diff.note
        out.append(d)
    return out


def reference_section(rows: Sequence[ResultRow | Mapping], *,
                      reference: str = REFERENCE) -> list[str]:
    """The report's reference section as lines ([] without reference or QKV rows): a table of
    :func:`reference_deltas` and what it says and does not say."""
    deltas = reference_deltas(rows, reference=reference)
    if not deltas:
        return []
    body = []
    for d in deltas:
        seeds = d["seeds"]
        note = d["note"] or ("one seed: training noise not in the interval" if seeds < 2 else "")
        body.append([d["family"], f"`{d['model']}`", f"{d['params_pct']:+.1f} %",
                     f"{d['macs_pct']:+.1f} %",
                     "–" if not math.isfinite(d["qkv_jaccard"]) else f"{d['qkv_jaccard']:.3f}",
                     "–" if not math.isfinite(d["reference_jaccard"])
                     else f"{d['reference_jaccard']:.3f}",
                     ci_text(d, "jaccard"), ci_text(d, "weighted_jaccard"), str(seeds),
                     str(d["cases"]) if d["cases"] else "–", note or "–"])
    return [f"## Each family's QKV against the CNN reference (`{reference}`)", "",
            f"Δ: the family's QKV variant minus `{reference}` (MONAI's DynUNet planned as "
            "nnU-Net's 2D U-Net, trained with this preset's recipe, not nnU-Net's own "
            "pipeline), in Jaccard points, paired by seed, with the 95% interval made as for "
            "the modes above. Parameters and MACs: relative to the reference. No verdict: "
            "the reference has no attention mode; the KV verdicts are the per-family ones "
            "above.", "",
            md_table(["family", "QKV variant", "params vs ref", "MACs vs ref",
                       "QKV Jaccard", "reference Jaccard", "Δ Jaccard (pts) [95% CI]",
                       "Δ weighted Jaccard (pts) [95% CI]", "seeds", "case-days", "note"],
                      body), ""]


__all__ = ["REFERENCE", "reference_deltas", "reference_section"]
