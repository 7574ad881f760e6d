"""Multi-head self-attention in three modes: ``qkv``, ``kv`` and ``kv_pos``.

* ``qkv``: softmax(Q Kᵀ · s) V, one fused Q/K/V projection (the standard Transformer).
* ``kv`` (Borji's Key-Value Transformer): no query projection exists; the keys serve as queries,
  softmax(K Kᵀ · s) V. The pre-softmax logits are symmetric in (i, j).
* ``kv_pos`` (Borji's asymmetric KV): a fixed sinusoidal encoding P(i, j) of the
  (query index i, key index j) plane, ``pos_dim`` channels, is added to every logit and a learned
  ``Linear(pos_dim, 1)`` per layer maps the sum back to one logit:
  ``L'_ij = w · (S_ij + P(i, j)) + b = (Σw) S_ij + w · P(i, j) + b``.
  Every channel of P depends on i alone or on j alone (first half: i, second half: j), so
  ``w · P(i, j) = f(i) + g(j)``; f(i) and b are constant along a softmax row and cancel. What is
  left, exactly, is a learned temperature Σw on K Kᵀ plus a per-key bias g(j):
  ``softmax_j(L'_ij) = softmax_j((Σw) S_ij + g(j))``. That is what is computed here (a (1, N)
  bias instead of Borji's (B, heads, N, N, pos_dim) tensor); ``tests/layers`` keep the naive form
  as the reference and ``docs/models.md`` explains it.

The scale s is 1/sqrt(head_dim) in every mode. (Borji's ViT scripts and CvT's code use
1/sqrt(model width) instead; his synthetic/NLP code uses the head dim, as here.)

The attention products run in :class:`AttentionCore`, a parameter-free module shared with CvT's
convolutional attention, so that the maths (and the MAC count) lives in one place.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("qkv", "kv", "kv_pos")


def sinusoidal_2d(num_rows: int, num_cols: int, pos_dim: int, *, device=None,
                  dtype=torch.float32) -> torch.Tensor:
    """The fixed 2D sinusoidal encoding P of a (row, col) plane: (num_rows, num_cols, pos_dim).

    Follows ``positional_encodings.torch_encodings.PositionalEncoding2D`` (the encoding Borji's
    KV-pos uses): ``c = 2·ceil(pos_dim / 4)`` channels encode the row index as interleaved
    (sin, cos) pairs with inverse frequencies ``10000^(-2k/c)``, the next channels encode the
    column index the same way, and the result is truncated to ``pos_dim`` channels (for 50: 26 row
    channels, 24 column channels).
    """
    row, col = _axis_encodings(num_rows, num_cols, pos_dim, device=device, dtype=dtype)
    return torch.cat((row[:, None, :].expand(-1, num_cols, -1),
                      col[None, :, :].expand(num_rows, -1, -1)), dim=-1)


def _sincos(positions: torch.Tensor, channels: int) -> torch.Tensor:
    """(n,) positions -> (n, channels) interleaved sin/cos features (channels even)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, channels, 2, device=positions.device,
                                             dtype=torch.float32) / channels))
    angles = positions.float()[:, None] * inv_freq[None, :]  # (n, channels/2)
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(1)


