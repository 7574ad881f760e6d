"""Official ViT weights into kvseg's ViT encoders: SETR's, and the conv hybrid's (with its R50).

Three layouts, one path: Google's ``.npz`` keys are first renamed and transposed to timm's
names (:func:`google_to_timm`, pure), then one timm converter fills the encoder.

=============================================  =========================================
timm (Google ``.npz``)                         kvseg (``encoder.``…)
=============================================  =========================================
``patch_embed.proj`` (``embedding``, HWIO)     ``patch_embed.proj`` (SETR; stem adapted to
                                               ``in_channels``) / ``patch_embed`` (hybrid)
``pos_embed`` (``posembed_input``)             ``pos_embed.weight`` (1, D, gh, gw): class row
                                               dropped, bicubic to the model's grid
``cls_token`` (``cls``)                        dropped: no class token
``blocks.i.norm1/2`` (``LayerNorm_0/2``)       ``blocks.i.norm1/2``
``blocks.i.attn.qkv`` (``query/key/value``,    ``blocks.i.attn.qkv``; KV modes: ``attn.kv`` =
(D, heads, head_dim) kernels)                  [rule(W_q, W_k); W_v] (:mod:`.kv_rules`)
``blocks.i.attn.proj`` (``out``)               ``blocks.i.attn.proj``
``blocks.i.mlp.fc1/2`` (``Dense_0/1``)         ``blocks.i.mlp.fc1/2``
``norm`` (``encoder_norm``)                    ``norm`` (hybrid, as TransUNet); dropped for
                                               SETR: naive/PUP's last LayerNorm starts fresh
                                               and MLA's head normalises each level, as SETR
``head``, ``pre_logits``                       dropped: ImageNet classifier
=============================================  =========================================

TransUNet's R50 (``R50+ViT-B_16.npz``): ``conv_root/kernel`` -> ``cnn.root_conv`` (HWIO ->
OIHW, adapted to ``in_channels``), ``gn_root`` -> ``cnn.root_norm``,
``block{b}/unit{u}/conv{r}, gn{r}, conv_proj, gn_proj`` -> ``cnn.stages.{b-1}.{u-1}.conv{r},
norm{r}, proj_conv, proj_norm`` (GroupNorm ``scale`` -> ``weight``). The kernels stay raw: the
model's :class:`~kvseg.models.conv_hybrid.StdConv2d` standardises them at run time, as
TransUNet does.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kvseg.errors import CheckpointError
from kvseg.layers.attention import mode_spec
from kvseg.layers.position import KVPosBias
from kvseg.models.convert_common import Converted, SourceTensors, adapt_input_conv
from kvseg.models.kv_rules import asymmetry, convert_qk, logit_error, sample_tokens

CLASSIFIER = "ImageNet classifier"
CLASS_TOKEN = "class token (kvseg's encoders have none)"
#: SETR's backbone has no final norm (its loader drops timm's ``norm.*``); its naive/PUP head
#: (``VisionTransformerUpHead``) applies a LayerNorm of its own, freshly initialised, to the last
#: layer: kvseg's ``encoder.norm`` plays that part.
SETR_FINAL_NORM = "final norm (SETR's loader drops it; its naive/PUP head LayerNorm starts fresh)"
SETR_HEAD_NORM = "SETR naive/PUP head LayerNorm: starts fresh, as SETR's VisionTransformerUpHead"
FRESH_REL_POS = "relative-position table: no counterpart in a QKV file, starts at zero"


def google_to_timm(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename and transpose the ViT keys of a Google ``.npz`` to timm's layout (pure).

    Kernels (in, out) become Linear weights (out, in); the (D, heads, head_dim) query/key/value
    kernels are flattened and stacked into one ``qkv`` (3·D, D) with rows Q, K, V, head-major;
    ``out`` (heads, head_dim, D) becomes ``attn.proj``; HWIO conv kernels become OIHW. Keys
    that are not ViT keys (TransUNet's R50, unknown ones) are passed through unchanged.
    """
    rest = dict(tensors)
    out: dict[str, torch.Tensor] = {}

    def move(src: str, dst: str, fn=None) -> None:
        if src in rest:
            t = rest.pop(src)
            out[dst] = fn(t) if fn is not None else t

    move("embedding/kernel", "patch_embed.proj.weight", lambda t: t.permute(3, 2, 0, 1))
    move("embedding/bias", "patch_embed.proj.bias")
    move("cls", "cls_token")
    move("Transformer/posembed_input/pos_embedding", "pos_embed")
    move("Transformer/encoder_norm/scale", "norm.weight")
    move("Transformer/encoder_norm/bias", "norm.bias")
    move("head/kernel", "head.weight", lambda t: t.T)
    move("head/bias", "head.bias")
    move("pre_logits/kernel", "pre_logits.fc.weight", lambda t: t.T)
    move("pre_logits/bias", "pre_logits.fc.bias")
    i = 0
    while f"Transformer/encoderblock_{i}/LayerNorm_0/scale" in rest:
        g, b = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        att = g + "MultiHeadDotProductAttention_1/"
        for src, dst in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            move(f"{g}{src}/scale", f"{b}{dst}.weight")
            move(f"{g}{src}/bias", f"{b}{dst}.bias")
        kernels = [rest.pop(f"{att}{n}/kernel") for n in ("query", "key", "value")]
        out[b + "attn.qkv.weight"] = torch.cat([k.reshape(k.shape[0], -1).T for k in kernels])
        if f"{att}query/bias" in rest:
            out[b + "attn.qkv.bias"] = torch.cat(
                [rest.pop(f"{att}{n}/bias").reshape(-1) for n in ("query", "key", "value")])
        move(f"{att}out/kernel", b + "attn.proj.weight", lambda t: t.reshape(-1, t.shape[-1]).T)
        move(f"{att}out/bias", b + "attn.proj.bias")
        for src, dst in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
            move(f"{g}MlpBlock_3/{src}/kernel", f"{b}mlp.{dst}.weight", lambda t: t.T)
            move(f"{g}MlpBlock_3/{src}/bias", f"{b}mlp.{dst}.bias")
        i += 1
    out.update(rest)
    return out


