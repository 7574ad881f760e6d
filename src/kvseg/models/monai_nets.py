"""MONAI's networks as kvseg families: DynUNet as nnU-Net's 2D U-Net (the CNN reference),
UNETR and SwinUNETR in 2D with kvseg's attention put in by :func:`~kvseg.models.patch.
patch_attention`.

* ``dynunet``: MONAI's ``DynUNet`` planned for the image size as nnU-Net plans its 2D U-Net
  (:func:`plan_unet`; nnU-Net v2's ``get_pool_and_conv_props`` and default planner: an axis
  is halved while it is at least twice the minimum feature-map edge of 4 px, so the
  bottleneck is 4-7 px; the first stage has stride 1; 3×3 kernels for the isotropic in-plane
  spacing of a prepared slice; 32 filters doubling per stage up to 512 in 2D; two conv +
  instance norm (affine) + leaky ReLU (0.01) per stage; transposed-conv upsampling). Deep
  supervision is off: the forward returns the full-resolution logits only. No attention.
  Inputs are padded to a multiple of the total stride and to twice it (2 × 2 at the
  bottleneck, for instance norm in training).
* ``unetr``: MONAI's ``UNETR(spatial_dims=2)``: a 12-layer ViT on 16×16 patches with a learned
  position embedding of the built size, skips from layers 3, 6, 9 and 12. It takes inputs of
  exactly ``img_size`` (rounded up to a multiple of 16): other sizes are resized bilinearly to
  it and the logits back. MONAI's TransformerBlock builds a ``norm_cross_attn`` LayerNorm even
  without cross-attention; it is never used and is removed (2·hidden_size parameters per
  block fewer than MONAI's count: unused parameters get no gradient, and DDP refuses them).
* ``swinunetr``: MONAI's ``SwinUNETR(spatial_dims=2)``: patch 2, four Swin stages with
  (shifted) 7×7 windows; any input padded to a multiple of 32 (2⁵), as MONAI requires, and
  to at least 64 (its bottleneck is 1/32: instance norm needs 2 × 2 in training). Its
  ``img_size`` argument is gone from MONAI; the image size only decides the padding.

Every model is a :class:`SegmentationModel` (``encoder`` is the MONAI network, decoder and head
identities), so it takes any H × W, and carries ``patch_report`` (the
:class:`~kvseg.models.patch.PatchReport`; None for DynUNet). The query-free modes start from
MONAI's initial K and V (``rule="key"``; a freshly initialised W_q has nothing to fold).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kvseg.errors import ConfigError
from kvseg.models.base import SegmentationModel
from kvseg.models.patch import patch_attention

#: The mode name of a family without attention (DynUNet): model_info's ``mode``.
NO_ATTENTION = "none"


class MonaiSegmentation(SegmentationModel):
    """A MONAI network (``encoder``; decoder and head are identities) as a kvseg model.

    The input is zero-padded on the bottom/right to a multiple of ``input_multiple`` and to at
    least ``min_input`` per side (instance norm needs more than one pixel at the bottleneck in
    training) and the logits cropped back; with ``fixed_size`` (UNETR's fixed token grid) it
    is instead resized bilinearly to that square and the logits back to the input's size.
    """

    def __init__(self, net: nn.Module, *, in_channels: int, num_classes: int,
                 input_multiple: int, min_input: int = 1,
                 fixed_size: int | None = None) -> None:
        super().__init__(net, nn.Identity(), nn.Identity(), in_channels=in_channels,
                         num_classes=num_classes, input_multiple=input_multiple)
        self.min_input, self.fixed_size = min_input, fixed_size
        self.patch_report = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            self.check_input(x)
        h, w = x.shape[-2:]
        if self.fixed_size is not None:
            s = (self.fixed_size, self.fixed_size)
            if torch.jit.is_tracing() or (h, w) != s:
                x = F.interpolate(x, size=s, mode="bilinear", align_corners=False)
                return F.interpolate(self.encoder(x), size=(h, w), mode="bilinear",
                                     align_corners=False)
            return self.encoder(x)
        m = self.input_multiple
        pad_h = max(-(-h // m) * m, self.min_input) - h
        pad_w = max(-(-w // m) * m, self.min_input) - w
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return self.encoder(x)[..., :h, :w]


# --------------------------------------------------------------------------- DynUNet
@dataclass(frozen=True)
class DynUNetConfig:
    """nnU-Net's 2D U-Net in MONAI's DynUNet; ``base`` is nnU-Net's (32 filters, cap 512)."""

    base_features: int = 32
    max_features: int = 512
    min_edge: int = 4  # nnU-Net's UNet_featuremap_min_edge_length
    res_block: bool = False


def plan_unet(img_size: int, min_edge: int = 4) -> tuple[list[int], list[int]]:
    """nnU-Net's 2D plan for a square ``img_size``: (kernel sizes, strides) per stage.

    Stage 0 has stride 1; a further stride-2 stage is added while the current edge is at least
    ``2·min_edge`` (the edge then becomes ceil(edge / 2)); all kernels 3×3 (isotropic spacing).
    256 -> strides 1, 2×6 (bottleneck 4 px); 64 -> 1, 2×4; 48 -> 1, 2×3 (6 px).
    """
    if img_size < 2 * min_edge:
        raise ConfigError(f"img_size={img_size}: dynunet needs at least {2 * min_edge} px "
                          "(one stride-2 stage above the minimum edge)")
    strides, edge = [1], img_size
    while edge >= 2 * min_edge:
        strides.append(2)
        edge = math.ceil(edge / 2)
    return [3] * len(strides), strides


def build_dynunet(cfg: DynUNetConfig, mode: str, *, in_channels: int, num_classes: int,
                  img_size: int) -> nn.Module:
    from monai.networks.nets import DynUNet

    if mode != NO_ATTENTION:
        raise ConfigError(f"dynunet has no attention: mode {mode!r}")
    kernels, strides = plan_unet(img_size, cfg.min_edge)
    filters = [min(cfg.base_features * 2 ** i, cfg.max_features) for i in range(len(strides))]
    net = DynUNet(2, in_channels, num_classes, kernel_size=kernels, strides=strides,
                  upsample_kernel_size=strides[1:], filters=filters,
                  norm_name=("INSTANCE", {"affine": True}),
                  act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
                  deep_supervision=False, res_block=cfg.res_block)
    multiple = 2 ** (len(strides) - 1)
    return MonaiSegmentation(net, in_channels=in_channels, num_classes=num_classes,
                             input_multiple=multiple, min_input=2 * multiple)


# --------------------------------------------------------------------------- UNETR
@dataclass(frozen=True)
class UNETRConfig:
    """MONAI's UNETR (12 layers, patch 16, fixed by MONAI); ``base`` is UNETR's ViT-B."""

    hidden_size: int = 768
    mlp_dim: int = 3072
    num_heads: int = 12
    feature_size: int = 16
    qkv_bias: bool = False
    drop: float = 0.0
    norm_name: str = "instance"
    res_block: bool = True
    pos_dim: int = 50


def build_unetr(cfg: UNETRConfig, mode: str, *, in_channels: int, num_classes: int,
                img_size: int) -> nn.Module:
    from monai.networks.nets import UNETR

    size = -(-img_size // 16) * 16
    net = UNETR(in_channels, num_classes, img_size=size, feature_size=cfg.feature_size,
                hidden_size=cfg.hidden_size, mlp_dim=cfg.mlp_dim, num_heads=cfg.num_heads,
                norm_name=cfg.norm_name, res_block=cfg.res_block, dropout_rate=cfg.drop,
                spatial_dims=2, qkv_bias=cfg.qkv_bias)
    for block in net.vit.blocks:  # MONAI builds this LayerNorm also without cross-attention:
        if not block.with_cross_attention:  # unused (no gradient; DDP refuses it)
            block.norm_cross_attn = block.cross_attn = nn.Identity()
    _, report = patch_attention(net, mode, rule="key", pos_dim=cfg.pos_dim,
                                grid_size=(size // 16, size // 16))
    model = MonaiSegmentation(net, in_channels=in_channels, num_classes=num_classes,
                              input_multiple=16, fixed_size=size)
    model.patch_report = report
    return model


# --------------------------------------------------------------------------- SwinUNETR
@dataclass(frozen=True)
class SwinUNETRConfig:
    """MONAI's SwinUNETR; ``base`` is Swin UNETR's feature size 48 (MONAI's default is 24)."""

    feature_size: int = 48
    depths: tuple[int, ...] = (2, 2, 2, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop: float = 0.0
    attn_drop: float = 0.0
    drop_path: float = 0.0
    norm_name: str = "instance"
    use_v2: bool = False
    pos_dim: int = 50


def build_swinunetr(cfg: SwinUNETRConfig, mode: str, *, in_channels: int, num_classes: int,
                    img_size: int) -> nn.Module:
    from monai.networks.nets import SwinUNETR

    if cfg.feature_size % 12 or len(cfg.depths) != 4 or len(cfg.num_heads) != 4:
        raise ConfigError(f"swinunetr: feature_size={cfg.feature_size} (a multiple of 12), "
                          f"depths={cfg.depths}, num_heads={cfg.num_heads} (four stages each)")
    for i, h in enumerate(cfg.num_heads):
        if (cfg.feature_size * 2 ** i) % h:
            raise ConfigError(f"swinunetr: stage {i} width {cfg.feature_size * 2 ** i} is not "
                              f"divisible by num_heads={h}")
    device = torch.empty(0).device  # the default device (meta under kvseg.profile)
    # MONAI's SwinTransformer calls .item() while it builds: not on the meta device
    with torch.device("cpu" if device.type == "meta" else device):
        net = SwinUNETR(in_channels, num_classes, depths=cfg.depths, num_heads=cfg.num_heads,
                        window_size=cfg.window_size, qkv_bias=cfg.qkv_bias,
                        mlp_ratio=cfg.mlp_ratio, feature_size=cfg.feature_size,
                        norm_name=cfg.norm_name, drop_rate=cfg.drop,
                        attn_drop_rate=cfg.attn_drop, dropout_path_rate=cfg.drop_path,
                        spatial_dims=2, use_v2=cfg.use_v2)
    net = net.to(device)
    _, report = patch_attention(net, mode, rule="key", pos_dim=cfg.pos_dim)
    model = MonaiSegmentation(net, in_channels=in_channels, num_classes=num_classes,
                              input_multiple=32, min_input=64)
    model.patch_report = report
    return model


__all__ = ["NO_ATTENTION", "DynUNetConfig", "MonaiSegmentation", "SwinUNETRConfig",
           "UNETRConfig", "build_dynunet", "build_swinunetr", "build_unetr", "plan_unet"]
