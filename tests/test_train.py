"""The trainer on a real micro model and a tiny synthetic twin: config rules, determinism,
SIGKILL + resume equality, NaN stop, run-directory contents."""

from __future__ import annotations

import csv
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from kvseg import cli
from kvseg import train as T
from kvseg.data.synth import generate

RUN_FILES = {"config.yaml", "metrics.csv", "best.safetensors", "last.ckpt", "curves.png"}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "data"
    generate(root, cases=3, days=1, slices=6, seed=0)
    return root


def _opts(data, out, **kw) -> dict:
    opts = dict(model="setr_kv", size="micro", img_size=32, data=str(data), out=str(out),
                epochs=2, batch_size=4, n_folds=3, max_steps_per_epoch=2, lr=1e-3,
                warmup_epochs=0.5, device="cpu", seed=3)
    opts.update(kw)
    return opts


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _without_seconds(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


# --------------------------------------------------------------------------- config
def test_packaged_defaults_equal_the_dataclass():
    assert T.load_config() == T.TrainConfig()
    documented = yaml.safe_load(T.default_config_path().read_text())
    assert set(documented) == {f for f in T.TrainConfig.__dataclass_fields__}


def test_yaml_then_overrides_take_precedence(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("epochs: 7\nlr: 3e-4\nbatch_size: 2\nexclude: [case7_day0]\n")
    c = T.load_config(p, {"batch_size": 5})
    assert (c.epochs, c.lr, c.batch_size, c.exclude) == (7, 3e-4, 5, ["case7_day0"])
    assert c.img_size == T.TrainConfig().img_size


def test_unknown_yaml_key_names_key_and_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("epochs: 2\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"c\.yaml.*learning_rate"):
        T.load_config(p)
    with pytest.raises(ValueError, match="bogus"):
        T.load_config(None, {"bogus": 1})


@pytest.mark.parametrize(("key", "value"), [
    ("epochs", 0), ("epochs", 2.5), ("batch_size", -1), ("lr", 0.0), ("lr", "fast"),
    ("amp", "fp8"), ("model", "unet"), ("size", "huge"), ("fold", 5), ("threshold", 1.0),
    ("augment", "yes"), ("max_steps_per_epoch", 0), ("time_budget_s", -3.0),
    ("device", "tpu"), ("exclude", "case7_day0"), ("min_lr_ratio", 2.0), ("img_size", None),
])
def test_bad_values_name_the_option(key, value):
    with pytest.raises(ValueError, match=key):
        T.load_config(None, {key: value})


def test_amp_on_cpu_is_refused(synth, tmp_path):
    c = T.load_config(None, _opts(synth, tmp_path / "r", amp="bf16"))
    with pytest.raises(ValueError, match="amp"):
        T.train(c)


def test_lr_schedule_warmup_then_cosine():
    warm, total, floor = 4, 20, 0.1
    lams = [T.lr_lambda(s, warm, total, floor) for s in range(total + 1)]
    assert lams[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    for s in range(warm, total + 1):
        t = (s - warm) / (total - warm)
        assert lams[s] == pytest.approx(floor + (1 - floor) * (1 + math.cos(math.pi * t)) / 2)
    assert lams[-1] == pytest.approx(floor)


# --------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def straight(synth, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "straight"
    summary = T.train(T.load_config(None, _opts(synth, out)))
    assert summary["epochs"] == 2 and summary["steps"] == 4
    return out


def test_run_directory_contents(straight):
    assert RUN_FILES <= {p.name for p in straight.iterdir()}
    assert not [p for p in straight.iterdir() if p.name.endswith(".tmp")]
    rows = _rows(straight / "metrics.csv")
    assert list(rows[0]) == list(T.METRIC_COLUMNS)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert [int(r["steps"]) for r in rows] == [2, 4]
    for r in rows:
        for k in ("train_loss", "val_loss", "jaccard", "weighted_jaccard", "dice", "lr"):
            assert math.isfinite(float(r[k]))
        assert 0 <= float(r["jaccard"]) <= 1
    cfg = yaml.safe_load((straight / "config.yaml").read_text())
    assert cfg["model"] == "setr_kv" and cfg["in_channels"] == 1 and cfg["num_classes"] == 3
    # config.yaml is a valid --config (derived keys are ignored)
    assert T.load_config(straight / "config.yaml").epochs == 2
    # best.safetensors is the epoch with the best jaccard
    ckpt = torch.load(straight / "last.ckpt", map_location="cpu", weights_only=True)
    best = max(rows, key=lambda r: float(r["jaccard"]))
    assert ckpt["best"] == pytest.approx(float(best["jaccard"]))
    assert ckpt["epoch"] == 2 and set(ckpt) >= {"optimizer", "scheduler", "scaler", "rng"}
    assert (straight / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_seed_gives_identical_metrics_and_weights(synth, straight, tmp_path):
    T.train(T.load_config(None, _opts(synth, tmp_path / "again")))
    assert _without_seconds(_rows(tmp_path / "again" / "metrics.csv")) == \
        _without_seconds(_rows(straight / "metrics.csv"))
    a = load_file(str(tmp_path / "again" / "best.safetensors"))
    b = load_file(str(straight / "best.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in b)


def _cli_args(opts: dict) -> list[str]:
    args = ["train"]
    for k, v in opts.items():
        if k in ("warmup_epochs",):
            continue
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


@pytest.mark.slow
def test_sigkill_then_resume_equals_straight_run(synth, straight, tmp_path):
    out = tmp_path / "killed"
    opts = _opts(synth, out)
    cfg = tmp_path / "warm.yaml"
    cfg.write_text("warmup_epochs: 0.5\n")
    cmd = [sys.executable, "-m", "kvseg", *_cli_args(opts), "--config", str(cfg)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", T._KILL_HOOK: "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert len(_rows(out / "metrics.csv")) == 1
    env.pop(T._KILL_HOOK)
    proc = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert _without_seconds(_rows(out / "metrics.csv")) == \
        _without_seconds(_rows(straight / "metrics.csv"))
    a = torch.load(out / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(straight / "last.ckpt", map_location="cpu", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    best_a = load_file(str(out / "best.safetensors"))
    best_b = load_file(str(straight / "best.safetensors"))
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_b)


def test_existing_run_needs_resume_and_resume_checks_options(synth, straight):
    with pytest.raises(ValueError, match="resume"):
        T.train(T.load_config(None, _opts(synth, straight)))
    with pytest.raises(ValueError, match="lr"):
        T.train(T.load_config(None, _opts(synth, straight, lr=0.5, resume=True)))


def test_resume_of_a_finished_run_trains_nothing(synth, straight):
    before = (straight / "last.ckpt").read_bytes()
    summary = T.train(T.load_config(None, _opts(synth, straight, resume=True)))
    assert summary["epochs"] == 2 and len(summary["history"]) == 2
    assert (straight / "last.ckpt").read_bytes() == before


def test_nan_loss_stops_naming_epoch_and_step_and_keeps_checkpoint(synth, tmp_path,
                                                                   monkeypatch):
    class NaNAtEpoch2(T.BCEDiceLoss):
        calls = 0

        def forward(self, logits, target):
            loss = super().forward(logits, target)
            if logits.requires_grad:  # training steps only
                NaNAtEpoch2.calls += 1
                if NaNAtEpoch2.calls == 3:  # epoch 2, step 1 (2 steps per epoch)
                    return loss * float("nan")
            return loss

    monkeypatch.setattr(T, "BCEDiceLoss", NaNAtEpoch2)
    out = tmp_path / "nan"
    with pytest.raises(T.NonFiniteLossError, match=r"epoch 2 step 1"):
        T.train(T.load_config(None, _opts(synth, out)))
    ckpt = torch.load(out / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1
    assert len(_rows(out / "metrics.csv")) == 1
    assert issubclass(T.NonFiniteLossError, FloatingPointError)


def test_cli_reports_divergence_in_one_line_and_exits_nonzero(synth, tmp_path, capsys):
    args = _cli_args(_opts(synth, tmp_path / "div", lr=1e30, epochs=1, max_steps_per_epoch=3))
    assert cli.main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("kvseg train: error: non-finite training loss")
    assert "epoch 1 step" in err and len(err.splitlines()) == 1


def test_cli_unknown_config_key_exits_2(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text("epochz: 3\n")
    assert cli.main(["train", "--config", str(p)]) == 2
    assert "epochz" in capsys.readouterr().err


def test_time_budget_stops_after_validating(synth, tmp_path):
    out = tmp_path / "budget"
    s = T.train(T.load_config(None, _opts(synth, out, epochs=50, time_budget_s=1e-3)))
    assert s["stopped_early"] and s["epochs"] == 1 and s["steps"] == 1
    row = _rows(out / "metrics.csv")[0]
    assert row["jaccard"] != "" and (out / "best.safetensors").exists()


@pytest.mark.parametrize("name", ["train_micro.yaml", "train_paper.yaml"])
def test_shipped_train_configs_are_valid(name):
    path = Path(__file__).resolve().parents[1] / "configs" / name
    config = T.load_config(path)
    assert config.model == "setr_kv"
