"""The text of kvseg's reports: a reproduction's report.md and a sweep's (the figures are in
:mod:`kvseg.experiments.figures`).

Everything here is a pure function of result rows (one :class:`kvseg.experiments.results.ResultRow`
per model and seed, or a mapping that :meth:`~kvseg.experiments.results.ResultRow.from_dict`
accepts) plus, for the figures (:mod:`kvseg.experiments.figures`), the runs' ``metrics.csv`` files
and the sample predictions;
:func:`kvseg.experiments.reproduce.reproduce` gathers those and calls :func:`write_report`. The
files results.csv/json are written and read by :mod:`kvseg.experiments.results` (``write_results``
and ``RESULT_COLUMNS`` are re-exported here).

Conventions: ``mean ± std`` is over seeds with the sample standard deviation (ddof = 1); with one
seed only the mean is shown. KV / KV-pos deltas against QKV are paired by seed: Δ Jaccard is the
mean over seeds of (J_mode − J_qkv) in percentage points, its spread the standard deviation of
those paired differences; parameter and MAC deltas are relative (%) and do not depend on the seed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from kvseg.config import RunConfig
from kvseg.experiments.figures import plot_sweep
from kvseg.experiments.results import (  # noqa: F401  (re-exported: their earlier home)
    METRICS,
    RESULT_COLUMNS,
    ResultRow,
    aggregate,
    as_rows,
    mean_std,
    value_key,
    write_results,
)
from kvseg.experiments.stats import (
    DEFAULT_MARGIN,
    DEFAULT_RESAMPLES,
    paired_difference,
    verdict_sentence,
)
from kvseg.layers.attention import MODE_LABELS, MODES
from kvseg.utils import atomic_write_text


def family_deltas(rows: Sequence[ResultRow | Mapping], *, margin: float = DEFAULT_MARGIN,
                  resamples: int = DEFAULT_RESAMPLES) -> list[dict]:
    """Every other mode against QKV, per family (conventions: module docstring, :mod:`kvseg.stats`).

    Keys: family, attention, params_pct, macs_pct, seeds (paired), cases (case-days in the
    bootstrap; 0 without per-case data), qkv_jaccard_std, and for ``jaccard`` and
    ``weighted_jaccard``: ``<key>_pts`` (Δ, points), ``<key>_pts_std`` (sample std of the
    per-seed differences), ``<key>_low`` / ``<key>_high`` (95% interval) and ``<key>_verdict``
    (better / not worse / worse / inconclusive against ``margin`` points).
    """
    index = {(r.family, r.attention, r.seed): r for r in as_rows(rows)}
    out = []
    for family in sorted({f for f, _, _ in index}):
        base = {seed: r for (f, m, seed), r in index.items() if f == family and m == "qkv"}
        if not base:
            continue
        for mode in MODES:
            pairs = sorted(((s, base[s], r) for (f, m, s), r in index.items()
                            if f == family and m == mode != "qkv" and s in base),
                           key=lambda t: t[0])
            if not pairs:
                continue
            _, q0, r0 = pairs[0]
            d = {"family": family, "attention": mode, "seeds": len(pairs),
                 "params_pct": 100.0 * (r0.params - q0.params) / q0.params,
                 "macs_pct": 100.0 * (r0.macs - q0.macs) / q0.macs, "cases": 0}
            for key in ("jaccard", "weighted_jaccard"):
                diffs = [100.0 * (getattr(r, key) - getattr(q, key)) for _, q, r in pairs]
                d[f"{key}_pts"], d[f"{key}_pts_std"], _ = mean_std(diffs)
                if not math.isfinite(d[f"{key}_pts"]):
                    d[f"{key}_low"] = d[f"{key}_high"] = math.nan
                    d[f"{key}_verdict"] = "no score (a run diverged)"
                    continue
                diff = paired_difference([_run_data(q, key) for _, q, _ in pairs],
                                         [_run_data(r, key) for _, _, r in pairs],
                                         metric=key, resamples=resamples)
                d[f"{key}_low"], d[f"{key}_high"] = diff.low, diff.high
                d[f"{key}_verdict"] = diff.verdict(margin)
                d["cases"] = diff.cases
            d["qkv_jaccard_std"] = 100.0 * mean_std(b.jaccard for b in base.values())[1]
            out.append(d)
    return out


def _run_data(row: ResultRow, key: str):
    """A run's per-case counts for the bootstrap, or its score where it has none."""
    return row.cases if row.cases else getattr(row, key)


