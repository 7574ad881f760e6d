"""The slice cache: hits, stale and corrupt caches, concurrent builds, unwritable folders."""

from __future__ import annotations

import logging
import multiprocessing as mp
import pickle

import numpy as np
import pytest
import torch

from kvseg.data import CLASSES, UWMadison
from kvseg.data.cache import SliceCache


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



def test_unwritable_cache_dir_says_how_to_fix_it(tmp_path, make_uw):
    root = make_uw(tmp_path / "uw")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match="cache_dir"):
        UWMadison(root, split="all", img_size=8, cache_dir=blocker / "cache")


def test_the_cache_serves_what_prepare_returned_and_pickles_without_it(tmp_path):
    files = []
    for k in range(3):
        files.append(tmp_path / f"f{k}.bin")
        files[-1].write_bytes(bytes([k]))
    (tmp_path / "index.txt").write_text("v1")

    def prepare(i):
        return np.full((4, 4), i * 1000, np.uint16), np.full((4, 4), i, np.uint8)

    cache = SliceCache(tmp_path, files, 4, prepare, hashed=("index.txt",), prefix="t")
    cache.ensure(threads=1)
    assert cache.built and cache.images_path.name.startswith("t-")
    image, packed = cache.get(2)
    assert image[0, 0] == 2000 and packed[3, 3] == 2
    clone = pickle.loads(pickle.dumps(cache))  # a DataLoader worker's copy: reads, never builds
    assert clone.get(1)[0][0, 0] == 1000
    (tmp_path / "index.txt").write_text("v2")  # the index file's bytes are in the key
    assert SliceCache(tmp_path, files, 4, prepare, hashed=("index.txt",)).key != cache.key
