"""SETR with a CvT encoder (Wu et al., ICCV 2021): convolutional token embedding per stage and
convolutional projections, with a multi-scale fusion decoder.

CvT attention (``dw_bn``): each of Q, K, V is a depthwise 3×3 conv + BatchNorm on the token map,
then a Linear; Q at stride 1, K and V at stride 2 (4× fewer keys than queries).

KV mode (the query branch removed; ``docs/models.md``): K is computed once at stride 1 and takes
the query's role; the stride-2 keys are its subsample ``K[:, ::2, ::2]``. This is exact: a 3×3
conv with padding 1 at stride 2 equals the stride-1 conv sampled at even positions, and BN (in
eval) and the Linear act per token. So the Q branch (dw conv, BN, Linear) and the separate
stride-2 K branch are replaced by one stride-1 K branch. Per layer, with C channels, N query
tokens and M = ceil(h/2)·ceil(w/2) key tokens, this removes 9C + 2C + C² + C parameters and
M·(9C + C²) MACs (the K branch now runs on N tokens instead of M, the Q branch's N disappears).
The other sharing modes follow the same rule (the branch giving the queries runs at stride 1,
a key or value taken from it is its subsample; :class:`ConvAttention`).

As the official code (``microsoft/CvT`` ``cls_cvt.py``, ``cvt-13-224x224.yaml``) by default:
the attention scale is 1/sqrt(dim), the stage width (``attn_scale="dim"``; ``"head"`` gives the
usual 1/sqrt(head_dim)), the MLP activation QuickGELU (``act``), drop-path rates per stage
(``drop_path``: CvT-13/21 use 0, 0, 0.1), each linear from 0 within its stage. Deviation from the
classification CvT: no cls token (stage 3's is dropped when its weights are loaded).

Pretrained weights: Microsoft's CvT-13/21 ``.pth`` through :mod:`kvseg.models.convert_cvt`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kvseg.errors import ConfigError
from kvseg.layers.attention import (
    AttentionCore,
    attend,
    check_heads,
    mode_spec,
    position_terms,
)
from kvseg.layers.blocks import DropPath, Mlp, conv_bn_relu, init_weights, map_to_tokens
from kvseg.layers.position import KVPosBias, RelPosBias
from kvseg.models.base import SegmentationModel

ATTN_SCALES = ("dim", "head")

@dataclass(frozen=True)
class CvTConfig:
    """Three CvT stages + fusion decoder. ``base`` is CvT-13, ``large`` CvT-21.

    ``drop_path``: the last block's rate per stage (linear from 0 within each stage, as the
    official ``DROP_PATH_RATE``). ``attn_scale``: ``"dim"`` (official, 1/sqrt(stage width)) or
    ``"head"`` (1/sqrt(head_dim)). ``act``: ``"quick_gelu"`` (official) or ``"gelu"``.
    """

    dims: tuple[int, ...] = (64, 192, 384)
    depths: tuple[int, ...] = (1, 2, 10)
    num_heads: tuple[int, ...] = (1, 3, 6)
    patch_sizes: tuple[int, ...] = (7, 3, 3)
    patch_strides: tuple[int, ...] = (4, 2, 2)
    patch_padding: tuple[int, ...] = (2, 1, 1)
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop: float = 0.0
    attn_drop: float = 0.0
    drop_path: tuple[float, ...] = (0.0, 0.0, 0.1)
    pos_dim: int = 50
    stride_kv: int = 2
    attn_scale: str = "dim"
    act: str = "quick_gelu"
    decoder_channels: int = 128


def dw_bn(dim: int, stride: int) -> nn.Sequential:
    """CvT's ``dw_bn`` projection: depthwise 3×3 conv (padding 1, no bias) + BatchNorm."""
    return nn.Sequential(nn.Conv2d(dim, dim, 3, stride, 1, groups=dim, bias=False),
                         nn.BatchNorm2d(dim))


