"""Training: ``TrainConfig`` (every option, validated), ``load_config`` (YAML + flags), ``train``.

``train(config)`` writes into ``config.out`` (RUN_DIR), from rank 0 only and always atomically:

- ``config.yaml``       the resolved config (plus ``in_channels``/``num_classes``/``classes``,
                        which the data decides and which are ignored when read back);
- ``metrics.csv``       one row per epoch: epoch, train_loss, val_loss, jaccard,
                        weighted_jaccard, dice, lr, seconds, steps (val cells empty in epochs
                        without validation);
- ``best.safetensors``  the weights with the best validation Jaccard, config in the metadata;
- ``last.ckpt``         model, optimiser, scheduler, AMP scaler, RNG states (Python, NumPy,
                        torch CPU/CUDA, the DataLoader generator; one set per rank), epoch, step,
                        best score and the metrics history: ``resume=True`` continues from it;
- ``curves.png``        losses and metrics per epoch.

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
equal a single-process evaluation of the same weights.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import itertools
import json
import logging
import math
import os
import random
import signal
import sys
import time
import typing
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from kvseg import distributed as D
from kvseg.checkpoint import build_model, save_model
from kvseg.losses import BCEDiceLoss
from kvseg.metrics import SegmentationMetrics
from kvseg.utils import atomic_path, atomic_write_text, resolve_device, seed_everything

log = logging.getLogger(__name__)

METRIC_COLUMNS = ("epoch", "train_loss", "val_loss", "jaccard", "weighted_jaccard", "dice",
                  "lr", "seconds", "steps")
# keys written to config.yaml that the data decides; accepted and ignored when read back
DERIVED_KEYS = ("in_channels", "num_classes", "classes")
# keys that may differ between the original run and a --resume
_RESUME_MAY_CHANGE = ("resume", "device", "workers", "cache_dir", "time_budget_s", "data", "out")
_KILL_HOOK = "KVSEG_TEST_KILL_AFTER_EPOCH"  # test-only: SIGKILL after this epoch's checkpoint


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite (message names epoch and step)."""