def _axis_encodings(num_rows: int, num_cols: int, pos_dim: int, *, device=None,
                    dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The row part (num_rows, n_row) and the column part (num_cols, n_col) of P.

    ``n_row + n_col == pos_dim``; P(i, j) = concat(row[i], col[j]).
    """
    channels = 2 * math.ceil(pos_dim / 4)
    n_row = min(channels, pos_dim)
    n_col = pos_dim - n_row
    row = _sincos(torch.arange(num_rows, device=device), channels)[:, :n_row]
    col = _sincos(torch.arange(num_cols, device=device), channels)[:, :n_col]
    return row.to(dtype), col.to(dtype)


class KVPosBias(nn.Module):
    """Borji's ``map_pos = Linear(pos_dim, 1)`` in its factored form.

    ``forward(num_keys)`` returns ``(temperature, key_bias)``: the scalar Σw that multiplies the
    logits and the (num_keys,) bias g(j) + b, g(j) = w_col · P_col(j), added to every query row.
    The query part f(i) cancels in the softmax and is not computed. b cancels too; it is kept in
    the bias (one add) so that it stays a used parameter (DDP-safe) whose gradient is zero, as in
    Borji's naive layer; parameter count and checkpoints match the naive form.

    MACs: ``num_keys · n_col`` per forward (the per-key bias), reported by :meth:`macs`.
    """

    def __init__(self, pos_dim: int = 50) -> None:
        super().__init__()
        if pos_dim < 2:
            raise ValueError(f"pos_dim={pos_dim}: KV-pos needs at least 2 channels")
        self.pos_dim = pos_dim
        # PyTorch's default Linear init, as in Borji's ViT_pos.py.
        self.map_pos = nn.Linear(pos_dim, 1)
        self.map_pos._kvseg_keep_init = True
        # P_col for each key count seen: fixed sinusoids, so cached (not state, not saved).
        self._col_cache: dict[tuple, torch.Tensor] = {}

    @property
    def num_col_channels(self) -> int:
        return self.pos_dim - min(2 * math.ceil(self.pos_dim / 4), self.pos_dim)

    def forward(self, num_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.map_pos.weight[0]  # (pos_dim,)
        key = (num_keys, w.device, w.dtype)
        col = self._col_cache.get(key)
        if col is None:
            _, col = _axis_encodings(1, num_keys, self.pos_dim, device=w.device, dtype=w.dtype)
            self._col_cache = {key: col}  # one entry: the current input size
        n_row = self.pos_dim - col.shape[1]
        key_bias = col @ w[n_row:] + self.map_pos.bias  # (num_keys,)
        return w.sum(), key_bias

    def macs(self, args: tuple, output) -> int:
        return int(args[0]) * self.num_col_channels


class AttentionCore(nn.Module):
    """The attention products, parameter-free: softmax(q kᵀ · scale · temperature + bias) v.

    Args (forward):
        q: (B, heads, Nq, d); k: (B, heads, Nk, d); v: (B, heads, Nk, dv).
        temperature: optional scalar tensor multiplying the logits (KV-pos Σw); folded into q.
        key_bias: optional (Nk,) additive bias per key (KV-pos g(j)), broadcast over queries.
        return_attention: also return the post-softmax probabilities (B, heads, Nq, Nk),
            computed explicitly (same maths, dropout applied to them in training).
    Returns (B, heads, Nq, dv), or (out, attention).

    Runs through ``F.scaled_dot_product_attention`` unless ``return_attention``; dropout only in
    training. MACs (:meth:`macs`): ``B·heads·Nq·Nk·(d + dv)`` (QKᵀ and AV).
    """

    def __init__(self, scale: float, attn_drop: float = 0.0) -> None:
        super().__init__()
        self.scale = scale
        self.attn_drop = attn_drop

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                temperature: torch.Tensor | None = None, key_bias: torch.Tensor | None = None,
                return_attention: bool = False):
        if temperature is not None:
            q = q * temperature  # (q·t) kᵀ = t (q kᵀ): a learned temperature, exact
        mask = None if key_bias is None else key_bias.to(q.dtype).view(1, 1, 1, -1)
        dropout_p = self.attn_drop if self.training else 0.0
        if not return_attention:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                                  scale=self.scale)
        logits = (q @ k.transpose(-2, -1)) * self.scale  # (B, heads, Nq, Nk)
        if mask is not None:
            logits = logits + mask
        attn = logits.softmax(dim=-1)
        probs = F.dropout(attn, dropout_p) if dropout_p > 0 else attn
        return probs @ v, attn

    def macs(self, args: tuple, output) -> int:
        q, k, v = args[:3]
        b, h, nq, d = q.shape
        return b * h * nq * k.shape[-2] * (d + v.shape[-1])


class Attention(nn.Module):
    """Multi-head self-attention over tokens, (B, N, dim) -> (B, N, dim).

    Args:
        dim: token width; num_heads: heads (dim must be divisible); mode: "qkv" | "kv" | "kv_pos".
        qkv_bias: bias in the fused projection; attn_drop / proj_drop: dropout rates;
        pos_dim: channels of the KV-pos encoding (``kv_pos`` only).

    Parameters: ``qkv`` Linear(dim, 3·dim) in ``qkv`` mode, ``kv`` Linear(dim, 2·dim) otherwise
    (no query parameter exists), ``proj`` Linear(dim, dim), and in ``kv_pos`` ``pos.map_pos``
    Linear(pos_dim, 1). Scale 1/sqrt(head_dim) in every mode (Borji's ViT uses 1/sqrt(dim)).

    ``forward(x, return_attention=True)`` returns ``(out, attention)`` with the post-softmax
    probabilities (B, heads, N, N).
    """

    def __init__(self, dim: int, num_heads: int, mode: str = "qkv", qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, pos_dim: int = 50) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: expected one of {', '.join(MODES)}")
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.mode, self.num_heads, self.head_dim = mode, num_heads, dim // num_heads
        if mode == "qkv":
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        else:
            self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.pos = KVPosBias(pos_dim) if mode == "kv_pos" else None
        self.core = AttentionCore(self.head_dim ** -0.5, attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        b, n, c = x.shape
        if self.mode == "qkv":
            q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(
                2, 0, 3, 1, 4)  # each (B, heads, N, head_dim)
        else:
            k, v = self.kv(x).view(b, n, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q = k  # the keys serve as queries
        temperature = key_bias = None
        if self.pos is not None:
            temperature, key_bias = self.pos(n)
        out = self.core(q, k, v, temperature, key_bias, return_attention)
        attn = None
        if return_attention:
            out, attn = out
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))  # (B, N, dim)
        return (out, attn) if return_attention else out
