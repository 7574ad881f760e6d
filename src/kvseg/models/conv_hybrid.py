"""SETR with a convolutional encoder, TransUNet-style (Chen et al. 2021, R50-ViT-B/16).

A ResNet-50 v2-style CNN as in TransUNet's ``vit_seg_modeling_resnet_skip.py`` (BiT's units:
weight-standardised convolutions, GroupNorm with 32 groups, a 7×7/2 root conv, a 3×3/2 max-pool
*without* padding, three stages of bottleneck units, (3, 4, 9) for base/large) brings the image
to 1/16 resolution; a ViT with patch size 1 (a 1×1 conv embedding) runs on that grid; the
cascaded upsampler (TransUNet's CUP) goes back up in four ×2 steps, concatenating the CNN's skip
features at 1/8, 1/4 and 1/2.

Shapes: the input is padded to a multiple of 16 (``SegmentationModel``), H = 16k. The root conv
gives 8k, the unpadded max-pool 4k − 1, the first stage keeps 4k − 1 (its skip is zero-padded on
the bottom/right to 4k, as TransUNet does), the strided stages give 2k and k. So every skip has
exactly the decoder's size, for 224 (112/55→56/28/14), 256 and any other size.

``norm="bn"`` (option) swaps the weight-standardised conv + GroupNorm pairs for plain conv +
BatchNorm (kvseg's earlier design; it cannot take TransUNet's R50 weights). The parameter count
is the same either way: 105,276,066 at base, 224², 2 classes, 3 input channels.

Pretrained weights: TransUNet's ``R50+ViT-B_16.npz`` through :mod:`kvseg.models.convert_vit`.
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

NORMS = ("gn", "bn")


@dataclass(frozen=True)
class HybridConfig:
    """CNN stages + ViT on the 1/16 grid + CUP decoder. ``base`` is R50-ViT-B/16.

    ``norm``: ``"gn"`` (TransUNet/BiT: weight-standardised convs + GroupNorm(32)) or ``"bn"``
    (plain convs + BatchNorm).
    """

    resnet_layers: tuple[int, ...] = (3, 4, 9)
    resnet_width: int = 64
    norm: str = "gn"
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


class StdConv2d(nn.Conv2d):
    """A convolution with weight standardisation (BiT, TransUNet): each output channel's kernel
    is shifted and scaled to zero mean and unit variance (biased variance, ``eps`` = 1e-5 added
    to it) at every forward. The stored weight is the raw kernel, as in the official files."""

    eps = 1e-5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(self.weight, dim=(1, 2, 3), keepdim=True, unbiased=False)
        w = (self.weight - mean) / torch.sqrt(var + self.eps)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups (eps 1e-6, as BiT/TransUNet); fewer groups, gcd(32, channels),
    when a small preset has fewer or indivisible channels."""
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


def conv_norm(in_channels: int, out_channels: int, kernel_size: int, stride: int,
              norm: str) -> tuple[nn.Module, nn.Module]:
    """A bias-free conv ('same' padding) and its norm: StdConv2d + GroupNorm (``gn``) or Conv2d
    + BatchNorm (``bn``)."""
    conv_cls = StdConv2d if norm == "gn" else nn.Conv2d
    conv = conv_cls(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False)
    return conv, (group_norm(out_channels) if norm == "gn" else nn.BatchNorm2d(out_channels))


class Bottleneck(nn.Module):
    """BiT/TransUNet unit: conv1 1×1 → norm → ReLU → conv2 3×3 (the stride) → norm → ReLU →
    conv3 1×1 (×4 channels) → norm; plus the shortcut (projection conv 1×1 + norm where the
    shape changes); ReLU after the sum."""

    def __init__(self, in_channels: int, width: int, stride: int, norm: str) -> None:
        super().__init__()
        out = 4 * width
        self.conv1, self.norm1 = conv_norm(in_channels, width, 1, 1, norm)
        self.conv2, self.norm2 = conv_norm(width, width, 3, stride, norm)
        self.conv3, self.norm3 = conv_norm(width, out, 1, 1, norm)
        self.proj_conv = self.proj_norm = None
        if stride != 1 or in_channels != out:
            self.proj_conv, self.proj_norm = conv_norm(in_channels, out, 1, stride, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.proj_conv is None else self.proj_norm(self.proj_conv(x))
        y = F.relu(self.norm1(self.conv1(x)))
        y = F.relu(self.norm2(self.conv2(y)))
        return F.relu(self.norm3(self.conv3(y)) + identity)


class ResNetV2(nn.Module):
    """(B, C, 16k, 16l) -> [1/2: w, 1/4: 4w, 1/8: 8w, 1/16: 16w] maps (w = ``width``).

    The 1/4 skip is zero-padded on the bottom/right from 4k − 1 to 4k (the max-pool has no
    padding), as in TransUNet; the tensor passed on to the next stage is not padded.
    """

    def __init__(self, in_channels: int, width: int, layers: tuple[int, ...],
                 norm: str = "gn") -> None:
        super().__init__()
        if len(layers) != 3:
            raise ConfigError(f"resnet_layers={layers}: expected three stages")
        if norm not in NORMS:
            raise ConfigError(f"norm={norm!r}: expected one of {', '.join(NORMS)}")
        self.root_conv, self.root_norm = conv_norm(in_channels, width, 7, 2, norm)
        self.pool = nn.MaxPool2d(3, 2, 0)
        stages, c = [], width
        for i, n in enumerate(layers):
            w = width * 2 ** i
            units = [Bottleneck(c if j == 0 else 4 * w, w, 2 if (i > 0 and j == 0) else 1, norm)
                     for j in range(n)]
            stages.append(nn.Sequential(*units))
            c = 4 * w
        self.stages = nn.ModuleList(stages)
        self.out_channels = [width] + [4 * width * 2 ** i for i in range(3)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, w = x.shape[-2:]
        x = F.relu(self.root_norm(self.root_conv(x)))  # (B, w, H/2, W/2)
        feats = [x]
        x = self.pool(x)  # H/4 - 1
        for i, stage in enumerate(self.stages):
            x = stage(x)  # H/4 - 1, then H/8, H/16
            size = (h // 2 ** (i + 2), w // 2 ** (i + 2))
            pad_h, pad_w = size[0] - x.shape[-2], size[1] - x.shape[-1]
            feats.append(F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x)
        return feats


class HybridEncoder(nn.Module):
    """CNN -> ViT (patch 1) on the 1/16 grid. Returns [skip 1/2, skip 1/4, skip 1/8, vit 1/16]."""

    def __init__(self, in_channels: int, img_size: int, cfg: HybridConfig, mode: str) -> None:
        super().__init__()
        self.cnn = ResNetV2(in_channels, cfg.resnet_width, cfg.resnet_layers, cfg.norm)
        grid = math.ceil(img_size / 16)
        self.patch_embed = nn.Conv2d(self.cnn.out_channels[-1], cfg.dim, 1)
        self.pos_embed = PosEmbed2d(cfg.dim, grid, grid)
        self.pos_drop = nn.Dropout(cfg.drop)
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(
            TransformerBlock(cfg.dim, cfg.num_heads, mode, cfg.mlp_ratio, cfg.qkv_bias, cfg.drop,
                             cfg.attn_drop, rates[i], cfg.pos_dim, (grid, grid))
            for i in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.cnn(x)
        x = self.pos_drop(self.pos_embed(self.patch_embed(feats[-1])))  # (B, dim, H/16, W/16)
        h, w = x.shape[-2:]
        x = map_to_tokens(x)
        for block in self.blocks:
            x = block(x, (h, w))
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
