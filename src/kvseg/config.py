"""Run options in one place: :class:`TrainConfig`, YAML loading, presets, CLI flags.

- :class:`TrainConfig` holds every training option (its fields are the YAML keys and, with
  dashes, the ``kvseg train`` flags: :func:`add_config_flags` generates the flags from the fields,
  so no option is listed by hand twice). Values are validated at construction; a bad value raises
  :class:`~kvseg.errors.ConfigError` naming the option.
- :func:`load_config` layers the packaged defaults, a YAML file and overrides (flags).
- Packaged configs (``kvseg/configs/*.yaml``): ``default`` (every option, documented), the
  reproduce presets ``smoke`` and ``paper``, and example training configs ``train_micro`` and
  ``train_paper``. Each exists once, in the package; ``kvseg config show NAME`` prints one for
  editing. Anywhere a config is asked for, a packaged name or a YAML file path is accepted.
- :class:`~kvseg.experiments.presets.Preset` is a ``kvseg reproduce`` / ``kvseg sweep`` preset,
  read by the same YAML reader (:func:`kvseg.utils.read_yaml`).
- :func:`~kvseg.utils.check_number` (re-exported here) is the one check of numeric options, used
  by the dataclasses here and by the command-line flags of every command.

Where this sits: above ``models`` and ``data`` (an option is checked against the registered
variants, the weight layouts and the dataset layouts when the config is built), below the wings
that run it (``training``, ``inference``, ``experiments``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from kvseg.data.factory import check_data_format
from kvseg.data.names import CLASSES
from kvseg.errors import CheckpointError, ConfigError
from kvseg.models.kv_rules import RULES
from kvseg.models.pretrained import LAYOUTS
from kvseg.models.registry import SIZES, build_on_meta, check_pretrained, list_models
from kvseg.utils import MAX_SEED, check_number, read_yaml

#: Keys written to config.yaml that the data decides; accepted and ignored when read back.
DERIVED_KEYS = ("in_channels", "num_classes", "classes", "precision", "preprocess")
#: Options that may differ between the original run and a ``--resume``.
RESUME_MAY_CHANGE = ("resume", "device", "workers", "cache_dir", "time_budget_s", "data", "out",
                     "tensorboard")
AMP_CHOICES = ("auto", "bf16", "fp16", "none")


def option(default, help: str, **kw):
    """A dataclass field with its ``--help`` text (a mutable default goes through a factory)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help},
                     **kw)
    return field(default=default, metadata={"help": help}, **kw)


_opt = option


def _check_type(name: str, value, hint) -> None:
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if value is None:
        if optional:
            return
        raise ConfigError(f"{name}: must not be empty (null)")
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        list: isinstance(value, list),
        dict: isinstance(value, dict),
    }.get(base, True)
    if not ok:
        raise ConfigError(f"{name}={value!r}: expected {getattr(base, '__name__', base)}")


