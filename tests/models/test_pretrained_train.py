"""``kvseg train --pretrained FILE`` and the ``paper_pretrained`` preset, end to end on the
synthetic twin, with files in the official layouts made here (nothing is downloaded)."""

from __future__ import annotations

import logging

import pytest
import torch
from official_files import MICRO_WRITERS, write_timm_vit

from kvseg import cli
from kvseg.experiments.presets import load_preset
from kvseg.models import hub
from kvseg.training import train as T


def _args(**opts) -> list[str]:
    out = ["train"]
    for k, v in opts.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


BASE = dict(size="micro", img_size=32, epochs=1, batch_size=2, n_folds=3,
            max_steps_per_epoch=2, device="cpu", workers=0)


def test_cli_train_from_a_timm_file_logs_the_summary(synth, tmp_path, caplog):
    vit = tmp_path / "vit.pth"
    write_timm_vit(vit)
    caplog.set_level(logging.INFO, logger="kvseg")
    out = tmp_path / "run"
    args = _args(model="setr_kv", data=synth, out=out, pretrained=vit, pretrained_rule="key",
                 encoder_lr_mult=0.1, **BASE)
    assert cli.main(args) == 0
    lines = [r.getMessage() for r in caplog.records
             if "initialised from timm_vit" in r.getMessage()]
    assert len(lines) == 1 and str(vit) in lines[0] and "KV rule 'key'" in lines[0]
    ckpt = torch.load(out / "last.ckpt", map_location="cpu", weights_only=True)
    groups = ckpt["optimizer"]["param_groups"]
    assert len(groups) == 2 and groups[1]["initial_lr"] == pytest.approx(groups[0]["initial_lr"]
                                                                          * 0.1)


def test_cli_train_with_a_bad_file_exits_2_in_one_line(synth, tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x00garbage")
    args = _args(model="setr_kv", data=synth, out=tmp_path / "r", pretrained=bad, **BASE)
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.pth" in err
    cvt = tmp_path / "cvt.pth"
    MICRO_WRITERS["setr_cvt"][1](cvt)
    args = _args(model="setr_kv", data=synth, out=tmp_path / "r2", pretrained=cvt, **BASE)
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cvt.pth" in err and "cannot initialise" in err


@pytest.fixture
def micro_imagenet(tmp_path, monkeypatch):
    """``pretrained="imagenet"`` resolves, at micro size, to files made here, through a fake
    download into a temporary torch hub cache."""
    made = tmp_path / "made"
    made.mkdir()
    monkeypatch.setattr(hub, "cache_dir", lambda: tmp_path / "hub")
    for family, (filename, writer) in MICRO_WRITERS.items():
        writer(made / filename)
        layout = {"setr": "timm_vit", "setr_conv": "transunet_r50_vit",
                  "setr_cvt": "microsoft_cvt"}[family]
        monkeypatch.setitem(hub.SOURCES["imagenet"], (family, "micro"),
                            hub.WeightsFile(filename, f"https://example.invalid/{filename}",
                                            layout))

    def fake_download(url, dst):
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes((made / url.rsplit("/", 1)[1]).read_bytes())

    monkeypatch.setattr(hub, "_download", fake_download)
    return made


@pytest.mark.parametrize("model", ["setr_kvpos", "setr_conv_kv", "setr_cvt_qkv"])
def test_paper_pretrained_preset_trains_every_family(synth, tmp_path, micro_imagenet, model):
    """The preset's training options (pretrained: imagenet, the sym rule, the slower encoder),
    at micro size and a two-step budget."""
    preset = load_preset("paper_pretrained")
    assert preset.train["pretrained"] == "imagenet" and preset.train["encoder_lr_mult"] < 1
    opts = {**preset.train, **BASE, "context": 0, "exclude": [], "amp": "none",
            "img_size": 64, "model": model, "data": str(synth), "out": str(tmp_path / model)}
    summary = T.train(T.load_config(None, opts))
    assert summary["steps"] == 2
    assert (tmp_path / "hub").is_dir()


def test_paper_pretrained_preset_through_reproduce(synth, tmp_path, micro_imagenet):
    from kvseg.config import read_yaml
    from kvseg.experiments.reproduce import reproduce

    preset = read_yaml(load_preset("paper_pretrained").path)
    preset.update(seeds=[0], latency_repeats=1, latency_warmup=0, num_samples=1)
    preset["train"].update(size="micro", img_size=64, context=0, exclude=[], epochs=1,
                           max_steps_per_epoch=2, batch_size=2, n_folds=3, workers=0, amp="none")
    import yaml

    path = tmp_path / "paper_pretrained_micro.yaml"
    path.write_text(yaml.safe_dump(preset))
    summary = reproduce(synth, tmp_path / "out", preset=str(path), models=["setr_kv"],
                        device="cpu", jobs=1, progress=False)
    assert summary.trained == 1
    assert (tmp_path / "out" / "report.md").is_file()
