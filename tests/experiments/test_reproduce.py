"""kvseg reproduce: a smoke reproduction end to end, resuming, presets, the report's arithmetic."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import make_tiny
from kvseg import cli
from kvseg.experiments.report import (
    aggregate,
    family_deltas,
    mean_std,
    results_table,
    write_results,
)
from kvseg.experiments.reproduce import choose_samples, reproduce, resolve_models
from kvseg.inference.profile import profile_model

ROOT = Path(__file__).resolve().parents[2]
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny synthetic twin and a preset of one epoch, two steps, 32 px."""
    return make_tiny(tmp_path_factory.mktemp("reproduce"), seed=2)


@pytest.mark.slow
def test_smoke_reproduction_writes_every_file_and_a_rerun_skips(tiny, tmp_path):
    data, preset = tiny
    out = tmp_path / "out"
    summary = reproduce(data, out, preset=str(preset), models=["setr_qkv", "setr_kv"],
                        device="cpu", progress=False)
    for name in ("results.csv", "results.json", "report.md", "jaccard_vs_macs.png",
                 "training_curves.png", "samples.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert summary.trained == 2 and summary.skipped == 0
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["attention"], r["seed"]) for r in rows] == [
        ("setr_qkv", "qkv", "0"), ("setr_kv", "kv", "0")]
    for row in rows:
        for key in ("params", "macs", "jaccard", "weighted_jaccard", "dice", "latency_ms",
                    "peak_mem_mb"):
            assert math.isfinite(float(row[key])), (row["model"], key)
        assert 0 <= float(row["jaccard"]) <= 1 and float(row["latency_ms"]) > 0
        assert int(row["steps"]) == 2 and row["family"] == "setr"
    # the KV variant has fewer parameters and MACs than QKV (the Q projections are gone)
    assert int(rows[1]["params"]) < int(rows[0]["params"])
    assert int(rows[1]["macs"]) < int(rows[0]["macs"])
    json_rows = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in json_rows] == ["setr_qkv", "setr_kv"]
    assert json_rows[0]["jaccard"] == pytest.approx(float(rows[0]["jaccard"]))
    # a valid markdown table: header, separator, one line per model, same number of cells
    report = (out / "report.md").read_text()
    table = [line for line in report.splitlines() if line.startswith(("| setr_", "| model"))]
    assert len(table) == 2 + 1  # header + two models
    cells = {len(line.split("|")) for line in table}
    assert len(cells) == 1
    assert "| setr | KV |" in report  # the per-family delta line
    assert "![" in report and "samples.png" in report
    for run in ("setr_qkv", "setr_kv"):
        assert (out / "runs" / run / "seed0" / "done.json").is_file()
        assert (out / "runs" / run / "profile.json").is_file()
    assert "report:" in str(summary) and "setr_kv" in str(summary)

    # a second invocation skips the completed runs and leaves them untouched
    done = out / "runs" / "setr_kv" / "seed0" / "done.json"
    before = done.stat().st_mtime_ns, done.read_text()
    again = reproduce(data, out, preset=str(preset), models=["setr_qkv", "setr_kv"],
                      device="cpu", progress=False)
    assert again.trained == 0 and again.skipped == 2
    assert (done.stat().st_mtime_ns, done.read_text()) == before
    # other settings in the same folder are refused, not mixed
    with pytest.raises(ValueError, match="other settings"):
        reproduce(data, out, preset=str(preset), models=["setr_kv"], epochs=2,
                  device="cpu", progress=False)


def test_resolve_models():
    assert len(resolve_models(["all"])) == 9
    assert resolve_models(["setr_kv", "setr_qkv", "setr_kv"]) == ["setr_kv", "setr_qkv"]
    with pytest.raises(ValueError, match="unknown"):
        resolve_models(["setr_qq"])


def _rows():
    rows = []
    jac = {("a", "qkv"): [0.50, 0.54, 0.52], ("a", "kv"): [0.53, 0.55, 0.57],
           ("a", "kv_pos"): [0.49, 0.50, 0.51]}
    params = {"qkv": 1000, "kv": 900, "kv_pos": 903}
    macs = {"qkv": 5000, "kv": 4600, "kv_pos": 4700}
    for (family, mode), values in jac.items():
        for seed, j in enumerate(values):
            rows.append({"model": f"{family}_{mode}", "family": family, "attention": mode,
                         "seed": seed, "params": params[mode], "macs": macs[mode], "jaccard": j,
                         "weighted_jaccard": j - 0.1, "dice": j + 0.1, "hd95": 10.0 + seed,
                         "latency_ms": 1.0})
    return rows


