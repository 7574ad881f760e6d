"""Initialise a model's encoder from a weights file in an official layout (or a kvseg file).

``load_pretrained(model, source, layout=None, rule="sym")``. ``source`` is a local file or a
named source (``"imagenet"``: :mod:`kvseg.models.hub`, the file each base preset is normally
started from; downloaded only then, checked against its checksum). The layout is detected from
the keys, or named:

=====================  ===================================================  ==================
layout                 file                                                 families
=====================  ===================================================  ==================
``timm_vit``           timm ViT state dict (.pth/.bin/.safetensors):         setr
                       ``blocks.N.attn.qkv``, ``pos_embed`` with class row
``google_vit``         Google's ``ViT-B_16.npz`` (``Transformer/...``)       setr
``transunet_r50_vit``  TransUNet's ``R50+ViT-B_16.npz`` (ViT + ``conv_root``,  setr_conv
                       ``block{b}/unit{u}``)
``microsoft_cvt``      Microsoft's ``CvT-13/21-*.pth`` (``stage{i}.…``)      setr_cvt
``kvseg``              a kvseg checkpoint (``best.safetensors``, ``last.ckpt``) any
=====================  ===================================================  ==================

Official layouts go through the family's pure converter (:mod:`kvseg.models.convert_vit`,
:mod:`kvseg.models.convert_cvt`): every tensor of the file is consumed or dropped with a reason
(the class token and the classifier always), the position table is resampled to the model's
grid (bicubic, as timm), the stem adapted to ``in_channels`` (as timm's ``adapt_input_conv``),
and in KV / KV-pos models the query projection is folded into the keys by ``rule``
(:mod:`kvseg.models.kv_rules`). The encoder is then loaded strictly: a tensor of the wrong shape
or an encoder tensor without a source is an error naming the file; the decoder and head keep
their fresh initialisation (reported). A ``kvseg`` file is matched by name and shape instead
(another class or channel count loads everything else), with the rest reported.

Every problem with the file is a :class:`~kvseg.errors.CheckpointError` of one line naming it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from kvseg.errors import CheckpointError, ConfigError
from kvseg.models import convert_cvt, convert_vit
from kvseg.models.convert_common import (  # noqa: F401 - their old home: kept importable
    Converted,
    SourceTensors,
    adapt_input_conv,
)
from kvseg.models.hub import is_named, resolve
from kvseg.models.kv_rules import DEFAULT_RULE, RULES

log = logging.getLogger(__name__)

LAYOUTS = ("timm_vit", "google_vit", "transunet_r50_vit", "microsoft_cvt", "kvseg")


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did.

    Attributes:
        source: the file read.
        layout: its layout (:data:`LAYOUTS`).
        loaded: model tensors copied verbatim from the file.
        converted: model tensors computed from the file (transposed, split, resampled, adapted,
            folded by a KV rule).
        skipped: file tensor -> why it was not used (class token, classifier, ...).
        missing: model tensor -> why it keeps its initialisation (decoder, head, KV-relpos
            table).
        kv: per attention layer of a KV / KV-pos model: ``{"layer", "rule", "logit_error",
            "asymmetry"}`` (:func:`kvseg.models.kv_rules.logit_error` of the row-centred logits
            on sample tokens, and its floor).
    """

    source: str = ""
    layout: str = ""
    loaded: list[str] = field(default_factory=list)
    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    kv: list[dict] = field(default_factory=list)

    def summary(self) -> str:
        """One line: counts, the reasons, and the KV rule's mean logit error if any."""
        def reasons(d: dict[str, str]) -> str:
            groups: dict[str, int] = {}
            for why in d.values():
                groups[why] = groups.get(why, 0) + 1
            return "; ".join(f"{n} {why}" for why, n in groups.items())

        text = (f"{self.layout} {self.source}: {len(self.loaded)} tensors loaded, "
                f"{len(self.converted)} converted, {len(self.skipped)} skipped"
                + (f" ({reasons(self.skipped)})" if self.skipped else "")
                + f", {len(self.missing)} kept their initialisation"
                + (f" ({reasons(self.missing)})" if self.missing else ""))
        if self.kv:
            err = sum(r["logit_error"] for r in self.kv) / len(self.kv)
            floor = sum(r["asymmetry"] for r in self.kv) / len(self.kv)
            text += (f"; KV rule {self.kv[0]['rule']!r}: row-centred logit error {err:.3f} on "
                     f"sample tokens (floor {floor:.3f}), mean of {len(self.kv)} layers")
        return text


