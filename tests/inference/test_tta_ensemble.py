"""TTA and ensembles: the one TTA against hand-written flip averages and a flip-equivariant model;
evaluate and predict over several runs against probabilities averaged by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import jaccard_score
from torch import nn

from helpers import train_options
from kvseg import cli
from kvseg.data import build_dataset
from kvseg.inference.ensemble import AveragedModel
from kvseg.inference.evaluate import evaluate_run
from kvseg.inference.tta import activate, probabilities_to_logits, tta_probabilities
from kvseg.training.checkpoint import load_run, read_config, save_model
from kvseg.training.train import load_config, train


class _Conv(nn.Module):
    """Not flip-equivariant: a 3x3 convolution with random (asymmetric) weights."""

    def __init__(self, classes: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, classes, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


class _Symmetric(_Conv):
    """Flip-equivariant by construction: the convolution averaged over the four mirrorings."""

    def forward(self, x):
        dims = ((), (-1,), (-2,), (-2, -1))
        return sum((self.conv(x.flip(d)).flip(d) if d else self.conv(x)) for d in dims) / 4


@pytest.mark.parametrize("task", ["multilabel", "multiclass"])
def test_flips_average_equals_a_hand_written_flip_average(task):
    model, x = _Conv(), torch.rand(2, 1, 9, 11)
    act = (lambda t: t.softmax(1)) if task == "multiclass" else torch.sigmoid
    hand = (act(model(x)) + act(model(x.flip(-1))).flip(-1) + act(model(x.flip(-2))).flip(-2)
            + act(model(x.flip(-2).flip(-1))).flip(-1).flip(-2)) / 4
    with torch.no_grad():
        got = tta_probabilities(model, x, "flips", task)
        one = tta_probabilities(model, x, "flip", task)
    assert torch.allclose(got, hand, atol=1e-6)
    assert torch.allclose(one, (act(model(x)) + act(model(x.flip(-1))).flip(-1)) / 2, atol=1e-6)
    assert not torch.allclose(got, act(model(x)), atol=1e-4)  # the model is not symmetric


def test_a_flip_equivariant_model_is_unchanged_by_tta():
    model, x = _Symmetric(), torch.rand(2, 1, 10, 7)
    with torch.no_grad():
        plain = activate(model(x), "multilabel")
        assert torch.allclose(tta_probabilities(model, x, "flips"), plain, atol=1e-6)
        assert torch.allclose(tta_probabilities(model, x, "flip"), plain, atol=1e-6)


@pytest.mark.parametrize("task", ["multilabel", "multiclass"])
def test_logits_of_averaged_probabilities_give_them_back(task):
    p = torch.rand(3, 4, 5, 5).clamp(0.01, 0.99)
    if task == "multiclass":
        p = p / p.sum(1, keepdim=True)
    assert torch.allclose(activate(probabilities_to_logits(p, task), task), p, atol=1e-5)


@pytest.fixture(scope="module")
def runs(synth, tmp_path_factory):
    base = tmp_path_factory.mktemp("ens")
    out = []
    for seed in (1, 2):
        train(load_config(None, train_options(synth, base / f"run{seed}", seed=seed, epochs=1)))
        out.append(base / f"run{seed}")
    return out


def _val(run):
    _, config = load_run(run)
    ds = build_dataset({**config, "data": config["data"]}, "val", augment=False)
    items = [ds[i] for i in range(len(ds))]
    return torch.stack([it["image"] for it in items]), np.stack([it["mask"].numpy() > 0.5
                                                                for it in items])


def _mean_jaccard(probs: torch.Tensor, target: np.ndarray) -> float:
    pred = (probs >= 0.5).numpy()
    c = pred.shape[1]
    return float(np.mean(jaccard_score(target.transpose(0, 2, 3, 1).reshape(-1, c),
                                       pred.transpose(0, 2, 3, 1).reshape(-1, c),
                                       average=None, zero_division=1.0)))


def test_evaluate_ensemble_with_tta_scores_the_hand_averaged_probabilities(runs, tmp_path):
    x, target = _val(runs[0])
    probs = 0
    for run in runs:
        model, _ = load_run(run)
        with torch.no_grad():
            probs = probs + sum(torch.sigmoid(model(x.flip(d)).flip(d)) if d else
                                torch.sigmoid(model(x)) for d in ((), (-1,), (-2,), (-2, -1))) / 4
    probs = probs / len(runs)
    res = evaluate_run(runs, device="cpu", tta="flips", out=tmp_path / "e.json")
    assert res["mean"]["jaccard"] == pytest.approx(_mean_jaccard(probs, target), abs=1e-6)
    on_disk = json.loads((tmp_path / "e.json").read_text())
    assert on_disk["tta"] == "flips" and on_disk["runs"] == [str(r) for r in runs]


def test_cli_evaluate_tta_and_ensemble_default_outputs(runs, capsys):
    assert cli.main(["evaluate", "--run", str(runs[0]), "--tta", "flips", "--device", "cpu"]) == 0
    assert json.loads((runs[0] / "eval_val_tta-flips.json").read_text())["tta"] == "flips"
    assert cli.main(["evaluate", "--run", *map(str, runs), "--device", "cpu"]) == 0
    assert len(json.loads((runs[0] / "eval_val_ensemble2.json").read_text())["runs"]) == 2
    assert not (runs[0] / "eval_val.json").exists()  # the plain result is not overwritten


def test_predict_ensemble_with_flips_writes_one_mask_per_image(runs, synth, tmp_path, capsys):
    images = sorted((synth / "train").rglob("*.png"))[:4]
    src = tmp_path / "in"
    src.mkdir()
    for i, p in enumerate(images):
        (src / f"img{i}.png").write_bytes(p.read_bytes())
    rc = cli.main(["predict", "--run", *map(str, runs), "--input", str(src), "--out",
                   str(tmp_path / "out"), "--tta", "flips", "--device", "cpu"])
    assert rc == 0
    assert sorted(p.name for p in (tmp_path / "out" / "masks").iterdir()) == [
        f"img{i}.png" for i in range(4)]


def test_averaged_model_of_one_member_and_no_tta_is_the_member(runs):
    model, _ = load_run(runs[0])
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        wrapped = activate(AveragedModel([model], "multilabel")(x), "multilabel")
        assert torch.allclose(wrapped, torch.sigmoid(model(x)), atol=1e-5)


def test_runs_that_disagree_are_one_error_naming_both(runs, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    model, _ = load_run(runs[1])
    config = read_config(runs[1] / "best.safetensors")
    save_model(other / "best.safetensors", model, {**config, "classes": ["a", "b", "c"]})
    rc = cli.main(["evaluate", "--run", str(runs[0]), str(other), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert str(runs[0]) in err[0] and str(other) in err[0] and "classes" in err[0]


@pytest.mark.parametrize("argv, message", [
    (["--tta", "mirror"], "invalid choice"),
    (["--threshold", "1.5"], "--threshold"),
])
def test_bad_inference_options_are_one_line(runs, tmp_path, capsys, argv, message):
    for command in (["evaluate"], ["predict", "--input", str(tmp_path), "--out",
                                   str(tmp_path / "o")]):
        with pytest.raises(SystemExit) as e:
            cli.main([*command, "--run", str(runs[0]), *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and message in err[0]


def test_a_run_named_twice_is_refused(runs, capsys):
    assert cli.main(["evaluate", "--run", str(runs[0]), str(runs[0]), "--device", "cpu"]) == 2
    assert "named twice" in capsys.readouterr().err
