"""A generic two-folder segmentation dataset, so other modalities work with the same models.

Layouts (``NAME`` is the image's file stem; images are read by :func:`kvseg.data.load_png`:
8/16-bit grayscale as stored, colour as luminance; masks are grayscale or palette PNGs)::

    labels:     images_dir/NAME.png   masks_dir/NAME.png          pixel value k = class k (1-based),
                                                                 0 = background (no overlap)
    per_class:  images_dir/NAME.png   masks_dir/{class}/NAME.png  nonzero = class present
                                                                 (classes may overlap)

``mask_mode="auto"`` picks ``per_class`` when ``masks_dir`` has a sub-folder for every class.
Items have the same keys as :class:`~kvseg.data.UWMadison` minus the UW ids: ``image`` float32
(1, S, S) from :func:`~kvseg.data.transforms.prepare_slices`, ``mask`` float32 (K, S, S) in
{0, 1}, ``id`` (NAME), ``height``, ``width`` (original pixels), ``path``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from kvseg.data.names import CLASSES
from kvseg.data.png import load_png, read_slice
from kvseg.data.transforms import augment as augment_fn
from kvseg.data.transforms import resize_mask
from kvseg.errors import ConfigError, DataError


class FolderDataset(Dataset):
    """Images + masks from two folders (see module docstring); no cache (decodes per item)."""

    def __init__(self, images_dir: str | os.PathLike,
                 masks_dir: str | os.PathLike | None = None, *,
                 classes: Sequence[str] = CLASSES, img_size: int = 256,
                 mask_mode: str = "auto", augment: bool = False) -> None:
        self.images_dir = Path(images_dir)
        if not self.images_dir.is_dir():
            raise FileNotFoundError(f"{self.images_dir}: images folder not found")
        self.classes = tuple(classes)
        if not self.classes:
            raise ConfigError("classes must name at least one class")
        self.img_size = int(img_size)
        self.augment = bool(augment)
        self.in_channels = 1
        self.images = sorted(self.images_dir.glob("*.png"))
        if not self.images:
            raise DataError(f"{self.images_dir}: no .png images")
        self.masks_dir = Path(masks_dir) if masks_dir is not None else None
        self.mask_mode = mask_mode
        if self.masks_dir is not None:
            if not self.masks_dir.is_dir():
                raise FileNotFoundError(f"{self.masks_dir}: masks folder not found")
            if mask_mode == "auto":
                per_class = all((self.masks_dir / c).is_dir() for c in self.classes)
                self.mask_mode = "per_class" if per_class else "labels"
            if self.mask_mode not in ("labels", "per_class"):
                raise ConfigError(f"mask_mode {mask_mode!r}: expected auto, labels or "
                                  "per_class")
            for img in self.images:
                for m in self._mask_paths(img):
                    if not m.is_file():
                        raise FileNotFoundError(f"{m}: no mask for image {img}")

    def _mask_paths(self, image: Path) -> list[Path]:
        assert self.masks_dir is not None
        if self.mask_mode == "labels":
            return [self.masks_dir / image.name]
        return [self.masks_dir / c / image.name for c in self.classes]

    def __len__(self) -> int:
        return len(self.images)

    def full_mask(self, index: int) -> np.ndarray:
        """Masks at original size: uint8 (K, height, width) in {0, 1}."""
        return self._full_mask(index, load_png(self.images[index]).shape)

    def _full_mask(self, index: int, shape: tuple[int, ...]) -> np.ndarray:
        img_path = self.images[index]
        paths = self._mask_paths(img_path)
        planes = [load_png(p, labels=True) for p in paths]
        for p, m in zip(paths, planes, strict=True):
            if m.shape != shape:
                raise DataError(f"{p}: mask is {m.shape[1]}x{m.shape[0]} but image {img_path} "
                                 f"is {shape[1]}x{shape[0]} (width x height)")
        if self.mask_mode == "per_class":
            return np.stack([(m > 0).astype(np.uint8) for m in planes])
        labels = planes[0]
        if labels.max(initial=0) > len(self.classes):
            raise DataError(f"{paths[0]}: label value {int(labels.max())} > number of classes "
                             f"{len(self.classes)} ({', '.join(self.classes)})")
        return np.stack([(labels == k + 1).astype(np.uint8) for k in range(len(self.classes))])

    def __getitem__(self, index: int) -> dict:
        path = self.images[index]
        raw, image = read_slice(path, self.img_size)
        item = dict(image=image, id=path.stem,
                    height=int(raw.shape[0]), width=int(raw.shape[1]), path=str(path))
        if self.masks_dir is not None:
            item["mask"] = resize_mask(self._full_mask(index, raw.shape), self.img_size)
            if self.augment:
                item["image"], item["mask"] = augment_fn(item["image"], item["mask"])
        return item
