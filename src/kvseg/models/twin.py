"""Paired initialisation: a query-free variant starts from its QKV twin's weights.

A KV model has no query projection, so built from the same seed as the QKV model of its family
it draws a shorter random stream and every later layer (the decoder too) starts elsewhere. The
paired comparison KV − QKV then carries the noise of two unrelated initialisations.
:func:`init_from_twin` removes it (common random numbers): every tensor of the model whose name
and shape the twin has is copied, and each fused attention projection takes its rows out of the
twin's ``qkv`` Linear (rows ``[q; k; v]``, each ``dim`` wide, head-major inside):

* ``kv`` (``kv``, ``kv_pos``, ``kv_relpos``): rows ``[k; v]``;
* ``qk`` (``shared_kv``, ``shared_qv``): rows ``[q; k]``;
* ``k`` (``single``): rows ``k``,

i.e. the rows of :attr:`~kvseg.layers.attention.ModeSpec.projections` in order. CvT's
convolutional attention keeps one branch per projection (``conv_proj_k`` + ``proj_k``, ...),
whose names already match: its K and V branches are copied by name (the K branch's stride is no
parameter). What the twin lacks keeps the model's own initialisation: KV-pos's ``pos.map_pos``,
KV-relpos's ``rel_pos.table``.

This is a plain copy, not :mod:`kvseg.models.kv_rules` (those keep a trained layer's attention;
here the weights are random and only the draw is shared).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from kvseg.errors import ConfigError
from kvseg.layers.attention import Attention, mode_suffix
from kvseg.models.registry import model_info

#: The rows of each projection in the twin's fused ``qkv`` Linear, in units of ``dim``.
_ROWS = {"q": 0, "k": 1, "v": 2}


@dataclass
class TwinReport:
    """What :func:`init_from_twin` did: tensors copied by name, fused projections sliced out of
    the twin's ``qkv`` (both state-dict keys), and the model's tensors left as initialised."""

    twin: str
    copied: list[str] = field(default_factory=list)
    sliced: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)

    def summary(self) -> str:
        kept = f"; own init kept: {len(self.kept)}" if self.kept else ""
        return (f"paired init from {self.twin}: {len(self.copied) + len(self.sliced)} tensors "
                f"copied ({len(self.sliced)} sliced out of qkv){kept}")


def qkv_twin_name(name: str) -> str | None:
    """The QKV variant of ``name``'s family (``setr_conv_kvpos`` -> ``setr_conv_qkv``); None when
    ``name`` is itself QKV or has no attention (``dynunet``): nothing to pair."""
    info = model_info(name)
    if info["mode"] in ("qkv", "none"):
        return None
    return f"{info['family']}_{mode_suffix('qkv')}"


def _check_pair(model: nn.Module, twin: nn.Module) -> str:
    """The twin's name; :class:`ConfigError` unless it is the QKV twin of ``model``, built with
    the same preset configuration."""
    name, twin_name = getattr(model, "name", None), getattr(twin, "name", None)
    if name is None or twin_name is None:
        raise ConfigError("paired init: both models must come from create_model (no name)")
    expected = qkv_twin_name(name)
    if expected is None:
        raise ConfigError(f"paired init: {name} has no QKV twin (it is QKV or has no attention)")
    if twin_name != expected:
        raise ConfigError(f"paired init: {name} pairs with {expected}, not {twin_name}")
    if model.config != twin.config or model.size != twin.size:
        raise ConfigError(f"paired init: {twin_name} is not built as {name} (size or "
                          "configuration differs)")
    return twin_name


def _fused_rows(attn: Attention, qkv: nn.Linear) -> dict[str, torch.Tensor]:
    """The fused projection of ``attn`` (``kv``, ``qk``, ``k``) from the twin's ``qkv``: its
    weight (and bias) rows of the projections in ``spec.projections`` order."""
    dim = qkv.out_features // 3  # rows per projection (the inner width)
    fused = "".join(attn.spec.projections)

    def rows(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t[_ROWS[p] * dim:(_ROWS[p] + 1) * dim] for p in attn.spec.projections])

    out = {f"{fused}.weight": rows(qkv.weight)}
    if qkv.bias is not None:
        out[f"{fused}.bias"] = rows(qkv.bias)
    return out


def _twin_source(model: nn.Module, twin: nn.Module) -> tuple[dict, set]:
    """The twin's state plus, for every query-free token attention of ``model``, its fused
    projection cut out of the twin's ``qkv`` at the same path; the set of those cut keys."""
    source = dict(twin.state_dict())
    sliced = set()
    twin_modules = dict(twin.named_modules())
    for path, m in model.named_modules():
        if not isinstance(m, Attention) or m.spec.name == "qkv":
            continue
        other = twin_modules.get(path)
        qkv = getattr(other, "qkv", None)
        if not isinstance(other, Attention) or not isinstance(qkv, nn.Linear):
            raise ConfigError(f"paired init: {path} has no QKV attention in the twin")
        for key, value in _fused_rows(m, qkv).items():
            source[f"{path}.{key}"] = value
            sliced.add(f"{path}.{key}")
    return source, sliced


@torch.no_grad()
def init_from_twin(model: nn.Module, twin: nn.Module) -> TwinReport:
    """Copy the QKV ``twin``'s initial weights into ``model`` (a query-free variant of the same
    family, size and configuration; both from :func:`kvseg.models.create_model`), in place.

    Every parameter and buffer of ``model`` that the twin has under the same name is copied,
    each fused attention projection from the twin's ``qkv`` rows (module docstring); the rest
    keeps its own initialisation. Raises :class:`ConfigError` when ``twin`` is not ``model``'s
    QKV twin or a shared name has another shape. Returns a :class:`TwinReport`.
    """
    report = TwinReport(_check_pair(model, twin))
    source, sliced = _twin_source(model, twin)
    for key, tensor in model.state_dict().items():
        value = source.get(key)
        if value is None:
            report.kept.append(key)
            continue
        if value.shape != tensor.shape:
            raise ConfigError(f"paired init: {key} is {tuple(tensor.shape)} in {model.name} but "
                              f"{tuple(value.shape)} in {report.twin}")
        tensor.copy_(value)
        (report.sliced if key in sliced else report.copied).append(key)
    return report


__all__ = ["TwinReport", "init_from_twin", "qkv_twin_name"]