# --------------------------------------------------------------------------- text
def _fmt(mean: float, std: float, digits: int) -> str:
    if not math.isfinite(mean):
        return "–"
    if math.isfinite(std):
        return f"{mean:.{digits}f} ± {std:.{digits}f}"
    return f"{mean:.{digits}f}"


def _md_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def results_table(rows: Sequence[ResultRow | Mapping]) -> str:
    """The paper-style table (markdown), one line per model, mean ± std over seeds."""
    agg = aggregate(rows)
    show_gpu = any(math.isfinite(a["gpu_latency_ms_mean"]) for a in agg)
    header = ["model", "family", "attention", "params (M)", "GMACs", "Jaccard",
              "weighted Jaccard", "Dice", "HD95 (mm)", "CPU latency (ms)"]
    if show_gpu:
        header.append("GPU latency (ms)")
    header += ["peak mem (MB)", "seeds"]
    body = []
    for a in agg:
        line = [a["model"], a["family"], MODE_LABELS.get(a["attention"], a["attention"]),
                f"{float(a['params']) / 1e6:.3f}", f"{float(a['macs']) / 1e9:.3f}",
                _fmt(a["jaccard_mean"], a["jaccard_std"], 3),
                _fmt(a["weighted_jaccard_mean"], a["weighted_jaccard_std"], 3),
                _fmt(a["dice_mean"], a["dice_std"], 3),
                _fmt(a["hd95_mean"], a["hd95_std"], 1),
                _fmt(a["latency_ms_mean"], a["latency_ms_std"], 1)]
        if show_gpu:
            line.append(_fmt(a["gpu_latency_ms_mean"], a["gpu_latency_ms_std"], 2))
        mem_key = "gpu_peak_mem_mb" if show_gpu else "peak_mem_mb"
        line += [_fmt(a[f"{mem_key}_mean"], math.nan, 1), str(a["seeds"])]
        body.append(line)
    return _md_table(header, body)


def _verdict_text(d: Mapping, margin: float) -> str:
    """A family_deltas entry's Jaccard verdict in words; with one seed, the warning that the
    interval holds the validation-case noise only (a seed's own spread can exceed it)."""
    verdict = d["jaccard_verdict"]
    if verdict in ("better", "not worse", "worse", "inconclusive"):
        verdict = verdict_sentence(verdict, margin, MODE_LABELS[d["attention"]])
    if d["seeds"] < 2 and math.isfinite(d["jaccard_pts"]):
        verdict += "; one seed: training noise not in the interval"
    return verdict


def deltas_table(rows: Sequence[ResultRow | Mapping], *, margin: float = DEFAULT_MARGIN,
                 resamples: int = DEFAULT_RESAMPLES) -> str:
    """Per family, each mode against QKV with 95% intervals and verdicts (markdown)."""
    header = ["family", "vs QKV", "params", "MACs", "Δ Jaccard (pts) [95% CI]",
              "Δ weighted Jaccard (pts) [95% CI]", "QKV Jaccard seed std (pts)", "seeds",
              "case-days", "verdict (Jaccard)"]
    body = []
    for d in family_deltas(rows, margin=margin, resamples=resamples):
        verdict = _verdict_text(d, margin)
        body.append([d["family"], MODE_LABELS[d["attention"]], f"{d['params_pct']:+.2f} %",
                     f"{d['macs_pct']:+.2f} %", _ci(d, "jaccard"), _ci(d, "weighted_jaccard"),
                     _fmt(d["qkv_jaccard_std"], math.nan, 2), str(d["seeds"]),
                     str(d["cases"]) if d["cases"] else "–", verdict])
    return _md_table(header, body)


