"""Every figure kvseg writes (matplotlib, Agg, PNG): a reproduction's Jaccard-vs-MACs, training
curves and sample predictions, and a sweep's per-factor plot.

Pure functions of result rows (:class:`kvseg.results.ResultRow` or mappings), the statistics of
:mod:`kvseg.report` and the runs' ``metrics.csv``; each writes its PNG atomically. The tables
and text live in :mod:`kvseg.report`.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from kvseg.experiments.results import ResultRow, aggregate, as_rows, value_key
from kvseg.inference.explain import attention_panel
from kvseg.inference.predict import overlay
from kvseg.layers.attention import MODE_LABELS, MODES
from kvseg.models.registry import NO_ATTENTION
from kvseg.utils import pyplot, save_figure

MARKERS = {"qkv": "o", "kv": "s", "kv_pos": "^", "shared_kv": "D", "shared_qv": "v",
           "single": "P", "kv_relpos": "*", NO_ATTENTION: "X"}
LINESTYLES = {"qkv": "-", "kv": "--", "kv_pos": ":", "shared_kv": "-.", "shared_qv": "-.",
              "single": "--", "kv_relpos": ":", NO_ATTENTION: (0, (5, 1, 1, 1))}


def mode_name(mode: str) -> str:
    """A row's attention as shown in figures: the mode's label, or ``CNN (no attention)``
    for the reference (``dynunet``, mode ``none``)."""
    return "CNN (no attention)" if mode == NO_ATTENTION else MODE_LABELS.get(mode, mode)


def _family_colors(families: Iterable[str]) -> dict[str, str]:
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    return {f: palette[i % len(palette)] for i, f in enumerate(sorted(set(families)))}


def plot_jaccard_vs_macs(rows: Sequence[ResultRow | Mapping], path: str | Path) -> Path:
    """Validation Jaccard against GMACs, one panel per family (shared y axis).

    Each seed is a faint point; the mean over seeds is a large marker with an error bar of one
    standard deviation. Modes differ by colour and marker (legend); the modes of a family have
    nearly the same MACs, so their points are spread apart by a small horizontal offset (1 % of
    the family's MACs per mode, said in the axis label) instead of being labelled in place; the
    seeds sit just left of their mean. The CNN reference (``dynunet``, mode ``none``: a black
    X) has its own panel, and its mean is a dash-dotted black line in every other panel.
    """
    plt = pyplot()

    parsed = as_rows(rows)
    agg = aggregate(parsed)
    families = sorted({a["family"] for a in agg})
    modes = [m for m in (*MODES, NO_ATTENTION) if any(a["attention"] == m for a in agg)]
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown",
               "tab:pink"]
    colors = {m: palette[i % len(palette)] for i, m in enumerate(modes)}
    colors[NO_ATTENTION] = "black"
    references = [a for a in agg if a["attention"] == NO_ATTENTION
                  and math.isfinite(a["jaccard_mean"])]
    fig, axes = plt.subplots(1, max(1, len(families)), figsize=(3.4 * max(1, len(families)), 3.8),
                             sharey=True, squeeze=False)
    for ax, family in zip(axes[0], families, strict=False):
        fam = [a for a in agg if a["family"] == family]
        ref = max(float(a["macs"]) for a in fam) / 1e9
        for a in fam:
            mode = a["attention"]
            k = modes.index(mode) - (len(modes) - 1) / 2 if mode in modes else 0
            x = float(a["macs"]) / 1e9 + 0.01 * ref * k
            seeds = [r.jaccard for r in parsed if r.model == a["model"]
                     and math.isfinite(r.jaccard)]
            ax.scatter([x - 0.004 * ref] * len(seeds), seeds, s=14, alpha=0.35,
                       color=colors.get(mode, "gray"), marker=MARKERS.get(mode, "x"),
                       linewidths=0)
            std = a["jaccard_std"] if math.isfinite(a["jaccard_std"]) else 0.0
            ax.errorbar(x, a["jaccard_mean"], yerr=std, capsize=3, markersize=8,
                        marker=MARKERS.get(mode, "x"), linestyle="none",
                        color=colors.get(mode, "gray"))
        if all(a["attention"] != NO_ATTENTION for a in fam):
            for a in references:  # the CNN reference's mean as a line in every other panel
                ax.axhline(a["jaccard_mean"], color="black", linewidth=0.8,
                           linestyle=LINESTYLES[NO_ATTENTION], alpha=0.6)
        ax.set_title(family, fontsize=9)
        ax.set_xlabel("GMACs per image (batch 1)\n(modes offset by 1 % for visibility)",
                      fontsize=7)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
        ax.set_xlim(min(float(a["macs"]) / 1e9 for a in fam) - 0.03 * ref, ref * 1.03)
    axes[0][0].set_ylabel("validation Jaccard (mean over classes)", fontsize=8)
    handles = [plt.Line2D([], [], color=colors[m], marker=MARKERS.get(m, "x"), linestyle="none",
                      label=mode_name(m)) for m in modes]
    handles += [plt.Line2D([], [], color="black", linestyle=LINESTYLES[NO_ATTENTION],
                           alpha=0.6, label=f"{a['model']} (mean)") for a in references]
    handles.append(plt.Line2D([], [], color="gray", marker="o", alpha=0.35, linestyle="none",
                          label="one seed"))
    ncol = min(len(handles), 2 + 2 * len(families))  # the legend fits the figure's width
    fig.legend(handles=handles, fontsize=8, loc="lower center", ncol=ncol,
               frameon=False, bbox_to_anchor=(0.5, -0.02))
    fig.tight_layout(rect=(0, 0.06 * math.ceil(len(handles) / ncol), 1, 1))
    path = Path(path)
    save_figure(fig, path)
    return path


def read_metrics_csv(path: str | Path) -> dict[str, list[float]]:
    """A run's metrics.csv as columns of floats (empty cells become NaN)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    cols: dict[str, list[float]] = {}
    for row in rows:
        for k, v in row.items():
            try:
                cols.setdefault(k, []).append(float(v) if v not in ("", None) else math.nan)
            except ValueError:
                cols.setdefault(k, []).append(math.nan)
    return cols


def plot_training_curves(runs: Mapping[str, tuple[str, str, Path]], path: str | Path) -> Path:
    """Training loss and validation Jaccard per epoch of every run.

    ``runs`` maps a label (``model/seed``) to (family, attention, metrics.csv path); missing
    files are skipped. Colour = family, line style = attention mode.
    """
    plt = pyplot()

    colors = _family_colors(f for f, _, _ in runs.values())
    fig, (ax_loss, ax_jac) = plt.subplots(1, 2, figsize=(11, 4))
    for label, (family, mode, csv_path) in sorted(runs.items()):
        if not Path(csv_path).is_file():
            continue
        cols = read_metrics_csv(csv_path)
        epochs = cols.get("epoch") or list(range(1, len(next(iter(cols.values()), [])) + 1))
        style = dict(color=colors[family], linestyle=LINESTYLES.get(mode, "-"), marker=".",
                     label=label)
        if "train_loss" in cols:
            ax_loss.plot(epochs, cols["train_loss"], **style)
        if "jaccard" in cols:
            ax_jac.plot(epochs, cols["jaccard"], **style)
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="training loss")
    ax_jac.set(xlabel="epoch", ylabel="validation Jaccard", title="validation Jaccard")
    for ax in (ax_loss, ax_jac):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax_jac.legend(fontsize=6, ncol=2, loc="best")
    fig.tight_layout()
    path = Path(path)
    save_figure(fig, path)
    return path


