"""Segment new images with a trained run: masks at the original size, overlays, submission.csv.

Inputs (:func:`kvseg.data.inputs.discover_inputs`): an image file (PNG, JPEG, TIFF, ...), a
NIfTI volume, a folder of them, a UW-Madison root (``test/`` or ``train/``) or the root of a
folder / volume dataset (its images, never its masks). Slices of one scan are stacked with
their neighbours when the run was trained with ``context > 0``
(:func:`kvseg.data.context.neighbour_table`: edges repeat the border slice, as in training);
the slices of a volume likewise.

Images are read by the dataset's reader (:func:`kvseg.data.png.read_slice`: 16-bit and 8-bit
grayscale as stored, colour as luminance, or RGB for a run trained on colour images) and
prepared by the run's own preprocessing (:func:`kvseg.data.transforms.prepare_slices`, with its
dataset's CT window if it had one; the run's ``preprocess``); the predicted probabilities are
resized back to the slice's original height × width before thresholding (multi-label: sigmoid
≥ threshold) or the argmax (multi-class: softmax, the run's ``task``).

Outputs in ``OUT``:

- ``masks/<id>.png``: 8-bit single-channel PNG, same width × height as the input slice. A
  multi-class run writes the class index (0 = background, ``k`` = class ``k`` of the run's
  class list, 1-based: the label-mask format of a folder dataset). A multi-label run (classes
  may overlap) writes one bit per class: bit ``c`` (value ``2**c``) is set where class ``c`` of
  the run's class list is predicted. With the default classes
  ``("large_bowel", "small_bowel", "stomach")`` that is 1 = large bowel, 2 = small bowel,
  4 = stomach, and e.g. 5 = large bowel and stomach. Decode with ``(png >> c) & 1``.
- ``masks/<id>.nii.gz`` for a volume: the class index per voxel (uint8), on the input volume's
  voxel grid (its affine and header); no overlay, no submission rows. A multi-label run of
  several classes writes one 0/1 volume per class instead, ``masks/<id>_<class>.nii.gz`` (its
  classes may overlap; bit-packed values would not open as labels in 3D Slicer or ITK-SNAP).
- ``overlays/<id>.png``: RGB, the slice (contrast-stretched) with each class blended in its
  colour (:data:`CLASS_COLORS`).
- ``submission.csv``: the Kaggle format ``id,class,predicted``, one row per slice and class in
  class order, the RLE 1-indexed and row-major over (height, width) like ``train.csv``; an empty
  mask is an empty string.
- ``.kvseg_predict.json``: the list of files this prediction wrote (its manifest).

``<id>`` is the Kaggle id ``case{C}_day{D}_slice_{SSSS}`` for files named and placed as in
UW-Madison (:func:`kvseg.data.parse_slice_path`), otherwise the file's path relative to the
input folder without its suffix (sub-folders are kept).

Faults: an unreadable file, or one with NaN / infinite pixels, is logged with a one-line
reason, listed in the summary and skipped; the others are written (no readable file at all is
an error). A 2.5D neighbour that was skipped is replaced by the next readable slice of the scan,
with a warning naming both, listed in the summary. ``OUT`` must be empty or absent unless
``overwrite=True``; then the files of the earlier prediction (its manifest) are removed first,
and a file predict did not write is never deleted or overwritten.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kvseg.data import CLASSES, rle_encode
from kvseg.data.context import neighbour_table
from kvseg.data.inputs import SliceInput, discover_inputs, read_image  # noqa: F401 (API)
from kvseg.data.manifest import read_manifest, remove_files, write_manifest
from kvseg.data.nifti import read_volume, write_label_volume
from kvseg.data.png import read_slice
from kvseg.data.transforms import prepare_slices, resize_to_original
from kvseg.errors import ConfigError, DataError, RunDirError
from kvseg.inference.ensemble import combine, open_runs, tuned_postprocess
from kvseg.inference.runtime import prepare_for_inference
from kvseg.inference.tta import check_tta, tta_probabilities
from kvseg.training.precision import autocast, device_capability, resolve_precision
from kvseg.training.rundir import LOCK, FolderLock, command_line
from kvseg.utils import atomic_path, atomic_write_text, resolve_device

log = logging.getLogger(__name__)

#: Overlay colours (RGB) by class index; classes beyond three cycle.
CLASS_COLORS: tuple[tuple[int, int, int], ...] = (
    (230, 60, 60),    # large_bowel: red
    (60, 200, 80),    # small_bowel: green
    (60, 120, 240),   # stomach: blue
    (240, 200, 40),
    (200, 60, 220),
    (40, 210, 210),
)

MANIFEST = ".kvseg_predict.json"


@dataclass
class PredictSummary:
    """What :func:`predict` wrote: counts, paths, skipped files and replaced neighbours.

    ``skipped``: (file, reason) of each file not segmented. ``neighbours_replaced``: (slice id,
    neighbour file, what was stacked instead) for each 2.5D neighbour that could not be used.
    ``removed``: files of an earlier prediction deleted from ``out`` (``overwrite=True``).
    """

    out: Path
    slices: int = 0
    positive_slices: int = 0
    submission: Path | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    neighbours_replaced: list[tuple[str, str, str]] = field(default_factory=list)
    removed: int = 0

    def __str__(self) -> str:
        where = (f"{self.out}/masks, {self.out}/overlays, {self.submission}"
                 if self.submission else f"{self.out}/masks")
        lines = [f"predicted {self.slices} slices ({self.positive_slices} with a mask) -> "
                 f"{where}"]
        if self.removed:
            lines.append(f"removed {self.removed} file(s) of an earlier prediction in {self.out}")
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} unreadable file(s):")
            lines += [f"  {path}: {reason}" for path, reason in self.skipped]
        if self.neighbours_replaced:
            lines.append(f"replaced {len(self.neighbours_replaced)} 2.5D neighbour(s):")
            lines += [f"  {sid}: {path} -> {used}" for sid, path, used in
                      self.neighbours_replaced]
        return "\n".join(lines)


# --------------------------------------------------------------------------- model
@torch.inference_mode()
def predict_probs(model: torch.nn.Module, batch: torch.Tensor, tta: str = "none",
                  task: str = "multilabel") -> torch.Tensor:
    """Probabilities (B, classes, S, S) for a prepared batch (B, C, S, S): sigmoid per class
    (multi-label) or softmax over background + classes (multi-class).

    ``tta``: ``none``, ``flip`` (the image and its horizontal mirror, the flip used by training
    augmentation) or ``flips`` (also the vertical and the double mirror); probabilities are
    averaged (:func:`kvseg.inference.tta.tta_probabilities`, shared with ``kvseg evaluate``).
    """
    return tta_probabilities(model, batch, tta, task)


def label_masks(probs: torch.Tensor, task: str, threshold: float) -> tuple[np.ndarray,
                                                                             np.ndarray]:
    """``(mask PNG (H, W) uint8, class masks (classes, H, W) uint8)`` from one slice's
    probabilities at original size: the class index (multi-class argmax, background 0) or the
    class bits (multi-label, ``>= threshold``)."""
    if task == "multiclass":
        labels = probs.argmax(0).numpy().astype(np.uint8)
        planes = np.arange(1, probs.shape[0])[:, None, None] == labels[None]
        return labels, planes.astype(np.uint8)
    planes = (probs >= threshold).numpy().astype(np.uint8)
    return encode_mask_png(planes), planes


def encode_mask_png(mask: np.ndarray) -> np.ndarray:
    """(classes, H, W) binary -> (H, W) uint8 with bit ``c`` set where class ``c`` is on."""
    if mask.shape[0] > 8:
        raise ConfigError(f"a bit-packed mask PNG holds at most 8 classes, got {mask.shape[0]}")
    bits = (mask.astype(np.uint8) << np.arange(mask.shape[0], dtype=np.uint8)[:, None, None])
    return bits.sum(axis=0, dtype=np.uint8)


def decode_mask_png(png: np.ndarray, num_classes: int) -> np.ndarray:
    """Inverse of :func:`encode_mask_png`: (H, W) uint8 -> (num_classes, H, W) uint8 0/1."""
    return ((png[None].astype(np.uint8) >> np.arange(num_classes, dtype=np.uint8)[:, None, None])
            & 1).astype(np.uint8)


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """RGB uint8 (H, W, 3): ``image`` (H, W) or (H, W, 3) contrast-stretched to its 0.5-99.5
    percentiles, each class of ``mask`` (classes, H, W) blended in its :data:`CLASS_COLORS`
    colour."""
    lo, hi = np.percentile(image, (0.5, 99.5)) if image.size else (0.0, 1.0)
    gray = np.clip((image - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0) * 255.0
    rgb = gray if gray.ndim == 3 else np.repeat(gray[..., None], 3, axis=-1)
    for c in range(mask.shape[0]):
        on = mask[c].astype(bool)
        color = np.asarray(CLASS_COLORS[c % len(CLASS_COLORS)], dtype=np.float32)
        rgb[on] = (1 - alpha) * rgb[on] + alpha * color
    return rgb.round().astype(np.uint8)


def _save_png(path: Path, array: np.ndarray) -> None:
    # fast zlib level: default-level encoding took half of predict's time, for a few % of size
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG", compress_level=1)


# --------------------------------------------------------------------------- output folder
def _volume_suffixes(task: str, classes: Sequence[str]) -> tuple[str, ...]:
    """The name suffixes of one volume's mask files: one label volume (``""``), or, for a
    multi-label run of several classes, one 0/1 volume per class (``_<class>``)."""
    if task == "multiclass" or len(classes) == 1:
        return ("",)
    return tuple(f"_{name}" for name in classes)


def _planned_files(items: Sequence[SliceInput], suffixes: Sequence[str] = ("",)) -> set[str]:
    """Every file a prediction of ``items`` may write, relative to OUT."""
    flat = [it for it in items if not it.volume]
    return ({"submission.csv"} | {f"masks/{it.id}.png" for it in flat}
            | {f"overlays/{it.id}.png" for it in flat}
            | {f"masks/{it.id}{s}.nii.gz" for it in items if it.volume for s in suffixes})


def _check_out(out: Path, items: Sequence[SliceInput], overwrite: bool,
               suffixes: Sequence[str] = ("",)) -> set[str]:
    """The files of an earlier prediction in ``out`` (empty if there is none); raises
    :class:`~kvseg.errors.RunDirError` if ``out`` cannot be used. Changes nothing."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out}: exists and is not a folder")
    entries = sorted(p for p in out.iterdir() if p.name != LOCK) if out.is_dir() else []
    first = next(iter(entries), None)
    if first is None:
        return set()
    if not overwrite:
        raise RunDirError(f"--out {out}: folder is not empty (it holds {first.name}); choose "
                          "another folder, or pass overwrite=True (--overwrite) to replace an "
                          "earlier prediction there")
    meta = read_manifest(out / MANIFEST)
    own = set(meta["files"]) if meta else set()
    for rel in sorted(_planned_files(items, suffixes) - own):
        if (out / rel).exists() or (out / rel).is_symlink():
            raise RunDirError(f"--out {out}: {rel} exists and was not written by kvseg predict; "
                              "refusing to overwrite it (move it or choose another folder)")
    return own


