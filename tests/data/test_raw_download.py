"""`kvseg train --data <a Kvasir-SEG folder as downloaded>` trains (issue 22): JPEG masks of
0/255 with compression artefacts are read as one class (>= 128), said in one warning."""

from __future__ import annotations

import logging

import numpy as np
import yaml
from PIL import Image

from data.make import discs
from kvseg import cli
from kvseg.data import build_dataset, detect_layout


def fake_kvasir(root, n=6, shape=(60, 72)):
    """Kvasir-SEG as unpacked: ``images/NAME.jpg`` (RGB) and ``masks/NAME.jpg`` (an RGB JPEG
    of a 0/255 polyp mask, artefacts and all), no dataset.yaml."""
    for i in range(n):
        lab = discs(shape, 1, i)
        x = (lab * 120 + 60).astype(np.uint8)
        for sub, arr in (("images", np.stack([x, x // 2, 255 - x], -1)),
                         ("masks", np.repeat((lab * 255).astype(np.uint8)[..., None], 3, -1))):
            (root / sub).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(root / sub / f"cju{i:03d}.jpg", quality=75)
    return root


def test_the_raw_download_reads_as_one_binary_class(tmp_path, caplog):
    root = fake_kvasir(tmp_path / "Kvasir-SEG")
    masks = np.array(Image.open(root / "masks" / "cju001.jpg").convert("L"))
    assert len(np.unique(masks)) > 8  # artefacts: not 0/255 (the old "values up to 255" error)
    assert detect_layout(root) == "folder"
    with caplog.at_level(logging.WARNING):
        ds = build_dataset({"data": str(root), "img_size": 32, "n_folds": 2}, "all")
    assert ds.classes == ("class_1",) and ds.task == "multilabel" and ds.in_channels == 3
    said = [r.getMessage() for r in caplog.records if "near 0/255" in r.getMessage()]
    assert len(said) == 1 and str(root / "masks") in said[0] and ">= 128" in said[0]
    for i in range(6):  # the drawn polyp, to the pixel (JPEG artefacts stay below 128)
        np.testing.assert_array_equal(ds.full_mask(f"cju{i:03d}")[0], discs((60, 72), 1, i))


def test_kvseg_train_on_the_raw_download_trains(tmp_path, capsys):
    root = fake_kvasir(tmp_path / "Kvasir-SEG")
    out = tmp_path / "run"
    rc = cli.main(["train", "--data", str(root), "--model", "setr_kv", "--size", "micro",
                   "--img-size", "32", "--epochs", "1", "--batch-size", "2", "--n-folds", "2",
                   "--max-steps-per-epoch", "1", "--device", "cpu", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["classes"] == ["class_1"] and cfg["in_channels"] == 3
    assert (out / "best.safetensors").is_file()
    assert len((out / "metrics.csv").read_text().splitlines()) == 2  # header + one epoch
