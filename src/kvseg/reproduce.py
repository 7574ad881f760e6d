"""``kvseg reproduce``: the paper's experiment in one call.

Every selected variant is trained with the same preset (training options, data split, seeds),
evaluated on the validation fold, and profiled; then results.csv/json, report.md and the figures
are written to ``OUT`` (see :mod:`kvseg.report`).

Layout of ``OUT``::

    runs/<model>/seed<k>/      one training run (config.yaml, metrics.csv, best.safetensors,
                               last.ckpt, curves.png, eval_val.json) and done.json, written last
    runs/<model>/profile.json  params, MACs, latency, peak memory (once per model)
    results.csv results.json report.md jaccard_vs_macs.png training_curves.png samples.png

Resuming: a run with ``done.json`` is complete and is skipped; an interrupted run continues
from its ``last.ckpt``. ``done.json`` stores the run's settings; reusing ``OUT``
with other settings (another preset, another data folder) is refused rather than mixed.

Profiling (per model, batch 1, the preset's ``img_size`` and channels, random input):

- ``params``: :func:`kvseg.profile.count_params`; ``macs``: :func:`kvseg.profile.count_macs`
  (multiply-accumulates, attention products and the KV-pos bias included);
- ``latency_ms``: median wall time of ``latency_repeats`` forward passes on the CPU after
  ``latency_warmup`` untimed ones, eval mode, ``torch.inference_mode``, with
  ``latency_threads`` torch threads (the preset's; default: the process's thread count);
  ``gpu_latency_ms`` the same on CUDA (synchronised) when the device is CUDA;
- ``peak_mem_mb``: peak of the memory allocated by tensors during one CPU forward (activations
  and workspace; the weights, allocated before, are excluded), from the allocation and free
  events that ``torch.profiler`` records (``profile_memory=True``); ``gpu_peak_mem_mb``:
  ``torch.cuda.max_memory_allocated`` during one forward minus the memory allocated before it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import platform
import statistics
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import yaml

from kvseg.utils import atomic_write_text, resolve_device

log = logging.getLogger(__name__)

PRESETS = ("smoke", "paper")
#: Keys of a preset file besides ``train``.
PRESET_KEYS = {"description", "models", "seeds", "latency_repeats", "latency_warmup",
               "latency_threads",
               "num_samples", "train", "notes"}
#: Training options that reproduce sets itself per run; a preset may not hold them.
_RUN_KEYS = ("model", "seed", "out", "data", "resume", "device")
#: Training options that may differ when a run is continued (not part of the fingerprint).
_FREE_KEYS = ("workers", "cache_dir", "cache")


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


# --------------------------------------------------------------------------- presets
def preset_path(preset: str) -> Path:
    """``smoke``/``paper`` -> the packaged YAML; anything else is taken as a YAML file path."""
    if preset in PRESETS:
        return Path(str(resources.files("kvseg") / "configs" / f"{preset}.yaml"))
    path = Path(preset)
    if path.suffix.lower() not in (".yaml", ".yml"):
        raise ValueError(f"--preset {preset!r}: expected smoke, paper or a .yaml file")
    if not path.is_file():
        raise FileNotFoundError(f"--preset {preset}: no such file")
    return path


def load_preset(preset: str) -> dict:
    """Read and validate a preset (see ``configs/smoke.yaml`` for the format).

    Returns a dict with ``models`` (list), ``seeds`` (list of int), ``latency_repeats``,
    ``latency_warmup``, ``num_samples`` and ``train`` (training options for
    :func:`kvseg.train.load_config`, validated there).
    """
    from kvseg.train import load_config

    path = preset_path(preset)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    unknown = sorted(set(data) - PRESET_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown preset key {unknown[0]!r}; valid: "
                         f"{', '.join(sorted(PRESET_KEYS))}")
    train = dict(data.get("train") or {})
    for key in _RUN_KEYS:
        if key in train:
            raise ValueError(f"{path}: train.{key} is set per run by kvseg reproduce; remove it")
    load_config(None, train)  # validates every training option now, before any run starts
    models = data.get("models", "all")
    return {
        "name": preset if preset in PRESETS else path.stem,
        "path": str(path),
        "description": str(data.get("description", "")),
        "models": [models] if isinstance(models, str) else list(models),
        "seeds": [int(s) for s in data.get("seeds", [0])],
        "latency_repeats": int(data.get("latency_repeats", 10)),
        "latency_warmup": int(data.get("latency_warmup", 2)),
        "latency_threads": (int(data["latency_threads"]) if data.get("latency_threads")
                            else None),
        "num_samples": int(data.get("num_samples", 4)),
        "train": train,
    }


def resolve_models(names: list[str] | tuple[str, ...]) -> list[str]:
    """``["all"]`` -> the nine names; otherwise validate each name (order kept, no repeats)."""
    from kvseg import list_models

    known = list_models()
    if not names or list(names) == ["all"]:
        return known
    out = []
    for name in names:
        if name == "all":
            raise ValueError("--models: 'all' cannot be combined with names")
        if name not in known:
            raise ValueError(f"--models {name!r}: unknown; valid: all, {', '.join(known)}")
        if name not in out:
            out.append(name)
    return out


# --------------------------------------------------------------------------- profiling
def _median_ms(fn, repeats: int, warmup: int, sync=None) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def profile_model(model: torch.nn.Module, input_shape: tuple[int, int, int, int], *,
                  device: torch.device | str = "cpu", repeats: int = 10, warmup: int = 2,
                  threads: int | None = None) -> dict:
    """Params, MACs, CPU (and CUDA) latency and peak forward memory of ``model`` at batch 1.

    Returns ``params``, ``macs``, ``latency_ms``, ``peak_mem_mb``, ``gpu_latency_ms`` and
    ``gpu_peak_mem_mb`` (NaN without CUDA), ``threads`` and ``input_shape``. ``threads``
    sets torch's CPU thread count for the measurement (restored afterwards).
    """
    from kvseg.profile import count_macs, count_params, peak_cpu_memory

    device = torch.device(device)
    model = model.cpu().eval()
    x = torch.randn(*input_shape, generator=torch.Generator().manual_seed(0))
    out = {"params": count_params(model), "macs": count_macs(model, input_shape),
           "input_shape": list(input_shape)}
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads or before))
    try:
        out["threads"] = torch.get_num_threads()
        with torch.inference_mode():
            out["latency_ms"] = _median_ms(lambda: model(x), repeats, warmup)
    finally:
        torch.set_num_threads(before)
    with torch.inference_mode():
        out["peak_mem_mb"] = peak_cpu_memory(lambda: model(x)) / 2**20
    out["gpu_latency_ms"] = out["gpu_peak_mem_mb"] = math.nan
    if device.type == "cuda":
        model, xg = model.to(device), x.to(device)
        with torch.inference_mode():
            out["gpu_latency_ms"] = _median_ms(lambda: model(xg), repeats, max(warmup, 3),
                                               sync=lambda: torch.cuda.synchronize(device))
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            model(xg)
            torch.cuda.synchronize(device)
            out["gpu_peak_mem_mb"] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        model.cpu()
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
def _fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _same_settings(stored: dict | None, current: dict) -> bool:
    """Whether a finished run's settings equal the current ones. A training option the stored
    run does not list (added to kvseg since) counts as equal when the current value is that
    option's default, so upgrading kvseg does not invalidate finished runs."""
    import dataclasses

    from kvseg.train import TrainConfig

    if not isinstance(stored, dict):
        return False
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(TrainConfig)}
    missing = object()
    for key in set(stored) | set(current):
        a, b = stored.get(key, missing), current.get(key, missing)
        a = defaults.get(key, missing) if a is missing else a
        b = defaults.get(key, missing) if b is missing else b
        if a != b:
            return False
    return True


