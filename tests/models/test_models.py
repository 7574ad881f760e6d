"""Every registered variant through the shared checks (forward, backward, sizes, channels, I/O)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import kvseg
import kvseg.layers
from kvseg.inference.profile import build_on_meta, count_params
from kvseg.models.registry import PRESETS, model_info, resolve_config

NAMES = kvseg.list_models()


def test_registry_names():
    paper = ["setr_qkv", "setr_kv", "setr_kvpos", "setr_conv_qkv", "setr_conv_kv",
             "setr_conv_kvpos", "setr_cvt_qkv", "setr_cvt_kv", "setr_cvt_kvpos"]
    assert NAMES[:9] == paper == kvseg.models.list_models(None)  # the paper's nine first
    others = [f"{f}_{m}" for f in ("setr", "setr_conv", "setr_cvt")
              for m in ("sharedkv", "sharedqv", "single", "kvrelpos")]
    assert NAMES[9:21] == others and NAMES[:21] == kvseg.list_models(families="paper")
    reference = ["dynunet", "unetr_qkv", "unetr_kv", "unetr_kvpos", "swinunetr_qkv",
                 "swinunetr_kv", "swinunetr_kvpos"]
    assert NAMES[21:28] == reference  # then the reference families' other modes
    assert NAMES[28:] == ["unetr_sharedkv", "unetr_sharedqv", "unetr_single",
                          "unetr_kvrelpos", "swinunetr_sharedkv", "swinunetr_sharedqv",
                          "swinunetr_single"]  # a Swin window has its own relative bias
    assert model_info("setr_conv_kvpos") == {"family": "setr_conv", "mode": "kv_pos"}
    assert model_info("setr_conv_single") == {"family": "setr_conv", "mode": "single"}
    assert model_info("setr_cvt_kvrelpos") == {"family": "setr_cvt", "mode": "kv_relpos"}
    assert model_info("dynunet") == {"family": "dynunet", "mode": "none"}
    assert model_info("swinunetr_kvpos") == {"family": "swinunetr", "mode": "kv_pos"}
    assert {model_info(n)["mode"] for n in NAMES} == {*kvseg.layers.MODES, "none"}
    assert kvseg.list_models(None, families="all") == NAMES[:9] + reference[1:]
    assert kvseg.list_models(families=["unetr"]) == [n for n in NAMES if n.startswith("unetr")]
    assert kvseg.models.list_models(["single"]) == ["setr_single", "setr_conv_single",
                                                    "setr_cvt_single"]


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_any_size(name):
    torch.manual_seed(0)
    model = kvseg.create_model(name, size="micro", img_size=64)
    for hw in [(64, 64), (96, 80), (65, 77)]:
        x = torch.randn(2, 3, *hw)
        logits = model(x)
        assert logits.shape == (2, 3, *hw)
        assert torch.isfinite(logits).all()
        model.zero_grad()
        logits.square().mean().backward()
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("in_channels", [1, 5])
def test_in_channels(name, in_channels):
    model = kvseg.create_model(name, size="micro", img_size=32, in_channels=in_channels,
                               num_classes=2)
    out = model.predict(torch.randn(1, in_channels, 32, 48))
    assert out.shape == (1, 2, 32, 48)
    with pytest.raises(ValueError, match=r"expected \(B, " + str(in_channels)):
        model(torch.randn(1, in_channels + 1, 32, 32))


def test_predict_is_eval_inference():
    torch.manual_seed(0)
    model = kvseg.create_model("setr_cvt_kv", size="micro", img_size=32).train()
    x = torch.randn(2, 3, 32, 32)
    out = model.predict(x)
    assert not model.training and out.is_inference() and not out.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(out, model(x))


def test_state_dict_round_trip_across_processes(tmp_path):
    """Another Python process builds every variant and saves its state_dict; a freshly built
    model of the same name loads it (strict) and reproduces that process's output."""
    script = textwrap.dedent(f"""
        import torch, kvseg
        torch.set_num_threads(1)
        torch.manual_seed(123)
        for name in kvseg.list_models():
            model = kvseg.create_model(name, size="micro", img_size=32, in_channels=1)
            model.train()(torch.randn(2, 1, 32, 32))  # move the BatchNorm running statistics
            model.eval()
            x = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(7))
            torch.save({{"state_dict": model.state_dict(), "out": model(x).detach()}},
                       r"{tmp_path}/" + name + ".pt")
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    for name in NAMES:
        saved = torch.load(tmp_path / f"{name}.pt", map_location="cpu", weights_only=True)
        model = kvseg.create_model(name, size="micro", img_size=32, in_channels=1)
        model.load_state_dict(saved["state_dict"])  # strict
        x = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(model.predict(x), saved["out"], msg=name)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="setr_kvpos"):
        kvseg.create_model("setr_qk", size="micro")


def test_unknown_override_names_the_key():
    with pytest.raises(ValueError, match="'depht'"):
        kvseg.create_model("setr_kv", size="micro", depht=3)
    with pytest.raises(ValueError, match="'head'"):  # only SETR has SETR heads
        kvseg.create_model("setr_cvt_kv", size="micro", head="mla")
    with pytest.raises(ValueError, match="size='tiny'"):
        kvseg.create_model("setr_kv", size="tiny")


def test_overrides_apply():
    model = kvseg.create_model("setr_kvpos", size="micro", depth=2, pos_dim=10, img_size=32)
    assert len(model.encoder.blocks) == 2
    assert model.encoder.blocks[0].attn.pos.map_pos.in_features == 10
    cfg = resolve_config("setr_cvt_kv", "micro", depths=[1, 1, 1])  # YAML lists -> tuples
    assert cfg.depths == (1, 1, 1)


@pytest.mark.parametrize("head", ["naive", "pup", "mla"])
def test_setr_heads(head):
    model = kvseg.create_model("setr_kv", size="micro", head=head, img_size=32)
    assert model(torch.randn(1, 3, 40, 24)).shape == (1, 3, 40, 24)


def test_presets_are_the_published_configurations():
    assert PRESETS["setr"]["base"].dim == 768 and PRESETS["setr"]["base"].depth == 12
    assert PRESETS["setr"]["large"].dim == 1024 and PRESETS["setr"]["large"].depth == 24
    cvt13, cvt21 = PRESETS["setr_cvt"]["base"], PRESETS["setr_cvt"]["large"]
    assert (cvt13.dims, cvt13.depths, cvt13.num_heads) == ((64, 192, 384), (1, 2, 10), (1, 3, 6))
    assert cvt21.depths == (1, 4, 16)
    assert PRESETS["setr_conv"]["base"].resnet_layers == (3, 4, 9)


def test_parameter_counts_match_the_reference_implementations():
    """External oracles: counts computed from the official code (docs/architectures reference).

    TransUNet R50-ViT-B/16, 2 classes, 224: 105,276,066 (also DA-TransUNet's table);
    CvT-13 / CvT-21 backbones without head, final norm (and cls token, 384): 19,611,712 - 384 /
    31,236,928 - 384; a ViT-B/16 block 7,087,872; a ViT-L/16 block 12,596,224.
    """
    transunet = build_on_meta("setr_conv_qkv", size="base", img_size=224, num_classes=2)
    assert count_params(transunet) == 105_276_066
    assert count_params(build_on_meta("setr_cvt_qkv", size="base").encoder) == 19_611_712 - 384
    assert count_params(build_on_meta("setr_cvt_qkv", size="large").encoder) == 31_236_928 - 384
    assert count_params(build_on_meta("setr_qkv", size="base").encoder.blocks[0]) == 7_087_872
    assert count_params(build_on_meta("setr_qkv", size="large").encoder.blocks[0]) == 12_596_224
