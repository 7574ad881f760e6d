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
    md_table,
    mean_std,
    value_key,
    write_results,
)
from kvseg.experiments.stats import DEFAULT_MARGIN
from kvseg.experiments.verdicts import (  # noqa: F401  (re-exported: their earlier home)
    DELTA_HEADER,
    VERDICT_HEADER,
    apply_holm,
    class_table,
    comparisons,
    delta_cells,
    deltas_table,
    family_deltas,
    limits_text,
    statistics_text,
)
from kvseg.layers.attention import MODE_LABELS
from kvseg.utils import atomic_write_text


# --------------------------------------------------------------------------- text
def _fmt(mean: float, std: float, digits: int) -> str:
    if not math.isfinite(mean):
        return "–"
    if math.isfinite(std):
        return f"{mean:.{digits}f} ± {std:.{digits}f}"
    return f"{mean:.{digits}f}"


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
    return md_table(header, body)


def _paragraphs(texts: Sequence[str]) -> list[str]:
    """Each text as its own markdown paragraph (a blank line after each)."""
    return [line for t in texts for line in (t, "")]


def write_report(out_dir: str | Path, rows: Sequence[ResultRow | Mapping], *, title: str,
                 settings: Mapping[str, object], measured: Sequence[str],
                 figures: Sequence[tuple[str, str]], margin: float = DEFAULT_MARGIN,
                 sections: Sequence[str] = (), classes: Sequence[str] = (),
                 selection: str = "") -> Path:
    """report.md: settings, the results table, the KV deltas (method, limits, both verdicts, the
    per-organ table), what is measured, the figures.

    ``settings`` are shown as a bullet list; ``measured`` are sentences defining each column
    (:func:`measured_text`); ``figures`` are (caption, file name relative to ``out_dir``);
    ``sections`` are further lines after the figures (e.g. :func:`attention_section`'s);
    ``classes`` name the organs of the per-organ table; ``selection`` says which patients the
    verdicts used and what saw them (:func:`kvseg.experiments.verdicts.limits_text`).
    """
    out_dir = Path(out_dir)
    parts = [f"# {title}", ""]
    parts += [f"- **{k}**: {v}" for k, v in settings.items()]
    parts += ["", "## Results (mean ± std over seeds)", "", results_table(rows), "",
              "## Each mode against QKV, per family", "",
              *_paragraphs(statistics_text(margin)), *_paragraphs(limits_text(selection)),
              deltas_table(rows, margin=margin), ""]
    organs = class_table(rows, classes)
    if organs:
        parts += ["### Per organ (exploratory: unadjusted 95% intervals, no verdicts)", "",
                  organs, ""]
    parts += [*_missed_text(rows), "## What is measured", ""]
    parts += [f"- {m}" for m in measured]
    parts += ["", "## Figures", ""]
    for caption, name in figures:
        parts += [f"**{caption}**", "", f"![{caption}]({name})", ""]
    parts += ["Per-run numbers: `results.csv` / `results.json` (with every run's per-scan "
              "counts, so every interval can be recomputed); each run's folder holds its "
              "`config.yaml`, `metrics.csv`, `curves.png`, `eval_val.json` (`eval_test.json` "
              "with a test fold), `done.json`; `runs/<model>/profile.json` holds the profile.", ""]
    if sections:
        parts += ["", *sections]
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(parts))
    return path


def measured_text(config: RunConfig | None, *, evaluation: Mapping | None, repeats: int,
                  warmup: int, threads: int, split: str = "val") -> list[str]:
    """The "What is measured" sentences, from what the runs say: their classes, task and
    threshold (``config``, the first run's) and how their evaluation measured distances
    (``evaluation``: an ``eval_val.json``; its slice thickness and whether the cases are
    volumes with their own spacing); ``split``: ``val`` or ``test``, the fold scored."""
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
        f"**Jaccard / weighted Jaccard / Dice**: over the whole "
        f"{'test' if split == 'test' else 'validation'} fold at the model's "
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
            md_table(["variant", "missed", "false alarms", "case-days (all seeds)", "seeds"],
                      body), ""]


