"""FolderDataset: label-value and per-class mask layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvseg.data import FolderDataset


def _labels_case(tmp_path, write_png):
    labels = np.zeros((10, 14), np.uint8)
    labels[1:4, 2:6] = 1
    labels[5:9, 8:13] = 3
    write_png(tmp_path / "img" / "a.png", (np.arange(140).reshape(10, 14) * 300).astype(np.uint16))
    write_png(tmp_path / "lab" / "a.png", labels)
    return labels


def test_label_value_layout(tmp_path, write_png):
    labels = _labels_case(tmp_path, write_png)
    ds = FolderDataset(tmp_path / "img", tmp_path / "lab", img_size=14)
    assert ds.mask_mode == "labels" and len(ds) == 1
    full = ds.full_mask(0)
    assert full.shape == (3, 10, 14)
    for k in range(3):
        np.testing.assert_array_equal(full[k], labels == k + 1)
    item = ds[0]
    assert item["id"] == "a" and (item["height"], item["width"]) == (10, 14)
    assert item["image"].shape == (1, 14, 14) and item["mask"].shape == (3, 14, 14)
    assert item["mask"][1].sum() == 0 and item["mask"][0].sum() > 0


def test_per_class_layout_allows_overlap(tmp_path, write_png):
    write_png(tmp_path / "img" / "b.png", np.full((8, 8), 500, np.uint16))
    a = np.zeros((8, 8), np.uint8)
    a[2:6, 2:6] = 255
    b = np.zeros((8, 8), np.uint8)
    b[4:8, 4:8] = 1
    write_png(tmp_path / "m" / "tumor" / "b.png", a)
    write_png(tmp_path / "m" / "organ" / "b.png", b)
    ds = FolderDataset(tmp_path / "img", tmp_path / "m", classes=("tumor", "organ"), img_size=8)
    assert ds.mask_mode == "per_class"
    item = ds[0]
    assert torch.equal(item["mask"][0], torch.from_numpy(a > 0).float())
    assert torch.equal(item["mask"][1], torch.from_numpy(b > 0).float())
    assert (item["mask"].sum(0) == 2).any()  # the overlap survives


def test_folder_errors(tmp_path, write_png):
    labels = _labels_case(tmp_path, write_png)
    with pytest.raises(ValueError, match="label value 3"):
        FolderDataset(tmp_path / "img", tmp_path / "lab", classes=("x", "y"))[0]
    write_png(tmp_path / "lab" / "a.png", labels[:, :7])
    with pytest.raises(ValueError, match="a.png"):
        FolderDataset(tmp_path / "img", tmp_path / "lab")[0]
    write_png(tmp_path / "img" / "c.png", np.zeros((4, 4), np.uint16))
    with pytest.raises(FileNotFoundError, match="c.png"):
        FolderDataset(tmp_path / "img", tmp_path / "lab")
    with pytest.raises(FileNotFoundError):
        FolderDataset(tmp_path / "nope", tmp_path / "lab")