def _prepare_out(out: Path, items: Sequence[SliceInput], overwrite: bool,
                 suffixes: Sequence[str] = ("",)) -> int:
    """Check ``out``, list what this prediction may write, remove the earlier prediction's
    files; return how many were removed."""
    own = _check_out(out, items, overwrite, suffixes)
    out.mkdir(parents=True, exist_ok=True)
    # listed before anything is deleted or written: an interrupted run leaves a manifest
    # that covers every file it may have left behind
    write_manifest(out / MANIFEST, own | _planned_files(items, suffixes),
                   generator="kvseg.predict", complete=False)
    return remove_files(out, own - {MANIFEST})


# --------------------------------------------------------------------------- pipeline
def predict(run_dir: str | Path | Sequence[str | Path], source: str | Path, out: str | Path, *,
            threshold: float | None = None, tta: str = "none", device: str = "auto",
            batch_size: int = 8, overwrite: bool = False,
            precision: str = "auto", min_iou: float = 0.99,
            postprocess: bool = False) -> PredictSummary:
    """Load ``RUN_DIR``'s best model and segment every slice found under ``source``.

    Args:
        run_dir: the training run folder (its ``best.safetensors`` and config).
        source: a PNG, a folder of PNGs or a UW-Madison root (see the module docstring).
        out: the output folder; it must be absent or empty unless ``overwrite``.
        threshold: sigmoid threshold; ``None`` takes the run's own (the one its validation
            metrics used; 0.5 by default), so ``kvseg predict`` and ``kvseg evaluate`` agree.
        tta: ``"none"``, ``"flip"`` or ``"flips"`` (:mod:`kvseg.inference.tta`).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        batch_size: slices per forward pass.
        overwrite: replace an earlier prediction in ``out``: its files (as listed in its
            ``.kvseg_predict.json``) are removed first; other files are kept, and one that this
            prediction would overwrite is an error.
        precision: ``auto`` (on CUDA the precision the run trained in, when this GPU has it;
            fp32 on the CPU), ``fp32``, ``bf16`` or ``fp16``
            (:func:`kvseg.precision.inference_precision`); on the CPU ``bf16`` runs bf16
            weights and ``int8`` an ONNX Runtime model calibrated on and checked against the
            run's training slices (:func:`kvseg.runtime.prepare_for_inference`).
        min_iou: ``int8``: the least per-class mask IoU of the int8 model against fp32 on
            held-out training slices; below it the model is refused (one-line error).
        postprocess: apply the run's ``postprocess.json`` (``kvseg tune``) if it has one
            (``kvseg predict`` does); ``threshold`` overrides its thresholds.

    ``run_dir`` may name several runs or package folders (``kvseg package``): their
    probabilities are averaged (:mod:`kvseg.inference.ensemble`).
    """
    runs = [run_dir] if isinstance(run_dir, (str, os.PathLike)) else list(run_dir)
    for run in runs:
        if not Path(run).is_dir():
            raise FileNotFoundError(f"--run {run}: no such run folder")
    _check_args(0.5 if threshold is None else threshold, tta, batch_size)
    items = _outside(discover_inputs(source), Path(out))  # a bad --input fails fast
    dev = resolve_device(device)
    models, config = open_runs(runs, map_location="cpu")
    _check_out(Path(out), items, overwrite,  # a used --out fails before any work
               _volume_suffixes(config.task, config.classes))
    post, threshold = tuned_postprocess(runs, config, threshold, enabled=postprocess)
    prepared = [prepare_for_inference(m, config, precision, dev, min_iou=min_iou)
                for m in models]
    model = combine([m.to(dev).eval() for m, _ in prepared], config.task, tta, post)
    pre = config.preprocess
    return predict_with_model(model, items, out, precision=prepared[0][1],
                              task=config.task, channels=pre["channels"],
                              window=pre.get("window"), img_size=config.img_size,
                              context=config.context, classes=tuple(config.classes),
                              threshold=threshold, tta="none", device=dev,
                              batch_size=batch_size, overwrite=overwrite)


