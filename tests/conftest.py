"""Shared test setup: one torch thread per test process (pytest -n 2 uses both cores); MKL's
alignment-independent kernels, as the CLI sets them. Shared helpers: tests/helpers.py."""

from __future__ import annotations

import os

# as `kvseg` does before torch loads (kvseg.cli._reproducible_blas): in-process runs and
# `python -m kvseg` subprocesses then compute alike (the SIGKILL + resume test compares them)
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import torch  # noqa: E402

torch.set_num_threads(1)
