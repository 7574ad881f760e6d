"""kvseg.training.rundir: one owner per output folder (train, reproduce, predict),
run-file checks."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kvseg import cli
from kvseg.errors import RunDirError
from kvseg.training.rundir import LOCK, FolderLock, check_new_run


def test_a_second_owner_is_refused_and_release_removes_the_lock(tmp_path):
    out = tmp_path / "out"
    with FolderLock(out, "kvseg first"):
        assert (out / LOCK).is_file()
        with pytest.raises(RunDirError, match=r"in use by another kvseg process \(pid \d+ .*"
                                              r"`kvseg first`"):
            FolderLock(out, "kvseg second").acquire()
    assert not (out / LOCK).exists()
    with FolderLock(out, "kvseg third"):  # free again
        pass


def test_a_stale_lock_file_does_not_block(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK).write_text('{"pid": 999999, "host": "gone", "command": "x", "started": "t"}')
    with FolderLock(out, "kvseg"):
        pass


def test_a_file_in_the_way_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunDirError, match="not a folder"):
        FolderLock(tmp_path / "f").acquire()


def test_check_new_run_names_the_files_of_another_run(tmp_path):
    check_new_run(tmp_path / "absent")
    check_new_run(tmp_path)
    (tmp_path / "config.yaml").write_text("model: setr_kv\n")  # a run killed in epoch 1
    check_new_run(tmp_path)
    (tmp_path / "metrics.csv").write_text("epoch\n")
    with pytest.raises(RunDirError, match="metrics.csv"):
        check_new_run(tmp_path)
    (tmp_path / "last.ckpt").write_bytes(b"x")
    with pytest.raises(RunDirError, match="--resume"):
        check_new_run(tmp_path)


def _sha(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_predict_into_a_folder_owned_by_another_process_is_one_line(tmp_path, capsys):
    from kvseg import create_model
    from kvseg.training.checkpoint import save_model

    run = tmp_path / "run"
    torch.manual_seed(0)
    model = create_model("setr_kv", size="micro", img_size=32, in_channels=1)
    save_model(run / "best.safetensors", model,
               {"model": "setr_kv", "size": "micro", "img_size": 32, "in_channels": 1,
                "num_classes": 3, "context": 0})
    png = tmp_path / "in" / "a.png"
    png.parent.mkdir()
    Image.fromarray(np.arange(32 * 32, dtype=np.uint16).reshape(32, 32)).save(png)
    out = tmp_path / "preds"
    with FolderLock(out, "kvseg predict (other)"):
        before = _sha(out)
        rc = cli.main(["predict", "--run", str(run), "--input", str(png), "--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and "in use by another" in err, err
        assert _sha(out) == before
    assert cli.main(["predict", "--run", str(run), "--input", str(png), "--out", str(out)]) == 0
    assert (out / "submission.csv").is_file() and not (out / LOCK).exists()


def test_reproduce_into_a_folder_owned_by_another_process_is_one_line(tmp_path, capsys):
    from kvseg.data.synth import generate

    generate(tmp_path / "data", cases=3, days=1, slices=4, seed=0)
    out = tmp_path / "out"
    with FolderLock(out, "kvseg reproduce (other)"):
        rc = cli.main(["reproduce", "--data", str(tmp_path / "data"), "--out", str(out),
                       "--models", "setr_kv"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "in use by another" in err and len(err.splitlines()) == 1, err
    assert not (out / "runs").exists()


@pytest.mark.parametrize("command", ["evaluate", "predict", "export"])
@pytest.mark.parametrize("content", [b"", b"\x00" * 64, "truncate"])
def test_a_corrupt_best_safetensors_is_one_line_for_every_reader(tmp_path, capsys, command,
                                                                  content):
    from kvseg import create_model
    from kvseg.training.checkpoint import save_model

    run = tmp_path / "run"
    model = create_model("setr_kv", size="micro", img_size=32, in_channels=1)
    save_model(run / "best.safetensors", model,
               {"model": "setr_kv", "size": "micro", "img_size": 32, "in_channels": 1,
                "num_classes": 3, "context": 0, "data": str(tmp_path)})
    path = run / "best.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if content == "truncate" else content)
    before = _sha(run)
    png = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32), dtype=np.uint8)).save(png)
    argv = {"evaluate": ["evaluate", "--run", str(run)],
            "predict": ["predict", "--run", str(run), "--input", str(png), "--out",
                        str(tmp_path / "p")],
            "export": ["export", "--run", str(run), "--onnx", str(tmp_path / "m.onnx")]}[command]
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "best.safetensors" in err and "Traceback" not in err
    assert _sha(run) == before


def test_a_failed_command_removes_only_the_empty_folder_it_created(tmp_path):
    made = tmp_path / "new" / "run"
    with pytest.raises(RuntimeError), FolderLock(made, "kvseg"):
        raise RuntimeError("refused")
    assert not made.exists()  # nothing was written: no trace
    kept = tmp_path / "mine"
    kept.mkdir()
    with pytest.raises(RuntimeError), FolderLock(kept, "kvseg"):
        raise RuntimeError("refused")
    assert kept.is_dir()  # the user's folder stays, even empty
    written = tmp_path / "written"
    with pytest.raises(RuntimeError), FolderLock(written, "kvseg"):
        (written / "metrics.csv").write_text("epoch\n")
        raise RuntimeError("failed later")
    assert (written / "metrics.csv").is_file()  # what the command wrote stays
    ok = tmp_path / "ok"
    with FolderLock(ok, "kvseg"):
        pass
    assert ok.is_dir()  # a command that finished keeps its folder


def test_train_refused_on_missing_data_leaves_no_output_folder(tmp_path):
    from kvseg.config import load_config
    from kvseg.training.train import train

    out = tmp_path / "run"
    config = load_config(None, {"model": "setr_qkv", "size": "micro", "img_size": 32,
                                "data": str(tmp_path / "no_such_data"), "out": str(out),
                                "epochs": 1, "device": "cpu"})
    with pytest.raises(Exception):  # noqa: B017 - whichever error the data loader raises
        train(config)
    assert not out.exists()
