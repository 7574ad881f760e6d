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
