"""Segment new images with a trained run: masks at the original size, overlays, submission.csv.

Inputs (:func:`discover_inputs`):

- one PNG file;
- a folder of PNGs (searched recursively; each file is one slice);
- a UW-Madison-layout root: a folder holding ``test/`` and/or ``train/`` with
  ``case*/case*_day*/scans/slice_*.png``. ``test/`` is used when it holds PNGs (the Kaggle test
  set), otherwise ``train/``. Slices of one scan are stacked with their neighbours when the run
  was trained with ``context > 0`` (edges repeat the border slice, as in training).

Any size and bit depth: 16-bit (``I;16``/``I``) and 8-bit grayscale PNGs are read as raw
intensities; colour PNGs are converted to luminance. The run's own preprocessing
(:func:`kvseg.data.transforms.prepare_slices`) normalises and resizes them, and the predicted
probabilities are resized back to the slice's original height × width before thresholding.

Outputs in ``OUT``:

- ``masks/<id>.png``: 8-bit single-channel PNG, same width × height as the input slice, one bit
  per class (the task is multi-label, classes may overlap): bit ``c`` (value ``2**c``) is set
  where class ``c`` of the run's class list is predicted. With the default classes
  ``("large_bowel", "small_bowel", "stomach")`` that is 1 = large bowel, 2 = small bowel,
  4 = stomach, and e.g. 5 = large bowel and stomach. Decode with ``(png >> c) & 1``.
- ``overlays/<id>.png``: RGB, the slice (contrast-stretched) with each class blended in its
  colour (:data:`CLASS_COLORS`).
- ``submission.csv``: the Kaggle format ``id,class,predicted``, one row per slice and class in
  class order, the RLE 1-indexed and row-major over (height, width) like ``train.csv``; an empty
  mask is an empty string.

``<id>`` is the Kaggle id ``case{C}_day{D}_slice_{SSSS}`` for UW-Madison files, otherwise the
file's path relative to the input folder without ``.png`` (sub-folders are kept).
An unreadable file is logged with a one-line reason, listed in the summary and skipped; the
others are written. No readable file at all is an error.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

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

_SLICE_RE = re.compile(r"^slice_(\d+)(?:_.*)?$")
_SCAN_RE = re.compile(r"^case(\d+)_day(\d+)$")


@dataclass(frozen=True)
class SliceInput:
    """One slice to segment.

    ``id`` names its outputs; ``scan`` groups the slices whose neighbours may be stacked
    (``None``: the slice stands alone) and ``index`` orders them within the scan.
    """

    path: Path
    id: str
    scan: str | None = None
    index: int = 0


@dataclass
class PredictSummary:
    """What :func:`predict` wrote: counts, paths and the skipped files with their reasons."""

    out: Path
    slices: int = 0
    positive_slices: int = 0
    submission: Path | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"predicted {self.slices} slices ({self.positive_slices} with a mask) -> "
                 f"{self.out}/masks, {self.out}/overlays, {self.submission}"]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} unreadable file(s):")
            lines += [f"  {path}: {reason}" for path, reason in self.skipped]
        return "\n".join(lines)


# --------------------------------------------------------------------------- inputs
def discover_inputs(path: str | Path) -> list[SliceInput]:
    """Find the slices under ``path`` (a PNG, a folder of PNGs or a UW-Madison root).

    Returns them sorted by scan and slice index (UW-Madison) or by relative path (folders).
    Raises ``FileNotFoundError`` for a missing path and ``ValueError`` when no PNG is found.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--input {path}: no such file or folder")
    if path.is_file():
        if path.suffix.lower() != ".png":
            raise ValueError(f"--input {path}: expected a .png file, a folder or a UW-Madison root")
        return [_slice_input(path, path.parent)]
    root = path
    for split in ("test", "train"):
        if (path / split).is_dir() and any((path / split).glob("case*/case*_day*/scans/*.png")):
            root = path / split
            break
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() == ".png" and p.is_file())
    if not files:
        raise ValueError(f"--input {path}: no .png files found")
    items = [_slice_input(f, root) for f in files]
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"--input {path}: two files map to the same slice id {dup!r}")
    return sorted(items, key=lambda it: (it.scan or "", it.index, it.id))


