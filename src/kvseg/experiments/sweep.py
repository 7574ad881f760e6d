"""``kvseg sweep``: does KV hold up as heads, width, depth, resolution or data size change?

Every listed model is trained at every value of every factor, one factor at a time around the
preset's configuration (or, with ``grid``, at every combination), with the same seeds and budget
as ``kvseg reproduce``, through the same job runner (skip finished runs, resume interrupted
ones, refuse mixed settings, parallel runs) and the same profiling and evaluation.

Factors (``--vary NAME=V1,V2,...`` or the preset's ``vary:``):

- any :class:`~kvseg.config.TrainConfig` option: ``img_size``, ``train_fraction`` (a nested,
  case-grouped fraction of the training cases), ``lr``, ``epochs`` ...;
- any field of the model's size preset (set through ``model_overrides``): ``dim``, ``depth``,
  ``num_heads`` (alias ``heads``), ``patch_size``, ``pos_dim``, ``mlp_ratio`` ... A family
  without that field is not run for that factor (e.g. ``patch_size`` is SETR's alone). For CvT,
  whose preset has one value per stage, ``heads``/``num_heads``, ``dim`` and ``depth`` set the
  **last stage** (where most of its attention is) and scale the earlier stages' heads and
  widths by the same ratio (rounded; widths to a multiple of the heads). The reference
  families: UNETR's ``dim`` is its ``hidden_size`` (``mlp_dim`` 4 × it) and ``mlp_ratio`` sets
  ``mlp_dim``; its ``depth`` (12, MONAI's) and SwinUNETR's scalar ``dim``/``depth``/``heads``
  (per stage there: ``feature_size``, ``depths``, ``num_heads`` lists) are refused with one
  line; ``dynunet`` (no attention) is not run for an attention factor.

Runs are stored by configuration: ``OUT/runs/<model>/<tag>/seed<k>`` where ``tag`` is a short
hash of the run's options, so the preset's own configuration, which every factor passes
through, is trained once and shared (``sweep.csv`` still has one row per factor, value, model
and seed). ``--list-runs`` prints one self-contained ``kvseg train`` command per pending run
for a cluster scheduler; running the sweep again afterwards finds them trained and only
evaluates, profiles and reports.

Outputs: ``sweep.csv`` / ``sweep.json`` (``factor, value`` then the results.csv columns),
``report.md`` (per factor: each mode's Jaccard difference to QKV with its 95% interval and the
parameter/MAC saving against the factor's value) and ``sweep_<factor>.png``.
"""

from __future__ import annotations

import csv
import functools
import io
import itertools
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from kvseg.config import TrainConfig, config_defaults, load_config
from kvseg.errors import ConfigError, RunDirError
from kvseg.experiments.report import write_sweep_report
from kvseg.experiments.results import RESULT_COLUMNS
from kvseg.experiments.runner import (
    Job,
    fingerprint,
    pending_jobs,
    run_jobs,
    same_settings,
    untrained_jobs,
)
from kvseg.experiments.shared import (
    Arguments,
    check_arguments,
    log_finished,
    profile_models,
    train_and_evaluate,
)
from kvseg.models.registry import model_info, resolve_config
from kvseg.training.rundir import FolderLock, command_line
from kvseg.utils import atomic_write_text, jsonable

log = logging.getLogger(__name__)

ALIASES = {"heads": "num_heads"}
#: CvT's per-stage fields a scalar factor sets at the last stage.
_CVT_STAGE = {"num_heads": "num_heads", "dim": "dims", "depth": "depths"}
SWEEP_COLUMNS = ("factor", "value", *RESULT_COLUMNS)
#: Options a sweep sets itself, so they cannot be factors: what to use instead.
FIXED = {"model": "--models (every listed model runs at every value)", "seed": "--seeds",
         "out": "--out", "data": "--data", "device": "--device", "resume": "no option"}


@dataclass
class SweepSummary:
    """What :func:`sweep` did (its ``str`` is what the CLI prints)."""

    out: Path
    report: Path | None
    trained: int
    skipped: int
    seconds: float
    commands: list[str] | None = None

    def __str__(self) -> str:
        if self.commands is not None:
            return "\n".join(self.commands) if self.commands else "# every run is finished"
        return (f"{self.trained} run(s) trained, {self.skipped} already complete (skipped); "
                f"{self.seconds:.0f} s\nreport: {self.report}")


