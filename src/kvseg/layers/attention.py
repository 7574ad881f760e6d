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

Each mode is one small class (:class:`QKVAttention`, :class:`KVAttention`,
:class:`KVPosAttention`) that builds its q, k, v and hands them to :class:`AttentionCore`, a
parameter-free module shared with CvT's convolutional attention, so that the maths (and the MAC
count) lives in one place. Each class carries a :class:`ModeSpec`: the mode's one spelling in
code (``kv_pos``), its display name (``KV-pos``) and the two facts other layers decide on (the
keys serve as queries; a KV-pos key bias). :data:`ATTENTION_LAYERS` maps the name to the class
and everything else derives from it: :data:`MODES`, :data:`MODE_LABELS`, :func:`mode_suffix`
(the model-name suffix, ``kvpos``). ``Attention(dim, num_heads, mode)`` builds the class of
``mode``. Adding a mode is adding a class and its row in :data:`ATTENTION_LAYERS`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal, overload

import torch
import torch.nn.functional as F
from torch import nn

from kvseg.errors import ConfigError


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
            raise ConfigError(f"pos_dim={pos_dim}: KV-pos needs at least 2 channels")
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
        # an encoding made under torch.inference_mode() (model.predict) is an inference tensor,
        # which autograd refuses to save for backward: make it again for training
        if col is None or (col.is_inference() and not torch.is_inference_mode_enabled()):
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
        q: queries (B, heads, Nq, d).
        k: keys (B, heads, Nk, d).
        v: values (B, heads, Nk, dv).
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


@dataclass(frozen=True)
class ModeSpec:
    """What an attention mode is, for every layer that implements it (tokens here, CvT's maps).

    Args:
        name: the one spelling in code and configs, e.g. ``"kv_pos"``.
        label: the display name in tables and plots, e.g. ``"KV-pos"``.
        shared_query: no query projection exists; the keys serve as queries.
        key_bias: a :class:`KVPosBias` gives the logits a learned temperature and a per-key bias.
    """

    name: str
    label: str
    shared_query: bool
    key_bias: bool

    @property
    def suffix(self) -> str:
        """The model-name suffix: the name without underscores (``kv_pos`` -> ``kvpos``)."""
        return self.name.replace("_", "")


def check_heads(dim: int, num_heads: int) -> None:
    """Raise :class:`ConfigError` unless ``dim`` splits into ``num_heads`` equal heads."""
    if num_heads < 1 or dim % num_heads:
        raise ConfigError(f"dim={dim} is not divisible by num_heads={num_heads}")


def attend(core: AttentionCore, pos: KVPosBias | None, q: torch.Tensor, k: torch.Tensor,
           v: torch.Tensor, return_attention: bool = False):
    """Run q, k, v through ``core``, with ``pos``'s temperature and key bias unless it is None.

    Args:
        core: the shared products.
        pos: the KV-pos bias of the layer, or None.
        q: queries (B, heads, Nq, d).
        k: keys (B, heads, Nk, d).
        v: values (B, heads, Nk, dv).
        return_attention: also compute the post-softmax probabilities (B, heads, Nq, Nk).

    Returns ``(out, attention)``: out (B, Nq, heads·dv) with the heads merged, attention None
    unless ``return_attention``.
    """
    temperature = key_bias = None
    if pos is not None:
        temperature, key_bias = pos(k.shape[-2])
    out = core(q, k, v, temperature, key_bias, return_attention)
    attn = None
    if return_attention:
        out, attn = out
    b, _, nq, _ = out.shape
    return out.transpose(1, 2).reshape(b, nq, -1), attn


