"""Shared test setup: one torch thread per test process (pytest -n 2 uses both cores)."""

from __future__ import annotations

import torch

torch.set_num_threads(1)
