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


# --------------------------------------------------------------------------- mask values
def test_a_mask_threshold_above_every_mask_value_names_the_range(tmp_path):
    root = write_folder(tmp_path / "d", k=1, binary_255=True)
    _spec(root, mask_threshold=255)  # every 0/255 mask would be empty
    with pytest.raises(DataError, match=r"dataset.yaml: mask_threshold 255: no mask pixel is "
                                        r"above it \(mask values 0\.\.255 in .*masks\)"):
        _build(root, cache=False)
    _spec(root, mask_threshold=254)
    ds = _build(root, cache=False)
    assert ds.full_mask("img01")[0].sum() > 0


def test_background_labels_are_honoured_when_classes_are_counted(tmp_path):
    root = write_folder(tmp_path / "d", k=3)  # discs of values 1, 2, 3
    _spec(root, background_labels=[3])
    ds = _build(root)
    assert ds.classes == ("class_1", "class_2")  # was 3 classes: value 3 made a class
    from data.make import discs

    lab = discs((20, 24), 3, 0)
    np.testing.assert_array_equal(ds.full_mask("img00"), np.stack([lab == 1, lab == 2]))


def test_background_labels_with_per_class_masks_are_refused(tmp_path):
    root = write_folder(tmp_path / "d", k=2, per_class=True)
    _spec(root, background_labels=[5])
    with pytest.raises(ConfigError, match="dataset.yaml: background_labels: the masks are one "
                                          "folder per class"):
        _build(root)


def test_a_folder_of_empty_masks_invents_no_class(tmp_path):
    root = write_folder(tmp_path / "d", k=0)
    with pytest.raises(DataError, match=r"masks: every mask is empty \(only 0\): there is no "
                                        "class to learn"):
        _build(root)
    _spec(root, classes=["lesion"])  # named: empty masks are what the user means
    assert _build(root).classes == ("lesion",)


def test_other_files_among_the_images_are_listed_in_a_warning(tmp_path, caplog):
    root = write_folder(tmp_path / "d", k=1, binary_255=True)
    (root / "images" / "notes.txt").write_text("x")
    (root / "images" / "scan.dcm").write_bytes(b"DICM")
    (root / "images" / ".DS_Store").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        assert len(_build(root)) == 6
    said = [r.getMessage() for r in caplog.records if "not images skipped" in r.getMessage()]
    assert said == [f"{root / 'images'}: 2 file(s) that are not images skipped: notes.txt, "
                    "scan.dcm"]


def test_ambiguous_mask_folders_name_kvseg_convert(tmp_path):
    from PIL import Image

    root = write_folder(tmp_path / "d", k=1)
    Image.fromarray(np.full((20, 24), 1000, np.uint16)).save(root / "masks" / "img01.png")
    with pytest.raises(DataError, match=r"label values 0\.\.1000 .*`kvseg convert FORMAT` "
                                        r"\(kvasir, isic2018, drive, montgomery\)"):
        _build(root)
    colour = np.zeros((20, 24, 3), np.uint8)
    colour[5:10, 5:10] = (200, 30, 30)  # a red label: colour, not near-binary
    Image.fromarray(colour).save(root / "masks" / "img01.png")
    with pytest.raises(DataError, match=r"img01.png: mask in colour \(1 of the masks\) .*"
                                        "kvseg convert"):
        _build(root)


# --------------------------------------------------------------------------- volumes
def test_an_acdc_frame_without_ground_truth_is_an_error_naming_it(tmp_path):
    from data.make import write_acdc

    root = write_acdc(tmp_path / "training", patients=(1, 2, 3))
    gt = root / "patient002" / "patient002_frame12_gt.nii.gz"
    gt.unlink()  # used to drop the frame without a word
    with pytest.raises(DataError, match=r"patient002_frame12.nii.gz: no ground truth for this "
                                        r"frame \(expected .*patient002_frame12_gt.nii.gz\)"):
        _build(tmp_path)


