"""``kvseg evaluate``: a run's best model on a split -> per-class, mean and per-case 3D metrics.

Set-level metrics (Jaccard, weighted Jaccard, Dice; see :mod:`kvseg.training.metrics` for the
conventions) are computed at the model's resolution (``img_size``), like the validation in
training. Per-case 3D metrics are computed one case-day at a time
(:class:`kvseg.training.metrics.CaseMetricsAccumulator`), also at ``img_size``: each slice's pixel
size is its original spacing scaled by the resize (``spacing · height / img_size`` for rows,
``spacing · width / img_size`` for columns) and slices are ``slice_thickness_mm`` apart. Other
datasets give each item's ``volume`` and ``voxel_mm`` (a NIfTI volume's own spacing; a 2D image
is a volume of one slice, in pixels unless its ``dataset.yaml`` gives a ``spacing``); their cases
are numbered in order (``case``; ``day`` 0) and named (``volume``). A multi-class run's classes
are its argmax without the background (:func:`kvseg.training.metrics.predicted_masks`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from kvseg.config import RunConfig
from kvseg.data import build_dataset
from kvseg.errors import CheckpointError, ConfigError, DataError
from kvseg.inference.ensemble import combine, open_runs, tuned_postprocess
from kvseg.inference.package import is_package
from kvseg.inference.runtime import prepare_for_inference
from kvseg.training.distributed import loader_workers
from kvseg.training.metrics import (
    CaseMetricsAccumulator,
    SegmentationMetrics,
    predicted_masks,
    target_masks,
)
from kvseg.training.precision import autocast, device_capability, inference_precision
from kvseg.utils import atomic_write_text, check_number, jsonable, resolve_device

SPLITS = ("train", "val", "test", "all")  # test: the run's test_fold

log = logging.getLogger(__name__)


def _dataset(config: RunConfig, data: str | None, split: str):
    root = data or config.data
    if not root:
        raise ConfigError("--data: the run's config names no dataset; pass --data DIR")
    if not Path(root).is_dir():
        raise FileNotFoundError(f"{root}: dataset root not found")
    options = {**config, "data": str(root)}
    try:
        ds = build_dataset(options, split, augment=False)
    except ConfigError:  # a fold check fails on data of another kind: say that instead
        if split != "all":
            _check_labels(config, build_dataset(options, "all", augment=False), root)
        raise
    _check_labels(config, ds, root)
    return ds


def _check_labels(config: RunConfig, ds, root) -> None:
    """Refuse a dataset labelled otherwise than the run's training data (other classes or
    another task): its scores would compare unlike channels."""
    classes = tuple(getattr(ds, "classes", config.classes))
    task = getattr(ds, "task", config.task)
    if classes != tuple(config.classes) or task != config.task:
        raise DataError(f"{root}: its classes {', '.join(classes)} ({task}) are not the run's "
                        f"{', '.join(config.classes)} ({config.task}); evaluate on data "
                        "labelled like the run's training data")


def _volume_of(batch: dict, i: int, size: int, volumes: dict[str, int]
               ) -> tuple[tuple[int, int], float | None, tuple[float, float]]:
    """``(case key, slice spacing or None, pixel size at img_size)`` of item ``i``: UW-Madison
    items by (case, day) and their spacing, the others by ``volume`` and ``voxel_mm``."""
    h, w = int(batch["height"][i]), int(batch["width"][i])
    if "volume" in batch:
        dz, dr, dc = (float(v) for v in batch["voxel_mm"][i])
        key = (volumes.setdefault(batch["volume"][i], len(volumes)), 0)
        return key, dz, (dr * h / size, dc * w / size)
    sp = float(batch["spacing"][i])
    return (int(batch["case"][i]), int(batch["day"][i])), None, (sp * h / size, sp * w / size)


@torch.no_grad()
def evaluate_run(run: str | os.PathLike | Sequence[str | os.PathLike], data: str | None = None,
                 split: str = "val", out: str | os.PathLike | None = None, device: str = "auto",
                 batch_size: int = 8, threshold: float | None = None,
                 slice_thickness_mm: float = 3.0, precision: str = "auto",
                 workers: int | None = None, tta: str = "none",
                 postprocess: bool = False) -> dict:
    """Evaluate ``RUN_DIR/best.safetensors`` on ``split`` of ``data`` (default: the training
    data, same fold) and write the results to ``out`` (default ``RUN_DIR/eval_<split>.json``).

    Returns a dict: ``run``, ``data``, ``split``, ``n_slices``, ``classes``, ``threshold``,
    ``slice_thickness_mm``, ``mean`` (jaccard, weighted_jaccard, dice, dice_3d, hd95_mm,
    hd95_penalized_mm, missed, false_alarms, kaggle_score ...), ``per_class`` (name -> jaccard,
    dice, dice_3d, hd95_mm, hd95_penalized_mm, missed, false_alarms) and ``cases`` (one entry
    per case-day: ``case``, ``day``, ``n_slices``, ``dice_3d``, ``hd95_mm``,
    ``hd95_penalized_mm``, ``tp``/``fp``/``fn`` (pixel counts per class at ``img_size``; summed
    over the cases they are the set-level counts behind ``jaccard``), ``kaggle_dice``,
    ``kaggle_hausdorff``, ``kaggle_score``). ``missed``: case-days where a class is in the ground
    truth and not predicted; ``false_alarms``: predicted and not in the ground truth;
    ``hd95_penalized_mm`` counts both with the volume diagonal instead of skipping them.
    Undefined values (e.g. HD95 of an empty mask) are ``null``.

    ``precision``: ``auto`` (on CUDA the precision the run trained and validated in, when this
    GPU has it; fp32 on the CPU), ``fp32``, ``bf16``, ``fp16`` or ``int8``; the one used is the
    result's ``precision``. On the CPU ``bf16`` and ``int8`` are ``kvseg predict``'s paths (bf16
    weights; an int8 ONNX Runtime model calibrated on the run's training slices,
    :func:`kvseg.inference.runtime.prepare_for_inference`), so the score is that of what predict
    runs; with ``int8`` the result's ``int8_check`` holds predict's agreement check (per-class mask
    IoU vs fp32 on held-out training slices; predict refuses the model below ``--min-iou``, evaluate
    scores it anyway).
    ``workers``: DataLoader workers (None: as ``kvseg train``'s auto).

    ``run`` may name several runs (or package folders): their probabilities are averaged (an
    ensemble; :mod:`kvseg.inference.ensemble`, which refuses runs that disagree). ``tta``:
    ``none``, ``flip`` or ``flips`` (:mod:`kvseg.inference.tta`). ``postprocess``: apply the
    run's ``postprocess.json`` (``kvseg tune``) if it has one (``kvseg evaluate`` does; the
    library default and ``kvseg reproduce`` do not). All three are recorded in the result
    (``runs``, ``tta``, ``postprocess``); the default ``out`` of anything but one plain run is
    ``eval_<split>_<tta, ensemble, post>.json`` in the first run's folder.
    """
    if split not in SPLITS:
        raise ConfigError(f"--split {split!r}: expected one of {', '.join(SPLITS)}")
    check_number("batch_size", batch_size, integer=True, minimum=1)
    check_number("threshold", threshold, minimum=0, maximum=1, min_open=True, max_open=True,
                 optional=True)
    check_number("slice_thickness_mm", slice_thickness_mm, minimum=0, min_open=True)
    dev = resolve_device(device)
    runs = [run] if isinstance(run, (str, os.PathLike)) else list(run)
    models, config = open_runs(runs, map_location=dev)
    post, threshold = tuned_postprocess(runs, config, threshold, enabled=postprocess)
    prepared = [_inference_model(m, config, precision, dev, data) for m in models]
    _, autocast_precision, precision, int8_check = prepared[0]
    model = combine([p[0] for p in prepared], config.task, tta, post)
    ds = _dataset(config, data, split)
    if len(ds) == 0:
        raise DataError(f"split {split!r} of {data or config.data} is empty")
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False,
                                         num_workers=loader_workers(workers, dev.type),
                                         pin_memory=dev.type == "cuda")
    sets, per_case, n, volumes = _score(model, loader, config, threshold, slice_thickness_mm,
                                        dev, autocast_precision)
    results = {
        "run": str(runs[0]),
        "runs": [str(r) for r in runs],
        "tta": tta,
        "postprocess": None if post is None else post.to_dict(),
        "data": str(data or config.data),
        "split": split,
        "model": config.model,
        "n_slices": n,
        "n_cases": len(per_case["cases"]),
        "classes": list(config.classes),
        "task": config.task,
        "threshold": (threshold if post is None or post.thresholds is None
                      else dict(zip(config.classes, post.thresholds, strict=True))),
        "precision": precision,
        **({"int8_check": int8_check} if int8_check else {}),
        "slice_thickness_mm": slice_thickness_mm,
        **_metrics(sets, per_case, config.classes, volumes),
    }
    results = jsonable(results)
    if out is None and is_package(runs[0]):  # a package is shared as written: nothing added
        log.info("%s is a package: the results are not written into it (use --out)", runs[0])
        return results
    out = Path(out) if out is not None else Path(runs[0]) / _default_name(split, runs, tta, post)
    atomic_write_text(out, json.dumps(results, indent=2) + "\n")
    results["out"] = str(out)
    return results


def _default_name(split: str, runs: list, tta: str, post) -> str:
    tags = ([f"tta-{tta}"] if tta != "none" else []) + (
        [f"ensemble{len(runs)}"] if len(runs) > 1 else []) + (["post"] if post else [])
    return f"eval_{split}{''.join('_' + t for t in tags)}.json"


def format_results(results: dict) -> str:
    """A small text table: one row per class and the mean, then the Kaggle score."""

    def f(v, spec=".4f"):
        return "-" if v is None else format(v, spec)

    head = f"{'class':<14}{'jaccard':>9}{'dice':>9}{'dice_3d':>9}{'hd95_mm':>9}"
    extra = "".join(f", {k}" for k in (
        f"ensemble of {len(results.get('runs', []))}" if len(results.get("runs", [])) > 1 else "",
        f"tta {results['tta']}" if results.get("tta", "none") != "none" else "",
        "tuned post-processing" if results.get("postprocess") else "") if k)
    lines = [f"{results['model']} on {results['split']} ({results['n_slices']} slices, "
             f"{results['n_cases']} case-days{extra})", head, "-" * len(head)]
    for name, m in results["per_class"].items():
        lines.append(f"{name:<14}{f(m['jaccard']):>9}{f(m['dice']):>9}{f(m['dice_3d']):>9}"
                     f"{f(m['hd95_mm'], '.2f'):>9}")
    m = results["mean"]
    lines.append(f"{'mean':<14}{f(m['jaccard']):>9}{f(m['dice']):>9}{f(m['dice_3d']):>9}"
                 f"{f(m['hd95_mm'], '.2f'):>9}")
    lines.append(f"missed organs {m['missed']} and false alarms {m['false_alarms']} (case-days x "
                 f"classes); hd95 with the volume-diagonal penalty for those "
                 f"{f(m['hd95_penalized_mm'], '.2f')} mm")
    lines.append(f"weighted jaccard {f(m['weighted_jaccard'])}   kaggle score "
                 f"{f(m['kaggle_score'])} (dice {f(m['kaggle_dice'])}, normalised hausdorff "
                 f"{f(m['kaggle_hausdorff'])})")
    if "out" in results:
        lines.append(f"-> {results['out']}")
    return "\n".join(lines)


def _inference_model(model, config: RunConfig, precision: str, dev: torch.device,
                     data: str | None):
    """``(model, autocast precision, precision reported, int8 check or None)``.

    On the CPU ``bf16`` and ``int8`` are predict's paths (bf16 weights, or the int8 ONNX Runtime
    model calibrated on the run's training slices); evaluate measures it, so it never refuses it
    (predict does, below --min-iou)."""
    if precision == "int8" or (dev.type == "cpu" and precision == "bf16"):
        model, autocast_precision = prepare_for_inference(model, config, precision, dev,
                                                          data=data, min_iou=0.0)
        return model, autocast_precision, precision, getattr(model, "int8_check", None)
    precision = inference_precision(precision, dev.type, device_capability(dev),
                                    config.precision)
    return model, precision, precision, None


def _score(model, loader, config: RunConfig, threshold: float, slice_thickness_mm: float,
           dev: torch.device, autocast_precision: str):
    """One pass over ``loader``: ``(set-level metrics, per-case results, slices, volume
    numbers)``."""
    task, size = config.task, config.img_size
    metrics = SegmentationMetrics(len(config.classes) + (task == "multiclass"), threshold,
                                  task=task)
    cases = CaseMetricsAccumulator(list(config.classes), slice_thickness_mm)
    volumes: dict[str, int] = {}
    n = 0
    for batch in loader:
        x = batch["image"].to(dev, non_blocking=True)
        y = batch["mask"].to(dev, non_blocking=True)
        with autocast(dev, autocast_precision):
            logits = model(x)
        _check_finite(logits, batch, config, autocast_precision)
        metrics.update(logits, y)
        pred = predicted_masks(logits, task, threshold).cpu().numpy()
        target = target_masks(y, task).cpu().numpy()
        for i in range(x.shape[0]):
            key, slice_mm, pixel_mm = _volume_of(batch, i, size, volumes)
            cases.add(key, int(batch["slice"][i]), pred[i], target[i], pixel_mm, slice_mm)
        n += x.shape[0]
    return metrics.compute(sync=False), cases.finalize(), n, volumes


def _check_finite(logits: torch.Tensor, batch: dict, config: RunConfig, precision: str) -> None:
    """NaN logits (or infinite ones in fp32) would score as empty masks: refuse them."""
    bad = torch.isnan(logits) if precision != "fp32" else ~torch.isfinite(logits)
    if bool(bad.any()):
        first = int(bad.flatten(1).any(1).nonzero()[0])
        raise CheckpointError(f"{config.model}: the model gives NaN or infinite logits on "
                              f"{batch['id'][first]} ({precision}); its scores would be "
                              "meaningless (a diverged or damaged run?)")


def _metrics(sets: dict, per_case: dict, classes, volumes: dict[str, int]) -> dict:
    """The ``mean``, ``per_class`` and ``cases`` entries of the result."""
    summary = per_case["summary"]
    names = {k: v for v, k in volumes.items()}
    return {
        "mean": {
            "jaccard": sets["jaccard"],
            "weighted_jaccard": sets["weighted_jaccard"],
            "dice": sets["dice"],
            "dice_3d": summary["dice_3d_mean"],
            "hd95_mm": summary["hd95_mm_mean"],
            "hd95_penalized_mm": summary["hd95_penalized_mm_mean"],
            "missed": sum(summary["missed"].values()),
            "false_alarms": sum(summary["false_alarms"].values()),
            "kaggle_dice": summary["kaggle_dice"],
            "kaggle_hausdorff": summary["kaggle_hausdorff"],
            "kaggle_score": summary["kaggle_score"],
        },
        "per_class": {
            name: {"jaccard": sets["jaccard_per_class"][c], "dice": sets["dice_per_class"][c],
                   "dice_3d": summary["dice_3d"][name], "hd95_mm": summary["hd95_mm"][name],
                   "hd95_penalized_mm": summary["hd95_penalized_mm"][name],
                   "missed": summary["missed"][name],
                   "false_alarms": summary["false_alarms"][name]}
            for c, name in enumerate(classes)
        },
        "cases": [
            {"case": c["key"][0], "day": c["key"][1], "n_slices": c["n_slices"],
             "dice_3d": c["dice_3d"], "hd95_mm": c["hd95_mm"],
             "hd95_penalized_mm": c["hd95_penalized_mm"], "tp": c["tp"], "fp": c["fp"],
             "fn": c["fn"], "kaggle_dice": c["kaggle_dice"],
             "kaggle_hausdorff": c["kaggle_hausdorff"], "kaggle_score": c["kaggle_score"],
             **({"volume": names[c["key"][0]]} if names else {})}
            for c in per_case["cases"]
        ],
    }
