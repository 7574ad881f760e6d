"""The UW-Madison reader on the synthetic twin: read-back, folds, context, exclude, cache."""

from __future__ import annotations

import logging
import multiprocessing as mp

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from kvseg.data import BAD_SCANS, CLASSES, UWMadison, load_png, parse_slice_path
from kvseg.data.synth import generate, render_scan, scan_layout
from kvseg.data.transforms import prepare_slices, resize_mask

TINY = dict(cases=3, days=1, slices=8, seed=0)  # as tests/data/conftest.py's tiny_synth


def test_parse_slice_path_is_width_first():
    info = parse_slice_path("x/train/case131/case131_day0/scans/slice_0066_360_310_1.50_1.50.png")
    assert (info.case, info.day, info.slice) == (131, 0, 66)
    assert (info.width, info.height, info.spacing) == (360, 310, 1.5)
    assert info.id == "case131_day0_slice_0066"
    info = parse_slice_path("case118/case118_day0/scans/slice_0031_276_276_1.63_1.63.png")
    assert (info.width, info.height, info.spacing) == (276, 276, 1.63)


def test_bad_scans_are_the_authors_twelve():
    assert len(BAD_SCANS) == len(set(BAD_SCANS)) == 12
    assert {"case7_day0", "case81_day30", "case43_day18", "case138_day0"} <= set(BAD_SCANS)


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


def test_folds_are_grouped_by_case_disjoint_and_deterministic(tiny_synth):
    cases = {r.case for r in UWMadison(tiny_synth, split="all", img_size=16).records}
    seen = set()
    for fold in range(3):
        val = UWMadison(tiny_synth, split="val", fold=fold, n_folds=3, img_size=16)
        train = UWMadison(tiny_synth, split="train", fold=fold, n_folds=3, img_size=16)
        val_cases, train_cases = {r.case for r in val.records}, {r.case for r in train.records}
        assert val_cases and train_cases and not val_cases & train_cases
        assert val_cases | train_cases == cases
        assert not val_cases & seen
        seen |= val_cases
        again = UWMadison(tiny_synth, split="val", fold=fold, n_folds=3, img_size=16)
        assert again.ids == val.ids
    assert seen == cases


def test_context_stacks_neighbours_by_slice_id_with_edge_repetition(tiny_synth):
    k = 2
    ds = UWMadison(tiny_synth, split="all", img_size=24, context=k)
    single = UWMadison(tiny_synth, split="all", img_size=24, context=0)
    index = {r.id: i for i, r in enumerate(single.records)}
    for i in range(len(ds)):
        item = ds[i]
        n = 8  # slices per scan in TINY
        scan = f"case{item['case']}_day{item['day']}"
        expected = [f"{scan}_slice_{min(max(item['slice'] + o, 1), n):04d}"
                    for o in range(-k, k + 1)]
        assert ds.neighbour_ids(item["id"]) == expected
        assert item["image"].shape[0] == 2 * k + 1
        for c, sid in enumerate(expected):
            assert torch.equal(item["image"][c], single[index[sid]]["image"][0]), (item["id"], c)
        assert torch.equal(item["mask"], single[index[item["id"]]]["mask"])


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


def test_uncached_items_equal_cached_items(tiny_synth):
    cached = UWMadison(tiny_synth, split="all", img_size=40, context=1)
    raw = UWMadison(tiny_synth, split="all", img_size=40, context=1, cache=False)
    assert raw.cache is None
    for i in range(0, len(raw), 5):
        assert torch.equal(cached[i]["image"], raw[i]["image"])
        assert torch.equal(cached[i]["mask"], raw[i]["mask"])


def test_cache_hit_reuses_files(tiny_synth, tmp_path):
    first = UWMadison(tiny_synth, split="all", img_size=32, cache_dir=tmp_path / "c")
    assert first.cache.built
    stamp = first.cache.images_path.stat().st_mtime_ns
    second = UWMadison(tiny_synth, split="val", n_folds=3, img_size=32, context=2,
                       cache_dir=tmp_path / "c")
    assert not second.cache.built
    assert second.cache.images_path == first.cache.images_path
    assert second.cache.images_path.stat().st_mtime_ns == stamp
    other_size = UWMadison(tiny_synth, split="all", img_size=24, cache_dir=tmp_path / "c")
    assert other_size.cache.built and other_size.cache.key != first.cache.key
    assert (tiny_synth / ".kvseg_cache").exists() is False  # cache_dir honoured


