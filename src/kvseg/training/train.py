"""Training: ``train(config)`` runs one :class:`~kvseg.config.TrainConfig` into its RUN_DIR.

``train(config)`` writes into ``config.out`` (RUN_DIR), from rank 0 only and always atomically
(the files are listed in :mod:`kvseg.rundir`): ``config.yaml``, ``metrics.csv``,
``best.safetensors`` (weights with the best validation Jaccard, config in the metadata),
``last.ckpt`` (model, optimiser, scheduler, AMP scaler and its precision, RNG states, epoch, step,
best score and history: ``resume=True`` continues from it) and ``curves.png``. The run folder is
owned by one process while it trains (:class:`kvseg.rundir.FolderLock`); a fresh run refuses a
folder that holds any part of another run.

Reproducibility: the same seed and config on CPU give the same metrics.csv (apart from the
wall-clock ``seconds`` column). A run killed at any moment and resumed ends with the same
weights and metrics as a straight run, because the epoch-end state (RNGs included) is saved
before anything that depends on it is published. A non-finite loss raises
:class:`NonFiniteLossError` naming epoch and step; nothing of that epoch is written, so
``last.ckpt`` stays the last good state.

Under ``torchrun`` (``WORLD_SIZE > 1``) the model is wrapped in DistributedDataParallel
(NCCL on CUDA, gloo on CPU), each rank reads its share of the training set through a
``DistributedSampler`` (the effective batch is ``batch_size × world_size``) and a disjoint
shard of the validation set; the metric counts are summed across ranks, so validation metrics
equal a single-process evaluation of the same weights. Rank 0 alone touches RUN_DIR: it decides
whether the run may start and, on resume, reads ``last.ckpt`` and sends the state to the other
ranks (their nodes need not see the folder).

Precision (:mod:`kvseg.precision`): ``amp`` resolves per training device (bf16 needs compute
capability 8.0); the resolved precision is stored in ``config.yaml``, ``best.safetensors`` and
``last.ckpt``, and a resume that would resolve differently is refused.

Per step the loop does not wait for the device: the running loss and the first non-finite
step are kept on the device and checked every :data:`CHECK_EVERY` steps (from the first step of
each epoch) and at the end of the epoch, in one collective together with the time-budget flag.
Augmentation randomness is drawn per slice from (a per-epoch seed, the slice index), so it does
not depend on the number of DataLoader workers, and persistent workers keep resume exact.

``callbacks``: callables ``fn(epoch, row)`` run on rank 0 after each epoch's files are written
(``row`` is that epoch's metrics.csv row), e.g. to log elsewhere or stop a job from outside; one
with an ``attach(trainer)`` method is given the set-up trainer first (its model, validation set,
device and run config). ``tensorboard: true`` adds :mod:`kvseg.training.tracking`'s handler.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from kvseg.config import (  # noqa: F401 - re-exported: kvseg.train.TrainConfig stays public
    RESUME_MAY_CHANGE,
    RunConfig,
    TrainConfig,
    config_defaults,
    default_config_path,
    load_config,
)
from kvseg.data import CLASSES, build_dataset
from kvseg.errors import CheckpointError, ConfigError
from kvseg.models.pretrained import load_pretrained
from kvseg.models.twin import init_from_twin, qkv_twin_name
from kvseg.training import distributed as D
from kvseg.training.checkpoint import (
    build_model,
    capture_rng_state,
    load_training_state,
    restore_rng_state,
    save_model,
    save_training_state,
)
from kvseg.training.loaders import train_loader, val_loader
from kvseg.training.losses import BCEDiceLoss, CEDiceLoss
from kvseg.training.metrics import SegmentationMetrics
from kvseg.training.precision import autocast, backend_settings, dtype_of, precision_for
from kvseg.training.rundir import (
    BEST,
    CONFIG,
    CURVES,
    LAST,
    METRIC_COLUMNS,
    METRICS,
    FolderLock,
    check_new_run,
    command_line,
    plot_curves,
    write_metrics_csv,
)
from kvseg.training.tracking import tracking_callbacks
from kvseg.utils import atomic_write_text, resolve_device, seed_everything

log = logging.getLogger(__name__)

__all__ = ["METRIC_COLUMNS", "NonFiniteLossError", "TrainConfig", "build_datasets",
           "load_config", "lr_lambda", "train"]

EpochCallback = Callable[[int, dict], None]

#: The loss and the time budget are checked every CHECK_EVERY steps (and at every epoch end):
#: one host sync and one collective, instead of one per step.
CHECK_EVERY = 20
#: "No non-finite loss yet" in the on-device record of the first bad step.
_NO_BAD_STEP = 2**62
_BAD_KINDS = ("nan", "inf", "-inf")


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite (message names epoch and step)."""