def _outside(items: list[SliceInput], out: Path) -> list[SliceInput]:
    """``items`` without the files under ``out`` (an earlier prediction's own PNGs)."""
    out = out.resolve()
    kept = [it for it in items if out not in it.path.resolve().parents]
    if len(kept) < len(items):
        log.info("ignoring %d PNG(s) inside --out %s", len(items) - len(kept), out)
    if not kept:
        raise ConfigError(f"--input: every PNG found is inside --out {out}")
    return kept


def predict_with_model(model: torch.nn.Module, items: Sequence[SliceInput], out: str | Path, *,
                       img_size: int, context: int = 0, classes: Sequence[str] | None = None,
                       threshold: float = 0.5, tta: str = "none",
                       device: torch.device | str = "cpu", batch_size: int = 8,
                       overwrite: bool = False, precision: str = "fp32",
                       task: str = "multilabel", channels: int = 1,
                       window: Sequence[float] | None = None) -> PredictSummary:
    """Segment ``items`` with ``model`` (in eval mode, on ``device``) and write the outputs.

    ``img_size``, ``context``, ``task``, ``channels`` and ``window`` must be those the model was
    trained with (its run's config and ``preprocess``): each slice becomes a
    ((2·context + 1)·channels, img_size, img_size) input through ``prepare_slices``.
    ``overwrite`` as in :func:`predict`; ``precision`` (``fp32``, ``bf16``, ``fp16``) is the
    autocast of the model.
    """
    classes = tuple(classes or _default_classes())
    _check_args(threshold, tta, batch_size)
    device = torch.device(device)
    precision = resolve_precision(precision, device.type, device_capability(device))
    out = Path(out)
    existed = out.exists()
    try:
        with FolderLock(out, command_line()):  # one kvseg process writes into OUT at a time
            return _write_predictions(model, items, out, img_size=img_size, context=context,
                                      classes=classes, threshold=threshold, tta=tta,
                                      device=device, batch_size=batch_size,
                                      overwrite=overwrite, precision=precision,
                                      prep=dict(task=task, channels=channels,
                                                window=tuple(window) if window else None))
    finally:
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # nothing written: leave no empty folder behind