def pos_table(pos: torch.Tensor, grid: tuple[int, int], has_cls: bool) -> torch.Tensor:
    """A (1, 1 + g², D) or (1, g², D) position table -> (1, D, gh, gw) for the model's grid.

    The class-token row is dropped; the g × g grid (row-major) is resampled bicubically to
    ``grid`` (antialiased when shrinking, as timm's ``resample_abs_pos_embed``); at the native
    grid the table is returned unchanged.
    """
    tokens = pos.reshape(-1, pos.shape[-1])  # (T, D)
    n = tokens.shape[0]
    if has_cls or (math.isqrt(n) ** 2 != n and math.isqrt(n - 1) ** 2 == n - 1):
        tokens, n = tokens[1:], n - 1
    g = math.isqrt(n)
    if g * g != n:
        raise CheckpointError(f"pos_embed {tuple(pos.shape)}: {n} grid tokens are not a square")
    table = tokens.T.reshape(1, -1, g, g)
    if (g, g) != tuple(grid):
        table = F.interpolate(table.float(), size=tuple(grid), mode="bicubic",
                              align_corners=False, antialias=True).to(pos.dtype)
    return table


@dataclass(frozen=True)
class ViTTarget:
    """What the converter needs to know of a kvseg ViT encoder (read from the model)."""

    mode: str
    depth: int
    num_heads: int
    grid: tuple[int, int]
    in_channels: int
    final_norm: bool
    load_final_norm: bool  # the file's ``norm`` goes into the model's (TransUNet) or not (SETR)
    patch_key: str  # "encoder.patch_embed.proj" (SETR) or "encoder.patch_embed" (hybrid)
    adapt_patch: bool  # the patch embedding is the stem (SETR): adapt it to in_channels
    rule: str
    pos_dim: int = 0  # KV-pos map_pos width (0: no KV-pos)


def vit_target(model: nn.Module, rule: str, *, hybrid: bool) -> ViTTarget:
    enc = model.encoder
    attn = enc.blocks[0].attn
    return ViTTarget(mode=attn.mode, depth=len(enc.blocks), num_heads=attn.num_heads,
                     grid=tuple(enc.pos_embed.weight.shape[-2:]), in_channels=model.in_channels,
                     final_norm=enc.norm is not None, load_final_norm=hybrid,
                     patch_key="encoder.patch_embed" if hybrid else "encoder.patch_embed.proj",
                     adapt_patch=not hybrid, rule=rule,
                     pos_dim=attn.pos.pos_dim if getattr(attn, "pos", None) is not None else 0)


