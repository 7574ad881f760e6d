"""kvseg.patch_attention against MONAI's own modules (UNETR, SwinUNETR, SABlock) and a timm-style
attention written out here: QKV reproduces the original, the other modes drop exactly the
query (or value) projections, MACs equal torch's FlopCounterMode on the original, and what is
not understood is refused by type."""

from __future__ import annotations

import copy

import pytest
import torch
from monai.networks.blocks.selfattention import SABlock
from monai.networks.nets import UNETR, SwinUNETR
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import kvseg
from kvseg.errors import ConfigError
from kvseg.inference.profile import count_macs, count_params
from kvseg.layers.attention import MODES, mode_spec
from kvseg.models.patch import TokenAttention, WindowTokenAttention

D, HEADS = 48, 4  # UNETR micro width here: 12 blocks


def _unetr(qkv_bias: bool = True, dropout: float = 0.0) -> nn.Module:
    return UNETR(3, 2, img_size=32, feature_size=8, hidden_size=D, mlp_dim=2 * D,
                 num_heads=HEADS, spatial_dims=2, qkv_bias=qkv_bias, dropout_rate=dropout)


def _swin(attn_drop: float = 0.0) -> nn.Module:
    # depth 2 per stage: the second block of each stage runs on shifted windows (the mask)
    return SwinUNETR(3, 2, feature_size=12, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 4),
                     spatial_dims=2, attn_drop_rate=attn_drop)


def _noisy(model: nn.Module, seed: int = 0) -> nn.Module:
    """Attention weights and the relative bias far from their near-uniform init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".attn." in name:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def unetr():
    torch.manual_seed(0)
    return _noisy(_unetr(dropout=0.3))  # dropout: identity in eval, in MONAI and in kvseg


@pytest.fixture(scope="module")
def swin():
    torch.manual_seed(0)
    return _noisy(_swin(attn_drop=0.3))


def _x(size: int) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("which, size", [("unetr", 32), ("swin", 64)])
def test_qkv_patch_reproduces_the_monai_model(which, size, request):
    net = request.getfixturevalue(which)
    x = _x(size)
    with torch.no_grad():
        want = net(x)
        patched, report = kvseg.patch_attention(copy.deepcopy(net), "qkv")
        got = patched(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert report.params_before == report.params_after == count_params(net)
    kind = "SABlock" if which == "unetr" else "WindowAttention"
    assert report.replaced == {kind: 12 if which == "unetr" else 8}
    wrapper = TokenAttention if which == "unetr" else WindowTokenAttention
    assert all(isinstance(patched.get_submodule(p), wrapper) for p in report.modules)


def test_sablock_variants_and_save_attn():
    """Separate to_q/to_k/to_v, no bias, no output Linear; save_attn keeps the probabilities."""
    torch.manual_seed(1)
    x = torch.randn(2, 10, D)
    for kwargs in ({"use_combined_linear": False}, {"include_fc": False},
                   {"save_attn": True, "qkv_bias": True}):
        block = _noisy(SABlock(D, HEADS, **kwargs))
        holder = nn.Sequential(block)
        with torch.no_grad():
            want = block(x)
            patched, _ = kvseg.patch_attention(copy.deepcopy(holder), "qkv")
            got = patched(x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=str(kwargs))
        if kwargs.get("save_attn"):
            torch.testing.assert_close(patched[0].att_mat, block.att_mat, atol=1e-6, rtol=0)


def _dropped_per_layer(mode: str, dim: int, bias: bool) -> int:
    """Parameters of the projections a mode does not have: (3 - len(projections)) × (D² + D)."""
    return (3 - len(mode_spec(mode).projections)) * (dim * dim + (dim if bias else 0))


@pytest.mark.parametrize("mode", MODES)
def test_unetr_parameter_arithmetic_per_mode(unetr, mode):
    """12 blocks of width D: every dropped projection is D² (+ D bias) per block; KV-pos adds
    Linear(50, 1), KV-relpos a (heads, 2h - 1, 2w - 1) table on the 2 × 2 token grid."""
    net = copy.deepcopy(unetr)
    before = count_params(net)
    patched, report = kvseg.patch_attention(net, mode, grid_size=(2, 2))
    extra = {"kv_pos": 51, "kv_relpos": HEADS * 3 * 3}.get(mode, 0)
    assert before - count_params(patched) == 12 * (_dropped_per_layer(mode, D, True) - extra)
    assert report.dropped == 12 * _dropped_per_layer(mode, D, True)
    assert report.added == 12 * extra
    assert report.params_after == count_params(patched)
    with torch.no_grad():
        assert torch.isfinite(patched(_x(32))).all()


@pytest.mark.parametrize("mode", [m for m in MODES if m != "kv_relpos"])
def test_swin_parameter_arithmetic_per_mode(swin, mode):
    """Stage widths 12, 24, 48, 96, two blocks each, qkv with bias; the relative-position
    tables stay."""
    net = copy.deepcopy(swin)
    before = count_params(net)
    patched, report = kvseg.patch_attention(net, mode)
    dropped = sum(2 * _dropped_per_layer(mode, 12 * 2 ** i, True) for i in range(4))
    extra = 8 * 51 if mode == "kv_pos" else 0
    assert before - count_params(patched) == dropped - extra and report.dropped == dropped
    tables = [m.relative_position_bias_table for m in patched.modules()
              if isinstance(m, WindowTokenAttention)]
    assert len(tables) == 8 and all(t.shape[0] == 13 * 13 for t in tables)
    with torch.no_grad():
        assert torch.isfinite(patched(_x(64))).all()


def test_kv_folds_the_query_by_the_rule(unetr):
    """rule="key" keeps W_k and W_v as they were; "sym" gives the kv_rules factor."""
    from kvseg.models.kv_rules import convert_qk

    src = unetr.vit.blocks[3].attn.qkv
    wq, wk, wv = src.weight.detach().chunk(3)
    bq, bk, bv = src.bias.detach().chunk(3)
    for rule in ("key", "sym"):
        patched, report = kvseg.patch_attention(copy.deepcopy(unetr), "kv", rule=rule)
        kv = patched.vit.blocks[3].attn.attn.kv
        wk_new, bk_new = convert_qk(wq, bq, wk, bk, HEADS, rule)
        torch.testing.assert_close(kv.weight.detach(), torch.cat([wk_new, wv]))
        torch.testing.assert_close(kv.bias.detach(), torch.cat([bk_new, bv]))
        assert report.rule == rule
    torch.testing.assert_close(
        patched.vit.blocks[3].attn.attn.proj.weight, unetr.vit.blocks[3].attn.out_proj.weight)


def test_window_kv_is_query_free_yet_asymmetric_through_the_bias(swin):
    """Patched KV window: logits = s·K Kᵀ + B[Δ] (+ mask). The content part is symmetric, the
    bias is not, so the logits are pairwise asymmetric."""
    patched, _ = kvseg.patch_attention(copy.deepcopy(swin), "kv")
    win = patched.swinViT.layers1[0].blocks[1].attn  # a shifted block
    x = torch.randn(4, 49, 12, generator=torch.Generator().manual_seed(2))
    q, k, v = win.attn.project(x)
    assert q is k  # the keys serve as queries
    bias = win.bias(49, 4, None)
    logits = win.attn.core.logits(q, k, attn_bias=bias)
    content = logits - bias
    torch.testing.assert_close(content, content.transpose(-1, -2), atol=1e-5, rtol=0)
    assert (logits - logits.transpose(-1, -2)).abs().max() > 0.1


@pytest.mark.parametrize("which, size", [("unetr", 32), ("swin", 64)])
def test_macs_equal_flop_counter_on_the_original(which, size, request):
    """kvseg's count of the patched QKV model = torch's FlopCounterMode / 2 on MONAI's model
    (its einsum/matmul attention is visible to the counter; every conv, linear and transposed
    conv too)."""
    net = request.getfixturevalue(which)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(_x(size)[:1])
    patched, _ = kvseg.patch_attention(copy.deepcopy(net), "qkv")
    assert count_macs(patched, (1, 3, size, size)) * 2 == counter.get_total_flops()


class TimmAttention(nn.Module):
    """timm's ViT attention, written out (fused qkv, num_heads, proj, q_norm/k_norm)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class TinyViT(nn.Module):
    def __init__(self, **kw) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(TimmAttention(32, 4, **kw) for _ in range(2))

    def forward(self, x):
        for blk in self.blocks:
            x = x + blk(x)
        return x