def _write_predictions(model: torch.nn.Module, items: Sequence[SliceInput], out: Path, *,
                       img_size: int, context: int, classes: tuple[str, ...], threshold: float,
                       tta: str, device: torch.device, batch_size: int,
                       overwrite: bool, precision: str = "fp32",
                       prep: dict | None = None) -> PredictSummary:
    """The body of :func:`predict_with_model`, run while holding OUT's lock; ``prep``: the
    run's ``task``, ``channels`` and ``window``."""

    prep = prep or {"task": "multilabel", "channels": 1, "window": None}
    task = prep["task"]
    summary = PredictSummary(out=out)
    summary.removed = _prepare_out(out, items, overwrite, _volume_suffixes(task, classes))
    rows: list[tuple[str, str, str]] = []
    written: list[str] = []

    def infer(x: torch.Tensor) -> torch.Tensor:
        with autocast(device, precision):
            return predict_probs(model, x.to(device), tta, task).cpu()

    def flush(batch: list[tuple[SliceInput, np.ndarray, torch.Tensor]]) -> None:
        probs = infer(torch.stack([t for _, _, t in batch]))
        for (item, image, _), p in zip(batch, probs, strict=True):
            png, mask = label_masks(resize_to_original(p, *image.shape[:2]), task, threshold)
            for kind, array in (("masks", png), ("overlays", overlay(image, mask))):
                _save_png(out / kind / f"{item.id}.png", array)
                written.append(f"{kind}/{item.id}.png")
            rows.extend((item.id, name, rle_encode(mask[c])) for c, name in enumerate(classes))
            summary.slices += 1
            summary.positive_slices += int(mask.any())

    batch: list[tuple[SliceInput, np.ndarray, torch.Tensor]] = []
    for group in _group_by_scan([it for it in items if not it.volume]):
        for entry in _stacks(group, img_size, context, summary, prep["channels"], prep["window"]):
            batch.append(entry)
            if len(batch) == batch_size:
                flush(batch)
                batch = []
    if batch:
        flush(batch)
    for item in (it for it in items if it.volume):
        written += _predict_volume(infer, item, out, img_size=img_size, context=context,
                                   task=task, threshold=threshold, batch_size=batch_size,
                                   window=prep["window"], summary=summary,
                                   suffixes=_volume_suffixes(task, classes))

    if summary.slices == 0:  # nothing written: leave no manifest behind
        (out / MANIFEST).unlink(missing_ok=True)
        first = summary.skipped[0] if summary.skipped else ("input", "no slices")
        raise DataError(f"no readable image: {first[0]}: {first[1]}")
    if rows:
        summary.submission = out / "submission.csv"
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(("id", "class", "predicted"))
        writer.writerows(rows)
        atomic_write_text(summary.submission, buf.getvalue())
        written.append("submission.csv")
    write_manifest(out / MANIFEST, written, generator="kvseg.predict", complete=True)
    return summary


