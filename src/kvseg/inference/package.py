"""``kvseg package``: a trained run as a shareable model folder, and :func:`from_pretrained`.

The layout settled by segmentation_models_pytorch and the Hugging Face Hub:

- ``config.json``: everything that rebuilds the model and prepares an input: the run's config
  (model, size, head, overrides, ``in_channels``, ``num_classes``, ``classes``, ``task``,
  ``img_size``, ``context``, ``threshold``, ``preprocess``: channels and CT window) and an
  ``input`` section that says in words how a slice becomes the model's input;
- ``model.safetensors``: the weights (the config also in its metadata, as in a run folder);
- ``README.md``: the model card (model and attention mode, parameters and MACs, training data
  and recipe, validation metrics, intended use, limitations, license);
- ``postprocess.json`` when the run has one (``kvseg tune``);
- ``.kvseg_package.json``: the list of files written (an existing ``--out`` is only replaced
  when every file in it was written by ``kvseg package``).

:func:`from_pretrained` (``kvseg.from_pretrained``) returns the model, in eval mode, with the
run's outputs; ``kvseg predict --run`` and ``kvseg evaluate --run`` accept a package folder.
"""

from __future__ import annotations

import csv
import json
import os
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from kvseg.config import RunConfig
from kvseg.data.manifest import foreign_entry, read_manifest, remove_files, write_manifest
from kvseg.errors import CheckpointError, RunDirError
from kvseg.inference.postprocess import POSTPROCESS
from kvseg.inference.profile import count_macs, count_params
from kvseg.models.registry import model_info
from kvseg.training.checkpoint import build_model, open_run, save_model
from kvseg.training.rundir import BEST, LOCK, METRICS, FolderLock, command_line
from kvseg.utils import atomic_write_bytes, atomic_write_text

CONFIG_JSON, WEIGHTS, CARD = "config.json", "model.safetensors", "README.md"
MANIFEST = ".kvseg_package.json"
FORMAT = "kvseg-model/1"
try:  # not `from kvseg import __version__`: the front door sits above this module
    __version__ = metadata.version("kvseg")
except metadata.PackageNotFoundError:  # a source checkout that is not installed
    __version__ = "unknown"
#: Fewer cases than this: no case-bootstrap interval in the card (as kvseg.experiments.stats)
MIN_CASES = 3
LICENSE = "MIT (the kvseg code); the weights inherit the terms of the data they were trained on"


def is_package(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by ``kvseg package``."""
    path = Path(path)
    return (path / CONFIG_JSON).is_file() and (path / WEIGHTS).is_file()


def read_package_config(path: str | os.PathLike) -> RunConfig:
    """The :class:`RunConfig` of a package folder's ``config.json``."""
    file = Path(path) / CONFIG_JSON
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: unreadable package config ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{file}: not a kvseg package config (format {FORMAT} expected)")
    return RunConfig.from_dict(data, source=str(file))


def open_package(path: str | os.PathLike, map_location: str | torch.device = "cpu"
                 ) -> tuple[nn.Module, RunConfig]:
    """``(model in eval mode on map_location, RunConfig)`` of a package folder."""
    path = Path(path)
    config = read_package_config(path)
    model = build_model(config.to_dict())
    try:
        state = load_file(str(path / WEIGHTS), device="cpu")
        model.load_state_dict(state, strict=True)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path / WEIGHTS}: weights do not load into the model its "
                              f"config.json describes ({str(e).splitlines()[0]})") from None
    return model.to(map_location).eval(), config


