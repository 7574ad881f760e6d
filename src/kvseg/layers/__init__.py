"""Shared layers: the attention modes (one class each, chosen by name), the position terms of
the query-free modes, and Transformer blocks."""

from __future__ import annotations

from kvseg.layers.attention import (
    ATTENTION_LAYERS,
    MODE_LABELS,
    MODES,
    PAPER_MODES,
    Attention,
    AttentionCore,
    KVAttention,
    KVPosAttention,
    KVRelPosAttention,
    ModeSpec,
    QKVAttention,
    SharedKVAttention,
    SharedQVAttention,
    SingleAttention,
    attention_layer,
    mode_label,
    mode_spec,
    mode_suffix,
    resolve_modes,
)
from kvseg.layers.blocks import Mlp, PatchEmbed, PosEmbed2d, TransformerBlock
from kvseg.layers.position import KVPosBias, RelPosBias, sinusoidal_2d

__all__ = ["ATTENTION_LAYERS", "MODES", "MODE_LABELS", "PAPER_MODES", "Attention",
           "AttentionCore", "KVAttention", "KVPosAttention", "KVPosBias", "KVRelPosAttention",
           "Mlp", "ModeSpec", "PatchEmbed", "PosEmbed2d", "QKVAttention", "RelPosBias",
           "SharedKVAttention", "SharedQVAttention", "SingleAttention", "TransformerBlock",
           "attention_layer", "mode_label", "mode_spec", "mode_suffix", "resolve_modes",
           "sinusoidal_2d"]