def test_timm_convention():
    torch.manual_seed(3)
    model = _noisy(TinyViT())
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        want = model(x)
        patched, report = kvseg.patch_attention(copy.deepcopy(model), "qkv")
        torch.testing.assert_close(patched(x), want, atol=1e-5, rtol=0)
        kv, report = kvseg.patch_attention(copy.deepcopy(model), "kv")
    assert report.replaced == {"TimmAttention": 2}
    assert count_params(model) - count_params(kv) == 2 * (32 * 32 + 32)


def test_refusals_name_the_type():
    with pytest.raises(ConfigError, match="MultiheadAttention"):
        kvseg.patch_attention(nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2)), "kv")
    with pytest.raises(ConfigError, match="Sequential has no attention module"):
        kvseg.patch_attention(nn.Sequential(nn.Conv2d(3, 3, 3)), "kv")
    with pytest.raises(ConfigError, match=r"blocks\.0 \(TimmAttention\): q_norm"):
        kvseg.patch_attention(TinyViT(qk_norm=True), "kv")
    with pytest.raises(ConfigError, match="causal"):
        kvseg.patch_attention(nn.Sequential(SABlock(16, 2, causal=True, sequence_length=4)),
                              "kv")
    with pytest.raises(ConfigError, match="WindowAttention.*own relative-position bias"):
        kvseg.patch_attention(_swin(), "kv_relpos")
    with pytest.raises(ConfigError, match="mode='kvx'"):
        kvseg.patch_attention(_unetr(), "kvx")
    patched, _ = kvseg.patch_attention(_unetr(), "kv")
    with pytest.raises(ConfigError, match="already has kvseg attention"):
        kvseg.patch_attention(patched, "kv")


def test_kv_pos_window_adds_key_bias_and_window_bias(swin):
    """KV-pos in a shifted window: softmax(t·s·K Kᵀ + g(j) + B[Δ] + mask) V, written out,
    equals the fused path (key bias joined to the window bias in one mask)."""
    patched, _ = kvseg.patch_attention(copy.deepcopy(swin), "kv_pos")
    win = patched.swinViT.layers1[0].blocks[1].attn.double()  # float64: no kernel rounding
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(4, 49, 12, generator=gen, dtype=torch.float64)
    mask = torch.where(torch.rand(2, 49, 49, generator=gen) > 0.3, 0.0, -100.0).double()
    with torch.no_grad():
        win.attn.pos.map_pos.weight.normal_(generator=gen)  # temperature and g far from 1, 0
        got = win(x, mask)
        _, k, v = win.attn.project(x)
        t, g = win.attn.pos(49)
        logits = t * (k @ k.transpose(-1, -2)) * 12 ** -0.5 + g.view(1, 1, 1, -1)
        logits = logits + win.bias(49, 4, mask)
        out = (logits.softmax(-1) @ v).transpose(1, 2).flatten(2)
        want = win.attn.proj(out)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
