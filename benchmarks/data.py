"""Data-loading throughput: slices/s through a DataLoader, cold (PNG + RLE decode) vs cached.

Targets (issue 3): cached >= 5x cold, and the cached loader >= 5x faster than a SETR-base
training step consumes slices on the same machine (so an accelerator would never wait).

Also (the GPU-path issue): the augmented cached loader per DataLoader worker count (persistent
workers, steady state), a micro model's CPU training speed per worker count (what ``workers:
auto`` should be on the CPU), and the H100 estimate: the slices/s a base model would consume at
a stated fraction of the H100's dense bf16 peak, against what one worker delivers here.

    python benchmarks/data.py                      # synthetic twin (8 cases x 2 days x 32)
    python benchmarks/data.py --root /path/to/uw   # a real UW-Madison download
    python benchmarks/data.py --only-workers       # the worker sweep, CPU grid, H100 estimate

Prints a table and writes ``benchmarks/results/data.json`` (``data_workers.json`` with
``--only-workers``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from kvseg.data import UWMadison
from kvseg.data.synth import generate
from kvseg.inference.profile import time_fn
from kvseg.utils import atomic_write_text


def loader_rate(ds, workers: int, batch_size: int, passes: int) -> tuple[float, float]:
    """Slices/s of the first shuffled pass (worker start-up included) and the best later pass
    (persistent workers: the steady state a multi-epoch training sees)."""
    g = torch.Generator().manual_seed(0)
    dl = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers, generator=g,
                    persistent_workers=workers > 0)
    seen = []

    def one_pass():
        seen.append(sum(batch["image"].shape[0] for batch in dl))

    times_ms = time_fn(one_pass, repeats=passes, warmup=0).times_ms
    rates = [n / (ms / 1e3) for n, ms in zip(seen, times_ms, strict=True)]
    return rates[0], max(rates[1:], default=rates[0])


def _index_all(ds) -> None:
    """Every item of ``ds`` once, in order, without a DataLoader (each dropped at once)."""
    for i in range(len(ds)):
        ds[i]


class _Constant(torch.utils.data.Dataset):
    """The same item over and over: the DataLoader's own cost (collate + worker -> main IPC)."""

    def __init__(self, item: dict, n: int) -> None:
        self.item, self.n = item, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return dict(self.item)


def worker_sweep(ds, worker_counts: list[int], batch_size: int, passes: int) -> list[dict]:
    """Steady-state slices/s of ``ds`` through persistent DataLoader workers, per count."""
    rows = []
    for w in worker_counts:
        _, rate = loader_rate(ds, w, batch_size, passes)
        rows.append({"workers": w, "slices_per_s": rate,
                     "per_worker": rate / w if w else rate})
    return rows


def train_rate(root: Path, cache_dir: Path, workers: int, threads: int, img_size: int,
               steps: int) -> dict:
    """A micro model (setr_kv) trained by ``kvseg.training.train`` on the CPU with
    ``workers`` loader workers and ``threads`` torch threads: optimiser steps/s over ``steps``
    steps (batch 8,
    augmentation on)."""
    from kvseg.training.train import load_config, train

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="kvseg-bench-train-") as out:
        config = load_config(None, dict(
            model="setr_kv", size="micro", img_size=img_size, data=str(root),
            cache_dir=str(cache_dir), out=str(Path(out) / "run"), epochs=1, batch_size=8,
            max_steps_per_epoch=steps, workers=workers, device="cpu", seed=0))
        summary = train(config, progress=False)
    torch.set_num_threads(before)
    return {"workers": workers, "threads": threads, "steps": summary["steps"],
            "steps_per_s": summary["steps"] / summary["train_seconds"]}


#: NVIDIA H100 SXM dense bf16 tensor-core peak (FLOP/s), without sparsity.
H100_BF16_PEAK = 989e12


def h100_estimate(model: str, img_size: int, in_channels: int, fraction: float) -> dict:
    """Slices/s a ``model`` (base) trains at on an H100 at ``fraction`` of the bf16 peak:
    forward MACs (kvseg.inference.profile) x 2 FLOP x 3 (forward + backward)."""
    from kvseg.inference.profile import build_on_meta, count_macs

    net = build_on_meta(model, size="base", img_size=img_size, in_channels=in_channels)
    macs = count_macs(net, (1, in_channels, img_size, img_size))
    flops = 2 * 3 * macs
    return {"model": model, "size": "base", "img_size": img_size, "in_channels": in_channels,
            "gmacs_forward": macs / 1e9, "train_gflop_per_slice": flops / 1e9,
            "peak_tflops": H100_BF16_PEAK / 1e12, "fraction_of_peak": fraction,
            "slices_per_s": fraction * H100_BF16_PEAK / flops}