@dataclass
class TrainConfig:
    """Every training option (YAML keys and ``kvseg train`` flags use these names)."""

    # model
    model: str = "setr_kv"
    size: str = "base"
    img_size: int = 256
    head: str | None = None  # SETR decoder head (naive, pup, mla); None = the preset's
    model_overrides: dict = field(default_factory=dict)  # preset fields, e.g. {depth: 6}
    pretrained: str | None = None  # local weights file to initialise from (matching tensors)
    # data
    data: str | None = None  # dataset root (UW-Madison layout)
    context: int = 0  # neighbouring slices on each side stacked as channels (2.5D)
    fold: int = 0
    n_folds: int = 5
    augment: bool = True
    cache: bool = True
    cache_dir: str | None = None
    exclude: list = field(default_factory=list)  # case-day ids such as "case7_day0"
    workers: int = 0
    # optimisation
    epochs: int = 20
    batch_size: int = 8
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  # max gradient norm; 0 disables clipping
    bce_weight: float = 1.0
    dice_weight: float = 1.0
    amp: str = "auto"  # auto (bf16/fp16 on CUDA, off on CPU), bf16, fp16, none
    max_steps_per_epoch: int | None = None
    time_budget_s: float | None = None  # stop (after validating) once training took this long
    # evaluation and bookkeeping
    val_every: int = 1
    threshold: float = 0.5
    seed: int = 0
    device: str = "auto"
    out: str | None = None  # RUN_DIR
    resume: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad option."""
        hints = typing.get_type_hints(TrainConfig)
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), hints[f.name])
        from kvseg.models.registry import SIZES, list_models

        if self.model not in list_models():
            raise ValueError(f"model={self.model!r}: expected one of {', '.join(list_models())}")
        if self.size not in SIZES:
            raise ValueError(f"size={self.size!r}: expected one of {', '.join(SIZES)}")
        positive = ("img_size", "epochs", "batch_size", "n_folds", "val_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        for name in ("context", "workers", "weight_decay", "warmup_epochs", "grad_clip",
                     "bce_weight", "dice_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 0")
        if not 0 <= self.fold < self.n_folds:
            raise ValueError(f"fold={self.fold}: must be in [0, n_folds={self.n_folds})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr={self.lr}: must be a positive finite number")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio}: must be in [0, 1]")
        if self.bce_weight + self.dice_weight == 0:
            raise ValueError("bce_weight and dice_weight: at least one must be > 0")
        if self.amp not in ("auto", "bf16", "fp16", "none"):
            raise ValueError(f"amp={self.amp!r}: expected auto, bf16, fp16 or none")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ValueError(f"max_steps_per_epoch={self.max_steps_per_epoch}: must be >= 1")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"time_budget_s={self.time_budget_s}: must be > 0")
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold={self.threshold}: must be in (0, 1)")
        if self.device != "auto" and self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"device={self.device!r}: expected auto, cpu, cuda or cuda:N")
        if not all(isinstance(e, str) for e in self.exclude):
            raise ValueError(f"exclude={self.exclude!r}: expected a list of case-day ids")
        if "head" in self.model_overrides:
            raise ValueError("model_overrides.head: use the head option instead")


def _check_type(name: str, value, hint) -> None:
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if value is None:
        if optional:
            return
        raise ValueError(f"{name}: must not be empty (null)")
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        list: isinstance(value, list),
        dict: isinstance(value, dict),
    }.get(base, True)
    if not ok:
        raise ValueError(f"{name}={value!r}: expected {getattr(base, '__name__', base)}")


def default_config_path() -> Path:
    """The packaged ``kvseg/configs/default.yaml`` (documents every option and its default)."""
    return Path(str(resources.files("kvseg") / "configs" / "default.yaml"))


def _read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of option: value at the top level")
    return data


def load_config(path: str | os.PathLike | None = None, overrides: dict | None = None
                ) -> TrainConfig:
    """Defaults <- YAML file ``path`` <- ``overrides`` (e.g. command-line flags), validated.

    Unknown keys raise ValueError naming the key (and the file); bad values raise ValueError
    naming the option. Integers are accepted where floats are expected; YAML reads ``3e-4``
    as a string, so numeric strings are converted for float options.
    """
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    merged: dict = {}
    sources = [(default_config_path(), _read_yaml(default_config_path()))]
    if path is not None:
        sources.append((Path(path), _read_yaml(path)))
    sources.append(("overrides", dict(overrides or {})))
    for src, values in sources:
        for key, value in values.items():
            if key in DERIVED_KEYS:
                continue
            if key not in names:
                raise ValueError(f"{src}: unknown option {key!r}")
            merged[key] = value
    hints = typing.get_type_hints(TrainConfig)
    for key, value in merged.items():
        base = [a for a in typing.get_args(hints[key]) if a is not type(None)] or [hints[key]]
        if base[0] is float and isinstance(value, str):
            try:
                merged[key] = float(value)
            except ValueError:
                raise ValueError(f"{key}={value!r}: expected a number") from None
    return TrainConfig(**merged)


# --------------------------------------------------------------------------- data
def build_datasets(config: TrainConfig):
    """``(train_dataset, val_dataset)`` of :class:`kvseg.data.UWMadison` for this config."""
    from kvseg.data import UWMadison

    if config.data is None:
        raise ValueError("data: the dataset root is required (--data DIR)")
    common = dict(fold=config.fold, n_folds=config.n_folds, img_size=config.img_size,
                  context=config.context, cache=config.cache, cache_dir=config.cache_dir,
                  exclude=list(config.exclude))
    train_ds = UWMadison(config.data, split="train", augment=config.augment, **common)
    val_ds = UWMadison(config.data, split="val", augment=False, **common)
    return train_ds, val_ds


def _worker_init(worker_id: int) -> None:
    # torch seeds each worker with base_seed + worker_id (base_seed from the loader's
    # generator); derive NumPy's and Python's seeds from it so augmentations are reproducible
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


# --------------------------------------------------------------------------- RNG states
def _rng_state(gen: torch.Generator) -> dict:
    # plain Python values (no tensors): all_gather_object and weights_only loading accept them
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
        "loader": gen.get_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict, gen: torch.Generator) -> None:
    def byte_tensor(values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.uint8)

    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(byte_tensor(state["torch"]))
    gen.set_state(byte_tensor(state["loader"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([byte_tensor(s) for s in state["cuda"]])


# --------------------------------------------------------------------------- schedule
def lr_lambda(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based): linear warmup over
    ``warmup_steps`` then cosine from 1 to ``min_lr_ratio`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------- outputs
def write_metrics_csv(path: Path, history: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(METRIC_COLUMNS)
    for row in history:
        w.writerow(["" if row.get(k) is None else row[k] for k in METRIC_COLUMNS])
    atomic_write_text(path, buf.getvalue())


def plot_curves(path: Path, history: list[dict]) -> None:
    """Loss (train, val) and validation metrics per epoch -> PNG (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    ax1, ax2 = fig.subplots(1, 2)
    ep = [r["epoch"] for r in history]
    ax1.plot(ep, [r["train_loss"] for r in history], "o-", label="train")
    val = [(r["epoch"], r["val_loss"]) for r in history if r["val_loss"] is not None]
    if val:
        ax1.plot(*zip(*val, strict=True), "s-", label="val")
    ax1.set(xlabel="epoch", ylabel="loss", title="loss")
    ax1.legend()
    for key in ("jaccard", "weighted_jaccard", "dice"):
        pts = [(r["epoch"], r[key]) for r in history if r[key] is not None]
        if pts:
            ax2.plot(*zip(*pts, strict=True), "o-", label=key)
    ax2.set(xlabel="epoch", ylabel="score", title="validation", ylim=(0, 1))
    ax2.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)


