"""Shared layers: the attention modes (one class each, chosen by name) and Transformer blocks."""

from __future__ import annotations

from kvseg.layers.attention import (
    ATTENTION_LAYERS,
    MODE_LABELS,
    MODES,
    Attention,
    AttentionCore,
    KVAttention,
    KVPosAttention,
    KVPosBias,
    ModeSpec,
    QKVAttention,
    attention_layer,
    mode_label,
    mode_spec,
    mode_suffix,
    sinusoidal_2d,
)
from kvseg.layers.blocks import Mlp, PatchEmbed, PosEmbed2d, TransformerBlock

__all__ = ["ATTENTION_LAYERS", "MODES", "MODE_LABELS", "Attention", "AttentionCore",
           "KVAttention", "KVPosAttention", "KVPosBias", "Mlp", "ModeSpec", "PatchEmbed",
           "PosEmbed2d", "QKVAttention", "TransformerBlock", "attention_layer", "mode_label",
           "mode_spec", "mode_suffix", "sinusoidal_2d"]
