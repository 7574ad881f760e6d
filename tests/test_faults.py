"""Faults of the second pass (issue 20), across the wings: each is one clear line with exit code
2 (or a refusal naming the file), never a traceback, a silently wrong result or a lost file."""

from __future__ import annotations

import errno
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import SafetensorError

from kvseg import cli
from kvseg.config import load_config
from kvseg.data.synth import generate
from kvseg.errors import CheckpointError, ConfigError, DataError
from kvseg.training import checkpoint as C
from kvseg.utils import atomic_write_text, read_yaml

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "run_v0_1"
MICRO = {"model": "setr_kv", "size": "micro", "img_size": 32, "in_channels": 1,
         "num_classes": 3, "model_overrides": {"dim": 16, "depth": 1, "num_heads": 2}}


def one_line_error(capsys, argv: list[str]) -> str:
    """Run the CLI; assert exit code 2 and a single stderr line; return it."""
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's own checks (flag types)
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, (rc, err)
    return err


@pytest.fixture(scope="module")
def fixture_run(tmp_path_factory) -> tuple[Path, Path]:
    """A copy of the committed 0.1 run and the synthetic twin it trained on."""
    root = tmp_path_factory.mktemp("faults")
    generate(root / "data", cases=3, days=1, slices=4, seed=0)
    shutil.copytree(FIXTURE, root / "run")
    return root / "run", root / "data"


# --------------------------------------------------------------------------- seeds and sizes
@pytest.mark.parametrize("seed", ["-1", str(2**70)])
def test_seeds_numpy_cannot_take_are_one_line(tmp_path, capsys, seed):
    err = one_line_error(capsys, ["synth", "--out", str(tmp_path / "s"), "--seed", seed])
    assert "--seed" in err and ("must be >= 0" in err or "must be <= 4294967295" in err)
    with pytest.raises(ConfigError, match="seed"):
        load_config(None, {"seed": int(seed)})
    assert not (tmp_path / "s").exists()


def test_synth_refuses_a_dataset_the_disk_cannot_hold(tmp_path, capsys):
    err = one_line_error(capsys, ["synth", "--out", str(tmp_path / "s"),
                                  "--cases", str(10**14)])
    assert "on disk" in err and "free" in err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("flags", [["--batch", str(10**8)], ["--img-size", "100000"]])
def test_benchmark_refuses_sizes_memory_cannot_hold_before_allocating(capsys, flags):
    err = one_line_error(capsys, ["benchmark", "--models", "setr_kv", "--size", "micro", *flags])
    assert "need" in err and "GB" in err and "this machine has" in err


# --------------------------------------------------------------------------- weights
def test_weights_holding_nan_are_refused_naming_file_and_tensor(tmp_path):
    model = C.build_model(MICRO)
    path = tmp_path / "best.safetensors"
    C.save_model(path, model, MICRO)
    C.load_model(path)  # finite: loads
    name = next(k for k, v in model.state_dict().items() if v.is_floating_point())
    with torch.no_grad():
        model.state_dict()[name].view(-1)[0] = float("nan")
    C.save_model(path, model, MICRO)
    with pytest.raises(CheckpointError, match=f"{path}: tensor '{name}' holds NaN"):
        C.load_model(path)


def test_non_finite_logits_at_evaluation_are_an_error(fixture_run, monkeypatch):
    from kvseg.inference import ensemble
    from kvseg.inference import evaluate as E

    run, data = fixture_run
    real = ensemble.open_model

    def nan_model(*a, **k):
        model, config = real(*a, **k)
        model.forward = lambda x: torch.full((x.shape[0], 3, *x.shape[2:]), float("nan"))
        return model, config

    monkeypatch.setattr(ensemble, "open_model", nan_model)
    with pytest.raises(CheckpointError, match="NaN or infinite logits"):
        E.evaluate_run(run, data=str(data), out=run / "x.json", device="cpu")
    assert not (run / "x.json").exists()


def test_evaluate_on_data_with_other_classes_names_both_before_the_fold_check(fixture_run,
                                                                               tmp_path):
    from kvseg.inference.evaluate import evaluate_run

    run, _ = fixture_run
    folder = tmp_path / "polyps"
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True)
    for i in range(2):  # two images: a 3-fold check would fail first on today's main
        Image.fromarray(np.full((32, 32), 100, np.uint8)).save(folder / "images" / f"{i}.png")
        mask = np.zeros((32, 32), np.uint8)
        mask[8:20, 8:20] = 255
        Image.fromarray(mask).save(folder / "masks" / f"{i}.png")
    with pytest.raises(DataError, match=r"its classes .* are not the run's "
                                        r"large_bowel, small_bowel, stomach"):
        evaluate_run(run, data=str(folder), device="cpu")


# --------------------------------------------------------------------------- files
def test_attention_keeps_a_users_png_unless_overwrite(fixture_run, tmp_path, capsys):
    run, data = fixture_run
    image = next(data.rglob("*.png"))
    out = tmp_path / "att"
    out.mkdir()
    (out / "attention.png").write_bytes(b"my figure")
    argv = ["attention", "--run", str(run), "--input", str(image), "--out", str(out)]
    err = one_line_error(capsys, argv)
    assert "attention.png" in err and "--overwrite" in err
    assert (out / "attention.png").read_bytes() == b"my figure"
    assert cli.main([*argv, "--overwrite"]) == 0
    assert (out / "attention.png").read_bytes() != b"my figure"
    assert cli.main(argv) == 0  # its own files it replaces
    capsys.readouterr()


