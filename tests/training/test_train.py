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

from helpers import cli_train_args, train_options
from kvseg import cli
from kvseg.training import train as T

RUN_FILES = {"config.yaml", "metrics.csv", "best.safetensors", "last.ckpt", "curves.png"}


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _without_seconds(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


# --------------------------------------------------------------------------- config
def test_amp_on_cpu_is_refused(synth, tmp_path):
    # fp16 autocast needs CUDA; bf16 is allowed on the CPU (tests/test_amp.py)
    c = T.load_config(None, train_options(synth, tmp_path / "r", amp="fp16"))
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
    summary = T.train(T.load_config(None, train_options(synth, out)))
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
    T.train(T.load_config(None, train_options(synth, tmp_path / "again")))
    assert _without_seconds(_rows(tmp_path / "again" / "metrics.csv")) == \
        _without_seconds(_rows(straight / "metrics.csv"))
    a = load_file(str(tmp_path / "again" / "best.safetensors"))
    b = load_file(str(straight / "best.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in b)


KILL_AFTER_EPOCH_1 = """
import os, signal, sys
from kvseg.config import load_config
from kvseg.training.train import train

def kill(epoch, row):  # SIGKILL right after epoch 1's files are written
    if epoch == 1:
        os.kill(os.getpid(), signal.SIGKILL)

train(load_config(sys.argv[1]), callbacks=[kill])
"""


@pytest.mark.slow
def test_sigkill_then_resume_equals_straight_run(synth, straight, tmp_path):
    out = tmp_path / "killed"
    opts = train_options(synth, out)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(opts))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_EPOCH_1, str(cfg)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert len(_rows(out / "metrics.csv")) == 1
    warm = tmp_path / "warm.yaml"
    warm.write_text("warmup_epochs: 0.5\n")
    flags = cli_train_args({k: v for k, v in opts.items() if k != "warmup_epochs"})
    cmd = [sys.executable, "-m", "kvseg", *flags, "--config", str(warm)]
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
        T.train(T.load_config(None, train_options(synth, straight)))
    with pytest.raises(ValueError, match="lr"):
        T.train(T.load_config(None, train_options(synth, straight, lr=0.5, resume=True)))


def test_resume_of_a_finished_run_trains_nothing(synth, straight):
    before = (straight / "last.ckpt").read_bytes()
    summary = T.train(T.load_config(None, train_options(synth, straight, resume=True)))
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
        T.train(T.load_config(None, train_options(synth, out)))
    ckpt = torch.load(out / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1
    assert len(_rows(out / "metrics.csv")) == 1
    assert issubclass(T.NonFiniteLossError, FloatingPointError)


def test_cli_reports_divergence_in_one_line_and_exits_nonzero(synth, tmp_path, capsys):
    args = cli_train_args(train_options(synth, tmp_path / "div", lr=1e30, epochs=1,
                                        max_steps_per_epoch=3))
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
    s = T.train(T.load_config(None, train_options(synth, out, epochs=50, time_budget_s=1e-3)))
    assert s["stopped_early"] and s["epochs"] == 1 and s["steps"] == 1
    row = _rows(out / "metrics.csv")[0]
    assert row["jaccard"] != "" and (out / "best.safetensors").exists()


def test_lr_column_follows_the_schedule_over_the_whole_run(straight):
    # 2 epochs x 2 steps, warm-up 0.5 epoch = 1 step: the schedule spans all 4 steps (a schedule
    # one epoch long would already sit at the floor after epoch 1)
    c = T.load_config(straight / "config.yaml")
    rows = _rows(straight / "metrics.csv")
    total, warm = 4, 1
    for r in rows:
        step = int(r["steps"])
        expected = c.lr * T.lr_lambda(step, warm, total, c.min_lr_ratio)
        assert float(r["lr"]) == pytest.approx(expected, rel=1e-6), r
    assert float(rows[0]["lr"]) > 2 * c.lr * c.min_lr_ratio
    assert float(rows[-1]["lr"]) == pytest.approx(c.lr * c.min_lr_ratio)


# --------------------------------------------------------------------------- faults
def _checksums(folder: Path) -> dict[str, str]:
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != ".kvseg.lock"}


def test_a_run_folder_owned_by_another_process_is_refused(synth, tmp_path):
    from kvseg.errors import RunDirError
    from kvseg.training.rundir import FolderLock

    out = tmp_path / "owned"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from kvseg.training.rundir import FolderLock; "
         "l = FolderLock(sys.argv[1], 'kvseg train (test)').acquire(); print('ok', flush=True); "
         "time.sleep(60)", str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ok"
        with pytest.raises(RunDirError, match=rf"in use by another kvseg process \(pid "
                                              rf"{holder.pid} .*kvseg train \(test\)"):
            T.train(T.load_config(None, train_options(synth, out)))
        assert not (out / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder died without cleaning up: its lock file does not block anybody
    assert (out / ".kvseg.lock").exists()
    with FolderLock(out, "again"):
        pass


def test_a_partial_run_is_not_overwritten(synth, straight, tmp_path):
    import shutil

    from kvseg.errors import RunDirError

    out = tmp_path / "partial"
    out.mkdir()
    shutil.copy(straight / "best.safetensors", out)
    (out / "eval_val.json").write_text("{}")
    before = _checksums(out)
    with pytest.raises(RunDirError, match="best.safetensors.*no last.ckpt"):
        T.train(T.load_config(None, train_options(synth, out)))
    assert _checksums(out) == before


@pytest.mark.parametrize("content", [b"", b"garbage" * 10, b"PK\x03\x04truncated zip"])
def test_a_corrupt_last_ckpt_is_one_line_and_kept(synth, straight, tmp_path, content, capsys):
    import shutil

    out = tmp_path / "corrupt"
    shutil.copytree(straight, out)
    (out / "last.ckpt").write_bytes(content)
    before = _checksums(out)
    rc = cli.main(cli_train_args(train_options(synth, out)) + ["--resume"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "last.ckpt" in err and "weights_only=False" not in err
    assert _checksums(out) == before


def test_a_full_disk_is_one_line_naming_the_file_and_keeps_the_old_one(synth, tmp_path,
                                                                        monkeypatch, capsys):
    import errno

    import kvseg.utils as U

    out = tmp_path / "full"
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith("last.ckpt"):
            raise OSError(errno.ENOSPC, "No space left on device", str(src))
        return real_replace(src, dst)

    monkeypatch.setattr(U.os, "replace", replace)
    rc = cli.main(cli_train_args(train_options(synth, out, epochs=1)))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "last.ckpt" in err and "No space left on device" in err
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_an_unexpected_exception_is_reported_as_a_bug(monkeypatch, capsys):
    def boom(args):
        raise KeyError("internal")

    monkeypatch.setitem(cli.COMMANDS, "models", (cli.COMMANDS["models"][0], boom))
    assert cli.main(["models"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "this is a bug in kvseg" in err.strip().splitlines()[-1]


# --------------------------------------------------------------------------- devices, RNG, loop
def test_cpu_rng_state_has_no_cuda_key_and_cpu_training_never_initialises_cuda(synth,
                                                                                 tmp_path):
    from kvseg.training.checkpoint import capture_rng_state

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        pytest.skip("CUDA was initialised by an earlier test in this process")
    state = capture_rng_state(torch.Generator(), torch.device("cpu"))
    assert "cuda" not in state and set(state) == {"python", "numpy", "torch", "loader"}
    T.train(T.load_config(None, train_options(synth, tmp_path / "cpu", epochs=1)))
    ckpt = torch.load(tmp_path / "cpu" / "last.ckpt", map_location="cpu", weights_only=True)
    assert all("cuda" not in rng for rng in ckpt["rng"])
    assert not torch.cuda.is_initialized()


def test_cuda_rng_state_is_that_of_the_training_device_also_from_old_lists(monkeypatch):
    from kvseg.training.checkpoint import capture_rng_state, restore_rng_state

    gen = torch.Generator()
    cpu_state = capture_rng_state(gen, torch.device("cpu"))
    calls = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda t, d: calls.append((t.tolist(), d)))
    # the current format: one state, the training device's
    restore_rng_state({**cpu_state, "cuda": [7, 8]}, gen, torch.device("cuda", 1))
    # the old format: one state per visible GPU; the training device's entry is taken
    restore_rng_state({**cpu_state, "cuda": [[1, 2], [3, 4]]}, gen, torch.device("cuda", 1))
    # an old list without that GPU (fewer GPUs visible now): nothing restored, no error
    restore_rng_state({**cpu_state, "cuda": [[1, 2]]}, gen, torch.device("cuda", 3))
    # a CUDA state read back on the CPU: ignored, CUDA untouched
    restore_rng_state({**cpu_state, "cuda": [[1, 2]]}, gen, torch.device("cpu"))
    assert calls == [([7, 8], torch.device("cuda", 1)), ([3, 4], torch.device("cuda", 1))]


def test_an_explicit_gpu_index_under_torchrun_is_refused_before_any_setup(synth, tmp_path,
                                                                          monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    out = tmp_path / "idx"
    assert cli.main(cli_train_args(train_options(synth, out, device="cuda:1"))) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "device=cuda:1" in err and "WORLD_SIZE=2" in err and "--device cuda" in err
    assert not out.exists()  # refused before the folder, a process group or CUDA
    assert not torch.distributed.is_initialized()


def test_sync_batchnorm_on_cpu_processes_is_refused(synth, tmp_path, monkeypatch):
    from kvseg.errors import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="sync_batchnorm"):
        T.train(T.load_config(None, train_options(synth, tmp_path / "sbn", sync_batchnorm=True)))


def test_a_nan_between_check_points_is_reported_at_its_own_step(synth, tmp_path, monkeypatch):
    class NaNAtStep6(T.BCEDiceLoss):
        calls = 0

        def forward(self, logits, target):
            loss = super().forward(logits, target)
            if logits.requires_grad:
                NaNAtStep6.calls += 1
                if NaNAtStep6.calls == 6:
                    return loss * float("nan")
            return loss

    checks = []
    real_check = T._Trainer._check

    def check(self, *args):
        checks.append(self.step)
        return real_check(self, *args)

    monkeypatch.setattr(T, "BCEDiceLoss", NaNAtStep6)
    monkeypatch.setattr(T, "CHECK_EVERY", 4)
    monkeypatch.setattr(T._Trainer, "_check", check)
    out = tmp_path / "nan6"
    with pytest.raises(T.NonFiniteLossError, match=r"\(nan\) at epoch 1 step 6 \(global step 6\)"):
        T.train(T.load_config(None, train_options(synth, out, batch_size=1,
                                                  max_steps_per_epoch=None)))
    # the host looked at the loss before steps 1, 5 and 9 only, and stopped at step 9
    assert checks == [0, 4, 8]
    assert not (out / "last.ckpt").exists()


class _StopAfterEpoch1(Exception):
    pass


def _stop_after_epoch_1(epoch, row):
    if epoch == 1:
        raise _StopAfterEpoch1


@pytest.mark.slow
def test_persistent_workers_give_the_same_run_and_an_exact_resume(synth, straight, tmp_path):
    # the straight run used no worker; augmentation is seeded per slice, so two persistent
    # workers give the same run, also across a crash and --resume
    out = tmp_path / "workers"
    opts = train_options(synth, out, workers=2)
    with pytest.raises(_StopAfterEpoch1):
        T.train(T.load_config(None, opts), callbacks=[_stop_after_epoch_1])
    assert len(_rows(out / "metrics.csv")) == 1
    T.train(T.load_config(None, {**opts, "resume": True}))
    assert _without_seconds(_rows(out / "metrics.csv")) == \
        _without_seconds(_rows(straight / "metrics.csv"))
    a = load_file(str(out / "best.safetensors"))
    b = load_file(str(straight / "best.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_deterministic_switch_gives_the_same_run_and_is_switched_off_after(synth, straight,
                                                                            tmp_path):
    assert not torch.are_deterministic_algorithms_enabled()
    out = tmp_path / "det"
    T.train(T.load_config(None, train_options(synth, out, deterministic=True)))
    assert not torch.are_deterministic_algorithms_enabled()
    assert _without_seconds(_rows(out / "metrics.csv")) == \
        _without_seconds(_rows(straight / "metrics.csv"))
