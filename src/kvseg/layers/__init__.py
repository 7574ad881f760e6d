"""Shared layers: the attention module (three modes) and Transformer building blocks."""

from __future__ import annotations

from kvseg.layers.attention import MODES, Attention, AttentionCore, KVPosBias, sinusoidal_2d
from kvseg.layers.blocks import Mlp, PatchEmbed, PosEmbed2d, TransformerBlock

__all__ = ["MODES", "Attention", "AttentionCore", "KVPosBias", "Mlp", "PatchEmbed", "PosEmbed2d",
           "TransformerBlock", "sinusoidal_2d"]
