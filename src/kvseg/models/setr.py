"""SETR (Zheng et al., CVPR 2021): a ViT encoder and the three SETR heads (naive, pup, mla).

The encoder keeps the H/p × W/p token grid throughout; the heads bring it back to full size:

* ``naive``: 1×1 conv + BN + ReLU, then the 1×1 classifier and bilinear upsampling.
* ``pup``: log2(p) steps of [3×3 conv + BN + ReLU, ×2 bilinear] (progressive upsampling).
* ``mla``: four evenly spaced encoder layers, each through its own LayerNorm (SETR's
  ``norm_0..3``, mmseg's ``MLANeck``; the encoder then has no final norm), 1×1-projected,
  top-down summed, 3×3 conv, then per stream two 3×3 convs (channels halved) and ×4
  upsampling, concatenated; the classifier is a 3×3 conv (SETR's ``VIT_MLAHead.cls``).

Pretrained weights: timm ViT state dicts and Google's ViT ``.npz`` through
:mod:`kvseg.models.convert_vit`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kvseg.errors import ConfigError
from kvseg.layers.blocks import (
    PatchEmbed,
    PosEmbed2d,
    TransformerBlock,
    conv_bn_relu,
    init_weights,
    map_to_tokens,
    tokens_to_map,
)
from kvseg.models.base import SegmentationModel

HEADS = ("naive", "pup", "mla")


@dataclass(frozen=True)
class SETRConfig:
    """ViT + SETR head. ``base`` is ViT-B/16, ``large`` SETR's ViT-L/16."""

    patch_size: int = 16
    dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop: float = 0.0
    attn_drop: float = 0.0
    drop_path: float = 0.0
    pos_dim: int = 50
    head: str = "pup"
    decoder_channels: int = 256


def mla_indices(depth: int) -> list[int]:
    """The four evenly spaced layers MLA aggregates (SETR: 6/12/18/24 of 24 -> 5, 11, 17, 23)."""
    return sorted({max(0, round((k + 1) * depth / 4) - 1) for k in range(4)})


class ViTEncoder(nn.Module):
    """(B, C, H, W) -> list of (B, dim, H/p, W/p) maps from the layers in ``out_indices``.

    Patch embedding, a learned position embedding resized to the token grid, pre-norm blocks;
    the final LayerNorm (``final_norm``; the MLA head normalises its levels itself) is applied
    to the last layer's output. No cls token (segmentation).
    """

    def __init__(self, in_channels: int, img_size: int, cfg: SETRConfig, mode: str,
                 out_indices: list[int], final_norm: bool = True) -> None:
        super().__init__()
        grid = math.ceil(img_size / cfg.patch_size)
        self.patch_embed = PatchEmbed(in_channels, cfg.dim, cfg.patch_size)
        self.pos_embed = PosEmbed2d(cfg.dim, grid, grid)
        self.pos_drop = nn.Dropout(cfg.drop)
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(
            TransformerBlock(cfg.dim, cfg.num_heads, mode, cfg.mlp_ratio, cfg.qkv_bias, cfg.drop,
                             cfg.attn_drop, rates[i], cfg.pos_dim, (grid, grid))
            for i in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6) if final_norm else None
        self.out_indices = list(out_indices)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.pos_drop(self.pos_embed(self.patch_embed(x)))  # (B, dim, h, w)
        h, w = x.shape[-2:]
        x = map_to_tokens(x)  # (B, h·w, dim)
        outs = []
        for i, block in enumerate(self.blocks):
            x = block(x, (h, w))
            if i in self.out_indices:
                last = i == len(self.blocks) - 1
                y = self.norm(x) if last and self.norm is not None else x
                outs.append(tokens_to_map(y, h, w))
        return outs


class NaiveHead(nn.Module):
    """Last feature map -> 1×1 conv + BN + ReLU (B, channels, h, w)."""

    def __init__(self, dim: int, channels: int) -> None:
        super().__init__()
        self.conv = conv_bn_relu(dim, channels, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.conv(features[-1])


class PUPHead(nn.Module):
    """Last feature map -> n_up × [3×3 conv + BN + ReLU, ×2 bilinear] (B, channels, h·2^n, ...)."""

    def __init__(self, dim: int, channels: int, n_up: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(conv_bn_relu(dim if i == 0 else channels, channels, 3)
                                   for i in range(max(n_up, 1)))
        self.n_up = n_up

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = features[-1]
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if i < self.n_up:
                x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return x


class MLAHead(nn.Module):
    """Four maps -> LayerNorm per level, 1×1 proj, top-down sum, 3×3 conv; per stream two 3×3
    convs (channels/2) and ×4 upsampling; concat -> (B, 4·channels/2, 4h, 4w)."""

    def __init__(self, dim: int, channels: int, num_levels: int = 4) -> None:
        super().__init__()
        half = channels // 2
        self.norms = nn.ModuleList(nn.LayerNorm(dim, eps=1e-6) for _ in range(num_levels))
        self.proj = nn.ModuleList(conv_bn_relu(dim, channels, 1) for _ in range(num_levels))
        self.smooth = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in range(num_levels))
        self.streams = nn.ModuleList(
            nn.Sequential(conv_bn_relu(channels, half, 3), conv_bn_relu(half, half, 3))
            for _ in range(num_levels))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        normed = [n(f.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # LayerNorm over channels
                  for n, f in zip(self.norms, features, strict=True)]
        projected = [p(f) for p, f in zip(self.proj, normed, strict=True)]
        summed, acc = [], None
        for f in reversed(projected):  # top-down: deepest first
            acc = f if acc is None else acc + f
            summed.append(acc)
        summed.reverse()
        outs = [F.interpolate(s(sm(x)), scale_factor=4, mode="bilinear", align_corners=False)
                for x, sm, s in zip(summed, self.smooth, self.streams, strict=True)]
        return torch.cat(outs, dim=1)


def build_setr(cfg: SETRConfig, mode: str, *, in_channels: int, num_classes: int,
               img_size: int) -> SegmentationModel:
    """SETR with the head ``cfg.head``; see the module docstring."""
    if cfg.head not in HEADS:
        raise ConfigError(f"head={cfg.head!r}: expected one of {', '.join(HEADS)}")
    p = cfg.patch_size
    if p < 1 or p & (p - 1):
        raise ConfigError(f"patch_size={p}: expected a power of two")
    if cfg.head == "mla":
        indices = mla_indices(cfg.depth)
        if len(indices) != 4:
            raise ConfigError(f"depth={cfg.depth}: the mla head needs at least 4 layers")
        decoder, out_ch = MLAHead(cfg.dim, cfg.decoder_channels), 2 * cfg.decoder_channels
    else:
        indices = [cfg.depth - 1]
        if cfg.head == "pup":
            decoder = PUPHead(cfg.dim, cfg.decoder_channels, int(math.log2(p)))
        else:
            decoder = NaiveHead(cfg.dim, cfg.decoder_channels)
        out_ch = cfg.decoder_channels
    mla = cfg.head == "mla"
    encoder = ViTEncoder(in_channels, img_size, cfg, mode, indices, final_norm=not mla)
    init_weights(encoder)
    k = 3 if mla else 1  # SETR-MLA's classifier is 3×3, naive/PUP's 1×1
    head = nn.Conv2d(out_ch, num_classes, k, padding=k // 2)
    return SegmentationModel(encoder, decoder, head, in_channels=in_channels,
                             num_classes=num_classes, input_multiple=p)
