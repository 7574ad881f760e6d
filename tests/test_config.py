"""kvseg.config: the training options, YAML loading, presets, the generated CLI flags and the one
numeric check."""

from __future__ import annotations

import dataclasses
import math

import pytest
import yaml

from kvseg import cli
from kvseg import config as C
from kvseg.errors import ConfigError
from kvseg.experiments.presets import load_preset


def test_packaged_defaults_equal_the_dataclass():
    assert C.load_config() == C.TrainConfig()
    documented = yaml.safe_load(C.default_config_path().read_text())
    assert set(documented) == {f for f in C.TrainConfig.__dataclass_fields__}
    assert documented == C.config_defaults()


def test_yaml_then_overrides_take_precedence(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("epochs: 7\nlr: 3e-4\nbatch_size: 2\nexclude: [case7_day0]\n")
    c = C.load_config(p, {"batch_size": 5})
    assert (c.epochs, c.lr, c.batch_size, c.exclude) == (7, 3e-4, 5, ["case7_day0"])
    assert c.img_size == C.TrainConfig().img_size


def test_unknown_yaml_key_names_key_and_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("epochs: 2\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"c\.yaml.*learning_rate"):
        C.load_config(p)
    with pytest.raises(ValueError, match="bogus"):
        C.load_config(None, {"bogus": 1})


def test_a_bad_value_in_a_file_names_the_file_and_the_option(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("warmup_epochs: .inf\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: warmup_epochs=inf: must be a finite"):
        C.load_config(p)


@pytest.mark.parametrize(("key", "value"), [
    ("epochs", 0), ("epochs", 2.5), ("batch_size", -1), ("lr", 0.0), ("lr", "fast"),
    ("amp", "fp8"), ("model", "unet"), ("size", "huge"), ("fold", 5), ("threshold", 1.0),
    ("augment", "yes"), ("max_steps_per_epoch", 0), ("time_budget_s", -3.0),
    ("device", "tpu"), ("exclude", "case7_day0"), ("min_lr_ratio", 2.0), ("img_size", None),
    # non-finite numbers are refused for every float option
    ("warmup_epochs", math.inf), ("lr", math.nan), ("weight_decay", math.inf),
    ("grad_clip", math.nan), ("time_budget_s", math.inf), ("dice_weight", math.nan),
    ("threshold", math.nan), ("min_lr_ratio", math.nan),
])
def test_bad_values_name_the_option(key, value):
    with pytest.raises(ConfigError, match=key):
        C.load_config(None, {key: value})


@pytest.mark.parametrize("overrides", [{"depth": 0}, {"num_heads": 5}, {"dim": -8},
                                       {"patch_size": 0}, {"depthh": 2}])
def test_bad_model_overrides_name_the_option(overrides):
    with pytest.raises(ConfigError, match="model_overrides"):
        C.load_config(None, {"model": "setr_kv", "size": "micro", "model_overrides": overrides})


@pytest.mark.parametrize("name", ["train_micro", "train_paper"])
def test_shipped_train_configs_are_valid(name):
    config = C.load_config(name)
    assert config.model == "setr_kv"


def test_check_number_bounds():
    assert C.check_number("n", 3, integer=True, minimum=1) == 3
    for bad, kw in [(0, {"minimum": 1}), (1.0, {"maximum": 1, "max_open": True}),
                    (math.inf, {}), (math.nan, {}), (2.5, {"integer": True}), (True, {}),
                    ("3", {}), (None, {})]:
        with pytest.raises(ConfigError, match=r"^n"):
            C.check_number("n", bad, **kw)
    assert C.check_number("n", None, optional=True) is None


# --------------------------------------------------------------------------- presets
def test_packaged_presets_load():
    for name in ("smoke", "paper"):
        cfg = load_preset(name)
        assert cfg.models and cfg.seeds and cfg.name == name
    assert load_preset("smoke").train["size"] == "micro"
    paper = load_preset("paper").train
    assert paper["size"] == "base" and paper["img_size"] == 256


@pytest.mark.parametrize("content, message", [
    ({"seeds": [0], "bogus": 1}, "unknown preset key 'bogus'"),
    ({"train": {"model": "setr_kv"}}, "train.model is set per run"),
    ({"train": {"epochs": 0}}, "epochs=0"),
    ({"train": {"not_an_option": 1}}, "unknown option 'not_an_option'"),
    ({"latency_repeats": 0}, "latency_repeats=0"),
    ({"seeds": [0.5]}, "seeds"),
])
def test_bad_presets_are_rejected_naming_the_file(tmp_path, content, message):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(ValueError, match=message) as info:
        load_preset(str(path))
    assert "p.yaml" in str(info.value)


def test_configs_exist_once_in_the_package():
    names = C.packaged_configs()
    assert {"default", "smoke", "paper", "train_micro", "train_paper"} <= set(names)
    for name in names:
        assert C.config_path(name).is_file()


# --------------------------------------------------------------------------- CLI flags
def test_every_train_option_is_a_flag(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    for f in dataclasses.fields(C.TrainConfig):
        assert f"--{f.name.replace('_', '-')}" in text, f.name


def test_flags_become_typed_overrides():
    parser = cli.build_parser()
    args = parser.parse_args([
        "train", "--model", "setr_kvpos", "--no-augment", "--exclude", "case1_day0", "case2_day1",
        "--model-overrides", "depth=6", "pos_dim=10", "--max-steps-per-epoch", "none",
        "--lr", "1e-3", "--img-size", "64", "--head", "mla"])
    over = C.overrides_from_args(args)
    assert over == {"model": "setr_kvpos", "augment": False,
                    "exclude": ["case1_day0", "case2_day1"],
                    "model_overrides": {"depth": 6, "pos_dim": 10}, "lr": 1e-3, "img_size": 64,
                    "head": "mla"}
    config = C.load_config(None, over)
    assert config.model_overrides == {"depth": 6, "pos_dim": 10} and config.augment is False


@pytest.mark.parametrize("argv, message", [
    (["train", "--epochs", "two"], "--epochs"),
    (["train", "--lr", "nan"], "lr=nan"),
    (["train", "--warmup-epochs", "inf"], "warmup_epochs=inf"),
    (["train", "--model-overrides", "depth"], "KEY=VALUE"),
    (["export", "--run", "r", "--onnx", "m.onnx", "--img-size", "0"], "--img-size"),
    (["evaluate", "--run", "r", "--batch-size", "-1"], "--batch-size"),
    (["evaluate", "--run", "r", "--slice-thickness", "nan"], "--slice-thickness"),
    (["predict", "--run", "r", "--input", "i", "--out", "o", "--threshold", "1.5"],
     "--threshold"),
    (["predict", "--run", "r", "--input", "i", "--out", "o", "--batch-size", "0"],
     "--batch-size"),
    (["synth", "--out", "o", "--cases", "0"], "--cases"),
    (["synth", "--out", "o", "--slices", "inf"], "--slices"),
    (["profile", "--img-size", "-3"], "--img-size"),
    (["reproduce", "--data", "d", "--out", "o", "--epochs", "0"], "--epochs"),
])
def test_numeric_flags_are_one_line_errors(argv, message, capsys):
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and message in err, err


def test_config_show_prints_the_packaged_file(capsys):
    assert cli.main(["config", "show", "smoke"]) == 0
    assert capsys.readouterr().out == C.config_path("smoke").read_text()
    assert cli.main(["config", "list"]) == 0
    listed = capsys.readouterr().out
    assert "smoke" in listed and "paper" in listed
    assert cli.main(["config", "show", "nope"]) == 2
    assert "not a packaged config" in capsys.readouterr().err


def test_every_named_preset_exists_and_loads():
    for name in C.PRESET_NAMES:
        preset = load_preset(name)
        assert preset.name == name and preset.seeds