def _ci(d: Mapping, key: str) -> str:
    est, low, high = d[f"{key}_pts"], d[f"{key}_low"], d[f"{key}_high"]
    if not math.isfinite(est):
        return "–"
    if not (math.isfinite(low) and math.isfinite(high)):
        return f"{est:+.2f}"
    return f"{est:+.2f} [{low:+.2f}, {high:+.2f}]"


def _paragraphs(texts: Sequence[str]) -> list[str]:
    """Each text as its own markdown paragraph (a blank line after each)."""
    return [line for t in texts for line in (t, "")]


def statistics_text(margin: float = DEFAULT_MARGIN,
                    resamples: int = DEFAULT_RESAMPLES) -> list[str]:
    """How the intervals and verdicts are made, in words (the report's method paragraph)."""
    return [
        "Parameters and MACs: relative change. Δ: the mode's score minus QKV's, in percentage "
        "points, paired by seed (the same seed means the same data order and validation "
        "cases), averaged over seeds.",
        f"95% confidence interval: Δ ± t·√(V_cases + V_seeds). V_cases: a paired bootstrap over "
        f"the validation case-days ({resamples} resamples of whole case-days, the same draw "
        "for both variants and every seed; each resampled set is scored from its summed pixel "
        "counts, as the reported Jaccard is). V_seeds: the variance of the per-seed differences "
        "divided by the number of seeds. t: Student's t with Welch-Satterthwaite degrees of "
        "freedom (`kvseg.stats`). With one seed the interval holds the case noise only.",
        f"Verdict, with a non-inferiority margin of {margin:g} points: *better* if the whole "
        f"interval is above 0; *not worse* (non-inferior) if it lies above −{margin:g}; *worse* "
        "if the whole interval is below 0; otherwise *inconclusive* (more seeds or data are "
        "needed to say). The interval speaks about this data and these training settings: "
        "synthetic data or tiny models do not license a statement about the real task.",
    ]


def write_report(out_dir: str | Path, rows: Sequence[ResultRow | Mapping], *, title: str,
                 settings: Mapping[str, object], measured: Sequence[str],
                 figures: Sequence[tuple[str, str]], margin: float = DEFAULT_MARGIN,
                 resamples: int = DEFAULT_RESAMPLES, sections: Sequence[str] = ()) -> Path:
    """report.md: settings, the results table, the KV deltas, what is measured, the figures.

    ``settings`` are shown as a bullet list; ``measured`` are sentences defining each column
    (:func:`measured_text`); ``figures`` are (caption, file name relative to ``out_dir``);
    ``sections`` are further lines after the figures (e.g. :func:`attention_section`'s).
    """
    out_dir = Path(out_dir)
    parts = [f"# {title}", ""]
    parts += [f"- **{k}**: {v}" for k, v in settings.items()]
    parts += ["", "## Results (mean ± std over seeds)", "", results_table(rows), "",
              "## Each mode against QKV, per family", "",
              *_paragraphs(statistics_text(margin, resamples)), deltas_table(rows, margin=margin,
                                                                     resamples=resamples), "",
              *_missed_text(rows), "## What is measured", ""]
    parts += [f"- {m}" for m in measured]
    parts += ["", "## Figures", ""]
    for caption, name in figures:
        parts += [f"**{caption}**", "", f"![{caption}]({name})", ""]
    parts += ["Per-run numbers: `results.csv` / `results.json`; each run's folder holds its "
              "`config.yaml`, `metrics.csv`, `curves.png`, `eval_val.json`, `done.json`; "
              "`runs/<model>/profile.json` holds the profile.", ""]
    if sections:
        parts += ["", *sections]
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(parts))
    return path


