"""kvseg's attention inside third-party models: :func:`patch_attention`.

``patch_attention(model, mode, rule="sym")`` walks ``model`` and replaces, in place, every
self-attention module it knows with kvseg's :class:`~kvseg.layers.attention.Attention` of
``mode`` (any registered mode), wrapped so that the parent module calls it as before:

* MONAI's ``SABlock`` (UNETR, ViT, ...): fused ``qkv`` Linear (rows Q, K, V, head-major, as its
  ``Rearrange("b h (qkv l d) -> qkv b l h d")``) or separate ``to_q/to_k/to_v``; ``out_proj``
  becomes ``proj`` (``include_fc=False``: none); its ``dropout_rate`` drops the attention
  probabilities and the output in training only, as kvseg's; ``save_attn`` keeps ``att_mat``.
  Refused: ``causal``, ``rel_pos_embedding``, ``attention_dtype``, ``hidden_input_size`` or
  ``dim_head`` that make the inner width differ from the input width.
* MONAI's Swin ``WindowAttention`` (SwinUNETR): the relative-position bias table and index are
  kept (same parameter names) and, with the shifted-window mask of the call, enter the logits
  as one additive bias in every mode. In the query-free modes the keys serve as queries, so the
  content term K Kᵀ is symmetric while the bias B[Δ] is not: the attention stays pairwise
  asymmetric. ``kv_relpos`` is refused there (the window already has its relative bias).
* The timm convention (``timm.models.vision_transformer.Attention`` and alike): a fused
  ``qkv`` Linear(D, 3·D), an int ``num_heads``, a ``proj`` Linear(D, D); ``q_norm``/``k_norm``/
  ``norm`` must be absent or ``nn.Identity``, the ``scale`` 1/sqrt(head_dim), and the module
  may hold no other parameter (a relative-position table, say): otherwise it is refused.

Any other module whose class name contains ``Attention`` (``nn.MultiheadAttention``, a
cross-attention block, ...) is an error naming its type and path, and so is a model without
any attention module. Attention modules inside a replaced one are not visited, nor the
``cross_attn`` of a MONAI ``TransformerBlock`` with ``with_cross_attention=False`` (MONAI
before 1.6 builds one there and never calls it).

Weights. ``qkv`` copies Q, K, V (the patched model gives the original's outputs). The
query-free modes (``kv``, ``kv_pos``, ``kv_relpos``, ``single``) fold W_q into the key
projection by the QKV -> KV ``rule`` of :mod:`kvseg.models.kv_rules` (``sym`` default,
``key``, ``mean``); ``shared_kv``/``shared_qv`` copy Q and K (their values are the keys or
the queries). The dropped projection's parameters are gone: the count falls by exactly D·D
(+ D with a bias) per dropped projection and layer; ``kv_pos`` adds its ``map_pos``
Linear(pos_dim, 1) and ``kv_relpos`` its table, both fresh (as kvseg's pretrained loader).

Returns ``(model, report)``: the same model object and a :class:`PatchReport`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from kvseg.errors import ConfigError
from kvseg.layers.attention import Attention, mode_spec
from kvseg.models.kv_rules import DEFAULT_RULE, RULES, convert_qk


@dataclass
class PatchReport:
    """What :func:`patch_attention` replaced.

    Attributes:
        mode: the attention mode put in.
        rule: the QKV -> KV rule used for the query-free modes.
        replaced: original type name -> how many modules of it were replaced.
        modules: the dotted paths of the replaced modules, in model order.
        params_before: the model's parameters before.
        params_after: after.
        dropped: parameters of the projections that no longer exist (W_q in ``kv``).
        added: fresh parameters the mode brings (``kv_pos``'s map, ``kv_relpos``'s table).
        notes: what the conversion could not keep (fresh position terms).
    """

    mode: str
    rule: str
    replaced: dict[str, int] = field(default_factory=dict)
    modules: list[str] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    dropped: int = 0
    added: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: mode, what was replaced and the parameter change."""
        kinds = ", ".join(f"{n} {t}" for t, n in self.replaced.items())
        return (f"{self.mode} attention in {len(self.modules)} modules ({kinds}); params "
                f"{self.params_before:,} -> {self.params_after:,} "
                f"(-{self.dropped:,} projection, +{self.added:,} position)")


