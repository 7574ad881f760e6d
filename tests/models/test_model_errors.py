"""Model-building mistakes are ConfigErrors naming the value (one line at the command line)."""

from __future__ import annotations

import pytest
import torch

import kvseg
from kvseg.errors import CheckpointError, ConfigError
from kvseg.models.pretrained import load_pretrained
from kvseg.models.registry import resolve_config


@pytest.mark.parametrize("call,match", [
    (lambda: kvseg.create_model("setr_kv_pos", size="micro"), "'setr_kv_pos'"),
    (lambda: kvseg.create_model("setr_kv", size="tiny"), "size='tiny'"),
    (lambda: kvseg.create_model("setr_kv", size="micro", depht=3), "'depht'"),
    (lambda: kvseg.create_model("setr_kv", size="micro", head="fpn"), "head='fpn'"),
    (lambda: kvseg.create_model("setr_kv", size="micro", patch_size=6), "patch_size=6"),
    (lambda: kvseg.create_model("setr_kv", size="micro", head="mla", depth=3), "depth=3"),
    (lambda: kvseg.create_model("setr_kv", size="micro", num_heads=5), "num_heads=5"),
    (lambda: kvseg.create_model("setr_kv", size="micro", num_classes=0), "num_classes=0"),
    (lambda: kvseg.create_model("setr_conv_kv", size="micro", resnet_layers=(1, 1)),
     r"resnet_layers=\(1, 1\)"),
    (lambda: kvseg.create_model("setr_conv_kv", size="micro", decoder_channels=(8, 8)),
     r"decoder_channels=\(8, 8\)"),
    (lambda: kvseg.create_model("setr_cvt_kv", size="micro", depths=(1, 1)), r"depths=\(1, 1\)"),
    (lambda: resolve_config("setr_kvpos", "micro", pos_dim_x=1), "'pos_dim_x'"),
    (lambda: kvseg.create_model("setr_kvpos", size="micro", pos_dim=1), "pos_dim=1"),
])
def test_config_errors(call, match):
    with pytest.raises(ConfigError, match=match):
        call()


def test_wrong_input_channels_is_a_config_error():
    model = kvseg.create_model("setr_kv", size="micro", img_size=32, in_channels=2)
    with pytest.raises(ConfigError, match=r"\(1, 3, 32, 32\)"):
        model(torch.randn(1, 3, 32, 32))


def test_unusable_weights_files_are_checkpoint_errors(tmp_path):
    model = kvseg.create_model("setr_kv", size="micro", img_size=32)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_pretrained(model, bad)
    other = tmp_path / "other.pt"
    torch.save({"unrelated.weight": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="no tensor matches"):
        load_pretrained(model, other)