def test_family_deltas_are_paired_by_seed():
    deltas = {d["attention"]: d for d in family_deltas(_rows())}
    kv = deltas["kv"]
    assert kv["params_pct"] == pytest.approx(-10.0)
    assert kv["macs_pct"] == pytest.approx(-8.0)
    # per-seed differences (points): +3, +1, +5 -> mean 3, sample std 2
    assert kv["jaccard_pts"] == pytest.approx(3.0)
    assert kv["jaccard_pts_std"] == pytest.approx(2.0)
    assert kv["qkv_jaccard_std"] == pytest.approx(100 * statistics.stdev([0.50, 0.54, 0.52]))
    pos = deltas["kv_pos"]
    assert pos["params_pct"] == pytest.approx(-9.7)
    assert pos["jaccard_pts"] == pytest.approx(statistics.fmean([-1.0, -4.0, -1.0]))
    table = results_table(_rows())
    assert "0.520 ± 0.020" in table  # QKV mean ± sample std over the three seeds


def test_mean_std_conventions():
    assert mean_std([1.0, 3.0]) == (2.0, statistics.stdev([1.0, 3.0]), 2)
    m, s, n = mean_std([4.0, None, float("nan")])
    assert (m, n) == (4.0, 1) and math.isnan(s)
    agg = {a["model"]: a for a in aggregate(_rows())}
    assert agg["a_kv"]["jaccard_mean"] == pytest.approx(0.55)
    assert agg["a_kv"]["seeds"] == 3


def test_write_results_columns(tmp_path):
    csv_path, json_path = write_results(_rows(), tmp_path)
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        rows = list(reader)
    for col in ("model", "family", "attention", "seed", "params", "macs", "jaccard",
                "weighted_jaccard", "dice", "hd95", "latency_ms"):
        assert col in header
    assert len(rows) == 9 and len(json.loads(json_path.read_text())) == 9
    assert [r["attention"] for r in rows[:3]] == ["qkv"] * 3  # QKV first within a family


def test_profile_counts_forward_activation_memory():
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 4, 1))
    prof = profile_model(model, (1, 3, 32, 32), repeats=2, warmup=1)
    act = 16 * 32 * 32 * 4 / 2**20  # one float32 16x32x32 activation in MB
    cols = 3 * 9 * 32 * 32 * 4 / 2**20  # the 3x3 conv's im2col workspace, if the kernel uses it
    # the conv and ReLU outputs are alive together at the peak (the weights are not counted)
    assert 2 * act <= prof["peak_mem_mb"] <= 2 * act + cols + 0.01
    assert prof["params"] == 3 * 16 * 9 + 16 + 16 * 4 + 4
    assert prof["macs"] == 32 * 32 * (16 * 3 * 9 + 4 * 16)
    assert prof["latency_ms"] > 0 and math.isnan(prof["gpu_latency_ms"])


def test_choose_samples_prefers_more_classes_and_distinct_scans():
    def item(present, area, scan):
        mask = torch.zeros(3, 4, 4)
        for c in range(present):
            mask[c].view(-1)[:area] = 1
        return {"mask": mask, "case": scan, "day": 0}

    ds = [item(1, 2, 1), item(3, 1, 1), item(3, 5, 1), item(2, 9, 2), item(0, 0, 3)]
    assert choose_samples(ds, 2) == [2, 3]  # best of scan 1 (3 classes, larger), then scan 2
    assert choose_samples(ds, 4) == [1, 2, 3, 4]