class TokenAttention(nn.Module):
    """A kvseg :class:`Attention` (``attn``) called as a ViT block calls its attention:
    ``forward(x, attn_mask=None)``, (B, N, D) -> (B, N, D).

    ``save_attn`` keeps the last post-softmax probabilities in ``att_mat`` (detached), as
    MONAI's ``SABlock``. A key-padding ``attn_mask`` is not supported (refused at call time).
    """

    def __init__(self, attn: Attention, save_attn: bool = False) -> None:
        super().__init__()
        self.attn, self.save_attn = attn, save_attn
        self.att_mat = torch.Tensor()

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attn_mask is not None:
            raise ConfigError("patched attention: attn_mask is not supported")
        if self.save_attn:
            out, probs = self.attn(x, return_attention=True)
            self.att_mat = probs.detach()
            return out
        return self.attn(x)


class WindowTokenAttention(nn.Module):
    """A kvseg :class:`Attention` (``attn``) as Swin's window attention: ``forward(x, mask)``
    on (B·windows, n, D) window tokens; the relative-position bias
    ``relative_position_bias_table[relative_position_index]`` (heads, n, n) plus the shifted
    windows' ``mask`` (windows, n, n; 0 or -100) are added to the logits."""

    def __init__(self, attn: Attention, table: nn.Parameter, index: torch.Tensor) -> None:
        super().__init__()
        self.attn = attn
        self.num_heads = attn.num_heads
        self.relative_position_bias_table = table
        self.register_buffer("relative_position_index", index.clone())

    def bias(self, n: int, batch: int, mask: torch.Tensor | None) -> torch.Tensor:
        """The additive logits bias: (heads, n, n), or (batch, heads, n, n) with a mask."""
        idx = self.relative_position_index[:n, :n].reshape(-1)
        bias = self.relative_position_bias_table[idx].view(n, n, -1).permute(2, 0, 1)
        if mask is None:
            return bias
        nw = mask.shape[0]
        full = bias.unsqueeze(0).unsqueeze(0) + mask.to(bias.dtype).view(1, nw, 1, n, n)
        return full.expand(batch // nw, nw, self.num_heads, n, n).reshape(
            batch, self.num_heads, n, n)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.attn(x, attn_bias=self.bias(x.shape[1], x.shape[0], mask))


@dataclass
class _Source:
    """An attention module's weights in kvseg's terms (read by a ``_read_*`` function)."""

    dim: int
    num_heads: int
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor | None
    proj: nn.Module  # the output Linear, or nn.Identity
    attn_drop: float
    proj_drop: float
    window: tuple[nn.Parameter, torch.Tensor] | None = None  # Swin: (table, index)
    save_attn: bool = False


def _drop_p(m) -> float:
    return float(m.p) if isinstance(m, nn.Dropout) else float(m or 0.0)


def _refuse(path: str, module: nn.Module, why: str) -> ConfigError:
    return ConfigError(f"patch_attention: {path or 'model'} ({type(module).__name__}): {why}")


def _read_sablock(path: str, m: nn.Module) -> _Source:
    """MONAI's SABlock."""
    for attr, bad in (("causal", bool(getattr(m, "causal", False))),
                      ("rel_pos_embedding", getattr(m, "rel_positional_embedding", None)
                       is not None),
                      ("attention_dtype", getattr(m, "attention_dtype", None) is not None)):
        if bad:
            raise _refuse(path, m, f"{attr} is not supported")
    if m.inner_dim != m.hidden_input_size:
        raise _refuse(path, m, f"inner width {m.inner_dim} != input width "
                      f"{m.hidden_input_size} (dim_head/hidden_input_size): not supported")
    if m.use_combined_linear:
        w, b = m.qkv.weight, m.qkv.bias
    else:
        lin = (m.to_q, m.to_k, m.to_v)
        w = torch.cat([t.weight for t in lin])
        b = None if lin[0].bias is None else torch.cat([t.bias for t in lin])
    return _Source(m.inner_dim, m.num_heads, w, b, m.out_proj if m.include_fc else nn.Identity(),
                   m.dropout_rate, m.dropout_rate, save_attn=bool(m.save_attn))


def _read_window(path: str, m: nn.Module) -> _Source:
    """MONAI's (Swin) WindowAttention."""
    src = _read_timm(path, m, allowed=("relative_position_bias_table",))
    src.window = (m.relative_position_bias_table, m.relative_position_index)
    return src


