"""Attention parity with written-out references (einsum + softmax; Borji's unfactored KV-pos)."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from kvseg.layers import Attention, sinusoidal_2d
from kvseg.layers.attention import KVPosBias

MODES = ("qkv", "kv", "kv_pos")


@functools.cache
def _reference_encoding_2d(n_rows: int, n_cols: int, pos_dim: int) -> torch.Tensor:
    """PositionalEncoding2D (tatp22/positional-encodings) written out with loops."""
    channels = int(math.ceil(pos_dim / 4) * 2)
    out = torch.zeros(n_rows, n_cols, 2 * channels, dtype=torch.float64)
    for i in range(n_rows):
        for j in range(n_cols):
            for k in range(channels // 2):
                freq = 1.0 / 10000 ** (2 * k / channels)
                out[i, j, 2 * k] = math.sin(i * freq)
                out[i, j, 2 * k + 1] = math.cos(i * freq)
                out[i, j, channels + 2 * k] = math.sin(j * freq)
                out[i, j, channels + 2 * k + 1] = math.cos(j * freq)
    return out[:, :, :pos_dim].float()


def reference_encoding_2d(n_rows: int, n_cols: int, pos_dim: int) -> torch.Tensor:
    return _reference_encoding_2d(n_rows, n_cols, pos_dim).clone()


def naive_attention(attn: Attention, x: torch.Tensor):
    """The module's maths written out: per-head einsum logits, Borji's (B, h, N, N, pos_dim)
    KV-pos map, softmax, AV, output projection. Returns (out, probs, pre-softmax logits)."""
    b, n, dim = x.shape
    h, d = attn.num_heads, dim // attn.num_heads

    def split(t):  # (B, N, dim) -> (B, h, N, d)
        return t.reshape(b, n, h, d).permute(0, 2, 1, 3)

    if attn.mode == "qkv":
        wq, wk, wv = attn.qkv.weight.chunk(3)
        bq, bk, bv = attn.qkv.bias.chunk(3)
        q = split(x @ wq.T + bq)
    else:
        wk, wv = attn.kv.weight.chunk(2)
        bk, bv = attn.kv.bias.chunk(2)
    k, v = split(x @ wk.T + bk), split(x @ wv.T + bv)
    if attn.mode != "qkv":
        q = k
    logits = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(d)
    if attn.mode == "kv_pos":
        pos = reference_encoding_2d(n, n, attn.pos.pos_dim)  # (N, N, pos_dim)
        full = logits.unsqueeze(-1) + pos  # (B, h, N, N, pos_dim), as in Borji's ViT_pos.py
        logits = (full @ attn.pos.map_pos.weight.T).squeeze(-1) + attn.pos.map_pos.bias
    probs = logits.softmax(dim=-1)
    out = torch.einsum("bhij,bhjd->bhid", probs, v).permute(0, 2, 1, 3).reshape(b, n, dim)
    return out @ attn.proj.weight.T + attn.proj.bias, probs, logits


def _randomise(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.2)


@pytest.mark.parametrize("pos_dim", [10, 50])
@pytest.mark.parametrize("n_rows,n_cols", [(7, 7), (5, 9)])
def test_encoding_matches_positional_encodings_formula(n_rows, n_cols, pos_dim):
    got = sinusoidal_2d(n_rows, n_cols, pos_dim)
    torch.testing.assert_close(got, reference_encoding_2d(n_rows, n_cols, pos_dim), atol=1e-5,
                               rtol=0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("train", [False, True])
def test_matches_naive_reference(mode, train):
    torch.manual_seed(0)
    for n, dim, heads in [(37, 32, 4), (16, 24, 3), (50, 16, 1)]:
        attn = Attention(dim, heads, mode, pos_dim=50).train(train)
        _randomise(attn)
        x = torch.randn(2, n, dim)
        out, probs = attn(x, return_attention=True)
        fused = attn(x)  # the SDPA path
        ref_out, ref_probs, _ = naive_attention(attn, x)
        torch.testing.assert_close(probs, ref_probs, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fused, ref_out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_gradients_match_naive_reference(mode):
    torch.manual_seed(1)
    attn = Attention(24, 3, mode, pos_dim=12)
    _randomise(attn)
    x = torch.randn(2, 20, 24)
    weights = torch.randn(2, 20, 24)
    (attn(x) * weights).sum().backward()
    got = {k: p.grad.clone() for k, p in attn.named_parameters()}  # every parameter is used
    attn.zero_grad()
    (naive_attention(attn, x)[0] * weights).sum().backward()
    for k, p in attn.named_parameters():
        torch.testing.assert_close(got[k], p.grad, atol=1e-4, rtol=1e-4, msg=k)
    if mode == "kv_pos":
        assert attn.pos.map_pos.weight.grad.abs().sum() > 0
        assert attn.pos.map_pos.bias.grad.abs().max() < 1e-5  # b cancels in the softmax


def _is_reversible(probs: torch.Tensor) -> bool:
    """From post-softmax probabilities alone the logits are known up to a constant per row.

    For logits L_ij = S_ij + g_j with S symmetric (KV: g = 0), log p_ij - log p_ji equals
    u_j - u_i (u_i = g_i + logsumexp_j L_ij): the attention is a reversible Markov kernel.
    """
    m = probs.log() - probs.log().transpose(-2, -1)
    u = m[..., 0, :]  # u_j - u_0
    return torch.allclose(m, u.unsqueeze(-2) - u.unsqueeze(-1), atol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_logit_symmetry(mode):
    """kv: symmetric logits; qkv: not; kv_pos: Borji's logits are not symmetric, yet (the
    factoring finding) the attention keeps KV's reversibility: softmax(S + g(j))."""
    torch.manual_seed(2)
    attn = Attention(32, 4, mode).eval()
    _randomise(attn)
    x = torch.randn(2, 25, 32)
    _, probs = attn(x, return_attention=True)
    _, ref_probs, ref_logits = naive_attention(attn, x)
    torch.testing.assert_close(probs, ref_probs, atol=1e-5, rtol=1e-5)
    symmetric = torch.allclose(ref_logits, ref_logits.transpose(-2, -1), atol=1e-5)
    assert symmetric is (mode == "kv")
    assert _is_reversible(probs.double()) is (mode != "qkv")