def _base_type(hint) -> type:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def validate_types(obj) -> None:
    """Every field of the dataclass ``obj`` has its annotated type (:class:`ConfigError` names
    the first that does not)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        _check_type(f.name, getattr(obj, f.name), hints[f.name])


# --------------------------------------------------------------------------- training options
@dataclass
class TrainConfig:
    """Every training option (YAML keys; ``kvseg train --option-name`` flags)."""

    # model
    model: str = _opt("setr_kv", "variant name (see `kvseg models`)")
    size: str = _opt("base", "size preset: micro, small, base, large")
    img_size: int = _opt(256, "slices are resized to img_size x img_size")
    head: str | None = _opt(None, "SETR decoder head: naive, pup, mla (none = the preset's)")
    model_overrides: dict = _opt({}, "preset fields, e.g. depth=6 pos_dim=10")
    pretrained: str | None = _opt(None, "initialise the encoder from a weights file (timm ViT, "
                                        "Google ViT .npz, TransUNet R50+ViT-B_16.npz, CvT "
                                        ".pth, kvseg) or 'imagenet' (the official file, "
                                        "downloaded into the torch hub cache if missing)")
    pretrained_layout: str | None = _opt(None, "the pretrained file's layout: timm_vit, "
                                               "google_vit, transunet_r50_vit, microsoft_cvt, "
                                               "kvseg (none = detect from its keys)")
    pretrained_rule: str = _opt("sym", "QKV -> KV rule for KV/KV-pos models: sym, key, mean")
    paired_init: bool = _opt(False, "a query-free model (KV, KV-pos, ...) starts from the "
                                    "weights of its family's QKV model of the same seed (shared "
                                    "tensors copied, K/V rows of qkv; common random numbers for "
                                    "paired comparisons); no effect on QKV and dynunet")
    # data
    data: str | None = _opt(None, "dataset root (any layout kvseg knows, see data_format; "
                                  "required)")
    data_format: str = _opt("auto", "dataset layout: auto (detected from the folder), "
                                    "uwmadison, folder, msd, synapse, acdc")
    task: str = _opt("auto", "auto (the dataset decides: label masks multiclass, one mask per "
                             "class multilabel), multiclass (softmax + CE/Dice) or multilabel "
                             "(sigmoid + BCE/Dice); the resolved task is saved with the run")
    context: int = _opt(0, "neighbouring slices per side stacked as channels (2.5D)")
    fold: int = _opt(0, "validation fold (split by case)")
    n_folds: int = _opt(5, "number of folds")
    test_fold: int | None = _opt(None, "held-out test fold (split by case): never trained on nor "
                                       "used for selection; scored by evaluate --split test "
                                       "(none = no test split)")
    augment: bool = _opt(True, "training-time augmentation")
    cache: bool = _opt(True, "cache prepared slices on disk")
    cache_dir: str | None = _opt(None, "where to cache (none = the dataset's .kvseg_cache)")
    train_fraction: float = _opt(1.0, "fraction of the training cases used (nested, grouped "
                                      "by case; the validation fold is unchanged)")
    exclude: list = _opt([], "case-day ids to drop, e.g. case7_day0 (bad = the 12 known bad "
                             "scans)")
    workers: int | None = _opt(None, "DataLoader worker processes per process (none = auto: 0 on "
                                     "the CPU; on CUDA the cores per process - 1, at most 8)")
    # optimisation
    epochs: int = _opt(20, "training epochs")
    batch_size: int = _opt(8, "batch per process (under torchrun the effective batch is x "
                              "world size)")
    lr: float = _opt(3e-4, "AdamW peak learning rate")
    encoder_lr_mult: float = _opt(1.0, "the encoder's lr = lr x this (e.g. 0.1 when fine-tuning "
                                       "a pretrained encoder; SETR trains its head at 10x)")
    weight_decay: float = _opt(0.05, "AdamW weight decay")
    warmup_epochs: float = _opt(1.0, "linear warm-up length in epochs, then cosine decay")
    min_lr_ratio: float = _opt(0.01, "the cosine ends at lr * min_lr_ratio")
    grad_clip: float = _opt(1.0, "max gradient norm (0 = off)")
    bce_weight: float = _opt(1.0, "loss = bce_weight * BCE (multiclass: cross-entropy) + "
                                  "dice_weight * soft Dice")
    dice_weight: float = _opt(1.0, "weight of the soft Dice loss")
    amp: str = _opt("auto", "mixed precision: auto (CUDA: bf16 from compute capability 8.0, "
                            "else fp16; CPU: off), bf16 (also on CPU), fp16 (CUDA), none")
    tf32: bool = _opt(True, "on CUDA, fp32 matmuls may use TF32 tensor cores (Ampere+)")
    deterministic: bool = _opt(False, "deterministic algorithms (torch.use_deterministic_"
                                      "algorithms); slower on CUDA, see docs/training.md")
    sync_batchnorm: bool = _opt(False, "under torchrun on CUDA, BatchNorm statistics over all "
                                       "ranks (SyncBatchNorm)")
    max_steps_per_epoch: int | None = _opt(None, "cap the optimiser steps per epoch")
    time_budget_s: float | None = _opt(None, "end training at the step passing this many "
                                             "seconds, then validate")
    # evaluation and bookkeeping
    val_every: int = _opt(1, "validate every N epochs (and always after the last)")
    threshold: float = _opt(0.5, "sigmoid threshold for the metrics")
    seed: int = _opt(0, "random seed (weights, data order, augmentation)")
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N")
    out: str | None = _opt(None, "RUN_DIR: the run folder (required)")
    resume: bool = _opt(False, "continue from RUN_DIR/last.ckpt")
    tensorboard: bool = _opt(False, "TensorBoard scalars (losses, metrics, lr) and validation "
                                    "overlays per epoch in RUN_DIR/tensorboard (needs the "
                                    "tracking extra: pip install 'kvseg[tracking]')")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad option."""
        validate_types(self)
        if self.model not in list_models():
            raise ConfigError(f"model={self.model!r}: expected one of {', '.join(list_models())}")
        if self.size not in SIZES:
            raise ConfigError(f"size={self.size!r}: expected one of {', '.join(SIZES)}")
        for name in ("img_size", "epochs", "batch_size", "n_folds", "val_every"):
            check_number(name, getattr(self, name), integer=True, minimum=1)
        for name in ("context", "fold"):
            check_number(name, getattr(self, name), integer=True, minimum=0)
        check_number("workers", self.workers, integer=True, minimum=0, optional=True)
        check_number("seed", self.seed, integer=True, minimum=0, maximum=MAX_SEED)
        for name in ("weight_decay", "warmup_epochs", "grad_clip", "bce_weight", "dice_weight"):
            check_number(name, getattr(self, name), minimum=0)
        if not self.fold < self.n_folds:
            raise ConfigError(f"fold={self.fold}: must be in [0, n_folds={self.n_folds})")
        if self.test_fold is not None:
            check_number("test_fold", self.test_fold, integer=True, minimum=0,
                         maximum=self.n_folds - 1)
            if self.test_fold == self.fold:
                raise ConfigError(f"test_fold={self.test_fold}: must differ from fold (the "
                                  "validation fold selects the checkpoint)")
        check_number("lr", self.lr, minimum=0, min_open=True)
        check_number("train_fraction", self.train_fraction, minimum=0, maximum=1, min_open=True)
        check_number("encoder_lr_mult", self.encoder_lr_mult, minimum=0, min_open=True)
        if self.pretrained is not None:
            check_pretrained(self.model)
        if self.pretrained_rule not in RULES:
            raise ConfigError(f"pretrained_rule={self.pretrained_rule!r}: expected "
                              f"{', '.join(RULES)}")
        if self.pretrained_layout is not None and self.pretrained_layout not in LAYOUTS:
            raise ConfigError(f"pretrained_layout={self.pretrained_layout!r}: expected "
                              f"{', '.join(LAYOUTS)}")
        check_number("min_lr_ratio", self.min_lr_ratio, minimum=0, maximum=1)
        if self.bce_weight + self.dice_weight == 0:
            raise ConfigError("bce_weight and dice_weight: at least one must be > 0")
        check_data_format(self.data_format)
        if self.task not in ("auto", "multiclass", "multilabel"):
            raise ConfigError(f"task={self.task!r}: expected auto, multiclass or multilabel")
        if self.amp not in AMP_CHOICES:
            raise ConfigError(f"amp={self.amp!r}: expected {', '.join(AMP_CHOICES)}")
        check_number("max_steps_per_epoch", self.max_steps_per_epoch, integer=True, minimum=1,
                     optional=True)
        check_number("time_budget_s", self.time_budget_s, minimum=0, min_open=True,
                     optional=True)
        check_number("threshold", self.threshold, minimum=0, maximum=1, min_open=True,
                     max_open=True)
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ConfigError(f"device={self.device!r}: expected auto, cpu, cuda or cuda:N")
        if not all(isinstance(e, str) for e in self.exclude):
            raise ConfigError(f"exclude={self.exclude!r}: expected a list of case-day ids")
        if "head" in self.model_overrides:
            raise ConfigError("model_overrides.head: use the head option instead")
        if self.model_overrides or self.head is not None:
            _check_model_overrides(self.model, self.size, self.head, self.model_overrides)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RunConfig(TrainConfig):
    """A trained run's config: its :class:`TrainConfig` plus what the data decided when it
    trained (the :data:`DERIVED_KEYS`), as written to ``config.yaml`` and into
    ``best.safetensors``. ``task`` is resolved (``multilabel`` or ``multiclass``).

    Read any run's with :meth:`from_dict` (or :func:`kvseg.training.checkpoint.read_run_config`):
    the defaults for runs written by older versions are applied there and only there.
    """

    in_channels: int = option(1, "input channels of the model (2.5D: slices x channels)")
    num_classes: int = option(1, "output channels of the model")
    classes: list = option([], "class names, in output order (multiclass: without background)")
    precision: str = option("fp32", "the precision it trained in")
    preprocess: dict = option({}, "how the data read an image: channels, window")

    def validate(self) -> None:
        super().validate()
        for name in ("in_channels", "num_classes"):
            check_number(name, getattr(self, name), integer=True, minimum=1)
        if self.task not in ("multiclass", "multilabel"):
            raise ConfigError(f"task={self.task!r}: a run's task is multiclass or multilabel")

    @classmethod
    def from_dict(cls, config: typing.Mapping, source: str = "the run's config") -> RunConfig:
        """A run's config mapping (``config.yaml``, the safetensors metadata) -> RunConfig.

        Keys of other versions that this one does not know are ignored; what older versions did
        not write gets its value for them here: ``task`` multilabel, ``classes`` UW-Madison's when
        there are three (else ``class_0`` ...), ``precision`` fp32, ``preprocess`` one channel,
        no window, ``context`` 0. Raises :class:`CheckpointError` naming ``source`` when it
        lacks what rebuilds the model or does not validate.
        """
        missing = [k for k in ("model", "size", "img_size", "in_channels", "num_classes")
                   if k not in config]
        if missing:
            raise CheckpointError(f"{source}: model config lacks {', '.join(missing)}")
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in config.items() if k in names and v is not None
                  or k in _NULLABLE}
        n = int(values["num_classes"])
        if values.get("task") in (None, "auto"):
            values["task"] = "multilabel"
        if not values.get("classes"):
            values["classes"] = list(CLASSES) if n == len(CLASSES) else [f"class_{i}"
                                                                         for i in range(n)]
        pre = {"window": None, **(values.get("preprocess") or {})}
        pre["channels"] = int(pre.get("channels") or 1)
        values["preprocess"] = pre
        values.setdefault("precision", "fp32")
        values["context"] = int(values.get("context") or 0)
        try:
            return cls(**values)
        except ConfigError as e:
            raise CheckpointError(f"{source}: {e}") from None

    # read-only mapping access, so code written against the earlier config dict keeps working
    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self)]

    def __getitem__(self, key: str):
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default=None):
        return getattr(self, key) if key in self.keys() else default


