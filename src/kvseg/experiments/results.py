"""One row of results.csv / results.json as a type, and the writer and reader of those files.

A :class:`ResultRow` is one trained variant and seed: identity (model, family, attention,
seed), cost (params, MACs), accuracy, latency and memory, training time and the run's status.
Its fields are the columns of results.csv, in order (:data:`RESULT_COLUMNS`); results.json holds
the same rows as a list of objects. :func:`write_results` and :func:`read_results` both go
through :class:`ResultRow`, so the files cannot drift from the code that reads them.

Conventions: a metric that was not measured (a diverged run, no CUDA) is NaN in Python, an
empty cell in results.csv and ``null`` in results.json (strict JSON, :func:`jsonable`).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import math
import statistics
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvseg.errors import DataError
from kvseg.layers.attention import MODES
from kvseg.utils import atomic_write_text, jsonable


@dataclass
class ResultRow:
    """One variant trained with one seed: a line of results.csv.

    Attributes:
        model: registered variant name (``setr_kv``).
        family: model family (``setr``, ``setr_conv``, ``setr_cvt``).
        attention: attention mode (``qkv``, ``kv``, ``kv_pos``).
        seed: training seed.
        params: parameter count.
        macs: multiply-accumulates of one forward at batch 1 (:func:`kvseg.profile.count_macs`).
        jaccard: validation Jaccard, mean over the classes.
        weighted_jaccard: validation Jaccard weighted by each class's ground-truth pixels.
        dice: validation Dice, mean over the classes.
        hd95: 95th-percentile Hausdorff distance (mm) per case-day volume, averaged.
        kaggle_score: the UW-Madison competition score (0.4 Dice + 0.6 Hausdorff term).
        latency_ms: median CPU forward time at batch 1 (ms).
        gpu_latency_ms: the same on CUDA (NaN without CUDA).
        peak_mem_mb: peak tensor memory of one CPU forward (MiB, weights excluded).
        gpu_peak_mem_mb: the same on CUDA (NaN without CUDA).
        train_seconds: wall time of training (s).
        epochs: epochs trained (None: not recorded).
        steps: optimiser steps taken (None: not recorded).
        img_size: model input size (pixels, square).
        size: size preset (``micro``, ``base``, ...).
        status: ``ok``, or ``diverged: <reason>`` for a run stopped by a non-finite loss.
        hd95_penalized: HD95 (mm) counting a missed organ or a false alarm as the volume
            diagonal instead of skipping it (:func:`kvseg.metrics.penalized`).
        missed: case-days x classes where the organ is in the ground truth and not predicted.
        false_alarms: case-days x classes predicted where the organ is not.
        cases: results.json only (not a CSV column): per scored case-day (the test fold, or
            the validation fold without one) ``case``, ``day``, the pixel counts ``tp``, ``fp``,
            ``fn`` and ``hd95_mm`` per class, so the report's statistics can be redone from
            the file.

    The float fields are NaN when not measured; construction converts None and empty strings
    to NaN there, numbers given as strings (a CSV cell) to their type, and raises
    :class:`kvseg.errors.DataError` (a ``ValueError``) for a value of the wrong kind.
    """

    model: str
    family: str
    attention: str
    seed: int
    params: int
    macs: int
    jaccard: float = math.nan
    weighted_jaccard: float = math.nan
    dice: float = math.nan
    hd95: float = math.nan
    kaggle_score: float = math.nan
    latency_ms: float = math.nan
    gpu_latency_ms: float = math.nan
    peak_mem_mb: float = math.nan
    gpu_peak_mem_mb: float = math.nan
    train_seconds: float = math.nan
    epochs: int | None = None
    steps: int | None = None
    img_size: int | None = None
    size: str | None = None
    status: str = "ok"
    hd95_penalized: float = math.nan
    missed: int | None = None
    false_alarms: int | None = None
    cases: list | None = dataclasses.field(default=None, metadata={"json_only": True})

    def __post_init__(self) -> None:
        for name, kind in _field_types().items():
            setattr(self, name, _convert(name, getattr(self, name), kind))

    @classmethod
    def from_dict(cls, row: Mapping) -> ResultRow:
        """A row from a mapping of column -> value (a results.json object, a results.csv line).

        Unknown keys raise :class:`kvseg.errors.DataError` (a misspelt column would otherwise
        vanish), as do missing identity and cost columns (model, family, attention, seed,
        params, macs); a missing or None metric is NaN.
        """
        unknown = sorted(set(row) - set(RESULT_COLUMNS) - set(JSON_ONLY))
        if unknown:
            raise DataError(f"result row {row.get('model', '?')!r}: unknown column(s) "
                            f"{', '.join(map(repr, unknown))}; valid: {', '.join(RESULT_COLUMNS)}")
        missing = [c for c in _REQUIRED if c not in row]
        if missing:
            raise DataError(f"result row {row.get('model', '?')!r}: missing column(s) "
                            f"{', '.join(missing)}")
        return cls(**row)

    def to_dict(self) -> dict:
        """Column -> value in column order (NaN kept), then ``cases`` when present."""
        out = {name: getattr(self, name) for name in RESULT_COLUMNS}
        if self.cases is not None:
            out["cases"] = self.cases
        return out

    def to_json(self) -> dict:
        """:meth:`to_dict` as strict JSON (NaN -> None)."""
        return jsonable(self.to_dict())

    def order_key(self) -> tuple:
        """How results are listed: by family, then QKV, KV, KV-pos, then model and seed."""
        mode = MODES.index(self.attention) if self.attention in MODES else len(MODES)
        return self.family, mode, self.model, self.seed


@functools.cache
def _field_types() -> dict[str, object]:
    return typing.get_type_hints(ResultRow)


#: Columns of results.csv, in order (results.json holds the same keys, and :data:`JSON_ONLY`).
RESULT_COLUMNS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(ResultRow)
                                        if not f.metadata.get("json_only"))
#: Keys of a results.json row that are not results.csv columns.
JSON_ONLY: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(ResultRow)
                                   if f.metadata.get("json_only"))
#: The float columns: NaN when not measured; the report averages them over seeds.
METRIC_COLUMNS: tuple[str, ...] = tuple(k for k, t in _field_types().items() if t is float)
_REQUIRED = tuple(f.name for f in dataclasses.fields(ResultRow)
                  if f.default is dataclasses.MISSING)


def _convert(name: str, value, kind):
    if kind == (list | None):
        if value is not None and not isinstance(value, list):
            raise DataError(f"result row: {name}: expected a list")
        return value
    optional = kind in (int | None, str | None)
    if value is None or value == "":
        if kind is float:
            return math.nan
        if optional:
            return None
        raise DataError(f"result row: {name}={value!r}: a value is required")
    try:
        if kind is float:
            return float(value)
        if kind in (int, int | None):
            number = float(value) if isinstance(value, str) and not value.isdigit() else value
            if isinstance(number, (float, np.floating)) and not float(number).is_integer():
                raise ValueError
            return int(number)
        return str(value)
    except (TypeError, ValueError):
        raise DataError(f"result row: {name}={value!r}: expected "
                        f"{'an integer' if kind in (int, int | None) else 'a number'}") from None


def as_rows(rows: Iterable[ResultRow | Mapping]) -> list[ResultRow]:
    """Result rows as :class:`ResultRow` (mappings through :meth:`ResultRow.from_dict`)."""
    return [r if isinstance(r, ResultRow) else ResultRow.from_dict(r) for r in rows]


def write_results(rows: Iterable[ResultRow | Mapping], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``out_dir``/results.csv and results.json, sorted by :meth:`ResultRow.order_key`.

    Args:
        rows: :class:`ResultRow` objects or mappings accepted by :meth:`ResultRow.from_dict`.
        out_dir: the folder (created if missing).

    Returns:
        (csv path, json path). results.csv has the columns :data:`RESULT_COLUMNS` in order and
        an empty cell for NaN / None; results.json is a list of objects with ``null`` there.
    """
    out_dir = Path(out_dir)
    ordered = sorted(as_rows(rows), key=ResultRow.order_key)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=RESULT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in ordered:
        writer.writerow({k: "" if v is None else v for k, v in row.to_json().items()
                         if k in RESULT_COLUMNS})
    csv_path, json_path = out_dir / "results.csv", out_dir / "results.json"
    atomic_write_text(csv_path, buf.getvalue())
    atomic_write_text(json_path, json.dumps([r.to_json() for r in ordered], indent=2) + "\n")
    return csv_path, json_path


