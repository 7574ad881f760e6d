"""kvseg train --tensorboard: the events file read back (tensorboard's EventAccumulator) holds
every metrics.csv value per epoch and the validation overlays; without tensorboard one line."""

from __future__ import annotations

import csv
import sys

import pytest
import torch

from helpers import cli_train_args, train_options
from kvseg import cli
from kvseg.training.tracking import SCALARS, blend


def test_tensorboard_scalars_equal_metrics_csv(synth, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert cli.main([*cli_train_args(train_options(synth, out)), "--tensorboard"]) == 0
    events = list((out / "tensorboard").glob("events.out.tfevents*"))
    assert len(events) == 1
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for key, tag in SCALARS.items():
        logged = {e.step: e.value for e in acc.Scalars(tag)}
        want = {int(r["epoch"]): float(r[key]) for r in rows if r[key] not in ("", None)}
        assert logged.keys() == want.keys(), tag
        for step, value in want.items():
            assert logged[step] == pytest.approx(value, rel=1e-6, abs=1e-7), (tag, step)
    images = acc.Tags()["images"]
    assert len(images) == 1 and len(acc.Images(images[0])) == len(rows)


def test_without_tensorboard_it_is_one_line_and_nothing_is_written(synth, tmp_path, capsys,
                                                                    monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    out = tmp_path / "run"
    assert cli.main([*cli_train_args(train_options(synth, out)), "--tensorboard"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "kvseg[tracking]" in err[0]
    assert not out.exists()


def test_blend_colours_only_the_mask():
    image = torch.full((4, 4), 0.5)
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 1, 2] = True
    rgb = blend(image, mask, alpha=0.5)
    assert torch.allclose(rgb[:, 0, 0], torch.full((3,), 0.5))
    assert torch.allclose(rgb[:, 1, 2], 0.25 + 0.5 * torch.tensor([0.9, 0.24, 0.24]))


def test_reproduce_runs_log_to_tensorboard_from_the_preset(tmp_path):
    pytest.importorskip("tensorboard")
    from helpers import TINY_PRESET, make_tiny
    from kvseg.experiments.reproduce import reproduce
    from kvseg.experiments.runner import same_settings

    data, preset = make_tiny(tmp_path, seed=4,
                             train={**TINY_PRESET["train"], "tensorboard": True})
    reproduce(data, tmp_path / "out", preset=str(preset), models=["setr_kv"], device="cpu",
              progress=False)
    events = list((tmp_path / "out").rglob("tensorboard/events.out.tfevents*"))
    assert len(events) == 1
    # watching a run is not a setting of its result: finished runs stay valid either way
    assert same_settings({"model": "setr_kv", "tensorboard": True}, {"model": "setr_kv"})