def test_kv_pos_bias_separates_into_row_and_column_terms():
    """w·P(i, j) = f(i) + g(j): double-centring leaves nothing (the finding in docs/models.md)."""
    torch.manual_seed(3)
    for pos_dim, n in [(50, 37), (10, 64), (20, 11)]:
        w = torch.randn(pos_dim, dtype=torch.float64)
        bias = reference_encoding_2d(n, n, pos_dim).double() @ w  # (N, N)
        centred = bias - bias.mean(0, keepdim=True) - bias.mean(1, keepdim=True) + bias.mean()
        assert centred.abs().max() < 1e-10
        assert (bias - bias.T).abs().max() > 1e-3  # yet not symmetric: KV-pos is asymmetric


def test_kv_pos_factored_form_equals_naive_logits_up_to_row_constants():
    torch.manual_seed(4)
    module = KVPosBias(50)
    _randomise(module)
    n = 30
    logits = torch.randn(n, n, dtype=torch.float64)
    naive = (logits.unsqueeze(-1) + reference_encoding_2d(n, n, 50).double()) \
        @ module.map_pos.weight.double().T
    naive = naive.squeeze(-1) + module.map_pos.bias.double()
    temperature, key_bias = module(n)
    factored = temperature.double() * logits + key_bias.double()
    diff = naive - factored  # must be f(i) + b: constant along each row
    assert (diff - diff[:, :1]).abs().max() < 1e-5
    torch.testing.assert_close(factored.softmax(-1), naive.softmax(-1), atol=1e-6, rtol=0)


def test_parameters_per_mode():
    d, pos_dim = 48, 50
    counts = {m: sum(p.numel() for p in Attention(d, 4, m, pos_dim=pos_dim).parameters())
              for m in MODES}
    assert counts["qkv"] == 3 * d * d + 3 * d + d * d + d
    assert counts["kv"] == counts["qkv"] - (d * d + d)
    assert counts["kv_pos"] == counts["kv"] + pos_dim + 1
    names = [n for n, _ in Attention(d, 4, "kv").named_parameters()]
    assert not any("q" in n.split(".")[0] for n in names), names


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_runs_through_sdpa(mode, monkeypatch):
    calls = []
    original = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("dropout_p"))
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    attn = Attention(16, 2, mode, attn_drop=0.3)
    attn.train()(torch.randn(1, 9, 16))
    attn.eval()(torch.randn(1, 9, 16))
    assert calls == [0.3, 0.0]  # dropout only in training


def test_attention_dropout_only_in_training():
    torch.manual_seed(5)
    attn = Attention(16, 2, "kv", attn_drop=0.5)
    x = torch.randn(1, 12, 16)
    attn.eval()
    torch.testing.assert_close(attn(x), naive_attention(attn, x)[0], atol=1e-5, rtol=1e-5)
    attn.train()
    assert not torch.allclose(attn(x), attn(x))


def test_invalid_arguments():
    with pytest.raises(ValueError, match="mode='qk'"):
        Attention(16, 2, "qk")
    with pytest.raises(ValueError, match="num_heads=3"):
        Attention(16, 3)
