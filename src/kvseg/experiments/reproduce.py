"""``kvseg reproduce``: the paper's experiment in one call.

Every selected variant is trained with the same preset (training options, data split, seeds),
evaluated on the validation fold, and profiled; then results.csv/json, report.md and the figures
are written to ``OUT`` (see :mod:`kvseg.report`). The runs go through the one job runner
(:mod:`kvseg.runner`): finished runs are skipped, interrupted ones continue, and an output
folder never mixes settings. ``OUT`` is owned by one process while it runs
(:class:`kvseg.rundir.FolderLock`).

Layout of ``OUT``::

    runs/<model>/seed<k>/      one training run (config.yaml, metrics.csv, best.safetensors,
                               last.ckpt, curves.png, eval_val.json) and done.json, written last
    runs/<model>/profile.json  params, MACs, latency, peak memory (once per model)
    results.csv results.json report.md jaccard_vs_macs.png training_curves.png samples.png

Profiling (per model, batch 1, the preset's ``img_size`` and channels, random input):
:func:`kvseg.profile.profile_model` (params, MACs with the attention products and the KV-pos
bias, median CPU latency with ``latency_threads`` threads, peak forward memory; CUDA latency and
memory when the device is CUDA).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import platform
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from kvseg.config import PRESET_NAMES, load_config
from kvseg.errors import ConfigError
from kvseg.experiments.presets import Preset, load_preset
from kvseg.experiments.results import ResultRow
from kvseg.experiments.runner import Job, fingerprint, run_jobs
from kvseg.inference.profile import profile_model
from kvseg.training.rundir import FolderLock, command_line
from kvseg.utils import atomic_write_text, check_number, jsonable, resolve_device

log = logging.getLogger(__name__)



@dataclass
class ReproduceSummary:
    """What :func:`reproduce` did: the table it wrote and where."""

    out: Path
    report: Path
    table: str
    trained: int
    skipped: int
    seconds: float

    def __str__(self) -> str:
        return (f"{self.table}\n\n{self.trained} run(s) trained, {self.skipped} already complete "
                f"(skipped); {self.seconds:.0f} s\nreport: {self.report}")


@dataclass
class ListedRuns:
    """The pending runs as self-contained ``kvseg train`` commands (``--list-runs``)."""

    commands: list[str]

    def __str__(self) -> str:
        return "\n".join(self.commands) if self.commands else "# every run is finished"


def preset_path(preset: str) -> Path:
    """``smoke``/``paper`` -> the packaged YAML; anything else is taken as a YAML file path."""
    from kvseg.config import PRESET_NAMES, config_path

    return config_path(preset, option="--preset", names=PRESET_NAMES)


def resolve_models(names: list[str] | tuple[str, ...],
                   modes: list[str] | tuple[str, ...] | None = None) -> list[str]:
    """The variants to run: ``["all"]`` -> every family in ``modes``; otherwise validate each
    name (order kept, no repeats) and, when ``modes`` are given, keep those in them.

    ``modes``: None (for ``all``: the paper's ``qkv kv kv_pos``; named models are kept as
    named), ``["all"]`` or mode names (:func:`kvseg.layers.attention.resolve_modes`).
    """
    from kvseg.layers.attention import resolve_modes
    from kvseg.models.registry import list_models, model_info

    known = list_models()
    keep = resolve_modes(modes)
    if not names or list(names) == ["all"]:
        return list_models(keep)
    out = []
    for name in names:
        if name == "all":
            raise ConfigError("--models: 'all' cannot be combined with names")
        if name not in known:
            raise ConfigError(f"--models {name!r}: unknown; valid: all, {', '.join(known)}")
        if name not in out and (modes is None or model_info(name)["mode"] in keep):
            out.append(name)
    if not out:
        raise ConfigError(f"--modes {' '.join(keep)}: none of the models {' '.join(names)} "
                          "is in these modes")
    return out


# --------------------------------------------------------------------------- samples
def choose_samples(dataset, n: int, max_candidates: int = 400) -> list[int]:
    """Indices of ``n`` validation slices to show: the most classes present, then the largest
    mask area, from different scans where possible (deterministic).

    At most ``max_candidates`` evenly spaced slices are examined.
    """
    if n <= 0 or len(dataset) == 0:
        return []
    step = max(1, len(dataset) // max_candidates)
    scored = []
    for i in range(0, len(dataset), step):
        item = dataset[i]
        mask = item["mask"]
        present = int((mask.flatten(1).sum(1) > 0).sum())
        scored.append((-present, -float(mask.sum()), i, f"{item.get('case')}_{item.get('day')}"))
    scored.sort()
    chosen, scans = [], set()
    for _, _, i, scan in scored:
        if scan not in scans:
            chosen.append(i)
            scans.add(scan)
        if len(chosen) == n:
            break
    for _, _, i, _ in scored:  # fewer scans than n: fill with the next best slices
        if len(chosen) == n:
            break
        if i not in chosen:
            chosen.append(i)
    return sorted(chosen)


# --------------------------------------------------------------------------- main
def default_jobs(device: torch.device, threads: int | None = None) -> int:
    """How many runs to train at once: one per GPU process on CUDA (one device), otherwise the
    cores divided by each run's threads (two single-thread runs on a 2-core machine)."""
    if device.type == "cuda":
        return 1
    return max(1, (os.cpu_count() or 1) // max(1, threads or 1))


def reproduce(data: str | Path, out: str | Path, *, preset: str = "smoke",
              models: list[str] | tuple[str, ...] = ("all",), seeds: list[int] | None = None,
              device: str = "auto", epochs: int | None = None, jobs: int | None = None,
              margin: float | None = None, list_runs: bool = False,
              modes: list[str] | tuple[str, ...] | None = None,
              progress: bool = True) -> ReproduceSummary | ListedRuns:
    """Train, evaluate and profile every selected variant; write the results and the report.

    Args:
        data: dataset root (any layout :func:`kvseg.data.detect_layout` knows).
        out: output folder (created; owned by this process while it runs).
        preset: ``smoke``, ``paper`` or a preset YAML file (:class:`kvseg.config.Preset`).
        models: ``["all"]`` (the preset's list) or variant names.
        seeds: override the preset's seeds.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        epochs: override the preset's epochs.
        jobs: runs trained at the same time in separate processes (None: :func:`default_jobs`);
            each run uses the preset's ``threads`` torch threads, so results do not depend on it.
        margin: the non-inferiority margin of the verdicts, in Jaccard points (None: the
            preset's).
        list_runs: return the pending runs as ``kvseg train`` commands (:class:`ListedRuns`)
            instead of running anything; run reproduce again after they ran to report.
        modes: attention modes to run (:func:`resolve_models`; None: the paper's three for
            ``all``, ``["all"]``: every mode).
        progress: show the overall progress bar.

    Profiling runs first, once per model, while nothing else runs (clean latency); then the
    runs train, ``jobs`` at a time. Returns a :class:`ReproduceSummary` (its ``str`` is the
    table and the report path).
    """
    t_start = time.perf_counter()
    data, out = Path(data), Path(out)
    if not data.is_dir():
        raise FileNotFoundError(f"--data {data}: no such folder")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    cfg = load_preset(preset)
    if cfg.train.get("data_format", "auto") == "auto":
        from kvseg.data import detect_layout

        detect_layout(data)  # a folder no layout knows: one line naming it, before any work
    names = resolve_models(models if models and list(models) != ["all"] else cfg.models, modes)
    seeds = [int(s) for s in (seeds if seeds else cfg.seeds)]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {seeds}: repeated seed")
    if epochs is not None and epochs < 1:
        raise ConfigError(f"--epochs {epochs}: must be >= 1")
    margin = cfg.margin if margin is None else check_number("--margin", margin, minimum=0)
    dev = resolve_device(device)
    n_jobs = default_jobs(dev, cfg.threads) if jobs is None else int(jobs)
    check_number("--jobs", n_jobs, integer=True, minimum=1)
    train_opts = dict(cfg.train)
    if epochs is not None:
        train_opts["epochs"] = int(epochs)
    data_abs = str(data.resolve())
    profile_settings = {"latency_repeats": cfg.latency_repeats,
                        "latency_warmup": cfg.latency_warmup,
                        "latency_threads": cfg.latency_threads}
    job_list = []
    for name in names:
        for seed in seeds:
            run_dir = out / "runs" / name / f"seed{seed}"
            config = load_config(None, {**train_opts, "model": name, "seed": seed,
                                        "data": data_abs, "out": str(run_dir),
                                        "device": str(device)})
            job_list.append(Job.make((name, seed), run_dir, config, profile=profile_settings))

    if list_runs:
        from kvseg.experiments.runner import untrained_jobs

        return ListedRuns([job.train_command() for job in untrained_jobs(job_list)])
    with FolderLock(out, command_line()):
        profile_models(job_list, dev, cfg)
        work = functools.partial(train_and_evaluate, device=str(dev),
                                 progress=progress and n_jobs == 1)
        results = run_jobs(job_list, work, progress=progress, desc="reproduce", n_jobs=n_jobs,
                           threads=cfg.threads, on_done=log_finished)
        rows = [r.row for r in results]
        run_dirs = {r.job.key: r.job.run_dir for r in results}
        report = _write_outputs(out, rows, run_dirs, cfg=cfg, data=data, train_opts=train_opts,
                                device=dev, seeds=seeds, margin=margin, n_jobs=n_jobs)
    from kvseg.experiments.report import results_table

    trained = sum(not r.skipped for r in results)
    return ReproduceSummary(out=out, report=report, table=results_table(rows), trained=trained,
                            skipped=len(results) - trained,
                            seconds=time.perf_counter() - t_start)


def _profile_path(job: Job) -> Path:
    """Where a job's model profile lives: ``meta["profile"]``, else beside its seed folders."""
    return Path(job.meta.get("profile", job.run_dir.parent / "profile.json"))


def _profile_settings(job: Job) -> dict:
    return {k: v for k, v in job.settings.items() if k != "seed"}


def profile_models(jobs: list[Job], device: torch.device, cfg: Preset) -> None:
    """Profile every model configuration with a pending run, once each and before any training,
    so that latency is measured on a quiet machine (params/MACs/latency do not depend on the
    seed). Jobs share a profile when they share :func:`_profile_path`."""
    from kvseg.experiments.runner import pending_jobs

    first: dict[Path, Job] = {}
    for job in pending_jobs(jobs):
        first.setdefault(_profile_path(job), job)
    shapes: dict[tuple, tuple[int, int]] = {}
    for path, job in first.items():
        name = job.config.model
        key = fingerprint(_profile_settings(job))
        if _cached_profile(path, key) is not None:
            continue
        data_key = (job.config.data, job.config.context)
        if data_key not in shapes:  # the data decides the input channels and classes
            from kvseg.data import build_dataset

            item = build_dataset(job.config, "val")[0]
            shapes[data_key] = (int(item["image"].shape[0]), int(item["mask"].shape[0]))
        in_channels, num_classes = shapes[data_key]
        from kvseg.training.checkpoint import build_model

        torch.manual_seed(0)
        model = build_model({**job.config.to_dict(), "in_channels": in_channels,
                             "num_classes": num_classes})
        size = job.config.img_size
        prof = profile_model(model, (1, in_channels, size, size), device=device,
                             repeats=cfg.latency_repeats, warmup=cfg.latency_warmup,
                             threads=cfg.latency_threads)
        atomic_write_text(path, json.dumps({"fingerprint": key, "profile": jsonable(prof)},
                                           indent=2) + "\n")
        log.info("%s: %d params, %.3f GMACs, %.1f ms CPU latency", name, prof["params"],
                 prof["macs"] / 1e9, prof["latency_ms"])


def _cached_profile(path: Path, key: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
        if cached.get("fingerprint") == key:
            return {k: (math.nan if v is None else v) if k.endswith(("_ms", "_mb")) else v
                    for k, v in cached["profile"].items()}
    except (json.JSONDecodeError, KeyError, AttributeError):
        pass
    return None


def train_and_evaluate(job: Job, *, device: str, progress: bool) -> dict:
    """Train and evaluate one job (in this process or a worker); its result row, with the
    model's profile from profile.json. A diverged run is a result too."""
    from kvseg.inference.evaluate import evaluate_run
    from kvseg.models.registry import model_info
    from kvseg.training import train as T

    name, seed = job.key
    config = job.config
    status = "ok"
    try:
        summary = T.train(config, progress=progress)
        evaluation = evaluate_run(job.run_dir, split="val", device=device)
        mean = evaluation["mean"]
        cases = [{k: c[k] for k in ("case", "day", "tp", "fp", "fn")}
                 for c in evaluation["cases"]]
    except T.NonFiniteLossError as e:  # a diverged variant is a result: record it, go on
        log.error("%s seed %d: %s", name, seed, e)
        status = f"diverged: {str(e).split(';')[0]}"
        summary = {"train_seconds": math.nan, "epochs": 0, "steps": 0}
        mean, cases = {}, None
    prof = _cached_profile(_profile_path(job), fingerprint(_profile_settings(job)))
    if prof is None:
        raise RuntimeError(f"{_profile_path(job)}: missing profile (profiled first)")
    info = model_info(name)
    row = ResultRow(
        model=name, family=info["family"], attention=info["mode"], seed=seed,
        params=prof["params"], macs=prof["macs"], jaccard=mean.get("jaccard"),
        weighted_jaccard=mean.get("weighted_jaccard"), dice=mean.get("dice"),
        hd95=mean.get("hd95_mm"), kaggle_score=mean.get("kaggle_score"),
        latency_ms=prof["latency_ms"], gpu_latency_ms=prof["gpu_latency_ms"],
        peak_mem_mb=prof["peak_mem_mb"], gpu_peak_mem_mb=prof["gpu_peak_mem_mb"],
        train_seconds=float(summary["train_seconds"]), epochs=int(summary["epochs"]),
        steps=int(summary["steps"]), img_size=config.img_size, size=config.size, status=status,
        hd95_penalized=mean.get("hd95_penalized_mm"), missed=mean.get("missed"),
        false_alarms=mean.get("false_alarms"), cases=cases)
    return row.to_dict()


def log_finished(result) -> None:
    r = result.row
    log.info("%s seed %d: jaccard %s, missed %s (trained %s steps in %.0f s; %s)", r["model"],
             r["seed"], "–" if r["jaccard"] is None else f"{r['jaccard']:.4f}", r["missed"],
             r["steps"], r["train_seconds"] or 0.0, r["status"])


def _write_outputs(out: Path, rows: list[dict], run_dirs: dict[tuple[str, int], Path], *,
                   cfg: Preset, data: Path, train_opts: dict, device: torch.device,
                   seeds: list[int], margin: float, n_jobs: int) -> Path:
    from kvseg.experiments.figures import plot_jaccard_vs_macs, plot_samples, plot_training_curves
    from kvseg.experiments.report import write_report, write_results
    from kvseg.models.registry import model_info

    write_results(rows, out)
    plot_jaccard_vs_macs(rows, out / "jaccard_vs_macs.png")
    curves = {f"{name}/s{seed}": (model_info(name)["family"], model_info(name)["mode"],
                                  run_dir / "metrics.csv")
              for (name, seed), run_dir in run_dirs.items()}
    plot_training_curves(curves, out / "training_curves.png")
    figures = [("Validation Jaccard against MACs", "jaccard_vs_macs.png"),
               ("Training loss and validation Jaccard of every run", "training_curves.png")]
    sample_note = _write_samples(out, run_dirs, cfg.num_samples, plot_samples)
    if sample_note:
        figures.append((sample_note, "samples.png"))
    from kvseg.inference.explain import write_attention_comparison

    attention = write_attention_comparison(out, run_dirs)

    threads = cfg.latency_threads or torch.get_num_threads()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    opts = ", ".join(f"{k}={v}" for k, v in sorted(train_opts.items()))
    settings = {
        "command": f"`kvseg reproduce --data {data} --out {out} --preset "
                   f"{cfg.name if cfg.name in PRESET_NAMES else cfg.path} "
                   f"--models {' '.join(dict.fromkeys(n for n, _ in run_dirs))} "
                   f"--seeds {' '.join(map(str, seeds))}`",
        "preset": f"{cfg.name} ({cfg.path})" + (f": {cfg.description}"
                                                if cfg.description else ""),
        "data": f"{data.resolve()} (validation fold {train_opts.get('fold', 0)})",
        "training options (the same for every variant)": opts,
        "seeds": ", ".join(map(str, seeds)),
        "runs in parallel": f"{n_jobs} process(es), {cfg.threads or 'default'} torch "
                            "thread(s) each",
        "device": f"{device}" + (f" ({gpu})" if gpu else "") + f"; CPU latency with "
                  f"{threads} torch thread(s) on {platform.processor() or platform.machine()}",
        "torch": torch.__version__,
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    measured = [
        "**Jaccard / weighted Jaccard / Dice**: over the whole validation fold at the model's "
        "input size, per-class TP/FP/FN summed over all pixels, then the mean over the three "
        "classes (weighted Jaccard: weighted by each class's ground-truth pixel count); a pixel "
        "is predicted when its sigmoid ≥ 0.5 (`kvseg.metrics`).",
        "**HD95 (mm)**: 95th-percentile symmetric Hausdorff distance per case-day 3D volume "
        "(pixel spacing from the file names rescaled to the model input, 3 mm slices), "
        "averaged over case-days and classes where it is defined (`kvseg evaluate`).",
        "**params**: all parameters; **GMACs**: multiply-accumulates of one forward at batch 1 "
        "and the preset's image size, convolutions, linear layers, both attention products and "
        "the KV-pos bias included (`kvseg.profile.count_macs`).",
        "**CPU latency**: median of the wall time of repeated batch-1 forward passes after "
        f"warm-up ({cfg.latency_repeats} timed, {cfg.latency_warmup} warm-up), eval mode, "
        f"inference mode, {threads} thread(s); **GPU latency** (when CUDA is used): the same "
        "with CUDA synchronisation.",
        "**peak mem (MB)**: CPU: the peak of tensor memory allocated during one batch-1 forward "
        "(activations and workspace, weights excluded), from torch.profiler's allocation and "
        "free events; with CUDA the column shows max_memory_allocated during one forward minus "
        "the memory allocated before it. Process RSS is not used: it includes the Python "
        "interpreter, the dataset cache and earlier training.",
        "Training time and steps per run are in results.csv (`train_seconds`, `steps`).",
    ]
    from kvseg.layers.attention import MODES, mode_label

    modes = [m for m in MODES if any(r["attention"] == m for r in rows)]
    title = (f"kvseg reproduction: {' vs '.join(mode_label(m) for m in modes)} attention "
             f"({cfg.name} preset)")
    path = write_report(out, rows, title=title, settings=settings, measured=measured,
                        figures=figures, margin=margin, resamples=cfg.resamples)
    if attention:  # the attention section goes after the other figures
        atomic_write_text(path, path.read_text() + "\n" + "\n".join(attention))
    return path


def _write_samples(out: Path, run_dirs: dict[tuple[str, int], Path], n: int,
                   plot_samples) -> str | None:
    """samples.png from the first seed of every model; returns its caption (None if skipped)."""
    from kvseg.data import build_dataset
    from kvseg.training.checkpoint import load_run, read_config
    from kvseg.training.rundir import BEST

    first_seed: dict[str, Path] = {}
    for (name, _), run_dir in sorted(run_dirs.items(), key=lambda kv: kv[0][1]):
        if (run_dir / BEST).is_file():  # a run that diverged in its first epoch has none
            first_seed.setdefault(name, run_dir)
    if n <= 0 or not first_seed:
        return None
    config = read_config(next(iter(first_seed.values())) / BEST)
    ds = build_dataset(config, "val")
    picks = choose_samples(ds, n)
    if not picks:
        return None
    from kvseg.inference.predict import CLASS_COLORS
    from kvseg.training.metrics import predicted_masks, target_masks

    task = config.get("task", "multilabel")
    items = [ds[i] for i in picks]
    x = torch.stack([it["image"] for it in items])
    masks = target_masks(torch.stack([it["mask"] for it in items]), task).numpy()
    images = x[:, x.shape[1] // 2].numpy()  # the centre slice of the 2.5D stack
    preds = {}
    for name, run_dir in first_seed.items():
        model, cfg = load_run(run_dir, map_location="cpu")
        with torch.inference_mode():
            preds[name] = predicted_masks(model(x).float(), cfg.get("task", "multilabel"),
                                          float(cfg.get("threshold", 0.5))).numpy()
    plot_samples(images, masks.astype(np.uint8), {k: v.astype(np.uint8) for k, v in preds.items()},
                 [it["id"] for it in items], out / "samples.png")
    names = list(config.get("classes") or [])
    legend = ", ".join(f"{_colour_name(CLASS_COLORS[i % len(CLASS_COLORS)])} = "
                       f"{n.replace('_', ' ')}" for i, n in enumerate(names))
    return ("Validation slices: ground truth and each model's prediction (its first seed)"
            + (f"; {legend}" if legend else ""))


def _colour_name(rgb: tuple[int, int, int]) -> str:
    names = {(230, 60, 60): "red", (60, 200, 80): "green", (60, 120, 240): "blue",
             (240, 200, 40): "yellow", (200, 60, 220): "magenta", (40, 210, 210): "cyan"}
    return names.get(tuple(rgb), "colour")
