"""Volumes: NIfTI reading (axes, spacing), the Synapse / ACDC / Decathlon layouts, windows,
2.5D context within a volume, splits by patient, and the one-line faults."""

from __future__ import annotations

import gzip
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from data.make import _nifti, volume, write_acdc, write_synapse
from kvseg.data import build_dataset, detect_layout
from kvseg.data.medical import NAMED_SPLITS, SYNAPSE_LABELS, TRANSUNET_ORGANS
from kvseg.data.nifti import read_volume, volume_header, write_label_volume
from kvseg.data.transforms import prepare_slices
from kvseg.errors import DataError


def _build(root, split="all", **kw):
    return build_dataset({"data": str(root), "img_size": 16, "n_folds": 3, **kw}, split)


def test_volumes_are_sliced_along_the_third_axis_with_their_spacing(tmp_path):
    data = np.arange(4 * 3 * 2, dtype=np.float32).reshape(4, 3, 2)
    _nifti(tmp_path / "v.nii.gz", data, zooms=(0.5, 0.75, 3.0))
    vol = read_volume(tmp_path / "v.nii.gz")
    assert vol.shape == (2, 4, 3)
    np.testing.assert_array_equal(vol[1], data[:, :, 1])
    assert volume_header(tmp_path / "v.nii.gz") == ((4, 3, 2), (3.0, 0.5, 0.75))


def test_label_volumes_are_written_on_the_input_grid(tmp_path):
    image, _ = volume((10, 8, 3))
    affine = np.array([[0, -0.7, 0, 10], [0.8, 0, 0, -4], [0, 0, 2.5, 1], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(image, affine), str(tmp_path / "in.nii.gz"))
    labels = np.random.default_rng(0).integers(0, 4, (3, 10, 8)).astype(np.uint8)
    write_label_volume(tmp_path / "out.nii.gz", labels, tmp_path / "in.nii.gz")
    back = nib.load(str(tmp_path / "out.nii.gz"))
    np.testing.assert_allclose(back.affine, affine)
    assert back.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), labels.transpose(1, 2, 0))


def test_synapse_layout_keeps_transunets_8_organs_and_windows_the_ct(tmp_path):
    root = write_synapse(tmp_path / "RawData" / "Training", cases=(1, 2, 3))
    assert detect_layout(tmp_path) == "synapse"
    ds = _build(tmp_path)
    assert ds.classes == TRANSUNET_ORGANS and ds.task == "multiclass"
    assert ds.preprocess == {"channels": 1, "window": [-125.0, 275.0]}
    labels = np.asanyarray(nib.load(str(root / "label" / "label0002.nii.gz")).dataobj)
    image = read_volume(root / "img" / "img0002.nii.gz")
    i = ds.ids.index("img0002_slice0003")
    full = ds.full_mask("img0002_slice0003")  # (8, X, Y)
    for k, organ in enumerate(TRANSUNET_ORGANS):
        np.testing.assert_array_equal(full[k], labels[:, :, 3] == SYNAPSE_LABELS[organ])
    assert labels[:, :, 3].__eq__(SYNAPSE_LABELS["esophagus"]).any()  # drawn, read as background
    item = ds[i]
    want = prepare_slices(image[3][None], 16, window=(-125, 275))
    assert torch.allclose(item["image"], want, atol=1e-4)
    assert item["voxel_mm"].tolist() == pytest.approx([2.5, 0.8, 0.7])
    assert item["mask"].shape == (9, 16, 16)


def test_synapse_validates_on_transunets_test_cases_when_present(tmp_path):
    val_ids = NAMED_SPLITS["transunet"]["val"]
    cases = [int(v[3:]) for v in val_ids] + [5, 6]
    write_synapse(tmp_path, cases=cases, shape=(8, 8, 2))
    val, train = _build(tmp_path, "val"), _build(tmp_path, "train")
    assert sorted({r.volume for r in val.records}) == sorted(val_ids)
    assert {r.volume for r in train.records} == {"img0005", "img0006"}