# --------------------------------------------------------------------------- reading
def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a weights file by name: ``.npz`` (``np.load(allow_pickle=False)``),
    ``.safetensors``, or a ``torch.save`` file (``weights_only=True``) holding a state dict or
    a dict with one under ``model``, ``state_dict`` or ``model_state_dict``; a ``module.``
    prefix (DDP) is stripped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: pretrained weights file not found")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                state = {k: torch.from_numpy(np.array(npz[k])) for k in npz.files}
        elif path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or foreign file: one line naming it
        first = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"{path}: not a readable weights file "
                              f"({type(e).__name__}: {first})") from None
    if isinstance(state, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state or not all(
            isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def detect_layout(tensors: dict[str, torch.Tensor]) -> str:
    """The layout of a file's tensors (:data:`LAYOUTS`), from its key names."""
    keys = set(tensors)
    if any(k.startswith("Transformer/encoderblock_") for k in keys):
        return "transunet_r50_vit" if "conv_root/kernel" in keys else "google_vit"
    if any(k.startswith("stage0.patch_embed.") for k in keys):
        return "microsoft_cvt"
    if "pos_embed" in keys and any(k.startswith("blocks.0.attn.") for k in keys):
        return "timm_vit"
    return "kvseg"


def model_family(model: nn.Module) -> str:
    """``setr``, ``setr_conv`` or ``setr_cvt`` from the model's encoder class."""
    name = type(getattr(model, "encoder", None)).__name__
    families = {"ViTEncoder": "setr", "HybridEncoder": "setr_conv", "CvTEncoder": "setr_cvt"}
    if name not in families:
        raise ConfigError(f"{type(model).__name__}: not a kvseg model (encoder {name})")
    return families[name]


def _converter(family: str, layout: str):
    table = {("setr", "timm_vit"): convert_vit.setr_from_timm,
             ("setr", "google_vit"): convert_vit.setr_from_google,
             ("setr_conv", "transunet_r50_vit"): convert_vit.hybrid_from_transunet,
             ("setr_cvt", "microsoft_cvt"): convert_cvt.cvt_from_microsoft}
    if (family, layout) not in table:
        fits = [lay for fam, lay in table if fam == family] + ["kvseg"]
        raise CheckpointError(f"a {layout} file cannot initialise a {family} model (it takes "
                              f"{', '.join(fits)})")
    return table[(family, layout)]


# --------------------------------------------------------------------------- loading
def load_pretrained(model: nn.Module, source: str | os.PathLike, *, layout: str | None = None,
                    rule: str = DEFAULT_RULE, strict: bool = False,
                    download: bool = True) -> LoadReport:
    """Initialise ``model`` in place from ``source``; return a :class:`LoadReport`.

    Args:
        model: a kvseg model (any family and mode).
        source: a weights file, or a named source (``"imagenet"``, :mod:`kvseg.models.hub`).
        layout: one of :data:`LAYOUTS`; None detects it from the keys.
        rule: QKV -> KV rule for KV / KV-pos models (:data:`kvseg.models.kv_rules.RULES`).
        strict: ``kvseg`` layout only: every model tensor must be loaded with its shape.
        download: a named source not in the cache may be downloaded.

    Raises :class:`CheckpointError` (one line naming the file) for an unreadable, foreign,
    incomplete or ill-fitting file, :class:`ConfigError` for an unknown layout or rule.
    """
    if layout is not None and layout not in LAYOUTS:
        raise ConfigError(f"pretrained_layout={layout!r}: expected one of {', '.join(LAYOUTS)}")
    if rule not in RULES:
        raise ConfigError(f"pretrained_rule={rule!r}: expected one of {', '.join(RULES)}")
    family = model_family(model)
    path = Path(source)
    if is_named(str(source)):
        path = resolve(str(source), family, getattr(model, "size", None), download=download)
    tensors = read_tensors(path)
    layout = layout or detect_layout(tensors)
    try:
        if layout == "kvseg":
            report = _load_by_name(model, tensors, strict, describe_file(path, tensors))
        else:
            _check_convertible(model, layout)
            converted = _converter(family, layout)(SourceTensors(tensors, layout), model, rule)
            report = _load_converted(model, converted)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    report.source, report.layout = str(path), layout
    log.debug("pretrained %s", report.summary())
    return report


#: Attention modes an official QKV file converts to (the other sharing modes have no rule).
CONVERTIBLE_MODES = ("qkv", "kv", "kv_pos", "kv_relpos")


def _check_convertible(model: nn.Module, layout: str) -> None:
    """:class:`ConfigError` unless the model's attention mode has a QKV -> mode rule."""
    modes = {m.mode for m in model.modules() if hasattr(m, "spec") and hasattr(m, "mode")}
    for mode in sorted(modes - set(CONVERTIBLE_MODES)):
        raise ConfigError(f"pretrained {layout} weights: no QKV -> {mode} conversion (modes "
                          f"with one: {', '.join(CONVERTIBLE_MODES)}; a kvseg checkpoint of "
                          "the same mode loads by name)")


def _load_converted(model: nn.Module, conv: Converted) -> LoadReport:
    """Strict load of the encoder from ``conv``; decoder/head (and ``conv.fresh``) stay."""
    own = model.state_dict()
    for key, value in conv.state.items():
        if key not in own:
            raise CheckpointError(f"converted tensor {key} has no place in the model (a kvseg "
                                  "converter bug)")
        if own[key].shape != value.shape:
            raise CheckpointError(f"{key}: the file gives shape {tuple(value.shape)}, the model "
                                  f"has {tuple(own[key].shape)}; pick the size/overrides of the "
                                  "file's network")
    missing = dict(conv.fresh)
    for key in own:
        if key in conv.state or key in missing:
            continue
        if not key.startswith("encoder."):
            missing[key] = "decoder/head: trained from scratch"
        elif key.endswith("num_batches_tracked"):
            missing[key] = "BatchNorm step counter"
        else:
            raise CheckpointError(f"model tensor {key} {tuple(own[key].shape)} has no source in "
                                  "the file")
    full = {k: conv.state.get(k, own[k]).to(own[k].dtype) for k in own}
    model.load_state_dict(full, strict=True)
    return LoadReport(loaded=sorted(set(conv.state) - conv.computed),
                      converted=sorted(conv.computed), skipped=dict(conv.dropped),
                      missing=missing, kv=list(conv.kv))


#: A kvseg-layout file must supply at least this share of the model's encoder weights (by
#: element count) by name and shape; below it, the file is for another network and loading it
#: would silently train from scratch. Another class count, channel count, image size or a
#: KV <-> KV-pos/QKV checkpoint of the same family and size stays well above it (a QKV file
#: into a KV model: about 80 %); another family or size is near 0 %.
MIN_ENCODER_SHARE = 0.5


def describe_file(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> str:
    """What a weights file looks like, for error messages: its kvseg model (from the config a
    ``best.safetensors`` embeds), else the family and mode guessed from the key names."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                config = json.loads((f.metadata() or {}).get("config", "null"))
            if isinstance(config, dict) and "model" in config:
                return (f"a kvseg {config['model']} model (size {config.get('size', '?')}, "
                        f"img_size {config.get('img_size', '?')}): load it into that model")
        except Exception:  # no or unreadable metadata: fall back to the key names
            pass
    keys = set(tensors)
    family = next((fam for prefix, fam in (("encoder.stages.", "setr_cvt"),
                                           ("encoder.cnn.", "setr_conv"),
                                           ("encoder.blocks.", "setr"))
                   if any(k.startswith(prefix) for k in keys)), None)
    if family is None:
        first = sorted(keys)[:2]
        return (f"not a kvseg checkpoint nor an official layout (first keys: {', '.join(first)}; "
                f"layouts: {', '.join(LAYOUTS)})")
    mode = ("kv_pos" if any(".map_pos." in k for k in keys)
            else "kv_relpos" if any(k.endswith("rel_pos.table") for k in keys)
            else "qkv" if any(k.endswith(("attn.qkv.weight", "proj_q.weight")) for k in keys)
            else "kv" if any(k.endswith(("attn.kv.weight", "proj_k.weight")) for k in keys)
            else "another sharing mode")
    return f"a kvseg {family} checkpoint ({mode}): load it into a {family} model"


def fit_problems(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str:
    """Why ``state`` does not fit a model whose state dict is ``own``, in one line: the first
    tensor of another shape (both shapes), then the counts of each kind of misfit."""
    shape = sorted(k for k in state if k in own and own[k].shape != state[k].shape)
    missing = sorted(k for k in own if k not in state)
    extra = sorted(k for k in state if k not in own)
    parts = []
    if shape:
        k = shape[0]
        parts.append(f"{len(shape)} tensor(s) of another shape (first: {k} "
                     f"{tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model)")
    if missing:
        parts.append(f"{len(missing)} model tensor(s) not in the file (first: {missing[0]})")
    if extra:
        parts.append(f"{len(extra)} file tensor(s) not in the model (first: {extra[0]})")
    return "; ".join(parts) or "the tensors fit"


def _load_by_name(model: nn.Module, state: dict[str, torch.Tensor], strict: bool,
                  looks_like: str = "") -> LoadReport:
    """kvseg layout: copy the tensors matching by name and shape; report the rest. A file that
    supplies less than :data:`MIN_ENCODER_SHARE` of the encoder is refused (another network);
    encoder tensors it leaves at their initialisation are a warning."""
    own = model.state_dict()
    report = LoadReport()
    to_load = {}
    for name, tensor in state.items():
        if name not in own:
            report.skipped[name] = "not in the model"
        elif own[name].shape != tensor.shape:
            report.skipped[name] = (f"shape {tuple(tensor.shape)} in the file, "
                                    f"{tuple(own[name].shape)} in the model")
        else:
            to_load[name] = tensor
    if not to_load:
        raise CheckpointError("no tensor matches the model by name and shape (a foreign file? "
                              f"layouts: {', '.join(LAYOUTS)}); it looks like {looks_like}")
    enc = [k for k in own if k.startswith("encoder.") and own[k].is_floating_point()]
    total = sum(own[k].numel() for k in enc) or 1
    share = sum(own[k].numel() for k in enc if k in to_load) / total
    name = getattr(model, "name", type(model).__name__)
    if share < MIN_ENCODER_SHARE:
        raise CheckpointError(
            f"does not fit {name}: it supplies {share:.0%} of the encoder's weights by name "
            f"and shape ({sum(k in to_load for k in enc)} of {len(enc)} tensors; "
            f"{fit_problems(own, state)}); it looks like {looks_like}")
    left = [k for k in enc if k not in to_load]
    if left:
        log.warning("pretrained file: %d of %d encoder tensors of %s keep their initialisation "
                    "(%s)", len(left), len(enc), name, fit_problems(
                        {k: own[k] for k in enc}, {k: v for k, v in state.items()
                                                   if k.startswith("encoder.")}))
    report.loaded = sorted(to_load)
    report.missing = {k: "not in the file" for k in own if k not in to_load}
    if strict and report.missing:
        raise CheckpointError(f"strict load failed: {report.summary()}")
    model.load_state_dict(to_load, strict=False)
    return report


__all__ = ["LAYOUTS", "Converted", "LoadReport", "SourceTensors", "adapt_input_conv",
           "describe_file", "detect_layout", "fit_problems", "load_pretrained", "model_family",
           "read_tensors"]