def _read_timm(path: str, m: nn.Module, allowed: tuple[str, ...] = ()) -> _Source:
    """A fused ``qkv`` / ``num_heads`` / ``proj`` module (timm's ViT attention and alike)."""
    dim = m.qkv.in_features
    if m.qkv.out_features != 3 * dim or m.proj.in_features != dim:
        raise _refuse(path, m, f"qkv {m.qkv.in_features}->{m.qkv.out_features}, proj "
                      f"{m.proj.in_features}->{m.proj.out_features}: expected D -> 3·D, D -> D")
    for name in ("q_norm", "k_norm", "norm"):
        sub = getattr(m, name, None)
        if sub is not None and not isinstance(sub, nn.Identity):
            raise _refuse(path, m, f"{name} ({type(sub).__name__}) is not supported")
    scale = getattr(m, "scale", None)
    head_dim = dim // m.num_heads
    if scale is not None and abs(float(scale) - head_dim ** -0.5) > 1e-6 * head_dim ** -0.5:
        raise _refuse(path, m, f"scale {float(scale):g} != 1/sqrt(head_dim): not supported")
    known = ("qkv.", "proj.", *allowed)
    other = [n for n, _ in m.named_parameters() if not n.startswith(known)]
    if other:
        raise _refuse(path, m, f"parameters {', '.join(other)} are not understood")
    return _Source(dim, m.num_heads, m.qkv.weight, m.qkv.bias, m.proj,
                   _drop_p(getattr(m, "attn_drop", 0.0)), _drop_p(getattr(m, "proj_drop", 0.0)))


def _reader(m: nn.Module):
    """The ``_read_*`` function for ``m``, or None if it is not a known attention module."""
    try:
        from monai.networks.blocks.selfattention import SABlock
        from monai.networks.nets.swin_unetr import WindowAttention
    except ImportError:  # pragma: no cover - monai is a dependency
        SABlock = WindowAttention = ()  # noqa: N806
    if SABlock and isinstance(m, SABlock):
        return _read_sablock
    if WindowAttention and isinstance(m, WindowAttention):
        return _read_window
    if (isinstance(getattr(m, "qkv", None), nn.Linear)
            and isinstance(getattr(m, "proj", None), nn.Linear)
            and isinstance(getattr(m, "num_heads", None), int)):
        return _read_timm
    return None


def _is_kvseg(m: nn.Module) -> bool:
    return isinstance(m, (Attention, TokenAttention, WindowTokenAttention))


def _find(model: nn.Module) -> list[tuple[str, nn.Module, object]]:
    """(path, module, reader) of every attention module, outermost first; errors for unknown
    ones (a class name with ``Attention`` that no reader knows)."""
    found: list[tuple[str, nn.Module, object]] = []

    def visit(path: str, m: nn.Module) -> None:
        if _is_kvseg(m):
            return
        reader = _reader(m)
        if reader is not None:
            found.append((path, m, reader))
            return
        if "attention" in type(m).__name__.lower():
            raise _refuse(path, m, "unknown attention module type (known: MONAI SABlock, "
                          "MONAI WindowAttention, the timm convention: fused qkv Linear, "
                          "num_heads, proj)")
        for name, child in m.named_children():
            if name == "cross_attn" and getattr(m, "with_cross_attention", None) is False:
                continue  # MONAI < 1.6 builds an unused CrossAttentionBlock: never called
            visit(f"{path}.{name}" if path else name, child)

    visit("", model)
    return found


def _fused_weights(src: _Source, mode: str, rule: str) -> tuple[torch.Tensor,
                                                                 torch.Tensor | None]:
    """The new fused projection (rows in ``spec.projections`` order) from Q, K, V."""
    spec = mode_spec(mode)
    wq, wk, wv = src.qkv_w.detach().chunk(3)
    bq, bk, bv = (None,) * 3 if src.qkv_b is None else src.qkv_b.detach().chunk(3)
    if spec.shared_query:
        wk, bk = convert_qk(wq, bq, wk, bk, src.num_heads, rule)
    parts = {"q": (wq, bq), "k": (wk, bk), "v": (wv, bv)}
    w = torch.cat([parts[p][0] for p in spec.projections])
    b = None if src.qkv_b is None else torch.cat([parts[p][1] for p in spec.projections])
    return w, b


