"""Any dataset, every command: train, evaluate and predict on tiny folder datasets (binary and
multi-class, PNG / JPEG / TIFF, grayscale and RGB) and volumes (Synapse-like CT, ACDC-like MRI);
kvseg reproduce on folder datasets; the faults as one line naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from data.make import write_acdc, write_folder, write_synapse
from kvseg import cli
from kvseg.data import build_dataset
from kvseg.inference.evaluate import evaluate_run
from kvseg.inference.predict import predict
from kvseg.training.checkpoint import load_run
from kvseg.training.metrics import hd95, predicted_masks
from kvseg.training.train import load_config, train

DATASETS = {
    # name: (builder, context, task, classes, in_channels)
    "binary_png": (lambda r: write_folder(r, k=1, binary_255=True), 0, "multilabel",
                   ("class_1",), 1),
    "multiclass_rgb_tiff": (lambda r: write_folder(r, k=3, rgb=True, suffix=".tif",
                                                   spec={"classes": ["a", "b", "c"]}),
                            0, "multiclass", ("a", "b", "c"), 3),
    "per_class_jpeg": (lambda r: write_folder(r, k=2, per_class=True, suffix=".jpg"),
                                 0, "multilabel", ("class_1", "class_2"), 1),
    "synapse": (lambda r: write_synapse(r), 1, "multiclass", None, 3),
    "acdc": (lambda r: write_acdc(r), 1, "multiclass", ("rv", "myo", "lv"), 3),
}


def _opts(data: Path, out: Path, **kw) -> dict:
    opts = dict(model="setr_kv", size="micro", img_size=32, data=str(data), out=str(out),
                epochs=1, batch_size=2, n_folds=3, max_steps_per_epoch=2, lr=1e-3,
                device="cpu", seed=0)
    return {**opts, **kw}


@pytest.fixture(scope="module", params=list(DATASETS))
def trained(request, tmp_path_factory):
    name = request.param
    build, context, *_ = DATASETS[name]
    base = tmp_path_factory.mktemp(name)
    data = build(base / "data")
    summary = train(load_config(None, _opts(data, base / "run", context=context)))
    assert summary["steps"] == 2
    return name, data, base / "run"


def test_train_stores_the_datasets_task_classes_and_preprocessing(trained):
    name, data, run = trained
    _, context, task, classes, in_channels = DATASETS[name]
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["task"] == task and cfg["in_channels"] == in_channels
    if classes is not None:
        assert tuple(cfg["classes"]) == classes
    assert cfg["num_classes"] == len(cfg["classes"]) + (task == "multiclass")
    assert cfg["preprocess"]["window"] == ([-125.0, 275.0] if name == "synapse" else None)
    assert load_config(run / "config.yaml").task == task  # config.yaml stays a valid --config


def test_evaluate_reports_every_class_and_volume(trained, tmp_path):
    name, data, run = trained
    res = evaluate_run(run, out=tmp_path / "e.json", device="cpu", batch_size=3)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert list(res["per_class"]) == cfg["classes"] and res["task"] == cfg["task"]
    ds = build_dataset(cfg, "val", augment=False)
    assert res["n_slices"] == len(ds) and res["n_cases"] == len(ds.scans())
    assert [c["volume"] for c in res["cases"]] == list(ds.scans())
    assert [c["case"] for c in res["cases"]] == list(range(len(ds.scans())))
    assert 0 <= res["mean"]["jaccard"] <= 1
    assert json.loads((tmp_path / "e.json").read_text())["mean"] == res["mean"]


def test_per_volume_hd95_uses_the_volumes_own_spacing(trained):
    name, data, run = trained
    if name != "acdc":
        pytest.skip("one anisotropic volume set is enough")
    res = evaluate_run(run, device="cpu")
    model, cfg = load_run(run)
    ds = build_dataset(cfg, "val", augment=False)
    size = cfg["img_size"]
    for case, (vol, index) in zip(res["cases"], ds.scans().items(), strict=True):
        items = [ds[i] for i in index]
        with torch.no_grad():
            logits = model(torch.stack([it["image"] for it in items]))
        pred = predicted_masks(logits, "multiclass").numpy()
        target = torch.stack([it["mask"] for it in items])[:, 1:].numpy() > 0.5
        dz, dr, dc = items[0]["voxel_mm"].tolist()
        spacing = (dz, dr * items[0]["height"] / size, dc * items[0]["width"] / size)
        assert dz == 10.0
        for k, cls in enumerate(cfg["classes"]):
            want = hd95(pred[:, k], target[:, k], spacing)
            got = case["hd95_mm"][cls]
            assert (got is None and np.isnan(want)) or got == pytest.approx(want), (vol, cls)


def test_predict_writes_masks_for_every_image_of_the_dataset(trained, tmp_path, capsys):
    name, data, run = trained
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    out = tmp_path / "pred"
    rc = cli.main(["predict", "--run", str(run), "--input", str(data), "--out", str(out),
                   "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    k = len(cfg["classes"])
    if name in ("synapse", "acdc"):
        masks = sorted(out.glob("masks/**/*.nii.gz"))
        images = [p for p in data.rglob("*.nii.gz") if "label" not in str(p.parent)
                  and not p.name.endswith(("_gt.nii.gz", "_4d.nii.gz"))]
        assert len(masks) == len(images)
        img = nib.load(str(masks[0]))
        src = next(p for p in images if p.name == masks[0].name)
        assert img.shape == nib.load(str(src)).shape
        np.testing.assert_allclose(img.affine, nib.load(str(src)).affine)
        assert np.asanyarray(img.dataobj).max() <= k
        assert not (out / "submission.csv").exists()
    else:
        masks = sorted((out / "masks").glob("*.png"))
        assert [p.stem for p in masks] == sorted(p.stem for p in (data / "images").iterdir())
        png = np.asarray(Image.open(masks[0]))
        src = next((data / "images").glob(f"{masks[0].stem}.*"))
        assert png.shape == Image.open(src).size[::-1]
        top = k if cfg["task"] == "multiclass" else 2 ** k - 1
        assert png.max() <= top and (out / "submission.csv").is_file()
        assert (out / "overlays" / masks[0].name).is_file()


TINY = {"seeds": [0], "latency_repeats": 2, "latency_warmup": 1, "num_samples": 2, "threads": 1,
        "train": {"size": "micro", "img_size": 32, "n_folds": 3, "epochs": 1,
                  "max_steps_per_epoch": 2, "batch_size": 2, "lr": 2e-3}}


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 3])
def test_reproduce_and_predict_on_a_folder_dataset(tmp_path, capsys, k):
    data = write_folder(tmp_path / "data", k=k, n=6)
    preset = tmp_path / "tiny.yaml"
    preset.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "out"
    rc = cli.main(["reproduce", "--data", str(data), "--out", str(out), "--preset", str(preset),
                   "--models", "setr_kv", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    rows = json.loads((out / "results.json").read_text())
    assert rows[0]["model"] == "setr_kv" and 0 <= rows[0]["jaccard"] <= 1
    assert len(rows[0]["cases"]) == len(build_dataset(
        {"data": str(data), "n_folds": 3, "img_size": 32}, "val").scans())
    run = out / "runs" / "setr_kv" / "seed0"
    summary = predict(run, data, tmp_path / "pred", device="cpu")
    assert summary.slices == 6
    assert len(list((tmp_path / "pred" / "masks").glob("*.png"))) == 6


def test_a_folder_no_layout_knows_and_data_faults_are_one_line(tmp_path, capsys):
    data = write_folder(tmp_path / "data", k=2, spec={"classes": ["a", "b"]})
    (data / "masks" / "img03.png").unlink()
    for argv in (["train", "--model", "setr_kv", "--size", "micro", "--data", str(data),
                  "--out", str(tmp_path / "r"), "--device", "cpu"],
                 ["reproduce", "--data", str(data), "--out", str(tmp_path / "o"),
                  "--device", "cpu"]):
        rc = cli.main(argv)
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1, err
        assert "images/img03.png: no mask for this image" in err, err
    empty = tmp_path / "empty"
    empty.mkdir()
    rc = cli.main(["reproduce", "--data", str(empty), "--out", str(tmp_path / "o2")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "not a dataset folder kvseg knows" in err and len(err.splitlines()) == 1
