"""Parameter and MAC counts, and the tables ``kvseg models`` / ``kvseg profile`` print.

How MACs are counted (one counter for every model, :func:`count_macs`): one forward pass with
forward hooks; a multiply-accumulate counts 1 (CvT's and TransUNet's "GFLOPs" are MACs too;
``torch.utils.flop_counter`` reports FLOPs = 2 × MACs).

* ``nn.Linear``: tokens × in_features × out_features (bias adds not counted).
* ``nn.Conv{1,2,3}d``: output elements × (in_channels / groups) × kernel volume.
* ``nn.ConvTranspose{1,2,3}d``: input elements × (out_channels / groups) × kernel volume.
* Any module with a ``macs(args, output) -> int`` method reports its own functional products:
  :class:`kvseg.layers.AttentionCore` counts QKᵀ and AV (B·heads·Nq·Nk·(d + dv)), whatever
  kernel runs them (SDPA is invisible to module hooks and to FlopCounterMode on CPU);
  :class:`kvseg.layers.KVPosBias` counts the KV-pos key bias (Nk × column channels, once per
  forward, not per sample; the temperature Σw costs pos_dim adds and is not counted).
* Not counted: normalisation, activations, softmax, dropout, pooling, interpolation, padding,
  element-wise adds (residuals, position embeddings), bias adds.

Counts are for the whole input batch given; the tables use batch 1.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import sys

import torch
from torch import nn

from kvseg.models.registry import create_model, list_models, model_info

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not; BatchNorm running statistics are buffers and are
    not counted; shared parameters once)."""
    return sum(p.numel() for p in model.parameters())


def _module_macs(module: nn.Module, args: tuple, output) -> int:
    if isinstance(module, nn.Linear):
        return args[0].numel() // module.in_features * module.in_features * module.out_features
    if isinstance(module, _CONV):
        return (output.numel() * (module.in_channels // module.groups)
                * math.prod(module.kernel_size))
    if isinstance(module, _CONV_T):
        return (args[0].numel() * (module.out_channels // module.groups)
                * math.prod(module.kernel_size))
    return int(module.macs(args, output))


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass on a zero input of ``input_shape`` (B, C, H, W).

    See the module docstring for what is counted. The model runs once in eval mode under
    ``torch.no_grad()`` on its own device (a model built on the ``meta`` device counts without
    any arithmetic) and is put back in its previous mode.
    """
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None else torch.float32
    total = 0

    def hook(module, args, output):
        nonlocal total
        total += _module_macs(module, args, output)

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Linear, *_CONV, *_CONV_T)) or callable(getattr(m, "macs",
                                                                                   None))]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(input_shape, device=device, dtype=dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total


def build_on_meta(name: str, **kwargs) -> nn.Module:
    """``create_model`` on the meta device: shapes and counts without memory or arithmetic."""
    with torch.device("meta"):
        return create_model(name, **kwargs)


def _expand(models: list[str] | tuple[str, ...] | str) -> list[str]:
    models = [models] if isinstance(models, str) else list(models)
    names: list[str] = []
    for m in models:
        for n in (list_models() if m == "all" else [m]):
            model_info(n)  # ValueError for unknown names
            if n not in names:
                names.append(n)
    return names


def profile_rows(models: list[str] | str = "all", *, size: str = "base", img_size: int = 224,
                 in_channels: int = 3, num_classes: int = 3) -> list[dict]:
    """One dict per variant: name, family, mode, params, macs (batch 1, img_size²) and the
    reduction in % of params and MACs against the family's QKV variant (positive = fewer)."""
    names = _expand(models)
    cache: dict[str, tuple[int, int]] = {}

    def counts(name: str) -> tuple[int, int]:
        if name not in cache:
            model = build_on_meta(name, size=size, img_size=img_size, in_channels=in_channels,
                                  num_classes=num_classes)
            cache[name] = (count_params(model),
                           count_macs(model, (1, in_channels, img_size, img_size)))
        return cache[name]

    rows = []
    for name in names:
        info = model_info(name)
        params, macs = counts(name)
        ref_params, ref_macs = counts(f"{info['family']}_qkv")
        rows.append({"model": name, **info, "params": params, "macs": macs,
                     "params_m": params / 1e6, "gmacs": macs / 1e9,
                     "params_reduction_pct": 100.0 * (1 - params / ref_params),
                     "macs_reduction_pct": 100.0 * (1 - macs / ref_macs)})
    return rows


def profile_table(models: list[str] | str = "all", *, size: str = "base", img_size: int = 224,
                  in_channels: int = 3, num_classes: int = 3, fmt: str = "md") -> str:
    """The paper's table: params (M), GMACs and the KV-vs-QKV reduction per family.

    ``fmt``: ``md`` (Markdown), ``csv`` or ``json`` (exact integer counts included in all).
    """
    if fmt not in ("md", "csv", "json"):
        raise ValueError(f"format {fmt!r}: expected md, csv or json")
    rows = profile_rows(models, size=size, img_size=img_size, in_channels=in_channels,
                        num_classes=num_classes)
    if fmt == "json":
        return json.dumps({"size": size, "img_size": img_size, "in_channels": in_channels,
                           "num_classes": num_classes, "rows": rows}, indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: f"{v:.4f}" if isinstance(v, float) else v for k, v in r.items()})
        return buf.getvalue().rstrip("\n")
    lines = [f"size={size}, input 1×{in_channels}×{img_size}×{img_size}, "
             f"{num_classes} classes; MACs as counted by kvseg.profile.count_macs",
             "",
             "| model | family | mode | params (M) | GMACs | params reduction vs QKV | "
             "MACs reduction vs QKV |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        if r["mode"] == "qkv":
            red = "reference | reference"
        else:
            red = f"{r['params_reduction_pct']:.2f}% | {r['macs_reduction_pct']:.2f}%"
        lines.append(f"| {r['model']} | {r['family']} | {r['mode']} | {r['params_m']:.2f} | "
                     f"{r['gmacs']:.2f} | {red} |")
    return "\n".join(lines)


def models_table(*, size: str = "base", img_size: int = 224) -> str:
    """The registered variants with family, mode and parameter count (Markdown)."""
    lines = [f"| model | family | mode | params (M, size={size}, img_size={img_size}) |",
             "|---|---|---|---:|"]
    for name in list_models():
        info = model_info(name)
        params = count_params(build_on_meta(name, size=size, img_size=img_size))
        lines.append(f"| {name} | {info['family']} | {info['mode']} | {params / 1e6:.2f} |")
    return "\n".join(lines)


@contextlib.contextmanager
def _quiet_native_stderr():
    """Silence writes to file descriptor 2 by native code (Kineto prints a ``USDT:...
    profiler_start/stop`` pair on every profiler session); Python's own stderr is flushed first."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_cpu_memory(fn) -> int:
    """Peak bytes held by tensors that torch's CPU allocator hands out while ``fn()`` runs.

    Measured from ``torch.profiler``'s memory events (``profile_memory=True``): the running sum of
    allocations and frees, relative to the level when ``fn`` starts (so tensors that existed
    before, such as the weights, are not counted). ``tracemalloc`` does not see torch's allocator
    and the process RSS includes the interpreter and every earlier allocation.
    """
    from torch.profiler import ProfilerActivity, profile

    with _quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU],
                                         profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    level = peak = 0
    for e in events:
        level += e.nbytes()
        peak = max(peak, level)
    return peak