def plot_samples(images: np.ndarray, masks: np.ndarray, predictions: Mapping[str, np.ndarray],
                 ids: Sequence[str], path: str | Path) -> Path:
    """Grid: one row per validation slice; columns = ground truth, then each model's prediction,
    as coloured overlays (:data:`kvseg.predict.CLASS_COLORS`).

    ``images`` (N, S, S) float (the centre channel of the model input), ``masks`` and each
    ``predictions[label]`` (N, classes, S, S) binary.
    """
    plt = pyplot()

    labels = list(predictions)
    n, cols = len(images), 1 + len(labels)
    fig, axes = plt.subplots(n, cols, figsize=(1.7 * cols, 1.8 * n), squeeze=False)
    for i in range(n):
        panels = [("ground truth", masks[i])] + [(lab, predictions[lab][i]) for lab in labels]
        for j, (title, mask) in enumerate(panels):
            ax = axes[i][j]
            ax.imshow(overlay(images[i], mask))
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=7)
            if j == 0:
                ax.set_ylabel(ids[i], fontsize=6)
    fig.tight_layout()
    path = Path(path)
    save_figure(fig, path)
    return path


def plot_sweep(deltas: Sequence[Mapping], factor: str, path: str | Path) -> Path:
    """Δ Jaccard (95% interval) and the parameter / MAC saving of each mode against QKV, per
    family, against the factor's value."""
    plt = pyplot()

    values = sorted({d["value"] for d in deltas}, key=value_key)
    numeric = all(value_key(v)[0] == 0 for v in values)
    xpos = {v: (float(v) if numeric else i) for i, v in enumerate(values)}
    colors = _family_colors(d["family"] for d in deltas)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    series: dict[tuple, list[Mapping]] = {}
    for d in deltas:
        series.setdefault((d["family"], d["attention"]), []).append(d)
    for (family, mode), ds in sorted(series.items()):
        ds = sorted(ds, key=lambda d: value_key(d["value"]))
        x = [xpos[d["value"]] for d in ds]
        y = [d["jaccard_pts"] for d in ds]
        lo = [d["jaccard_pts"] - d["jaccard_low"] if math.isfinite(d["jaccard_low"]) else 0
              for d in ds]
        hi = [d["jaccard_high"] - d["jaccard_pts"] if math.isfinite(d["jaccard_high"]) else 0
              for d in ds]
        style = dict(color=colors[family], marker=MARKERS.get(mode, "x"),
                     linestyle=LINESTYLES.get(mode, "-"), label=f"{family} {MODE_LABELS[mode]}")
        ax1.errorbar(x, y, yerr=[lo, hi], capsize=3, **style)
        ax2.plot(x, [-d["macs_pct"] for d in ds], **style)
        ax2.plot(x, [-d["params_pct"] for d in ds], color=colors[family], alpha=0.35,
                 marker=MARKERS.get(mode, "x"), linestyle=":")
    ax1.axhline(0, color="gray", linewidth=0.8)
    ax1.set(xlabel=factor, ylabel="Δ Jaccard vs QKV (points, 95% CI)")
    ax2.set(xlabel=factor, ylabel="saving vs QKV (%): MACs solid, params faint")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if not numeric:
            ax.set_xticks(range(len(values)), [str(v) for v in values])
    ax1.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    save_figure(fig, path)
    return path


