"""A run folder written by kvseg 0.1.0 (tests/fixtures/run_v0_1, committed: setr_kvpos micro at
32 px, dim 16, depth 1, one epoch on the 3-case synthetic twin below, seed 0) still evaluates,
predicts and exports with today's code, and older configs read with their defaults."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import yaml

from kvseg.config import RunConfig
from kvseg.data.synth import generate
from kvseg.inference.evaluate import evaluate_run
from kvseg.inference.export import export_onnx
from kvseg.inference.predict import predict
from kvseg.training.checkpoint import open_run, read_run_config

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "run_v0_1"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    """A copy of the committed run (evaluate writes into it) and the twin it trained on."""
    root = tmp_path_factory.mktemp("fixture")
    data = root / "data"
    generate(data, cases=3, days=1, slices=4, seed=0)
    shutil.copytree(FIXTURE, root / "run")
    return root / "run", data


def test_it_evaluates_to_its_own_validation_score(run):
    run_dir, data = run
    with open(FIXTURE / "metrics.csv", encoding="utf-8") as f:
        trained = next(csv.DictReader(f))
    result = evaluate_run(run_dir, data=str(data), split="val", device="cpu")
    # the training's validation of the same weights on the same fold (an independent record)
    assert result["mean"]["jaccard"] == pytest.approx(float(trained["jaccard"]), abs=1e-6)
    assert result["mean"]["dice"] == pytest.approx(float(trained["dice"]), abs=1e-6)
    assert result["classes"] == ["large_bowel", "small_bowel", "stomach"]
    assert result["n_slices"] == 4


def test_it_predicts_and_exports(run, tmp_path):
    run_dir, data = run
    summary = predict(run_dir, data, tmp_path / "pred", device="cpu")
    masks = sorted((tmp_path / "pred" / "masks").rglob("*.png"))
    assert len(masks) == 12 and (tmp_path / "pred" / "submission.csv").is_file(), summary
    report = export_onnx(run_dir, tmp_path / "model.onnx")
    assert (tmp_path / "model.onnx").stat().st_size > 0
    assert report.checks and all(diff < 1e-4 for _, diff in report.checks)


def test_the_typed_config_of_the_run():
    config = read_run_config(FIXTURE)
    _, same = open_run(FIXTURE)
    assert config == same
    assert (config.model, config.task, config.in_channels, config.num_classes) == (
        "setr_kvpos", "multilabel", 1, 3)
    assert config.model_overrides == {"dim": 16, "depth": 1, "num_heads": 2,
                                      "decoder_channels": 8}
    assert config["img_size"] == 32 and config.get("nothing") is None  # the old dict reads


def test_older_configs_get_their_defaults_in_one_place():
    written = yaml.safe_load((FIXTURE / "config.yaml").read_text(encoding="utf-8"))
    for key in ("task", "classes", "precision", "preprocess", "context", "threshold"):
        written.pop(key)
    written["an_option_of_another_version"] = 1
    config = RunConfig.from_dict(written)
    assert config.task == "multilabel" and config.precision == "fp32"
    assert config.classes == ["large_bowel", "small_bowel", "stomach"]
    assert config.preprocess == {"channels": 1, "window": None}
    assert (config.context, config.threshold) == (0, 0.5)
    written["num_classes"] = 2
    assert RunConfig.from_dict(written).classes == ["class_0", "class_1"]


def test_a_config_that_cannot_rebuild_the_model_names_what_it_lacks():
    from kvseg.errors import CheckpointError

    written = yaml.safe_load((FIXTURE / "config.yaml").read_text(encoding="utf-8"))
    del written["in_channels"]
    with pytest.raises(CheckpointError, match="lacks in_channels"):
        RunConfig.from_dict(written, source="x/config.yaml")
