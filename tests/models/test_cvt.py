"""CvT: the KV design is exact (the stride-2 keys are the stride-1 keys subsampled); the
official scale, activation and per-stage drop-path rates."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import kvseg
from kvseg.layers import MODES
from kvseg.models.cvt import ConvAttention, dw_bn


def _random_bn_stats(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()


@pytest.mark.parametrize("h,w", [(8, 8), (7, 5), (14, 14)])
def test_stride2_dw_bn_equals_subsampled_stride1(h, w):
    torch.manual_seed(0)
    s1, s2 = dw_bn(6, 1), dw_bn(6, 2)
    s2.load_state_dict(s1.state_dict())
    _random_bn_stats(s1)
    s2.load_state_dict(s1.state_dict())
    s1.eval(), s2.eval()
    x = torch.randn(2, 6, h, w)
    torch.testing.assert_close(s1(x)[:, :, ::2, ::2], s2(x), atol=1e-6, rtol=1e-6)


def reference_conv_attention(attn: ConvAttention, x: torch.Tensor, h: int, w: int):
    """CvT attention in any mode written out with *separate* stride-2 branches for the keys and
    values (the same weights as the shared branch they come from): queries
    Linear(BN(dwconv_s1(x))) of the query branch, keys and values Linear(BN(dwconv_s2(x))) of
    theirs; the KV-pos terms and a loop-built relative-position bias."""
    b, n, c = x.shape
    m = x.transpose(1, 2).reshape(b, c, h, w)
    spec = attn.spec

    def branch(p, stride):
        conv, bn = getattr(attn, f"conv_proj_{p}")
        y = F.conv2d(m, conv.weight, None, stride, 1, groups=c)
        y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0,
                         bn.eps)
        return getattr(attn, f"proj_{p}")(y.flatten(2).transpose(1, 2))

    q, k, v = branch(spec.query, 1), branch("k", 2), branch(spec.value, 2)
    heads = attn.num_heads
    d = c // heads

    def split(t):
        return t.reshape(b, -1, heads, d).transpose(1, 2)

    scale = 1 / math.sqrt(c if attn.attn_scale == "dim" else d)  # official CvT: the width
    logits = torch.einsum("bhid,bhjd->bhij", split(q), split(k)) * scale
    if attn.mode == "kv_pos":
        t, g = attn.pos(k.shape[1])
        logits = t * logits + g
    if attn.mode == "kv_relpos":
        table = attn.rel_pos.resized_table(h, w)
        keys = [(r, cc) for r in range(0, h, 2) for cc in range(0, w, 2)]
        bias = torch.stack([torch.stack([table[:, i // w - r + h - 1, i % w - cc + w - 1]
                                         for r, cc in keys], -1) for i in range(h * w)], -2)
        logits = logits + bias
    probs = logits.softmax(-1)
    out = torch.einsum("bhij,bhjd->bhid", probs, split(v)).transpose(1, 2).reshape(b, n, c)
    return attn.proj(out), probs


@pytest.mark.parametrize("attn_scale", ["dim", "head"])
@pytest.mark.parametrize("mode", MODES)
def test_conv_attention_matches_separate_stride2_branches(mode, attn_scale):
    """Every mode's subsampled branches equal stride-2 branches with the same weights."""
    torch.manual_seed(1)
    for h, w, c, heads in [(8, 8, 16, 2), (7, 9, 12, 3)]:
        attn = ConvAttention(c, heads, mode, attn_scale=attn_scale, grid_size=(6, 6))
        _random_bn_stats(attn)
        if attn.rel_pos is not None:
            with torch.no_grad():
                attn.rel_pos.table.normal_()
        attn.eval()
        x = torch.randn(2, h * w, c)
        out, probs = attn(x, h, w, return_attention=True)
        ref_out, ref_probs = reference_conv_attention(attn, x, h, w)
        assert probs.shape == (2, heads, h * w, math.ceil(h / 2) * math.ceil(w / 2))
        torch.testing.assert_close(probs, ref_probs, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(attn(x, h, w), ref_out, atol=1e-5, rtol=1e-5)  # SDPA path


@pytest.mark.parametrize("mode", MODES)
def test_branches_per_mode(mode):
    """The query branch at stride 1, every other at stride 2; one branch per projection."""
    attn = ConvAttention(24, 3, mode, grid_size=(4, 4))
    spec = attn.spec
    for p in ("q", "k", "v"):
        assert hasattr(attn, f"conv_proj_{p}") is hasattr(attn, f"proj_{p}") is \
            (p in spec.projections), (mode, p)
        if p in spec.projections:
            stride = getattr(attn, f"conv_proj_{p}")[0].stride
            assert stride == ((1, 1) if p == spec.query else (2, 2)), (mode, p)


def test_kv_removes_exactly_the_query_branch():
    c = 24
    qkv, kv = ConvAttention(c, 3, "qkv"), ConvAttention(c, 3, "kv")
    n_qkv = sum(p.numel() for p in qkv.parameters())
    n_kv = sum(p.numel() for p in kv.parameters())
    assert n_qkv - n_kv == 9 * c + 2 * c + c * c + c  # dw 3×3, BN, Linear with bias
    assert not hasattr(kv, "conv_proj_q") and not hasattr(kv, "proj_q")
    branch = 9 * c + 2 * c + c * c + c
    for mode, removed in [("shared_kv", 1), ("shared_qv", 1), ("single", 2)]:
        n = sum(p.numel() for p in ConvAttention(c, 3, mode).parameters())
        assert n_qkv - n == removed * branch, mode


def test_official_defaults_scale_activation_and_drop_path_per_stage():
    """microsoft/CvT: scale dim ** -0.5, QuickGELU, DROP_PATH_RATE (0, 0, 0.1) linear within
    each stage (torch.linspace(0, rate, depth))."""
    from kvseg.layers.blocks import QuickGELU

    model = kvseg.create_model("setr_cvt_qkv", size="base")
    rates = [[b.drop_path.p for b in s.blocks] for s in model.encoder.stages]
    assert rates[:2] == [[0.0], [0.0, 0.0]]
    torch.testing.assert_close(torch.tensor(rates[2]), torch.linspace(0, 0.1, 10))
    attn = model.encoder.stages[2].blocks[0].attn
    assert attn.core.scale == 384 ** -0.5
    assert isinstance(model.encoder.stages[2].blocks[0].mlp.act, QuickGELU)
    other = kvseg.create_model("setr_cvt_qkv", size="micro", attn_scale="head", act="gelu")
    assert other.encoder.stages[2].blocks[0].attn.core.scale == 32 ** -0.5
    assert isinstance(other.encoder.stages[0].blocks[0].mlp.act, torch.nn.GELU)


@pytest.mark.parametrize("override,match", [
    ({"attn_scale": "width"}, "attn_scale='width'"), ({"act": "relu"}, "act='relu'"),
    ({"drop_path": (0.0, 0.1)}, r"drop_path=\(0.0, 0.1\)"), ({"drop_path": (0, 0, 1.5)}, "rates"),
])
def test_cvt_option_errors(override, match):
    with pytest.raises(ValueError, match=match):
        kvseg.create_model("setr_cvt_kv", size="micro", **override)
