"""ResultRow: results.csv/json written and read through one type; the strict-JSON helper."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from kvseg.experiments.report import aggregate, family_deltas, results_table
from kvseg.experiments.results import (
    METRIC_COLUMNS,
    RESULT_COLUMNS,
    ResultRow,
    jsonable,
    read_results,
    write_results,
)


def _row(**kw) -> dict:
    row = {"model": "setr_kv", "family": "setr", "attention": "kv", "seed": 0, "params": 900,
           "macs": 4600, "jaccard": 0.5, "weighted_jaccard": 0.4, "dice": 0.6, "hd95": 12.5,
           "kaggle_score": 0.55, "latency_ms": 3.25, "gpu_latency_ms": math.nan,
           "peak_mem_mb": 1.5, "gpu_peak_mem_mb": math.nan, "train_seconds": 10.0, "epochs": 1,
           "steps": 2, "img_size": 32, "size": "micro", "status": "ok"}
    return {**row, **kw}


def test_columns_are_the_fields_in_the_published_order():
    assert RESULT_COLUMNS == (
        "model", "family", "attention", "seed", "params", "macs", "jaccard", "weighted_jaccard",
        "dice", "hd95", "kaggle_score", "latency_ms", "gpu_latency_ms", "peak_mem_mb",
        "gpu_peak_mem_mb", "train_seconds", "epochs", "steps", "img_size", "size", "status",
        # added for the verdict issue: missed organs count
        "hd95_penalized", "missed", "false_alarms")
    assert METRIC_COLUMNS == ("jaccard", "weighted_jaccard", "dice", "hd95", "kaggle_score",
                              "latency_ms", "gpu_latency_ms", "peak_mem_mb", "gpu_peak_mem_mb",
                              "train_seconds", "hd95_penalized")
    assert list(ResultRow.from_dict(_row()).to_dict()) == list(RESULT_COLUMNS)


def test_from_dict_rejects_unknown_and_missing_columns_and_fills_nan():
    with pytest.raises(ValueError, match="'jacard'"):
        ResultRow.from_dict(_row(jacard=0.5))
    bare = {k: v for k, v in _row().items() if k in ("model", "family", "attention", "seed")}
    with pytest.raises(ValueError, match="params, macs"):
        ResultRow.from_dict(bare)
    row = ResultRow.from_dict({**bare, "params": "900", "macs": 4600.0, "jaccard": None})
    assert row.params == 900 and row.macs == 4600 and isinstance(row.macs, int)
    assert all(math.isnan(getattr(row, k)) for k in METRIC_COLUMNS)
    assert row.epochs is None and row.size is None and row.status == "ok"
    with pytest.raises(ValueError, match="params=1.5"):
        ResultRow.from_dict(_row(params=1.5))
    with pytest.raises(ValueError, match="jaccard='high'"):
        ResultRow.from_dict(_row(jaccard="high"))


def test_to_json_is_strict_json():
    row = ResultRow.from_dict(_row(jaccard=np.float32(0.25), seed=np.int64(3)))
    data = row.to_json()
    assert data["gpu_latency_ms"] is None and data["jaccard"] == 0.25 and data["seed"] == 3
    json.dumps(data, allow_nan=False)  # no NaN token
    assert math.isnan(row.to_dict()["gpu_latency_ms"])


def test_jsonable_converts_nested_values():
    obj = {1: (np.float64(1.5), float("inf"), [np.int32(2), -math.inf]), "b": np.bool_(True),
           "n": None, "s": "x"}
    out = jsonable(obj)
    assert out == {"1": [1.5, None, [2, None]], "b": True, "n": None, "s": "x"}
    assert type(out["1"][0]) is float and type(out["1"][2][0]) is int
    json.dumps(out, allow_nan=False)


def test_write_then_read_round_trips_through_csv_and_json(tmp_path):
    rows = [_row(model="setr_kv", attention="kv", seed=1),
            _row(model="setr_qkv", attention="qkv", seed=0, status="diverged: nan",
                 jaccard=None, params=1000, macs=5000),
            ResultRow.from_dict(_row(model="setr_kvpos", attention="kv_pos", latency_ms=2.0)),
            _row(model="setr_kv", attention="kv", seed=0)]
    csv_path, json_path = write_results(rows, tmp_path)
    with open(csv_path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        lines = list(reader)
    assert header == list(RESULT_COLUMNS)
    # QKV first within a family, then KV, KV-pos; seeds ascending
    assert [(r[0], r[3]) for r in lines] == [("setr_qkv", "0"), ("setr_kv", "0"),
                                             ("setr_kv", "1"), ("setr_kvpos", "0")]
    assert lines[0][RESULT_COLUMNS.index("jaccard")] == ""  # NaN is an empty cell
    assert lines[0][RESULT_COLUMNS.index("latency_ms")] == "3.25"
    assert json.loads(json_path.read_text())[0]["jaccard"] is None
    from_csv, from_json = read_results(csv_path), read_results(json_path)
    expected = [r.to_json() for r in sorted((ResultRow.from_dict(r) if isinstance(r, dict) else r
                                             for r in rows), key=ResultRow.order_key)]
    assert [r.to_json() for r in from_csv] == expected
    assert [r.to_json() for r in from_json] == expected
    assert from_csv[0].status == "diverged: nan" and math.isnan(from_csv[0].jaccard)
    with pytest.raises(ValueError, match=".csv or .json"):
        (tmp_path / "r.txt").write_text("")
        read_results(tmp_path / "r.txt")
    with pytest.raises(FileNotFoundError):
        read_results(tmp_path / "nope.csv")


def test_report_takes_result_rows_and_dicts_alike():
    dicts = [_row(model=f"setr_{m}", attention=a, seed=s, jaccard=j, params=p, macs=mc)
             for m, a, p, mc in (("qkv", "qkv", 1000, 5000), ("kv", "kv", 900, 4600))
             for s, j in ((0, 0.5 if a == "qkv" else 0.52), (1, 0.6 if a == "qkv" else 0.61))]
    typed = [ResultRow.from_dict(d) for d in dicts]
    assert aggregate(typed) == aggregate(dicts)
    assert family_deltas(typed) == family_deltas(dicts)
    assert results_table(typed) == results_table(dicts)
    kv = family_deltas(typed)[0]
    assert kv["jaccard_pts"] == pytest.approx(1.5) and kv["params_pct"] == pytest.approx(-10.0)


def test_per_case_counts_travel_in_json_only(tmp_path):
    from kvseg.experiments.results import JSON_ONLY, ResultRow, read_results, write_results

    cases = [{"case": 1, "day": 0, "tp": [1, 2, 3], "fp": [0, 0, 1], "fn": [2, 0, 0]}]
    row = ResultRow(model="setr_kv", family="setr", attention="kv", seed=0, params=1, macs=2,
                    jaccard=0.5, missed=1, false_alarms=0, cases=cases)
    csv_path, json_path = write_results([row], tmp_path)
    assert "cases" not in csv_path.read_text().splitlines()[0] and JSON_ONLY == ("cases",)
    assert read_results(json_path)[0].cases == cases
    assert read_results(csv_path)[0].cases is None and read_results(csv_path)[0].missed == 1