def convert_vit_encoder(src: SourceTensors, tgt: ViTTarget, conv: Converted) -> None:
    """Consume the timm-named ViT tensors of ``src`` into ``conv`` (kvseg ``encoder.`` keys)."""
    w = src.pop("patch_embed.proj.weight")
    adapted = adapt_input_conv(w, tgt.in_channels) if tgt.adapt_patch else w
    conv.put(f"{tgt.patch_key}.weight", adapted, computed=adapted is not w)
    conv.put(f"{tgt.patch_key}.bias", src.pop("patch_embed.proj.bias"))
    has_cls = src.has("cls_token")
    src.drop("cls_token", CLASS_TOKEN)
    conv.put("encoder.pos_embed.weight", pos_table(src.pop("pos_embed"), tgt.grid, has_cls),
             computed=True)
    spec = mode_spec(tgt.mode)
    for i in range(tgt.depth):
        b, o = f"blocks.{i}.", f"encoder.blocks.{i}."
        for name in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
                     "attn.proj.weight", "attn.proj.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                     "mlp.fc2.weight", "mlp.fc2.bias"):
            conv.put(o + name, src.pop(b + name))
        w = src.pop(b + "attn.qkv.weight")
        bias = src.pop(b + "attn.qkv.bias") if src.has(b + "attn.qkv.bias") else None
        if not spec.shared_query:
            conv.put(o + "attn.qkv.weight", w)
            if bias is not None:
                conv.put(o + "attn.qkv.bias", bias)
            continue
        wq, wk, wv = w.chunk(3)
        bq, bk, bv = bias.chunk(3) if bias is not None else (None, None, None)
        wk_new, bk_new = convert_qk(wq, bq, wk, bk, tgt.num_heads, tgt.rule)
        conv.put(o + "attn.kv.weight", torch.cat([wk_new, wv]), computed=True)
        if bias is not None:
            conv.put(o + "attn.kv.bias", torch.cat([bk_new, bv]), computed=True)
        x = sample_tokens(conv.state[o + "norm1.weight"], conv.state[o + "norm1.bias"],
                          w.shape[1])
        conv.kv.append({"layer": o + "attn", "rule": tgt.rule,
                        "logit_error": logit_error(x, wq, bq, wk, bk, wk_new, bk_new,
                                                   tgt.num_heads),
                        "asymmetry": asymmetry(x, wq, bq, wk, bk, tgt.num_heads)})
        if spec.key_bias:
            put_kv_start(conv, f"{o}attn.pos.map_pos", tgt.pos_dim)
        if spec.rel_pos:
            conv.fresh[f"{o}attn.rel_pos.table"] = FRESH_REL_POS
    if tgt.final_norm and tgt.load_final_norm:
        conv.put("encoder.norm.weight", src.pop("norm.weight"))
        conv.put("encoder.norm.bias", src.pop("norm.bias"))
    elif tgt.final_norm:
        src.drop(lambda k: k.startswith("norm."), SETR_FINAL_NORM)
        for name in ("weight", "bias"):
            conv.fresh[f"encoder.norm.{name}"] = SETR_HEAD_NORM
    else:
        src.drop(lambda k: k.startswith("norm."),
                 "final norm (SETR-MLA normalises each level in its head, fresh, as SETR)")
    src.drop(lambda k: k.startswith(("head.", "pre_logits.")), CLASSIFIER)


def put_kv_start(conv: Converted, prefix: str, pos_dim: int) -> None:
    """A converted KV-pos layer's ``map_pos`` (no counterpart in a QKV file): temperature 1 and
    no per-key bias (:meth:`~kvseg.layers.position.KVPosBias.kv_start`), so the layer starts
    as the converted KV layer instead of at a random temperature Σw (about half of them
    negative at PyTorch's default init: inverted attention)."""
    weight, bias = KVPosBias.kv_start(pos_dim)
    conv.put(f"{prefix}.weight", weight, computed=True)
    conv.put(f"{prefix}.bias", bias, computed=True)


