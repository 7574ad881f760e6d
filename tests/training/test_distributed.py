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
from kvseg.inference.evaluate import evaluate_run
from kvseg.training.metrics import SegmentationMetrics


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


# --------------------------------------------------------------------------- rank 0 owns RUN_DIR
def test_an_explicit_gpu_index_is_refused_only_with_several_processes():
    from kvseg.errors import ConfigError
    from kvseg.training.distributed import DistInfo, check_device_option

    two = DistInfo(rank=1, world_size=2, local_rank=1, local_world_size=2)
    with pytest.raises(ConfigError, match=r"device=cuda:1: .*WORLD_SIZE=2"):
        check_device_option("cuda:1", two)
    for device in ("cuda", "auto", "cpu"):
        check_device_option(device, two)
    check_device_option("cuda:1", DistInfo())  # one process: cuda:N is the user's choice


def test_auto_workers_share_the_cores_of_a_node(monkeypatch):
    from kvseg.training.distributed import DistInfo, loader_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert loader_workers(None, "cpu", DistInfo()) == 0
    assert loader_workers(None, "cuda", DistInfo()) == 8  # 15 left, at most 8
    assert loader_workers(None, "cuda", DistInfo(world_size=4, local_world_size=4)) == 3
    assert loader_workers(None, "cuda", DistInfo(world_size=16, local_world_size=16)) == 1
    assert loader_workers(2, "cpu", DistInfo()) == 2  # a number is kept


def _collectives_worker(rank: int, store: str, results) -> None:
    from kvseg.training import distributed as D

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        state = {"weights": torch.arange(4.0), "epoch": 3} if rank == 0 else {"junk": 1}
        got = D.broadcast_object(state)
        low = D.all_reduce_min(torch.tensor([10 + rank, 5 - rank], dtype=torch.int64))
        results[rank] = (got["weights"].tolist(), got["epoch"], low.tolist())
    finally:
        dist.destroy_process_group()


def test_broadcast_object_and_min_reduce(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_collectives_worker, args=(str(tmp_path / "store"), results), nprocs=2, join=True)
    assert results[0] == results[1] == ([0.0, 1.0, 2.0, 3.0], 3, [10, 4])


PER_RANK_OUT = """
import os, sys
from kvseg import cli
args = sys.argv[1:]
i = args.index("--out") + 1
if os.environ["RANK"] != "0":  # another node's view: a different (empty) folder
    args[i] += "-rank" + os.environ["RANK"]
sys.exit(cli.main(args))
"""


@pytest.mark.slow
def test_only_rank_0_needs_to_see_the_run_folder(tmp_path):
    data, out = tmp_path / "data", tmp_path / "run"
    generate(data, cases=3, days=1, slices=6, seed=0)
    launcher = tmp_path / "per_rank_out.py"
    launcher.write_text(PER_RANK_OUT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(launcher), "train", "--model", "setr_kv", "--size", "micro", "--img-size", "32",
           "--data", str(data), "--out", str(out), "--epochs", "2", "--batch-size", "2",
           "--n-folds", "3", "--max-steps-per-epoch", "2", "--lr", "2e-3", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(*extra):
        return subprocess.run([*cmd, *extra], env=env, capture_output=True, text=True,
                              timeout=240)

    # epoch 1 only (the budget is spent at once), then resume: rank 1 cannot see last.ckpt
    proc = run("--time-budget-s", "1e-6")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(torch.load(out / "last.ckpt", weights_only=True)["history"]) == 1
    proc = run("--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(out / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 2 and len(ckpt["rng"]) == 2
    with open(out / "metrics.csv", newline="") as f:
        assert [int(r["steps"]) for r in csv.DictReader(f)] == [1, 3]
    # rank 1's own folder was never written (only rank 0 writes)
    rank1 = tmp_path / "run-rank1"
    assert not rank1.exists() or not any(rank1.iterdir())
    # a fresh start where rank 0 sees a run: every rank stops (no rank left in a collective)
    proc = run()
    assert proc.returncode != 0
    assert "already holds a run" in proc.stderr
