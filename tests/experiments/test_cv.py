"""kvseg reproduce --cv: every patient scored once per seed, out of fold, by last-epoch models."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml

from helpers import make_tiny
from kvseg.experiments.cv import fold_options, pool_folds
from kvseg.experiments.reproduce import reproduce


def _row(fold: int, cases: list[dict], **kw) -> dict:
    return {"model": "setr_kv", "family": "setr", "attention": "kv", "seed": 0, "params": 1,
            "macs": 2, "jaccard": 0.0, "train_seconds": 10.0 + fold, "steps": 5, "missed": 1,
            "false_alarms": 0, "cases": cases, **kw}


def _case(case, tp, fp, fn, hd):
    return {"case": case, "day": 0, "tp": tp, "fp": fp, "fn": fn, "hd95_mm": hd}


def test_pool_folds_scores_the_pooled_counts():
    f0 = [_case(1, [4, 0], [1, 0], [0, 2], [2.0, None]), _case(2, [2, 1], [0, 1], [1, 0],
                                                              [4.0, 3.0])]
    f1 = [_case(3, [3, 5], [2, 0], [0, 0], [6.0, 5.0])]
    (row,) = pool_folds({0: [_row(0, f0)], 1: [_row(1, f1)]})
    tp, fp, fn = np.array([9, 6]), np.array([3, 1]), np.array([1, 2])
    assert row["jaccard"] == pytest.approx(np.mean(tp / (tp + fp + fn)))
    assert row["dice"] == pytest.approx(np.mean(2 * tp / (2 * tp + fp + fn)))
    assert row["hd95"] == pytest.approx(np.mean([np.mean([2, 4, 6]), np.mean([3, 5])]))
    assert [c["case"] for c in row["cases"]] == [1, 2, 3]
    assert row["train_seconds"] == pytest.approx(21.0) and row["steps"] == 10
    assert row["missed"] == 2
    with pytest.raises(ValueError, match="patient 1 was scored in two folds"):
        pool_folds({0: [_row(0, f0)], 1: [_row(1, f0[:1])]})
    (bad,) = pool_folds({0: [_row(0, f0)], 1: [_row(1, None, status="diverged: nan")]})
    assert bad["status"] == "diverged: nan" and math.isnan(bad["jaccard"])


def test_fold_options_validate_once_after_the_last_epoch():
    assert fold_options({"epochs": 7, "fold": 0, "lr": 1.0}, 2) == {"epochs": 7, "fold": 2,
                                                                   "lr": 1.0, "val_every": 7}


def test_reproduce_cv_scores_every_patient_once_per_seed(tmp_path):
    data, preset = make_tiny(tmp_path, seed=4)
    out = tmp_path / "out"
    reproduce(data, out, preset=str(preset), models=["setr_qkv", "setr_kv"], device="cpu",
              jobs=1, progress=False, cv=True)
    rows = json.loads((out / "results.json").read_text())
    assert len(rows) == 2
    everyone = {str(c["case"]) for r in rows for c in r["cases"]}
    assert len(everyone) == 3  # the twin's 3 patients, each once per seed
    for r in rows:
        assert sorted(str(c["case"]) for c in r["cases"]) == sorted(everyone)
    for fold in range(3):
        run = out / "runs" / "setr_kv" / "seed0" / f"fold{fold}"
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert cfg["fold"] == fold and cfg["val_every"] == cfg["epochs"]
        scored = json.loads((run / "eval_val.json").read_text())["cases"]
        assert len({c["case"] for c in scored}) == 1  # 3 patients, 3 folds: one held out each
    text = (out / "report.md").read_text()
    assert "Cross-validation over 3 case folds" in text and "--cv" in text
    # a preset that holds out a test fold: --cv scores every fold instead (no fold held out)
    preset.write_text(preset.read_text().replace("n_folds: 3", "n_folds: 3\n  test_fold: 1"))
    listed = reproduce(data, tmp_path / "o2", preset=str(preset), models=["setr_kv"],
                       device="cpu", progress=False, cv=True, list_runs=True)
    assert len(listed.commands) == 3  # one per fold
    assert not any("test-fold" in c or "test_fold" in c for c in listed.commands)
