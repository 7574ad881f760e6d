"""kvseg sweep: one factor at a time through the job runner; rows, report, plots, skip, list."""

from __future__ import annotations

import csv
import shlex
from pathlib import Path

import pytest
import yaml

from helpers import TINY_PRESET, make_tiny
from kvseg import cli
from kvseg.config import TrainConfig
from kvseg.errors import ConfigError
from kvseg.experiments.sweep import apply_factor, parse_vary, sweep

TINY = {**TINY_PRESET, "latency_repeats": 1, "latency_warmup": 0, "num_samples": 0,
        "models": ["setr_qkv", "setr_kv"]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("sweep"), seed=1, **TINY)


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_two_factors_two_values_rows_report_plots_and_a_rerun_skips(tiny, tmp_path):
    data, preset = tiny
    out = tmp_path / "out"
    vary = {"heads": [2, 4], "depth": [2, 4]}
    s = sweep(data, out, preset=str(preset), vary=vary, device="cpu", jobs=1, progress=False)
    # micro SETR has 4 heads and depth 4: heads=4 and depth=4 are the same run, trained once
    assert s.trained == 2 * 3 and s.skipped == 0
    rows = _rows(out / "sweep.csv")
    assert len(rows) == 2 * 2 * 2 * 1  # factors x values x models x seeds
    assert {(r["factor"], r["value"], r["model"], r["seed"]) for r in rows} == {
        (f, str(v), m, "0") for f in vary for v in vary[f] for m in TINY["models"]}
    by = {(r["factor"], r["value"], r["model"]): r for r in rows}
    assert by[("heads", "4", "setr_kv")]["jaccard"] == by[("depth", "4", "setr_kv")]["jaccard"]
    assert int(by[("depth", "2", "setr_qkv")]["params"]) < int(by[("depth", "4", "setr_qkv")]
                                                                ["params"])
    for f in vary:
        assert (out / f"sweep_{f}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "## heads" in report and "## depth" in report and "[95% CI]" in report
    # one validation patient (3 cases, 3 folds): every verdict row says why there is no
    # interval, and the sweep's comparisons are one Holm family
    verdict_rows = [line for line in report.splitlines() if line.startswith("| 2 | setr |")]
    assert len(verdict_rows) == 2  # heads=2 and depth=2
    assert all("| 1 / 1 / 1 | inconclusive | inconclusive — 1 patient cannot settle a margin"
               in r for r in verdict_rows), verdict_rows
    assert "comparisons**: 4, one family for Holm" in report
    again = sweep(data, out, preset=str(preset), vary=vary, device="cpu", jobs=1,
                  progress=False)
    assert again.trained == 0 and again.skipped == 6
    # the same folder with another budget is refused, not mixed
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**TINY, "train": {**TINY["train"], "epochs": 2}}))
    with pytest.raises(ValueError, match="other settings"):
        sweep(data, out, preset=str(other), vary=vary, device="cpu", jobs=1, progress=False)


def test_list_runs_prints_train_commands_that_the_sweep_then_reports(tiny, tmp_path, capsys):
    data, preset = tiny
    out = tmp_path / "out"
    argv = ["sweep", "--data", str(data), "--out", str(out), "--preset", str(preset),
            "--vary", "img_size=32", "--models", "setr_kv", "--device", "cpu", "--jobs", "1"]
    assert cli.main([*argv, "--list-runs"]) == 0
    commands = [c for c in capsys.readouterr().out.splitlines() if c.startswith("kvseg ")]
    assert len(commands) == 1 and not (out / "runs").exists()
    # the scheduler runs it ...
    args = shlex.split(commands[0])
    assert args[:2] == ["kvseg", "train"] and "--out" in args and "--seed" not in args
    assert cli.main(args[1:]) == 0
    capsys.readouterr()
    # ... and the sweep finds it trained: it only evaluates, profiles and reports
    assert cli.main([*argv, "--list-runs"]) == 0
    assert "every run is finished" in capsys.readouterr().out
    assert cli.main(argv) == 0
    assert len(_rows(out / "sweep.csv")) == 1


