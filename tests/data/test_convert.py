"""kvseg convert: fake downloads of Kvasir-SEG, ISIC 2018, DRIVE and Montgomery in their own
layouts become folder datasets that build_dataset reads with the drawn masks."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from PIL import Image

from data.make import discs
from kvseg import cli
from kvseg.data import build_dataset
from kvseg.data.convert import convert
from kvseg.errors import DataError, RunDirError


def _save(path, array, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kw)


def _rgb(lab):
    x = (lab * 150 + 40).astype(np.uint8)
    return np.stack([x, x // 2, 255 - x], axis=-1)


def _check(out, classes, n, val=0, shape=(20, 24)):
    spec = yaml.safe_load((out / "dataset.yaml").read_text())
    assert spec["classes"] == classes
    assert len(spec.get("split", {}).get("val", [])) == val
    ds = build_dataset({"data": str(out), "img_size": 16, "n_folds": 2, "cache": False}, "all")
    assert len(ds) == n and ds.classes == tuple(classes)
    return ds


def test_kvasir_jpeg_masks_are_thresholded(tmp_path):
    src = tmp_path / "Kvasir-SEG"
    for i in range(3):
        lab = discs((20, 24), 1, i)
        _save(src / "images" / f"cju{i}.jpg", _rgb(lab))
        _save(src / "masks" / f"cju{i}.jpg", np.repeat((lab * 255)[..., None], 3, -1)
              .astype(np.uint8), quality=60)
    summary = convert("kvasir", src, tmp_path / "out")
    assert "converted 3 images (polyp" in str(summary)
    ds = _check(tmp_path / "out", ["polyp"], 3)
    assert ds.in_channels == 3 and ds.task == "multilabel"
    assert (ds.full_mask("cju1")[0] == discs((20, 24), 1, 1)).mean() > 0.97
    assert (tmp_path / "out" / "images" / "cju1.jpg").read_bytes() == \
        (src / "images" / "cju1.jpg").read_bytes()  # images copied unchanged


def test_isic_masks_are_renamed_and_validation_listed(tmp_path):
    for part, ids in (("Training", (1, 2, 3)), ("Validation", (9,))):
        for i in ids:
            lab = discs((20, 24), 1, i)
            _save(tmp_path / f"ISIC2018_Task1-2_{part}_Input" / f"ISIC_{i:07d}.jpg", _rgb(lab))
            _save(tmp_path / f"ISIC2018_Task1_{part}_GroundTruth" /
                  f"ISIC_{i:07d}_segmentation.png", (lab * 255).astype(np.uint8))
    convert("isic2018", tmp_path, tmp_path / "out", link=True)
    ds = _check(tmp_path / "out", ["lesion"], 4, val=1)
    np.testing.assert_array_equal(ds.full_mask("ISIC_0000002")[0], discs((20, 24), 1, 2))
    val = build_dataset({"data": str(tmp_path / "out"), "img_size": 16}, "val")
    assert val.ids == ["ISIC_0000009"]


def test_drive_gif_masks_fov_and_the_test_split(tmp_path):
    for part, ids in (("training", (21, 22)), ("test", (1,))):
        for i in ids:
            lab = discs((20, 24), 1, i)
            _save(tmp_path / part / "images" / f"{i:02d}_{part}.tif", _rgb(lab))
            _save(tmp_path / part / "1st_manual" / f"{i:02d}_manual1.gif",
                  (lab * 255).astype(np.uint8))
            _save(tmp_path / part / "mask" / f"{i:02d}_{part}_mask.gif",
                  np.full((20, 24), 255, np.uint8))
    convert("drive", tmp_path, tmp_path / "out")
    ds = _check(tmp_path / "out", ["vessel"], 3, val=1)
    np.testing.assert_array_equal(ds.full_mask("21")[0], discs((20, 24), 1, 21))
    assert sorted(p.name for p in (tmp_path / "out" / "fov").iterdir()) == \
        ["01.png", "21.png", "22.png"]


@pytest.mark.parametrize("lungs", ["merged", "separate"])
def test_montgomery_lungs_merged_or_kept_as_classes(tmp_path, lungs):
    src = tmp_path / "MontgomerySet"
    for i in range(2):
        name = f"MCUCXR_{i:04d}_0"
        lab = discs((20, 24), 2, i)
        _save(src / "CXR_png" / f"{name}.png", (lab * 80 + 20).astype(np.uint8))
        _save(src / "ManualMask" / "leftMask" / f"{name}.png", ((lab == 1) * 255).astype(np.uint8))
        _save(src / "ManualMask" / "rightMask" / f"{name}.png", ((lab == 2) * 255).astype(np.uint8))
    convert("montgomery", src, tmp_path / lungs, lungs=lungs)
    classes = ["lungs"] if lungs == "merged" else ["left_lung", "right_lung"]
    ds = _check(tmp_path / lungs, classes, 2)
    full = ds.full_mask("MCUCXR_0001_0")
    lab = discs((20, 24), 2, 1)
    if lungs == "merged":
        np.testing.assert_array_equal(full[0], lab > 0)
    else:
        np.testing.assert_array_equal(full, np.stack([lab == 1, lab == 2]))


def test_convert_refuses_a_used_folder_and_missing_input_via_the_cli(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    src = tmp_path / "k"
    (src / "images").mkdir(parents=True)
    with pytest.raises(RunDirError, match="exists and is not an empty folder"):
        convert("kvasir", src, tmp_path / "out")
    rc = cli.main(["convert", "kvasir", "--src", str(src), "--out", str(tmp_path / "o2")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "masks: folder not found" in err
    assert not (tmp_path / "o2").exists() and not (tmp_path / ".o2.partial").exists()


def _isic(root, masks):
    for i, mask in enumerate(masks, start=1):
        lab = discs((20, 24), 1, i)
        _save(root / "ISIC2018_Task1-2_Training_Input" / f"ISIC_{i:07d}.jpg", _rgb(lab))
        _save(root / "ISIC2018_Task1_Training_GroundTruth" / f"ISIC_{i:07d}_segmentation.png",
              mask(lab))


def test_isic_masks_stored_as_0_1_are_converted_not_emptied(tmp_path):
    _isic(tmp_path / "src", [lambda lab: lab.astype(np.uint8)] * 2)  # 0/1, not 0/255
    convert("isic2018", tmp_path / "src", tmp_path / "out")
    ds = _check(tmp_path / "out", ["lesion"], 2)
    for i in (1, 2):  # every converted mask used to be empty (thresholded at 127)
        np.testing.assert_array_equal(ds.full_mask(f"ISIC_{i:07d}")[0], discs((20, 24), 1, i))


def test_masks_of_other_value_sets_are_refused_naming_the_file(tmp_path):
    _isic(tmp_path / "src", [lambda lab: (lab * 255).astype(np.uint8),
                             lambda lab: (lab * 7).astype(np.uint8)])  # 0/7: which is it?
    with pytest.raises(DataError, match=r"ISIC_0000002_segmentation.png: mask values 0, 7 \(2 "
                                        r"distinct\) are not a binary mask"):
        convert("isic2018", tmp_path / "src", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_montgomery_mask_of_another_size_is_one_line(tmp_path, capsys):
    src = tmp_path / "MontgomerySet"
    lab = discs((20, 24), 2, 0)
    _save(src / "CXR_png" / "MCUCXR_0001_0.png", (lab * 80 + 20).astype(np.uint8))
    _save(src / "ManualMask" / "leftMask" / "MCUCXR_0001_0.png",
          ((lab == 1) * 255).astype(np.uint8))
    _save(src / "ManualMask" / "rightMask" / "MCUCXR_0001_0.png", np.zeros((10, 12), np.uint8))
    rc = cli.main(["convert", "montgomery", "--src", str(src), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err  # was a numpy broadcasting traceback
    assert "rightMask/MCUCXR_0001_0.png: mask is 12x10 but image" in err and "24x20" in err


def test_kvasir_src_one_folder_too_high_is_accepted(tmp_path):
    src = tmp_path / "download" / "Kvasir-SEG"
    for i in range(2):
        lab = discs((20, 24), 1, i)
        _save(src / "images" / f"c{i}.jpg", _rgb(lab))
        _save(src / "masks" / f"c{i}.jpg", (lab * 255).astype(np.uint8), quality=90)
    (tmp_path / "download" / "kvasir-seg.zip").write_bytes(b"PK")
    convert("kvasir", tmp_path / "download", tmp_path / "out")  # the folder the zip was in
    _check(tmp_path / "out", ["polyp"], 2)