def model_rate(img_size: int, in_channels: int, batch_size: int, steps: int) -> dict | None:
    """Slices/s consumed by SETR-base (setr_qkv) forward + backward + AdamW step on CPU."""
    try:
        import kvseg

        model = kvseg.create_model("setr_qkv", size="base", img_size=img_size,
                                   in_channels=in_channels)
    except Exception as e:  # the model may not exist yet; report instead of failing
        return {"error": f"{type(e).__name__}: {e}"}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.rand(batch_size, in_channels, img_size, img_size)
    y = (torch.rand(batch_size, 3, img_size, img_size) > 0.5).float()

    def step():
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    # the untimed first step warms up allocators and kernels
    step_s = time_fn(step, repeats=steps, warmup=1).median_ms / 1e3
    return {"batch_size": batch_size, "step_s": step_s, "slices_per_s": batch_size / step_s,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", help="UW-Madison root (default: a fresh synthetic twin)")
    ap.add_argument("--img-size", type=int, default=256)
    ap.add_argument("--contexts", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--passes", type=int, default=4, help="passes per cached loader")
    ap.add_argument("--model-batch", type=int, default=2)
    ap.add_argument("--model-steps", type=int, default=3)
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--worker-counts", type=int, nargs="+", default=[0, 1, 2],
                    help="DataLoader workers to sweep for the augmented cached loader")
    ap.add_argument("--train-img-size", type=int, default=128)
    ap.add_argument("--train-steps", type=int, default=30,
                    help="steps of the micro-model CPU training per worker count (0: skip)")
    ap.add_argument("--train-threads", type=int, nargs="+", default=[1, 2],
                    help="torch threads of the micro-model CPU training")
    ap.add_argument("--train-workers", type=int, nargs="+", default=[0, 1],
                    help="DataLoader workers of the micro-model CPU training")
    ap.add_argument("--train-reps", type=int, default=2,
                    help="interleaved repetitions of the (threads, workers) grid")
    ap.add_argument("--only-workers", action="store_true",
                    help="skip the cold/cached table and the SETR-base step: only the worker "
                         "sweep, the CPU training grid and the H100 estimate")
    ap.add_argument("--h100-fraction", type=float, default=0.4,
                    help="fraction of the H100 bf16 peak a base model is assumed to reach")
    ap.add_argument("--out", help="JSON file (default: benchmarks/results/data.json, or "
                                  "data_workers.json with --only-workers)")
    args = ap.parse_args()
    if args.out is None:
        name = "data_workers.json" if args.only_workers else "data.json"
        args.out = str(Path(__file__).parent / "results" / name)

    with tempfile.TemporaryDirectory(prefix="kvseg-bench-") as tmp:
        root = Path(args.root) if args.root else Path(tmp) / "synth"
        synth_s = None
        if not args.root:
            t0 = time.perf_counter()
            generate(root, cases=8, days=2, slices=32, seed=0)
            synth_s = time.perf_counter() - t0
        rows = []
        for context in [] if args.only_workers else args.contexts:
            common = dict(split="all", img_size=args.img_size, context=context)
            cold_ds = UWMadison(root, cache=False, **common)
            _, cold = loader_rate(cold_ds, args.workers, args.batch_size, 2)
            cache_dir = Path(tmp) / f"cache-{context}"
            t0 = time.perf_counter()
            cached_ds = UWMadison(root, cache=True, cache_dir=cache_dir, **common)
            build_s = time.perf_counter() - t0
            first, cached = loader_rate(cached_ds, args.workers, args.batch_size, args.passes)
            aug_ds = UWMadison(root, cache=True, cache_dir=cache_dir, augment=True,
                               **{**common, "split": "train", "n_folds": 5})
            _, cached_aug = loader_rate(aug_ds, args.workers, args.batch_size, args.passes)
            _, ceiling = loader_rate(_Constant(cached_ds[0], len(cached_ds)), args.workers,
                                     args.batch_size, args.passes)
            index_all = time_fn(lambda ds=cached_ds: _index_all(ds), repeats=1, warmup=0)
            in_process = len(cached_ds) / (index_all.median_ms / 1e3)
            rows.append(dict(context=context, slices=len(cold_ds), cold=cold,
                             cache_build_s=build_s, cached_first_pass=first, cached=cached,
                             cached_augment=cached_aug, loader_ceiling=ceiling,
                             cached_in_process=in_process, speedup=cached / cold))
        aug_ds = UWMadison(root, cache=True, cache_dir=Path(tmp) / "cache-0", augment=True,
                           split="train", n_folds=5, img_size=args.img_size, context=0)
        sweep = worker_sweep(aug_ds, args.worker_counts, args.batch_size, args.passes)
        training = [train_rate(root, Path(tmp) / "cache-train", w, t, args.train_img_size,
                               args.train_steps) | {"rep": r}
                    for r in range(args.train_reps) for t in args.train_threads
                    for w in args.train_workers] if args.train_steps else []
        model = None if args.skip_model or args.only_workers else model_rate(
            args.img_size, 1, args.model_batch, args.model_steps)
    h100 = [h100_estimate(m, args.img_size, 3, args.h100_fraction)
            for m in ("setr_kv", "setr_conv_kv", "setr_cvt_kv")]

    if rows:
        print(f"data loading, img_size {args.img_size}, {args.workers} DataLoader workers, "
              f"batch {args.batch_size} ({os.cpu_count()} CPUs)")
        print("slices/s; 'first' includes DataLoader worker start-up, the others are steady "
              "state")
        print("ceiling: a dataset returning one fixed item (collate + IPC only); in-process: "
              "the cached dataset indexed without a DataLoader")
        print(f"{'context':>7} {'slices':>6} {'cold/s':>7} {'build s':>7} {'first/s':>7} "
              f"{'cached/s':>8} {'+augment/s':>10} {'ceiling/s':>9} {'in-proc/s':>9} "
              f"{'cached/cold':>11}")
    for r in rows:
        print(f"{r['context']:>7} {r['slices']:>6} {r['cold']:>7.0f} {r['cache_build_s']:>7.1f} "
              f"{r['cached_first_pass']:>7.0f} {r['cached']:>8.0f} {r['cached_augment']:>10.0f} "
              f"{r['loader_ceiling']:>9.0f} {r['cached_in_process']:>9.0f} "
              f"{r['speedup']:>10.1f}x")
    if model and "slices_per_s" in model:
        for r in rows:
            r["cached_vs_setr_base"] = r["cached"] / model["slices_per_s"]
            r["cached_augment_vs_setr_base"] = r["cached_augment"] / model["slices_per_s"]
        print(f"SETR-base (setr_qkv, {model['params_m']:.0f}M params) training step on CPU: "
              f"{model['step_s']:.2f} s per batch of {model['batch_size']} = "
              f"{model['slices_per_s']:.2f} slices/s; cached loader is "
              + ", ".join(f"{r['cached_vs_setr_base']:.0f}x (context {r['context']})"
                          for r in rows) + " faster")
    elif model:
        print(f"SETR-base comparison skipped: {model['error']}")
    print(f"augmented cached loader (context 0, img_size {args.img_size}), persistent workers:")
    for r in sweep:
        print(f"  {r['workers']} worker(s): {r['slices_per_s']:7.0f} slices/s "
              f"({r['per_worker']:.0f} per worker)")
    for r in training:
        print(f"setr_kv micro {args.train_img_size} px CPU training (rep {r['rep']}), "
              f"{r['threads']} thread(s), {r['workers']} worker(s): {r['steps_per_s']:.2f} "
              "steps/s")
    one = next((r["slices_per_s"] for r in sweep if r["workers"] == 1), None)
    for e in h100:
        need = e["slices_per_s"]
        text = (f"H100 estimate, {e['model']} base {e['img_size']} px: {e['gmacs_forward']:.1f} "
                f"GMAC x 6 = {e['train_gflop_per_slice']:.0f} GFLOP/slice; at "
                f"{e['fraction_of_peak']:.0%} of {e['peak_tflops']:.0f} TFLOP/s -> "
                f"{need:.0f} slices/s")
        if one:
            e["workers_needed_at_measured_rate"] = need / one
            text += f" = {need / one:.1f} workers at this CPU's {one:.0f} slices/s per worker"
        print(text)
    result = dict(img_size=args.img_size, workers=args.workers, batch_size=args.batch_size,
                  cpus=os.cpu_count(), machine=platform.machine(), torch=torch.__version__,
                  dataset=str(args.root) if args.root else "synth cases=8 days=2 slices=32",
                  synth_generate_s=synth_s, rows=rows, setr_base=model,
                  augment_worker_sweep=sweep, cpu_training_per_workers=training,
                  h100_estimate=h100, load_avg_at_end=os.getloadavg())
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