def read_results(path: str | Path) -> list[ResultRow]:
    """The rows of a results.csv or results.json (chosen by the suffix), in file order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return as_rows(csv.DictReader(f))
    if path.suffix.lower() == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a list of result rows")
        return as_rows(data)
    raise DataError(f"{path}: expected a .csv or .json results file")


# --------------------------------------------------------------------------- over seeds
#: Metrics averaged over seeds in the report: the float columns of results.csv.
METRICS = METRIC_COLUMNS


def _finite(values: Iterable) -> list[float]:
    out = []
    for v in values:
        if v is None or v == "":
            continue
        v = float(v)
        if math.isfinite(v):
            out.append(v)
    return out


def mean_std(values: Iterable) -> tuple[float, float, int]:
    """(mean, sample std, n) of the finite values; NaN for what is undefined (std needs n ≥ 2)."""
    vals = _finite(values)
    if not vals:
        return math.nan, math.nan, 0
    std = statistics.stdev(vals) if len(vals) > 1 else math.nan
    return statistics.fmean(vals), std, len(vals)


def aggregate(rows: Sequence[ResultRow | Mapping]) -> list[dict]:
    """One dict per model: identity columns, ``seeds`` (n), and ``<metric>_mean/_std``."""
    by_model: dict[str, list[ResultRow]] = {}
    for row in as_rows(rows):
        by_model.setdefault(row.model, []).append(row)
    out = []
    for model, group in sorted(by_model.items(), key=lambda kv: kv[1][0].order_key()[:3]):
        first = group[0]
        agg = {"model": model, "family": first.family, "attention": first.attention,
               "params": first.params, "macs": first.macs, "seeds": len(group)}
        for key in METRICS:
            agg[f"{key}_mean"], agg[f"{key}_std"], _ = mean_std(getattr(r, key) for r in group)
        out.append(agg)
    return out


def value_key(value):
    """Sort factor values numerically where they are numbers, else as text."""
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


def md_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """A markdown table: the one table writer of every report."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)
