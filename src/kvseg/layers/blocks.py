"""Shared building blocks: MLP, pre-norm Transformer block, patch embedding, conv-BN-ReLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvseg.errors import ConfigError
from kvseg.layers.attention import Attention


class QuickGELU(nn.Module):
    """x · sigmoid(1.702 x): the GELU approximation CvT's official models were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


#: MLP activations by name (``act`` option of the families that offer it).
ACTIVATIONS = {"gelu": nn.GELU, "quick_gelu": QuickGELU}


class Mlp(nn.Module):
    """Linear(dim, hidden) -> act -> dropout -> Linear(hidden, dim) -> dropout; (B, N, dim).

    ``act``: ``"gelu"`` (exact GELU, ViT) or ``"quick_gelu"`` (CvT's official activation).
    """

    def __init__(self, dim: int, hidden: int, drop: float = 0.0, act: str = "gelu") -> None:
        super().__init__()
        if act not in ACTIVATIONS:
            raise ConfigError(f"act={act!r}: expected one of {', '.join(ACTIVATIONS)}")
        self.fc1 = nn.Linear(dim, hidden)
        self.act = ACTIVATIONS[act]()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample in training (rate ``p``)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device) >= self.p
        return x * keep.to(x.dtype) / (1.0 - self.p)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + Attn(LN(x)), then x + MLP(LN(x)); (B, N, dim) -> (B, N, dim).

    ``grid_size``: the token grid the model is built for (sizes ``kv_relpos``'s table);
    ``forward(x, grid)`` passes the actual (h, w) of the tokens on to the attention.
    """

    def __init__(self, dim: int, num_heads: int, mode: str = "qkv", mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, pos_dim: int = 50,
                 grid_size: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, mode, qkv_bias=qkv_bias, attn_drop=attn_drop,
                              proj_drop=drop, pos_dim=pos_dim, grid_size=grid_size)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), grid=grid))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping patches: Conv2d(in, dim, k=p, s=p); (B, C, H, W) -> (B, dim, H/p, W/p)."""

    def __init__(self, in_channels: int, dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class PosEmbed2d(nn.Module):
    """A learned position embedding on a (grid_h, grid_w) grid, resized to any token grid.

    ``forward(x)`` adds it to tokens laid out as a map (B, dim, h, w); when (h, w) differs from
    the grid it was built for, the table is resized bilinearly (as SETR/mmseg and TransUNet do
    when the input size changes).
    """

    def __init__(self, dim: int, grid_h: int, grid_w: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, dim, grid_h, grid_w))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = self.weight
        if tuple(pos.shape[-2:]) != tuple(x.shape[-2:]):
            pos = F.interpolate(pos, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return x + pos


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1) -> nn.Sequential:
    """Conv (no bias) -> BatchNorm -> ReLU, 'same' padding."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def init_weights(module: nn.Module) -> None:
    """ViT-style init: Linear trunc-normal(0.02) with zero bias, LayerNorm (1, 0).

    Convolutions keep PyTorch's default (Kaiming-uniform); layers flagged ``_kvseg_keep_init``
    (KV-pos ``map_pos``) keep theirs; the relative-position table stays zero.
    """
    for m in module.modules():
        if isinstance(m, nn.Linear) and not getattr(m, "_kvseg_keep_init", False):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def tokens_to_map(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h·w, C) row-major tokens -> (B, C, h, w)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h·w, C) row-major tokens."""
    return x.flatten(2).transpose(1, 2)