def _predict_volume(infer, item: SliceInput, out: Path, *, img_size: int, context: int,
                    task: str, threshold: float, batch_size: int,
                    window: tuple[float, float] | None, summary: PredictSummary,
                    suffixes: Sequence[str] = ("",)) -> list[str]:
    """Segment one NIfTI volume slice by slice (2.5D stacks within it) and write
    ``masks/<id>.nii.gz`` (class indices), or for a multi-label run of several classes one 0/1
    volume per class, ``masks/<id>_<class>.nii.gz`` (classes may overlap: each opens as its own
    label in 3D Slicer / ITK-SNAP); ``[]`` if it cannot be read (listed in ``summary.skipped``).
    """

    try:
        volume = read_volume(item.path)
        slices = []
        for z, plane in enumerate(volume):
            try:
                slices.append(prepare_slices(plane[None], img_size, window=window))
            except DataError as e:
                raise DataError(f"slice {z}: {e}") from None
    except (DataError, FileNotFoundError) as e:
        summary.skipped.append((str(item.path), str(e).removeprefix(f"{item.path}: ")))
        log.warning("skipped %s: %s", item.path, e)
        return []
    table = neighbour_table([0] * len(volume), context)
    labels = np.zeros((len(suffixes), *volume.shape), np.uint8)
    for lo in range(0, len(volume), batch_size):
        index = range(lo, min(lo + batch_size, len(volume)))
        probs = infer(torch.stack([torch.cat([slices[j] for j in table[k]]) for k in index]))
        for k, p in zip(index, probs, strict=True):
            png, planes = label_masks(resize_to_original(p, *volume.shape[1:]), task, threshold)
            labels[:, k] = png if len(suffixes) == 1 else planes
    written = []
    for suffix, volume_labels in zip(suffixes, labels, strict=True):
        written.append(f"masks/{item.id}{suffix}.nii.gz")
        write_label_volume(out / written[-1], volume_labels, item.path)
    summary.slices += len(volume)
    summary.positive_slices += int(labels.any(0).reshape(len(volume), -1).any(1).sum())
    return written


