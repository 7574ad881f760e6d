"""Paired initialisation (kvseg.models.twin): a query-free model takes its QKV twin's weights,
checked name by name against the twin's state dict and the row layout of a fused qkv Linear
(rows [q; k; v], each dim wide)."""

from __future__ import annotations

import pytest
import torch

from kvseg.errors import ConfigError
from kvseg.models import create_model
from kvseg.models.twin import init_from_twin, qkv_twin_name

FAMILIES = ("setr", "setr_conv", "setr_cvt")
MODES = ("kv", "kvpos", "sharedkv", "sharedqv", "single", "kvrelpos")
#: rows of each fused projection in the twin's qkv, in units of dim (written out by hand)
ROWS = {"kv": (1, 3), "qk": (0, 2), "k": (1, 2)}


def _build(name: str, seed: int, **kw):
    torch.manual_seed(seed)
    return create_model(name, size="micro", img_size=32, in_channels=1, num_classes=3, **kw)


@pytest.mark.parametrize("name", ["setr_kv", "setr_conv_kvpos", "setr_cvt_kv", "setr_single",
                                  "setr_cvt_sharedqv"])
def test_twin_name_is_the_family_in_qkv(name):
    assert qkv_twin_name(name) == name.rsplit("_", 1)[0] + "_qkv"


def test_qkv_and_attention_free_models_have_no_twin_and_unknown_names_are_refused():
    assert qkv_twin_name("setr_qkv") is None and qkv_twin_name("setr_cvt_qkv") is None
    assert qkv_twin_name("dynunet") is None
    with pytest.raises(ConfigError, match="unknown model"):
        qkv_twin_name("setr_xyz")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", MODES)
def test_shared_tensors_and_fused_rows_equal_the_twins(family, mode):
    name = f"{family}_{mode}"
    model, twin = _build(name, 1), _build(f"{family}_qkv", 2)  # other seeds: other weights
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = init_from_twin(model, twin)
    got, ref = model.state_dict(), twin.state_dict()
    fused_done = kept = 0
    for key, value in got.items():
        stem, _, leaf = key.rpartition(".")
        path, _, proj = stem.rpartition(".")
        if proj in ROWS and f"{path}.qkv.{leaf}" in ref:  # a fused projection of a token layer
            src = ref[f"{path}.qkv.{leaf}"]
            dim = src.shape[0] // 3
            lo, hi = ROWS[proj]
            assert torch.equal(value, src[lo * dim:hi * dim]), key
            fused_done += 1
        elif key in ref:
            assert torch.equal(value, ref[key]), key
        else:  # no counterpart: the model's own initialisation, untouched
            assert torch.equal(value, before[key]), key
            kept += 1
    assert len(report.sliced) == fused_done and len(report.kept) == kept
    assert len(report.copied) + fused_done + kept == len(got)
    if family != "setr_cvt":  # every token attention layer was sliced out of qkv
        assert fused_done == 2 * model.config.depth  # weight and bias per layer
    else:  # CvT's branches match by name: proj_k, conv_proj_k (stride is no parameter), ...
        assert fused_done == 0 and all(torch.equal(got[k], ref[k]) for k in got
                                       if ".proj_k." in k or ".conv_proj_k." in k)
    if mode in ("kvpos", "kvrelpos"):
        assert kept > 0 and all(".pos." in k or ".rel_pos." in k for k in report.kept)
    else:
        assert kept == 0
    assert str(len(report.copied) + fused_done) in report.summary()
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 1, 32, 32)).shape == (1, 3, 32, 32)


def test_kv_weight_is_rows_d_to_3d_of_qkv_and_the_rest_matches():
    model, twin = _build("setr_kv", 0), _build("setr_qkv", 0)
    # the feature's reason: from one seed the layers after the first qkv start elsewhere
    fc1 = "encoder.blocks.0.mlp.fc1.weight"
    assert not torch.equal(model.state_dict()[fc1], twin.state_dict()[fc1])
    init_from_twin(model, twin)
    assert torch.equal(model.state_dict()[fc1], twin.state_dict()[fc1])
    for a, b in zip(model.encoder.blocks, twin.encoder.blocks, strict=True):
        d = b.attn.qkv.in_features
        assert torch.equal(a.attn.kv.weight, b.attn.qkv.weight[d:3 * d])
        assert torch.equal(a.attn.kv.bias, b.attn.qkv.bias[d:3 * d])
    for (ka, va), (kb, vb) in zip(model.decoder.state_dict().items(),
                                  twin.decoder.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_the_twin_is_not_changed():
    model, twin = _build("setr_conv_kv", 0), _build("setr_conv_qkv", 1)
    before = {k: v.clone() for k, v in twin.state_dict().items()}
    init_from_twin(model, twin)
    assert all(torch.equal(v, before[k]) for k, v in twin.state_dict().items())


@pytest.mark.parametrize("twin_name, kw, match", [
    ("setr_conv_qkv", {}, "pairs with setr_qkv"),  # another family
    ("setr_kvpos", {}, "pairs with setr_qkv"),  # not QKV
    ("setr_qkv", {"depth": 2}, "size or configuration differs"),
])
def test_a_wrong_twin_is_refused(twin_name, kw, match):
    with pytest.raises(ConfigError, match=match):
        init_from_twin(_build("setr_kv", 0), _build(twin_name, 0, **kw))


def test_a_qkv_model_or_another_image_size_is_refused():
    with pytest.raises(ConfigError, match="no QKV twin"):
        init_from_twin(_build("setr_qkv", 0), _build("setr_qkv", 1))
    torch.manual_seed(0)
    big = create_model("setr_qkv", size="micro", img_size=64, in_channels=1, num_classes=3)
    with pytest.raises(ConfigError, match="pos_embed"):
        init_from_twin(_build("setr_kv", 0), big)
