"""build_dataset: run options (dict or dataclass) -> the detected layout's Dataset."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from kvseg.data import UWMadison, build_dataset, detect_layout
from kvseg.data.factory import LAYOUTS, data_options
from kvseg.errors import ConfigError, DataError


@dataclass
class Options:
    """The data fields of TrainConfig (a stand-in: the factory reads attributes by name)."""

    data: str | None = None
    fold: int = 0
    n_folds: int = 3
    img_size: int = 16
    context: int = 1
    cache: bool = False
    cache_dir: str | None = None
    exclude: list = field(default_factory=list)
    augment: bool = True


def test_a_dataclass_and_a_dict_build_the_same_datasets(tiny_synth):
    opts = Options(data=str(tiny_synth))
    as_dict = dict(vars(opts))
    for split in ("train", "val", "all"):
        a, b = build_dataset(opts, split), build_dataset(as_dict, split)
        direct = UWMadison(tiny_synth, split=split, fold=0, n_folds=3, img_size=16, context=1,
                           cache=False, augment=split == "train")
        assert isinstance(a, UWMadison) and a.ids == b.ids == direct.ids
        assert a.in_channels == 3 and a.img_size == 16
        assert a.augment == b.augment == (split == "train")
    val = build_dataset(opts, "val")
    assert not val.augment  # augment=None: the config's augment for train only
    assert build_dataset(opts, "train", augment=False).augment is False
    plain = build_dataset({"data": str(tiny_synth), "img_size": 16, "cache": False}, "all")
    assert not plain.augment and plain.n_folds == 5 and plain.context == 0  # defaults
    assert torch.equal(a[0]["mask"], direct[0]["mask"])


def test_exclude_and_cache_options_reach_the_dataset(tiny_synth, tmp_path):
    full = build_dataset(Options(data=str(tiny_synth)), "all")
    scan = full.records[0].scan_id
    cut = build_dataset(Options(data=str(tiny_synth), exclude=[scan], cache=True,
                                cache_dir=str(tmp_path / "c")), "all")
    assert scan not in {r.scan_id for r in cut.records} and len(cut) == len(full) - 8
    assert cut.cache is not None and cut.cache.dir == tmp_path / "c"


def test_missing_data_is_a_config_error():
    for config in (Options(), {}, {"data": ""}):
        with pytest.raises(ConfigError, match=r"^data: the dataset root is required \(--data "
                                              r"DIR\)$"):
            build_dataset(config, "train")


def test_the_layout_is_detected_or_the_folder_named(tiny_synth, tmp_path):
    assert detect_layout(tiny_synth) == "uwmadison" and "uwmadison" in LAYOUTS
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=f"^{empty}: not a dataset folder kvseg knows") as e:
        build_dataset({"data": str(empty)}, "train")
    assert "train.csv" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="nope"):
        build_dataset({"data": str(tmp_path / "nope")}, "train")
    with pytest.raises(ConfigError, match="split 'test'"):
        build_dataset({"data": str(tiny_synth)}, "test")


def test_every_layout_is_detected_or_named(tmp_path):
    from data.make import write_acdc, write_folder, write_synapse
    from kvseg.config import load_config

    roots = {"folder": write_folder(tmp_path / "f", k=2),
             "synapse": write_synapse(tmp_path / "s", cases=(1, 2, 3), shape=(8, 8, 2)),
             "acdc": write_acdc(tmp_path / "a", patients=(1, 2, 3), shape=(8, 8, 2))}
    for name, root in roots.items():
        assert detect_layout(root) == name
        ds = build_dataset({"data": str(root), "img_size": 8, "n_folds": 3, "cache": False,
                            "data_format": name}, "val")
        assert len(ds) > 0 and ds.task == "multiclass"
    with pytest.raises(DataError, match="no images/ and masks/ folders"):
        build_dataset({"data": str(roots["acdc"]), "data_format": "folder"}, "val")
    with pytest.raises(ConfigError, match="data_format='nii': expected auto or one of"):
        build_dataset({"data": str(roots["acdc"]), "data_format": "nii"}, "val")
    with pytest.raises(ConfigError, match="data_format='nii'"):
        load_config(None, {"data_format": "nii"})
    with pytest.raises(ConfigError, match="task='softmax'"):
        load_config(None, {"task": "softmax"})
    with pytest.raises(ConfigError, match="task=multiclass: UW-Madison masks overlap"):
        LAYOUTS["uwmadison"].build(data_options({"data": str(tmp_path), "task": "multiclass"},
                                                "val"))
