"""A generic two-folder segmentation dataset, so other modalities work with the same models.

Layouts (``NAME`` is the file stem; images and masks may have different suffixes: PNG, JPEG,
TIFF, BMP, GIF, read by :mod:`kvseg.data.png`)::

    labels:     images/NAME.jpg   masks/NAME.png          pixel value k = class k (1-based),
                                                          0 = background (no overlap)
    per_class:  images/NAME.jpg   masks/{class}/NAME.png  nonzero = class present
                                                          (classes may overlap)

``mask_mode="auto"`` picks ``per_class`` when ``masks_dir`` has a sub-folder for every class (or,
with no classes given, when it holds folders and no files). Class names, label values, the
split, colour handling and more come from an optional ``dataset.yaml``
(:mod:`kvseg.data.spec`); without one, label masks are read once to count the classes
(``class_1`` ...), and a mask of 0/255 is one class. Colour images give 3 channels (RGB,
joint percentile normalisation) unless ``channels: 1`` asks for luminance.

Every image has exactly one mask (per class) and the other way round, both readable and of the
same size: a mismatch is a :class:`~kvseg.errors.DataError` naming the file, found at
construction. A mask value that is not a class is one too (when the slice is prepared: at
construction with the cache, which is the default of :func:`kvseg.data.build_dataset`).
Items: see :mod:`kvseg.data.slices` (``volume`` is the image's name, one slice each).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from kvseg.data.convert import FORMATS
from kvseg.data.masks import BINARY_THRESHOLD, LOSSY_SUFFIXES, Survey, all_dark, survey
from kvseg.data.png import IMAGE_SUFFIXES, image_info, load_png, read_slice
from kvseg.data.slices import SliceRef, SliceSet, encode_mask
from kvseg.data.spec import DatasetSpec, read_spec, resolve_task, to_class_index
from kvseg.errors import ConfigError, DataError

log = logging.getLogger(__name__)


class MissingMaskError(DataError, FileNotFoundError):
    """An image without its mask (or a mask without its image)."""


def image_files(folder: Path) -> dict[str, Path]:
    """``{stem: file}`` of the image files directly in ``folder`` (hidden files skipped); two
    files of one stem are a :class:`DataError`."""
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."):
            if p.stem in out:
                raise DataError(f"{p}: a second file named {p.stem} (also {out[p.stem].name})")
            out[p.stem] = p
    return out


def warn_other_files(folder: Path, kept: Sequence[Path], what: str = "images") -> None:
    """Log one warning listing the files of ``folder`` that are not among ``kept`` (hidden
    files and sub-folders aside): they are not read, and the user should know."""
    names = {p.name for p in kept}
    other = sorted(p.name for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.name not in names)
    if other:
        shown = ", ".join(other[:5]) + (f" and {len(other) - 5} more" if len(other) > 5 else "")
        log.warning("%s: %d file(s) that are not %s skipped: %s", folder, len(other), what,
                    shown)


def pair_files(images: dict[str, Path], masks: dict[str, Path], masks_dir: Path) -> None:
    """Raise :class:`MissingMaskError` naming the first image without a mask, then the first
    mask without an image."""
    for stem, img in images.items():
        if stem not in masks:
            raise MissingMaskError(f"{img}: no mask for this image (expected "
                                   f"{masks_dir}/{stem}.png or another image suffix)")
    for stem, m in masks.items():
        if stem not in images:
            raise MissingMaskError(f"{m}: mask without an image of the same name")


class FolderDataset(SliceSet):
    """Images + masks from two folders (see the module docstring).

    Args:
        images_dir: the images.
        masks_dir: the masks (``None``: images only, no ``mask`` in the items; e.g. to look).
        classes: class names; ``None``: ``dataset.yaml``'s, else the mask sub-folders
            (per-class) or ``class_1..class_K`` with K the largest label value.
        mask_mode: ``auto``, ``labels`` or ``per_class``.
        task: ``None`` (multi-label masks, as this class always gave), ``auto`` (multi-class
            for label masks of two classes or more) or ``multiclass`` / ``multilabel``.
        spec: the dataset's settings (default: ``dataset.yaml`` in the images' parent).
        split, fold, n_folds, img_size, context, augment, cache, cache_dir, exclude: as in
            :class:`~kvseg.data.slices.SliceSet` (context must be 0: images have no neighbours).
    """

    def __init__(self, images_dir: str | os.PathLike,
                 masks_dir: str | os.PathLike | None = None, *,
                 classes: Sequence[str] | None = None, img_size: int = 256,
                 mask_mode: str = "auto", augment: bool = False, task: str | None = None,
                 spec: DatasetSpec | None = None, split: str = "all", fold: int = 0,
                 n_folds: int = 5, context: int = 0, cache: bool = False,
                 cache_dir: str | os.PathLike | None = None, exclude: Sequence[str] = ()) -> None:
        self.images_dir = Path(images_dir)
        if not self.images_dir.is_dir():
            raise FileNotFoundError(f"{self.images_dir}: images folder not found")
        root = self.images_dir.parent
        spec = spec if spec is not None else read_spec(root)
        if classes is not None:
            spec = dataclasses.replace(spec, classes=tuple(classes), values=None)
        if context:
            raise ConfigError(f"context={context}: a folder of 2D images has no neighbouring "
                              "slices; use context 0")
        self.images = list(image_files(self.images_dir).values())
        if not self.images:
            raise DataError(f"{self.images_dir}: no images ({', '.join(IMAGE_SUFFIXES)})")
        warn_other_files(self.images_dir, self.images)
        self.masks_dir = Path(masks_dir) if masks_dir is not None else None
        self.mask_mode = mask_mode
        self._masks: list[list[Path]] = []
        if self.masks_dir is not None:
            spec = self._pair_masks(spec)
            spec = self._read_values(spec)
        if spec.classes is None:
            spec = dataclasses.replace(spec, classes=("class_1",))  # images only
        if not spec.classes:
            raise ConfigError("classes must name at least one class")
        task = "multilabel" if task is None else resolve_task(
            spec, task, self.mask_mode == "labels", str(self.masks_dir))
        self.spec = spec
        records, colour = self._records()
        channels = spec.channels or (3 if colour else 1)
        files = [*self.images, *(m for ms in self._masks for m in ms)]
        super().__init__(root, records, [(i, i + 1) for i in range(len(records))], spec=spec,
                         classes=spec.classes, task=task, in_channels=channels,
                         preprocess={"channels": channels, "window": spec.window},
                         split=split, fold=fold, n_folds=n_folds, img_size=img_size,
                         augment=augment, cache=cache, cache_dir=cache_dir, exclude=exclude,
                         key_files=files, salt={"values": spec.label_values(),
                                                "background": spec.background_labels,
                                                "threshold": spec.mask_threshold,
                                                "channels": channels, "window": spec.window,
                                                "mode": self.mask_mode})

    # ---- files
    def _pair_masks(self, spec: DatasetSpec) -> DatasetSpec:
        assert self.masks_dir is not None
        if not self.masks_dir.is_dir():
            raise FileNotFoundError(f"{self.masks_dir}: masks folder not found")
        if self.mask_mode == "auto":
            if spec.classes is not None:
                per_class = all((self.masks_dir / c).is_dir() for c in spec.classes)
            else:
                entries = [p for p in self.masks_dir.iterdir() if not p.name.startswith(".")]
                per_class = bool(entries) and all(p.is_dir() for p in entries)
            self.mask_mode = "per_class" if per_class else "labels"
        if self.mask_mode not in ("labels", "per_class"):
            raise ConfigError(f"mask_mode {self.mask_mode!r}: expected auto, labels or "
                              "per_class")
        by_stem = {p.stem: p for p in self.images}
        if self.mask_mode == "labels":
            masks = image_files(self.masks_dir)
            warn_other_files(self.masks_dir, list(masks.values()), "masks")
            pair_files(by_stem, masks, self.masks_dir)
            self._masks = [[masks[p.stem]] for p in self.images]
            return spec
        if spec.background_labels:
            raise ConfigError(f"{spec.source}: background_labels: the masks are one folder per "
                              f"class ({self.masks_dir}/CLASS/, nonzero = the class), without "
                              "label values; remove background_labels")
        if spec.classes is None:
            spec = dataclasses.replace(spec, classes=tuple(
                sorted(p.name for p in self.masks_dir.iterdir() if p.is_dir()
                       and not p.name.startswith("."))))
        per_class = []
        for c in spec.classes:
            if not (self.masks_dir / c).is_dir():
                raise MissingMaskError(f"{self.masks_dir / c}: no mask folder for class {c}")
            masks = image_files(self.masks_dir / c)
            pair_files(by_stem, masks, self.masks_dir / c)
            per_class.append(masks)
        self._masks = [[m[p.stem] for m in per_class] for p in self.images]
        return spec

    def _read_values(self, spec: DatasetSpec) -> DatasetSpec:
        """Read every mask once when their values decide something (:mod:`kvseg.data.masks`):
        class names to infer, a ``mask_threshold`` to check, lossy masks to read as binary."""
        t, folders = spec.mask_threshold, self._mask_folders(spec)
        lossy = any(p.suffix.lower() in LOSSY_SUFFIXES for ps in folders.values() for p in ps)
        if self.mask_mode == "labels":
            one = spec.classes is not None and len(spec.classes) == 1
            if spec.classes is not None and t is None and not (lossy and one):
                return spec
        elif t is None and not lossy:
            return spec
        surveys = {d: survey(ps, luminance=t is not None or self.mask_mode == "per_class")
                   for d, ps in folders.items()}
        if t is not None:
            for d, s in surveys.items():
                _check_threshold(s, t, d, spec)
            return spec
        if self.mask_mode == "labels" and spec.classes is None:
            return self._infer_classes(spec, surveys[self.masks_dir])
        binary = [s for s in surveys.values() if not s.exact_binary()]
        if binary and all(s.near_binary() or (s.lossy and all_dark(s.values)) for s in binary):
            _say_near_binary(self.masks_dir, binary)
            return dataclasses.replace(spec, mask_threshold=BINARY_THRESHOLD)
        return spec  # exact values: read as they are (a stray value is named when prepared)

    def _mask_folders(self, spec: DatasetSpec) -> dict[Path, list[Path]]:
        """The mask files of each mask folder (one, or one per class)."""
        assert self.masks_dir is not None
        if self.mask_mode == "labels":
            return {self.masks_dir: [ms[0] for ms in self._masks]}
        return {self.masks_dir / c: [ms[k] for ms in self._masks]
                for k, c in enumerate(spec.classes or ())}

    def _infer_classes(self, spec: DatasetSpec, s: Survey) -> DatasetSpec:
        """``class_1..class_K`` from the largest label value (background labels aside); 0/255
        and near-binary 8-bit masks are one class."""
        values = s.values - set(spec.background_labels)
        if values <= {0} or (s.lossy and all_dark(values)):
            raise DataError(f"{self.masks_dir}: every mask is empty (only 0"
                            f"{', and background_labels' if spec.background_labels else ''}): "
                            "there is no class to learn; name the classes in dataset.yaml if "
                            "empty masks are what you mean")
        if not s.colour and s.exact_binary():
            return dataclasses.replace(spec, classes=("class_1",))  # binary, saved as 0/255
        if s.near_binary():
            _say_near_binary(self.masks_dir, [s])
            return dataclasses.replace(spec, classes=("class_1",),
                                       mask_threshold=BINARY_THRESHOLD)
        convert = (f"or, for a public download, `kvseg convert FORMAT` ({', '.join(FORMATS)}) "
                   "writes masks kvseg reads")
        if s.colour:
            raise DataError(f"{s.colour[0]}: mask in colour ({len(s.colour)} of the masks) and "
                            "not a near-binary 0/255 mask; save label masks as grayscale or "
                            f"palette PNGs, {convert}")
        top = max(values)
        if top > 254 or min(values) < 0 or any(v != int(v) for v in values):
            raise DataError(f"{self.masks_dir}: label values {s.range()} ({len(s.values)} "
                            "distinct), neither label values 1..254 nor a near-binary 0/255 "
                            f"mask; name the classes and their values in dataset.yaml, {convert}")
        log.info("%s: no class names (dataset.yaml): %d class(es) from the masks' values",
                 self.masks_dir, top)
        return dataclasses.replace(spec, classes=tuple(f"class_{k}" for k in range(1, top + 1)))

    def _records(self) -> tuple[list[SliceRef], bool]:
        """One record per image (sizes from the headers; masks must match) and whether any
        image is in colour."""
        sr, sc = self.spec.spacing or (1.0, 1.0)
        records, colour = [], False
        for i, img in enumerate(self.images):
            h, w, c = image_info(img)
            colour |= c
            for m in self._masks[i] if self._masks else []:
                mh, mw, _ = image_info(m)
                if (mh, mw) != (h, w):
                    raise DataError(f"{m}: mask is {mw}x{mh} but image {img} is {w}x{h} "
                                    "(width x height)")
            group = self.spec.group_of(img.stem)
            records.append(SliceRef(img.stem, img.stem, group, 0, h, w, (1.0, sr, sc), str(img)))
        order = sorted(range(len(records)), key=lambda k: records[k].volume)
        self.images = [self.images[k] for k in order]
        self._masks = [self._masks[k] for k in order] if self._masks else []
        return [records[k] for k in order], colour

    # ---- slices
    def _labels(self, i: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """``(class indices (H, W), None)`` for label masks, ``(None, planes (K, H, W))`` for
        per-class masks, of image ``i`` at original size."""
        paths = self._masks[i]
        if self.mask_mode == "labels":
            lum = self.spec.mask_threshold is not None
            return to_class_index(load_png(paths[0], labels=not lum), self.spec, paths[0]), None
        t = self.spec.mask_threshold or 0
        return None, np.stack([(load_png(p, labels=t == 0) > t).astype(np.uint8) for p in paths])

    def _prepare_block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        path = self.images[b]
        raw, image = read_slice(path, self.img_size, channels=self.slice_channels,
                                window=self.spec.window)
        image = torch.round(image * 65535).to(torch.int32).numpy().astype(np.uint16)
        image = image[0] if self.slice_channels == 1 else image
        if not self._masks:
            return image[None], np.zeros((1, self.img_size, self.img_size), self._dtype)
        labels, planes = self._labels(b)
        for p, m in zip(self._masks[b], [labels] if planes is None else planes, strict=True):
            if m.shape != raw.shape[:2]:
                raise DataError(f"{p}: mask is {m.shape[1]}x{m.shape[0]} but image {path} is "
                                f"{raw.shape[1]}x{raw.shape[0]} (width x height)")
        stored = encode_mask(labels, planes, self.task, len(self.classes), self.img_size)
        return image[None], stored[None]

    def __getitem__(self, i: int) -> dict:
        item = super().__getitem__(i)
        if not self._masks:
            del item["mask"]
        return item

    def full_mask(self, key: int | str) -> np.ndarray:
        """Masks at original size: uint8 (K, height, width) in {0, 1} (``key``: an image name
        or a position in :attr:`records`)."""
        b = self._ref(key).index
        labels, planes = self._labels(b)
        if planes is None:
            planes = (np.arange(1, len(self.classes) + 1)[:, None, None] == labels[None])
        return planes.astype(np.uint8)


def _check_threshold(s: Survey, t: int, folder: Path, spec: DatasetSpec) -> None:
    """``mask_threshold`` must split the masks' values: above all of them, every mask would be
    empty; below all of them, every pixel the class."""
    if not s.counts:
        return
    lo, hi = min(s.values), max(s.values)
    if hi <= t or lo > t:
        what = "no mask pixel is above it" if hi <= t else "every mask pixel is above it"
        raise DataError(f"{spec.source or 'dataset.yaml'}: mask_threshold {t}: {what} (mask "
                        f"values {s.range()} in {folder}); every mask would be "
                        f"{'empty' if hi <= t else 'full'}")


def _say_near_binary(folder: Path | None, surveys: list[Survey]) -> None:
    distinct = len(set().union(*(s.values for s in surveys)))
    log.warning("%s: 8-bit masks of near 0/255 values (%d distinct values: lossy-compression "
                "artefacts) read as one class where the value is >= 128; set classes or "
                "mask_threshold in dataset.yaml to read them otherwise", folder, distinct)


__all__ = ["FolderDataset", "MissingMaskError", "image_files", "pair_files", "warn_other_files"]
