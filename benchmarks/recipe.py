"""Which smoke recipe makes the seeds agree? Seed spread of each family's QKV variant per recipe.

The demo's verdict can only separate KV from QKV when a variant's Jaccard hardly moves with the
seed. This script trains each family's QKV variant (micro, synthetic twin) with several seeds
under each candidate recipe, through ``kvseg reproduce`` itself (so the runs are exactly what
the demo runs: same runner, same parallel workers, same evaluation), and prints per recipe and
family the mean and sample standard deviation of the validation Jaccard over the seeds, and the
wall time per run. Target (the verdict issue): std <= 2 Jaccard points in every family, within
the demo's time budget.

    python benchmarks/recipe.py                      # every candidate below, seeds 0 1 2
    python benchmarks/recipe.py --recipes gn96 --seeds 0 1 2 3 4

Results: ``benchmarks/results/recipe.json`` (one entry per recipe: its training options, per
family mean/std/seed values, seconds per run) and a table on stdout. Runs are kept under
``--work`` (default: a temp folder) so a re-run with the same folder skips finished runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

from kvseg.data.synth import generate
from kvseg.experiments.reproduce import reproduce

RESULTS = Path(__file__).resolve().parent / "results" / "recipe.json"
BASE = {"size": "micro", "context": 0, "fold": 0, "n_folds": 5, "batch_size": 4,
        "weight_decay": 0.05, "augment": False, "workers": 0}


def _recipe(img_size: int, epochs: int, lr: float, *, warmup_epochs: float = 1.0,
            max_steps_per_epoch: int = 80, **options) -> dict:
    """A candidate's training options (Dice weight 2 in all of them)."""
    return {"img_size": img_size, "epochs": epochs, "max_steps_per_epoch": max_steps_per_epoch,
            "lr": lr, "warmup_epochs": warmup_epochs, "dice_weight": 2.0, **options}


#: Candidate recipes: training options on top of BASE. ``smoke_v1`` is the single-seed demo
#: recipe before the verdict issue.
RECIPES = {
    "smoke_v1": _recipe(128, 5, 1e-3, warmup_epochs=0.25),
    "low_lr": _recipe(128, 5, 5e-4),
    "px96": _recipe(96, 6, 1e-3),
    "px96_low_lr": _recipe(96, 6, 5e-4),
    "px96_long": _recipe(96, 8, 5e-4),
    "px96_long_lr1e3": _recipe(96, 8, 1e-3),
    "px80_lr1e3": _recipe(80, 11, 1e-3),
    "px80_warm2": _recipe(80, 11, 7e-4, warmup_epochs=2.0),
    "px80_b8": _recipe(80, 11, 1e-3, max_steps_per_epoch=40, batch_size=8),
    "px80_longer": _recipe(80, 11, 7e-4),  # the smoke preset's recipe
}
MODELS = ["setr_qkv", "setr_conv_qkv", "setr_cvt_qkv"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--jobs", type=int, default=2, help="runs trained at once (one thread each)")
    p.add_argument("--work", help="folder for data and runs (default: a temp folder)")
    p.add_argument("--json", default=str(RESULTS))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.work or tempfile.mkdtemp(prefix="kvseg_recipe_"))
    data = work / "data"
    if not (data / "train.csv").is_file():
        generate(data, seed=0)  # kvseg synth's defaults: the demo's data
    old = json.loads(Path(args.json).read_text()) if Path(args.json).is_file() else {}
    entries = dict(old.get("recipes", {}))
    print(f"{'recipe':<14}{'family':<12}{'mean':>8}{'std':>8}  seeds{'':<18}{'s/run':>7}")
    for name in args.recipes:
        preset = work / f"{name}.yaml"
        preset.write_text(yaml.safe_dump({
            "description": f"recipe search: {name}", "models": args.models, "seeds": args.seeds,
            "latency_repeats": 1, "latency_warmup": 0, "latency_threads": 1, "num_samples": 0,
            "threads": 1, "train": {**BASE, **RECIPES[name]}}))
        t0 = time.perf_counter()
        summary = reproduce(data, work / name, preset=str(preset), device="cpu",
                            jobs=args.jobs, progress=sys.stderr.isatty())
        wall = time.perf_counter() - t0
        rows = json.loads((work / name / "results.json").read_text())
        families = {}
        for r in rows:
            families.setdefault(r["family"], []).append(r)
        entry = {"train": {**BASE, **RECIPES[name]}, "seeds": args.seeds, "families": {},
                 "wall_seconds": round(wall, 1), "runs_trained": summary.trained,
                 "jobs": args.jobs}
        for family, fam in sorted(families.items()):
            jac = [r["jaccard"] for r in sorted(fam, key=lambda r: r["seed"])]
            secs = [r["train_seconds"] for r in fam]
            mean = statistics.fmean(jac)
            std = statistics.stdev(jac) if len(jac) > 1 else float("nan")
            entry["families"][family] = {"jaccard": jac, "mean": mean, "std": std,
                                         "train_seconds_mean": statistics.fmean(secs)}
            print(f"{name:<14}{family:<12}{mean:>8.3f}{std:>8.3f}  "
                  f"{' '.join(f'{j:.3f}' for j in jac):<23}{statistics.fmean(secs):>7.0f}")
        entries[name] = entry
    record = {"machine": f"{platform.processor() or platform.machine()}, "
                         f"{os.cpu_count()} cores", "recipes": entries,
              "note": "train_seconds is one run's training time with one thread while "
                      f"{args.jobs} runs train at once"}
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    print(f"-> {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