def test_a_label_volume_on_another_grid_is_an_error_naming_both_files(tmp_path):
    import nibabel as nib

    from data.make import write_synapse

    root = write_synapse(tmp_path / "s", cases=(1, 2, 3))
    label = root / "label" / "label0002.nii.gz"
    img = nib.load(str(label))
    data = np.asanyarray(img.dataobj)
    moved = img.affine.copy()
    moved[0, 3] += 2.0  # shifted 2 mm: the labels would sit beside the organs
    nib.save(nib.Nifti1Image(data, moved), str(label))
    with pytest.raises(DataError, match=r"label0002.nii.gz: its affine differs from its image's "
                                        r".*img0002.nii.gz by up to 2 mm"):
        _build(root)
    nearly = img.affine.copy()
    nearly[0, 3] += 1e-4  # float32 header rounding: accepted
    nib.save(nib.Nifti1Image(data, nearly), str(label))
    assert len(_build(root)) == 18


def test_other_files_beside_the_volumes_are_listed_in_a_warning(tmp_path, caplog):
    from data.make import _nifti, volume

    for name in ("a", "b", "c"):
        image, labels = volume(seed=len(name))
        _nifti(tmp_path / "d" / "images" / f"{name}.nii.gz", image)
        _nifti(tmp_path / "d" / "masks" / f"{name}.nii.gz", labels)
    (tmp_path / "d" / "images" / "d.mha").write_bytes(b"x")  # another format, not read
    with caplog.at_level(logging.WARNING):
        assert _build(tmp_path / "d").classes == ("class_1", "class_2")
    said = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert said == [f"{tmp_path / 'd' / 'images'}: 1 file(s) that are not NIfTI volumes "
                    "skipped: d.mha"]


def test_a_corrupt_gzip_volume_is_named_corrupt_not_non_finite(tmp_path):
    from data.make import write_synapse

    root = write_synapse(tmp_path / "s", cases=(1, 2, 3))
    path = root / "img" / "img0002.nii.gz"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte: the gzip CRC fails, nibabel never checks it
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"img0002.nii.gz: unreadable NIfTI file: corrupt gzip "
                                        r"data \(.*\); the file is damaged"):
        _build(root)


def test_empty_label_volumes_invent_no_class(tmp_path):
    from data.make import _nifti, volume

    for name in ("a", "b"):
        image, labels = volume(seed=len(name))
        _nifti(tmp_path / "d" / "images" / f"{name}.nii.gz", image)
        _nifti(tmp_path / "d" / "masks" / f"{name}.nii.gz", labels * 0)
    with pytest.raises(DataError, match="every label volume is empty"):
        _build(tmp_path / "d")


# --------------------------------------------------------------------------- UW-Madison train.csv
def test_a_slice_missing_one_class_row_is_an_error_naming_it(tmp_path, make_uw):
    from kvseg.data import UWMadison

    root = make_uw(tmp_path / "uw", slices=3)
    lines = (root / "train.csv").read_text().splitlines()
    assert lines[6] == "case1_day0_slice_0002,stomach,"
    (root / "train.csv").write_text("\n".join(lines[:6] + lines[7:]) + "\n")
    with pytest.raises(DataError, match=r"train.csv: 1 slice\(s\) lack a class row \(first: "
                                        r"case1_day0_slice_0002, line 5, has no stomach row\)"):
        UWMadison(root, split="all", img_size=8, cache=False)
    # a truncated file: the last slice keeps one row of three
    (root / "train.csv").write_text("\n".join(lines[:8]) + "\n")
    with pytest.raises(DataError, match=r"1 slice\(s\) lack a class row \(first: "
                                        r"case1_day0_slice_0003, line 8, has no small_bowel / "
                                        r"stomach row\)"):
        UWMadison(root, split="all", img_size=8, cache=False)


def test_an_unterminated_quote_names_the_line_where_it_opened(tmp_path, make_uw):
    from kvseg.data import UWMadison

    root = make_uw(tmp_path / "uw", slices=40)
    lines = (root / "train.csv").read_text().splitlines()
    lines[4] = 'case1_day0_slice_0002,large_bowel,"1 5'  # line 5: the quote never closes
    lines[100] = 'case1_day0_slice_0034,large_bowel,"'  # ...until a stray one on line 101
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"train.csv: line 5: a quote \(\"\) opens a field that "
                                        r"runs on to line 101; an unterminated quote"):
        UWMadison(root, split="all", img_size=8, cache=False)
    lines[100] = "case1_day0_slice_0034,large_bowel,"  # never closed: runs to the end
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"train.csv: line 5: a quote .*unterminated"):
        UWMadison(root, split="all", img_size=8, cache=False)