def _slice_input(file: Path, root: Path) -> SliceInput:
    """Kaggle id and scan for ``.../caseC/caseC_dayD/scans/slice_SSSS_*.png``, else a path id."""
    m_slice = _SLICE_RE.match(file.stem)
    m_scan = _SCAN_RE.match(file.parent.parent.name) if file.parent.name == "scans" else None
    if m_slice and m_scan:
        scan = file.parent.parent.name
        index = int(m_slice.group(1))
        return SliceInput(file, f"{scan}_slice_{index:04d}", scan, index)
    try:
        rel = file.relative_to(root)
    except ValueError:
        rel = Path(file.name)
    return SliceInput(file, rel.with_suffix("").as_posix())


def read_image(path: str | Path) -> np.ndarray:
    """Read a PNG as raw intensities, float32 (height, width).

    16-bit grayscale keeps its values (0..65535), 8-bit grayscale its 0..255, colour images are
    converted to luminance (``L``), alpha is dropped. Raises ``ValueError`` naming the file when
    it cannot be decoded.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F", "L"):
                arr = np.asarray(img)
            else:
                arr = np.asarray(img.convert("L"))
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{path}: cannot read PNG ({e})") from e
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"{path}: expected a 2-D image, got shape {arr.shape}")
    return arr.astype(np.float32)


# --------------------------------------------------------------------------- model
@torch.inference_mode()
def predict_probs(model: torch.nn.Module, batch: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """Sigmoid probabilities (B, classes, S, S) for a prepared batch (B, C, S, S).

    ``tta="flip"`` averages the probabilities of the image and its horizontal mirror (mirrored
    back), the flip used by training augmentation.
    """
    if tta not in ("none", "flip"):
        raise ValueError(f"--tta {tta!r}: expected none or flip")
    probs = torch.sigmoid(model(batch).float())
    if tta == "flip":
        flipped = torch.sigmoid(model(batch.flip(-1)).float()).flip(-1)
        probs = (probs + flipped) / 2
    return probs


def encode_mask_png(mask: np.ndarray) -> np.ndarray:
    """(classes, H, W) binary -> (H, W) uint8 with bit ``c`` set where class ``c`` is on."""
    if mask.shape[0] > 8:
        raise ValueError(f"a bit-packed mask PNG holds at most 8 classes, got {mask.shape[0]}")
    bits = (mask.astype(np.uint8) << np.arange(mask.shape[0], dtype=np.uint8)[:, None, None])
    return bits.sum(axis=0, dtype=np.uint8)


def decode_mask_png(png: np.ndarray, num_classes: int) -> np.ndarray:
    """Inverse of :func:`encode_mask_png`: (H, W) uint8 -> (num_classes, H, W) uint8 0/1."""
    return ((png[None].astype(np.uint8) >> np.arange(num_classes, dtype=np.uint8)[:, None, None])
            & 1).astype(np.uint8)


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """RGB uint8 (H, W, 3): ``image`` (H, W) contrast-stretched to its 0.5-99.5 percentiles,
    each class of ``mask`` (classes, H, W) blended in its :data:`CLASS_COLORS` colour."""
    lo, hi = np.percentile(image, (0.5, 99.5)) if image.size else (0.0, 1.0)
    gray = np.clip((image - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0) * 255.0
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    for c in range(mask.shape[0]):
        on = mask[c].astype(bool)
        color = np.asarray(CLASS_COLORS[c % len(CLASS_COLORS)], dtype=np.float32)
        rgb[on] = (1 - alpha) * rgb[on] + alpha * color
    return rgb.round().astype(np.uint8)


def _save_png(path: Path, array: np.ndarray) -> None:
    # fast zlib level: default-level encoding took half of predict's time, for a few % of size
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG", compress_level=1)


# --------------------------------------------------------------------------- pipeline
def predict(run_dir: str | Path, source: str | Path, out: str | Path, *,
            threshold: float | None = None, tta: str = "none", device: str = "auto",
            batch_size: int = 8) -> PredictSummary:
    """Load ``RUN_DIR``'s best model and segment every slice found under ``source``.

    ``threshold`` None takes the run's own (the one its validation metrics used; 0.5 by
    default), so ``kvseg predict`` and ``kvseg evaluate`` agree. See the module docstring for the
    inputs and the files written to ``out``.
    """
    from kvseg.checkpoint import load_run

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"--run {run_dir}: no such run folder")
    _check_args(0.5 if threshold is None else threshold, tta, batch_size)
    items = discover_inputs(source)  # before loading the model: a bad --input fails fast
    dev = resolve_device(device)
    model, config = load_run(run_dir, map_location="cpu")
    if threshold is None:
        threshold = float(config.get("threshold", 0.5))
    return predict_with_model(model.to(dev).eval(), items, out,
                              img_size=int(config["img_size"]),
                              context=int(config.get("context", 0) or 0),
                              classes=tuple(config.get("classes") or _default_classes()),
                              threshold=threshold, tta=tta, device=dev, batch_size=batch_size)


def predict_with_model(model: torch.nn.Module, items: Sequence[SliceInput], out: str | Path, *,
                       img_size: int, context: int = 0, classes: Sequence[str] | None = None,
                       threshold: float = 0.5, tta: str = "none",
                       device: torch.device | str = "cpu", batch_size: int = 8,
                       ) -> PredictSummary:
    """Segment ``items`` with ``model`` (in eval mode, on ``device``) and write the outputs.

    ``img_size`` and ``context`` must be those the model was trained with: each slice becomes a
    (2·context + 1, img_size, img_size) input through ``prepare_slices``.
    """
    from kvseg.data import rle_encode
    from kvseg.data.transforms import prepare_slices, resize_to_original

    classes = tuple(classes or _default_classes())
    _check_args(threshold, tta, batch_size)
    device = torch.device(device)
    out = Path(out)
    summary = PredictSummary(out=out)
    rows: list[tuple[str, str, str]] = []

    def flush(batch: list[tuple[SliceInput, np.ndarray, torch.Tensor]]) -> None:
        x = torch.stack([t for _, _, t in batch]).to(device)
        probs = predict_probs(model, x, tta).cpu()
        for (item, image, _), p in zip(batch, probs, strict=True):
            h, w = image.shape
            full = resize_to_original(p, h, w)
            mask = (full >= threshold).numpy().astype(np.uint8)  # (classes, H, W)
            _save_png(out / "masks" / f"{item.id}.png", encode_mask_png(mask))
            _save_png(out / "overlays" / f"{item.id}.png", overlay(image, mask))
            rows.extend((item.id, name, rle_encode(mask[c])) for c, name in enumerate(classes))
            summary.slices += 1
            summary.positive_slices += int(mask.any())

    for group in _group_by_scan(items):
        images: dict[int, np.ndarray] = {}
        for i, item in enumerate(group):
            try:
                images[i] = read_image(item.path)
            except ValueError as e:
                summary.skipped.append((str(item.path), str(e).split(": ", 1)[-1]))
                log.warning("skipped %s", e)
        readable = sorted(images)
        batch: list[tuple[SliceInput, np.ndarray, torch.Tensor]] = []
        for i in readable:
            stack = np.stack([images[j] for j in _neighbours(i, readable, context, images)])
            batch.append((group[i], images[i], prepare_slices(stack, img_size)))
            if len(batch) == batch_size:
                flush(batch)
                batch = []
        if batch:
            flush(batch)

    if summary.slices == 0:
        first = summary.skipped[0] if summary.skipped else ("input", "no slices")
        raise ValueError(f"no readable image: {first[0]}: {first[1]}")
    summary.submission = out / "submission.csv"
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(("id", "class", "predicted"))
    writer.writerows(rows)
    atomic_write_text(summary.submission, buf.getvalue())
    return summary


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


def _neighbours(i: int, readable: list[int], context: int,
                images: dict[int, np.ndarray]) -> list[int]:
    """Indices of the 2·context + 1 slices stacked around readable slice ``i``.

    Neighbours step over unreadable slices and repeat the border slice at the scan's edges; a
    neighbour of a different size (not one scan after all) is replaced by the slice itself.
    """
    pos = readable.index(i)
    last = len(readable) - 1
    picks = [readable[min(max(pos + k, 0), last)] for k in range(-context, context + 1)]
    return [j if images[j].shape == images[i].shape else i for j in picks]


def _check_args(threshold: float, tta: str, batch_size: int) -> None:
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"--threshold {threshold}: expected a probability in (0, 1)")
    if tta not in ("none", "flip"):
        raise ValueError(f"--tta {tta!r}: expected none or flip")
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size}: expected >= 1")


def _default_classes() -> tuple[str, ...]:
    from kvseg.data import CLASSES

    return tuple(CLASSES)
