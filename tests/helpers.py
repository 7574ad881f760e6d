"""Helpers shared by tests (imported as ``from helpers import ...``; not a conftest, whose module
name ``conftest`` is shared by tests/conftest.py and tests/data/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import yaml

#: A preset of one epoch of two steps at 32 px: the smallest real run of every command.
TINY_PRESET = {"seeds": [0], "latency_repeats": 2, "latency_warmup": 1, "num_samples": 2,
               "threads": 1,
               "train": {"size": "micro", "img_size": 32, "n_folds": 3, "epochs": 1,
                         "max_steps_per_epoch": 2, "batch_size": 4, "lr": 2e-3}}


def make_tiny(base: Path, seed: int, **preset) -> tuple[Path, Path]:
    """A 3-case synthetic twin under ``base/data`` and ``base/tiny.yaml`` (TINY_PRESET updated
    with ``preset``); returns (data, preset path)."""
    from kvseg.data.synth import generate

    generate(base / "data", cases=3, days=1, slices=6, seed=seed)
    path = base / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY_PRESET, **preset}))
    return base / "data", path


#: ``kvseg train`` options of a two-epoch, two-step micro run at 32 px (train_options).
TRAIN_OPTIONS = {"model": "setr_kv", "size": "micro", "img_size": 32, "epochs": 2,
                 "batch_size": 4, "n_folds": 3, "max_steps_per_epoch": 2, "lr": 1e-3,
                 "warmup_epochs": 0.5, "device": "cpu", "seed": 3}


def train_options(data, out, **kw) -> dict:
    """TRAIN_OPTIONS for dataset ``data`` and run folder ``out``, updated with ``kw``."""
    return {**TRAIN_OPTIONS, "data": str(data), "out": str(out), **kw}


def cli_train_args(opts: dict) -> list[str]:
    """``kvseg train`` arguments for an options dict (``--img-size 32`` ...)."""
    return ["train", *[a for k, v in opts.items() for a in (f"--{k.replace('_', '-')}", str(v))]]
