"""Golden logits per family and attention mode: the stored outputs of the code are reproduced.

The files in ``golden/`` were written by ``make_golden.py`` (its docstring says how and when to
regenerate them) from the code before the attention modes became registry classes; a refactor
that keeps the numerics keeps this test green.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from make_golden import GOLDEN_DIR, INPUT_SHAPE, NUM_CLASSES, golden_logits

import kvseg


def test_one_golden_file_per_variant():
    assert sorted(p.stem for p in GOLDEN_DIR.glob("*.npy")) == sorted(kvseg.list_models())


@pytest.mark.parametrize("name", kvseg.list_models())
def test_logits_equal_the_stored_ones(name):
    want = np.load(GOLDEN_DIR / f"{name}.npy", allow_pickle=False)
    assert want.shape == (1, NUM_CLASSES, *INPUT_SHAPE[-2:]) and want.dtype == np.float32
    torch.testing.assert_close(torch.from_numpy(golden_logits(name)), torch.from_numpy(want),
                               atol=1e-5, rtol=0, msg=name)