@pytest.mark.parametrize("argv, message", [
    (["--data", "{missing}", "--out", "{tmp}/o"], "no such folder"),
    (["--data", "{tmp}", "--out", "{tmp}/o"], "no train.csv"),
    (["--data", "{data}", "--out", "{tmp}/o", "--models", "setr_nope"], "unknown"),
    (["--data", "{data}", "--out", "{tmp}/o", "--preset", "fast"], "expected smoke, paper"),
    (["--data", "{data}", "--out", "{tmp}/o", "--seeds", "1", "1"], "repeated seed"),
])
def test_cli_errors_exit_2_with_one_line(tmp_path, capsys, argv, message):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.csv").write_text("id,class,segmentation\n")
    argv = [a.format(missing=tmp_path / "nope", tmp=tmp_path, data=data) for a in argv]
    rc = cli.main(["reproduce", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and message in err, err


@pytest.mark.slow
def test_a_diverged_variant_is_recorded_and_the_others_reported(tiny, tmp_path, monkeypatch):
    import kvseg.training.train as T

    data, preset = tiny
    real_train = T.train

    def train_that_diverges(config, **kwargs):
        summary = real_train(config, **kwargs)
        if config.model == "setr_kv":
            raise T.NonFiniteLossError("non-finite training loss (nan) at epoch 1 step 2; "
                                       "stopped")
        return summary

    monkeypatch.setattr(T, "train", train_that_diverges)
    # jobs=1: the patched train must run in this process (worker processes import their own)
    summary = reproduce(data, tmp_path / "out", preset=str(preset),
                        models=["setr_qkv", "setr_kv"], device="cpu", jobs=1, progress=False)
    assert summary.trained == 2
    rows = {r["model"]: r for r in json.loads((tmp_path / "out" / "results.json").read_text())}
    assert rows["setr_kv"]["status"].startswith("diverged: non-finite training loss")
    assert rows["setr_kv"]["jaccard"] is None and rows["setr_kv"]["params"] > 0
    assert rows["setr_qkv"]["status"] == "ok" and rows["setr_qkv"]["jaccard"] is not None
    assert "no score (a run diverged)" in (tmp_path / "out" / "report.md").read_text()


def test_runs_stay_valid_when_kvseg_gains_an_option_at_its_default():
    from kvseg.experiments.runner import same_settings as _same_settings

    stored = {"model": "setr_kv", "epochs": 2, "profile": {"latency_repeats": 2}}
    assert _same_settings(stored, {**stored, "pretrained": None})  # new option, default value
    assert not _same_settings(stored, {**stored, "pretrained": "w.safetensors"})
    assert not _same_settings(stored, {**stored, "epochs": 3})
    assert not _same_settings({**stored, "bogus": 1}, stored)
    assert not _same_settings(None, stored)


TIMING = ("latency_ms", "gpu_latency_ms", "peak_mem_mb", "gpu_peak_mem_mb", "train_seconds")


def _scores(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(f)]


@pytest.mark.slow
def test_parallel_runs_give_the_sequential_results_and_resume_after_a_kill(tiny, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    data, preset = tiny
    models, seeds = ["setr_qkv", "setr_kv"], [0, 1]
    seq = reproduce(data, tmp_path / "seq", preset=str(preset), models=models, seeds=seeds,
                    device="cpu", jobs=1, progress=False)
    assert seq.trained == 4
    # a parallel reproduction killed (with its workers) once a first run is done...
    out = tmp_path / "par"
    cmd = [sys.executable, "-m", "kvseg", "reproduce", "--data", str(data), "--out", str(out),
           "--preset", str(preset), "--models", *models, "--seeds", "0", "1", "--device", "cpu",
           "--jobs", "2"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not list(out.glob("runs/*/seed*/done.json")):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list(out.glob("runs/*/seed*/done.json")))
    # ...continues: finished runs are skipped, the rest trained two at a time
    again = reproduce(data, out, preset=str(preset), models=models, seeds=seeds, device="cpu",
                      jobs=2, progress=False)
    assert again.skipped == finished and again.trained == 4 - finished
    assert _scores(out) == _scores(tmp_path / "seq")
    rows = json.loads((out / "results.json").read_text())
    assert all(r["cases"] and set(r["cases"][0]) == {"case", "day", "tp", "fp", "fn", "hd95_mm"}
               and len(r["cases"][0]["hd95_mm"]) == len(r["cases"][0]["tp"]) for r in rows)


def test_the_report_states_intervals_verdicts_and_the_method(tmp_path):
    from kvseg.experiments.report import deltas_table, statistics_text

    rows = _rows()
    table = deltas_table(rows, margin=2.0)
    header = table.splitlines()[0]
    assert "[95% CI]" in header and "patients / scans / seeds" in header
    assert "verdict (95%)" in header and "verdict (Holm, family-wise 95%)" in header
    assert "case-days" not in header
    # seeds only (these rows carry no per-case counts): a t interval over the 3 paired seeds.
    # KV: differences +3, +1, +5 -> 3 ± t(2)·2/√3 = [-1.97, +7.97]: above -2, not worse
    # KV-pos: -1, -4, -1 -> -2 ± t(2)·1 = [-6.30, +2.30]: inconclusive
    lines = {line.split("|")[2].strip(): line for line in table.splitlines()[2:]}
    assert "+3.00 [-1.97, +7.97]" in lines["KV"]
    assert "| – / – / 3 | not worse |" in lines["KV"]  # unadjusted
    # Holm over the two comparisons: KV's test of Δ ≤ -2 has the one-sided p of t(2) at
    # (3 + 2) / (2/√3), doubled: 0.049 < 0.05 alone; Holm multiplies it by the 2 comparisons
    # still open -> 0.099: family-wise the verdict is inconclusive
    from scipy import stats as st

    d = {e["attention"]: e for e in family_deltas(rows, margin=2.0)}["kv"]
    p = 2 * st.t.sf(5 / (2 / math.sqrt(3)), 2)
    assert d["jaccard_p_margin"] == pytest.approx(p, rel=1e-6) and p < 0.05
    assert d["jaccard_p_margin_holm"] == pytest.approx(2 * p, rel=1e-6)
    assert lines["KV"].endswith("| inconclusive — more seeds or data needed; no per-patient "
                                "data: training noise only, for these patients |")
    assert "-2.00 [-6.30, +2.30]" in lines["KV-pos"] and "inconclusive" in lines["KV-pos"]
    text = " ".join(statistics_text(2.0))
    assert "resample" not in text and "2-point" not in text and "margin of 2 points" in text
    assert "patient is the unit" in text and "Holm" in text


def test_a_run_killed_before_its_first_checkpoint_starts_again(tmp_path):
    from kvseg.config import load_config
    from kvseg.experiments.runner import Job, run_jobs

    run_dir = tmp_path / "runs" / "setr_kv" / "seed0"
    run_dir.mkdir(parents=True)
    for name in ("best.safetensors", "metrics.csv", "config.yaml", "eval_val.json"):
        (run_dir / name).write_text("left by a killed run")  # no last.ckpt
    (tmp_path / "runs" / "notes.txt").write_text("mine")
    config = load_config(None, {"model": "setr_kv", "size": "micro", "data": str(tmp_path),
                                "out": str(run_dir)})
    seen = []

    def work(job):
        seen.append(sorted(p.name for p in job.run_dir.iterdir()))
        return {"model": "setr_kv"}

    run_jobs([Job.make(("setr_kv", 0), run_dir, config)], work, progress=False)
    assert seen == [[]] and not config.resume  # a clean start, not a refused one
    assert (tmp_path / "runs" / "notes.txt").read_text() == "mine"


def test_the_verdict_is_read_from_jaccard_not_weighted_jaccard():
    """A fixture where the two metrics disagree: KV is +3 Jaccard points (not worse by the
    2-point margin) but 10 weighted-Jaccard points below QKV in every seed. The report's
    verdict column is the Jaccard's."""
    from kvseg.experiments.report import deltas_table

    rows = _rows()
    for row in rows:
        if row["attention"] == "kv":
            row["weighted_jaccard"] -= 0.10  # QKV's weighted Jaccard stays j - 0.1
    table = deltas_table(rows, margin=2.0)
    lines = {line.split("|")[2].strip(): line for line in table.splitlines()[2:]}
    assert "+3.00 [-1.97, +7.97]" in lines["KV"]
    cells = [c.strip() for c in lines["KV"].split("|")]
    assert "not worse" in cells  # the unadjusted verdict: Jaccard's (weighted Jaccard's: worse)
    assert not any(c.startswith("worse") for c in cells)


def test_a_partly_trained_run_is_listed_and_resumes_at_its_next_epoch(tmp_path):
    """A run stopped after epoch 1 of 2: metrics.csv holds a header and one row. It is still
    untrained (its header is not an epoch), and its listed command resumes at epoch 2."""
    import shlex

    from helpers import train_options
    from kvseg.config import load_config
    from kvseg.data.synth import generate
    from kvseg.experiments.runner import Job, untrained_jobs
    from kvseg.training.train import train

    generate(tmp_path / "data", cases=3, days=1, slices=6, seed=0)
    run_dir = tmp_path / "run"
    config = load_config(None, train_options(tmp_path / "data", run_dir, epochs=2))

    def stop_after_first(epoch, row):
        if epoch == 1 or row.get("epoch") == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, callbacks=(stop_after_first,))
    with open(run_dir / "metrics.csv", newline="") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1]
    job = Job.make(("setr_kv", 3), run_dir, config)
    assert untrained_jobs([job]) == [job]
    args = shlex.split(job.train_command())
    assert args[-1] == "--resume"
    assert cli.main(args[1:]) == 0
    with open(run_dir / "metrics.csv", newline="") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2]
    assert untrained_jobs([job]) == []
