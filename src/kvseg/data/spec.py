"""What a dataset says about itself: ``dataset.yaml`` (optional) -> :class:`DatasetSpec`.

A folder or volume dataset may hold a ``dataset.yaml`` beside its images (every key optional)::

    classes: [polyp]                  # names; label value k+1 = classes[k] (0 = background)
    # or, values named explicitly (several values may make one class):
    # classes: {spleen: 1, kidney: [2, 3], liver: 6}
    background_labels: [5, 9]         # label values read as background (classes not used)
    task: multiclass                  # multiclass (softmax) | multilabel (sigmoid per class)
    channels: 1                       # colour images as luminance (default: RGB when colour)
    window: [-125, 275]               # CT: a fixed intensity window, not the percentiles
    split: {train: [a, b], val: [c]}  # by name (volume / image id or group); or folds:
    group: "^(\\w+?)_"                # regex on the name: its first group keeps a patient
                                      # in one fold (default: each volume / image alone)
    seed: 0                           # the fold permutation
    spacing: [0.5, 0.5]               # 2D sets: mm per pixel (row, col) for HD95
    mask_threshold: 127               # one class: mask luminance > 127 is the class
                                      # (lossy JPEG masks)

A layout supplies defaults (Synapse's 8 organs and CT window, ACDC's 3 structures); the file
overrides them key by key. Unknown keys and bad values are a :class:`ConfigError` naming the
file.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kvseg.errors import ConfigError, DataError
from kvseg.utils import read_yaml

SPEC_FILE = "dataset.yaml"
TASKS = ("multiclass", "multilabel")
SEED_MAX = 2**32 - 1  # numpy's and torch's seeds are unsigned 32-bit here


@dataclass(frozen=True)
class DatasetSpec:
    """The settings of a folder or volume dataset (see the module docstring).

    ``classes`` names the classes; ``values[k]`` are the label values of class ``k`` (default
    ``(k + 1,)``). ``None`` fields mean "the dataset decides" (classes inferred from the masks,
    task from the mask layout, channels from the images).
    """

    classes: tuple[str, ...] | None = None
    values: tuple[tuple[int, ...], ...] | None = None
    background_labels: tuple[int, ...] = ()
    task: str | None = None
    channels: int | None = None
    window: tuple[float, float] | None = None
    split: dict | str | None = None
    group: str | None = None
    seed: int = 0
    spacing: tuple[float, float] | None = None
    mask_threshold: int | None = None
    source: str = field(default="", compare=False)

    def label_values(self) -> tuple[tuple[int, ...], ...]:
        """The label values of each class (``((1,), (2,), ...)`` unless named)."""
        assert self.classes is not None
        return self.values or tuple((k + 1,) for k in range(len(self.classes)))

    def lookup(self) -> np.ndarray:
        """int16 (V,): class index + 1 of each label value, 0 background, -1 not a class."""
        values = self.label_values()
        top = max([255, *self.background_labels, *(v for vs in values for v in vs)])
        table = np.full(top + 1, -1, np.int16)
        table[0] = 0
        table[list(self.background_labels)] = 0
        for k, vs in enumerate(values):
            table[list(vs)] = k + 1
        if len(values) == 1 and table[255] == -1:
            table[255] = 1  # a binary mask saved as 0/255
        return table

    def describe_values(self) -> str:
        """``1 = rv, 2 = myo, 3 = lv`` (for error messages)."""
        return ", ".join(f"{'/'.join(map(str, vs))} = {name}"
                         for name, vs in zip(self.classes or (), self.label_values(),
                                             strict=True))

    def group_of(self, name: str) -> str:
        """The split group of a volume / image name (``group`` regex; else the name)."""
        if self.group is None:
            return name
        m = re.search(self.group, name)
        if m is None:
            raise DataError(f"{name}: does not match the group regex {self.group!r} "
                            f"({self.source or SPEC_FILE})")
        return m.group(1) if m.groups() else m.group(0)


def _fail(source: str, key: str, message: str) -> ConfigError:
    return ConfigError(f"{source}: {key}: {message}")


def _int_tuple(source: str, key: str, value) -> tuple[int, ...]:
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v < 65536 for v in items):
        raise _fail(source, key, f"{value!r}: expected label values 1..65535")
    return tuple(items)


def _classes(source: str, value) -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...] | None]:
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        names, values = tuple(value), None
    elif isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
        names = tuple(value)
        values = tuple(_int_tuple(source, f"classes.{k}", v) for k, v in value.items())
        flat = [v for vs in values for v in vs]
        if len(set(flat)) != len(flat):
            raise _fail(source, "classes", "a label value names two classes")
    else:
        raise _fail(source, "classes", f"{value!r}: expected a list of names or a mapping "
                                       "name: value(s)")
    if len(set(names)) != len(names) or "background" in names:
        raise _fail(source, "classes", "names must be unique and not 'background'")
    return names, values


def parse_spec(data: Mapping, source: str, base: DatasetSpec | None = None) -> DatasetSpec:
    """``base`` (a layout's defaults) overridden by the keys of ``data`` (read from ``source``)."""
    known = {f.name for f in dataclasses.fields(DatasetSpec)} - {"values", "source"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown key {unknown[0]!r}; valid: "
                          f"{', '.join(sorted(known))}")
    kw: dict = {"source": source}
    for key, value in data.items():
        if value is None and key != "seed":  # null: not set
            kw[key] = () if key == "background_labels" else None
            if key == "classes":
                kw["values"] = None
        elif key == "classes":
            kw["classes"], kw["values"] = _classes(source, value)
        elif key == "background_labels":
            kw[key] = _int_tuple(source, key, value) if value else ()
        elif key == "task":
            if value not in TASKS:
                raise _fail(source, key, f"{value!r}: expected multiclass or multilabel")
            kw[key] = value
        elif key == "channels":
            if value not in (1, 3):
                raise _fail(source, key, f"{value!r}: expected 1 or 3")
            kw[key] = value
        elif key in ("window", "spacing"):
            ok = (isinstance(value, list) and len(value) == 2
                  and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                          and np.isfinite(v) for v in value))
            if not ok or (key == "window" and value[1] <= value[0]) or (
                    key == "spacing" and min(value) <= 0):
                want = ("[low, high] with low < high" if key == "window"
                        else "[row_mm, col_mm] > 0")
                raise _fail(source, key, f"{value!r}: expected {want}")
            kw[key] = (float(value[0]), float(value[1]))
        elif key == "split":
            kw[key] = _split(source, value)
        elif key == "group":
            try:
                re.compile(value)
            except (re.error, TypeError) as e:
                raise _fail(source, key, f"{value!r}: not a regular expression ({e})") from None
            kw[key] = value
        elif key in ("seed", "mask_threshold"):
            top = SEED_MAX if key == "seed" else 65534
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= top:
                raise _fail(source, key, f"{value!r}: expected an integer 0..{top}")
            kw[key] = value
    spec = dataclasses.replace(base or DatasetSpec(), **kw)
    if spec.mask_threshold is not None and spec.classes is not None and len(spec.classes) != 1:
        raise _fail(source, "mask_threshold", "only for a dataset of one class")
    if spec.background_labels and spec.mask_threshold is not None:
        raise _fail(source, "background_labels", "not used with mask_threshold (luminance > "
                                                  "mask_threshold is the class); remove one")
    if spec.classes is not None:
        named = {v for vs in spec.label_values() for v in vs}
        if "background_labels" not in data:  # a layout's default: the file's classes win
            spec = dataclasses.replace(spec, background_labels=tuple(
                v for v in spec.background_labels if v not in named))
        both = sorted(set(spec.background_labels) & named)
        if both:
            raise _fail(source, "background_labels", f"{both[0]} is also the value of a class "
                                                      f"({spec.describe_values()})")
    return spec