def test_factors_map_onto_each_family():
    base = {"size": "micro", "lr": 1e-3}
    assert apply_factor("lr", 5e-4, base, "setr_kv", "micro")["lr"] == 5e-4
    assert apply_factor("heads", 2, base, "setr_kv", "micro")["model_overrides"] == {
        "num_heads": 2}
    assert apply_factor("heads", 4, base, "setr_kv", "micro")["model_overrides"] == {}  # preset
    assert apply_factor("patch_size", 4, base, "setr_conv_kv", "micro") is None  # no such field
    cvt = apply_factor("heads", 8, base, "setr_cvt_kv", "micro")["model_overrides"]
    assert cvt["num_heads"][-1] == 8 and cvt["num_heads"] == [2, 4, 8]  # micro (1, 2, 4) x 2
    depth = apply_factor("depth", 3, base, "setr_cvt_kv", "micro")["model_overrides"]
    assert depth["depths"][-1] == 3
    assert parse_vary(["heads=2,4", "img_size=96"]) == {"heads": [2, 4], "img_size": [96]}
    for bad in (["heads"], ["heads=2", "heads=4"], ["=2"]):
        with pytest.raises(ConfigError, match="--vary"):
            parse_vary(bad)


@pytest.mark.parametrize("name", ["ablation_smoke", "ablation_paper"])
def test_packaged_ablation_presets_build_every_run(tiny, tmp_path, name):
    from kvseg.experiments.presets import load_preset
    from kvseg.experiments.reproduce import resolve_models

    data, _ = tiny
    listed = sweep(data, tmp_path / "out", preset=name, device="cpu", list_runs=True)
    cfg = load_preset(name)
    per_model = 1 + sum(len([v for v in values]) - 1 for values in cfg.vary.values())
    names = resolve_models(cfg.models)
    models = len(names)
    outs = [c.split(" --out ")[1] for c in listed.commands]
    assert len(set(outs)) == len(outs)  # every run once
    if name == "ablation_smoke":
        # one factor at a time: every value once, the preset's own run shared (each factor's
        # values include the preset's value for every family)
        assert len(listed.commands) == per_model * models * len(cfg.seeds)
    else:  # CvT-13's last stage has depth 10, not among the depth values: one run more per mode
        cvt = sum(n.startswith("setr_cvt_") for n in names)
        assert len(listed.commands) == (per_model * models + cvt) * len(cfg.seeds)


def test_seeds_share_their_configurations_run_tag_and_each_folder_names_its_model(tiny, tmp_path):
    """Runs are stored as runs/<model>/<tag>/seed<k>: the tag hashes the configuration, not the
    seed (the seeds of one configuration sit side by side), and the folder's model is the one
    its command trains."""
    data, preset = tiny
    listed = sweep(data, tmp_path / "out", preset=str(preset), vary={"img_size": [32, 48]},
                   models=["setr_qkv", "setr_kv"], seeds=[0, 1], device="cpu", list_runs=True)
    runs: dict[str, dict[str, set[str]]] = {}
    for command in listed.commands:
        args = shlex.split(command)
        run_dir = Path(args[args.index("--out") + 1])
        model, tag, seed = run_dir.parts[-3:]
        trained = args[args.index("--model") + 1] if "--model" in args else TrainConfig().model
        assert trained == model, command  # flags at their default are left out
        runs.setdefault(model, {}).setdefault(tag, set()).add(seed)
    assert sorted(runs) == ["setr_kv", "setr_qkv"]
    for tags in runs.values():
        assert len(tags) == 2 and all(seeds == {"seed0", "seed1"} for seeds in tags.values())


@pytest.mark.parametrize("factor", ["model=setr_qkv,setr_kv", "seed=1,2", "out=a,b"])
def test_factors_the_sweep_sets_itself_are_refused_by_name(tiny, tmp_path, capsys, factor):
    data, preset = tiny
    rc = cli.main(["sweep", "--data", str(data), "--out", str(tmp_path / "o"), "--preset",
                   str(preset), "--vary", factor, "--vary", "img_size=32", "--device", "cpu",
                   "--list-runs"])
    err = capsys.readouterr().err.strip()
    name = factor.split("=")[0]
    assert rc == 2 and len(err.splitlines()) == 1 and f"--vary {name}: cannot be a factor" in err
    assert not (tmp_path / "o").exists()