def test_a_full_disk_while_best_safetensors_is_written_names_it_and_keeps_the_old(tmp_path):
    model = C.build_model(MICRO)
    path = tmp_path / "best.safetensors"
    C.save_model(path, model, MICRO)
    before = path.read_bytes()

    def full(state, filename, metadata=None):  # what safetensors raises on ENOSPC
        Path(filename).write_bytes(b"partial")
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: '
                              'StorageFull, message: "No space left on device" })')

    mp = pytest.MonkeyPatch()
    mp.setattr(C, "save_file", full)
    try:
        with pytest.raises(OSError) as info:
            C.save_model(path, model, MICRO)
    finally:
        mp.undo()
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert "previous version" in cli._one_line(info.value)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.safetensors"]


def test_a_folder_refusing_the_temporary_file_names_the_real_one(tmp_path, monkeypatch):
    from kvseg import utils as U

    def denied(prefix, suffix, dir):
        raise PermissionError(errno.EACCES, "Permission denied", f"{dir}/{prefix}x{suffix}")

    monkeypatch.setattr(U.tempfile, "mkstemp", denied)
    with pytest.raises(PermissionError) as info:
        atomic_write_text(tmp_path / "report.md", "x")
    assert info.value.filename == str(tmp_path / "report.md")
    assert ".tmp" not in cli._one_line(info.value)


# --------------------------------------------------------------------------- options
def test_duplicate_yaml_keys_are_refused_naming_key_and_lines(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 3\nlr: 0.1\nepochs: 5\n")
    with pytest.raises(ConfigError, match=r"c.yaml: key 'epochs' given twice \(lines 1 and 3\)"):
        read_yaml(path)
    path.write_text("train:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match="'lr' given twice"):
        read_yaml(path)


def test_options_that_would_be_ignored_are_refused(tmp_path, capsys):
    err = one_line_error(capsys, ["predict", "--run", "r", "--input", "i", "--out", "o",
                                  "--min-iou", "0.5"])
    assert "--min-iou" in err and "--precision int8" in err
    err = one_line_error(capsys, ["export", "--run", "r", "--onnx", "m.onnx", "--min-iou", "0.5"])
    assert "--quantize int8" in err
    err = one_line_error(capsys, ["convert", "kvasir", "--src", "a", "--out", "b",
                                  "--lungs", "separate"])
    assert "--lungs" in err and "montgomery" in err


def test_sync_batchnorm_without_cuda_is_refused(tmp_path):
    from kvseg.training.train import train

    config = load_config(None, {"out": str(tmp_path / "r"), "data": str(tmp_path),
                                "device": "cpu", "sync_batchnorm": True})
    with pytest.raises(ConfigError, match="sync_batchnorm: SyncBatchNorm needs CUDA"):
        train(config)


def test_negative_points_are_values_not_flags():
    args = cli.build_parser().parse_args(["attention", "--run", "r", "--input", "i", "--out",
                                          "o", "--points", "-3,-3", "1.5,-2", "--layers", "-1"])
    assert args.points == ["-3,-3", "1.5,-2"] and args.layers == [-1]


def test_a_closed_pipe_ends_quietly():
    """`kvseg config show default | head -1`: the reader leaves; no error, no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "kvseg", "config", "show", "default"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before kvseg writes
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert err == "" and proc.returncode in (0, 141), (proc.returncode, err)


# --------------------------------------------------------------------------- files the user named
def test_export_and_evaluate_do_not_replace_a_users_file(fixture_run, tmp_path, capsys):
    """A file named by --onnx / --out that exists is the user's as far as kvseg knows: one
    line and exit 2, the file untouched; --overwrite replaces it."""
    run, data = fixture_run
    mine = tmp_path / "mine.onnx"
    mine.write_text("mine")
    err = one_line_error(capsys, ["export", "--run", str(run), "--onnx", str(mine)])
    assert "--onnx" in err and "--overwrite" in err and mine.read_text() == "mine"
    metrics = tmp_path / "mine.json"
    metrics.write_text("mine")
    err = one_line_error(capsys, ["evaluate", "--run", str(run), "--data", str(data), "--out",
                                  str(metrics), "--device", "cpu"])
    assert "--out" in err and metrics.read_text() == "mine"
    assert cli.main(["evaluate", "--run", str(run), "--data", str(data), "--out", str(metrics),
                     "--device", "cpu", "--overwrite"]) == 0
    assert "jaccard" in metrics.read_text()


def test_a_package_is_not_written_into_and_run_only_commands_say_so(fixture_run, tmp_path,
                                                                      capsys):
    run, data = fixture_run
    package = tmp_path / "pkg"
    assert cli.main(["package", "--run", str(run), "--out", str(package)]) == 0
    before = sorted(p.name for p in package.iterdir())
    assert cli.main(["evaluate", "--run", str(package), "--data", str(data),
                     "--device", "cpu"]) == 0
    assert sorted(p.name for p in package.iterdir()) == before  # nothing added
    capsys.readouterr()
    err = one_line_error(capsys, ["tune", "--run", str(package), "--data", str(data)])
    assert "a kvseg package, not a run folder" in err
