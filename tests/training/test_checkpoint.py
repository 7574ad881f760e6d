"""save_model / load_model / load_run round trips on real micro models."""

from __future__ import annotations

import pytest
import torch

import kvseg
from kvseg.training.checkpoint import load_model, load_run, read_config, save_model


def _config(**kw):
    cfg = {"model": "setr_kv", "size": "micro", "img_size": 32, "in_channels": 3,
           "num_classes": 3, "model_overrides": {}, "head": None}
    cfg.update(kw)
    return cfg


@pytest.mark.parametrize("kw", [{}, {"in_channels": 5, "head": "pup"},
                                {"model": "setr_cvt_kvpos"}])
def test_round_trip_gives_identical_outputs(tmp_path, kw):
    cfg = _config(**kw)
    torch.manual_seed(0)
    model = kvseg.create_model(cfg["model"], num_classes=3, in_channels=cfg["in_channels"],
                               img_size=32, size="micro",
                               **({"head": cfg["head"]} if cfg["head"] else {})).eval()
    save_model(tmp_path / "best.safetensors", model, cfg)
    loaded, got_cfg = load_run(tmp_path)
    assert got_cfg == cfg == read_config(tmp_path / "best.safetensors")
    x = torch.randn(2, cfg["in_channels"], 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert not loaded.training


def test_missing_and_foreign_files_raise_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="best.safetensors"):
        load_run(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_run(tmp_path / "nope")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="config"):
        load_model(tmp_path / "x.safetensors")


def test_weights_that_do_not_fit_raise_value_error(tmp_path):
    model = kvseg.create_model("setr_kv", size="micro", img_size=32)
    save_model(tmp_path / "m.safetensors", model, _config(model="setr_qkv"))
    with pytest.raises(ValueError, match="do not fit") as e:
        load_model(tmp_path / "m.safetensors")
    # not cut off before the first mismatch: names it (here a missing/extra tensor) and counts
    msg = str(e.value)
    assert len(msg.splitlines()) == 1
    assert "model tensor(s) not in the file (first: encoder.blocks.0.attn.qkv.bias)" in msg
    assert "file tensor(s) not in the model (first: encoder.blocks.0.attn.kv.bias)" in msg


def test_a_tensor_of_another_shape_is_named_with_both_shapes(tmp_path):
    model = kvseg.create_model("setr_kv", size="micro", img_size=32)
    save_model(tmp_path / "m.safetensors", model, _config(num_classes=5))
    with pytest.raises(ValueError, match="do not fit") as e:
        load_model(tmp_path / "m.safetensors")
    msg = str(e.value)
    assert len(msg.splitlines()) == 1
    assert "2 tensor(s) of another shape (first: head.bias (3,) in the file, (5,) in the model)" \
        in msg
