"""The one way kvseg builds a dataset from run options: a detected layout -> a Dataset.

``build_dataset(config, split)`` is what train, evaluate, predict and reproduce call. The
layout is detected from the folder (:data:`LAYOUTS`, first match wins) or named by the run's
``data_format``; a new layout is a row in that table, not a branch in every command.

Every layout's items share one contract: ``image`` float32 (C, S, S) in [0, 1], ``mask``
float32 (K, S, S) in {0, 1} (multi-class: one-hot, background in channel 0), ``id`` str,
``height`` and ``width`` (original pixels), ``path`` str; UW-Madison items add ``case``,
``day``, ``slice`` and ``spacing``, the others ``volume``, ``slice`` and ``voxel_mm``
(:mod:`kvseg.data.slices`). Every dataset has ``classes``, ``task`` (``multilabel`` or
``multiclass``) and ``preprocess`` (what predict needs to prepare new images alike).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from kvseg.data import medical
from kvseg.data.folder import FolderDataset, image_files
from kvseg.data.nifti import nifti_files
from kvseg.data.spec import DatasetSpec
from kvseg.data.splits import GroupSubset, check_split, item_groups
from kvseg.data.uwmadison import UWMadison
from kvseg.errors import ConfigError, DataError

#: The splits :func:`build_dataset` knows (``test``: the run's ``test_fold``).
SPLITS = ("train", "val", "test", "all")


@dataclass(frozen=True)
class DataOptions:
    """The data fields of a run config (the ``TrainConfig`` names), resolved for one split."""

    data: Path
    split: str
    fold: int = 0
    n_folds: int = 5
    img_size: int = 256
    context: int = 0
    cache: bool = True
    cache_dir: str | None = None
    exclude: tuple = ()
    augment: bool = False
    data_format: str = "auto"
    task: str = "auto"
    train_fraction: float = 1.0
    test_fold: int | None = None


@dataclass(frozen=True)
class Layout:
    """A dataset layout: how to recognise its folder and how to build its Dataset."""

    name: str
    expects: str  # what the folder holds, for the "no layout matches" error
    detect: Callable[[Path], bool]
    build: Callable[[DataOptions], Dataset]
    images: Callable[[Path], list[Path]] | None = None  # its images, for kvseg predict


def _build_uwmadison(o: DataOptions) -> Dataset:
    if o.task not in ("auto", "multilabel"):
        raise ConfigError(f"task={o.task}: UW-Madison masks overlap; the task is multilabel")
    return UWMadison(o.data, split=o.split, fold=o.fold, n_folds=o.n_folds, img_size=o.img_size,
                     context=o.context, augment=o.augment, cache=o.cache, cache_dir=o.cache_dir,
                     exclude=list(o.exclude))


def _build_folder(o: DataOptions) -> Dataset:
    if not (o.data / "images").is_dir() or not (o.data / "masks").is_dir():
        raise DataError(f"{o.data}: no images/ and masks/ folders")
    if medical.is_volume_folder(o.data):
        return medical.build_volumes(o.data, medical.folder_pairs(o.data),
                                     DatasetSpec(source=str(o.data)), o)
    return FolderDataset(o.data / "images", o.data / "masks", task=o.task, split=o.split,
                         fold=o.fold, n_folds=o.n_folds, img_size=o.img_size, context=o.context,
                         augment=o.augment, cache=o.cache, cache_dir=o.cache_dir,
                         exclude=[str(e) for e in o.exclude])


def _medical(name: str) -> Callable:
    def call(arg):
        return getattr(medical, name)(arg)

    return call


def _folder_images(root: Path) -> list[Path]:
    return nifti_files(root / "images") or list(image_files(root / "images").values())


#: Known layouts, tried in order (``data_format`` names one).
LAYOUTS: dict[str, Layout] = {
    "uwmadison": Layout("uwmadison", "train.csv and train/case*/case*_day*/scans/*.png",
                        lambda root: (root / "train.csv").is_file(), _build_uwmadison),
    "folder": Layout("folder", "images/ and masks/ (2D images or NIfTI volumes)",
                     lambda root: (root / "images").is_dir() and (root / "masks").is_dir(),
                     _build_folder, _folder_images),
    "msd": Layout("msd", "imagesTr/*.nii.gz and labelsTr/ (Decathlon)",
                  _medical("is_msd"), _medical("build_msd"), _medical("images_of")),
    "synapse": Layout("synapse", "img/img*.nii.gz and label/label*.nii.gz (Synapse)",
                      lambda root: _medical("synapse_base")(root) is not None,
                      _medical("build_synapse"), _medical("images_of")),
    "acdc": Layout("acdc", "patient*/patient*_frame*_gt.nii.gz (ACDC)",
                   lambda root: _medical("acdc_base")(root) is not None,
                   _medical("build_acdc"), _medical("images_of")),
}


def detect_layout(root: str | os.PathLike) -> str:
    """The name of the first :data:`LAYOUTS` entry that recognises ``root``.

    Raises ``FileNotFoundError`` if ``root`` is not a folder and
    :class:`~kvseg.errors.DataError` (one line naming the folder) if no layout matches.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset root not found")
    for name, layout in LAYOUTS.items():
        if layout.detect(root):
            return name
    missing = "; ".join(f"no {lay.expects} ({n})" for n, lay in LAYOUTS.items())
    raise DataError(f"{root}: not a dataset folder kvseg knows: {missing}")