def _split(source: str, value) -> dict | str:
    if isinstance(value, str):
        return value
    if not isinstance(value, dict) or not value or set(value) - {"train", "val"}:
        raise _fail(source, "split", f"{value!r}: expected {{train: [names], val: [names]}} "
                                     "(val alone: train is the rest)")
    for k, names in value.items():
        if not isinstance(names, list) or not all(isinstance(n, (str, int)) for n in names):
            raise _fail(source, f"split.{k}", "expected a list of names")
    return {k: [str(n) for n in names] for k, names in value.items()}


def read_spec(root: str | os.PathLike, base: DatasetSpec | None = None) -> DatasetSpec:
    """``root/dataset.yaml`` over ``base`` (the layout's defaults); ``base`` if there is none."""
    path = Path(root) / SPEC_FILE
    if not path.is_file():
        return base or DatasetSpec()
    return parse_spec(read_yaml(path), str(path), base)


def resolve_task(spec: DatasetSpec, requested: str, exclusive: bool, where: str) -> str:
    """The task: ``requested`` (the run's ``task`` option) unless ``auto``, then the spec's,
    then the dataset's own: multi-class for label masks (exclusive) of two classes or more,
    multi-label otherwise (one class: a sigmoid; per-class masks may overlap). Multi-class needs
    exclusive labels."""
    natural = "multiclass" if exclusive and len(spec.classes or ()) > 1 else "multilabel"
    task = requested if requested != "auto" else (spec.task or natural)
    if task not in TASKS:
        raise ConfigError(f"task={requested!r}: expected auto, multiclass or multilabel")
    if task == "multiclass" and not exclusive:
        raise ConfigError(f"task=multiclass: {where} has one mask per class (classes may "
                          "overlap); use multilabel, or label masks (pixel value = class)")
    return task


def to_class_index(raw: np.ndarray, spec: DatasetSpec, path: str | os.PathLike) -> np.ndarray:
    """A label mask (raw values) -> uint8 class indices (0 background, k + 1 = class k).

    A value that is not a class (nor ``background_labels``), a negative or fractional value is
    a :class:`DataError` naming ``path``; ``mask_threshold`` reads ``raw > threshold`` as the
    one class.
    """
    if spec.mask_threshold is not None:
        return (raw > spec.mask_threshold).astype(np.uint8)
    arr = np.asarray(raw)
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or (arr != np.round(arr)).any():
            raise DataError(f"{path}: label mask with fractional or non-finite values; expected "
                            "integer class values")
    table = spec.lookup()
    ints = arr.astype(np.int64)
    low, high = int(ints.min(initial=0)), int(ints.max(initial=0))
    bad = None
    if low < 0 or high >= len(table):
        bad = low if low < 0 else high
    else:
        idx = table[ints]
        if (idx < 0).any():
            bad = int(ints[idx < 0].flat[0])
    if bad is not None:
        hint = ("; a lossy (JPEG) mask? set mask_threshold in dataset.yaml, or write the "
                "download with `kvseg convert FORMAT` (kvasir, isic2018, drive, montgomery)"
                if Path(path).suffix.lower() in (".jpg", ".jpeg") else "")
        raise DataError(f"{path}: label value {bad} is not a class ({spec.describe_values()}; "
                        f"0 = background){hint}")
    return idx.astype(np.uint8)


__all__ = ["SPEC_FILE", "TASKS", "DatasetSpec", "parse_spec", "read_spec", "resolve_task",
           "to_class_index"]
