"""Multi-head self-attention in seven modes, one small class each, chosen by name.

Borji's three (the paper's study) and the other projection-sharing variants of Kayyam, Madan
Gopal & Lewis (2026), whose notation is in brackets ("−" separates different projections, "="
joins shared ones; "⁺" a positional correction):

* ``qkv`` [QKV]: softmax(Q Kᵀ · s) V, one fused Q/K/V projection (the standard Transformer).
* ``kv`` [Q=K−V] (Borji's Key-Value Transformer): no query projection; the keys serve as
  queries, softmax(K Kᵀ · s) V. The pre-softmax logits are symmetric in (i, j).
* ``kv_pos`` [(Q=K−V)⁺] (Borji's asymmetric KV, his own label ``kv``): a fixed sinusoidal
  encoding P(i, j) of the (query index i, key index j) plane, ``pos_dim`` channels, is added to
  every logit and a learned ``Linear(pos_dim, 1)`` per layer maps the sum back to one logit:
  ``L'_ij = w · (S_ij + P(i, j)) + b = (Σw) S_ij + w · P(i, j) + b``. Every channel of P depends
  on i alone or on j alone, so ``w · P(i, j) = f(i) + g(j)``; f(i) and b are constant along a
  softmax row and cancel. What is left, exactly, is a learned temperature Σw on K Kᵀ plus a
  per-key bias g(j), computed by :class:`~kvseg.layers.position.KVPosBias`.
* ``shared_kv`` [Q−K=V]: projections Q and K; the keys are also the values, softmax(Q Kᵀ s) K.
* ``shared_qv`` [Q=V−K, not in Kayyam et al.]: projections Q and K; the queries are also the
  values, softmax(Q Kᵀ s) Q.
* ``single`` [Q=K=V]: one projection K serves as queries, keys and values, softmax(K Kᵀ s) K;
  symmetric logits.
* ``kv_relpos``: ``kv`` plus a learned 2D relative-position bias per head over the token grid
  (:class:`~kvseg.layers.position.RelPosBias`): softmax(K Kᵀ s + B[Δrow, Δcol]) V. B(Δ) ≠ B(−Δ),
  so the logits are pairwise asymmetric while the projections stay query-free.

The scale s is 1/sqrt(head_dim) in every mode. (Borji's ViT scripts and CvT's code use
1/sqrt(model width) instead; his synthetic/NLP code uses the head dim, as here.)

Each mode is one small class that builds its projection and hands q, k, v to
:class:`AttentionCore`, a parameter-free module shared with CvT's convolutional attention, so
that the maths (and the MAC count) lives in one place. Each class carries a :class:`ModeSpec`:
the mode's one spelling in code (``kv_pos``), its display name (``KV-pos``) and the facts other
layers decide on (which projection the queries and the values come from; a KV-pos key bias; a
relative-position bias). :data:`ATTENTION_LAYERS` maps the name to the class and everything
else derives from it: :data:`MODES`, :data:`MODE_LABELS`, :func:`mode_suffix` (the model-name
suffix, ``kvpos``). ``Attention(dim, num_heads, mode)`` builds the class of ``mode``. Adding a
mode is adding a class and its row in :data:`ATTENTION_LAYERS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, overload

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kvseg.errors import ConfigError
from kvseg.layers.position import KVPosBias, RelPosBias, sinusoidal_2d

#: SDPA's fused kernels want a head dim that is a multiple of this (FlashAttention on CUDA).
HEAD_DIM_MULTIPLE = 8


class AttentionCore(nn.Module):
    """The attention products, parameter-free:
    softmax(q kᵀ · scale · temperature + key_bias + attn_bias) v.

    Args (forward):
        q: queries (B, heads, Nq, d).
        k: keys (B, heads, Nk, d).
        v: values (B, heads, Nk, dv).
        temperature: optional scalar tensor multiplying the logits (KV-pos Σw).
        key_bias: optional (Nk,) additive bias per key (KV-pos g(j)), broadcast over queries.
        return_attention: also return the post-softmax probabilities (B, heads, Nq, Nk),
            computed explicitly (same maths, dropout applied to them in training).
        attn_bias: optional additive bias broadcastable to (B, heads, Nq, Nk) (the
            relative-position bias; a Swin window's bias and shift mask). With ``key_bias``
            too, the key bias joins it in one float mask (SDPA's masked kernel).
    Returns (B, heads, Nq, dv), or (out, attention).

    Runs through ``F.scaled_dot_product_attention`` unless ``return_attention``; dropout only in
    training. A per-key bias needs no mask: it is one more channel of the dot product, q' = [t·q,
    1, 0…] and k' = [k, g / scale, 0…] (zero-padded to a multiple of :data:`HEAD_DIM_MULTIPLE`,
    v too; CPU training: width d + 1), so s·q'·k' = s·t·q·k + g(j) and SDPA keeps its fused,
    mask-free kernels (a learned float mask would need its (B, heads, Nq, Nk) gradient and the
    unfused kernel). MACs (:meth:`macs`): ``B·heads·Nq·Nk·(d + dv)`` (QKᵀ and AV, the unpadded
    widths: the padding is a kernel detail, not the model's arithmetic).
    """

    def __init__(self, scale: float, attn_drop: float = 0.0) -> None:
        super().__init__()
        self.scale = scale
        self.attn_drop = attn_drop

    def logits(self, q: torch.Tensor, k: torch.Tensor, temperature: torch.Tensor | None = None,
               key_bias: torch.Tensor | None = None,
               attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        """The pre-softmax logits (B, heads, Nq, Nk), written out (arguments as forward)."""
        if temperature is not None:
            q = q * temperature  # (q·t) kᵀ = t (q kᵀ): a learned temperature, exact
        logits = (q @ k.transpose(-2, -1)) * self.scale
        if key_bias is not None:
            logits = logits + key_bias.to(q.dtype).view(1, 1, 1, -1)
        if attn_bias is not None:
            logits = logits + attn_bias.to(q.dtype)
        return logits

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                temperature: torch.Tensor | None = None, key_bias: torch.Tensor | None = None,
                return_attention: bool = False, *, attn_bias: torch.Tensor | None = None):
        dropout_p = self.attn_drop if self.training else 0.0
        if return_attention:
            attn = self.logits(q, k, temperature, key_bias, attn_bias).softmax(dim=-1)
            probs = F.dropout(attn, dropout_p) if dropout_p > 0 else attn
            return probs @ v, attn
        if key_bias is not None and attn_bias is None:
            return self._key_bias_attention(q, k, v, temperature, key_bias, dropout_p)
        if temperature is not None:
            q = q * temperature
        if key_bias is not None:  # with an additive bias too (KV-pos in a window): one mask
            attn_bias = attn_bias + key_bias.view(1, 1, 1, -1)
        mask = None if attn_bias is None else attn_bias.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                              scale=self.scale)

    def _key_bias_attention(self, q, k, v, temperature, key_bias, dropout_p):
        """SDPA with the key bias folded into one more channel of q and k (no mask).

        Training memory stays at KV's: autograd keeps only q, k, v (the projection's output,
        which a KV layer keeps too), t, g, the merged output and SDPA's log-sum-exp, never the
        padded q', k', v'. On the CPU without dropout, :class:`_FoldedKeyBiasSDPA` calls the
        fused kernel's forward and backward itself (the folding is redone in the backward, a
        few copies; the attention is not). Elsewhere (CUDA, attention dropout) the folding and
        SDPA are recomputed in the backward pass (:func:`torch.utils.checkpoint.checkpoint`):
        one more SDPA forward per layer.
        """
        dv = int(v.shape[-1])  # fixed by the model (a constant in an export)
        shared = q is k  # KV-pos: the keys serve as queries
        t = temperature if temperature is not None else q.new_ones(())
        tracing = torch.jit.is_tracing() or torch.compiler.is_compiling()
        if torch.is_grad_enabled() and not tracing:
            if q.device.type == "cpu" and dropout_p == 0.0 and q.dtype == k.dtype == v.dtype:
                merged = _FoldedKeyBiasSDPA.apply(q, k, v, t, key_bias, self.scale)
            else:
                def run(q, k, v, t, g):
                    return _folded_sdpa(k if shared else q, k, v, t, g, self.scale, dropout_p)

                merged = checkpoint(run, q, k, v, t, key_bias, use_reentrant=False)
        else:
            merged = _folded_sdpa(q, k, v, t, key_bias, self.scale, dropout_p)
        return merged.unflatten(-1, (-1, dv)).transpose(1, 2)  # (B, h, Nq, dv), a view

    def macs(self, args: tuple, output) -> int:
        q, k, v = args[:3]
        b, h, nq, d = q.shape
        return b * h * nq * k.shape[-2] * (d + v.shape[-1])


def fold_key_bias(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, t: torch.Tensor,
                  key_bias: torch.Tensor, scale: float, multiple: int = HEAD_DIM_MULTIPLE):
    """q, k, v widened so that scale·q'·k' = scale·t·q·k + g(j) (see :class:`AttentionCore`):
    q' = [t·q, 1, 0…], k' = [k, g/scale, 0…], v' = [v, 0…], all of one head width, a multiple
    of ``multiple`` (:data:`HEAD_DIM_MULTIPLE` for FlashAttention; 1 on the CPU)."""
    d, dv = int(q.shape[-1]), int(v.shape[-1])  # head widths: fixed by the model
    width = -(-max(d + 1, dv) // multiple) * multiple
    g = (key_bias.to(k.dtype) / scale).view(1, 1, -1, 1).expand_as(k[..., :1])
    k2 = F.pad(torch.cat((k, g), dim=-1), (0, width - d - 1))
    q2 = F.pad(torch.cat((q * t.to(q.dtype), torch.ones_like(q[..., :1])), dim=-1),
               (0, width - d - 1))
    v2 = F.pad(v, (0, width - dv)) if width != dv else v
    return q2, k2, v2


def _folded_sdpa(q, k, v, t, key_bias, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(s·t·q kᵀ + g(j)) v through mask-free SDPA; heads merged: (B, Nq, h·dv). Head
    width d + 1 on the CPU (its kernel takes any width, and padding further only costs time), a
    multiple of :data:`HEAD_DIM_MULTIPLE` elsewhere."""
    dv = int(v.shape[-1])
    multiple = 1 if q.device.type == "cpu" else HEAD_DIM_MULTIPLE
    q2, k2, v2 = fold_key_bias(q, k, v, t, key_bias, scale, multiple)
    out = F.scaled_dot_product_attention(q2, k2, v2, dropout_p=dropout_p, scale=scale)
    return out.transpose(1, 2)[..., :dv].flatten(2)


