"""The UW-Madison reader on the synthetic twin: read-back, items, exclude, augment, CSV."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from kvseg.data import CLASSES, UWMadison, load_png
from kvseg.data.synth import render_scan, scan_layout
from kvseg.data.transforms import prepare_slices, resize_mask

TINY = dict(cases=3, days=1, slices=8, seed=0)  # as tests/data/conftest.py's tiny_synth


def test_synth_read_back_equals_the_generator_volumes(tiny_synth):
    ds = UWMadison(tiny_synth, split="all", img_size=48)
    specs = scan_layout(**TINY)
    assert len(ds) == sum(s.num_slices for s in specs)
    by_id = {r.id: r for r in ds.records}
    volumes = {spec.scan_id: render_scan(spec, TINY["seed"]) for spec in specs}
    saw_non_square = False
    for spec in specs:
        image, masks = volumes[spec.scan_id]
        for k in range(spec.num_slices):
            rec = by_id[f"{spec.scan_id}_slice_{k + 1:04d}"]
            assert (rec.width, rec.height, rec.spacing) == (spec.width, spec.height, spec.spacing)
            raw = load_png(rec.path)
            assert raw.dtype == np.uint16 and raw.shape == (spec.height, spec.width)
            np.testing.assert_array_equal(raw, image[k])
            np.testing.assert_array_equal(ds.full_mask(rec.id), masks[k])
            saw_non_square |= spec.width != spec.height
    assert saw_non_square
    # items (through the cache) hold the resized generator masks and the prepared image
    assert sum(ds.full_mask(r.id).any() for r in ds.records) > 0
    for i in range(0, len(ds), 3):
        item = ds[i]
        spec = next(s for s in specs if s.scan_id == f"case{item['case']}_day{item['day']}")
        image, masks = volumes[spec.scan_id]
        k = item["slice"] - 1
        assert torch.equal(item["mask"], resize_mask(masks[k], 48))
        assert torch.allclose(item["image"], prepare_slices(image[k][None], 48),
                              atol=2e-5, rtol=0)
        assert (item["height"], item["width"]) == (spec.height, spec.width)


def test_item_types_and_default_collate(tiny_synth):
    ds = UWMadison(tiny_synth, split="train", n_folds=3, img_size=32, context=1)
    item = ds[0]
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 32, 32)
    assert item["mask"].dtype == torch.float32 and item["mask"].shape == (len(CLASSES), 32, 32)
    assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert isinstance(item["id"], str) and isinstance(item["spacing"], float)
    for key in ("case", "day", "slice", "height", "width"):
        assert isinstance(item[key], int)
    batch = next(iter(DataLoader(ds, batch_size=4, num_workers=2)))
    assert batch["image"].shape == (4, 3, 32, 32) and len(batch["id"]) == 4
    assert batch["id"] == [ds.records[i].id for i in range(4)]


def test_exclude_scans_and_cases(tiny_synth, caplog):
    full = UWMadison(tiny_synth, split="all", img_size=16)
    scans = sorted({r.scan_id for r in full.records})
    ds = UWMadison(tiny_synth, split="all", img_size=16, exclude=[scans[0]])
    assert scans[0] not in {r.scan_id for r in ds.records}
    assert len(ds) == len(full) - 8
    case = full.records[-1].case
    assert case not in {r.case for r in UWMadison(tiny_synth, split="all", img_size=16,
                                                  exclude=[case]).records}
    assert len(UWMadison(tiny_synth, split="all", img_size=16, exclude="bad")) == len(full)
    with caplog.at_level(logging.WARNING):
        UWMadison(tiny_synth, split="all", img_size=16, exclude=["case999_day1"])
    assert "case999_day1" in caplog.text
    with pytest.raises(ValueError, match="exclude entry"):
        UWMadison(tiny_synth, split="all", img_size=16, exclude=["stomach"])


def test_augment_only_on_train_and_seeded(tiny_synth):
    plain = UWMadison(tiny_synth, split="train", n_folds=3, img_size=32)
    aug = UWMadison(tiny_synth, split="train", n_folds=3, img_size=32, augment=True)
    torch.manual_seed(0)
    a = [aug[i]["image"] for i in range(4)]
    torch.manual_seed(0)
    b = [aug[i]["image"] for i in range(4)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert any(not torch.equal(x, plain[i]["image"]) for i, x in enumerate(a))
    val = UWMadison(tiny_synth, split="val", n_folds=3, img_size=32, augment=True)
    ref = UWMadison(tiny_synth, split="val", n_folds=3, img_size=32)
    assert torch.equal(val[0]["image"], ref[0]["image"])


def test_train_csv_with_a_byte_order_mark_reads(tiny_synth):
    csv_path = tiny_synth / "train.csv"
    plain = UWMadison(tiny_synth, split="all", img_size=8, cache=False)
    csv_path.write_bytes(b"\xef\xbb\xbf" + csv_path.read_bytes())  # as Excel saves it
    with_bom = UWMadison(tiny_synth, split="all", img_size=8, cache=False)
    assert with_bom.ids == plain.ids
