"""Post-processing chosen on validation (``kvseg tune``), stored in the run, applied by evaluate
and predict.

``RUN_DIR/postprocess.json`` holds, per class, a probability threshold (multi-label runs) and a
minimum component size in pixels at the model's resolution (``img_size``; 8-connected
components smaller than it are removed: set to background). :class:`Postprocess` applies both to
probabilities (B, C, S, S) in a form the rest of inference needs no change for: each class's
threshold is mapped to 0.5 by a monotone, piecewise-linear rescaling (so thresholding the
result at 0.5 is thresholding the original at the tuned value) and removed pixels get
probability 0 (multi-label) or background 1 (multi-class).

It is optional: ``kvseg reproduce`` never reads it (its verdicts compare the models as trained).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from kvseg.errors import CheckpointError
from kvseg.utils import atomic_write_text

POSTPROCESS = "postprocess.json"
_CONNECTIVITY = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class Postprocess:
    """Per-class thresholds (``None``: multi-class, the argmax decides) and minimum component
    sizes (pixels at ``img_size``; 0 keeps every component)."""

    classes: tuple[str, ...]
    thresholds: tuple[float, ...] | None
    min_size: tuple[int, ...]
    source: str = ""

    def describe(self) -> str:
        parts = []
        if self.thresholds is not None:
            parts.append("thresholds " + ", ".join(f"{c} {t:g}" for c, t in
                                                   zip(self.classes, self.thresholds,
                                                       strict=True)))
        parts.append("min component " + ", ".join(f"{c} {s}" for c, s in
                                                  zip(self.classes, self.min_size, strict=True)))
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return {"classes": list(self.classes),
                "thresholds": None if self.thresholds is None else dict(
                    zip(self.classes, self.thresholds, strict=True)),
                "min_size": dict(zip(self.classes, self.min_size, strict=True))}

    @torch.no_grad()
    def apply(self, probs: torch.Tensor, task: str) -> torch.Tensor:
        """Probabilities (B, C, S, S) -> post-processed probabilities (a new tensor)."""
        probs = probs.float().clone()
        if task == "multiclass":
            labels = probs.argmax(1).cpu().numpy()
            for c, size in enumerate(self.min_size):
                for b in range(labels.shape[0]):
                    drop = torch.from_numpy(small_components(labels[b] == c + 1, size))
                    if drop.any():
                        probs[b, :, drop.to(probs.device)] = 0.0
                        probs[b, 0, drop.to(probs.device)] = 1.0
            return probs
        if self.thresholds is not None:
            t = torch.tensor(self.thresholds, dtype=probs.dtype, device=probs.device)
            t = t.view(1, -1, 1, 1)
            probs = torch.where(probs < t, probs / (2 * t), 0.5 + (probs - t) / (2 * (1 - t)))
        masks = (probs >= 0.5).cpu().numpy()
        for c, size in enumerate(self.min_size):
            for b in range(masks.shape[0]):
                drop = torch.from_numpy(small_components(masks[b, c], size))
                if drop.any():
                    probs[b, c, drop.to(probs.device)] = 0.0
        return probs


def small_components(mask: np.ndarray, min_size: int) -> np.ndarray:
    """The pixels of ``mask`` (H, W) bool in 8-connected components of fewer than ``min_size``
    pixels (all False when ``min_size`` <= 1)."""
    if min_size <= 1 or not mask.any():
        return np.zeros(mask.shape, dtype=bool)
    labels, _ = ndimage.label(mask, structure=_CONNECTIVITY)
    sizes = np.bincount(labels.ravel())
    return (sizes[labels] < min_size) & mask


def read_postprocess(run: str | os.PathLike, classes, task: str) -> Postprocess | None:
    """``RUN_DIR/postprocess.json`` as a :class:`Postprocess` (``None`` when there is none);
    a file that does not match the run's classes is a :class:`CheckpointError`."""
    path = Path(run) / POSTPROCESS
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        names = list(classes)
        sizes = tuple(int(data["min_size"][n]) for n in names)
        thr = data.get("thresholds")
        thresholds = None if task == "multiclass" or thr is None else tuple(
            float(thr[n]) for n in names)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a kvseg post-processing file for this run's classes "
                              f"({type(e).__name__}: {e}); run `kvseg tune` again or delete it"
                              ) from None
    if thresholds is not None and not all(0 < t < 1 for t in thresholds) or min(sizes) < 0:
        raise CheckpointError(f"{path}: thresholds must be in (0, 1) and sizes >= 0")
    return Postprocess(tuple(names), thresholds, sizes, source=str(path))


def write_postprocess(run: str | os.PathLike, post: Postprocess, **record) -> Path:
    """Write ``RUN_DIR/postprocess.json`` atomically (with ``record``: how it was chosen)."""
    path = Path(run) / POSTPROCESS
    atomic_write_text(path, json.dumps({**post.to_dict(), **record}, indent=2) + "\n")
    return path


__all__ = ["POSTPROCESS", "Postprocess", "read_postprocess", "small_components",
           "write_postprocess"]