def measured_text(config: RunConfig | None, *, evaluation: Mapping | None, repeats: int,
                  warmup: int, threads: int) -> list[str]:
    """The "What is measured" sentences, from what the runs say: their classes, task and
    threshold (``config``, the first run's) and how their evaluation measured distances
    (``evaluation``: an ``eval_val.json``; its slice thickness and whether the cases are
    volumes with their own spacing)."""
    if config is None:
        rule, over = "", "the classes"
    else:
        names = ", ".join(c.replace("_", " ") for c in config.classes)
        over = f"the {len(config.classes)} classes ({names})"
        rule = (f"; a pixel is predicted for a class when its sigmoid ≥ {config.threshold:g}"
                if config.task == "multilabel" else
                "; each pixel takes the class of its largest softmax output (the background "
                "class is not scored)")
    volumes = bool(evaluation and any("volume" in c for c in evaluation.get("cases", [])))
    if volumes:
        spacing = "each volume's own voxel spacing rescaled to the model input"
    else:
        thickness = (evaluation or {}).get("slice_thickness_mm", 3.0)
        spacing = (f"the slices' pixel spacing rescaled to the model input, slices "
                   f"{thickness:g} mm apart")
    return [
        "**Jaccard / weighted Jaccard / Dice**: over the whole validation fold at the model's "
        f"input size, per-class TP/FP/FN summed over all pixels, then the mean over {over} "
        "(weighted Jaccard: weighted by each class's ground-truth pixel count)"
        f"{rule} (`kvseg.training.metrics`).",
        "**HD95 (mm)**: 95th-percentile symmetric Hausdorff distance per case 3D volume "
        f"({spacing}), averaged over cases and classes where it is defined (`kvseg evaluate`).",
        "**params**: all parameters; **GMACs**: multiply-accumulates of one forward at batch 1 "
        "and the preset's image size, convolutions, linear layers, both attention products and "
        "the KV-pos bias included (`kvseg.inference.profile.count_macs`).",
        "**CPU latency**: median of the wall time of repeated batch-1 forward passes after "
        f"warm-up ({repeats} timed, {warmup} warm-up), eval mode, inference mode, {threads} "
        "thread(s); **GPU latency** (when CUDA is used): the same with CUDA synchronisation.",
        "**peak mem (MB)**: CPU: the peak of tensor memory allocated during one batch-1 forward "
        "(activations and workspace, weights excluded), from torch.profiler's allocation and "
        "free events; with CUDA the column shows max_memory_allocated during one forward minus "
        "the memory allocated before it. Process RSS is not used: it includes the Python "
        "interpreter, the dataset cache and earlier training.",
        "Training time and steps per run are in results.csv (`train_seconds`, `steps`).",
    ]


def _missed_text(rows: Sequence[ResultRow | Mapping]) -> list[str]:
    """Missed organs and false alarms per variant (summed over seeds), when measured."""
    agg: dict[str, list[int]] = {}
    for r in sorted(as_rows(rows), key=ResultRow.order_key):
        if r.missed is None:
            continue
        m = agg.setdefault(r.model, [0, 0, 0, 0])
        m[0] += r.missed
        m[1] += r.false_alarms or 0
        m[2] += len(r.cases or [])
        m[3] += 1
    if not agg:
        return []
    body = [[f"`{name}`", str(m[0]), str(m[1]), str(m[2]) if m[2] else "–", str(m[3])]
            for name, m in agg.items()]
    return ["### Missed organs and false alarms", "",
            "Case-days × classes where an organ in the ground truth was not predicted at all "
            "(missed) or an absent organ was predicted (false alarm), summed over seeds. Plain "
            "HD95 skips them; the `hd95_penalized` column of results.csv counts each as the "
            "volume diagonal.", "",
            _md_table(["variant", "missed", "false alarms", "case-days (all seeds)", "seeds"],
                      body), ""]


# --------------------------------------------------------------------------- sweeps
def sweep_deltas(rows: Sequence[Mapping], *, margin: float = DEFAULT_MARGIN,
                 resamples: int = DEFAULT_RESAMPLES) -> dict[str, list[dict]]:
    """Per factor, :func:`family_deltas` at each of its values (each dict gains ``value``)."""
    out: dict[str, list[dict]] = {}
    groups: dict[tuple, list[Mapping]] = {}
    for r in rows:
        groups.setdefault((r["factor"], r["value"]), []).append(
            {k: v for k, v in r.items() if k not in ("factor", "value")})
    for (factor, value), group in sorted(groups.items(),
                                         key=lambda kv: (kv[0][0], value_key(kv[0][1]))):
        for d in family_deltas(group, margin=margin, resamples=resamples):
            out.setdefault(factor, []).append({"value": value, **d})
    return out