def test_acdc_frames_of_a_patient_share_a_fold_and_4d_files_are_ignored(tmp_path):
    write_acdc(tmp_path / "training", patients=(1, 2, 3, 4))
    assert detect_layout(tmp_path) == "acdc"
    all_ = _build(tmp_path)
    assert all_.classes == ("rv", "myo", "lv")
    assert {r.volume for r in all_.records} == {f"patient{p:03d}_frame{f:02d}"
                                               for p in (1, 2, 3, 4) for f in (1, 12)}
    for fold in range(3):
        val = {r.group for r in _build(tmp_path, "val", fold=fold).records}
        train = {r.group for r in _build(tmp_path, "train", fold=fold).records}
        assert val and not val & train and val | train == {f"patient{p:03d}" for p in range(1, 5)}
    assert all_[0]["voxel_mm"].tolist() == [10.0, 1.5, 1.5]


def test_context_stacks_slices_of_the_same_volume_only(tmp_path):
    write_acdc(tmp_path, patients=(1,), shape=(12, 10, 3))
    flat = _build(tmp_path)
    ctx = _build(tmp_path, context=1)
    assert ctx.in_channels == 3
    ids = flat.ids
    for i in range(len(ids)):
        vol, k = flat.records[i].volume, flat.records[i].slice
        depth = sum(r.volume == vol for r in flat.records)
        want = [ids.index(f"{vol}_slice{min(max(k + d, 0), depth - 1):04d}") for d in (-1, 0, 1)]
        assert torch.equal(ctx[i]["image"], torch.cat([flat[j]["image"] for j in want]))


def test_decathlon_layout_reads_class_names_from_dataset_json(tmp_path):
    for n in (1, 2, 3):
        image, labels = volume((10, 9, 3), values=(1, 2), seed=n)
        _nifti(tmp_path / "imagesTr" / f"heart_{n}_0000.nii.gz", image)
        _nifti(tmp_path / "labelsTr" / f"heart_{n}.nii.gz", labels)
    (tmp_path / "imagesTr" / "._heart_1_0000.nii.gz").write_bytes(b"macOS resource fork")
    (tmp_path / "dataset.json").write_text(json.dumps(
        {"labels": {"0": "background", "1": "atrium", "2": "ventricle"}}))
    assert detect_layout(tmp_path) == "msd"
    ds = _build(tmp_path)
    assert ds.classes == ("atrium", "ventricle") and ds.records[0].volume == "heart_1"
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "x": 2}}))
    with pytest.raises(DataError, match=r"heart_1.nii.gz: label value 1 is not a class \(2 = x"):
        _build(tmp_path)  # nnU-Net v2 orientation, a label the json does not name
    (tmp_path / "dataset.yaml").write_text("classes: {x: 2}\nbackground_labels: [1]\n")
    ds = _build(tmp_path)
    assert ds.classes == ("x",) and ds.task == "multilabel"  # one class: a sigmoid


def test_volume_faults_are_one_line_naming_the_file(tmp_path):
    root = write_synapse(tmp_path / "s", cases=(1, 2))
    label = root / "label" / "label0002.nii.gz"
    _nifti(label, np.zeros((24, 20, 5), np.int16))
    with pytest.raises(DataError, match=r"label0002.nii.gz: label volume of shape \(24, 20, 5\)"):
        _build(root)
    _nifti(label, np.full((24, 20, 6), 14, np.int16))
    with pytest.raises(DataError, match=r"label0002.nii.gz: label value 14 is not a class"):
        _build(root)
    label.write_bytes(gzip.compress(b"\x00" * 100))
    with pytest.raises(DataError, match="label0002.nii.gz: unreadable NIfTI"):
        _build(root)
    data = (root / "img" / "img0001.nii.gz").read_bytes()
    (root / "img" / "img0001.nii.gz").write_bytes(data[: len(data) // 2])
    write_synapse(tmp_path / "s", cases=(2,))
    with pytest.raises(DataError, match="img0001.nii.gz: unreadable NIfTI"):
        _build(root)
    label.unlink()
    with pytest.raises(DataError, match="img0002.nii.gz: no label volume"):
        _build(root)
    _nifti(tmp_path / "f" / "images" / "a.nii.gz", np.zeros((4, 4, 2, 3), np.float32))
    _nifti(tmp_path / "f" / "masks" / "a.nii.gz", np.zeros((4, 4, 2, 3), np.uint8))
    with pytest.raises(DataError, match="a.nii.gz: a 4D volume"):
        _build(tmp_path / "f", data_format="folder")