def plot_attention_comparison(image: np.ndarray, maps: Mapping[str, np.ndarray],
                              point: tuple[float, float], path: str | Path,
                              ncols: int = 7) -> Path:
    """The reproduction's attention figure: for one slice and one query point, each variant's
    last encoder layer's head-mean attention, side by side (``maps``: variant -> (h, w) map on
    its key grid), ``ncols`` panels per row."""
    plt = pyplot()

    names = list(maps)
    cols = max(1, min(ncols, len(names)))
    nrows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(1.7 * cols, 1.85 * nrows), squeeze=False)
    for k, ax in enumerate(ax for row in axes for ax in row):
        if k < len(names):
            attention_panel(ax, image, maps[names[k]], [point], names[k])
        else:
            ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    save_figure(fig, path)
    return path


def plot_patient_differences(per_patient: Mapping[str, Mapping[str, Sequence[float]]],
                             intervals: Mapping[str, tuple[float, float, float]],
                             path: str | Path) -> Path:
    """The per-patient paired differences: one row per comparison (e.g. ``"setr KV"``), each
    patient's own Jaccard difference B − A (points) per seed as small dots and its mean over
    seeds as a large one, with the comparison's estimate and 95% interval (``intervals``:
    label -> (estimate, low, high); an infinite bound is drawn to the plot's edge)."""
    plt = pyplot()
    labels = list(per_patient)
    fig, ax = plt.subplots(figsize=(8, 0.55 * max(len(labels), 2) + 1.2))
    rng = np.random.default_rng(0)
    for i, label in enumerate(labels):
        y = len(labels) - 1 - i
        for diffs in per_patient[label].values():
            ax.scatter(diffs, y + rng.uniform(-0.12, 0.12, len(diffs)), s=6, color="gray",
                       alpha=0.5, linewidths=0)
            ax.scatter([float(np.mean(diffs))], [y], s=18, color="tab:blue", alpha=0.8,
                       linewidths=0)
    bounds = [b for v in intervals.values() for b in v if math.isfinite(b)]
    if bounds:  # the finite interval ends inside the plot; an infinite one runs to its edge
        lo, hi = ax.get_xlim()
        pad = 0.05 * (max(hi, *bounds) - min(lo, *bounds))
        ax.set_xlim(min(lo, min(bounds) - pad), max(hi, max(bounds) + pad))
    lo, hi = ax.get_xlim()
    for i, label in enumerate(labels):
        y = len(labels) - 1 - i
        est, low, high = intervals.get(label, (math.nan, math.nan, math.nan))
        if math.isfinite(est):
            ax.plot([max(low, lo), min(high, hi)], [y + 0.3] * 2, color="tab:red", linewidth=2)
            ax.plot([est], [y + 0.3], marker="|", color="tab:red", markersize=10)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(labels)), labels[::-1])
    ax.set(xlabel="per-patient Δ Jaccard vs QKV (points): grey = one seed, blue = mean over "
                  "seeds; red = estimate and 95% interval")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    path = Path(path)
    save_figure(fig, path)
    return path