def from_pretrained(path: str | os.PathLike, map_location: str | torch.device = "cpu"
                    ) -> nn.Module:
    """The model of a package folder (``kvseg package``) or of a training run folder (its
    ``best.safetensors``), in eval mode: (B, in_channels, S, S) prepared as the package's
    ``config.json`` ``input`` (or the run's config) says -> logits (B, num_classes, S, S)."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{path}: no such package or run folder")
    if is_package(path):
        return open_package(path, map_location)[0]
    if (Path(path) / BEST).is_file():
        return open_run(path, map_location)[0]  # in eval mode on map_location
    raise CheckpointError(f"{path}: not a kvseg package (no {CONFIG_JSON} and {WEIGHTS}) nor a "
                          f"training run (no {BEST})")


def _input_text(config: RunConfig) -> dict:
    window = config.preprocess.get("window")
    return {
        "channels_per_slice": config.preprocess.get("channels", 1),
        "context": config.context,
        "in_channels": config.in_channels,
        "img_size": config.img_size,
        "intensity": (f"clipped to the window {window} and scaled to [0, 1]" if window else
                      "per-slice percentile normalisation to [0, 1] (0.5 and 99.5 percentiles)"),
        "resize": f"bilinear (antialiased) to {config.img_size} x {config.img_size}",
        "stacking": (f"{config.context} neighbouring slice(s) per side stacked as channels, "
                     "edges repeat the border slice" if config.context else "one slice"),
        "function": "kvseg.data.transforms.prepare_slices",
        "output": ("sigmoid per class, >= threshold" if config.task == "multilabel" else
                   "softmax over background + classes, argmax"),
    }


def _best_metrics(run: Path) -> dict | None:
    """The metrics.csv row of the best validation Jaccard (None without one)."""
    try:
        with open(run / METRICS, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.DictReader(f) if r.get("jaccard")]
    except OSError:
        return None
    return max(rows, key=lambda r: float(r["jaccard"])) if rows else None


def case_bootstrap(cases: list[dict], resamples: int = 2000, seed: int = 0
                   ) -> tuple[float, float, float] | None:
    """``(mean Jaccard, 2.5 %, 97.5 % percentile)`` of the set-level mean Jaccard over
    ``cases`` (evaluate's per-case ``tp``/``fp``/``fn`` lists), resampling whole cases (all days
    of a case together); ``None`` with fewer than :data:`MIN_CASES` cases."""
    groups: dict = {}
    for c in cases:
        counts = np.array([c["tp"], c["fp"], c["fn"]], dtype=np.float64)  # (3, K)
        groups[c["case"]] = groups.get(c["case"], 0) + counts
    if len(groups) < MIN_CASES:
        return None
    table = np.stack(list(groups.values()))  # (cases, 3, K)

    def score(counts: np.ndarray) -> np.ndarray:  # (..., 3, K) -> (...)
        tp, fp, fn = counts[..., 0, :], counts[..., 1, :], counts[..., 2, :]
        den = tp + fp + fn
        return np.where(den > 0, tp / np.maximum(den, 1), 1.0).mean(-1)

    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(table), size=(resamples, len(table)))
    scores = score(table[draws].sum(1))
    lo, hi = np.percentile(scores, (2.5, 97.5))
    return float(score(table.sum(0))), float(lo), float(hi)


def _interval_text(run: Path) -> str:
    """The case-bootstrap interval of the run's test-fold evaluation (``eval_test.json``: the
    patients neither training nor checkpoint selection saw) or, without one, of its validation
    fold (``eval_val.json``, optimistic: that fold picked the checkpoint), or why there is none."""
    test = (run / "eval_test.json").is_file()
    name, short = ("eval_test.json", "test fold") if test else ("eval_val.json", "validation fold")
    fold = (f"{short} (patients that neither training nor checkpoint selection saw)" if test
            else f"{short}, which also selected the checkpoint, so the value is optimistic")
    try:
        cases = json.loads((run / name).read_text(encoding="utf-8"))["cases"]
        result = case_bootstrap(cases)
    except (OSError, ValueError, KeyError, TypeError):
        return (f"No confidence interval: the run has no readable {name} "
                "(`kvseg evaluate`).")
    n = len({c["case"] for c in cases})
    if result is None:
        return (f"No confidence interval: the {short} has {n} case(s); a case bootstrap needs "
                f"at least {MIN_CASES}.")
    est, lo, hi = result
    few = (f" With only {n} cases a percentile bootstrap is too narrow (it undercovers): read "
           "the interval as a rough guide." if n < 10 else "")
    return (f"Jaccard {est:.4f}, 95% interval [{lo:.4f}, {hi:.4f}] (`kvseg evaluate` on the "
            f"{fold}, {name}: {n} cases; percentile bootstrap over them, 2000 resamples; one "
            f"run, so seed-to-seed variation is not included).{few}")


def _card(config: RunConfig, model: nn.Module, run: Path) -> str:
    info = model_info(config.model)
    params = count_params(model)
    macs = count_macs(model, (1, config.in_channels, config.img_size, config.img_size))
    best = _best_metrics(run)
    if best is not None:
        metrics = (f"| Jaccard | {float(best['jaccard']):.4f} |\n| Dice | "
                   f"{float(best['dice']):.4f} |\n| weighted Jaccard | "
                   f"{float(best['weighted_jaccard']):.4f} |\n\nBest validation epoch "
                   f"{best['epoch']} of {config.epochs} (metrics.csv), fold {config.fold} of "
                   f"{config.n_folds}, threshold {config.threshold}.\n\n{_interval_text(run)}")
    else:
        metrics = "No validation metrics were found in the run folder."
    data = Path(config.data).name if config.data else "unknown"
    test_fold = "" if config.test_fold is None else f", fold {config.test_fold} as the test fold"
    return f"""# {config.model} ({config.size}) — kvseg segmentation model