def write_sweep_report(out_dir: str | Path, rows: Sequence[Mapping], *, vary: Mapping,
                       grid: bool, preset, margin: float = DEFAULT_MARGIN,
                       device: str = "cpu") -> Path:
    """report.md of a sweep and one ``sweep_<factor>.png`` per factor (see :mod:`kvseg.sweep`)."""
    out_dir = Path(out_dir)
    resamples = getattr(preset, "resamples", DEFAULT_RESAMPLES)
    deltas = sweep_deltas(rows, margin=margin, resamples=resamples)
    design = ("every combination of " if grid else "one factor at a time around the preset: ") \
        + "; ".join(f"`{k}` = {', '.join(map(str, v))}" for k, v in vary.items())
    seeds = sorted({int(r["seed"]) for r in rows})
    parts = ["# kvseg sweep: does KV hold up across the factors?", "",
             f"- **design**: {design}",
             f"- **preset**: {preset.name} ({preset.path}); training options (the same for every "
             f"run, apart from the factor): "
             f"{', '.join(f'{k}={v}' for k, v in sorted(preset.train.items()))}",
             f"- **models**: {', '.join(dict.fromkeys(r['model'] for r in rows))}",
             f"- **seeds**: {', '.join(map(str, seeds))}; **device**: {device}",
             f"- **rows**: `sweep.csv` / `sweep.json` ({len(rows)} rows: factor, value, model, "
             "seed, then the results.csv columns)", "",
             *_paragraphs(statistics_text(margin, resamples))]
    for factor, ds in deltas.items():
        parts += [f"## {factor}", ""]
        body = []
        for d in ds:
            verdict = _verdict_text(d, margin)
            body.append([str(d["value"]), d["family"], MODE_LABELS[d["attention"]],
                         f"{d['params_pct']:+.2f} %", f"{d['macs_pct']:+.2f} %",
                         _ci(d, "jaccard"), _ci(d, "weighted_jaccard"), str(d["seeds"]),
                         verdict])
        parts += [_md_table([factor, "family", "vs QKV", "params", "MACs",
                             "Δ Jaccard (pts) [95% CI]", "Δ weighted Jaccard (pts) [95% CI]",
                             "seeds", "verdict (Jaccard)"], body), ""]
        png = f"sweep_{_safe_name(factor)}.png"
        plot_sweep(ds, factor, out_dir / png)
        parts += [f"![{factor}]({png})", ""]
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(parts))
    return path


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in str(text))


def attention_section(entries: Sequence[Mapping], *, slice_id: str,
                      point: tuple[float, float], figure: str) -> list[str]:
    """The reproduction report's attention section: the side-by-side figure and a table of each
    variant's last encoder layer: symmetry index of its pre-softmax logits and mean attention
    distance, both averaged over the heads (:mod:`kvseg.explain`).

    ``entries``: one mapping per variant with ``model``, ``family``, ``attention`` (the mode),
    ``layer`` (module name), ``symmetry``, ``distance`` (model-input pixels).
    """
    body = [[MODE_LABELS.get(e["attention"], e["attention"]), e["model"], e["family"],
             f"`{e['layer']}`", f"{e['symmetry']:.4f}", f"{e['distance']:.1f}"]
            for e in entries]
    return ["## Attention (last encoder layer)", "",
            f"One validation slice (`{slice_id}`), query point (x, y) = ({point[0]:.0f}, "
            f"{point[1]:.0f}) in model-input pixels: each variant's head-mean attention of "
            "that point (first seed). Symmetry index: ‖L − Lᵀ‖/‖L‖ of the pre-softmax logits "
            "on the slice, mean over heads (0 for the Q = K modes by construction; CvT: the "
            "queries at the keys' stride-2 positions against the keys); distance: the "
            "attention-weighted mean distance between query and key cells, mean over heads "
            "and all queries (`kvseg attention` gives every layer and head).", "",
            f"![attention of one query point, last encoder layer]({figure})", "",
            _md_table(["attention", "model", "family", "layer", "symmetry index",
                       "mean distance (px)"], body), ""]