class Attention(nn.Module):
    """Multi-head self-attention over tokens, (B, N, dim) -> (B, N, dim), in one mode.

    ``Attention(dim, num_heads, mode)`` builds the registered class of ``mode``
    (:data:`ATTENTION_LAYERS`); the mode classes may also be built directly (``mode`` omitted).

    Args:
        dim: token width.
        num_heads: heads (``dim`` must be divisible by it).
        mode: ``"qkv"`` (default), ``"kv"`` or ``"kv_pos"``; a mode class, by default, its own.
        qkv_bias: bias in the q/k/v projection.
        attn_drop: dropout on the attention probabilities (training only).
        proj_drop: dropout after the output projection.
        pos_dim: channels of the KV-pos encoding (``kv_pos`` only).

    Parameters: ``qkv`` Linear(dim, 3·dim) in ``qkv`` mode, ``kv`` Linear(dim, 2·dim) otherwise
    (no query parameter exists), ``proj`` Linear(dim, dim), and in ``kv_pos`` ``pos.map_pos``
    Linear(pos_dim, 1). Scale 1/sqrt(head_dim) in every mode (Borji's ViT uses 1/sqrt(dim)).

    ``forward(x, return_attention=True)`` returns ``(out, attention)`` with the post-softmax
    probabilities (B, heads, N, N).
    """

    spec: ClassVar[ModeSpec]

    def __new__(cls, *args, **kwargs):
        if cls is Attention:  # the public entry point: the class registered for the mode
            mode = args[2] if len(args) > 2 else kwargs.get("mode", "qkv")
            cls = attention_layer(mode)
        return super().__new__(cls)

    def __init__(self, dim: int, num_heads: int, mode: str | None = None, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, pos_dim: int = 50) -> None:
        super().__init__()
        if mode is not None and mode != self.spec.name:
            raise ConfigError(f"mode={mode!r}: {type(self).__name__} is {self.spec.name!r}")
        check_heads(dim, num_heads)
        self.mode, self.num_heads, self.head_dim = self.spec.name, num_heads, dim // num_heads
        self.build_projection(dim, qkv_bias)
        self.pos = KVPosBias(pos_dim) if self.spec.key_bias else None
        self.core = AttentionCore(self.head_dim ** -0.5, attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def build_projection(self, dim: int, qkv_bias: bool) -> None:
        """Create the q/k/v projection parameters of the mode."""
        raise NotImplementedError

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, dim) tokens -> q, k, v, each (B, heads, N, head_dim)."""
        raise NotImplementedError

    def _split(self, t: torch.Tensor, parts: int) -> torch.Tensor:
        b, n, _ = t.shape  # (B, N, parts·dim) -> (parts, B, heads, N, head_dim)
        return t.view(b, n, parts, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)

    @overload
    def forward(self, x: torch.Tensor, return_attention: Literal[False] = False) -> torch.Tensor:
        ...

    @overload
    def forward(self, x: torch.Tensor,
                return_attention: Literal[True]) -> tuple[torch.Tensor, torch.Tensor]:
        ...

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        out, attn = attend(self.core, self.pos, *self.project(x), return_attention)
        out = self.proj_drop(self.proj(out))  # (B, N, dim)
        return (out, attn) if return_attention else out


class QKVAttention(Attention):
    """``qkv``: the standard Transformer, one fused Linear(dim, 3·dim) for q, k and v."""

    spec = ModeSpec("qkv", "QKV", shared_query=False, key_bias=False)

    def build_projection(self, dim: int, qkv_bias: bool) -> None:
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self._split(self.qkv(x), 3)
        return q, k, v


class KVAttention(Attention):
    """``kv``: Borji's Key-Value Transformer, Linear(dim, 2·dim) for k and v; k is the query."""

    spec = ModeSpec("kv", "KV", shared_query=True, key_bias=False)

    def build_projection(self, dim: int, qkv_bias: bool) -> None:
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k, v = self._split(self.kv(x), 2)
        return k, k, v  # the keys serve as queries


class KVPosAttention(KVAttention):
    """``kv_pos``: KV plus the factored KV-pos bias (``pos``, a :class:`KVPosBias`)."""

    spec = ModeSpec("kv_pos", "KV-pos", shared_query=True, key_bias=True)


#: The mode registry, in the paper's order: name -> the token attention class of that mode.
ATTENTION_LAYERS: dict[str, type[Attention]] = {
    cls.spec.name: cls for cls in (QKVAttention, KVAttention, KVPosAttention)}
#: The mode names (paper order): ``("qkv", "kv", "kv_pos")``.
MODES: tuple[str, ...] = tuple(ATTENTION_LAYERS)
#: Display names by mode: ``{"qkv": "QKV", "kv": "KV", "kv_pos": "KV-pos"}``.
MODE_LABELS: dict[str, str] = {name: cls.spec.label for name, cls in ATTENTION_LAYERS.items()}


def attention_layer(mode: str) -> type[Attention]:
    """The token attention class of ``mode``; :class:`ConfigError` naming it if unknown."""
    try:
        return ATTENTION_LAYERS[mode]
    except (KeyError, TypeError):
        raise ConfigError(f"mode={mode!r}: expected one of {', '.join(MODES)}") from None


def mode_spec(mode: str) -> ModeSpec:
    """The :class:`ModeSpec` of ``mode`` (:class:`ConfigError` if unknown)."""
    return attention_layer(mode).spec


def mode_label(mode: str) -> str:
    """The display name of ``mode``: ``QKV``, ``KV``, ``KV-pos``."""
    return mode_spec(mode).label


def mode_suffix(mode: str) -> str:
    """The model-name suffix of ``mode``: ``qkv``, ``kv``, ``kvpos``."""
    return mode_spec(mode).suffix
