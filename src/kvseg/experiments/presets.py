"""``kvseg reproduce`` / ``kvseg sweep`` presets: what to run and how to measure it.

A preset is a YAML file (a packaged one: :data:`kvseg.config.PRESET_NAMES`, or the user's),
read by :func:`kvseg.utils.read_yaml` and validated here: an unknown key, or a bad training
option under ``train:``, is one :class:`~kvseg.errors.ConfigError` naming the file.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field

from kvseg.config import (
    PRESET_NAMES,
    config_path,
    load_config,
    option,
    validate_types,
)
from kvseg.errors import ConfigError
from kvseg.utils import check_number, read_yaml


@dataclass
class Preset:
    """A ``kvseg reproduce`` preset: what to run and how to measure it.

    ``train`` holds :class:`TrainConfig` options shared by every run (validated on load; the
    per-run options ``model``, ``seed``, ``out``, ``data``, ``resume`` and ``device`` are set by
    reproduce and may not appear).
    """

    description: str = option("", "one line shown in the report")
    models: list = option(["all"], "variants to run ('all' or names)")
    seeds: list = option([0], "seeds (every variant runs every seed)")
    latency_repeats: int = option(10, "timed batch-1 forward passes (median reported)")
    latency_warmup: int = option(2, "untimed forward passes first")
    latency_threads: int | None = option(None, "torch threads for CPU latency (none = all)")
    num_samples: int = option(4, "validation slices in samples.png")
    threads: int | None = option(None, "torch CPU threads per training run (none = the cores "
                                     "divided by the runs trained at once)")
    margin: float = option(2.0, "non-inferiority margin of the verdicts, in Jaccard points")
    resamples: int = option(2000, "unused (the intervals are analytic); accepted so that "
                                  "older presets load")
    notes: str = option("", "free text (not used)")
    vary: dict = option({}, "kvseg sweep: factor -> list of values (one factor at a time)")
    grid: bool = option(False, "kvseg sweep: every combination of the factors instead")
    train: dict = option({}, "TrainConfig options shared by every run")
    name: str = field(default="", metadata={"derived": True})
    path: str = field(default="", metadata={"derived": True})

    #: Training options reproduce sets per run.
    RUN_KEYS: typing.ClassVar[tuple[str, ...]] = ("model", "seed", "out", "data", "resume",
                                                  "device")

    def __post_init__(self) -> None:
        if isinstance(self.models, str):
            self.models = [self.models]
        validate_types(self)
        for s in self.seeds:
            check_number("seeds", s, integer=True)
        check_number("latency_repeats", self.latency_repeats, integer=True, minimum=1)
        check_number("latency_warmup", self.latency_warmup, integer=True, minimum=0)
        check_number("latency_threads", self.latency_threads, integer=True, minimum=1,
                     optional=True)
        check_number("num_samples", self.num_samples, integer=True, minimum=0)
        check_number("threads", self.threads, integer=True, minimum=1, optional=True)
        check_number("margin", self.margin, minimum=0)
        check_number("resamples", self.resamples, integer=True, minimum=1)
        for factor, values in self.vary.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"vary.{factor}: expected a non-empty list of values")
        for key in self.RUN_KEYS:
            if key in self.train:
                raise ConfigError(f"train.{key} is set per run by kvseg reproduce; remove it")
        load_config(None, self.train, source="train")  # every training option, validated now


def load_preset(preset: str | os.PathLike) -> Preset:
    """Read and validate a preset: a packaged name (``smoke``, ``paper``) or a YAML file."""
    path = config_path(preset, option="--preset", names=PRESET_NAMES)
    data = read_yaml(path)
    keys = [f.name for f in dataclasses.fields(Preset) if not f.metadata.get("derived")]
    unknown = sorted(set(data) - set(keys))
    if unknown:
        raise ConfigError(f"{path}: unknown preset key {unknown[0]!r}; valid: "
                          f"{', '.join(sorted(keys))}")
    name = str(preset) if str(preset) in PRESET_NAMES else path.stem
    try:
        return Preset(**data, name=name, path=str(path))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


__all__ = ["Preset", "load_preset"]