class _FoldedKeyBiasSDPA(torch.autograd.Function):
    """:func:`_folded_sdpa` on the CPU (no dropout) with a backward that needs no second
    attention forward: the forward keeps SDPA's log-sum-exp and the merged output, the backward
    re-widens them (the output's extra channels are zero, as v's are) and calls the fused
    kernel's own backward. Saves what KV's SDPA saves (q, k, v, output, log-sum-exp) plus t, g.
    The head width is d + 1, as in :func:`_folded_sdpa` on the CPU.
    """

    @staticmethod
    def forward(ctx, q, k, v, t, key_bias, scale):
        dv = int(v.shape[-1])
        q2, k2, v2 = fold_key_bias(q, k, v, t, key_bias, scale, multiple=1)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q2, k2, v2, 0.0, False, scale=scale)
        merged = out.transpose(1, 2)[..., :dv].flatten(2)  # (B, Nq, h·dv)
        ctx.scale = scale
        ctx.save_for_backward(q, k, v, t, key_bias, merged, lse)
        return merged

    @staticmethod
    def backward(ctx, grad_merged):
        q, k, v, t, key_bias, merged, lse = ctx.saved_tensors
        scale, d, dv = ctx.scale, int(q.shape[-1]), int(v.shape[-1])
        q2, k2, v2 = fold_key_bias(q, k, v, t, key_bias, scale, multiple=1)
        pad = (0, int(v2.shape[-1]) - dv)  # the output's extra channels are zero, as v's are
        out2 = F.pad(merged.unflatten(-1, (-1, dv)).transpose(1, 2), pad)
        grad2 = F.pad(grad_merged.unflatten(-1, (-1, dv)).transpose(1, 2), pad)
        dq2, dk2, dv2 = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad2, q2, k2, v2, out2, lse, 0.0, False, scale=scale)
        dq_scaled = dq2[..., :d]
        grad_q = dq_scaled * t.to(dq_scaled.dtype)
        grad_t = (dq_scaled * q).sum().to(t.dtype).reshape(t.shape)
        grad_g = (dk2[..., d].sum(dim=(0, 1)) / scale).to(key_bias.dtype)
        return grad_q, dk2[..., :d], dv2[..., :dv], grad_t, grad_g, None


