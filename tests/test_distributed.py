"""Two CPU processes (gloo): metric counts are reduced across ranks, and a torchrun training's
validation Jaccard equals a single-process evaluation of the same weights."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kvseg.data.synth import generate
from kvseg.evaluate import evaluate_run
from kvseg.metrics import SegmentationMetrics


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(10, 3, 8, 8, generator=g)
    target = (torch.rand(10, 3, 8, 8, generator=g) < 0.3).float()
    return logits, target


def _rank_worker(rank: int, store: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        logits, target = _data()
        m = SegmentationMetrics(3)
        m.update(logits[rank::2], target[rank::2])  # uneven shards: 5 + 5 of interleaved rows
        results[rank] = m.compute(sync=True)
    finally:
        dist.destroy_process_group()


def test_metric_counts_are_summed_across_ranks(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_rank_worker, args=(str(tmp_path / "store"), results), nprocs=2, join=True)
    logits, target = _data()
    single = SegmentationMetrics(3)
    single.update(logits, target)
    assert results[0] == results[1] == single.compute(sync=False)


@pytest.mark.slow
def test_torchrun_two_processes_validation_equals_single_process_eval(tmp_path):
    data, out = tmp_path / "data", tmp_path / "run"
    generate(data, cases=3, days=1, slices=6, seed=0)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "kvseg", "train", "--model", "setr_kv", "--size", "micro", "--img-size", "32",
           "--data", str(data), "--out", str(out), "--epochs", "1", "--batch-size", "2",
           "--n-folds", "3", "--max-steps-per-epoch", "3", "--lr", "2e-3", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # only rank 0 wrote: exactly one set of run files, no temporaries left behind
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["best.safetensors", "config.yaml", "curves.png", "last.ckpt", "metrics.csv"])
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and int(rows[0]["steps"]) == 3
    # one epoch: best.safetensors holds the weights that were validated
    res = evaluate_run(out, out=str(tmp_path / "eval.json"), device="cpu")
    for key in ("jaccard", "weighted_jaccard", "dice"):
        assert float(rows[0][key]) == pytest.approx(res["mean"][key], abs=1e-9), key
    ckpt = torch.load(out / "last.ckpt", map_location="cpu", weights_only=True)
    assert len(ckpt["rng"]) == 2  # one RNG state per rank
