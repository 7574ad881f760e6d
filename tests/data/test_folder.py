"""FolderDataset: label-value and per-class mask layouts; the folder layout of build_dataset
(dataset.yaml, colour, JPEG/TIFF, splits, one-line faults)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from data.make import discs, write_folder
from kvseg import cli
from kvseg.data import FolderDataset, build_dataset, detect_layout
from kvseg.errors import ConfigError, DataError


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


# --------------------------------------------------------------------------- the folder layout
# (build_dataset on ROOT/images + ROOT/masks, dataset.yaml, colour, splits, errors)


def _build(root, split="all", **kw):
    return build_dataset({"data": str(root), "img_size": 16, "n_folds": 3, **kw}, split)


def test_label_masks_of_several_classes_are_multiclass_one_hot(tmp_path):
    root = write_folder(tmp_path / "d", k=3, shape=(20, 24))
    assert detect_layout(root) == "folder"
    ds = _build(root)
    assert ds.task == "multiclass" and ds.classes == ("class_1", "class_2", "class_3")
    item = ds[0]
    assert item["mask"].shape == (4, 16, 16) and item["image"].shape == (1, 16, 16)
    assert torch.equal(item["mask"].sum(0), torch.ones(16, 16))  # one class per pixel
    np.testing.assert_array_equal(ds.full_mask(item["id"]),
                                  np.arange(1, 4)[:, None, None] == discs((20, 24), 3, 0)[None])
    assert item["volume"] == item["id"] == "img00" and item["slice"] == 0
    assert item["voxel_mm"].tolist() == [1.0, 1.0, 1.0]


def test_resized_labels_stay_exclusive_and_follow_the_image_resampling(tmp_path):
    root = write_folder(tmp_path / "d", k=3, shape=(40, 48))
    item = _build(root, img_size=20)[1]
    labels = item["mask"].argmax(0)
    want = torch.from_numpy(discs((40, 48), 3, 1)).float()
    # the nearest-label reading of a 2x shrink: the 2x2 block's majority (or a tie) wins
    pooled = torch.nn.functional.one_hot(want.long(), 4).permute(2, 0, 1).float()
    pooled = torch.nn.functional.interpolate(pooled[None], size=(20, 20), mode="bilinear",
                                             align_corners=False, antialias=True)[0]
    assert (labels == pooled.argmax(0)).float().mean() > 0.99


def test_one_class_masks_and_per_class_folders_are_multilabel(tmp_path):
    binary = _build(write_folder(tmp_path / "b", k=1, binary_255=True))  # 0/255 = one class
    assert binary.task == "multilabel" and binary.classes == ("class_1",)
    assert binary[0]["mask"].shape == (1, 16, 16) and binary[0]["mask"].max() == 1
    per = _build(write_folder(tmp_path / "p", k=2, per_class=True, suffix=".jpg"))
    assert per.task == "multilabel" and per.mask_mode == "per_class"
    assert per.classes == ("class_1", "class_2") and per[0]["mask"].shape == (2, 16, 16)
    with pytest.raises(ConfigError, match="task=multiclass: .* one mask per class"):
        _build(tmp_path / "p", task="multiclass")
    forced = _build(tmp_path / "b", task="multiclass")  # one class as softmax over 2
    assert forced.task == "multiclass" and forced[0]["mask"].shape == (2, 16, 16)


@pytest.mark.parametrize("suffix, bits", [(".png", 16), (".jpg", 8), (".tif", 8),
                                          (".tif", 16)])
def test_grayscale_png_jpeg_tiff_8_and_16_bit(tmp_path, suffix, bits):
    if suffix == ".jpg" and bits == 16:
        pytest.skip("JPEG is 8-bit")
    root = write_folder(tmp_path / "d", k=2, suffix=suffix, bits=bits)
    ds = _build(root)
    assert ds.in_channels == 1 and ds.preprocess == {"channels": 1, "window": None}
    raw = np.asarray(Image.open(next((root / "images").iterdir())), np.float32)
    item = ds[0]
    assert item["image"].max() > 0.9 and item["image"].min() < 0.1
    assert raw.ndim == 2


def test_rgb_images_give_three_channels_or_luminance_when_asked(tmp_path):
    root = write_folder(tmp_path / "d", k=2, rgb=True, suffix=".png")
    ds = _build(root)
    assert ds.in_channels == 3 and ds[0]["image"].shape == (3, 16, 16)
    assert ds.preprocess["channels"] == 3
    # the channels keep their colour balance (joint percentiles): R > B where the disc is
    item = ds[0]
    assert not torch.equal(item["image"][0], item["image"][2])
    (root / "dataset.yaml").write_text("channels: 1\n")
    gray = _build(root)
    assert gray.in_channels == 1 and gray[0]["image"].shape == (1, 16, 16)


def test_dataset_yaml_names_classes_values_and_background(tmp_path):
    root = write_folder(tmp_path / "d", k=3, spec={"classes": {"big": 1, "both": [2, 3]}})
    ds = _build(root)
    assert ds.classes == ("big", "both") and ds.task == "multiclass"
    lab = discs((20, 24), 3, 0)
    np.testing.assert_array_equal(ds.full_mask(0)[1], (lab >= 2).astype(np.uint8))
    (root / "dataset.yaml").write_text("classes: [big]\nbackground_labels: [2, 3]\n")
    ds = _build(root)
    assert ds.classes == ("big",)
    np.testing.assert_array_equal(ds.full_mask(0)[0], (lab == 1).astype(np.uint8))


def test_jpeg_masks_read_as_binary_or_with_mask_threshold(tmp_path, caplog):
    root = tmp_path / "k"
    for i in range(3):
        lab = discs((24, 24), 1, i)
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(exist_ok=True)
        Image.fromarray((lab * 200 + 20).astype(np.uint8)).convert("RGB").save(
            root / "images" / f"p{i}.jpg")
        Image.fromarray((lab * 255).astype(np.uint8)).convert("RGB").save(
            root / "masks" / f"p{i}.jpg", quality=70)
    with caplog.at_level(logging.WARNING, logger="kvseg.data.folder"):
        ds = _build(root)  # near-binary (issue 22): one class, value >= 128, said once
    assert ds.classes == ("class_1",) and ds.spec.mask_threshold == 127
    assert (ds.full_mask(0)[0] == discs((24, 24), 1, 0)).mean() > 0.97
    said = [r.getMessage() for r in caplog.records if "near 0/255" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"{root / 'masks'}: 8-bit masks")
    (root / "dataset.yaml").write_text("classes: [polyp]\nmask_threshold: 127\n")
    ds = _build(root)
    assert ds.classes == ("polyp",) and ds.in_channels == 3
    full = ds.full_mask(0)[0]
    assert (full == discs((24, 24), 1, 0)).mean() > 0.97  # JPEG edges may differ


def test_listed_split_and_group_regex(tmp_path):
    names = [f"{p}_{k}" for p in ("ann", "bob", "cid", "dee") for k in range(3)]
    root = write_folder(tmp_path / "d", k=1, names=names, spec={"group": r"^(\w+?)_"})
    for fold in range(3):
        val = {r.group for r in _build(root, "val", fold=fold).records}
        train = {r.group for r in _build(root, "train", fold=fold).records}
        assert val and train and not val & train  # a patient never in both
        assert {len([r for r in _build(root, "val", fold=fold).records if r.group == g])
                for g in val} == {3}
    again = [_build(root, "val", fold=1).ids for _ in range(2)]
    assert again[0] == again[1]  # seeded
    (root / "dataset.yaml").write_text(yaml.safe_dump({"group": r"^(\w+?)_",
                                                       "split": {"val": ["ann_0", "bob"]}}))
    assert _build(root, "val").ids == ["ann_0", "bob_0", "bob_1", "bob_2"]
    assert len(_build(root, "train")) == 8
    (root / "dataset.yaml").write_text(yaml.safe_dump({"split": {"val": ["zed"]}}))
    with pytest.raises(DataError, match="dataset.yaml: split names 'zed'"):
        _build(root, "val")


def test_cached_and_uncached_items_are_equal(tmp_path):
    root = write_folder(tmp_path / "d", k=3, rgb=True)
    cached, raw = _build(root, cache=True), _build(root, cache=False)
    assert cached.cache is not None and raw.cache is None
    for i in range(len(raw)):
        assert torch.equal(cached[i]["image"], raw[i]["image"])
        assert torch.equal(cached[i]["mask"], raw[i]["mask"])
    assert cached.cache.images_path.name.startswith("slices-")


def test_augmentation_keeps_multiclass_masks_one_hot(tmp_path):
    ds = _build(write_folder(tmp_path / "d", k=3), "train", augment=True)
    torch.manual_seed(0)
    for i in range(len(ds)):
        m = ds[i]["mask"]
        assert torch.equal(m.sum(0), torch.ones_like(m[0])) and set(m.unique().tolist()) <= {0, 1}


@pytest.mark.parametrize("fault, words", [
    ("extra_image", "images/zz.png: no mask for this image"),
    ("extra_mask", "masks/zz.png: mask without an image"),
    ("unreadable", "masks/img01.png: unreadable image"),
    ("value", "masks/img02.png: label value 7 is not a class"),
    ("size", "masks/img03.png: mask is 5x5 but image"),
])
def test_folder_faults_are_one_line_naming_the_file(tmp_path, capsys, fault, words):
    root = write_folder(tmp_path / "d", k=2, spec={"classes": ["a", "b"]})
    if fault == "extra_image":
        Image.fromarray(np.zeros((20, 24), np.uint8)).save(root / "images" / "zz.png")
    elif fault == "extra_mask":
        Image.fromarray(np.zeros((20, 24), np.uint8)).save(root / "masks" / "zz.png")
    elif fault == "unreadable":
        (root / "masks" / "img01.png").write_bytes(b"\x89PNG broken")
    elif fault == "value":
        lab = discs((20, 24), 2, 2)
        lab[0, 0] = 7
        Image.fromarray(lab).save(root / "masks" / "img02.png")
    else:
        Image.fromarray(np.zeros((5, 5), np.uint8)).save(root / "masks" / "img03.png")
    with pytest.raises(DataError, match=words):
        _build(root, cache=True)
    rc = cli.main(["train", "--model", "setr_kv", "--size", "micro", "--img-size", "16",
                   "--data", str(root), "--out", str(tmp_path / "run"), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and words.split(":")[0] in err, err


def test_context_is_refused_for_2d_images(tmp_path):
    with pytest.raises(ConfigError, match="context=1: a folder of 2D images"):
        _build(write_folder(tmp_path / "d", k=1), context=1)