class ConvAttention(nn.Module):
    """CvT attention on a token map: x (B, h·w, C) with its (h, w) -> (B, h·w, C).

    Every projection is a branch ``conv_proj_X`` (``dw_bn``) + ``proj_X`` (Linear), X in the
    mode's :attr:`~kvseg.layers.attention.ModeSpec.projections`. The branch that gives the
    queries runs at stride 1 (N tokens), the others at ``stride_kv`` (M tokens); where the keys
    or values come from the query branch they are its stride-``stride_kv`` subsample
    ``t[:, ::s, ::s]`` (exact: the 3×3 conv with padding 1 at stride s is the stride-1 conv
    sampled there, and BN and the Linear act per token). So, with s = ``stride_kv``:

    * ``qkv``: Q at stride 1; K and V each from their own stride-s branch (the official CvT).
    * ``kv``, ``kv_pos``, ``kv_relpos``: one stride-1 K branch gives the queries, its subsample
      the keys; V from its stride-s branch.
    * ``shared_kv``: Q at stride 1; one stride-s K branch gives keys and values.
    * ``shared_qv``: Q at stride 1 gives the queries and, subsampled, the values; K at stride s.
    * ``single``: one stride-1 K branch gives the queries and, subsampled, keys and values.

    ``kv_pos`` adds the factored KV-pos temperature and bias over the key indices;
    ``kv_relpos`` a relative-position bias between each query and each (stride-s) key, in
    query-grid offsets. The products run in the shared :class:`AttentionCore`.

    Args:
        dim: channels C.
        num_heads: heads (``dim`` must be divisible by it).
        mode: one of :data:`kvseg.layers.MODES`.
        qkv_bias: bias in the q/k/v Linear layers.
        attn_drop: dropout on the attention probabilities (training only).
        proj_drop: dropout after the output projection.
        pos_dim: channels of the KV-pos encoding (``kv_pos`` only).
        stride_kv: stride of the key/value convolutions.
        attn_scale: ``"dim"`` (1/sqrt(dim), the official CvT) or ``"head"`` (1/sqrt(head_dim)).
        grid_size: the stage's token grid at the model's ``img_size`` (sizes ``kv_relpos``'s
            table; required there).
    """

    def __init__(self, dim: int, num_heads: int, mode: str = "qkv", qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, pos_dim: int = 50,
                 stride_kv: int = 2, attn_scale: str = "dim",
                 grid_size: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.spec = spec = mode_spec(mode)
        check_heads(dim, num_heads)
        if attn_scale not in ATTN_SCALES:
            raise ConfigError(f"attn_scale={attn_scale!r}: expected one of "
                              f"{', '.join(ATTN_SCALES)}")
        if spec.rel_pos and grid_size is None:
            raise ConfigError(f"mode={mode!r} needs grid_size=(h, w)")
        self.mode, self.num_heads, self.stride_kv = spec.name, num_heads, stride_kv
        branches = spec.projections
        # registration order: q, then the k and v convs, then the k and v Linears (init order)
        if "q" in branches:
            self.conv_proj_q = dw_bn(dim, 1)
            self.proj_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.conv_proj_k = dw_bn(dim, 1 if spec.query == "k" else stride_kv)
        if "v" in branches:
            self.conv_proj_v = dw_bn(dim, stride_kv)
        self.proj_k = nn.Linear(dim, dim, bias=qkv_bias)
        if "v" in branches:
            self.proj_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.pos = KVPosBias(pos_dim) if spec.key_bias else None
        self.rel_pos = RelPosBias(num_heads, grid_size) if spec.rel_pos else None
        self.attn_scale = attn_scale
        self.core = AttentionCore((dim if attn_scale == "dim" else dim // num_heads) ** -0.5,
                                  attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, c = t.shape  # -> (B, heads, n, head_dim)
        return t.view(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, h: int, w: int, return_attention: bool = False):
        b, n, c = x.shape
        m = x.transpose(1, 2).reshape(b, c, h, w)  # token map (B, C, h, w)
        spec, s = self.spec, self.stride_kv
        tokens = {p: getattr(self, f"proj_{p}")(map_to_tokens(getattr(self, f"conv_proj_{p}")(m)))
                  for p in spec.projections}  # the query branch (B, N, C), the others (B, M, C)

        def coarse(p: str) -> torch.Tensor:  # on the key grid: the query branch subsampled
            t = tokens[p]
            return t.view(b, h, w, c)[:, ::s, ::s].reshape(b, -1, c) if p == spec.query else t

        q, k, v = tokens[spec.query], coarse("k"), coarse(spec.value)
        terms = position_terms(self.pos, self.rel_pos, k.shape[1], (h, w), s)
        out, attn = attend(self.core, self._heads(q), self._heads(k), self._heads(v),
                           return_attention, **terms)
        out = self.proj_drop(self.proj(out))  # (B, N, C)
        return (out, attn) if return_attention else out


class CvTBlock(nn.Module):
    """Pre-norm block with convolutional attention; (B, N, C), (h, w) -> (B, N, C)."""

    def __init__(self, dim: int, num_heads: int, mode: str, cfg: CvTConfig,
                 drop_path: float, grid_size: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ConvAttention(dim, num_heads, mode, cfg.qkv_bias, cfg.attn_drop, cfg.drop,
                                  cfg.pos_dim, cfg.stride_kv, cfg.attn_scale, grid_size)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio), cfg.drop, cfg.act)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class CvTStage(nn.Module):
    """Convolutional token embedding (conv k/s/p + LayerNorm) and CvT blocks;
    (B, C_in, H, W) -> (B, dim, H/s, W/s)."""

    def __init__(self, in_channels: int, dim: int, depth: int, num_heads: int, patch: int,
                 stride: int, padding: int, mode: str, cfg: CvTConfig,
                 drop_paths: list[float], grid_size: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.embed = nn.Conv2d(in_channels, dim, patch, stride, padding)
        self.norm = nn.LayerNorm(dim)
        self.blocks = nn.ModuleList(CvTBlock(dim, num_heads, mode, cfg, drop_paths[i], grid_size)
                                    for i in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        b, c, h, w = x.shape
        x = self.norm(map_to_tokens(x))  # (B, h·w, dim)
        for block in self.blocks:
            x = block(x, h, w)
        return x.transpose(1, 2).reshape(b, c, h, w)


class CvTEncoder(nn.Module):
    """Three stages -> [1/4, 1/8, 1/16] maps with ``dims`` channels.

    ``img_size`` gives each stage's token grid (its embedding conv's output for the input padded
    to the total stride), which sizes ``kv_relpos``'s tables; other modes do not use it.
    """

    def __init__(self, in_channels: int, cfg: CvTConfig, mode: str, img_size: int = 224) -> None:
        super().__init__()
        n = len(cfg.dims)
        fields = (cfg.depths, cfg.num_heads, cfg.patch_sizes, cfg.patch_strides,
                  cfg.patch_padding, cfg.drop_path)
        if any(len(f) != n for f in fields):
            raise ConfigError(f"dims={cfg.dims}, depths={cfg.depths}, num_heads={cfg.num_heads}, "
                              f"patch_sizes={cfg.patch_sizes}, "
                              f"patch_strides={cfg.patch_strides}, "
                              f"patch_padding={cfg.patch_padding}, drop_path={cfg.drop_path}: "
                              "expected one value per stage")
        stages, c = [], in_channels
        side = -(-img_size // math.prod(cfg.patch_strides)) * math.prod(cfg.patch_strides)
        for i in range(n):
            d = cfg.depths[i]  # official: torch.linspace(0, DROP_PATH_RATE[i], DEPTH[i])
            rates = [cfg.drop_path[i] * j / max(d - 1, 1) for j in range(d)]
            k, st, pad = cfg.patch_sizes[i], cfg.patch_strides[i], cfg.patch_padding[i]
            side = (side + 2 * pad - k) // st + 1
            stages.append(CvTStage(c, cfg.dims[i], d, cfg.num_heads[i], cfg.patch_sizes[i],
                                   cfg.patch_strides[i], cfg.patch_padding[i], mode, cfg, rates,
                                   (max(side, 1), max(side, 1))))
            c = cfg.dims[i]
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs


class FusionDecoder(nn.Module):
    """Multi-scale fusion: per stage 1×1 conv + BN + ReLU to ``channels``, resize to the finest
    map, concatenate, 3×3 conv + BN + ReLU -> (B, channels, H/4, W/4)."""

    def __init__(self, dims: tuple[int, ...], channels: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(conv_bn_relu(d, channels, 1) for d in dims)
        self.fuse = conv_bn_relu(channels * len(dims), channels, 3)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[-2:]
        maps = [lat(f) for lat, f in zip(self.lateral, features, strict=True)]
        maps = [m if m.shape[-2:] == size else
                F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps]
        return self.fuse(torch.cat(maps, dim=1))


def build_cvt(cfg: CvTConfig, mode: str, *, in_channels: int, num_classes: int,
              img_size: int) -> SegmentationModel:
    """SETR-CvT; ``img_size`` only sizes ``kv_relpos``'s tables (CvT has no position
    embedding)."""
    encoder = CvTEncoder(in_channels, cfg, mode, img_size)
    init_weights(encoder)
    decoder = FusionDecoder(cfg.dims, cfg.decoder_channels)
    head = nn.Conv2d(cfg.decoder_channels, num_classes, 1)
    multiple = 1
    for s in cfg.patch_strides:
        multiple *= s
    return SegmentationModel(encoder, decoder, head, in_channels=in_channels,
                             num_classes=num_classes, input_multiple=multiple)