def _read_done(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("%s is unreadable; the run will be redone", path)
        return None


def _num(v) -> float:
    return math.nan if v is None else float(v)


def reproduce(data: str | Path, out: str | Path, *, preset: str = "smoke",
              models: list[str] | tuple[str, ...] = ("all",), seeds: list[int] | None = None,
              device: str = "auto", epochs: int | None = None,
              progress: bool = True) -> ReproduceSummary:
    """Train, evaluate and profile every selected variant; write the results and the report.

    ``models``: ``["all"]`` or variant names (default: the preset's list); ``seeds`` and
    ``epochs`` override the preset's. Returns a :class:`ReproduceSummary` (its ``str`` is the
    table and the report path).
    """
    from tqdm.auto import tqdm

    from kvseg.evaluate import evaluate_run
    from kvseg.models.registry import model_info
    from kvseg.train import NonFiniteLossError, load_config, train

    t_start = time.perf_counter()
    data, out = Path(data), Path(out)
    if not data.is_dir():
        raise FileNotFoundError(f"--data {data}: no such folder")
    if not (data / "train.csv").is_file():
        raise FileNotFoundError(f"--data {data}: no train.csv (expected the UW-Madison layout; "
                                "kvseg synth --out DIR writes one)")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    cfg = load_preset(preset)
    names = resolve_models(models if models and list(models) != ["all"] else cfg["models"])
    seeds = [int(s) for s in (seeds if seeds else cfg["seeds"])]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {seeds}: repeated seed")
    if epochs is not None and epochs < 1:
        raise ValueError(f"--epochs {epochs}: must be >= 1")
    dev = resolve_device(device)
    train_opts = dict(cfg["train"])
    if epochs is not None:
        train_opts["epochs"] = int(epochs)
    data_abs = str(data.resolve())

    rows: list[dict] = []
    run_dirs: dict[tuple[str, int], Path] = {}
    trained = skipped = 0
    jobs = [(name, seed) for name in names for seed in seeds]
    bar = tqdm(jobs, desc="reproduce", unit="run", disable=not progress, dynamic_ncols=True)
    for name, seed in bar:
        bar.set_postfix_str(f"{name} seed {seed}")
        run_dir = out / "runs" / name / f"seed{seed}"
        run_dirs[(name, seed)] = run_dir
        config = load_config(None, {**train_opts, "model": name, "seed": seed, "data": data_abs,
                                    "out": str(run_dir), "device": str(device)})
        settings = {k: v for k, v in vars(config).items()
                    if k not in ("out", "device", "resume", *_FREE_KEYS)}
        settings["profile"] = {k: cfg[k] for k in ("latency_repeats", "latency_warmup",
                                                   "latency_threads")}
        fingerprint = _fingerprint(settings)
        done = _read_done(run_dir / "done.json")
        if done is not None:
            if not _same_settings(done.get("settings"), settings):
                raise ValueError(f"{run_dir} holds a run with other settings (preset, data or "
                                 "epochs differ); use another --out")
            rows.append(done["row"])
            skipped += 1
            log.info("%s seed %d: complete in %s, skipped", name, seed, run_dir)
            continue
        config.resume = (run_dir / "last.ckpt").is_file()
        status = "ok"
        try:
            summary = train(config)
            mean = evaluate_run(run_dir, split="val", device=str(device))["mean"]
        except NonFiniteLossError as e:  # a diverged variant is a result: record it, go on
            log.error("%s seed %d: %s", name, seed, e)
            status = f"diverged: {str(e).split(';')[0]}"
            summary = {"train_seconds": math.nan, "epochs": 0, "steps": 0}
            mean = dict.fromkeys(("jaccard", "weighted_jaccard", "dice", "hd95_mm",
                                  "kaggle_score"))
        info = model_info(name)
        prof = _profile_once(out / "runs" / name / "profile.json", run_dir, fingerprint_of=settings,
                             device=dev, repeats=cfg["latency_repeats"],
                             warmup=cfg["latency_warmup"], threads=cfg["latency_threads"])
        row = {
            "model": name, "family": info["family"], "attention": info["mode"], "seed": seed,
            "params": prof["params"], "macs": prof["macs"],
            "jaccard": _num(mean["jaccard"]), "weighted_jaccard": _num(mean["weighted_jaccard"]),
            "dice": _num(mean["dice"]), "hd95": _num(mean["hd95_mm"]),
            "kaggle_score": _num(mean["kaggle_score"]),
            "latency_ms": prof["latency_ms"], "gpu_latency_ms": prof["gpu_latency_ms"],
            "peak_mem_mb": prof["peak_mem_mb"], "gpu_peak_mem_mb": prof["gpu_peak_mem_mb"],
            "train_seconds": float(summary["train_seconds"]), "epochs": int(summary["epochs"]),
            "steps": int(summary["steps"]), "img_size": config.img_size, "size": config.size,
            "status": status,
        }
        done = {"fingerprint": fingerprint, "settings": settings, "row": _jsonable(row),
                "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        atomic_write_text(run_dir / "done.json", json.dumps(done, indent=2) + "\n")
        rows.append(done["row"])
        trained += 1
        log.info("%s seed %d: jaccard %.4f, %d params, %.3f GMACs, %.1f ms CPU latency "
                 "(trained %d steps in %.0f s; %s)", name, seed, row["jaccard"], row["params"],
                 row["macs"] / 1e9, row["latency_ms"], row["steps"], row["train_seconds"],
                 status)
    bar.close()

    report = _write_outputs(out, rows, run_dirs, cfg=cfg, data=data, train_opts=train_opts,
                            device=dev, seeds=seeds)
    from kvseg.report import results_table

    return ReproduceSummary(out=out, report=report, table=results_table(rows), trained=trained,
                            skipped=skipped, seconds=time.perf_counter() - t_start)


def _jsonable(row: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in row.items()}


def _profile_once(path: Path, run_dir: Path, *, fingerprint_of: dict, device: torch.device,
                  repeats: int, warmup: int, threads: int | None) -> dict:
    """Profile a model once per model folder (params/MACs/latency do not depend on the seed).

    The network is rebuilt from the run's ``config.yaml`` (written before training starts), so
    a run that diverged is profiled too; the weights do not change what is measured.
    """
    from kvseg.checkpoint import build_model

    settings = {k: v for k, v in fingerprint_of.items() if k not in ("seed",)}
    key = _fingerprint(settings)
    if path.is_file():
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
            if cached.get("fingerprint") == key:
                return {k: _num(v) if k.endswith(("_ms", "_mb")) else v
                        for k, v in cached["profile"].items()}
        except (json.JSONDecodeError, KeyError):
            pass
    config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    torch.manual_seed(0)
    model = build_model(config)
    shape = (1, int(config["in_channels"]), int(config["img_size"]), int(config["img_size"]))
    prof = profile_model(model, shape, device=device, repeats=repeats, warmup=warmup,
                         threads=threads)
    atomic_write_text(path, json.dumps({"fingerprint": key, "profile": _jsonable(prof)},
                                       indent=2) + "\n")
    return prof


def _write_outputs(out: Path, rows: list[dict], run_dirs: dict[tuple[str, int], Path], *,
                   cfg: dict, data: Path, train_opts: dict, device: torch.device,
                   seeds: list[int]) -> Path:
    from kvseg.models.registry import model_info
    from kvseg.report import (
        plot_jaccard_vs_macs,
        plot_samples,
        plot_training_curves,
        write_report,
        write_results,
    )

    write_results(rows, out)
    plot_jaccard_vs_macs(rows, out / "jaccard_vs_macs.png")
    curves = {f"{name}/s{seed}": (model_info(name)["family"], model_info(name)["mode"],
                                  run_dir / "metrics.csv")
              for (name, seed), run_dir in run_dirs.items()}
    plot_training_curves(curves, out / "training_curves.png")
    figures = [("Validation Jaccard against MACs", "jaccard_vs_macs.png"),
               ("Training loss and validation Jaccard of every run", "training_curves.png")]
    sample_note = _write_samples(out, run_dirs, cfg["num_samples"], plot_samples)
    if sample_note:
        figures.append((sample_note, "samples.png"))

    threads = cfg["latency_threads"] or torch.get_num_threads()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    opts = ", ".join(f"{k}={v}" for k, v in sorted(train_opts.items()))
    settings = {
        "command": f"`kvseg reproduce --data {data} --out {out} --preset "
                   f"{cfg['name'] if cfg['name'] in PRESETS else cfg['path']} "
                   f"--models {' '.join(dict.fromkeys(n for n, _ in run_dirs))} "
                   f"--seeds {' '.join(map(str, seeds))}`",
        "preset": f"{cfg['name']} ({cfg['path']})" + (f": {cfg['description']}"
                                                      if cfg["description"] else ""),
        "data": f"{data.resolve()} (validation fold {train_opts.get('fold', 0)})",
        "training options (the same for every variant)": opts,
        "seeds": ", ".join(map(str, seeds)),
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
        f"warm-up ({cfg['latency_repeats']} timed, {cfg['latency_warmup']} warm-up), eval mode, "
        f"inference mode, {threads} thread(s); **GPU latency** (when CUDA is used): the same "
        "with CUDA synchronisation.",
        "**peak mem (MB)**: CPU: the peak of tensor memory allocated during one batch-1 forward "
        "(activations and workspace, weights excluded), from torch.profiler's allocation and "
        "free events; with CUDA the column shows max_memory_allocated during one forward minus "
        "the memory allocated before it. Process RSS is not used: it includes the Python "
        "interpreter, the dataset cache and earlier training.",
        "Training time and steps per run are in results.csv (`train_seconds`, `steps`).",
    ]
    title = f"kvseg reproduction: QKV vs KV vs KV-pos attention ({cfg['name']} preset)"
    return write_report(out, rows, title=title, settings=settings, measured=measured,
                        figures=figures)


def _write_samples(out: Path, run_dirs: dict[tuple[str, int], Path], n: int,
                   plot_samples) -> str | None:
    """samples.png from the first seed of every model; returns its caption (None if skipped)."""
    from kvseg.checkpoint import BEST, load_run, read_config
    from kvseg.data import UWMadison

    first_seed: dict[str, Path] = {}
    for (name, _), run_dir in sorted(run_dirs.items(), key=lambda kv: kv[0][1]):
        if (run_dir / BEST).is_file():  # a run that diverged in its first epoch has none
            first_seed.setdefault(name, run_dir)
    if n <= 0 or not first_seed:
        return None
    config = read_config(next(iter(first_seed.values())) / BEST)
    ds = UWMadison(config["data"], split="val", fold=config["fold"], n_folds=config["n_folds"],
                   img_size=config["img_size"], context=config["context"], augment=False,
                   cache=config.get("cache", True), cache_dir=config.get("cache_dir"),
                   exclude=list(config.get("exclude") or []))
    picks = choose_samples(ds, n)
    if not picks:
        return None
    items = [ds[i] for i in picks]
    x = torch.stack([it["image"] for it in items])
    masks = torch.stack([it["mask"] for it in items]).numpy() > 0.5
    images = x[:, int(config["context"])].numpy()
    preds = {}
    for name, run_dir in first_seed.items():
        model, cfg = load_run(run_dir, map_location="cpu")
        with torch.inference_mode():
            probs = torch.sigmoid(model(x).float()).numpy()
        preds[name] = probs >= float(cfg.get("threshold", 0.5))
    plot_samples(images, masks.astype(np.uint8), {k: v.astype(np.uint8) for k, v in preds.items()},
                 [it["id"] for it in items], out / "samples.png")
    return ("Validation slices: ground truth and each model's prediction (its first seed); "
            "red = large bowel, green = small bowel, blue = stomach")