def setr_from_timm(src: SourceTensors, model: nn.Module, rule: str) -> Converted:
    """A timm ViT state dict -> a SETR model's encoder tensors."""
    conv = Converted()
    convert_vit_encoder(src, vit_target(model, rule, hybrid=False), conv)
    src.finish()
    conv.dropped = src.dropped
    return conv


#: Model tensors that a Google ``.npz`` gives only transposed or reshaped (kernels (in, out),
#: HWIO convs, (D, heads, head_dim) attention kernels stacked into ``qkv``, per-head biases):
#: reported as converted, not as loaded verbatim.
_GOOGLE_RESHAPED = re.compile(r"encoder\.(patch_embed(\.proj)?\.weight|blocks\.\d+\.("
                              r"attn\.(qkv|proj)\.weight|attn\.qkv\.bias|mlp\.fc[12]\.weight))$")


def _mark_google_reshaped(conv: Converted) -> Converted:
    conv.computed.update(k for k in conv.state if _GOOGLE_RESHAPED.match(k))
    return conv


def setr_from_google(src: SourceTensors, model: nn.Module, rule: str) -> Converted:
    """Google's ViT ``.npz`` -> a SETR model's encoder tensors (via timm's names)."""
    src.tensors = google_to_timm(src.tensors)
    return _mark_google_reshaped(setr_from_timm(src, model, rule))


def _hwio(t: torch.Tensor) -> torch.Tensor:
    return t.permute(3, 2, 0, 1)


def convert_r50(src: SourceTensors, model: nn.Module, conv: Converted) -> None:
    """Consume TransUNet's R50 tensors into ``encoder.cnn`` (GroupNorm models; a BatchNorm
    CNN keeps its initialisation and the R50 tensors are dropped with the reason)."""
    cnn = model.encoder.cnn
    if not isinstance(cnn.root_norm, nn.GroupNorm):
        why = "R50 with GroupNorm: the model's CNN uses BatchNorm (norm='bn')"
        src.drop(lambda k: k.startswith(("conv_root/", "gn_root/"))
                 or re.match(r"block\d+/unit\d+/", k) is not None, why)
        for key in model.state_dict():
            if key.startswith("encoder.cnn."):
                conv.fresh[key] = "norm='bn' CNN: no counterpart in a GroupNorm R50 file"
        return
    root = adapt_input_conv(_hwio(src.pop("conv_root/kernel")), model.in_channels)
    conv.put("encoder.cnn.root_conv.weight", root, computed=True)
    conv.put("encoder.cnn.root_norm.weight", src.pop("gn_root/scale").reshape(-1))
    conv.put("encoder.cnn.root_norm.bias", src.pop("gn_root/bias").reshape(-1))
    for b, stage in enumerate(cnn.stages):
        for u, unit in enumerate(stage):
            f, o = f"block{b + 1}/unit{u + 1}/", f"encoder.cnn.stages.{b}.{u}."
            pairs = [(f"conv{r}", f"gn{r}", f"conv{r}", f"norm{r}") for r in (1, 2, 3)]
            if unit.proj_conv is not None:
                pairs.append(("conv_proj", "gn_proj", "proj_conv", "proj_norm"))
            for conv_in, gn_in, conv_out, norm_out in pairs:
                conv.put(f"{o}{conv_out}.weight", _hwio(src.pop(f"{f}{conv_in}/kernel")),
                         computed=True)
                conv.put(f"{o}{norm_out}.weight", src.pop(f"{f}{gn_in}/scale").reshape(-1))
                conv.put(f"{o}{norm_out}.bias", src.pop(f"{f}{gn_in}/bias").reshape(-1))


def hybrid_from_transunet(src: SourceTensors, model: nn.Module, rule: str) -> Converted:
    """TransUNet's ``R50+ViT-B_16.npz`` -> the conv hybrid's encoder tensors (R50 + ViT)."""
    src.tensors = google_to_timm(src.tensors)
    conv = Converted()
    convert_r50(src, model, conv)
    convert_vit_encoder(src, vit_target(model, rule, hybrid=True), conv)
    src.finish()
    conv.dropped = src.dropped
    return _mark_google_reshaped(conv)


__all__ = ["ViTTarget", "convert_r50", "convert_vit_encoder", "google_to_timm", "put_kv_start",
           "hybrid_from_transunet", "pos_table", "setr_from_google", "setr_from_timm",
           "vit_target"]
