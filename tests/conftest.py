"""Shared test setup: one torch thread per test process (pytest -n 2 uses both cores); MKL's
alignment-independent kernels, as the CLI sets them. Shared helpers: tests/helpers.py."""

from __future__ import annotations

import os

# as `kvseg` does before torch loads (kvseg.cli._reproducible_blas): in-process runs and
# `python -m kvseg` subprocesses then compute alike (the SIGKILL + resume test compares them)
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    """A 3-case synthetic twin (one day, 6 slices each) per test module."""
    from kvseg.data.synth import generate

    root = tmp_path_factory.mktemp("synth") / "data"
    generate(root, cases=3, days=1, slices=6, seed=0)
    return root
