"""Microsoft's CvT-13/21 ``.pth`` (``microsoft/CvT`` ``cls_cvt.py``) into kvseg's CvT encoder.

========================================================  =====================================
official                                                  kvseg (``encoder.stages.{i}.``…)
========================================================  =====================================
``stage{i}.patch_embed.proj``                             ``embed`` (stage 0 adapted to
                                                          ``in_channels``)
``stage{i}.patch_embed.norm``                             ``norm``
``stage{i}.blocks.{j}.norm1/norm2/mlp.fc1/fc2/attn.proj``  same names under ``blocks.{j}.``
``…attn.conv_proj_{q,k,v}.conv`` / ``.bn``                ``…attn.conv_proj_{q,k,v}.0`` / ``.1``
                                                          (BatchNorm with running statistics)
``…attn.proj_{q,k,v}``                                    ``…attn.proj_{q,k,v}``
``stage2.cls_token``, ``norm``, ``head``                  dropped: class token (none in kvseg),
                                                          its final norm, ImageNet classifier
========================================================  =====================================

KV / KV-pos models have no query branch: ``conv_proj_q`` is dropped and ``proj_k`` becomes
rule(``proj_q``, ``proj_k``) (:mod:`kvseg.models.kv_rules`, applied to the two Linear layers as
if both read the key branch's map); ``conv_proj_k`` loads unchanged (kvseg runs it at stride 1
and subsamples, which equals the official stride-2 key branch exactly). KV-pos's ``map_pos``
starts at temperature 1 with no per-key bias, so the converted KV-pos model starts as the
converted KV model.

The official scale is 1/sqrt(dim) (``attn_scale="dim"``, kvseg's default). A model built with
``attn_scale="head"`` gets the difference folded into its weights so that its logits equal the
official ones: ``proj_q`` × sqrt(head_dim/dim) (QKV), or the key projection ×
(head_dim/dim)^(1/4) (KV, where it is both query and key).
"""

from __future__ import annotations

import torch
from torch import nn

from kvseg.models.convert_common import Converted, SourceTensors, adapt_input_conv
from kvseg.models.convert_vit import CLASS_TOKEN, CLASSIFIER, FRESH_REL_POS, put_kv_start
from kvseg.models.kv_rules import asymmetry, convert_qk, logit_error, sample_tokens

_BN = ("weight", "bias", "running_mean", "running_var")
_COPY = ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight",
         "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias", "attn.proj.weight", "attn.proj.bias",
         "attn.proj_v.weight", "attn.proj_v.bias")


def _branch(src: SourceTensors, conv: Converted, f: str, o: str) -> None:
    """One dw_bn projection: ``{f}.conv`` / ``{f}.bn`` -> ``{o}.0`` / ``{o}.1``."""
    conv.put(f"{o}.0.weight", src.pop(f"{f}.conv.weight"))
    for name in _BN:
        conv.put(f"{o}.1.{name}", src.pop(f"{f}.bn.{name}"))
    if src.has(f"{f}.bn.num_batches_tracked"):
        conv.put(f"{o}.1.num_batches_tracked", src.pop(f"{f}.bn.num_batches_tracked"))


def _optional(src: SourceTensors, key: str) -> torch.Tensor | None:
    return src.pop(key) if src.has(key) else None


def _attention(src: SourceTensors, conv: Converted, attn: nn.Module, f: str, o: str,
               rule: str) -> None:
    """One block's attention, ``f`` / ``o`` the file's / the model's ``…attn`` prefix."""
    spec, heads = attn.spec, attn.num_heads
    dim = attn.proj.in_features
    fold = (dim // heads) / dim if attn.attn_scale == "head" else 1.0  # s_dim / s_head, squared
    _branch(src, conv, f"{f}.conv_proj_k", f"{o}.conv_proj_k")
    _branch(src, conv, f"{f}.conv_proj_v", f"{o}.conv_proj_v")
    wq, bq = src.pop(f"{f}.proj_q.weight"), _optional(src, f"{f}.proj_q.bias")
    wk, bk = src.pop(f"{f}.proj_k.weight"), _optional(src, f"{f}.proj_k.bias")
    if not spec.shared_query:
        _branch(src, conv, f"{f}.conv_proj_q", f"{o}.conv_proj_q")
        c = fold ** 0.5
        conv.put(f"{o}.proj_q.weight", wq * c, computed=c != 1)
        if bq is not None:
            conv.put(f"{o}.proj_q.bias", bq * c, computed=c != 1)
        conv.put(f"{o}.proj_k.weight", wk)
        if bk is not None:
            conv.put(f"{o}.proj_k.bias", bk)
        return
    src.drop(lambda k: k.startswith(f"{f}.conv_proj_q."),
             "query branch (conv_proj_q): no slot in KV mode")
    wk_new, bk_new = convert_qk(wq, bq, wk, bk, heads, rule)
    bn = conv.state[f"{o}.conv_proj_k.1.weight"], conv.state[f"{o}.conv_proj_k.1.bias"]
    x = sample_tokens(*bn, dim)
    conv.kv.append({"layer": o, "rule": rule,
                    "logit_error": logit_error(x, wq, bq, wk, bk, wk_new, bk_new, heads),
                    "asymmetry": asymmetry(x, wq, bq, wk, bk, heads)})
    c = fold ** 0.25
    conv.put(f"{o}.proj_k.weight", wk_new * c, computed=True)
    if bk_new is not None:
        conv.put(f"{o}.proj_k.bias", bk_new * c, computed=True)
    if spec.key_bias:
        put_kv_start(conv, f"{o}.pos.map_pos", attn.pos.pos_dim)
    if spec.rel_pos:
        conv.fresh[f"{o}.rel_pos.table"] = FRESH_REL_POS


def cvt_from_microsoft(src: SourceTensors, model: nn.Module, rule: str) -> Converted:
    """Microsoft's CvT state dict -> a kvseg CvT model's encoder tensors."""
    conv = Converted()
    for i, stage in enumerate(model.encoder.stages):
        f, o = f"stage{i}.", f"encoder.stages.{i}."
        w = src.pop(f + "patch_embed.proj.weight")
        stem = adapt_input_conv(w, model.in_channels) if i == 0 else w
        conv.put(o + "embed.weight", stem, computed=stem is not w)
        conv.put(o + "embed.bias", src.pop(f + "patch_embed.proj.bias"))
        conv.put(o + "norm.weight", src.pop(f + "patch_embed.norm.weight"))
        conv.put(o + "norm.bias", src.pop(f + "patch_embed.norm.bias"))
        for j, block in enumerate(stage.blocks):
            fb, ob = f"{f}blocks.{j}.", f"{o}blocks.{j}."
            for name in _COPY:
                conv.put(ob + name, src.pop(fb + name))
            _attention(src, conv, block.attn, fb + "attn", ob + "attn", rule)
        src.drop(f + "cls_token", CLASS_TOKEN)
    src.drop(lambda k: k.startswith("norm."), "final norm of the class token (classifier)")
    src.drop(lambda k: k.startswith("head."), CLASSIFIER)
    src.finish()
    conv.dropped = src.dropped
    return conv


__all__ = ["cvt_from_microsoft"]
