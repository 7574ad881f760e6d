"""Attention parity with written-out references (einsum + softmax; Borji's unfactored KV-pos; a
loop-built relative-position bias), symmetry per mode, parameters per mode."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from kvseg.layers import MODES, Attention, mode_spec, sinusoidal_2d
from kvseg.layers.attention import HEAD_DIM_MULTIPLE, AttentionCore, KVPosBias, fold_key_bias

#: (tokens, grid, dim, heads) cases; every mode gets the grid (only kv_relpos uses it)
CASES = [(35, (5, 7), 32, 4), (16, (4, 4), 24, 3), (50, (10, 5), 16, 1)]


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


def reference_rel_pos_bias(table: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """B[row_i - row_j, col_i - col_j] for every token pair of an h × w grid, with loops:
    (heads, h·w, h·w) from a (heads, 2h - 1, 2w - 1) table."""
    n = h * w
    out = torch.zeros(table.shape[0], n, n, dtype=table.dtype)
    for i in range(n):
        for j in range(n):
            dr, dc = i // w - j // w, i % w - j % w
            out[:, i, j] = table[:, dr + h - 1, dc + w - 1]
    return out


def naive_attention(attn: Attention, x: torch.Tensor, grid: tuple[int, int] | None = None):
    """The module's maths written out: per-head einsum logits, Borji's (B, h, N, N, pos_dim)
    KV-pos map, the relative-position bias from loops, softmax, AV, output projection.
    Returns (out, probs, pre-softmax logits)."""
    b, n, dim = x.shape
    h, d = attn.num_heads, dim // attn.num_heads
    spec = mode_spec(attn.mode)

    def split(t):  # (B, N, dim) -> (B, h, N, d)
        return t.reshape(b, n, h, d).permute(0, 2, 1, 3)

    fused = getattr(attn, "".join(spec.projections))  # qkv, kv, qk or k
    tensors = {p: split(x @ w.T + bias) for p, w, bias in zip(
        spec.projections, fused.weight.chunk(len(spec.projections)),
        fused.bias.chunk(len(spec.projections)), strict=True)}
    q, k, v = tensors[spec.query], tensors["k"], tensors[spec.value]
    logits = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(d)
    if attn.mode == "kv_pos":
        pos = reference_encoding_2d(n, n, attn.pos.pos_dim)  # (N, N, pos_dim)
        full = logits.unsqueeze(-1) + pos  # (B, h, N, N, pos_dim), as in Borji's ViT_pos.py
        logits = (full @ attn.pos.map_pos.weight.T).squeeze(-1) + attn.pos.map_pos.bias
    if attn.mode == "kv_relpos":
        gh, gw = grid or attn.grid_size
        logits = logits + reference_rel_pos_bias(attn.rel_pos.resized_table(gh, gw), gh, gw)
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
    for n, grid, dim, heads in CASES:
        attn = Attention(dim, heads, mode, pos_dim=50, grid_size=grid).train(train)
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
    attn = Attention(24, 3, mode, pos_dim=12, grid_size=(4, 5))
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
    if mode == "kv_relpos":
        assert attn.rel_pos.table.grad.abs().sum() > 0


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
    """kv and single: symmetric logits (Q = K); qkv, shared_kv, shared_qv: not (two
    projections); kv_pos: Borji's logits are not symmetric, yet (the factoring finding) the
    attention keeps KV's reversibility, softmax(S + g(j)); kv_relpos: B(Δ) ≠ B(-Δ) makes the
    logits pairwise asymmetric and the attention not reversible."""
    torch.manual_seed(2)
    attn = Attention(32, 4, mode, grid_size=(5, 5)).eval()
    _randomise(attn)
    x = torch.randn(2, 25, 32)
    _, probs = attn(x, return_attention=True)
    _, ref_probs, ref_logits = naive_attention(attn, x)
    torch.testing.assert_close(probs, ref_probs, atol=1e-5, rtol=1e-5)
    symmetric = torch.allclose(ref_logits, ref_logits.transpose(-2, -1), atol=1e-5)
    assert symmetric is mode_spec(mode).symmetric is (mode in ("kv", "single"))
    assert _is_reversible(probs.double()) is (mode in ("kv", "kv_pos", "single"))


def test_kv_relpos_with_a_zero_table_is_kv():
    torch.manual_seed(6)
    kv = Attention(32, 4, "kv").eval()
    _randomise(kv)
    relpos = Attention(32, 4, "kv_relpos", grid_size=(3, 4)).eval()
    relpos.load_state_dict({**kv.state_dict(), "rel_pos.table": torch.zeros(4, 5, 7)})
    x = torch.randn(2, 12, 32)
    out_kv, probs_kv = kv(x, return_attention=True)
    out_rel, probs_rel = relpos(x, return_attention=True)
    assert torch.equal(probs_rel, probs_kv) and torch.equal(out_rel, out_kv)  # adding 0.0
    torch.testing.assert_close(relpos(x), kv(x), atol=1e-6, rtol=1e-6)  # SDPA: masked vs not
    for grid in [(2, 6), (6, 2), (1, 12)]:  # resampled zeros are zeros
        torch.testing.assert_close(relpos(x, grid=grid), kv(x), atol=1e-6, rtol=1e-6)


def test_rel_pos_table_resampling():
    """Another grid reads a bicubically resampled table (align_corners): the zero offset stays
    at the centre, a constant table stays constant; the native grid uses the table as is."""
    torch.manual_seed(7)
    attn = Attention(16, 2, "kv_relpos", grid_size=(4, 4))
    rel = attn.rel_pos
    with torch.no_grad():
        rel.table.normal_()
    bias = rel((4, 4))
    torch.testing.assert_close(bias, reference_rel_pos_bias(rel.table.detach(), 4, 4))
    for h, w in [(6, 5), (2, 3), (1, 4), (3, 1), (7, 7)]:
        table = rel.resized_table(h, w)
        assert table.shape == (2, 2 * h - 1, 2 * w - 1)
        torch.testing.assert_close(table[:, h - 1, w - 1], rel.table[:, 3, 3])  # Δ = 0
        assert rel((h, w)).shape == (2, h * w, h * w)
        torch.testing.assert_close(rel((h, w)), reference_rel_pos_bias(table.detach(), h, w))
    with torch.no_grad():
        rel.table.fill_(0.25)
    torch.testing.assert_close(rel((6, 3)), torch.full((2, 18, 18), 0.25))
    x = torch.randn(1, 30, 16)
    ref_out, _, _ = naive_attention(attn, x, grid=(5, 6))
    torch.testing.assert_close(attn(x, grid=(5, 6)), ref_out, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"grid=\(4, 4\): 30 tokens"):
        attn(x)
    with pytest.raises(ValueError, match="needs grid_size"):
        Attention(16, 2, "kv_relpos")


def test_rel_pos_is_asymmetric_in_the_offsets():
    """With CvT's stride-2 keys the bias is taken in query-grid offsets (row_i - 2a, col_i - 2b)."""
    torch.manual_seed(8)
    attn = Attention(16, 2, "kv_relpos", grid_size=(5, 6))
    with torch.no_grad():
        attn.rel_pos.table.normal_()
    bias = attn.rel_pos((5, 6))
    assert not torch.allclose(bias, bias.transpose(-2, -1))
    strided = attn.rel_pos((5, 6), key_stride=2)  # keys at rows 0, 2, 4 and cols 0, 2, 4
    assert strided.shape == (2, 30, 9)
    keys = [r * 6 + c for r in (0, 2, 4) for c in (0, 2, 4)]
    torch.testing.assert_close(strided, bias[:, :, keys])


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
    """Per layer, d wide, with biases: each projection d² + d; KV-pos pos_dim + 1; the
    relative-position table heads·(2h - 1)(2w - 1) (docs/models.md)."""
    d, heads, pos_dim, grid = 48, 4, 50, (5, 7)
    counts = {m: sum(p.numel() for p in Attention(d, heads, m, pos_dim=pos_dim,
                                                  grid_size=grid).parameters()) for m in MODES}
    proj = d * d + d
    assert counts["qkv"] == 3 * proj + proj
    for mode in ("kv", "shared_kv", "shared_qv"):
        assert counts[mode] == counts["qkv"] - proj, mode
    assert counts["single"] == counts["qkv"] - 2 * proj
    assert counts["kv_pos"] == counts["kv"] + pos_dim + 1
    assert counts["kv_relpos"] == counts["kv"] + heads * 9 * 13
    for mode in MODES:
        names = [n.split(".")[0] for n, _ in Attention(d, 4, mode, grid_size=grid)
                 .named_parameters()]
        assert ("q" in "".join(n for n in names if n != "proj")) is \
            (mode_spec(mode).query == "q"), (mode, names)