def test_stale_cache_is_rebuilt_when_the_csv_changes(tiny_synth):
    first = UWMadison(tiny_synth, split="all", img_size=32)
    rec = next(r for r in first.records if any(r.rles))
    cls = next(c for c, rle in zip(CLASSES, rec.rles, strict=True) if rle)
    i = first.ids.index(rec.id)
    assert first[i]["mask"][CLASSES.index(cls)].sum() > 0
    lines = (tiny_synth / "train.csv").read_text().splitlines()
    lines = [f"{rec.id},{cls}," if line.startswith(f"{rec.id},{cls},") else line
             for line in lines]
    (tiny_synth / "train.csv").write_text("\n".join(lines) + "\n")
    second = UWMadison(tiny_synth, split="all", img_size=32)
    assert second.cache.built and second.cache.key != first.cache.key
    assert not first.cache.images_path.exists()  # superseded cache removed
    assert second[i]["mask"][CLASSES.index(cls)].sum() == 0


def _corrupt_truncate(cache):
    data = cache.images_path.read_bytes()
    cache.images_path.write_bytes(data[: len(data) // 2])


def _corrupt_overwrite(cache):
    data = bytearray(cache.masks_path.read_bytes())
    data[200:] = bytes(len(data) - 200)  # same size, content zeroed after the header
    cache.masks_path.write_bytes(bytes(data))


def _corrupt_meta(cache):
    cache.meta_path.write_text("{not json")


@pytest.mark.parametrize("corrupt", [_corrupt_truncate, _corrupt_overwrite, _corrupt_meta])
def test_corrupt_cache_is_detected_and_rebuilt(tiny_synth, corrupt, caplog):
    first = UWMadison(tiny_synth, split="all", img_size=32)
    expected = [first[i]["mask"] for i in range(len(first))]
    corrupt(first.cache)
    with caplog.at_level(logging.WARNING):
        second = UWMadison(tiny_synth, split="all", img_size=32)
    assert second.cache.built
    assert "rebuilding" in caplog.text
    for i in range(len(second)):
        assert torch.equal(second[i]["mask"], expected[i])


def _construct(root, queue):
    torch.set_num_threads(1)
    ds = UWMadison(root, split="all", img_size=32, context=1)
    queue.put((ds.cache.built, ds[5]["image"].sum().item()))


def test_two_processes_building_the_cache_at_once(tiny_synth):
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_construct, args=(tiny_synth, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sum(built for built, _ in results) == 1
    assert results[0][1] == results[1][1]
    assert not list((tiny_synth / ".kvseg_cache").glob("*.tmp"))


def test_exclude_never_moves_other_cases_between_folds(tmp_path):
    root = tmp_path / "uw5"
    generate(root, cases=5, days=1, slices=4, seed=3)
    cases = sorted({r.case for r in UWMadison(root, split="all", img_size=8, cache=False).records})
    for dropped in cases:
        for fold in range(2):
            full = UWMadison(root, split="val", fold=fold, n_folds=2, img_size=8, cache=False)
            full_val = {r.case for r in full.records}
            try:
                cut = UWMadison(root, split="val", fold=fold, n_folds=2, img_size=8, cache=False,
                                exclude=[dropped])
            except ValueError as e:  # the fold held only the dropped case
                assert "selects no slices" in str(e) and full_val == {dropped}
                continue
            assert {r.case for r in cut.records} == full_val - {dropped}


def test_train_csv_with_a_byte_order_mark_reads(tiny_synth):
    csv_path = tiny_synth / "train.csv"
    plain = UWMadison(tiny_synth, split="all", img_size=8, cache=False)
    csv_path.write_bytes(b"\xef\xbb\xbf" + csv_path.read_bytes())  # as Excel saves it
    with_bom = UWMadison(tiny_synth, split="all", img_size=8, cache=False)
    assert with_bom.ids == plain.ids