def build_datasets(config: TrainConfig):
    """``(train_dataset, val_dataset)`` for this config (:func:`kvseg.data.build_dataset`)."""
    return build_dataset(config, "train"), build_dataset(config, "val")


def lr_lambda(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based): linear warmup over
    ``warmup_steps`` then cosine from 1 to ``min_lr_ratio`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class _Trainer:
    """One training run (set-up, epochs, checkpoints); used through :func:`train`."""

    def __init__(self, config: TrainConfig, info: D.DistInfo, device: torch.device,
                 callbacks: Sequence[EpochCallback] = ()) -> None:
        self.config, self.info, self.device = config, info, device
        self.out = Path(config.out)
        self.main = info.is_main
        self.callbacks = list(callbacks)
        self.progress = sys.stderr.isatty()  # a tqdm bar per epoch (rank 0)

    # ---- set-up
    def setup(self) -> None:
        """Device and precision, data, the run's config, the model, loaders, optimiser."""
        c = self.config
        self._setup_device()
        seed_everything(c.seed)
        self.train_ds, self.val_ds = build_datasets(c)
        if len(self.train_ds) == 0 or len(self.val_ds) == 0:
            raise ConfigError(f"{c.data}: empty train ({len(self.train_ds)}) or val "
                             f"({len(self.val_ds)}) split for fold {c.fold}/{c.n_folds}")
        self.run_config = self._run_config()
        self.model_config = self.run_config.to_dict()
        seed_everything(c.seed)  # the same weights whatever the dataset did above
        self._setup_model()
        if self.info.rank:
            seed_everything(c.seed + 7919 * self.info.rank)  # per-rank dropout/augment streams
        self.gen = torch.Generator().manual_seed(c.seed + 7919 * self.info.rank)
        self.train_loader, self.sampler = self._train_loader()
        self.val_loader = self._val_loader()
        self.steps_per_epoch = len(self.train_loader)
        if c.max_steps_per_epoch is not None:
            self.steps_per_epoch = min(self.steps_per_epoch, c.max_steps_per_epoch)
        if self.main:
            n_params = sum(p.numel() for p in self.model.parameters())
            log.info("%s (%s, %.2fM params) on %d train / %d val slices, %d steps per epoch, "
                     "%d process(es), device %s, %s, %d loader worker(s)", c.model, c.size,
                     n_params / 1e6, len(self.train_ds), len(self.val_ds), self.steps_per_epoch,
                     self.info.world_size, self.device, self.precision, self.workers)
        self._wrap_model()
        self._setup_optimiser()
        loss = BCEDiceLoss if self.run_config.task == "multilabel" else CEDiceLoss
        self.criterion = loss(c.bce_weight, c.dice_weight)
        self.epoch, self.step, self.best, self.best_epoch = 0, 0, -math.inf, None
        self.history: list[dict] = []
        self.train_seconds = 0.0

    def _setup_device(self) -> None:
        c = self.config
        if self.device.type == "cuda":
            if self.device.index is None:  # one GPU per process: that of LOCAL_RANK
                self.device = torch.device("cuda", self.info.local_rank)
            torch.cuda.set_device(self.device)  # cuda:N in one process: default work goes there
        self.precision = precision_for(c.amp, self.device)
        self.amp_dtype = dtype_of(self.precision)
        self.workers = D.loader_workers(c.workers, self.device.type, self.info)

    def _run_config(self) -> RunConfig:
        """The options plus what the data decided (written to config.yaml and the weights)."""
        c, first = self.config, self.train_ds[0]
        classes = getattr(self.train_ds, "classes", None)
        return RunConfig(**{**asdict(c), "in_channels": int(first["image"].shape[0]),
                            "num_classes": int(first["mask"].shape[0]),
                            "classes": list(CLASSES if classes is None else classes),
                            "precision": self.precision,
                            "task": getattr(self.train_ds, "task", "multilabel"),
                            "preprocess": getattr(self.train_ds, "preprocess", {}),
                            "data": str(Path(c.data).resolve()), "out": str(self.out)})

    def _setup_model(self) -> None:
        c = self.config
        self.model = build_model(self.model_config)
        twin = qkv_twin_name(c.model) if c.paired_init and not c.resume else None
        if twin is not None:  # the twin draws what the QKV run draws: its weights, then its
            seed_everything(c.seed)  # RNG stream (dropout, ...) from here on
            report = init_from_twin(self.model, build_model({**self.model_config, "model": twin}))
            if self.main:
                log.info("%s", report.summary())
        if c.pretrained is not None and not c.resume:
            report = load_pretrained(self.model, c.pretrained, layout=c.pretrained_layout,
                                     rule=c.pretrained_rule)
            if self.main:
                log.info("initialised from %s", report.summary())
        self.model = self.model.to(self.device)

    def _wrap_model(self) -> None:
        """SyncBatchNorm and DistributedDataParallel under torchrun."""
        if self.config.sync_batchnorm and self.info.enabled:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.ddp_model = self.model
        if self.info.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    def _setup_optimiser(self) -> None:
        """AdamW (the encoder at ``encoder_lr_mult``), warm-up + cosine, the AMP scaler."""
        c = self.config
        total = c.epochs * self.steps_per_epoch
        warmup = min(total, round(c.warmup_epochs * self.steps_per_epoch))
        params = list(self.model.parameters())
        if c.encoder_lr_mult != 1.0:  # group 0 (logged): decoder + head at lr; the encoder slower
            named = list(self.model.named_parameters())
            params = [{"params": [p for n, p in named if not n.startswith("encoder.")]},
                      {"params": [p for n, p in named if n.startswith("encoder.")],
                       "lr": c.lr * c.encoder_lr_mult}]
        self.optimizer = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_lambda(s, warmup, total, c.min_lr_ratio))
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=self.amp_dtype is torch.float16)

    def _autocast(self):
        return autocast(self.device, self.precision)

    def _train_loader(self):
        return train_loader(self.train_ds, self.config.batch_size, self.gen, self.info,
                            seed=self.config.seed, workers=self.workers, device=self.device)

    def _val_loader(self):
        return val_loader(self.val_ds, self.config.batch_size, self.info, workers=self.workers,
                          device=self.device)

    # ---- checkpoints
    def _ckpt_state(self) -> dict:
        rng = capture_rng_state(self.gen, self.device)
        if self.info.enabled:
            gathered: list = [None] * self.info.world_size
            torch.distributed.all_gather_object(gathered, rng)
        else:
            gathered = [rng]
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": gathered,
            "epoch": self.epoch,
            "step": self.step,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "history": self.history,
            "train_seconds": self.train_seconds,
            "config_json": json.dumps(asdict(self.config), sort_keys=True),
            "precision": self.precision,
        }

    def _read_last(self) -> dict:
        """``last.ckpt``, read by rank 0 and sent to every rank (under torchrun the other ranks
        need not see RUN_DIR: node-local storage)."""
        path = self.out / LAST
        state, error = None, None
        if self.main:
            try:
                state = load_training_state(path, required=(
                    "model", "optimizer", "scheduler", "scaler", "rng", "epoch", "step", "best",
                    "history", "config_json"))
            except Exception as e:  # every rank must stop, not only rank 0
                error = e
        state, message = D.broadcast_object(
            (state, None if error is None else str(error).splitlines()[0]))
        if error is not None:
            raise error
        if message is not None:
            raise CheckpointError(f"rank 0 could not read {path}: {message}")
        return state

    def resume(self) -> None:
        path = self.out / LAST
        state = self._read_last()
        saved = json.loads(state["config_json"])
        now = asdict(self.config)
        defaults = config_defaults()  # options added since the checkpoint was written
        for key in now:
            was = saved.get(key, defaults[key])
            if key not in RESUME_MAY_CHANGE and was != now[key]:
                raise ConfigError(f"--resume: option {key} was {was!r} in {path}, "
                                  f"now {now[key]!r}")
        saved_precision = state.get("precision", "fp32")
        if saved_precision != self.precision:
            raise ConfigError(
                f"--resume: {path} trained in {saved_precision}, this device resolves amp="
                f"{self.config.amp} to {self.precision}; resume on a device that gives "
                f"{saved_precision} (or set --amp accordingly)")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.best, self.best_epoch = float(state["best"]), state["best_epoch"]
        self.history = list(state["history"])
        self.train_seconds = float(state["train_seconds"])
        rngs = state["rng"]
        if len(rngs) == self.info.world_size:
            restore_rng_state(rngs[self.info.rank], self.gen, self.device)
        else:
            log.warning("resuming with %d processes from a %d-process checkpoint: RNG streams "
                        "restart from the seed, so the run will not be bit-identical",
                        self.info.world_size, len(rngs))
        log.info("resumed %s at epoch %d (step %d)", path, self.epoch, self.step)

    # ---- loops
    def _over_budget(self, t0: float) -> bool:
        return (self.config.time_budget_s is not None
                and self.train_seconds + time.perf_counter() - t0 >= self.config.time_budget_s)

    def _check(self, bad: torch.Tensor, over: bool, epoch: int, first_step: int) -> bool:
        """The one host sync (and, under DDP, one collective) of a check point.

        ``bad`` is the on-device record of this epoch's first non-finite loss (``3 * step +
        kind``, or :data:`_NO_BAD_STEP`); ``over`` says this rank's time budget is spent. Both
        are combined over the ranks with one MIN all-reduce. Raises
        :class:`NonFiniteLossError` naming the first bad step (on every rank); returns whether
        the budget is spent (anywhere).
        """
        flags = torch.stack([bad, torch.zeros_like(bad) if over else torch.ones_like(bad)])
        code, not_over = D.all_reduce_min(flags).tolist()
        if code < _NO_BAD_STEP:
            step, kind = divmod(code, 3)
            raise NonFiniteLossError(
                f"non-finite training loss ({_BAD_KINDS[kind]}) at epoch {epoch} step {step} "
                f"(global step {first_step + step}); stopped; last good checkpoint: "
                f"{self.out / LAST}")
        return not_over == 0

    def train_epoch(self, epoch: int) -> tuple[float, bool]:
        c = self.config
        self.ddp_model.train()
        if self.info.enabled:
            self.sampler.set_epoch(epoch)
        bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch}/{c.epochs}", leave=False,
                   disable=not (self.main and self.progress), dynamic_ncols=True)
        # kept on the device: reading them every step would wait for the GPU every step
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        bad = torch.full((), _NO_BAD_STEP, dtype=torch.int64, device=self.device)
        n, over, first_step = 0, False, self.step
        t0 = time.perf_counter()
        for i, batch in enumerate(itertools.islice(self.train_loader, self.steps_per_epoch)):
            x = batch["image"].to(self.device, non_blocking=True)
            y = batch["mask"].to(self.device, non_blocking=True)
            with self._autocast():
                logits = self.ddp_model(x)
            loss = self.criterion(logits, y)
            detached = loss.detach()
            kind = torch.where(torch.isnan(detached), 0, torch.where(detached > 0, 1, 2))
            bad = torch.minimum(bad, torch.where(torch.isfinite(detached), _NO_BAD_STEP,
                                                 3 * (i + 1) + kind))
            if i % CHECK_EVERY == 0:
                over = self._check(bad, self._over_budget(t0), epoch, first_step)
                if self.main:
                    bar.set_postfix(loss=f"{float(loss_sum) / max(n, 1):.4f}")
            elif not self.info.enabled:  # one process: the clock needs no collective
                over = self._over_budget(t0)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if c.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.step += 1
            loss_sum += detached.double() * x.shape[0]
            n += x.shape[0]
            bar.update(1)
            if over:
                break
        over = self._check(bad, over or self._over_budget(t0), epoch, first_step)
        bar.close()
        self.train_seconds += time.perf_counter() - t0
        totals = D.all_reduce_sum(_with_count(loss_sum, n))
        return float(totals[0] / totals[1]), over

    @torch.no_grad()
    def validate(self) -> dict:
        self.model.eval()
        if self.info.enabled:
            # BatchNorm running stats differ per rank after the last step; validate what rank 0
            # saves (DDP itself broadcasts rank 0's buffers at every training forward)
            for buf in self.model.buffers():
                torch.distributed.broadcast(buf, src=0)
        metrics = SegmentationMetrics(self.model_config["num_classes"], self.config.threshold,
                                      task=self.model_config["task"])
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        n = 0
        for batch in self.val_loader:
            x = batch["image"].to(self.device, non_blocking=True)
            y = batch["mask"].to(self.device, non_blocking=True)
            with self._autocast():
                logits = self.model(x)
            loss_sum += self.criterion(logits, y).detach().double() * x.shape[0]
            n += x.shape[0]
            metrics.update(logits, y)
        totals = D.all_reduce_sum(_with_count(loss_sum, n))
        out = metrics.compute(sync=True)
        out["val_loss"] = float(totals[0] / totals[1])
        return out

    def run(self) -> dict:
        c = self.config
        if c.resume:
            self.resume()
        elif self.main:
            atomic_write_text(self.out / CONFIG,
                              yaml.safe_dump(self.model_config, sort_keys=False))
        stopped_early = False
        while self.epoch < c.epochs and not stopped_early:
            epoch = self.epoch + 1
            t0 = time.perf_counter()
            train_loss, stopped_early = self.train_epoch(epoch)
            row = {"epoch": epoch, "train_loss": train_loss, "val_loss": None, "jaccard": None,
                   "weighted_jaccard": None, "dice": None}
            if epoch % c.val_every == 0 or epoch == c.epochs or stopped_early:
                val = self.validate()
                row.update({k: val[k] for k in ("val_loss", "jaccard", "weighted_jaccard",
                                                "dice")})
            row["lr"] = self.optimizer.param_groups[0]["lr"]
            row["seconds"] = round(time.perf_counter() - t0, 3)
            row["steps"] = self.step
            self.epoch = epoch
            self.history.append(row)
            improved = row["jaccard"] is not None and row["jaccard"] > self.best
            if improved:
                self.best, self.best_epoch = row["jaccard"], epoch
            self._publish(improved)
            if self.main:
                log.info("epoch %d/%d train_loss %.4f val_loss %s jaccard %s (%.1fs)", epoch,
                         c.epochs, train_loss, _fmt(row["val_loss"]), _fmt(row["jaccard"]),
                         row["seconds"])
            if self.main:
                for callback in self.callbacks:
                    callback(epoch, row)
        if stopped_early and self.main:
            log.info("time budget of %.0f s spent after epoch %d", c.time_budget_s, self.epoch)
        return {"run_dir": str(self.out), "epochs": self.epoch, "steps": self.step,
                "best_jaccard": self.best, "best_epoch": self.best_epoch,
                "stopped_early": stopped_early, "train_seconds": self.train_seconds,
                "history": self.history}

    def _publish(self, improved: bool) -> None:
        # Order matters for kill-safety: best.safetensors, then last.ckpt (which holds the
        # history), then the files derived from the history. A kill between two writes leaves
        # a checkpoint whose resume rewrites everything after it identically.
        state = self._ckpt_state()  # collective under DDP: every rank takes part
        if not self.main:
            return
        if improved:
            save_model(self.out / BEST, self.model, self.model_config)
        save_training_state(self.out / LAST, state)
        write_metrics_csv(self.out / METRICS, self.history)
        plot_curves(self.out / CURVES, self.history)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def _with_count(total: torch.Tensor, n: int) -> torch.Tensor:
    """(2,) float64 on ``total``'s device: the sum and the count, for one all-reduce."""
    return torch.stack([total, torch.tensor(float(n), dtype=torch.float64, device=total.device)])


def train(config: TrainConfig, *, callbacks: Sequence[EpochCallback] = (),
          progress: bool | None = None) -> dict:
    """Train ``config.model`` on ``config.data`` into ``config.out`` (see the module docstring).

    Args:
        config: the run's options.
        callbacks: ``fn(epoch, row)`` called on rank 0 after each epoch's files are written.
        progress: a tqdm bar per epoch (rank 0); None: only when stderr is a terminal.

    Returns a summary: ``run_dir``, ``epochs`` (completed), ``steps``, ``best_jaccard``,
    ``best_epoch``, ``stopped_early`` (time budget), ``train_seconds``, ``history``.
    Raises :class:`NonFiniteLossError` on a NaN/inf loss, :class:`~kvseg.errors.ConfigError`
    on bad options, :class:`~kvseg.errors.RunDirError` when RUN_DIR is owned by another process
    or holds another run, :class:`~kvseg.errors.CheckpointError` for an unreadable last.ckpt.
    """
    if config.out is None:
        raise ConfigError("out: the run directory is required (--out RUN_DIR)")
    out = Path(config.out)
    tracking = tracking_callbacks(config)  # a missing package fails before anything starts
    D.check_device_option(config.device, D.env_info())  # before any process group or CUDA
    device = resolve_device(config.device)
    if config.sync_batchnorm and device.type != "cuda":
        raise ConfigError(f"sync_batchnorm: SyncBatchNorm needs CUDA devices under torchrun "
                          f"(device is {device.type}); use --no-sync-batchnorm")
    info = D.setup(device.type)
    owns_group = info.enabled
    try:
        # rank 0 owns the folder and decides whether the run may start; the others follow its
        # decision, so a refused start never leaves a rank waiting in a collective
        lock = FolderLock(out, command_line()) if info.is_main else None
        error = None
        if lock is not None:
            try:
                if config.resume and not (out / LAST).is_file():
                    raise FileNotFoundError(f"{out / LAST}: nothing to resume from")
                lock.acquire()
                if not config.resume:
                    check_new_run(out)
            except Exception as e:
                lock.release(failed=True)
                error = e
        if D.broadcast_flag(error is not None):
            if error is not None:
                raise error
            raise ConfigError(f"{out}: rank 0 refused to start the run (see its error)")
        finished = False
        try:
            with backend_settings(device, tf32=config.tf32, deterministic=config.deterministic):
                trainer = _Trainer(config, info, device, [*callbacks, *tracking])
                trainer.progress = sys.stderr.isatty() if progress is None else bool(progress)
                trainer.setup()
                for handler in trainer.callbacks:  # MONAI-style handlers see the trainer
                    if hasattr(handler, "attach"):
                        handler.attach(trainer)
                summary = trainer.run()
                D.barrier()
            finished = True
            return summary
        finally:
            for handler in tracking:
                handler.close()
            if lock is not None:  # a run refused before it wrote anything leaves no folder
                lock.release(failed=not finished)
    finally:
        if owns_group:
            D.cleanup()