#: Options whose ``None`` is a value (kept as read), not "not written".
_NULLABLE = tuple(f.name for f in dataclasses.fields(TrainConfig)
                  if type(None) in typing.get_args(typing.get_type_hints(TrainConfig)[f.name]))


def _check_model_overrides(model: str, size: str, head: str | None, overrides: dict) -> None:
    """Unknown preset fields, or values the model cannot be built with, name the option."""
    kw = dict(overrides)
    if head is not None:
        kw["head"] = head
    try:  # on the meta device: shapes only, no memory, no arithmetic
        build_on_meta(model, size=size, img_size=64, **kw)
    except ConfigError as e:
        raise ConfigError(f"model_overrides: {e}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model_overrides {overrides!r}: {e}") from None


def config_defaults() -> dict:
    """``{option: default}`` of :class:`TrainConfig`."""
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(TrainConfig)}


# --------------------------------------------------------------------------- files
CONFIG_DIR = "configs"


def packaged_configs() -> list[str]:
    """Names of the configs shipped in the package (``default``, ``smoke``, ``paper``, ...)."""
    folder = resources.files("kvseg") / CONFIG_DIR
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


#: The packaged configs that are ``kvseg reproduce`` presets.
PRESET_NAMES = ("smoke", "paper", "paper_pretrained", "ablation_smoke", "ablation_paper",
                "sharing_smoke", "reference_smoke")