def _build(src: _Source, mode: str, rule: str, pos_dim: int,
           grid_size: tuple[int, int] | None, path: str, m: nn.Module) -> nn.Module:
    """The replacement module of ``src`` in ``mode``, weights converted."""
    if src.window is not None and mode_spec(mode).rel_pos:
        raise _refuse(path, m, f"mode {mode!r}: a Swin window keeps its own relative-position "
                      "bias in every mode; use 'kv'")
    w0 = src.qkv_w
    attn = Attention(src.dim, src.num_heads, mode, qkv_bias=src.qkv_b is not None,
                     attn_drop=src.attn_drop, proj_drop=src.proj_drop, pos_dim=pos_dim,
                     grid_size=grid_size).to(device=w0.device, dtype=w0.dtype)
    fused = getattr(attn, "".join(attn.spec.projections))  # qkv, kv, qk or k
    if isinstance(src.proj, nn.Identity):
        attn.proj = nn.Identity()
    if not w0.is_meta:  # a model built on the meta device has no values to convert
        w, b = _fused_weights(src, mode, rule)
        with torch.no_grad():
            fused.weight.copy_(w)
            if b is not None:
                fused.bias.copy_(b)
            if isinstance(src.proj, nn.Linear):
                attn.proj.weight.copy_(src.proj.weight)
                attn.proj.bias.copy_(src.proj.bias)
    if src.window is not None:
        return WindowTokenAttention(attn, *src.window)
    return TokenAttention(attn, save_attn=src.save_attn)


def _set(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new)


def count_params(model: nn.Module) -> int:
    """Parameters, shared ones once."""
    return sum(p.numel() for p in model.parameters())


def patch_attention(model: nn.Module, mode: str, rule: str = DEFAULT_RULE, *,
                    pos_dim: int = 50,
                    grid_size: tuple[int, int] | None = None) -> tuple[nn.Module, PatchReport]:
    """Replace the self-attention modules of ``model`` in place with kvseg's in ``mode``.

    Args:
        model: any ``nn.Module`` (MONAI's UNETR, SwinUNETR, ViT; a timm-style ViT; ...).
        mode: a registered attention mode (:data:`kvseg.layers.attention.MODES`).
        rule: the QKV -> KV rule for the query-free modes (``sym``, ``key``, ``mean``).
        pos_dim: KV-pos's encoding channels (``kv_pos``).
        grid_size: the (h, w) token grid (``kv_relpos`` on token attention, where it sizes
            the relative-position table).

    Returns ``(model, report)``: the same object, patched, and a :class:`PatchReport`.
    Raises :class:`ConfigError` for an unknown mode or rule, an unknown or unsupported
    attention module (naming its type and path), or a model without attention modules.
    The module docstring says what is kept and converted.
    """
    mode_spec(mode)  # ConfigError for an unknown mode
    if rule not in RULES:
        raise ConfigError(f"rule={rule!r}: expected one of {', '.join(RULES)}")
    found = _find(model)
    if not found:
        what = ("already has kvseg attention only"
                if any(_is_kvseg(m) for m in model.modules()) else "has no attention module")
        raise ConfigError(f"patch_attention: {type(model).__name__} {what} (known: MONAI "
                          "SABlock, MONAI WindowAttention, the timm convention)")
    report = PatchReport(mode=mode, rule=rule, params_before=count_params(model))
    kinds: Counter[str] = Counter()
    for path, m, reader in found:
        src = reader(path, m)
        new = _build(src, mode, rule, pos_dim, grid_size, path, m)
        new.train(m.training)  # a fresh module trains; keep the replaced one's mode (dropout)
        old_params = count_params(m)
        _set(model, path, new)
        attn = new.attn
        fresh = sum(p.numel() for mod in (attn.pos, attn.rel_pos) if mod is not None
                    for p in mod.parameters())
        report.added += fresh
        report.dropped += old_params - (count_params(new) - fresh)
        kinds[type(m).__name__] += 1
        report.modules.append(path)
    report.replaced = dict(kinds)
    report.params_after = count_params(model)
    if mode_spec(mode).key_bias:
        report.notes.append("kv_pos map_pos: no counterpart in QKV, starts fresh")
    if mode_spec(mode).rel_pos:
        report.notes.append("kv_relpos table: no counterpart in QKV, starts at zero")
    if mode in ("shared_kv", "shared_qv"):
        report.notes.append(f"{mode}: Q and K copied; V dropped (the values are now "
                            f"{'K' if mode == 'shared_kv' else 'Q'})")
    return model, report


__all__ = ["PatchReport", "TokenAttention", "WindowTokenAttention", "patch_attention"]
