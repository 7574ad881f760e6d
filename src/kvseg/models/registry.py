"""The variants by name (three families × seven attention modes, and the reference families
of :mod:`kvseg.models.monai_nets`), their size presets, and ``create_model``.

A variant is a row: (family, attention mode), named ``{family}_{mode without underscores}``
(``setr_kvpos``, ``setr_conv_single``, ``setr_cvt_kvrelpos``). The nine variants of the paper
(the three families in QKV, KV and KV-pos) come first in :func:`list_models`. A preset is a
dataclass instance; keyword overrides go through ``dataclasses.replace`` after a check that
names any unknown key.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable

import torch
from torch import nn

from kvseg.errors import ConfigError
from kvseg.layers.attention import MODES, PAPER_MODES, mode_suffix, resolve_modes
from kvseg.models.conv_hybrid import HybridConfig, build_conv_hybrid
from kvseg.models.cvt import CvTConfig, build_cvt
from kvseg.models.monai_nets import (
    NO_ATTENTION,
    DynUNetConfig,
    SwinUNETRConfig,
    UNETRConfig,
    build_dynunet,
    build_swinunetr,
    build_unetr,
)
from kvseg.models.pretrained import load_pretrained
from kvseg.models.setr import SETRConfig, build_setr

log = logging.getLogger(__name__)

SIZES = ("micro", "small", "base", "large")

PRESETS: dict[str, dict[str, object]] = {
    "setr": {
        # micro: patch 8 keeps a 16×16 grid at 128 px (tests, CI, CPU training).
        "micro": SETRConfig(patch_size=8, dim=96, depth=4, num_heads=4, decoder_channels=32),
        "small": SETRConfig(dim=384, depth=12, num_heads=6, decoder_channels=128),  # ViT-S/16
        "base": SETRConfig(),  # ViT-B/16
        "large": SETRConfig(dim=1024, depth=24, num_heads=16),  # SETR's ViT-L/16
    },
    "setr_conv": {
        "micro": HybridConfig(resnet_layers=(1, 1, 1), resnet_width=16, dim=96, depth=4,
                              num_heads=4, decoder_channels=(64, 32, 16, 16), neck_channels=128),
        "small": HybridConfig(resnet_layers=(2, 2, 2), resnet_width=32, dim=384, depth=8,
                              num_heads=6, decoder_channels=(128, 64, 32, 16),
                              neck_channels=256),
        "base": HybridConfig(),  # R50-ViT-B/16 (TransUNet)
        "large": HybridConfig(dim=1024, depth=24, num_heads=16),  # R50-ViT-L/16
    },
    "setr_cvt": {
        "micro": CvTConfig(dims=(32, 64, 128), depths=(1, 1, 2), num_heads=(1, 2, 4),
                           drop_path=(0.0, 0.0, 0.0), decoder_channels=64),
        "small": CvTConfig(dims=(48, 128, 256), depths=(1, 2, 4), num_heads=(1, 2, 4),
                           decoder_channels=96),
        "base": CvTConfig(),  # CvT-13
        "large": CvTConfig(depths=(1, 4, 16)),  # CvT-21
    },
    # The reference families (MONAI's networks; models/monai_nets.py): micro / small / base.
    "dynunet": {
        "micro": DynUNetConfig(base_features=16, max_features=128),
        "small": DynUNetConfig(base_features=32, max_features=256),
        "base": DynUNetConfig(),  # nnU-Net 2D: 32 filters doubling to 512
    },
    "unetr": {
        "micro": UNETRConfig(hidden_size=96, mlp_dim=384, num_heads=4, feature_size=8),
        "small": UNETRConfig(hidden_size=384, mlp_dim=1536, num_heads=6),
        "base": UNETRConfig(),  # UNETR's ViT-B/16, feature size 16
    },
    "swinunetr": {
        "micro": SwinUNETRConfig(feature_size=12, num_heads=(1, 2, 4, 8)),
        "small": SwinUNETRConfig(feature_size=24),  # MONAI's default
        "base": SwinUNETRConfig(),  # Swin UNETR's feature size 48
    },
}

BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "setr": build_setr,
    "setr_conv": build_conv_hybrid,
    "setr_cvt": build_cvt,
    "dynunet": build_dynunet,
    "unetr": build_unetr,
    "swinunetr": build_swinunetr,
}

#: The paper's three families (kvseg's own networks).
PAPER_FAMILIES: tuple[str, ...] = ("setr", "setr_conv", "setr_cvt")
#: The reference families (MONAI's networks): the CNN reference and two transformers.
REFERENCE_FAMILIES: tuple[str, ...] = ("dynunet", "unetr", "swinunetr")
#: Attention modes per family: every mode, but DynUNet has none (``NO_ATTENTION``) and a Swin
#: window keeps its own relative-position bias (no ``kv_relpos``).
FAMILY_MODES: dict[str, tuple[str, ...]] = {
    **{f: MODES for f in (*PAPER_FAMILIES, "unetr")},
    "swinunetr": tuple(m for m in MODES if m != "kv_relpos"),
    "dynunet": (NO_ATTENTION,),
}


def _variant_name(family: str, mode: str) -> str:
    return family if mode == NO_ATTENTION else f"{family}_{mode_suffix(mode)}"


#: Variant name -> (family, mode): ``{family}_{mode_suffix(mode)}``, e.g. ``setr_conv_kvpos``
#: (``dynunet`` alone); the paper's nine first (family by family), then the other modes'
#: (family by family), then the reference families the same way (``dynunet`` first).
_VARIANTS: dict[str, tuple[str, str]] = {
    _variant_name(family, mode): (family, mode)
    for families in (PAPER_FAMILIES, REFERENCE_FAMILIES)
    for group in ((*PAPER_MODES, NO_ATTENTION),
                  tuple(m for m in MODES if m not in PAPER_MODES))
    for family in families for mode in group if mode in FAMILY_MODES[family]
}


def list_models(modes: list[str] | tuple[str, ...] | str | None = "all",
                families: list[str] | tuple[str, ...] | str | None = None) -> list[str]:
    """The variant names: the paper's nine (``setr|setr_conv|setr_cvt`` × ``qkv|kv|kvpos``)
    first, then every family in the other modes (``sharedkv``, ``sharedqv``, ``single``,
    ``kvrelpos``), then the reference families (``dynunet``, ``unetr_*``, ``swinunetr_*``;
    :data:`REFERENCE_FAMILIES`) in the same order.

    Args:
        modes: ``"all"`` (default: every variant, ``dynunet`` too), None (the paper's three
            modes) or mode names (:func:`kvseg.layers.attention.resolve_modes`); only those
            modes' variants (``dynunet``, without attention, only with ``"all"``).
        families: ``"all"``, ``"paper"`` (:data:`PAPER_FAMILIES`) or family names; None
            (default): every family with ``modes="all"``, the paper's three with a mode
            selection (so ``reproduce --models all`` keeps the paper's nine).
    """
    keep = set(resolve_modes(modes))
    if modes == "all":
        keep.add(NO_ATTENTION)
    if families is None:
        families = "all" if modes == "all" else "paper"
    if families == "all":
        chosen = set(BUILDERS)
    elif families == "paper":
        chosen = set(PAPER_FAMILIES)
    else:
        chosen = {families} if isinstance(families, str) else set(families)
        for f in chosen - set(BUILDERS):
            raise ConfigError(f"family {f!r}: expected one of {', '.join(BUILDERS)}")
    return [name for name, (family, mode) in _VARIANTS.items()
            if mode in keep and family in chosen]


def model_info(name: str) -> dict[str, str]:
    """``{"family": ..., "mode": ...}`` for a name: family one of :data:`BUILDERS`
    (``setr``, ``setr_conv``, ``setr_cvt``, ``dynunet``, ``unetr``, ``swinunetr``), mode one of
    :data:`~kvseg.layers.attention.MODES`, or ``"none"`` (``NO_ATTENTION``) for ``dynunet``."""
    family, mode = _lookup(name)
    return {"family": family, "mode": mode}


def resolve_config(name: str, size: str = "base", **overrides):
    """The preset dataclass of ``name`` at ``size`` with ``overrides`` applied.

    Raises :class:`ConfigError` for an unknown name, size or override key. Lists become tuples
    (YAML).
    """
    family, _ = _lookup(name)
    if size not in PRESETS[family]:
        raise ConfigError(f"size={size!r}: expected one of {', '.join(PRESETS[family])} "
                          f"for {name}")
    preset = PRESETS[family][size]
    fields = {f.name for f in dataclasses.fields(preset)}
    for key in overrides:
        if key not in fields:
            raise ConfigError(f"unknown override {key!r} for {name}; valid keys: "
                              f"{', '.join(sorted(fields))}")
    clean = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    for key, value in clean.items():
        _check_field(key, value, getattr(preset, key))
    return dataclasses.replace(preset, **clean)


#: Preset fields that are rates in [0, 1); padding may be 0; every other number must be > 0.
_RATES = ("drop", "attn_drop", "drop_path")


def _check_field(key: str, value, default) -> None:
    """An override's value has the preset field's kind and a usable range (ConfigError)."""
    def bad(why: str) -> ConfigError:
        return ConfigError(f"{key}={value!r}: {why}")

    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad("expected true or false")
        return
    if isinstance(default, tuple) and key in _RATES:  # CvT's drop_path: one rate per stage
        if not isinstance(value, tuple) or not value:
            raise bad("expected a list of rates, one per stage")
        for v in value:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
                raise bad("expected rates in [0, 1)")
        return
    if isinstance(default, tuple):
        if not isinstance(value, tuple) or not value:
            raise bad("expected a list of integers, one per stage")
        for v in value:
            if isinstance(v, bool) or not isinstance(v, int):
                raise bad("expected a list of integers")
            if v < (0 if "padding" in key else 1):
                raise bad(f"every value must be >= {0 if 'padding' in key else 1}")
        return
    if isinstance(default, str):
        if not isinstance(value, str):
            raise bad("expected a string")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad("expected a number")
    if isinstance(default, int) and not isinstance(value, int):
        raise bad("expected an integer")
    if not math.isfinite(value):
        raise bad("must be finite")
    if key in _RATES:
        if not 0 <= value < 1:
            raise bad("expected a rate in [0, 1)")
    elif value <= 0:
        raise bad("must be > 0")


def create_model(name: str, *, num_classes: int = 3, in_channels: int = 3, img_size: int = 256,
                 size: str = "base", pretrained: str | None = None,
                 pretrained_rule: str = "sym", pretrained_layout: str | None = None,
                 **overrides) -> nn.Module:
    """Build variant ``name``: (B, in_channels, H, W) -> logits (B, num_classes, H, W), any H, W.

    Args:
        name: a variant of :func:`list_models`.
        num_classes: output channels.
        in_channels: input channels.
        img_size: sizes the learned position embedding table (resized for other inputs).
        size: preset (micro, small, base, large).
        pretrained: initialise the encoder from a weights file in an official layout (timm ViT,
            Google ViT ``.npz``, TransUNet's ``R50+ViT-B_16.npz``, Microsoft's CvT ``.pth``) or
            a kvseg checkpoint, or from the named source ``"imagenet"`` (downloaded into the
            torch hub cache when missing); :func:`kvseg.models.pretrained.load_pretrained`.
        pretrained_rule: QKV -> KV rule for KV / KV-pos models: ``sym`` (default), ``key``,
            ``mean`` (:mod:`kvseg.models.kv_rules`).
        pretrained_layout: the file's layout; None detects it from the keys.
        **overrides: preset fields (e.g. ``depth=6``, ``head="mla"``, ``pos_dim=10``).

    The model carries ``name``, ``size`` and ``config`` (the resolved dataclass), and after a
    pretrained load ``pretrained_report`` (:class:`kvseg.models.pretrained.LoadReport`).
    """
    family, mode = _lookup(name)
    if pretrained is not None:
        check_pretrained(name)
    if num_classes < 1 or in_channels < 1 or img_size < 1:
        raise ConfigError(f"num_classes={num_classes}, in_channels={in_channels}, "
                          f"img_size={img_size}: all must be positive")
    cfg = resolve_config(name, size, **overrides)
    model = BUILDERS[family](cfg, mode, in_channels=in_channels, num_classes=num_classes,
                             img_size=img_size)
    model.name, model.size, model.config = name, size, cfg
    if pretrained is not None:
        model.pretrained_report = load_pretrained(model, pretrained, layout=pretrained_layout,
                                                  rule=pretrained_rule)
        log.info("%s initialised from %s", name, model.pretrained_report.summary())
    return model


def check_pretrained(name: str) -> None:
    """:class:`ConfigError` (one line) when ``name`` cannot take ``pretrained=``: the reference
    families (MONAI's networks) have no converter and no named source."""
    family, _ = _lookup(name)
    if family in REFERENCE_FAMILIES:
        raise ConfigError(f"pretrained= for {name}: the reference families ("
                          f"{', '.join(REFERENCE_FAMILIES)}) train from scratch here; to convert "
                          "a pretrained MONAI model, build it and call kvseg.patch_attention")


def build_on_meta(name: str, **kwargs) -> nn.Module:
    """``create_model`` on the meta device: shapes and counts without memory or arithmetic."""
    with torch.device("meta"):
        return create_model(name, **kwargs)


def _lookup(name: str) -> tuple[str, str]:
    if name not in _VARIANTS:
        raise ConfigError(f"unknown model {name!r}; valid names: {', '.join(_VARIANTS)}")
    return _VARIANTS[name]
