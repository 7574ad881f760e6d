"""kvseg evaluate: the JSON against an independent recomputation (sklearn, MONAI, scipy)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.metrics import HausdorffDistanceMetric
from scipy.spatial.distance import directed_hausdorff
from sklearn.metrics import jaccard_score

from kvseg import cli
from kvseg.data import CLASSES, UWMadison
from kvseg.data.synth import generate
from kvseg.inference.evaluate import evaluate_run, format_results
from kvseg.training.checkpoint import load_run
from kvseg.training.train import load_config, train


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("eval")
    generate(base / "data", cases=3, days=2, slices=6, seed=1)
    out = base / "run"
    train(load_config(None, dict(model="setr_kv", size="micro", img_size=32,
                                 data=str(base / "data"), out=str(out), epochs=1, batch_size=4,
                                 n_folds=3, max_steps_per_epoch=3, lr=2e-3, device="cpu")))
    return out


def _predictions(run: Path):
    model, config = load_run(run)
    ds = UWMadison(config["data"], split="val", fold=config["fold"], n_folds=config["n_folds"],
                   img_size=config["img_size"], context=config["context"])
    items = [ds[i] for i in range(len(ds))]
    with torch.no_grad():
        logits = model(torch.stack([it["image"] for it in items]))
    pred = (torch.sigmoid(logits) >= 0.5).numpy()
    target = np.stack([it["mask"].numpy() > 0.5 for it in items])
    return items, pred, target


def test_evaluate_json_matches_independent_metrics(run, tmp_path):
    out = tmp_path / "m.json"
    res = evaluate_run(run, out=str(out), device="cpu", batch_size=3)
    on_disk = json.loads(out.read_text())
    assert on_disk["mean"] == res["mean"] and on_disk["split"] == "val"
    items, pred, target = _predictions(run)
    assert res["n_slices"] == len(items)
    c = len(CLASSES)
    y = target.transpose(0, 2, 3, 1).reshape(-1, c)
    p = pred.transpose(0, 2, 3, 1).reshape(-1, c)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert res["mean"]["jaccard"] == pytest.approx(
            jaccard_score(y, p, average="macro", zero_division=1.0), abs=1e-6)
        assert res["mean"]["weighted_jaccard"] == pytest.approx(
            jaccard_score(y, p, average="weighted", zero_division=1.0), abs=1e-6)
        per = jaccard_score(y, p, average=None, zero_division=1.0)
    for k, name in enumerate(CLASSES):
        assert res["per_class"][name]["jaccard"] == pytest.approx(per[k], abs=1e-6)

    # per-case 3D metrics: rebuild each case-day volume by hand
    scans = {}
    for i, it in enumerate(items):
        scans.setdefault((it["case"], it["day"]), []).append((it["slice"], i))
    assert [(e["case"], e["day"]) for e in res["cases"]] == list(scans)
    hd_metric = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
    compared = 0
    for entry in res["cases"]:
        idx = [i for _, i in sorted(scans[(entry["case"], entry["day"])])]
        it = items[idx[0]]
        spacing = (3.0, it["spacing"] * it["height"] / 32, it["spacing"] * it["width"] / 32)
        pv, tv = pred[idx], target[idx]  # (D, C, S, S)
        for k, name in enumerate(CLASSES):
            a, b = pv[:, k], tv[:, k]
            den = a.sum() + b.sum()
            assert entry["dice_3d"][name] == pytest.approx(
                1.0 if den == 0 else 2 * (a & b).sum() / den)
            if a.any() and b.any():
                ref = float(hd_metric(torch.from_numpy(a)[None, None].float(),
                                      torch.from_numpy(b)[None, None].float(), spacing=spacing))
                assert entry["hd95_mm"][name] == pytest.approx(ref, rel=1e-5)
                compared += 1
            else:
                assert entry["hd95_mm"][name] is None
        a, b = pv.any(1), tv.any(1)
        if a.any() and b.any():
            pa, pb = np.argwhere(a) / a.shape, np.argwhere(b) / b.shape
            hd = max(directed_hausdorff(pa, pb)[0], directed_hausdorff(pb, pa)[0]) / math.sqrt(3)
            assert entry["kaggle_hausdorff"] == pytest.approx(hd, abs=1e-9)
    assert compared > 0  # the seeded run predicts something; the HD95 check ran
    table = format_results(res)
    assert all(name in table for name in CLASSES) and "kaggle score" in table


def test_cli_evaluate_prints_table_and_writes_default_json(run, capsys):
    assert cli.main(["evaluate", "--run", str(run), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "mean" in printed and "stomach" in printed
    assert json.loads((run / "eval_val.json").read_text())["n_slices"] > 0


def test_cli_slice_thickness_reaches_the_3d_metrics(run, tmp_path):
    out = tmp_path / "thin.json"
    assert cli.main(["evaluate", "--run", str(run), "--device", "cpu", "--out", str(out),
                     "--slice-thickness", "0.5", "--batch-size", "5"]) == 0
    thin = json.loads(out.read_text())
    thick = evaluate_run(run, out=str(tmp_path / "thick.json"), device="cpu")
    assert thin["slice_thickness_mm"] == 0.5 and thick["slice_thickness_mm"] == 3.0
    assert thin["mean"]["jaccard"] == thick["mean"]["jaccard"]
    # thinner slices bring surfaces in neighbouring slices closer: HD95 cannot grow
    for a, b in zip(thin["cases"], thick["cases"], strict=True):
        for name in CLASSES:
            if a["hd95_mm"][name] is not None:
                assert a["hd95_mm"][name] <= b["hd95_mm"][name] + 1e-9


def test_evaluate_missing_run_is_a_user_error(tmp_path, capsys):
    assert cli.main(["evaluate", "--run", str(tmp_path)]) == 2
    assert "best.safetensors" in capsys.readouterr().err


def test_per_case_counts_add_up_to_the_set_and_count_missed_organs(run, tmp_path):
    res = evaluate_run(run, out=str(tmp_path / "m.json"), device="cpu", batch_size=3)
    items, pred, target = _predictions(run)
    c = len(CLASSES)
    for key, op in (("tp", lambda p, t: p & t), ("fp", lambda p, t: p & ~t),
                    ("fn", lambda p, t: ~p & t)):
        summed = [sum(e[key][k] for e in res["cases"]) for k in range(c)]
        assert summed == [int(op(pred[:, k], target[:, k]).sum()) for k in range(c)], key
    # set-level Jaccard from the summed per-case counts is the reported one
    tp, fp, fn = (np.array([sum(e[k][j] for e in res["cases"]) for j in range(c)], float)
                  for k in ("tp", "fp", "fn"))
    jac = np.where(tp + fp + fn > 0, tp / np.maximum(tp + fp + fn, 1), 1.0)
    assert res["mean"]["jaccard"] == pytest.approx(jac.mean(), abs=1e-6)
    # missed organs / false alarms, by hand from the volumes; the penalised HD95 uses them
    scans = {}
    for i, it in enumerate(items):
        scans.setdefault((it["case"], it["day"]), []).append(i)
    for k, name in enumerate(CLASSES):
        missed = sum(target[idx, k].any() and not pred[idx, k].any() for idx in scans.values())
        alarms = sum(pred[idx, k].any() and not target[idx, k].any() for idx in scans.values())
        assert res["per_class"][name]["missed"] == missed
        assert res["per_class"][name]["false_alarms"] == alarms
    for entry in res["cases"]:
        for name in CLASSES:
            hd, pen = entry["hd95_mm"][name], entry["hd95_penalized_mm"][name]
            assert pen == hd or (hd is None and (pen is None or pen > 0))
    assert res["mean"]["missed"] == sum(res["per_class"][n]["missed"] for n in CLASSES)


def test_penalized_hd95_uses_the_volume_diagonal():
    from kvseg.training.metrics import penalized, volume_diagonal_mm

    diag = volume_diagonal_mm((4, 10, 20), (3.0, 1.5, 1.0))
    assert diag == pytest.approx(math.sqrt(12**2 + 15**2 + 20**2))
    assert penalized(7.0, True, True, diag) == 7.0
    assert penalized(math.nan, False, True, diag) == diag  # missed organ
    assert penalized(math.nan, True, False, diag) == diag  # false alarm
    assert math.isnan(penalized(math.nan, False, False, diag))


def test_split_test_scores_the_held_out_fold_only(tmp_path, capsys):
    """A run with test_fold: evaluate --split test scores exactly that fold's patients
    (data.splits.case_folds), which the run's training split does not hold."""
    from kvseg.data import build_dataset
    from kvseg.data.splits import case_folds

    generate(tmp_path / "data", cases=4, days=1, slices=4, seed=3)
    out = tmp_path / "run"
    opts = dict(model="setr_kv", size="micro", img_size=32, data=str(tmp_path / "data"),
                out=str(out), epochs=1, batch_size=4, n_folds=4, fold=0, test_fold=2,
                max_steps_per_epoch=1, device="cpu")
    train(load_config(None, opts))
    res = evaluate_run(out, split="test", device="cpu")
    every = {r.case for r in build_dataset(opts, "all").records}
    held = {c for c, k in case_folds(every, 4).items() if k == 2}
    assert {c["case"] for c in res["cases"]} == held and res["split"] == "test"
    assert not held & {r.case for r in build_dataset(opts, "train").records}
    assert cli.main(["evaluate", "--run", str(out), "--split", "test", "--device", "cpu"]) == 0
    assert (out / "eval_test.json").is_file()
    capsys.readouterr()


def test_split_test_of_a_run_without_a_test_fold_is_one_line(run, capsys):
    assert cli.main(["evaluate", "--run", str(run), "--split", "test", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "no test_fold" in err and "Traceback" not in err
