"""Write the golden logits that ``test_golden.py`` compares against (``golden/<name>.npy``).

For each variant (three families × seven attention modes, and the reference families): a
``micro`` model with two classes, built after ``torch.manual_seed(0)``; seeded noise (std 0.2)
added to every attention parameter (at the ViT init, std 0.02, the attention is nearly uniform
and a wrong scale or key bias would move the logits by less than the tolerance); the BatchNorm
running statistics set to the batch statistics of one seeded training-mode forward (so eval-mode
activations keep unit scale and the encoder's effect reaches the logits); then, in eval mode and
float64, the logits of a fixed seeded (1, 3, 40, 56) input (non-square and not a multiple of 16,
so padding and cropping run too), stored as float32. One file of ~18 KB per variant.

Regenerate only when the numerics change on purpose (a new init, a changed layer), never to make
a failing golden test pass after a refactor that should have kept them; name the variants to
write (a new mode's, for instance), or none for all::

    .venv/bin/python tests/models/make_golden.py [NAME ...]

The SETR files were written by the code from before the attention modes became registry
classes (``PYTHONPATH=<checkout of that commit>/src``), so the test proves that refactor kept
every output. The hybrid and CvT files were regenerated when those families were made faithful
to the official code on purpose (TransUNet's weight-standardised R50 with GroupNorm and the
unpadded max-pool; CvT's 1/sqrt(dim) scale, QuickGELU and per-stage drop-path), which changes
their logits; SETR's default PUP head did not change, so its files were kept. The nine files
were kept again when KV-pos moved from an SDPA mask to a folded key channel (equal to 1e-5 in
float64); the twelve variants of the other sharing modes (``shared_kv``, ``shared_qv``,
``single``, ``kv_relpos``) were written when those modes were added, and the fourteen of the
reference families (``dynunet``, ``unetr_*``, ``swinunetr_*``: MONAI 1.6.1's networks with
kvseg's attention patched in) when those families were added.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

import kvseg

GOLDEN_DIR = Path(__file__).parent / "golden"
INPUT_SHAPE = (1, 3, 40, 56)
NUM_CLASSES = 2


def golden_logits(name: str) -> np.ndarray:
    """The float32 logits (1, 2, 40, 56) of variant ``name``, as in the module docstring."""
    torch.manual_seed(0)
    model = kvseg.create_model(name, size="micro", img_size=48, num_classes=NUM_CLASSES)
    noise = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for key, p in sorted(model.named_parameters()):
            if ".attn." in key:
                p.add_(0.2 * torch.randn(p.shape, generator=noise))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average: running statistics := one batch's
            m.reset_running_stats()
    warm = torch.randn(*INPUT_SHAPE, generator=torch.Generator().manual_seed(1))
    x = torch.randn(*INPUT_SHAPE, generator=torch.Generator().manual_seed(2))
    model.double()  # float64: the stored float32 values do not depend on the CPU's kernels
    with torch.no_grad():
        model.train()(warm.double())
        return model.eval()(x.double()).float().numpy()


def main(names: list[str] | None = None) -> None:
    GOLDEN_DIR.mkdir(exist_ok=True)
    torch.set_num_threads(1)
    for name in names or kvseg.list_models():
        logits = golden_logits(name)
        np.save(GOLDEN_DIR / f"{name}.npy", logits, allow_pickle=False)
        print(f"{name}: {logits.shape} {logits.dtype}, |logits| max {np.abs(logits).max():.4f}")


if __name__ == "__main__":
    main(sys.argv[1:])
