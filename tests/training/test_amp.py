"""Precision: the resolver table (V100, T4, A100, H100, CPU), the training device is the one
asked, CPU bf16 training, the precision stored and checked on resume, evaluate's precision."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from helpers import cli_train_args, train_options
from kvseg import cli
from kvseg.errors import ConfigError
from kvseg.inference.evaluate import evaluate_run
from kvseg.training import precision as P
from kvseg.training import train as T

V100, T4, A100, H100 = (7, 0), (7, 5), (8, 0), (9, 0)
REFUSED = ConfigError


# --------------------------------------------------------------------------- the rule
@pytest.mark.parametrize(("amp", "device_type", "capability", "expected"), [
    # auto: bf16 from Ampere (8.0) on, fp16 with a GradScaler before it, fp32 on the CPU
    ("auto", "cuda", V100, "fp16"),
    ("auto", "cuda", T4, "fp16"),
    ("auto", "cuda", A100, "bf16"),
    ("auto", "cuda", H100, "bf16"),
    ("auto", "cpu", None, "fp32"),
    # bf16: native from 8.0; emulated on V100/T4 is refused; allowed on the CPU
    ("bf16", "cuda", V100, REFUSED),
    ("bf16", "cuda", T4, REFUSED),
    ("bf16", "cuda", A100, "bf16"),
    ("bf16", "cuda", H100, "bf16"),
    ("bf16", "cpu", None, "bf16"),
    # fp16: any GPU, never the CPU
    ("fp16", "cuda", V100, "fp16"),
    ("fp16", "cuda", T4, "fp16"),
    ("fp16", "cuda", A100, "fp16"),
    ("fp16", "cuda", H100, "fp16"),
    ("fp16", "cpu", None, REFUSED),
    # none and fp32: fp32 everywhere
    *[(amp, "cuda", cc, "fp32") for amp in ("none", "fp32") for cc in (V100, T4, A100, H100)],
    ("none", "cpu", None, "fp32"),
    ("fp32", "cpu", None, "fp32"),
])
def test_precision_resolver_table(amp, device_type, capability, expected):
    if expected is REFUSED:
        with pytest.raises(ConfigError, match=f"amp={amp}"):
            P.resolve_precision(amp, device_type, capability)
    else:
        assert P.resolve_precision(amp, device_type, capability) == expected


def test_an_unknown_amp_is_refused_naming_it():
    with pytest.raises(ConfigError, match="amp='fp8'"):
        P.resolve_precision("fp8", "cuda", H100)


@pytest.mark.parametrize(("requested", "device_type", "capability", "run", "expected"), [
    ("auto", "cpu", None, "bf16", "fp32"),      # the CPU default stays fp32
    ("auto", "cuda", A100, "bf16", "bf16"),     # the run's own precision on a GPU that has it
    ("auto", "cuda", H100, "fp16", "fp16"),
    ("auto", "cuda", A100, "fp32", "fp32"),
    ("auto", "cuda", V100, "bf16", "fp16"),     # a bf16 run on a V100: the V100's own auto
    ("auto", "cuda", A100, None, "bf16"),       # runs from before the precision was stored
    ("fp32", "cuda", A100, "bf16", "fp32"),     # asked for explicitly
    ("bf16", "cpu", None, "fp32", "bf16"),
])
def test_inference_precision_follows_the_run_on_cuda(requested, device_type, capability, run,
                                                     expected):
    assert P.inference_precision(requested, device_type, capability, run) == expected


@pytest.mark.parametrize(("requested", "device_type", "capability", "message"), [
    ("fp16", "cpu", None, r"^--precision fp16: needs a CUDA device \(device is cpu\); use fp32"),
    ("bf16", "cuda", V100, r"^--precision bf16: this GPU \(compute capability 7.0\) has no "
                           r"native bf16 .*; use fp16 or auto$"),
    ("none", "cpu", None, r"^--precision none: expected one of auto, fp32, bf16, fp16, int8"),
    ("int8", "cuda", A100, r"^--precision int8: expected one of auto, fp32, bf16, fp16$"),
])
def test_inference_precision_errors_name_the_flag(requested, device_type, capability, message):
    with pytest.raises(ConfigError, match=message):
        P.inference_precision(requested, device_type, capability, None)


def test_the_training_device_is_asked_not_the_current_one(monkeypatch):
    # cuda:0 (current) is an H100, the training device cuda:1 a V100: auto must give fp16
    asked = []

    def capability(index):
        asked.append(index)
        return {0: H100, 1: V100}[index]

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert P.precision_for("auto", torch.device("cuda", 1)) == "fp16"
    assert asked == [1]
    assert P.precision_for("auto", torch.device("cuda")) == "bf16"  # no index: the current
    assert P.precision_for("auto", torch.device("cpu")) == "fp32"


def test_cpu_bf16_autocast_runs_matmuls_in_bf16():
    lin = torch.nn.Linear(8, 4)
    with P.autocast(torch.device("cpu"), "bf16"):
        assert lin(torch.rand(2, 8)).dtype == torch.bfloat16
    with P.autocast(torch.device("cpu"), "fp32"):
        assert lin(torch.rand(2, 8)).dtype == torch.float32


def test_backend_settings_are_restored():
    before = torch.are_deterministic_algorithms_enabled()
    with P.backend_settings(torch.device("cpu"), deterministic=True):
        assert torch.are_deterministic_algorithms_enabled()
    assert torch.are_deterministic_algorithms_enabled() == before


# --------------------------------------------------------------------------- runs
def test_cpu_bf16_run_stores_its_precision_and_evaluate_states_its_own(synth, tmp_path):
    out = tmp_path / "bf16"
    summary = T.train(T.load_config(None, train_options(synth, out, epochs=1, amp="bf16")))
    assert 0 <= summary["best_jaccard"] <= 1
    ckpt = torch.load(out / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["precision"] == "bf16"
    assert yaml.safe_load((out / "config.yaml").read_text())["precision"] == "bf16"
    # config.yaml stays a valid --config (precision is derived, like num_classes)
    assert T.load_config(out / "config.yaml").amp == "bf16"
    # evaluate: auto is fp32 on the CPU, bf16 when asked; the JSON says which
    auto = evaluate_run(out, out=tmp_path / "auto.json", device="cpu")
    assert auto["precision"] == "fp32"
    assert json.loads((tmp_path / "auto.json").read_text())["precision"] == "fp32"
    bf16 = evaluate_run(out, out=tmp_path / "bf16.json", device="cpu", precision="bf16")
    assert bf16["precision"] == "bf16"
    assert bf16["mean"]["jaccard"] == pytest.approx(auto["mean"]["jaccard"], abs=0.05)
    # the command line: --precision for evaluate and predict
    assert cli.main(["evaluate", "--run", str(out), "--out", str(tmp_path / "cli.json"),
                     "--device", "cpu", "--precision", "bf16", "--workers", "0"]) == 0
    assert json.loads((tmp_path / "cli.json").read_text())["precision"] == "bf16"
    assert cli.main(["predict", "--run", str(out), "--input", str(synth), "--out",
                     str(tmp_path / "pred"), "--device", "cpu", "--precision", "bf16"]) == 0
    assert (tmp_path / "pred" / "submission.csv").is_file()
    assert cli.main(["predict", "--run", str(out), "--input", str(synth), "--out",
                     str(tmp_path / "pred16"), "--device", "cpu", "--precision", "fp16"]) == 2


def test_resume_where_amp_resolves_differently_is_one_line(synth, tmp_path, monkeypatch,
                                                            capsys):
    out = tmp_path / "fp32"
    opts = train_options(synth, out, epochs=1)
    T.train(T.load_config(None, opts))
    ckpt = torch.load(out / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["precision"] == "fp32" and ckpt["scaler"] == {}  # a CPU GradScaler, disabled
    before = (out / "last.ckpt").read_bytes()
    # the same options on a "device" where amp: auto resolves to bf16
    monkeypatch.setattr(T, "precision_for", lambda amp, device: "bf16")
    assert cli.main([*cli_train_args(opts), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("kvseg train: error: --resume:")
    assert "trained in fp32" in err and "amp=auto to bf16" in err
    assert (out / "last.ckpt").read_bytes() == before
