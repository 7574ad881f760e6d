"""CPU bf16 autocast vs fp32: training speed and validation Jaccard of three micro models.

Each of setr_kv, setr_conv_kv and setr_cvt_kv (micro, 128 px) is trained by
``kvseg.training.train`` on the synthetic twin for the same fixed number of optimiser steps (3
epochs x 80 steps of batch 4,
lr 1e-3, Dice weight 2, no augmentation), once with ``amp: none`` (fp32)
and once with ``amp: bf16`` (``torch.autocast("cpu", dtype=torch.bfloat16)``), same seed, one
torch thread. Reported per model and precision:

- ``step_ms``: the median of timed training steps (forward, loss, backward, AdamW) on a fixed
  batch, the robust speed figure on a shared machine (a descheduled moment moves the median
  little);
- ``train_steps_per_s``: steps / wall-clock seconds of the whole training loop (data included);
- ``cpu_s``: process CPU seconds of the run (training and validation);
- ``jaccard``: validation Jaccard of the final epoch (fold 0 of 5, the full validation split,
  evaluated in the run's own precision, as training validates).

    python benchmarks/amp_cpu.py                 # about 4 minutes on one core
    python benchmarks/amp_cpu.py --epochs 1      # quicker, noisier scores

Prints a table and writes ``benchmarks/results/amp_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from bench_common import machine
from kvseg.data.synth import generate
from kvseg.inference.profile import time_fns
from kvseg.training.precision import autocast
from kvseg.utils import atomic_write_text

MODELS = ("setr_kv", "setr_conv_kv", "setr_cvt_kv")
PRECISIONS = {"fp32": "none", "bf16": "bf16"}


def step_ms(model_name: str, img_size: int, batch_size: int, repeats: int) -> dict[str, float]:
    """Median ms of one training step (forward under autocast, BCE+Dice, backward, AdamW) per
    precision, timed round-robin so that load from other processes hits both alike."""
    import kvseg
    from kvseg.training.losses import BCEDiceLoss

    x = torch.rand(batch_size, 1, img_size, img_size)
    y = (torch.rand(batch_size, 3, img_size, img_size) > 0.7).float()
    cpu = torch.device("cpu")
    loss_fn = BCEDiceLoss(1.0, 2.0)
    steps = {}
    for precision in PRECISIONS:
        torch.manual_seed(0)
        model = kvseg.create_model(model_name, size="micro", img_size=img_size, in_channels=1)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step(model=model, opt=opt, precision=precision):
            with autocast(cpu, precision):
                logits = model(x)
            loss = loss_fn(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        steps[precision] = step
    return {k: t.median_ms for k, t in time_fns(steps, repeats=repeats, warmup=2).items()}


def train_run(model_name: str, precision: str, data: Path, cache: Path, args) -> dict:
    """Train ``args.epochs`` x ``args.steps_per_epoch`` steps in ``precision``; the summary
    figures of the run."""
    from kvseg.training.train import load_config, train

    with tempfile.TemporaryDirectory(prefix="kvseg-amp-") as out:
        config = load_config(None, dict(
            model=model_name, size="micro", img_size=args.img_size, data=str(data),
            cache_dir=str(cache), out=str(Path(out) / "run"), epochs=args.epochs,
            val_every=args.epochs, max_steps_per_epoch=args.steps_per_epoch,
            batch_size=args.batch_size, lr=1e-3,
            warmup_epochs=0.1, dice_weight=2.0, augment=False, amp=PRECISIONS[precision],
            device="cpu", seed=args.seed, workers=0))
        cpu0 = time.process_time()
        summary = train(config, progress=False)
        cpu_s = time.process_time() - cpu0
    last = summary["history"][-1]
    return {"steps": summary["steps"],
            "train_steps_per_s": summary["steps"] / summary["train_seconds"],
            "cpu_s": cpu_s, "jaccard": last["jaccard"], "val_loss": last["val_loss"],
            "train_loss": last["train_loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--img-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--steps-per-epoch", type=int, default=80,
                    help="optimiser steps per epoch (the training split has 96 batches of 4)")
    ap.add_argument("--repeats", type=int, default=10, help="timed steps for step_ms")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "amp_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvseg-amp-data-") as tmp:
        data = Path(tmp) / "synth"
        generate(data, cases=8, days=2, slices=32, seed=0)
        for name in args.models:
            medians = step_ms(name, args.img_size, args.batch_size, args.repeats)
            for precision in PRECISIONS:
                row = {"model": name, "precision": precision, "step_ms": medians[precision]}
                row.update(train_run(name, precision, data, Path(tmp) / "cache", args))
                rows.append(row)
                print(f"{name:<14}{precision:<6}{row['step_ms']:8.1f} ms/step "
                      f"{row['train_steps_per_s']:6.2f} steps/s {row['cpu_s']:6.1f} CPU s "
                      f"jaccard {row['jaccard']:.4f}", flush=True)
    print(f"\n{'model':<14}{'fp32 ms':>9}{'bf16 ms':>9}{'speed-up':>9}"
          f"{'fp32 J':>8}{'bf16 J':>8}{'ΔJ':>8}")
    summary = []
    for name in args.models:
        f32 = next(r for r in rows if r["model"] == name and r["precision"] == "fp32")
        b16 = next(r for r in rows if r["model"] == name and r["precision"] == "bf16")
        s = {"model": name, "speedup_step": f32["step_ms"] / b16["step_ms"],
             "speedup_train_loop": b16["train_steps_per_s"] / f32["train_steps_per_s"],
             "delta_jaccard": b16["jaccard"] - f32["jaccard"]}
        summary.append(s)
        print(f"{name:<14}{f32['step_ms']:9.1f}{b16['step_ms']:9.1f}{s['speedup_step']:8.2f}x"
              f"{f32['jaccard']:8.4f}{b16['jaccard']:8.4f}{s['delta_jaccard']:+8.4f}")
    result = {"img_size": args.img_size, "batch_size": args.batch_size,
              "steps": args.epochs * args.steps_per_epoch,
              "seed": args.seed, "dataset": "synth cases=8 days=2 slices=32, fold 0 of 5",
              "cpu_flags": _cpu_flags(), "wall_s": time.perf_counter() - t0,
              "machine": machine(), "rows": rows, "summary": summary}
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(f"-> {args.out}")


def _cpu_flags() -> list[str]:
    """The CPU's bf16-related instruction sets (Linux), for the record."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return []
    return sorted(f for f in flags if "bf16" in f or f.startswith("amx") or f == "avx512f")


if __name__ == "__main__":
    main()