# --------------------------------------------------------------------------- sweeps
def sweep_deltas(rows: Sequence[Mapping], *, margin: float = DEFAULT_MARGIN
                 ) -> dict[str, list[dict]]:
    """Per factor, :func:`family_deltas` at each of its values (each dict gains ``value``), with
    Holm over every comparison of the sweep (one report, one family-wise level)."""
    groups: dict[tuple, list[Mapping]] = {}
    for r in rows:
        groups.setdefault((r["factor"], r["value"]), []).append(
            {k: v for k, v in r.items() if k not in ("factor", "value")})
    entries, factors = [], []
    for (factor, value), group in sorted(groups.items(),
                                         key=lambda kv: (kv[0][0], value_key(kv[0][1]))):
        for d, diff in comparisons(group, margin=margin):
            entries.append(({"value": value, **d}, diff))
            factors.append(factor)
    out: dict[str, list[dict]] = {}
    for factor, d in zip(factors, apply_holm(entries, margin), strict=True):
        out.setdefault(factor, []).append(d)
    return out


def write_sweep_report(out_dir: str | Path, rows: Sequence[Mapping], *, vary: Mapping,
                       grid: bool, preset, margin: float = DEFAULT_MARGIN,
                       device: str = "cpu") -> Path:
    """report.md of a sweep and one ``sweep_<factor>.png`` per factor (see :mod:`kvseg.sweep`)."""
    out_dir = Path(out_dir)
    deltas = sweep_deltas(rows, margin=margin)
    design = ("every combination of " if grid else "one factor at a time around the preset: ") \
        + "; ".join(f"`{k}` = {', '.join(map(str, v))}" for k, v in vary.items())
    seeds = sorted({int(r["seed"]) for r in rows})
    n = sum(len(ds) for ds in deltas.values())
    parts = ["# kvseg sweep: does KV hold up across the factors?", "",
             f"- **design**: {design}",
             f"- **preset**: {preset.name} ({preset.path}); training options (the same for every "
             f"run, apart from the factor): "
             f"{', '.join(f'{k}={v}' for k, v in sorted(preset.train.items()))}",
             f"- **models**: {', '.join(dict.fromkeys(r['model'] for r in rows))}",
             f"- **seeds**: {', '.join(map(str, seeds))}; **device**: {device}",
             f"- **rows**: `sweep.csv` / `sweep.json` ({len(rows)} rows: factor, value, model, "
             "seed, then the results.csv columns)",
             f"- **comparisons**: {n}, one family for Holm's correction", "",
             *_paragraphs(statistics_text(margin, family="sweep")),
             *_paragraphs(limits_text(_sweep_selection(preset)))]
    for factor, ds in deltas.items():
        parts += [f"## {factor}", ""]
        body = [[str(d["value"]), d["family"], MODE_LABELS[d["attention"]],
                 f"{d['params_pct']:+.2f} %", f"{d['macs_pct']:+.2f} %", *delta_cells(d, margin)]
                for d in ds]
        parts += [md_table([factor, "family", "vs QKV", "params", "MACs", *DELTA_HEADER,
                             *VERDICT_HEADER], body), ""]
        png = f"sweep_{_safe_name(factor)}.png"
        plot_sweep(ds, factor, out_dir / png)
        parts += [f"![{factor}]({png})", ""]
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(parts))
    return path


def _sweep_selection(preset) -> str:
    train = getattr(preset, "train", {}) or {}
    if train.get("test_fold") is None:
        return ("The verdicts are computed on the validation fold, which also selected each "
                "run's checkpoint: optimistic (set `test_fold` in the preset to hold patients "
                "out).")
    return (f"The verdicts are computed on test fold {train['test_fold']}: patients that "
            "neither training nor checkpoint selection saw.")


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
            md_table(["attention", "model", "family", "layer", "symmetry index",
                       "mean distance (px)"], body), ""]