@dataclass(frozen=True)
class ModeSpec:
    """What an attention mode is, for every layer that implements it (tokens here, CvT's maps).

    Args:
        name: the one spelling in code and configs, e.g. ``"kv_pos"``.
        label: the display name in tables and plots, e.g. ``"KV-pos"``.
        query: where the queries come from: ``"q"`` (their own projection) or ``"k"`` (the
            keys serve as queries; no query projection exists).
        value: where the values come from: ``"v"`` (their own projection), ``"k"`` (V = K) or
            ``"q"`` (V = Q).
        key_bias: a :class:`KVPosBias` gives the logits a learned temperature and a per-key bias.
        rel_pos: a :class:`RelPosBias` adds a learned bias per head and 2D token offset.
        notation: the mode in Kayyam et al.'s notation (``Q=K−V`` for ``kv``).
    """

    name: str
    label: str
    query: str = "q"
    value: str = "v"
    key_bias: bool = False
    rel_pos: bool = False
    notation: str = ""

    def __post_init__(self) -> None:
        if self.query not in ("q", "k") or self.value not in ("v", "k", "q"):
            raise ConfigError(f"ModeSpec {self.name!r}: query={self.query!r}, "
                              f"value={self.value!r}: expected q|k and v|k|q")
        if self.value == "q" and self.query == "k":
            raise ConfigError(f"ModeSpec {self.name!r}: V = Q without a query projection is "
                              "V = K (value='k')")

    @property
    def suffix(self) -> str:
        """The model-name suffix: the name without underscores (``kv_pos`` -> ``kvpos``)."""
        return self.name.replace("_", "")

    @property
    def shared_query(self) -> bool:
        """No query projection exists; the keys serve as queries."""
        return self.query == "k"

    @property
    def projections(self) -> tuple[str, ...]:
        """The distinct projections, in q, k, v order: ``("q", "k", "v")`` for ``qkv``,
        ``("k", "v")`` for ``kv``, ``("q", "k")`` for ``shared_kv``, ``("k",)`` for ``single``."""
        used = {self.query, "k", self.value}
        return tuple(p for p in ("q", "k", "v") if p in used)

    @property
    def symmetric(self) -> bool:
        """The pre-softmax logits are symmetric by construction (Q = K and no position term)."""
        return self.shared_query and not (self.key_bias or self.rel_pos)


