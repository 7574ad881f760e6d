"""What ``kvseg reproduce`` and ``kvseg sweep`` share: their common arguments checked once, the
variants to run, the work of one job (train, evaluate, with the model's profile measured first)
and the outputs drawn from finished runs (the first seed with a ``best.safetensors`` of each
model, its validation set, the sample slices, samples.png and the attention comparison).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kvseg.data import build_dataset, detect_layout
from kvseg.errors import ConfigError
from kvseg.experiments.figures import plot_attention_comparison, plot_samples
from kvseg.experiments.presets import Preset, load_preset
from kvseg.experiments.report import attention_section
from kvseg.experiments.results import ResultRow
from kvseg.experiments.runner import Job, fingerprint, pending_jobs
from kvseg.inference.evaluate import evaluate_run
from kvseg.inference.explain import attention_maps
from kvseg.inference.predict import CLASS_COLORS
from kvseg.inference.profile import profile_model
from kvseg.layers.attention import resolve_modes
from kvseg.models.registry import (
    NO_ATTENTION,
    REFERENCE_FAMILIES,
    list_models,
    model_info,
)
from kvseg.training import train as T
from kvseg.training.checkpoint import build_model, load_run, open_run, read_run_config
from kvseg.training.metrics import predicted_masks, target_masks
from kvseg.training.rundir import BEST
from kvseg.utils import atomic_write_text, check_number, jsonable, resolve_device

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- arguments
@dataclass
class Arguments:
    """The arguments reproduce and sweep share, checked: the preset, the variants, the seeds, the
    margin, the device and the runs trained at once."""

    data: Path
    preset: Preset
    models: list[str]
    seeds: list[int]
    margin: float
    device: torch.device
    jobs: int

    @property
    def profile_settings(self) -> dict:
        """The profiling options of every job (part of its settings)."""
        return {"latency_repeats": self.preset.latency_repeats,
                "latency_warmup": self.preset.latency_warmup,
                "latency_threads": self.preset.latency_threads}


def check_arguments(data: str | Path, *, preset: str, models, modes, seeds, margin, device: str,
                    jobs: int | None) -> Arguments:
    """Check reproduce's / sweep's common arguments (one line naming the option when wrong)."""
    data = Path(data)
    if not data.is_dir():
        raise FileNotFoundError(f"--data {data}: no such folder")
    cfg = load_preset(preset)
    if cfg.train.get("data_format", "auto") == "auto":
        detect_layout(data)  # a folder no layout knows: one line naming it, before any work
    # 'all' stands for the preset's list (itself 'all' = the paper's nine, or names)
    names = resolve_models([m for n in (models or ["all"])
                            for m in (cfg.models if n == "all" else [n])], modes)
    seeds = [int(s) for s in (seeds if seeds else cfg.seeds)]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {seeds}: repeated seed")
    margin = cfg.margin if margin is None else check_number("--margin", margin, minimum=0)
    dev = resolve_device(device)
    n_jobs = default_jobs(dev, cfg.threads) if jobs is None else int(jobs)
    check_number("--jobs", n_jobs, integer=True, minimum=1)
    return Arguments(data, cfg, names, seeds, margin, dev, n_jobs)


#: Keywords of ``--models``: the paper's nine (its three families in the chosen modes) and the
#: reference rows (``dynunet`` and MONAI's UNETR and SwinUNETR in the chosen modes).
MODEL_KEYWORDS = ("all", "reference")


def resolve_models(names: list[str] | tuple[str, ...],
                   modes: list[str] | tuple[str, ...] | None = None) -> list[str]:
    """The variants to run, in order, without repeats: ``all`` -> the paper's three families
    (:data:`~kvseg.models.registry.PAPER_FAMILIES`) in ``modes``; ``reference`` -> ``dynunet``
    and the reference transformers (``unetr_*``, ``swinunetr_*``) in ``modes``; a name is
    validated and, when ``modes`` are given, kept if it is in them. ``dynunet`` has no
    attention (mode ``none``): a mode selection always keeps it. Keywords and names combine
    (``all reference``, ``all dynunet unetr_qkv unetr_kv``).

    ``modes``: None (for the keywords: the paper's ``qkv kv kv_pos``; named models are kept as
    named), ``["all"]`` or mode names (:func:`kvseg.layers.attention.resolve_modes`).
    """
    known = list_models()
    try:
        keep = resolve_modes(modes)
    except ConfigError as e:  # the layer names no flag; the commands' is --modes
        raise ConfigError(f"--{e}" if str(e).startswith("modes:") else f"--modes: {e}") from None
    out: list[str] = []
    for name in names or ["all"]:
        if name == "all":
            chosen = list_models(keep)
        elif name == "reference":
            chosen = [*list_models("all", families=("dynunet",)),
                      *list_models(keep, families=tuple(f for f in REFERENCE_FAMILIES
                                                        if f != "dynunet"))]
        elif name not in known:
            raise ConfigError(f"--models {name!r}: unknown; valid: "
                              f"{', '.join(MODEL_KEYWORDS)}, {', '.join(known)}")
        elif modes is None or model_info(name)["mode"] in (*keep, NO_ATTENTION):
            chosen = [name]
        else:
            chosen = []
        out += [n for n in chosen if n not in out]
    if not out:
        raise ConfigError(f"--modes {' '.join(keep)}: none of the models {' '.join(names)} "
                          "is in these modes")
    return out


def default_jobs(device: torch.device, threads: int | None = None) -> int:
    """How many runs to train at once: one per GPU process on CUDA (one device), otherwise the
    cores divided by each run's threads (two single-thread runs on a 2-core machine)."""
    if device.type == "cuda":
        return 1
    return max(1, (os.cpu_count() or 1) // max(1, threads or 1))


# --------------------------------------------------------------------------- one job
def _profile_path(job: Job) -> Path:
    """Where a job's model profile lives: ``meta["profile"]``, else beside its seed folders."""
    return Path(job.meta.get("profile", job.run_dir.parent / "profile.json"))


def _profile_settings(job: Job) -> dict:
    """What a model's profile depends on: the job's settings but the seed (and the keys in
    ``meta["profile_free"]``, e.g. reproduce --cv's fold)."""
    free = ("seed", *job.meta.get("profile_free", ()))
    return {k: v for k, v in job.settings.items() if k not in free}


def profile_models(jobs: list[Job], device: torch.device, cfg: Preset) -> None:
    """Profile every model configuration with a pending run, once each and before any training,
    so that latency is measured on a quiet machine (params/MACs/latency do not depend on the
    seed). Jobs share a profile when they share :func:`_profile_path`."""
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
            item = build_dataset(job.config, "val")[0]
            shapes[data_key] = (int(item["image"].shape[0]), int(item["mask"].shape[0]))
        in_channels, num_classes = shapes[data_key]
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
    name, seed = job.key[:2]  # reproduce --cv adds the fold
    config = job.config
    status = "ok"
    try:
        summary = T.train(config, progress=progress)
        evaluation = evaluate_run(job.run_dir, split=verdict_split(config), device=device)
        mean = evaluation["mean"]
        cases = [{**{k: c[k] for k in ("case", "day", "tp", "fp", "fn")},
                  "hd95_mm": [c["hd95_mm"][n] for n in evaluation["classes"]]}
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


def verdict_split(config) -> str:
    """The split the results and verdicts are computed on: ``test`` when the run holds a test
    fold out (neither training nor checkpoint selection saw it), else ``val``."""
    return "test" if getattr(config, "test_fold", None) is not None else "val"


def log_finished(result) -> None:
    r = result.row
    log.info("%s seed %d: jaccard %s, missed %s (trained %s steps in %.0f s; %s)", r["model"],
             r["seed"], "–" if r["jaccard"] is None else f"{r['jaccard']:.4f}", r["missed"],
             r["steps"], r["train_seconds"] or 0.0, r["status"])


# --------------------------------------------------------------------------- outputs
def first_runs(run_dirs: dict[tuple[str, int], Path]) -> dict[str, Path]:
    """Model -> the run folder of its first seed that has a ``best.safetensors`` (a run that
    diverged in its first epoch has none)."""
    first: dict[str, Path] = {}
    for (name, _), run_dir in sorted(run_dirs.items(), key=lambda kv: kv[0][1]):
        if (run_dir / BEST).is_file():
            first.setdefault(name, run_dir)
    return first


def validation_set(first: dict[str, Path]):
    """``(config, validation dataset)`` of the first of :func:`first_runs` (all share the data)."""
    config = read_run_config(next(iter(first.values())))
    return config, build_dataset(config, "val")


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


def write_samples(out: Path, run_dirs: dict[tuple[str, int], Path], n: int) -> str | None:
    """samples.png from the first seed of every model; returns its caption (None if skipped)."""
    first_seed = first_runs(run_dirs)
    if n <= 0 or not first_seed:
        return None
    config, ds = validation_set(first_seed)
    picks = choose_samples(ds, n)
    if not picks:
        return None
    task = config.task
    items = [ds[i] for i in picks]
    x = torch.stack([it["image"] for it in items])
    masks = target_masks(torch.stack([it["mask"] for it in items]), task).numpy()
    images = x[:, x.shape[1] // 2].numpy()  # the centre slice of the 2.5D stack
    preds = {}
    for name, run_dir in first_seed.items():
        model, cfg = open_run(run_dir, map_location="cpu")
        with torch.inference_mode():
            preds[name] = predicted_masks(model(x).float(), cfg.task, cfg.threshold).numpy()
    plot_samples(images, masks.astype(np.uint8), {k: v.astype(np.uint8) for k, v in preds.items()},
                 [it["id"] for it in items], out / "samples.png")
    names = list(config.classes)
    legend = ", ".join(f"{_colour_name(CLASS_COLORS[i % len(CLASS_COLORS)])} = "
                       f"{n.replace('_', ' ')}" for i, n in enumerate(names))
    return ("Validation slices: ground truth and each model's prediction (its first seed)"
            + (f"; {legend}" if legend else ""))


def _colour_name(rgb: tuple[int, int, int]) -> str:
    names = {(230, 60, 60): "red", (60, 200, 80): "green", (60, 120, 240): "blue",
             (240, 200, 40): "yellow", (200, 60, 220): "magenta", (40, 210, 210): "cyan"}
    return names.get(tuple(rgb), "colour")


#: Families whose attention has no map onto image points (the attention comparison skips
#: them, saying why).
NO_MAPS = {
    "dynunet": "a CNN: no attention",
    "swinunetr": "windowed attention: its tokens are cells of (shifted) 7×7 windows, not "
                 "points of the image",
}


def write_attention_comparison(out: Path, run_dirs: dict[tuple[str, int], Path]) -> list[str]:
    """The reproduction's attention figure and table: ``out/attention.png`` (every variant's
    last-layer head-mean attention of one query point on one validation slice, first seed of
    each model) and the report section (:func:`kvseg.experiments.report.attention_section`) as
    lines; [] when no run has a model. The families of :data:`NO_MAPS` (``dynunet``,
    ``swinunetr``) are left out with a note saying why (UNETR's maps are on its (size/16)²
    token grid). The slice is :func:`choose_samples`' first; the point the
    foreground pixel nearest the centroid of its masks (the image centre if empty).

    Args:
        out: the reproduction's output folder.
        run_dirs: (model, seed) -> run folder.
    """
    first = first_runs(run_dirs)
    if not first:
        return []
    _, ds = validation_set(first)
    picks = choose_samples(ds, 1)
    if not picks:
        return []
    item = ds[picks[0]]
    x, mask = item["image"], item["mask"].sum(0) > 0
    ys, xs = np.nonzero(mask.numpy())
    if len(ys):
        d2 = (ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2
        point = (float(xs[d2.argmin()]), float(ys[d2.argmin()]))
    else:
        point = ((x.shape[-1] - 1) / 2, (x.shape[-2] - 1) / 2)
    maps, entries, skipped = {}, [], {}
    for name, run_dir in first.items():
        why = NO_MAPS.get(model_info(name)["family"])
        if why:
            skipped.setdefault(why, []).append(name)
            continue
        model, _ = load_run(run_dir, map_location="cpu")
        la = attention_maps(model, x, points=[point], layers=[-1]).layers[0]
        maps[name] = la.maps[0].mean(0).numpy()
        info = model_info(name)
        entries.append({"model": name, "family": info["family"], "attention": info["mode"],
                        "layer": la.name, "symmetry": float(np.mean(la.symmetry)),
                        "distance": float(np.mean(la.distance))})
    notes = [f"Not shown: {', '.join(f'`{n}`' for n in names)} ({why})."
             for why, names in skipped.items()]
    if not maps:
        return ["## Attention (last encoder layer)", "", *notes, ""] if notes else []
    plot_attention_comparison(x[x.shape[0] // 2].numpy(), maps, point, out / "attention.png")
    return [*attention_section(entries, slice_id=str(item["id"]), point=point,
                               figure="attention.png"), *(f"{n}\n" for n in notes)]


__all__ = ["MODEL_KEYWORDS", "Arguments", "check_arguments", "choose_samples", "default_jobs",
           "first_runs", "log_finished", "profile_models", "resolve_models", "train_and_evaluate",
           "validation_set", "verdict_split", "write_attention_comparison", "write_samples"]
