"""The shared body of the folder and volume datasets: records, splits, cache, items.

A subclass lists its slices (:class:`SliceRef`, sorted by volume then slice) and prepares them
in blocks (one 2D image, or one volume): ``_prepare_block(b) -> (images uint16 (m, [C,] S, S),
masks (m, S, S))``. :class:`SliceSet` does the rest the same way for every layout: the split
(listed in ``dataset.yaml`` or folds over groups), the exclusions, the on-disk cache
(:class:`~kvseg.data.cache.SliceCache`), 2.5D neighbour stacking
(:func:`~kvseg.data.context.neighbour_table`), the mask encoding and augmentation.

Masks are stored per slice as bits (multi-label: bit ``c`` = class ``c``) or as a class index
(multi-class: 0 = background). Items: ``image`` float32 (C, S, S) in [0, 1]; ``mask`` float32
(K, S, S) in {0, 1} for multi-label, (K + 1, S, S) one-hot with background in channel 0 for
multi-class; ``id``, ``volume`` (str), ``slice`` (int), ``height``, ``width`` (original
pixels), ``voxel_mm`` float32 (3,) (slice, row, column spacing at the original resolution),
``path``.
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from kvseg.data.cache import SliceCache
from kvseg.data.context import neighbour_table, scan_positions
from kvseg.data.spec import DatasetSpec
from kvseg.data.splits import check_split, select_listed, select_split
from kvseg.data.transforms import augment as augment_fn
from kvseg.data.transforms import resize_labels, resize_mask
from kvseg.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SliceRef:
    """One 2D item: a 2D image, or slice ``slice`` of a volume. ``index``: its cache row."""

    id: str
    volume: str
    group: str
    slice: int
    height: int
    width: int
    voxel_mm: tuple[float, float, float]
    path: str
    index: int = 0


def mask_dtype(task: str, num_classes: int):
    """The integer dtype that holds a slice's mask (bits per class, or a class index)."""
    if task == "multiclass":
        if num_classes > 254:
            raise ConfigError(f"{num_classes} classes: at most 254 in a multi-class dataset")
        return np.uint8
    for dtype in (np.uint8, np.uint16, np.uint32):
        if num_classes <= 8 * np.dtype(dtype).itemsize:
            return dtype
    raise ConfigError(f"{num_classes} classes: at most 32 in a multi-label dataset")


def encode_mask(labels: np.ndarray | None, planes: np.ndarray | None, task: str,
                num_classes: int, img_size: int) -> np.ndarray:
    """A slice's ground truth at original size -> its stored form at ``img_size``.

    ``labels``: class indices (H, W) (0 background), or ``planes``: (K, H, W) in {0, 1} (may
    overlap). Multi-class needs ``labels``; it is resized as one-hot probabilities (the most
    likely class wins). Multi-label planes go through :func:`resize_mask` and are bit-packed.
    """
    dtype = mask_dtype(task, num_classes)
    if task == "multiclass":
        return resize_labels(labels, num_classes + 1, img_size)
    if planes is None:
        planes = np.arange(1, num_classes + 1)[:, None, None] == labels[None]
    m = resize_mask(planes, img_size).numpy().astype(np.uint64)
    shifts = np.arange(num_classes, dtype=np.uint64)[:, None, None]
    return (m << shifts).sum(axis=0).astype(dtype)


def decode_mask(stored: np.ndarray, task: str, num_classes: int) -> torch.Tensor:
    """Stored mask (S, S) -> float32 (K, S, S) bits, or (K + 1, S, S) one-hot (multi-class)."""
    m = torch.from_numpy(np.array(stored, dtype=np.int64))  # a copy: the cache is read-only
    if task == "multiclass":
        return F.one_hot(m, num_classes + 1).permute(2, 0, 1).float()
    return torch.stack([(m >> c) & 1 for c in range(num_classes)]).float()


