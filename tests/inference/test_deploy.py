"""kvseg tune, kvseg package / kvseg.from_pretrained, NIfTI masks of multi-label runs, and
`kvseg config list`: each against an independent computation or the files as written."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

import kvseg
from helpers import train_options
from kvseg import cli
from kvseg.config import packaged_configs
from kvseg.inference.evaluate import evaluate_run
from kvseg.inference.postprocess import Postprocess, small_components
from kvseg.training.checkpoint import load_run
from kvseg.training.train import load_config, train


@pytest.fixture(scope="module")
def run(synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("deploy") / "run"
    train(load_config(None, train_options(synth, out, epochs=1)))
    return out


# --------------------------------------------------------------------------- post-processing
def test_small_components_are_those_below_the_size():
    mask = np.zeros((8, 8), bool)
    mask[0, 0:2] = True  # 2 pixels
    mask[4:7, 4:7] = True  # 9 pixels
    mask[7, 7] = True  # touches the 9-pixel blob diagonally: one 8-connected component of 10
    drop = small_components(mask, 3)
    assert drop.sum() == 2 and drop[0, 0] and drop[0, 1]
    assert not small_components(mask, 0).any() and small_components(mask, 11).sum() == 12


def test_thresholds_map_to_one_half_and_small_components_go():
    post = Postprocess(("a", "b"), (0.2, 0.7), (0, 3))
    probs = torch.rand(2, 2, 16, 16)
    out = post.apply(probs, "multilabel")
    assert torch.equal(out[:, 0] >= 0.5, probs[:, 0] >= 0.2)
    for b in range(2):
        want = (probs[b, 1] >= 0.7).numpy() & ~small_components((probs[b, 1] >= 0.7).numpy(), 3)
        assert np.array_equal((out[b, 1] >= 0.5).numpy(), want)


def test_tune_improves_or_keeps_validation_and_evaluate_reproduces_it(run, capsys):
    assert cli.main(["tune", "--run", str(run), "--device", "cpu"]) == 0
    stored = json.loads((run / "postprocess.json").read_text())
    before, after = np.array(stored["jaccard_before"]), np.array(stored["jaccard_after"])
    assert (after >= before - 1e-12).all()
    res = evaluate_run(run, device="cpu", postprocess=True, out=run / "post.json")
    assert res["mean"]["jaccard"] == pytest.approx(after.mean(), abs=1e-6)
    assert res["postprocess"]["min_size"] == stored["min_size"]
    plain = evaluate_run(run, device="cpu", out=run / "plain.json")  # the library default
    assert plain["postprocess"] is None
    assert plain["mean"]["jaccard"] == pytest.approx(before.mean(), abs=1e-6)
    over = evaluate_run(run, device="cpu", postprocess=True, threshold=0.5, out=run / "o.json")
    assert over["threshold"] == {c: 0.5 for c in stored["classes"]}


def test_a_broken_postprocess_file_is_one_line(run, tmp_path, capsys):
    broken = tmp_path / "run"
    broken.mkdir()
    (broken / "best.safetensors").write_bytes((run / "best.safetensors").read_bytes())
    (broken / "postprocess.json").write_text("{not json")
    rc = cli.main(["evaluate", "--run", str(broken), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "postprocess.json" in err[0]


# --------------------------------------------------------------------------- package
def test_package_writes_the_files_and_from_pretrained_matches_the_run(run, tmp_path, capsys):
    pkg = tmp_path / "pkg"
    assert cli.main(["package", "--run", str(run), "--out", str(pkg)]) == 0
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in pkg.iterdir()}
    config = json.loads((pkg / "config.json").read_text())
    assert config["classes"] and config["task"] == "multilabel" and "input" in config
    card = (pkg / "README.md").read_text()
    assert "setr_kv" in card and "Jaccard" in card and "not for clinical decisions" in card
    model, _ = load_run(run)
    x = torch.rand(2, config["in_channels"], config["img_size"], config["img_size"])
    with torch.no_grad():
        assert torch.allclose(kvseg.from_pretrained(pkg)(x), model(x), atol=1e-5)
    # a second package into its own folder replaces it
    assert cli.main(["package", "--run", str(run), "--out", str(pkg)]) == 0


def test_predict_accepts_a_package_folder(run, synth, tmp_path, capsys):
    pkg = tmp_path / "pkg"
    assert cli.main(["package", "--run", str(run), "--out", str(pkg)]) == 0
    src = sorted((synth / "train").rglob("*.png"))[0]
    for name, where in (("a", run), ("b", pkg)):
        rc = cli.main(["predict", "--run", str(where), "--input", str(src), "--out",
                       str(tmp_path / name), "--device", "cpu", "--no-postprocess"])
        assert rc == 0
    a, b = (np.asarray(Image.open(next((tmp_path / n / "masks").rglob("*.png"))))
            for n in ("a", "b"))
    assert np.array_equal(a, b)


def test_package_refuses_a_folder_it_did_not_write(run, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    rc = cli.main(["package", "--run", str(run), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "notes.txt" in err[0]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"


def test_from_pretrained_takes_a_run_folder_and_refuses_anything_else(run, tmp_path):
    model, config = load_run(run)
    x = torch.rand(2, config["in_channels"], config["img_size"], config["img_size"])
    loaded = kvseg.from_pretrained(run)
    assert not loaded.training
    with torch.no_grad():
        assert torch.allclose(loaded(x), model.eval()(x), atol=1e-6)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    with pytest.raises(kvseg.errors.KvsegError, match="nor a training run"):
        kvseg.from_pretrained(other)


# --------------------------------------------------------------------------- volumes
def test_multilabel_nifti_predictions_are_one_label_volume_per_class(run, tmp_path, capsys):
    rng = np.random.default_rng(0)
    affine = np.diag([0.8, 0.8, 3.0, 1.0])
    nib.save(nib.Nifti1Image((rng.random((40, 36, 3)) * 1000).astype(np.float32), affine),
             str(tmp_path / "vol.nii.gz"))
    out = tmp_path / "out"
    rc = cli.main(["predict", "--run", str(run), "--input", str(tmp_path / "vol.nii.gz"),
                   "--out", str(out), "--device", "cpu", "--threshold", "0.3"])
    assert rc == 0
    classes = json.loads(json.dumps(load_run(run)[1]["classes"]))
    files = sorted(p.name for p in (out / "masks").iterdir())
    assert files == sorted(f"vol_{c}.nii.gz" for c in classes)
    for name in files:
        img = nib.load(str(out / "masks" / name))
        data = np.asanyarray(img.dataobj)
        assert data.shape == (40, 36, 3) and set(np.unique(data)) <= {0, 1}
        assert np.allclose(img.affine, affine)


# --------------------------------------------------------------------------- config list
def test_config_list_keeps_names_and_descriptions_apart_and_groups_the_kinds(capsys):
    assert cli.main(["config", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    entries = [line[2:] for line in lines if line.startswith("  ")]
    width = max(map(len, packaged_configs()))
    assert sorted(e.split()[0] for e in entries) == sorted(packaged_configs())
    for line in entries:
        name = line.split()[0]
        assert line[len(name):width + 2].strip() == ""
    heads = [line for line in lines if not line.startswith("  ")]
    assert heads == ["training configs (kvseg train --config NAME):",
                     "reproduce presets (kvseg reproduce --preset NAME):",
                     "sweep presets (kvseg sweep --preset NAME):"]
    groups: dict[str, set] = {}
    head = lines[0]
    for line in lines:
        if line.startswith("  "):
            groups[head].add(line.split()[0])
        else:
            head = line
            groups[head] = set()
    assert {"default", "train_micro"} <= groups[heads[0]]
    default = next(line for line in lines if line.split()[:1] == ["default"])
    assert default.rstrip().endswith("(kvseg.config.TrainConfig)")  # a whole first sentence
    assert cli.main(["config", "list", "smoke"]) == 2  # list takes no name
    assert "config show smoke" in capsys.readouterr().err
    assert {"smoke", "paper"} <= groups[heads[1]] and "ablation_smoke" in groups[heads[2]]


def test_case_bootstrap_against_a_hand_loop_and_in_the_card(run, tmp_path, capsys):
    from kvseg.inference.package import case_bootstrap

    rng = np.random.default_rng(1)
    cases = [{"case": i // 2, "tp": rng.integers(0, 50, 2).tolist(),
              "fp": rng.integers(0, 20, 2).tolist(), "fn": rng.integers(0, 20, 2).tolist()}
             for i in range(8)]
    est, lo, hi = case_bootstrap(cases, resamples=300, seed=5)
    by_case = {}
    for c in cases:  # days of one case go together
        by_case.setdefault(c["case"], []).append(c)
    keys = sorted(by_case)

    def jac(chosen):
        tp = np.sum([c["tp"] for k in chosen for c in by_case[k]], axis=0)
        fp = np.sum([c["fp"] for k in chosen for c in by_case[k]], axis=0)
        fn = np.sum([c["fn"] for k in chosen for c in by_case[k]], axis=0)
        return float(np.mean(tp / (tp + fp + fn)))

    draws = np.random.default_rng(5).integers(0, len(keys), size=(300, len(keys)))
    hand = [jac([keys[j] for j in row]) for row in draws]
    assert est == pytest.approx(jac(keys), abs=1e-12)
    assert (lo, hi) == pytest.approx(tuple(np.percentile(hand, (2.5, 97.5))), abs=1e-12)
    assert case_bootstrap(cases[:2]) is None  # one case: no interval
    assert case_bootstrap(cases[:4]) is None  # two cases: still none (at least 3)
    evaluate_run(run, device="cpu")  # eval_val.json, as kvseg reproduce leaves it
    assert cli.main(["package", "--run", str(run), "--out", str(tmp_path / "p")]) == 0
    assert "validation fold has 1 case(s)" in (tmp_path / "p" / "README.md").read_text()
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("best.safetensors", "metrics.csv"):
        (copy / name).write_bytes((run / name).read_bytes())
    (copy / "eval_val.json").write_text(json.dumps({"cases": cases}))
    assert cli.main(["package", "--run", str(copy), "--out", str(tmp_path / "q")]) == 0
    est, lo, hi = case_bootstrap(cases)
    card = (tmp_path / "q" / "README.md").read_text()
    assert f"95% interval [{lo:.4f}, {hi:.4f}]" in card
    assert "optimistic" in card and "With only 4 cases" in card  # few cases: said so
    test_cases = [dict(c, tp=[t + 5 for t in c["tp"]]) for c in cases]  # another fold's counts
    (copy / "eval_test.json").write_text(json.dumps({"cases": test_cases}))
    assert cli.main(["package", "--run", str(copy), "--out", str(tmp_path / "r")]) == 0
    card = (tmp_path / "r" / "README.md").read_text()
    est, lo, hi = case_bootstrap(test_cases)
    assert f"Jaccard {est:.4f}, 95% interval [{lo:.4f}, {hi:.4f}]" in card  # the test fold wins
    assert "eval_test.json" in card and "optimistic" not in card


def test_tune_on_a_multiclass_run_sizes_only_and_evaluate_agrees(tmp_path, capsys):
    from data.make import write_folder

    data = write_folder(tmp_path / "data", n=9, k=2, shape=(32, 32))
    out = tmp_path / "run"
    train(load_config(None, train_options(data, out, epochs=1, context=0)))
    assert cli.main(["tune", "--run", str(out), "--device", "cpu"]) == 0
    stored = json.loads((out / "postprocess.json").read_text())
    assert stored["thresholds"] is None and len(stored["min_size"]) == 2
    after = np.array(stored["jaccard_after"])
    assert (after >= np.array(stored["jaccard_before"]) - 1e-12).all()
    res = evaluate_run(out, device="cpu", postprocess=True, tta="flips", out=tmp_path / "e.json")
    assert res["task"] == "multiclass" and res["tta"] == "flips"
    plain = evaluate_run(out, device="cpu", postprocess=True, out=tmp_path / "p.json")
    assert plain["mean"]["jaccard"] == pytest.approx(after.mean(), abs=1e-6)


def test_multiclass_small_components_become_background():
    probs = torch.zeros(1, 3, 8, 8)
    probs[0, 0] = 1.0  # background everywhere ...
    probs[0, :, 0, 0] = torch.tensor([0.1, 0.8, 0.1])  # ... but a 1-pixel class-1 island
    probs[0, :, 4:7, 4:7] = torch.tensor([0.1, 0.1, 0.8]).view(3, 1, 1)  # a 9-pixel class 2
    out = Postprocess(("a", "b"), None, (2, 2)).apply(probs, "multiclass")
    labels = out.argmax(1)[0]
    assert labels[0, 0] == 0 and (labels[4:7, 4:7] == 2).all() and labels.sum() == 18
