"""Inputs that used to give a silently wrong dataset or a misleading message (issue 20): each is
now one line naming the file, or a warning saying what was assumed. Files are built in the real
layouts (tests/data/make.py)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import yaml

from data.make import write_folder
from kvseg.data import build_dataset
from kvseg.errors import ConfigError, DataError


def _build(root, split="all", **kw):
    return build_dataset({"data": str(root), "img_size": 16, "n_folds": 3, **kw}, split)


def _spec(root, **keys):
    (root / "dataset.yaml").write_text(yaml.safe_dump(keys))


# --------------------------------------------------------------------------- splits
def test_split_lists_sharing_an_image_are_an_error_naming_it(tmp_path):
    root = write_folder(tmp_path / "d", k=1)
    _spec(root, split={"train": ["img00", "img01"], "val": ["img01", "img02"]})
    with pytest.raises(DataError, match=r"dataset.yaml: split: img01 is in both train and val"):
        _build(root, "train")
    # through a group: bob_1 is listed by its group in train and by its name in val
    names = ["ann_0", "bob_0", "bob_1"]
    root = write_folder(tmp_path / "g", k=1, names=names)
    _spec(root, group=r"^(\w+?)_", split={"train": ["bob"], "val": ["ann_0", "bob_1"]})
    with pytest.raises(DataError, match=r"bob_1 is in both train and val \(as bob in train, "
                                        r"as bob_1 in val\)"):
        _build(root, "val")
    _spec(root, group=r"^(\w+?)_", split={"train": ["bob"], "val": ["ann_0"]})
    assert _build(root, "train").ids == ["bob_0", "bob_1"] and _build(root, "val").ids == ["ann_0"]


def test_more_folds_than_cases_says_how_many_cases_the_dataset_has(tmp_path):
    root = write_folder(tmp_path / "d", k=2, n=4)
    with pytest.raises(ConfigError, match=rf"n_folds 5: expected 2\.\.4: {root} has only 4 "
                                          r"case\(s\)"):
        _build(root, "val", n_folds=5)
    assert len(_build(root, "all", n_folds=5)) == 4  # 'all' needs no folds