@pytest.mark.parametrize("mode", MODES)
def test_projections_follow_the_spec(mode):
    """q is k exactly when the keys serve as queries; v is k (or q) exactly when shared."""
    attn = Attention(16, 2, mode, grid_size=(3, 3))
    q, k, v = attn.project(torch.randn(1, 9, 16))
    spec = mode_spec(mode)
    assert (q is k) is (spec.query == "k")
    assert (v is k) is (spec.value == "k" or (spec.value == "q" and q is k))
    assert (v is q) is (spec.value == "q" or (spec.value == "k" and q is k))


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_runs_through_sdpa(mode, monkeypatch):
    calls = []
    original = F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        calls.append((kwargs.get("dropout_p"), kwargs.get("attn_mask") is not None,
                      (q.shape[-1], k.shape[-1], v.shape[-1])))
        return original(q, k, v, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    attn = Attention(16, 2, mode, attn_drop=0.3, grid_size=(3, 3))
    with torch.no_grad():  # (with gradients on the CPU, KV-pos calls the fused kernel itself)
        attn.train()(torch.randn(1, 9, 16))
        attn.eval()(torch.randn(1, 9, 16))
    assert [c[0] for c in calls] == [0.3, 0.0]  # dropout only in training
    # only the relative-position bias is a mask; KV-pos's key bias is one more channel of
    # q and k (on the CPU head dim 8 -> 9, v padded alike; CUDA pads to a multiple of 8), so
    # SDPA keeps its fused mask-free kernels
    assert all(c[1] is (mode == "kv_relpos") for c in calls)
    widths = {c[2] for c in calls}
    assert widths == ({(9, 9, 9)} if mode == "kv_pos" else {(8, 8, 8)})


def _saved_bytes(module: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd keeps for the backward pass of module(x)."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x)
    seen.pop(x.untyped_storage().data_ptr(), None)
    return sum(seen.values()), out


def test_kv_pos_training_keeps_what_kv_keeps():
    """The folded q', k', v' and SDPA's padded output are recomputed in backward: KV-pos saves
    the kv projection and the merged output, as KV does, plus only the key terms (the
    (N, pos_dim) column encoding, t, g), nothing of size (B, heads, N, d)."""
    torch.manual_seed(9)
    x = torch.randn(2, 49, 64, requires_grad=True)
    kv = Attention(64, 4, "kv")
    kvpos = Attention(64, 4, "kv_pos")
    kvpos.load_state_dict(kv.state_dict(), strict=False)
    kv_bytes, _ = _saved_bytes(kv, x)
    pos_bytes, out = _saved_bytes(kvpos, x)
    assert pos_bytes - kv_bytes <= 4 * (49 * 50 + 64)  # vs 2·49·64·4 bytes per tensor
    out.square().sum().backward()  # the recomputation gives the gradients
    ref = naive_attention(kvpos, x.detach())[0].square().sum()
    grads = torch.autograd.grad(ref, list(kvpos.parameters()))
    for (name, p), g in zip(kvpos.named_parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, g, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_key_bias_backward_without_a_second_attention_forward(shared, dtype, monkeypatch):
    """On the CPU the key-bias attention's backward calls the fused kernel's backward on the
    kept log-sum-exp: one attention forward per step (the recomputing path needs two), and the
    same gradients as the written-out softmax for q, k, v, the temperature and the bias (keys
    as queries, and CvT's case of other queries with fewer keys)."""
    torch.manual_seed(3)
    core = AttentionCore(scale=0.25)
    k = torch.randn(2, 3, 10, 16, dtype=dtype, requires_grad=True)
    q = k if shared else torch.randn(2, 3, 40, 16, dtype=dtype, requires_grad=True)
    v = torch.randn(2, 3, 10, 16, dtype=dtype, requires_grad=True)
    t = torch.tensor(0.7, requires_grad=True)
    g = torch.randn(10, requires_grad=True)
    weight = torch.randn(2, 3, q.shape[2], 16)
    inputs = [k, v, t, g] if shared else [q, k, v, t, g]
    calls = []
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu",
                        lambda *a, **kw: calls.append(1) or flash(*a, **kw))
    out = core(q, k, v, temperature=t, key_bias=g)
    got = torch.autograd.grad((out.float() * weight).sum(), inputs)
    assert len(calls) == 1
    ref = core.logits(q.double(), k.double(), t.double(), g.double()).softmax(-1) @ v.double()
    torch.testing.assert_close(out.double(), ref, **_tol(dtype))
    want = torch.autograd.grad((ref * weight).sum(), inputs)
    for name, a, b in zip(["k", "v", "t", "g"] if shared else "qkvtg", got, want, strict=True):
        torch.testing.assert_close(a.double(), b.double(), **_tol(dtype), msg=name)


def _tol(dtype):
    return {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 0.15,
                                                                         "rtol": 0.05}


def test_head_dim_padding_is_a_multiple_of_eight():
    assert HEAD_DIM_MULTIPLE == 8
    core = Attention(24, 3, "kv_pos").core  # head dim 8 -> 9 -> 16
    q = torch.randn(1, 3, 5, 8)
    q2, k2, v2 = fold_key_bias(q, q, torch.randn(1, 3, 5, 8), torch.tensor(1.5),
                               torch.randn(5), core.scale)
    assert q2.shape[-1] == k2.shape[-1] == v2.shape[-1] == 16


def test_attention_dropout_only_in_training():
    torch.manual_seed(5)
    attn = Attention(16, 2, "kv", attn_drop=0.5)
    x = torch.randn(1, 12, 16)
    attn.eval()
    torch.testing.assert_close(attn(x), naive_attention(attn, x)[0], atol=1e-5, rtol=1e-5)
    attn.train()
    assert not torch.allclose(attn(x), attn(x))


def test_invalid_arguments():
    with pytest.raises(ValueError, match="mode='qk'.*kv_relpos"):
        Attention(16, 2, "qk")
    with pytest.raises(ValueError, match="num_heads=3"):
        Attention(16, 3)
