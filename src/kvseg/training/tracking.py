"""Live tracking of a training run: TensorBoard, as a :func:`~kvseg.training.train.train`
callback (MONAI's ``TensorBoardStatsHandler`` / ``TensorBoardImageHandler`` pattern: a handler
attached to the trainer, not code in the loop).

With ``tensorboard: true`` (``kvseg train --tensorboard``; a preset's ``train`` section for
``kvseg reproduce`` and ``kvseg sweep``) each run writes ``RUN_DIR/tensorboard/events.out.
tfevents.*``: per epoch the scalars of its ``metrics.csv`` row (``loss/train``, ``loss/val``,
``val/jaccard``, ``val/weighted_jaccard``, ``val/dice``, ``lr``) and, at every validated
epoch, a few validation slices with the ground truth (left) and the prediction (right) blended
in. ``tensorboard --logdir runs/smoke`` then shows every run of a reproduction. ``metrics.csv``
stays the record; a resumed run drops the events after its checkpoint (``purge_step``).

It needs the ``tensorboard`` package (``pip install 'kvseg[tracking]'``); without it
``--tensorboard`` is one error line before anything is trained.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from kvseg.errors import ConfigError
from kvseg.training.metrics import predicted_masks, target_masks

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
#: metrics.csv column -> TensorBoard tag.
SCALARS = {"train_loss": "loss/train", "val_loss": "loss/val", "jaccard": "val/jaccard",
           "weighted_jaccard": "val/weighted_jaccard", "dice": "val/dice", "lr": "lr"}
#: Overlay colours by class (RGB in [0, 1]); classes beyond them cycle.
_COLORS = torch.tensor([(0.9, 0.24, 0.24), (0.24, 0.78, 0.31), (0.24, 0.47, 0.94),
                        (0.94, 0.78, 0.16), (0.78, 0.24, 0.86), (0.16, 0.82, 0.82)])


def _summary_writer():
    """``torch.utils.tensorboard.SummaryWriter``, or one clear error without tensorboard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("tensorboard: the tensorboard package is not installed; pip install "
                          "'kvseg[tracking]' (or pass --no-tensorboard)") from None
    return SummaryWriter


def blend(image: torch.Tensor, masks: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """(3, H, W) in [0, 1]: a grey ``image`` (H, W) in [0, 1] with each class of ``masks``
    (K, H, W) bool blended in its colour."""
    rgb = image.clamp(0, 1).expand(3, *image.shape).clone()
    for c in range(masks.shape[0]):
        color = _COLORS[c % len(_COLORS)].view(3, 1, 1)
        on = masks[c].bool()
        rgb[:, on] = (1 - alpha) * rgb[:, on] + alpha * color.expand_as(rgb)[:, on]
    return rgb


class TensorBoardHandler:
    """Writes one run's TensorBoard events (see the module docstring).

    ``attach(trainer)`` is called by :func:`~kvseg.training.train.train` once the trainer is
    set up (the model, validation set, device and run config are read from it), the handler
    itself after each epoch's files are written, ``close()`` at the end.
    """

    def __init__(self, log_dir: str | Path, samples: int = 4) -> None:
        self.log_dir = Path(log_dir)
        self.samples = samples
        self.writer = None
        self.trainer = None
        self._writer_cls = _summary_writer()

    def attach(self, trainer) -> None:
        self.trainer = trainer

    def __call__(self, epoch: int, row: dict) -> None:
        if self.writer is None:  # on resume, events past this epoch's start are dropped
            self.writer = self._writer_cls(str(self.log_dir), purge_step=epoch)
        for key, tag in SCALARS.items():
            if row.get(key) is not None:
                self.writer.add_scalar(tag, float(row[key]), epoch)
        if row.get("jaccard") is not None and self.trainer is not None:
            self.writer.add_images("val/overlay (truth | prediction)", self._overlays(), epoch)
        self.writer.flush()

    @torch.no_grad()
    def _overlays(self) -> torch.Tensor:
        """(N, 3, S, 2S): N validation slices spread over the set, truth | prediction."""
        t = self.trainer
        ds, model, config = t.val_ds, t.model, t.run_config
        n = min(self.samples, len(ds))
        items = [ds[i * len(ds) // n] for i in range(n)]
        x = torch.stack([it["image"] for it in items])
        y = torch.stack([it["mask"] for it in items])
        was_training = model.training
        model.eval()
        try:
            logits = model(x.to(t.device)).float().cpu()
        finally:
            model.train(was_training)
        pred = predicted_masks(logits, config.task, config.threshold)
        truth = target_masks(y, config.task)
        centre = x[:, x.shape[1] // 2]  # the slice itself (2.5D: the middle of the stack)
        return torch.stack([torch.cat([blend(centre[i], truth[i]), blend(centre[i], pred[i])],
                                      dim=-1) for i in range(n)])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def tracking_callbacks(config) -> list:
    """The tracking handlers a :class:`~kvseg.config.TrainConfig` asks for (``tensorboard``);
    checks that their packages are installed."""
    if not config.tensorboard:
        return []
    return [TensorBoardHandler(Path(config.out) / TENSORBOARD_DIR)]


__all__ = ["SCALARS", "TENSORBOARD_DIR", "TensorBoardHandler", "blend", "tracking_callbacks"]