#: The packaged configs that are ``kvseg train`` configs.
TRAIN_CONFIG_NAMES = ("default", "train_micro", "train_paper")


def config_path(name_or_path: str | os.PathLike, *, option: str = "--config",
                names: tuple[str, ...] | None = None) -> Path:
    """A packaged config name (``smoke``) or a YAML file path -> the file's path.

    ``names`` limits the packaged names accepted (default: all of them).
    """
    text = str(name_or_path)
    names = tuple(packaged_configs()) if names is None else names
    if text in names:
        return Path(str(resources.files("kvseg") / CONFIG_DIR / f"{text}.yaml"))
    path = Path(text)
    if path.suffix.lower() not in (".yaml", ".yml"):
        raise ConfigError(f"{option} {text!r}: expected {', '.join(names)} or a .yaml file")
    if not path.is_file():
        raise FileNotFoundError(f"{option} {text}: no such file")
    return path


def default_config_path() -> Path:
    """The packaged ``kvseg/configs/default.yaml`` (documents every option and its default)."""
    return config_path("default")


def load_config(path: str | os.PathLike | None = None, overrides: dict | None = None, *,
                source: str = "overrides") -> TrainConfig:
    """Defaults <- YAML file ``path`` (a packaged name or a file) <- ``overrides``, validated.

    Unknown keys raise :class:`ConfigError` naming the key and its source (the file, or
    ``source`` for the overrides); bad values name the option. Integers are accepted where
    floats are expected; YAML 1.1 reads ``3e-4`` as a string, so numeric strings are converted
    for float options.
    """
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    sources = [(default_config_path(), read_yaml(default_config_path()))]
    if path is not None:
        p = config_path(path, names=TRAIN_CONFIG_NAMES)
        sources.append((p, read_yaml(p)))
    sources.append((source, dict(overrides or {})))
    merged: dict = {}
    for src, values in sources:
        for key, value in values.items():
            if key in DERIVED_KEYS:
                continue
            if key not in names:
                raise ConfigError(f"{src}: unknown option {key!r}")
            merged[key] = value
    hints = typing.get_type_hints(TrainConfig)
    for key, value in merged.items():
        if _base_type(hints[key]) is float and isinstance(value, str):
            try:
                merged[key] = float(value)
            except ValueError:
                raise ConfigError(f"{key}={value!r}: expected a number") from None
    try:
        return TrainConfig(**merged)
    except ConfigError as e:
        where = next((str(s) for s, v in reversed(sources) if _names_key(e, v)), None)
        if where is not None and where != source:
            raise ConfigError(f"{where}: {e}") from None
        raise