def check_heads(dim: int, num_heads: int) -> None:
    """Raise :class:`ConfigError` unless ``dim`` splits into ``num_heads`` equal heads."""
    if num_heads < 1 or dim % num_heads:
        raise ConfigError(f"dim={dim} is not divisible by num_heads={num_heads}")


def position_terms(pos: KVPosBias | None, rel_pos: RelPosBias | None, num_keys: int,
                   grid: tuple[int, int] | None, key_stride: int = 1) -> dict:
    """The keyword arguments of :class:`AttentionCore` that a mode's position modules give.

    Args:
        pos: the KV-pos bias of the layer, or None.
        rel_pos: the relative-position bias of the layer, or None.
        num_keys: Nk.
        grid: the (h, w) of the query tokens (needed with ``rel_pos``).
        key_stride: the keys sit on every ``key_stride``-th row and column of the grid.
    """
    terms = {}
    if pos is not None:
        terms["temperature"], terms["key_bias"] = pos(num_keys)
    if rel_pos is not None:
        terms["attn_bias"] = rel_pos(grid, key_stride)
    return terms


def attend(core: AttentionCore, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           return_attention: bool = False, **terms):
    """Run q, k, v through ``core`` with the mode's position ``terms`` (:func:`position_terms`).

    Args:
        core: the shared products.
        q: queries (B, heads, Nq, d).
        k: keys (B, heads, Nk, d).
        v: values (B, heads, Nk, dv).
        return_attention: also compute the post-softmax probabilities (B, heads, Nq, Nk).
        **terms: ``temperature``, ``key_bias``, ``attn_bias`` as :class:`AttentionCore` takes.

    Returns ``(out, attention)``: out (B, Nq, heads·dv) with the heads merged, attention None
    unless ``return_attention``.
    """
    out = core(q, k, v, return_attention=return_attention, **terms)
    attn = None
    if return_attention:
        out, attn = out
    return out.transpose(1, 2).flatten(2), attn