def _stacks(group: Sequence[SliceInput], img_size: int, context: int,
            summary: PredictSummary, channels: int = 1,
            window: tuple[float, float] | None = None,
            ) -> list[tuple[SliceInput, np.ndarray, torch.Tensor]]:
    """``(item, raw image (H, W) [x 3] float32, model input ((2·context + 1)·channels, S, S))``
    for each readable slice of one scan (sorted by index).

    Unreadable slices are listed in ``summary.skipped``. Neighbours come from the one stacker
    (:func:`~kvseg.data.context.neighbour_table`) over the readable slices, so a skipped
    neighbour is replaced by the next readable one; a neighbour of a different size (not one
    scan after all) by the slice itself. Both are warned about and listed in
    ``summary.neighbours_replaced``.
    """
    raws: dict[int, np.ndarray] = {}
    prepared: dict[int, torch.Tensor] = {}
    for i, item in enumerate(group):
        try:
            raw, prepared[i] = read_slice(item.path, img_size, channels=channels, window=window)
        except (DataError, FileNotFoundError) as e:
            summary.skipped.append((str(item.path), str(e).removeprefix(f"{item.path}: ")))
            log.warning("skipped %s", e)
            continue
        raws[i] = raw.astype(np.float32)
    readable = sorted(raws)
    wanted = neighbour_table([0] * len(group), context)  # positions in the scan
    got = neighbour_table([0] * len(readable), context)  # positions among the readable
    entries = []
    for pos, i in enumerate(readable):
        picks = []
        for want, j in zip(wanted[i].tolist(), (readable[k] for k in got[pos]), strict=True):
            if raws[j].shape != raws[i].shape:
                _replaced(summary, group[i], group[j], f"{group[i].id} (different size)")
                j = i
            elif want not in raws:
                _replaced(summary, group[i], group[want], group[j].id)
            picks.append(j)
        entries.append((group[i], raws[i], torch.cat([prepared[j] for j in picks])))
    return entries


def _replaced(summary: PredictSummary, item: SliceInput, neighbour: SliceInput,
              used: str) -> None:
    summary.neighbours_replaced.append((item.id, str(neighbour.path), used))
    log.warning("%s: 2.5D neighbour %s cannot be used; stacked %s in its place", item.id,
                neighbour.path, used)


def _group_by_scan(items: Sequence[SliceInput]) -> list[list[SliceInput]]:
    """Slices of one scan together (sorted by index); a slice without a scan alone."""
    groups: dict[str, list[SliceInput]] = {}
    alone: list[list[SliceInput]] = []
    for item in items:
        if item.scan is None:
            alone.append([item])
        else:
            groups.setdefault(item.scan, []).append(item)
    return [sorted(g, key=lambda it: it.index) for g in groups.values()] + alone


def _check_args(threshold: float, tta: str, batch_size: int) -> None:
    if not 0.0 < threshold < 1.0:
        raise ConfigError(f"--threshold {threshold}: expected a probability in (0, 1)")
    check_tta(tta)
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: expected >= 1")


def _default_classes() -> tuple[str, ...]:
    return tuple(CLASSES)