def parse_vary(items: list[str] | None) -> dict[str, list]:
    """``["heads=2,4", "img_size=96,128"]`` -> ``{"heads": [2, 4], "img_size": [96, 128]}``
    (each value read as YAML: numbers become numbers)."""
    out: dict[str, list] = {}
    for item in items or []:
        name, sep, values = item.partition("=")
        if not sep or not name or not values:
            raise ConfigError(f"--vary {item!r}: expected NAME=V1,V2,...")
        if name in out:
            raise ConfigError(f"--vary {name}: given twice")
        out[name] = [yaml.safe_load(v) for v in values.split(",")]
    return out


def apply_factor(name: str, value, options: dict, model: str, size: str) -> dict | None:
    """``options`` (TrainConfig options) with factor ``name`` set to ``value`` for ``model``;
    None when the model's family has no such field (it is not run for this factor)."""
    options = {**options, "model_overrides": dict(options.get("model_overrides") or {})}
    if name in config_defaults():
        options[name] = value
        return options
    field = ALIASES.get(name, name)
    preset = resolve_config(model, size, **options["model_overrides"])
    family = model_info(model)["family"]
    if family == "setr_cvt" and field in _CVT_STAGE:
        options["model_overrides"].update(_cvt_last_stage(preset, field, value))
    elif family in _REFERENCE_FIELDS and field in _REFERENCE_FIELDS[family]:
        options["model_overrides"].update(_reference_field(family, field, name, value, preset))
    elif family == "dynunet" and field in _ATTENTION_FACTORS:
        log.info("--vary %s: dynunet has no attention; not run for this factor", name)
        return None
    elif not hasattr(preset, field):
        return None
    else:
        options["model_overrides"][field] = value
    return _without_preset_values(options, model, size)


#: Factors of the paper's Transformers; the CNN reference has none of them.
_ATTENTION_FACTORS = ("dim", "depth", "num_heads", "mlp_ratio", "pos_dim", "qkv_bias")
#: The reference transformers' fields under the paper's factor names: a field to set, or why
#: the factor cannot be set (a refusal, not a silent skip).
_REFERENCE_FIELDS: dict[str, dict[str, str]] = {
    "unetr": {"dim": "hidden_size", "mlp_ratio": "mlp_dim",
              "depth": "MONAI's UNETR has 12 layers (its skips come from layers 3, 6, 9, 12)"},
    "swinunetr": {f: "SwinUNETR sets it per stage: vary feature_size, or depths or "
                     "num_heads as per-stage lists (a preset's vary: section)"
                  for f in ("dim", "depth", "num_heads")},
}