class Attention(nn.Module):
    """Multi-head self-attention over tokens, (B, N, dim) -> (B, N, dim), in one mode.

    ``Attention(dim, num_heads, mode)`` builds the registered class of ``mode``
    (:data:`ATTENTION_LAYERS`); the mode classes may also be built directly (``mode`` omitted).

    Args:
        dim: token width.
        num_heads: heads (``dim`` must be divisible by it).
        mode: one of :data:`MODES` (default ``"qkv"``); a mode class, by default, its own.
        qkv_bias: bias in the q/k/v projection.
        attn_drop: dropout on the attention probabilities (training only).
        proj_drop: dropout after the output projection.
        pos_dim: channels of the KV-pos encoding (``kv_pos`` only).
        grid_size: the (h, w) token grid the model is built for; sizes the relative-position
            table (``kv_relpos``, where it is required) and is the default ``grid``.

    Parameters: one fused input projection named after the projections it holds (``qkv``
    Linear(dim, 3·dim); ``kv`` Linear(dim, 2·dim) in ``kv``, ``kv_pos``, ``kv_relpos``; ``qk``
    Linear(dim, 2·dim) in ``shared_kv`` and ``shared_qv``; ``k`` Linear(dim, dim) in
    ``single``), ``proj`` Linear(dim, dim), ``pos.map_pos`` Linear(pos_dim, 1) in ``kv_pos``,
    ``rel_pos.table`` (heads, 2h − 1, 2w − 1) in ``kv_relpos``. Scale 1/sqrt(head_dim).

    ``forward(x, return_attention=False, grid=None, attn_bias=None)``: ``grid`` is the actual
    (h, w) of the tokens (row-major; default ``grid_size``; only ``kv_relpos`` uses it);
    ``attn_bias`` an additive logit bias broadcastable to (B, heads, N, N) that the caller
    supplies (a patched Swin window: relative-position bias plus shift mask). With
    ``return_attention=True`` it returns ``(out, attention)``, the post-softmax probabilities
    (B, heads, N, N).
    """

    spec: ClassVar[ModeSpec]

    def __new__(cls, *args, **kwargs):
        if cls is Attention:  # the public entry point: the class registered for the mode
            mode = args[2] if len(args) > 2 else kwargs.get("mode", "qkv")
            cls = attention_layer(mode)
        return super().__new__(cls)

    def __init__(self, dim: int, num_heads: int, mode: str | None = None, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, pos_dim: int = 50,
                 grid_size: tuple[int, int] | None = None) -> None:
        super().__init__()
        if mode is not None and mode != self.spec.name:
            raise ConfigError(f"mode={mode!r}: {type(self).__name__} is {self.spec.name!r}")
        check_heads(dim, num_heads)
        if self.spec.rel_pos and grid_size is None:
            raise ConfigError(f"mode={self.spec.name!r} needs grid_size=(h, w): the token grid "
                              "that sizes its relative-position table")
        self.mode, self.num_heads, self.head_dim = self.spec.name, num_heads, dim // num_heads
        self.grid_size = None if grid_size is None else tuple(int(s) for s in grid_size)
        self.build_projection(dim, qkv_bias)
        self.pos = KVPosBias(pos_dim) if self.spec.key_bias else None
        self.rel_pos = RelPosBias(num_heads, self.grid_size) if self.spec.rel_pos else None
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
    def forward(self, x: torch.Tensor, return_attention: Literal[False] = False,
                grid: tuple[int, int] | None = None,
                attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        ...

    @overload
    def forward(self, x: torch.Tensor, return_attention: Literal[True],
                grid: tuple[int, int] | None = None,
                attn_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        ...

    def forward(self, x: torch.Tensor, return_attention: bool = False,
                grid: tuple[int, int] | None = None, attn_bias: torch.Tensor | None = None):
        q, k, v = self.project(x)
        grid = grid if grid is not None else self.grid_size
        if self.rel_pos is not None and grid[0] * grid[1] != x.shape[1]:
            raise ConfigError(f"grid={tuple(grid)}: {x.shape[1]} tokens are not a "
                              f"{grid[0]}×{grid[1]} grid")
        terms = position_terms(self.pos, self.rel_pos, k.shape[-2], grid)
        if attn_bias is not None:  # a caller's additive bias (Swin's window bias and mask)
            terms["attn_bias"] = attn_bias + terms.get("attn_bias", 0)
        out, attn = attend(self.core, q, k, v, return_attention, **terms)
        out = self.proj_drop(self.proj(out))  # (B, N, dim)
        return (out, attn) if return_attention else out


class QKVAttention(Attention):
    """``qkv``: the standard Transformer, one fused Linear(dim, 3·dim) for q, k and v."""

    spec = ModeSpec("qkv", "QKV", notation="QKV")

    def build_projection(self, dim: int, qkv_bias: bool) -> None:
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self._split(self.qkv(x), 3)
        return q, k, v


class KVAttention(Attention):
    """``kv``: Borji's Key-Value Transformer, Linear(dim, 2·dim) for k and v; k is the query."""

    spec = ModeSpec("kv", "KV", query="k", notation="Q=K−V")

    def build_projection(self, dim: int, qkv_bias: bool) -> None:
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k, v = self._split(self.kv(x), 2)
        return k, k, v  # the keys serve as queries


class KVPosAttention(KVAttention):
    """``kv_pos``: KV plus the factored KV-pos bias (``pos``, a :class:`KVPosBias`)."""

    spec = ModeSpec("kv_pos", "KV-pos", query="k", key_bias=True, notation="(Q=K−V)⁺")


class SharedKVAttention(Attention):
    """``shared_kv``: Linear(dim, 2·dim) for q and k; the keys are also the values."""

    spec = ModeSpec("shared_kv", "Q−K=V", value="k", notation="Q−K=V")

    def build_projection(self, dim: int, qkv_bias: bool) -> None:
        self.qk = nn.Linear(dim, 2 * dim, bias=qkv_bias)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k = self._split(self.qk(x), 2)
        return q, k, k  # V = K


class SharedQVAttention(SharedKVAttention):
    """``shared_qv``: Linear(dim, 2·dim) for q and k; the queries are also the values."""

    spec = ModeSpec("shared_qv", "Q=V−K", value="q", notation="Q=V−K")

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k = self._split(self.qk(x), 2)
        return q, k, q  # V = Q


class SingleAttention(Attention):
    """``single``: one Linear(dim, dim); k serves as queries, keys and values."""

    spec = ModeSpec("single", "Q=K=V", query="k", value="k", notation="Q=K=V")

    def build_projection(self, dim: int, qkv_bias: bool) -> None:
        self.k = nn.Linear(dim, dim, bias=qkv_bias)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k = self._split(self.k(x), 1)[0]
        return k, k, k


class KVRelPosAttention(KVAttention):
    """``kv_relpos``: KV plus a learned 2D relative-position bias per head (``rel_pos``)."""

    spec = ModeSpec("kv_relpos", "KV-relpos", query="k", rel_pos=True,
                    notation="Q=K−V + B[Δ]")


#: The mode registry, the paper's three first: name -> the token attention class of that mode.
ATTENTION_LAYERS: dict[str, type[Attention]] = {
    cls.spec.name: cls for cls in (QKVAttention, KVAttention, KVPosAttention, SharedKVAttention,
                                   SharedQVAttention, SingleAttention, KVRelPosAttention)}
#: Every mode name: ``("qkv", "kv", "kv_pos", "shared_kv", "shared_qv", "single",
#: "kv_relpos")``.
MODES: tuple[str, ...] = tuple(ATTENTION_LAYERS)
#: The three modes of Hwa et al.'s study (Borji's QKV, KV, KV-pos): the default selection of
#: ``kvseg reproduce`` and ``kvseg sweep``.
PAPER_MODES: tuple[str, ...] = ("qkv", "kv", "kv_pos")
#: Display names by mode: ``{"qkv": "QKV", "kv": "KV", "kv_pos": "KV-pos", ...}``.
MODE_LABELS: dict[str, str] = {name: cls.spec.label for name, cls in ATTENTION_LAYERS.items()}


def attention_layer(mode: str) -> type[Attention]:
    """The token attention class of ``mode``; :class:`ConfigError` naming it if unknown."""
    try:
        return ATTENTION_LAYERS[mode]
    except (KeyError, TypeError):
        raise ConfigError(f"mode={mode!r}: expected one of {', '.join(ATTENTION_LAYERS)}") \
            from None


def mode_spec(mode: str) -> ModeSpec:
    """The :class:`ModeSpec` of ``mode`` (:class:`ConfigError` if unknown)."""
    return attention_layer(mode).spec


def mode_label(mode: str) -> str:
    """The display name of ``mode``: ``QKV``, ``KV``, ``KV-pos``, ``Q−K=V`` ..."""
    return mode_spec(mode).label


def mode_suffix(mode: str) -> str:
    """The model-name suffix of ``mode``: ``qkv``, ``kv``, ``kvpos``, ``sharedkv`` ..."""
    return mode_spec(mode).suffix


def resolve_modes(modes: list[str] | tuple[str, ...] | str | None) -> tuple[str, ...]:
    """A mode selection: None -> :data:`PAPER_MODES`; ``"all"`` (alone) -> :data:`MODES`;
    otherwise the names, validated (:class:`ConfigError` naming an unknown one), in
    :data:`MODES` order without repeats."""
    if modes is None:
        return PAPER_MODES
    modes = [modes] if isinstance(modes, str) else list(modes)
    if modes == ["all"]:
        return MODES
    for m in modes:
        if m == "all":
            raise ConfigError("modes: 'all' cannot be combined with mode names")
        attention_layer(m)
    return tuple(m for m in MODES if m in modes)


__all__ = ["ATTENTION_LAYERS", "HEAD_DIM_MULTIPLE", "MODES", "MODE_LABELS", "PAPER_MODES",
           "Attention", "AttentionCore", "KVAttention", "KVPosAttention", "KVPosBias",
           "KVRelPosAttention", "ModeSpec", "QKVAttention", "RelPosBias", "SharedKVAttention",
           "SharedQVAttention", "SingleAttention", "attend", "attention_layer", "check_heads",
           "mode_label", "mode_spec", "mode_suffix", "position_terms", "resolve_modes",
           "sinusoidal_2d"]
