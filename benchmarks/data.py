"""Data-loading throughput: slices/s through a DataLoader, cold (PNG + RLE decode) vs cached.

Targets (issue 3): cached >= 5x cold, and the cached loader >= 5x faster than a SETR-base
training step consumes slices on the same machine (so an accelerator would never wait).

    python benchmarks/data.py                      # synthetic twin (8 cases x 2 days x 32)
    python benchmarks/data.py --root /path/to/uw   # a real UW-Madison download

Prints a table and writes ``benchmarks/results/data.json``.
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
from kvseg.profile import time_fn
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
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "data.json"))
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="kvseg-bench-") as tmp:
        root = Path(args.root) if args.root else Path(tmp) / "synth"
        synth_s = None
        if not args.root:
            t0 = time.perf_counter()
            generate(root, cases=8, days=2, slices=32, seed=0)
            synth_s = time.perf_counter() - t0
        rows = []
        for context in args.contexts:
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
        model = None if args.skip_model else model_rate(args.img_size, 1, args.model_batch,
                                                        args.model_steps)

    print(f"data loading, img_size {args.img_size}, {args.workers} DataLoader workers, "
          f"batch {args.batch_size} ({os.cpu_count()} CPUs)")
    print("slices/s; 'first' includes DataLoader worker start-up, the others are steady state")
    print("ceiling: a dataset returning one fixed item (collate + IPC only); in-process: the "
          "cached dataset indexed without a DataLoader")
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
    result = dict(img_size=args.img_size, workers=args.workers, batch_size=args.batch_size,
                  cpus=os.cpu_count(), machine=platform.machine(), torch=torch.__version__,
                  dataset=str(args.root) if args.root else "synth cases=8 days=2 slices=32",
                  synth_generate_s=synth_s, rows=rows, setr_base=model)
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