def _reference_field(family: str, field: str, name: str, value, preset) -> dict:
    """The overrides of a paper factor for UNETR / SwinUNETR (:data:`_REFERENCE_FIELDS`):
    UNETR's ``dim`` is its ``hidden_size`` (with ``mlp_dim`` 4 × it, as every preset) and
    ``mlp_ratio`` its ``mlp_dim`` / ``hidden_size``; the rest is a :class:`ConfigError`."""
    target = _REFERENCE_FIELDS[family][field]
    if " " in target:
        if family == "swinunetr" and field == "num_heads" and isinstance(value, (list, tuple)):
            return {"num_heads": value}  # a per-stage list: SwinUNETR's own field
        raise ConfigError(f"--vary {name} for {family}: {target}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"--vary {name}={value!r} for {family}: expected a positive number")
    if target == "hidden_size":
        return {"hidden_size": value, "mlp_dim": 4 * value}
    return {"mlp_dim": round(value * preset.hidden_size)}


def _without_preset_values(options: dict, model: str, size: str) -> dict:
    """Drop overrides equal to the size preset's own values, so that a factor at the preset's
    value is the preset's run (shared by every factor), not a copy of it."""
    plain = resolve_config(model, size)
    kept = {k: v for k, v in options["model_overrides"].items()
            if (tuple(v) if isinstance(v, list) else v) != getattr(plain, k)}
    return {**options, "model_overrides": kept}


def _cvt_last_stage(preset, field: str, value) -> dict:
    """CvT: the last stage takes ``value``; earlier heads and widths scale by the same ratio."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{field}={value!r}: expected a positive integer for CvT")
    heads, dims, depths = list(preset.num_heads), list(preset.dims), list(preset.depths)
    if field == "depth":
        depths[-1] = value
        return {"depths": depths}
    if field == "num_heads":
        heads = [max(1, round(h * value / heads[-1])) for h in heads]
    else:
        scale = value / dims[-1]
        dims = [max(h, round(d * scale / h) * h) for d, h in zip(dims, heads, strict=True)]
        dims[-1] = value
    if any(d % h for d, h in zip(dims, heads, strict=True)):
        raise ConfigError(f"{field}={value}: the CvT stage widths {dims} are not divisible by "
                          f"their heads {heads}")
    return {"num_heads": heads, "dims": dims}


def _points(vary: dict[str, list], grid: bool) -> list[tuple[str, object, dict]]:
    """(factor label, value label, {factor: value}) for every point of the design."""
    if grid:
        names = list(vary)
        return [("grid", ",".join(f"{n}={v}" for n, v in zip(names, combo, strict=True)),
                 dict(zip(names, combo, strict=True)))
                for combo in itertools.product(*(vary[n] for n in names))]
    return [(name, value, {name: value}) for name, values in vary.items() for value in values]


def sweep(data: str | Path, out: str | Path, *, preset: str = "ablation_smoke",
          vary: dict[str, list] | None = None, grid: bool | None = None,
          models: list[str] | tuple[str, ...] = ("all",), seeds: list[int] | None = None,
          device: str = "auto", jobs: int | None = None, margin: float | None = None,
          list_runs: bool = False, modes: list[str] | tuple[str, ...] | None = None,
          progress: bool = True) -> SweepSummary:
    """Run (or list) the sweep and write its results and report (see the module docstring).

    Args:
        data: dataset root (any layout ``build_dataset`` knows).
        out: output folder (owned by this process while it runs).
        preset: a preset name or YAML file (its ``train``, ``models``, ``seeds``, ``vary``).
        vary: factor -> values; overrides the preset's ``vary``.
        grid: every combination instead of one factor at a time (None: the preset's).
        models: ``["all"]`` (the preset's list) or variant names.
        seeds: override the preset's seeds.
        device: ``auto``, ``cpu``, ``cuda``.
        jobs: runs trained at once (None: as ``kvseg reproduce``).
        margin: the verdicts' non-inferiority margin (None: the preset's).
        list_runs: print the pending runs as ``kvseg train`` commands instead of running them.
        modes: attention modes to run (as ``kvseg reproduce``; None: the paper's three).
        progress: the overall progress bar.
    """
    t_start = time.perf_counter()
    out = Path(out)
    args = check_arguments(data, preset=preset, models=models, modes=modes, seeds=seeds,
                           margin=margin, device=device, jobs=jobs)
    cfg = args.preset
    vary = dict(vary) if vary else dict(cfg.vary)
    if not vary:
        raise ConfigError("--vary: name at least one factor (e.g. --vary heads=2,4) or use a "
                          "preset with a vary: section")
    fixed = [name for name in vary if name in FIXED]
    if fixed:
        raise ConfigError("--vary " + "; ".join(f"{n}: cannot be a factor (the sweep sets it; "
                                                 f"use {FIXED[n]})" for n in fixed))
    grid = cfg.grid if grid is None else bool(grid)
    base = {**cfg.train, "data": str(args.data.resolve()), "device": str(device)}
    profile_settings = args.profile_settings
    jobs_by_dir, design = _design(vary, grid, args, base, out)
    if not design:
        raise ConfigError(f"--vary {', '.join(vary)}: no selected model has these fields")
    job_list = list(jobs_by_dir.values())
    if list_runs:
        return SweepSummary(out, None, 0, len(job_list) - len(pending_jobs(job_list)),
                            time.perf_counter() - t_start,
                            commands=[job.train_command() for job in untrained_jobs(job_list)])
    _check_base(out, base, profile_settings)
    with FolderLock(out, command_line()):
        _write_design(out, vary, grid, cfg, base, profile_settings)
        profile_models(job_list, args.device, cfg)
        work = functools.partial(train_and_evaluate, device=str(args.device),
                                 progress=progress and args.jobs == 1)
        results = run_jobs(job_list, work, progress=progress, desc="sweep", n_jobs=args.jobs,
                           threads=cfg.threads, on_done=log_finished)
        rows_by_dir = {r.job.run_dir: r.row for r in results}
        rows = [{"factor": f, "value": v, **rows_by_dir[job.run_dir]} for f, v, job in design]
        write_sweep_results(rows, out)
        report = write_sweep_report(out, rows, vary=vary, grid=grid, preset=cfg,
                                    margin=args.margin, device=str(args.device))
    trained = sum(not r.skipped for r in results)
    return SweepSummary(out, report, trained, len(results) - trained,
                        time.perf_counter() - t_start)


DESIGN = "sweep_design.json"


def _design(vary: dict, grid: bool, args: Arguments, base: dict, out: Path):
    """``(jobs by run folder, design rows (factor, value, job))``: every selected model at every
    point of the design, each seed; equal resolved configurations share one run."""
    size = base.get("size", TrainConfig().size)
    jobs_by_dir: dict[Path, Job] = {}
    design: list[tuple[str, object, Job]] = []  # (factor, value, job) rows of sweep.csv
    for factor, value, point in _points(vary, grid):
        for name in args.models:
            options = {**base, "model": name}
            for f, v in point.items():
                options = apply_factor(f, v, options, name, size) if options else None
            if options is None:
                continue
            try:
                resolved = load_config(None, options).to_dict()
            except ConfigError as e:
                raise ConfigError(f"--vary {factor}={value} for {name}: {e}") from None
            # runs are stored by their resolved options, so equal configurations share a run
            tag = fingerprint({k: v for k, v in resolved.items()
                               if k not in ("data", "device", "out", "seed", "resume")})[:10]
            for seed in args.seeds:
                run_dir = out / "runs" / name / tag / f"seed{seed}"
                if run_dir not in jobs_by_dir:
                    try:
                        config = load_config(None, {**options, "seed": seed,
                                                    "out": str(run_dir)})
                    except ConfigError as e:
                        raise ConfigError(f"--vary {factor}={value} for {name}: {e}") from None
                    jobs_by_dir[run_dir] = Job.make(
                        (name, seed), run_dir, config, profile=args.profile_settings,
                        meta={"profile": run_dir.parent / "profile.json"})
                design.append((factor, value, jobs_by_dir[run_dir]))
    return jobs_by_dir, design


def _check_base(out: Path, base: dict, profile: dict) -> None:
    """Refuse an ``out`` whose sweep used other base settings (training options, data,
    profiling): its runs would sit beside these unnoticed. More factors, values, models or seeds
    are fine: they add runs."""
    path = out / DESIGN
    if not path.is_file():
        return
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RunDirError(f"{path}: unreadable; use another --out") from None
    current = {k: v for k, v in base.items() if k != "device"}
    if not (same_settings(stored.get("base"), current) and stored.get("profile") == profile):
        raise RunDirError(f"{out} holds a sweep with other settings (preset, data or training "
                          "options differ); use another --out")


def _write_design(out: Path, vary: dict, grid: bool, cfg, base: dict, profile: dict) -> None:
    """The factors, values and base settings of this sweep (checked by the next run)."""
    atomic_write_text(out / DESIGN, json.dumps(jsonable(
        {"vary": vary, "grid": grid, "preset": cfg.name, "profile": profile,
         "base": {k: v for k, v in base.items() if k != "device"}}), indent=2) + "\n")


def write_sweep_results(rows: list[dict], out: Path) -> tuple[Path, Path]:
    """sweep.csv (:data:`SWEEP_COLUMNS`; NaN / None as empty cells) and sweep.json."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SWEEP_COLUMNS, lineterminator="\n",
                            extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None or (isinstance(v, float) and math.isnan(v))
                             else v) for k, v in row.items()})
    csv_path, json_path = out / "sweep.csv", out / "sweep.json"
    atomic_write_text(csv_path, buf.getvalue())
    atomic_write_text(json_path, json.dumps(jsonable(rows), indent=2) + "\n")
    return csv_path, json_path


__all__ = ["SWEEP_COLUMNS", "SweepSummary", "apply_factor", "parse_vary", "sweep",
           "write_sweep_results"]
