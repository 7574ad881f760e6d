"""SETR with a convolutional encoder, TransUNet-style (Chen et al. 2021, R50-ViT-B/16).

A ResNet-50-style CNN (root 7×7/2 conv, 3×3/2 max-pool, three stages of bottleneck units,
(3, 4, 9) for base/large as in the ViT hybrid) brings the image to 1/16 resolution; a ViT with
patch size 1 (a 1×1 conv embedding) runs on that grid; the cascaded upsampler (TransUNet's CUP)
goes back up in four ×2 steps, concatenating the CNN's skip features at 1/8, 1/4 and 1/2.

Deviation from TransUNet: plain convolutions with BatchNorm (post-activation ResNet v1.5
bottlenecks) instead of weight-standardised convs with GroupNorm, since no pretrained weights are
loaded here; max-pool padding 1 so every stage halves the (padded) size exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kvseg.errors import ConfigError
from kvseg.layers.blocks import (
    PosEmbed2d,
    TransformerBlock,
    conv_bn_relu,
    init_weights,
    map_to_tokens,
    tokens_to_map,
)
from kvseg.models.base import SegmentationModel


@dataclass(frozen=True)
class HybridConfig:
    """CNN stages + ViT on the 1/16 grid + CUP decoder. ``base`` is R50-ViT-B/16."""

    resnet_layers: tuple[int, ...] = (3, 4, 9)
    resnet_width: int = 64
    dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop: float = 0.0
    attn_drop: float = 0.0
    drop_path: float = 0.0
    pos_dim: int = 50
    decoder_channels: tuple[int, ...] = (256, 128, 64, 16)
    neck_channels: int = 512


class Bottleneck(nn.Module):
    """1×1 -> 3×3 (stride here) -> 1×1 (×4 channels), BN after each, projection shortcut."""

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        out = 4 * width
        self.conv1 = conv_bn_relu(in_channels, width, 1)
        self.conv2 = conv_bn_relu(width, width, 3, stride)
        self.conv3 = nn.Sequential(nn.Conv2d(width, out, 1, bias=False), nn.BatchNorm2d(out))
        self.shortcut = None
        if stride != 1 or in_channels != out:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out, 1, stride, bias=False),
                                          nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        return F.relu(self.conv3(self.conv2(self.conv1(x))) + identity)


class ResNetStem(nn.Module):
    """(B, C, H, W) -> [1/2: w, 1/4: 4w, 1/8: 8w, 1/16: 16w] feature maps (w = resnet_width)."""

    def __init__(self, in_channels: int, width: int, layers: tuple[int, ...]) -> None:
        super().__init__()
        if len(layers) != 3:
            raise ConfigError(f"resnet_layers={layers}: expected three stages")
        self.root = conv_bn_relu(in_channels, width, 7, 2)
        self.pool = nn.MaxPool2d(3, 2, 1)
        stages, c = [], width
        for i, n in enumerate(layers):
            w = width * 2 ** i
            units = [Bottleneck(c if j == 0 else 4 * w, w, 2 if (i > 0 and j == 0) else 1)
                     for j in range(n)]
            stages.append(nn.Sequential(*units))
            c = 4 * w
        self.stages = nn.ModuleList(stages)
        self.out_channels = [width] + [4 * width * 2 ** i for i in range(3)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.root(x)  # 1/2
        feats = [x]
        x = self.pool(x)  # 1/4
        for stage in self.stages:
            x = stage(x)
            feats.append(x)  # 1/4, 1/8, 1/16
        return feats


class HybridEncoder(nn.Module):
    """CNN -> ViT (patch 1) on the 1/16 grid. Returns [skip 1/2, skip 1/4, skip 1/8, vit 1/16]."""

    def __init__(self, in_channels: int, img_size: int, cfg: HybridConfig, mode: str) -> None:
        super().__init__()
        self.cnn = ResNetStem(in_channels, cfg.resnet_width, cfg.resnet_layers)
        grid = math.ceil(img_size / 16)
        self.patch_embed = nn.Conv2d(self.cnn.out_channels[-1], cfg.dim, 1)
        self.pos_embed = PosEmbed2d(cfg.dim, grid, grid)
        self.pos_drop = nn.Dropout(cfg.drop)
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(
            TransformerBlock(cfg.dim, cfg.num_heads, mode, cfg.mlp_ratio, cfg.qkv_bias, cfg.drop,
                             cfg.attn_drop, rates[i], cfg.pos_dim) for i in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.cnn(x)
        x = self.pos_drop(self.pos_embed(self.patch_embed(feats[-1])))  # (B, dim, H/16, W/16)
        h, w = x.shape[-2:]
        x = map_to_tokens(x)
        for block in self.blocks:
            x = block(x)
        return feats[:3] + [tokens_to_map(self.norm(x), h, w)]


class CascadedUpsampler(nn.Module):
    """TransUNet's CUP: 3×3 conv to ``neck_channels``, then four [×2, concat skip, 2 × conv]."""

    def __init__(self, dim: int, skip_channels: list[int], cfg: HybridConfig) -> None:
        super().__init__()
        if len(cfg.decoder_channels) != 4:
            raise ConfigError(f"decoder_channels={cfg.decoder_channels}: expected four values")
        self.neck = conv_bn_relu(dim, cfg.neck_channels, 3)
        skips = list(reversed(skip_channels)) + [0]  # 1/8, 1/4, 1/2, none
        ins = [cfg.neck_channels] + list(cfg.decoder_channels[:-1])
        self.blocks = nn.ModuleList(
            nn.Sequential(conv_bn_relu(i + s, o, 3), conv_bn_relu(o, o, 3))
            for i, s, o in zip(ins, skips, cfg.decoder_channels, strict=True))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        *skips, x = features
        x = self.neck(x)
        skips = list(reversed(skips)) + [None]
        for block, skip in zip(self.blocks, skips, strict=True):
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            if skip is not None:
                x = torch.cat([x, skip], dim=1)
            x = block(x)
        return x  # (B, decoder_channels[-1], H, W)


def build_conv_hybrid(cfg: HybridConfig, mode: str, *, in_channels: int, num_classes: int,
                      img_size: int) -> SegmentationModel:
    """The TransUNet-style hybrid; see the module docstring."""
    encoder = HybridEncoder(in_channels, img_size, cfg, mode)
    init_weights(encoder.blocks)
    decoder = CascadedUpsampler(cfg.dim, encoder.cnn.out_channels[:3], cfg)
    head = nn.Conv2d(cfg.decoder_channels[-1], num_classes, 3, padding=1)
    return SegmentationModel(encoder, decoder, head, in_channels=in_channels,
                             num_classes=num_classes, input_multiple=16)