class SliceSet(Dataset):
    """Items of a folder or volume dataset (see the module docstring); subclasses build it.

    Args:
        root: the dataset folder (cache files live in ``root/.kvseg_cache`` by default).
        records: every slice of the dataset, sorted by volume then slice.
        blocks: ``[(start, stop)]`` of ``records`` prepared together (one per image / volume).
        spec: the dataset's settings (split lists, seed).
        classes: class names (background excluded).
        task: ``"multiclass"`` or ``"multilabel"``.
        in_channels: image channels of one slice (1, or 3 for RGB); with ``context`` the item
            has ``(2 * context + 1) * in_channels``.
        preprocess: what predict needs to prepare new images alike (``window``, ``channels``).
        split, fold, n_folds, img_size, context, augment, cache, cache_dir, exclude: as for
            :class:`~kvseg.data.UWMadison`; ``exclude`` lists volume or group names.
        key_files: the files whose path, size and mtime enter the cache key.
        salt: settings that change the prepared slices (class values, window, ...).
    """

    def __init__(self, root: str | os.PathLike, records: Sequence[SliceRef],
                 blocks: Sequence[tuple[int, int]], *, spec: DatasetSpec, classes: Sequence[str],
                 task: str, in_channels: int, preprocess: dict, split: str = "all",
                 fold: int = 0, n_folds: int = 5, img_size: int = 256, context: int = 0,
                 augment: bool = False, cache: bool = False,
                 cache_dir: str | os.PathLike | None = None, exclude: Sequence[str] = (),
                 key_files: Sequence[str | os.PathLike] = (), salt: dict | None = None) -> None:
        check_split(split)
        if int(img_size) < 8:
            raise ConfigError(f"img_size {img_size}: expected >= 8")
        self.root = Path(root)
        self.spec = spec
        self.classes = tuple(classes)
        self.task = task
        self.preprocess = json.loads(json.dumps(preprocess))  # plain lists: YAML-safe
        self.split, self.fold, self.n_folds = split, int(fold), int(n_folds)
        self.img_size, self.context = int(img_size), int(context)
        self.augment = bool(augment) and split == "train"
        self.slice_channels = int(in_channels)
        self.in_channels = (2 * self.context + 1) * self.slice_channels
        self.all_records = [r if r.index == i else _with_index(r, i) for i, r in
                            enumerate(records)]
        self.blocks = list(blocks)
        self._block_of = np.zeros(len(self.all_records), np.int64)
        for b, (start, stop) in enumerate(self.blocks):
            self._block_of[start:stop] = b
        self._neighbours = neighbour_table([r.volume for r in self.all_records], self.context)
        self.records = self._select(exclude)
        self._by_id = {r.id: r for r in self.all_records}
        self._dtype = mask_dtype(task, len(self.classes))
        self._recent: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self.cache: SliceCache | None = None
        if cache:
            hashed = tuple(n for n in ("dataset.yaml", "dataset.json") if (self.root / n).is_file())
            key = json.dumps({**(salt or {}), "classes": self.classes, "task": task},
                             sort_keys=True, default=str)
            self.cache = SliceCache(self.root, key_files, self.img_size, self._prepare_block,
                                    cache_dir=cache_dir, hashed=hashed, prefix="slices",
                                    n=len(self.all_records), channels=self.slice_channels,
                                    mask_dtype=self._dtype, salt=key, blocks=self.blocks)
            self.cache.ensure(threads=min(4, os.cpu_count() or 1))

    # ---- what subclasses provide
    def _prepare_block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def full_mask(self, key: int | str) -> np.ndarray:
        """Ground truth at original resolution: uint8 (K, height, width) in {0, 1}; ``key`` is
        an item id or a position in :attr:`records`."""
        raise NotImplementedError

    # ---- selection
    def _select(self, exclude: Sequence[str]) -> list[SliceRef]:
        out = set(exclude)
        names = {r.volume for r in self.all_records} | {r.group for r in self.all_records}
        for e in sorted(out - names):
            log.warning("exclude %s: no such volume or group in %s", e, self.root)
        keep = [r for r in self.all_records if r.volume not in out and r.group not in out]
        lists = self.spec.split
        if isinstance(lists, dict):
            unknown = sorted({n for v in lists.values() for n in v} - names)
            if unknown:
                raise DataError(f"{self.spec.source}: split names {unknown[0]!r}, which is not "
                                f"an image, volume or group of {self.root}")
            _check_disjoint(self.all_records, lists, self.spec.source)
            keep = select_listed(keep, lambda r: (r.volume, r.group), lists, self.split)
        else:
            keep = select_split(keep, lambda r: r.group, (r.group for r in self.all_records),
                                self.split, self.fold, self.n_folds, self.spec.seed,
                                where=str(self.root))
        if not keep:
            raise DataError(f"{self.root}: split {self.split!r} (fold {self.fold}) selects no "
                            "images")
        return keep

    # ---- items
    def __len__(self) -> int:
        return len(self.records)

    def _slice(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if self.cache is not None:
            return self.cache.get(index)
        b = int(self._block_of[index])
        if b not in self._recent:  # uncached: keep the last two blocks (volumes) decoded
            self._recent[b] = self._prepare_block(b)
            while len(self._recent) > 2:
                self._recent.popitem(last=False)
        images, masks = self._recent[b]
        return images[index - self.blocks[b][0]], masks[index - self.blocks[b][0]]

    def __getitem__(self, i: int) -> dict:
        rec = self.records[i]
        wanted = [int(j) for j in self._neighbours[rec.index]]
        slices = {j: self._slice(j) for j in set(wanted)}
        stack = [np.asarray(slices[j][0], np.float32).reshape(-1, self.img_size, self.img_size)
                 for j in wanted]
        image = torch.from_numpy(np.concatenate(stack)) / 65535.0  # (C, S, S)
        mask = decode_mask(slices[rec.index][1], self.task, len(self.classes))
        if self.augment:
            image, mask = augment_fn(image, mask, exclusive=self.task == "multiclass")
        return dict(image=image, mask=mask, id=rec.id, volume=rec.volume, slice=rec.slice,
                    height=rec.height, width=rec.width,
                    voxel_mm=torch.tensor(rec.voxel_mm, dtype=torch.float32), path=rec.path)

    def _ref(self, key: int | str) -> SliceRef:
        if isinstance(key, str):
            try:
                return self._by_id[key]
            except KeyError:
                raise DataError(f"{key}: no such image in {self.root}") from None
        return self.records[key]

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.records]

    def scans(self) -> dict[str, list[int]]:
        """``{volume: [item indices by slice]}`` for per-volume (3D) metrics."""
        return scan_positions(r.volume for r in self.records)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_recent"] = OrderedDict()
        return state

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({str(self.root)!r}, split={self.split!r}, "
                f"fold={self.fold}, n={len(getattr(self, 'records', ()))}, task={self.task}, "
                f"classes={self.classes})")


def _check_disjoint(records: Sequence[SliceRef], lists: dict, source: str) -> None:
    """A listed split whose ``train`` and ``val`` lists both hold an image (by its name or its
    group) is a :class:`DataError` naming the image: it would be trained and validated on."""
    if set(lists) != {"train", "val"}:
        return
    train, val = set(lists["train"]), set(lists["val"])
    for r in records:
        in_train = [n for n in (r.volume, r.group) if n in train]
        in_val = [n for n in (r.volume, r.group) if n in val]
        if in_train and in_val:
            how = "" if in_train[0] == in_val[0] == r.volume else \
                f" (as {in_train[0]} in train, as {in_val[0]} in val)"
            raise DataError(f"{source}: split: {r.volume} is in both train and val{how}; "
                            "an image must be in one list only")


def _with_index(ref: SliceRef, index: int) -> SliceRef:
    return replace(ref, index=index)


__all__ = ["SliceRef", "SliceSet", "decode_mask", "encode_mask", "mask_dtype"]