def _names_key(error: Exception, values: dict) -> bool:
    text = str(error)
    return any(text.startswith((f"{k}=", f"{k}:", f"{k} ")) for k in values)


# --------------------------------------------------------------------------- CLI flags
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _scalar(base: type, optional: bool, name: str):
    def parse(text: str):
        if optional and text.lower() in ("none", "null"):
            return None
        if base is str:
            return text
        try:
            value = base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if base is int else 'a number'}, got {text!r}") from None
        return value

    parse.__name__ = base.__name__  # argparse names the type in its error
    return parse


def _key_value(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"{text!r}: the value is not valid YAML") from None


def add_config_flags(parser: argparse.ArgumentParser, cls=TrainConfig, *,
                     skip: tuple[str, ...] = ()) -> None:
    """One ``--option-name`` flag per field of the dataclass ``cls`` (default: TrainConfig).

    Every flag defaults to ``None`` (= not given: the YAML file or the default applies). Booleans
    get ``--x/--no-x``, optional values accept ``none``, lists take several values and dicts
    take ``KEY=VALUE`` pairs (values parsed as YAML, e.g. ``depth=6``).
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get("derived"):
            continue
        hint = hints[f.name]
        base, optional = _base_type(hint), type(None) in typing.get_args(hint)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{f.metadata.get('help', '')} (default: {default})"
        kw: dict = {"dest": f.name, "default": None, "help": help_text}
        if base is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kw)
        elif base is list:
            parser.add_argument(_flag(f.name), nargs="*", metavar="VALUE", **kw)
        elif base is dict:
            parser.add_argument(_flag(f.name), nargs="*", type=_key_value, metavar="KEY=VALUE",
                                **kw)
        else:
            metavar = {int: "N", float: "X"}.get(base, "VALUE")
            parser.add_argument(_flag(f.name), type=_scalar(base, optional, f.name),
                                metavar=metavar, **kw)


def config_to_flags(config: TrainConfig, *, skip: tuple[str, ...] = ()) -> list[str]:
    """The ``kvseg train`` flags that rebuild ``config``: every option that differs from its
    default (the inverse of :func:`add_config_flags` + :func:`overrides_from_args`)."""
    defaults = config_defaults()
    argv: list[str] = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name in skip or value == defaults[f.name]:
            continue
        flag = _flag(f.name)
        if isinstance(value, bool):
            argv.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        elif isinstance(value, dict):
            argv += [flag, *(f"{k}={_yaml_scalar(v)}" for k, v in value.items())]
        elif value is None:
            argv += [flag, "none"]
        else:
            argv += [flag, str(value)]
    return argv


def _yaml_scalar(value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def overrides_from_args(args: argparse.Namespace, cls=TrainConfig) -> dict:
    """The options given on the command line (flags made by :func:`add_config_flags`)."""
    out = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        if isinstance(value, list) and value and isinstance(value[0], tuple):
            value = dict(value)
        elif f.name == "model_overrides" and value == []:
            value = {}
        out[f.name] = value
    return out


__all__ = ["AMP_CHOICES", "DERIVED_KEYS", "PRESET_NAMES", "RESUME_MAY_CHANGE", "TRAIN_CONFIG_NAMES",
           "RunConfig", "TrainConfig", "add_config_flags", "check_number", "config_defaults",
           "config_path", "config_to_flags", "default_config_path", "load_config", "option",
           "overrides_from_args", "packaged_configs", "read_yaml", "validate_types"]