# --------------------------------------------------------------------------- training
class _Trainer:
    def __init__(self, config: TrainConfig, info: D.DistInfo, device: torch.device) -> None:
        self.config, self.info, self.device = config, info, device
        self.out = Path(config.out)
        self.main = info.is_main

    # ---- set-up
    def setup(self) -> None:
        c = self.config
        if self.device.type == "cuda" and self.info.enabled and self.device.index is None:
            self.device = torch.device("cuda", self.info.local_rank)  # one GPU per process
        self.amp_dtype = self._amp_dtype()
        seed_everything(c.seed)
        self.train_ds, self.val_ds = build_datasets(c)
        if len(self.train_ds) == 0 or len(self.val_ds) == 0:
            raise ValueError(f"{c.data}: empty train ({len(self.train_ds)}) or val "
                             f"({len(self.val_ds)}) split for fold {c.fold}/{c.n_folds}")
        from kvseg.data import CLASSES

        first = self.train_ds[0]
        self.model_config = {**asdict(c), "in_channels": int(first["image"].shape[0]),
                             "num_classes": int(first["mask"].shape[0]), "classes": list(CLASSES)}
        self.model_config["data"] = str(Path(c.data).resolve())
        self.model_config["out"] = str(self.out)
        seed_everything(c.seed)  # the same weights whatever the dataset did above
        self.model = build_model(self.model_config)
        if c.pretrained is not None and not c.resume:
            from kvseg.models.pretrained import load_pretrained

            report = load_pretrained(self.model, c.pretrained)
            if self.main:
                log.info("initialised from %s: %s", c.pretrained, report.summary())
        self.model = self.model.to(self.device)
        if self.info.rank:
            seed_everything(c.seed + 7919 * self.info.rank)  # per-rank dropout/augment streams
        self.gen = torch.Generator().manual_seed(c.seed + 7919 * self.info.rank)
        self.train_loader, self.sampler = self._train_loader()
        self.val_loader = self._val_loader()
        self.steps_per_epoch = len(self.train_loader)
        if c.max_steps_per_epoch is not None:
            self.steps_per_epoch = min(self.steps_per_epoch, c.max_steps_per_epoch)
        total = c.epochs * self.steps_per_epoch
        warmup = min(total, round(c.warmup_epochs * self.steps_per_epoch))
        if self.main:
            n_params = sum(p.numel() for p in self.model.parameters())
            log.info("%s (%s, %.2fM params) on %d train / %d val slices, %d steps per epoch, "
                     "%d process(es), device %s", c.model, c.size, n_params / 1e6,
                     len(self.train_ds), len(self.val_ds), self.steps_per_epoch,
                     self.info.world_size, self.device)
        self.ddp_model = self.model
        if self.info.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=c.lr,
                                           weight_decay=c.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_lambda(s, warmup, total, c.min_lr_ratio))
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=self.amp_dtype is torch.float16)
        self.criterion = BCEDiceLoss(c.bce_weight, c.dice_weight)
        self.epoch, self.step, self.best, self.best_epoch = 0, 0, -math.inf, None
        self.history: list[dict] = []
        self.train_seconds = 0.0

    def _amp_dtype(self) -> torch.dtype | None:
        amp = self.config.amp
        if self.device.type != "cuda":
            if amp in ("bf16", "fp16"):
                raise ValueError(f"amp={amp}: mixed precision needs a CUDA device "
                                 f"(device is {self.device}); use amp: none or auto")
            return None
        if amp == "none":
            return None
        if amp == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if amp == "bf16" else torch.float16

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _train_loader(self):
        from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

        c = self.config
        if self.info.enabled:
            sampler = DistributedSampler(self.train_ds, num_replicas=self.info.world_size,
                                         rank=self.info.rank, shuffle=True, seed=c.seed)
        else:
            sampler = RandomSampler(self.train_ds, generator=self.gen)
        loader = DataLoader(self.train_ds, batch_size=c.batch_size, sampler=sampler,
                            num_workers=c.workers, worker_init_fn=_worker_init,
                            generator=self.gen, pin_memory=self.device.type == "cuda",
                            drop_last=False)
        return loader, sampler

    def _val_loader(self):
        from torch.utils.data import DataLoader, Subset

        # a disjoint, unpadded shard per rank (DistributedSampler would pad with duplicates
        # and bias the counts)
        shard = Subset(self.val_ds, range(self.info.rank, len(self.val_ds), self.info.world_size))
        return DataLoader(shard, batch_size=self.config.batch_size, shuffle=False,
                          num_workers=self.config.workers, worker_init_fn=_worker_init,
                          generator=torch.Generator().manual_seed(0))

    # ---- checkpoints
    def _ckpt_state(self) -> dict:
        rng = _rng_state(self.gen)
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
        }

    def resume(self) -> None:
        path = self.out / "last.ckpt"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: nothing to resume from")
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved = json.loads(state["config_json"])
        now = asdict(self.config)
        for key in now:
            if key not in _RESUME_MAY_CHANGE and saved.get(key) != now[key]:
                raise ValueError(f"--resume: option {key} was {saved.get(key)!r} in {path}, "
                                 f"now {now[key]!r}")
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
            _set_rng_state(rngs[self.info.rank], self.gen)
        else:
            log.warning("resuming with %d processes from a %d-process checkpoint: RNG streams "
                        "restart from the seed, so the run will not be bit-identical",
                        self.info.world_size, len(rngs))
        log.info("resumed %s at epoch %d (step %d)", path, self.epoch, self.step)

    # ---- loops
    def _check_step(self, loss: torch.Tensor, epoch: int, step_in_epoch: int, t0: float
                    ) -> bool:
        """Stop on a non-finite loss (on every rank); return True when the budget is spent."""
        bad = not bool(torch.isfinite(loss.detach()))
        over = (self.config.time_budget_s is not None
                and self.train_seconds + time.perf_counter() - t0 >= self.config.time_budget_s)
        if self.info.enabled:
            flags = D.all_reduce_sum(torch.tensor([float(bad), float(over)]))
            bad, over = bool(flags[0] > 0), bool(flags[1] > 0)
        if bad:
            raise NonFiniteLossError(
                f"non-finite training loss ({float(loss.detach()):g}) at epoch {epoch} step "
                f"{step_in_epoch} (global step {self.step + 1}); stopped; last good checkpoint: "
                f"{self.out / 'last.ckpt'}")
        return over

    def train_epoch(self, epoch: int) -> tuple[float, bool]:
        from tqdm.auto import tqdm

        c = self.config
        self.ddp_model.train()
        if self.info.enabled:
            self.sampler.set_epoch(epoch)
        bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch}/{c.epochs}", leave=False,
                   disable=not (self.main and sys.stderr.isatty()), dynamic_ncols=True)
        loss_sum, n, slices, over = 0.0, 0, 0, False
        t0 = time.perf_counter()
        for i, batch in enumerate(itertools.islice(self.train_loader, self.steps_per_epoch)):
            x = batch["image"].to(self.device, non_blocking=True)
            y = batch["mask"].to(self.device, non_blocking=True)
            with self._autocast():
                logits = self.ddp_model(x)
            loss = self.criterion(logits, y)
            over = self._check_step(loss, epoch, i + 1, t0)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if c.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.step += 1
            loss_sum += float(loss.detach()) * x.shape[0]
            n += x.shape[0]
            slices += x.shape[0]
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / n:.4f}",
                            slices_s=f"{slices / max(time.perf_counter() - t0, 1e-9):.1f}")
            if over:
                break
        bar.close()
        self.train_seconds += time.perf_counter() - t0
        totals = D.all_reduce_sum(torch.tensor([loss_sum, float(n)], dtype=torch.float64))
        return float(totals[0] / totals[1]), over

    @torch.no_grad()
    def validate(self) -> dict:
        self.model.eval()
        if self.info.enabled:
            # BatchNorm running stats differ per rank after the last step; validate what rank 0
            # saves (DDP itself broadcasts rank 0's buffers at every training forward)
            for buf in self.model.buffers():
                torch.distributed.broadcast(buf, src=0)
        metrics = SegmentationMetrics(self.model_config["num_classes"], self.config.threshold)
        loss_sum, n = 0.0, 0
        for batch in self.val_loader:
            x = batch["image"].to(self.device, non_blocking=True)
            y = batch["mask"].to(self.device, non_blocking=True)
            with self._autocast():
                logits = self.model(x)
            loss_sum += float(self.criterion(logits, y)) * x.shape[0]
            n += x.shape[0]
            metrics.update(logits, y)
        totals = D.all_reduce_sum(torch.tensor([loss_sum, float(n)], dtype=torch.float64))
        out = metrics.compute(sync=True)
        out["val_loss"] = float(totals[0] / totals[1])
        return out

    def run(self) -> dict:
        c = self.config
        if c.resume:
            self.resume()
        elif (self.out / "last.ckpt").exists():  # checked on every rank: all of them stop
            raise ValueError(f"{self.out}: already holds a run (last.ckpt); pass --resume "
                             "to continue it or choose another --out")
        elif self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "config.yaml",
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
            if os.environ.get(_KILL_HOOK) == str(epoch) and self.main:
                os.kill(os.getpid(), signal.SIGKILL)
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
            save_model(self.out / "best.safetensors", self.model, self.model_config)
        with atomic_path(self.out / "last.ckpt") as tmp:
            torch.save(state, tmp)
        write_metrics_csv(self.out / "metrics.csv", self.history)
        plot_curves(self.out / "curves.png", self.history)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def train(config: TrainConfig) -> dict:
    """Train ``config.model`` on ``config.data`` into ``config.out`` (see the module docstring).

    Returns a summary: ``run_dir``, ``epochs`` (completed), ``steps``, ``best_jaccard``,
    ``best_epoch``, ``stopped_early`` (time budget), ``train_seconds``, ``history``.
    Raises :class:`NonFiniteLossError` on a NaN/inf loss, ValueError on bad options.
    """
    if config.out is None:
        raise ValueError("out: the run directory is required (--out RUN_DIR)")
    if config.resume and not (Path(config.out) / "last.ckpt").is_file():
        raise FileNotFoundError(f"{Path(config.out) / 'last.ckpt'}: nothing to resume from")
    device = resolve_device(config.device)
    info = D.setup(device.type)
    owns_group = info.enabled
    try:
        trainer = _Trainer(config, info, device)
        trainer.setup()
        summary = trainer.run()
        D.barrier()
        return summary
    finally:
        if owns_group:
            D.cleanup()