Packaged by kvseg {__version__} from the run `{run.name}`.

## Model
- Variant `{config.model}`: family {info['family']}, attention mode **{info['mode']}**, size
  preset {config.size}{f", head {config.head}" if config.head else ""}
- {params:,} parameters; {macs / 1e9:.3f} GMACs per {config.img_size} x {config.img_size} input
- Input: {config.in_channels} channel(s) ({config.context} neighbouring slice(s) per side),
  {config.img_size} x {config.img_size}; see `config.json` → `input`
- Output: {config.num_classes} channel(s), task {config.task}; classes: {', '.join(config.classes)}

## Training data and recipe
- Data: `{data}` (layout {config.data_format}), fold {config.fold} of {config.n_folds} held out
  for validation{test_fold}, training fraction {config.train_fraction}
- {config.epochs} epochs, batch {config.batch_size}, AdamW lr {config.lr:g} (warm-up
  {config.warmup_epochs:g} epoch(s), cosine to x{config.min_lr_ratio:g}), weight decay
  {config.weight_decay:g}, loss {config.bce_weight:g} x BCE/CE + {config.dice_weight:g} x Dice,
  augmentation {'on' if config.augment else 'off'}, precision {config.precision}, seed
  {config.seed}{f", initialised from {config.pretrained}" if config.pretrained else ""}

## Metrics
| metric | value |
|---|---|
{metrics}

## Intended use
Research on attention design for 2D medical image segmentation (comparing QKV, KV and KV-pos
attention), and as a starting point for fine-tuning on similar images prepared the same way.

## Limitations
- **Research use only. Not a medical device; not for clinical decisions or diagnosis.**
- Validated only on the held-out fold named above; performance on other scanners, sites,
  protocols or populations is unknown and may be much lower.
- Inputs must be prepared exactly as `config.json` → `input` says; other preparation gives
  wrong masks without an error.

## Use
```python
import kvseg
model = kvseg.from_pretrained("PATH")  # eval mode; logits (B, {config.num_classes}, H, W)
```
or `kvseg predict --run PATH --input IMAGES --out OUT`.

## License
{LICENSE}.
"""


def _check_out(out: Path) -> set[str]:
    """The files of an earlier package in ``out`` (which may then be replaced); refuses a file
    or a non-empty folder that ``kvseg package`` did not write."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out}: exists and is not a folder")
    if not out.is_dir() or not any(p.name != LOCK for p in out.iterdir()):
        return set()
    meta = read_manifest(out / MANIFEST)
    own = set(meta["files"]) if meta and meta.get("generator") == "kvseg.package" else set()
    foreign = foreign_entry(out, own | {MANIFEST}, skip=(LOCK,))
    if not own or foreign is not None:
        raise RunDirError(f"--out {out}: folder is not empty and holds "
                          f"{foreign or 'files'} not written by kvseg package; choose an empty "
                          "or new folder")
    return own


def package_run(run: str | os.PathLike, out: str | os.PathLike) -> str:
    """Write the package of ``run`` (a run folder) into ``out``; returns a one-line summary."""
    run, out = Path(run), Path(out)
    model, config = open_run(run, map_location="cpu")
    _check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    with FolderLock(out, command_line()):
        own = _check_out(out)
        files = [CONFIG_JSON, WEIGHTS, CARD] + ([POSTPROCESS] if (run / POSTPROCESS).is_file()
                                                else [])
        write_manifest(out / MANIFEST, own | set(files), generator="kvseg.package",
                       complete=False)
        remove_files(out, own - set(files) - {MANIFEST})
        body = {"format": FORMAT, "kvseg_version": __version__, **config.to_dict(),
                # not the author's path: evaluating a package asks for --data
                "data": None, "out": None,
                "training_data": Path(config.data).name if config.data else None,
                "input": _input_text(config)}
        atomic_write_text(out / CONFIG_JSON, json.dumps(body, indent=2) + "\n")
        save_model(out / WEIGHTS, model, config.to_dict())
        if POSTPROCESS in files:
            atomic_write_bytes(out / POSTPROCESS, (run / POSTPROCESS).read_bytes())
        atomic_write_text(out / CARD, _card(config, model, run))
        write_manifest(out / MANIFEST, files, generator="kvseg.package", complete=True)
    return f"packaged {run} ({config.model}) -> {out}: {', '.join(files)}"


__all__ = ["CARD", "CONFIG_JSON", "WEIGHTS", "case_bootstrap", "from_pretrained", "is_package",
           "open_package", "package_run", "read_package_config"]
