"""Tables and plots of a reproduction: results.csv/json, report.md and the figures.

Everything here is a pure function of result rows (one :class:`kvseg.results.ResultRow` per
model and seed, or a mapping that :meth:`~kvseg.results.ResultRow.from_dict` accepts) plus, for
the figures, the runs' ``metrics.csv`` files and the sample predictions;
:func:`kvseg.reproduce.reproduce` gathers those and calls :func:`write_report`. The files
results.csv/json are written and read by :mod:`kvseg.results` (``write_results`` and
``RESULT_COLUMNS`` are re-exported here).

Conventions: ``mean ± std`` is over seeds with the sample standard deviation (ddof = 1); with one
seed only the mean is shown. KV / KV-pos deltas against QKV are paired by seed: Δ Jaccard is the
mean over seeds of (J_mode − J_qkv) in percentage points, its spread the standard deviation of
those paired differences; parameter and MAC deltas are relative (%) and do not depend on the seed.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from kvseg.layers.attention import MODE_LABELS
from kvseg.results import (  # noqa: F401  (RESULT_COLUMNS, write_results: re-exported)
    METRIC_COLUMNS,
    RESULT_COLUMNS,
    ResultRow,
    as_rows,
    write_results,
)
from kvseg.utils import atomic_write_bytes, atomic_write_text

#: Metrics averaged over seeds in the report: the float columns of results.csv.
METRICS = METRIC_COLUMNS
_MARKERS = {"qkv": "o", "kv": "s", "kv_pos": "^"}
_LINESTYLES = {"qkv": "-", "kv": "--", "kv_pos": ":"}


# --------------------------------------------------------------------------- numbers
def _finite(values: Iterable) -> list[float]:
    out = []
    for v in values:
        if v is None or v == "":
            continue
        v = float(v)
        if math.isfinite(v):
            out.append(v)
    return out


def mean_std(values: Iterable) -> tuple[float, float, int]:
    """(mean, sample std, n) of the finite values; NaN for what is undefined (std needs n ≥ 2)."""
    vals = _finite(values)
    if not vals:
        return math.nan, math.nan, 0
    std = statistics.stdev(vals) if len(vals) > 1 else math.nan
    return statistics.fmean(vals), std, len(vals)


def aggregate(rows: Sequence[ResultRow | Mapping]) -> list[dict]:
    """One dict per model: identity columns, ``seeds`` (n), and ``<metric>_mean/_std``."""
    by_model: dict[str, list[ResultRow]] = {}
    for row in as_rows(rows):
        by_model.setdefault(row.model, []).append(row)
    out = []
    for model, group in sorted(by_model.items(), key=lambda kv: kv[1][0].order_key()[:3]):
        first = group[0]
        agg = {"model": model, "family": first.family, "attention": first.attention,
               "params": first.params, "macs": first.macs, "seeds": len(group)}
        for key in METRICS:
            agg[f"{key}_mean"], agg[f"{key}_std"], _ = mean_std(getattr(r, key) for r in group)
        out.append(agg)
    return out


def family_deltas(rows: Sequence[ResultRow | Mapping]) -> list[dict]:
    """KV and KV-pos against QKV, per family (see the module docstring for the conventions).

    Keys: family, attention, params_pct, macs_pct, jaccard_pts, jaccard_pts_std,
    weighted_jaccard_pts, weighted_jaccard_pts_std, qkv_jaccard_std, seeds (paired).
    """
    index = {(r.family, r.attention, r.seed): r for r in as_rows(rows)}
    out = []
    for family in sorted({f for f, _, _ in index}):
        base = {seed: r for (f, m, seed), r in index.items() if f == family and m == "qkv"}
        if not base:
            continue
        for mode in ("kv", "kv_pos"):
            pairs = [(base[s], r) for (f, m, s), r in index.items()
                     if f == family and m == mode and s in base]
            if not pairs:
                continue
            q0, r0 = pairs[0]
            d = {"family": family, "attention": mode, "seeds": len(pairs),
                 "params_pct": 100.0 * (r0.params - q0.params) / q0.params,
                 "macs_pct": 100.0 * (r0.macs - q0.macs) / q0.macs}
            for key in ("jaccard", "weighted_jaccard"):
                diffs = [100.0 * (getattr(r, key) - getattr(q, key)) for q, r in pairs]
                d[f"{key}_pts"], d[f"{key}_pts_std"], _ = mean_std(diffs)
            d["qkv_jaccard_std"] = 100.0 * mean_std(b.jaccard for b in base.values())[1]
            out.append(d)
    return out


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


def deltas_table(rows: Sequence[ResultRow | Mapping]) -> str:
    """Per family, KV and KV-pos against QKV (markdown)."""
    header = ["family", "vs QKV", "params", "MACs", "Δ Jaccard (pts)", "Δ weighted Jaccard (pts)",
              "QKV Jaccard seed std (pts)", "seeds", "reading"]
    body = []
    for d in family_deltas(rows):
        spread = d["jaccard_pts_std"]
        if not math.isfinite(d["jaccard_pts"]):
            reading = "no score (a run diverged)"
        elif d["seeds"] < 2 or not math.isfinite(spread):
            reading = "one seed: noise unknown"
        elif abs(d["jaccard_pts"]) <= 2 * spread:
            reading = "within seed noise"
        else:
            reading = "better" if d["jaccard_pts"] > 0 else "worse"
        body.append([d["family"], MODE_LABELS[d["attention"]], f"{d['params_pct']:+.2f} %",
                     f"{d['macs_pct']:+.2f} %",
                     _fmt(d["jaccard_pts"], d["jaccard_pts_std"], 2),
                     _fmt(d["weighted_jaccard_pts"], d["weighted_jaccard_pts_std"], 2),
                     _fmt(d["qkv_jaccard_std"], math.nan, 2), str(d["seeds"]), reading])
    return _md_table(header, body)


def write_report(out_dir: str | Path, rows: Sequence[ResultRow | Mapping], *, title: str,
                 settings: Mapping[str, object], measured: Sequence[str],
                 figures: Sequence[tuple[str, str]]) -> Path:
    """report.md: settings, the results table, the KV deltas, what is measured, the figures.

    ``settings`` are shown as a bullet list; ``measured`` are sentences defining each column;
    ``figures`` are (caption, file name relative to ``out_dir``).
    """
    out_dir = Path(out_dir)
    parts = [f"# {title}", ""]
    parts += [f"- **{k}**: {v}" for k, v in settings.items()]
    parts += ["", "## Results (mean ± std over seeds)", "", results_table(rows), "",
              "## KV and KV-pos against QKV, per family", "",
              "Parameters and MACs: relative change. Δ Jaccard: percentage points, paired by "
              "seed (mean ± std of the per-seed differences); a difference within two standard "
              "deviations is read as seed noise.", "", deltas_table(rows), "",
              "## What is measured", ""]
    parts += [f"- {m}" for m in measured]
    parts += ["", "## Figures", ""]
    for caption, name in figures:
        parts += [f"**{caption}**", "", f"![{caption}]({name})", ""]
    parts += ["Per-run numbers: `results.csv` / `results.json`; each run's folder holds its "
              "`config.yaml`, `metrics.csv`, `curves.png`, `eval_val.json`, `done.json`; "
              "`runs/<model>/profile.json` holds the profile.", ""]
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(parts))
    return path


# --------------------------------------------------------------------------- figures
def _save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _family_colors(families: Iterable[str]) -> dict[str, str]:
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    return {f: palette[i % len(palette)] for i, f in enumerate(sorted(set(families)))}


def plot_jaccard_vs_macs(rows: Sequence[ResultRow | Mapping], path: str | Path) -> Path:
    """Each variant a point (mean Jaccard over seeds, error bar = std) against GMACs;
    families by colour, attention modes by marker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(rows)
    colors = _family_colors(a["family"] for a in agg)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for a in agg:
        std = a["jaccard_std"] if math.isfinite(a["jaccard_std"]) else 0.0
        ax.errorbar(float(a["macs"]) / 1e9, a["jaccard_mean"], yerr=std, capsize=3,
                    marker=_MARKERS.get(a["attention"], "x"), markersize=8, linestyle="none",
                    color=colors[a["family"]])
        ax.annotate(a["model"], (float(a["macs"]) / 1e9, a["jaccard_mean"]), fontsize=6,
                    xytext=(4, 4), textcoords="offset points")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, marker="o", linestyle="none", label=f)
               for f, c in colors.items()]
    handles += [Line2D([], [], color="gray", marker=m, linestyle="none", label=MODE_LABELS[k])
                for k, m in _MARKERS.items()]
    ax.legend(handles=handles, fontsize=8, loc="best")
    ax.set_xlabel("GMACs per image (batch 1)")
    ax.set_ylabel("validation Jaccard (mean over classes)")
    ax.grid(alpha=0.3)
    path = Path(path)
    _save_figure(fig, path)
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = _family_colors(f for f, _, _ in runs.values())
    fig, (ax_loss, ax_jac) = plt.subplots(1, 2, figsize=(11, 4))
    for label, (family, mode, csv_path) in sorted(runs.items()):
        if not Path(csv_path).is_file():
            continue
        cols = read_metrics_csv(csv_path)
        epochs = cols.get("epoch") or list(range(1, len(next(iter(cols.values()), [])) + 1))
        style = dict(color=colors[family], linestyle=_LINESTYLES.get(mode, "-"), marker=".",
                     label=label)
        if "train_loss" in cols:
            ax_loss.plot(epochs, cols["train_loss"], **style)
        if "jaccard" in cols:
            ax_jac.plot(epochs, cols["jaccard"], **style)
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="training loss")
    ax_jac.set(xlabel="epoch", ylabel="validation Jaccard", title="validation Jaccard")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_jac):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_jac.legend(fontsize=6, ncol=2, loc="best")
    fig.tight_layout()
    path = Path(path)
    _save_figure(fig, path)
    return path


def plot_samples(images: np.ndarray, masks: np.ndarray, predictions: Mapping[str, np.ndarray],
                 ids: Sequence[str], path: str | Path) -> Path:
    """Grid: one row per validation slice; columns = ground truth, then each model's prediction,
    as coloured overlays (:data:`kvseg.predict.CLASS_COLORS`).

    ``images`` (N, S, S) float (the centre channel of the model input), ``masks`` and each
    ``predictions[label]`` (N, classes, S, S) binary.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kvseg.predict import overlay

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
    _save_figure(fig, path)
    return path