def find_layout(root: str | os.PathLike) -> str | None:
    """The layout that recognises the folder ``root``, or ``None`` (also for a file)."""
    root = Path(root)
    if not root.is_dir():
        return None
    return next((name for name, lay in LAYOUTS.items() if lay.detect(root)), None)


def check_data_format(name: str) -> str:
    """``name`` if it is ``auto`` or a :data:`LAYOUTS` key, else a :class:`ConfigError`."""
    if name != "auto" and name not in LAYOUTS:
        raise ConfigError(f"data_format={name!r}: expected auto or one of {', '.join(LAYOUTS)}")
    return name


def _get(config: Mapping[str, Any] | object, name: str, default: Any) -> Any:
    if isinstance(config, Mapping):
        value = config.get(name, default)
    else:
        value = getattr(config, name, default)
    return default if value is None and default is not None else value


def data_options(config: Mapping[str, Any] | object, split: str, *,
                 augment: bool | None = None) -> DataOptions:
    """Resolve the data fields of ``config`` (a mapping or an object with attributes).

    Missing fields take the ``TrainConfig`` defaults, except ``augment``, which is off unless
    the config says so. Raises :class:`~kvseg.errors.ConfigError` when ``data`` is missing.
    """
    data = _get(config, "data", None)
    if not data:
        raise ConfigError("data: the dataset root is required (--data DIR)")
    if split not in SPLITS:
        check_split(split)
    if augment is None:
        augment = bool(_get(config, "augment", False)) and split == "train"
    exclude = _get(config, "exclude", ())
    exclude = (exclude,) if isinstance(exclude, (str, int)) else tuple(exclude or ())
    return DataOptions(data=Path(data), split=split, fold=int(_get(config, "fold", 0)),
                       n_folds=int(_get(config, "n_folds", 5)),
                       img_size=int(_get(config, "img_size", 256)),
                       context=int(_get(config, "context", 0)),
                       cache=bool(_get(config, "cache", True)),
                       cache_dir=_get(config, "cache_dir", None), exclude=exclude,
                       augment=bool(augment),
                       data_format=check_data_format(str(_get(config, "data_format", "auto"))),
                       task=str(_get(config, "task", "auto")),
                       train_fraction=float(_get(config, "train_fraction", 1.0)),
                       test_fold=_test_fold(config))


def _test_fold(config) -> int | None:
    value = _get(config, "test_fold", None)
    return None if value is None else int(value)


def build_dataset(config: Mapping[str, Any] | object, split: str, *,
                  augment: bool | None = None) -> Dataset:
    """Build the ``split`` dataset of a run config, whatever the folder's layout.

    Args:
        config: a mapping or an object with the attributes ``data, fold, n_folds, img_size,
            context, cache, cache_dir, exclude, augment, data_format, task`` (``TrainConfig``,
            or a run's saved config dict); missing ones take their defaults.
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"``.
        augment: ``None`` means ``config.augment`` for ``"train"`` and off otherwise.

    ``test_fold`` (an int): the cases of that fold form the ``"test"`` split and are left out of
    ``"train"``; ``"val"`` (fold ``fold``) is disjoint from it by construction, so every case is
    in exactly one of train / val / test. Without it ``"test"`` is an error.

    ``train_fraction`` < 1 keeps that fraction of the training *cases* (patients, volumes):
    nested (a fixed permutation of the training cases, so the 25 % subset lies inside the 50 %
    one) and grouped (a case is in or out whole); the validation split is unchanged.

    Raises:
        ConfigError: no ``data`` ("data: the dataset root is required (--data DIR)"), or a bad
            split / fold / option.
        FileNotFoundError: ``data`` is not a folder.
        DataError: no known layout matches the folder, or its files are malformed.
    """
    options = data_options(config, split, augment=augment)
    name = options.data_format
    if name == "auto":
        name = detect_layout(options.data)
    elif not options.data.is_dir():
        raise FileNotFoundError(f"{options.data}: dataset root not found")
    if split == "test":
        return _test_split(LAYOUTS[name], options)
    dataset = LAYOUTS[name].build(options)
    if split == "train" and options.test_fold is not None:
        held_out = set(item_groups(_test_split(LAYOUTS[name], options)))
        groups = item_groups(dataset)
        dataset = GroupSubset(dataset, [i for i, g in enumerate(groups) if g not in held_out],
                              sorted(set(groups) - held_out))
    if split == "train" and options.train_fraction < 1.0:
        dataset = GroupSubset.fraction(dataset, options.train_fraction)
    return dataset


def _test_split(layout: Layout, options: DataOptions) -> Dataset:
    """The test split: fold ``test_fold`` of the same case folds (built as that fold's "val")."""
    if options.test_fold is None:
        raise ConfigError("split 'test': the run has no test_fold (set test_fold in its config "
                          "or preset)")
    dataset = layout.build(replace(options, split="val", fold=options.test_fold, augment=False))
    if isinstance(getattr(getattr(dataset, "spec", None), "split", None), dict):
        raise ConfigError(f"test_fold={options.test_fold}: {options.data} lists its own "
                          "train/val split; a test fold needs case folds")
    return dataset


__all__ = ["LAYOUTS", "DataOptions", "Layout", "build_dataset", "check_data_format",
           "data_options", "detect_layout", "find_layout"]
