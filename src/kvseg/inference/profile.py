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

Timing (one helper for the package, ``kvseg reproduce`` and ``benchmarks/``, like timm's
``benchmark.py``): :func:`time_fn` / :func:`time_fns` run untimed warm-up calls, then time each
call with ``time.perf_counter`` (CUDA synchronised before and after each call on a CUDA device)
under a given torch thread count, and summarise the calls as a :class:`Timing` (median, p90,
mean, min). :func:`profile_model` uses them for the latency columns of results.csv.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from kvseg.errors import ConfigError
from kvseg.models.monai_nets import NO_ATTENTION
from kvseg.models.registry import PRESETS, build_on_meta, list_models, model_info

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


def _has_size(name: str, size: str) -> bool:
    """The variant's family has a ``size`` preset (the reference families stop at base)."""
    return size in PRESETS[model_info(name)["family"]]


def _expand(models: list[str] | tuple[str, ...] | str, size: str | None = None) -> list[str]:
    """Names, ``all`` expanded (to the variants with a ``size`` preset, when given)."""
    models = [models] if isinstance(models, str) else list(models)
    names: list[str] = []
    for m in models:
        every = [n for n in list_models() if size is None or _has_size(n, size)]
        for n in (every if m == "all" else [m]):
            model_info(n)  # ValueError for unknown names
            if n not in names:
                names.append(n)
    return names


def profile_rows(models: list[str] | str = "all", *, size: str = "base", img_size: int = 224,
                 in_channels: int = 3, num_classes: int = 3) -> list[dict]:
    """One dict per variant: name, family, mode, params, macs (batch 1, img_size²) and the
    reduction in % of params and MACs against the family's QKV variant (positive = fewer;
    None for a family without attention, ``dynunet``)."""
    names = _expand(models, size)
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
        row = {"model": name, **info, "params": params, "macs": macs,
               "params_m": params / 1e6, "gmacs": macs / 1e9,
               "params_reduction_pct": None, "macs_reduction_pct": None}
        if info["mode"] != NO_ATTENTION:  # dynunet: no QKV twin, no reduction (None)
            ref_params, ref_macs = counts(f"{info['family']}_qkv")
            row.update(params_reduction_pct=100.0 * (1 - params / ref_params),
                       macs_reduction_pct=100.0 * (1 - macs / ref_macs))
        rows.append(row)
    return rows


def profile_table(models: list[str] | str = "all", *, size: str = "base", img_size: int = 224,
                  in_channels: int = 3, num_classes: int = 3, fmt: str = "md") -> str:
    """The paper's table: params (M), GMACs and the KV-vs-QKV reduction per family.

    ``fmt``: ``md`` (Markdown), ``csv`` or ``json`` (exact integer counts included in all).
    """
    if fmt not in ("md", "csv", "json"):
        raise ConfigError(f"format {fmt!r}: expected md, csv or json")
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
             f"{num_classes} classes; MACs as counted by kvseg.inference.profile.count_macs",
             "",
             "| model | family | mode | params (M) | GMACs | params reduction vs QKV | "
             "MACs reduction vs QKV |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        if r["mode"] == "qkv":
            red = "reference | reference"
        elif r["params_reduction_pct"] is None:
            red = "— | —"
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
        if not _has_size(name, size):
            lines.append(f"| {name} | {info['family']} | {info['mode']} | — |")
            continue
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


# --------------------------------------------------------------------------- timing
@dataclass(frozen=True)
class Timing:
    """Wall times of repeated calls of one function, in milliseconds.

    Attributes:
        median_ms: median of the timed calls.
        p90_ms: 90th percentile (linear interpolation between the closest ranks, numpy's default).
        mean_ms: arithmetic mean.
        min_ms: fastest call.
        repeats: number of timed calls (warm-up calls excluded).
        threads: torch's CPU thread count during the calls.
        device: the device synchronised around each call (``cpu``: none).
        times_ms: every timed call, in the order they ran.
    """

    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    repeats: int
    threads: int
    device: str
    times_ms: tuple[float, ...]

    @classmethod
    def of(cls, times_ms: list[float], *, threads: int, device: str) -> Timing:
        """Summarise ``times_ms`` (at least one time)."""
        if not times_ms:
            raise ValueError("no timed calls: repeats must be >= 1")
        ordered = sorted(times_ms)
        rank = 0.9 * (len(ordered) - 1)
        lo = math.floor(rank)
        hi = min(lo + 1, len(ordered) - 1)
        p90 = ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)
        return cls(median_ms=statistics.median(ordered), p90_ms=p90,
                   mean_ms=statistics.fmean(ordered), min_ms=ordered[0], repeats=len(ordered),
                   threads=threads, device=device, times_ms=tuple(times_ms))


def time_fns(fns: Mapping[str, Callable[[], object]], *, repeats: int | Mapping[str, int],
             warmup: int = 1, device: torch.device | str | None = None,
             threads: int | None = None) -> dict[str, Timing]:
    """Time several functions round-robin (one call of each per round), so that load from other
    processes on a shared machine hits them alike.

    Args:
        fns: name -> a function called without arguments; its result is discarded.
        repeats: timed calls of each function (or name -> its own count); a function with fewer
            repeats than another sits out the later rounds.
        warmup: untimed calls of each function first (kernel selection, allocator caches,
            lazy initialisation).
        device: with a CUDA device, ``torch.cuda.synchronize`` runs before and after every call
            (warm-up included), so a call's time includes its queued kernels; None or CPU: no
            synchronisation.
        threads: torch's CPU thread count during the calls (``torch.set_num_threads``), restored
            afterwards, also when a function raises; None keeps the current count.

    Returns:
        name -> :class:`Timing`, in the order of ``fns``.
    """
    device = torch.device(device if device is not None else "cpu")
    counts = {name: int(repeats[name] if isinstance(repeats, Mapping) else repeats)
              for name in fns}
    bad = {name: n for name, n in counts.items() if n < 1}
    if bad or warmup < 0:
        raise ConfigError(f"repeats {bad or repeats}, warmup {warmup}: need repeats >= 1 and "
                         "warmup >= 0")
    if device.type == "cuda":
        def sync() -> None:
            torch.cuda.synchronize(device)
    else:
        def sync() -> None:
            pass

    times: dict[str, list[float]] = {name: [] for name in fns}
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads or before))
    try:
        used = torch.get_num_threads()
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        sync()
        for round_ in range(max(counts.values(), default=0)):
            for name, fn in fns.items():
                if round_ < counts[name]:
                    sync()
                    t0 = time.perf_counter()
                    fn()
                    sync()
                    times[name].append((time.perf_counter() - t0) * 1000.0)
    finally:
        torch.set_num_threads(before)
    return {name: Timing.of(t, threads=used, device=str(device)) for name, t in times.items()}


def time_fn(fn: Callable[[], object], *, repeats: int, warmup: int = 1,
            device: torch.device | str | None = None, threads: int | None = None) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeats`` timed ones.

    The arguments are those of :func:`time_fns` for a single function.
    """
    return time_fns({"fn": fn}, repeats=repeats, warmup=warmup, device=device,
                    threads=threads)["fn"]


def profile_model(model: nn.Module, input_shape: tuple[int, int, int, int], *,
                  device: torch.device | str = "cpu", repeats: int = 10, warmup: int = 2,
                  threads: int | None = None) -> dict:
    """Params, MACs, CPU (and CUDA) latency and peak forward memory of ``model`` on a random
    input of ``input_shape`` (the latency columns of results.csv; batch 1 there).

    Args:
        model: the network; it is moved to the CPU and put in eval mode (and left there).
        input_shape: (B, C, H, W) of the random input (seed 0).
        device: with a CUDA device, the GPU columns are measured too (otherwise NaN).
        repeats: timed forward passes per latency.
        warmup: untimed forward passes before them (at least 3 on CUDA).
        threads: torch's CPU thread count for the CPU latency (restored afterwards); None: the
            current count.

    Returns:
        ``params``, ``macs`` (:func:`count_params`, :func:`count_macs`), ``input_shape`` (list),
        ``threads``, ``latency_ms`` and ``latency_p90_ms`` (median and p90 of the CPU forward
        passes, eval mode, ``torch.inference_mode``), ``peak_mem_mb`` (:func:`peak_cpu_memory`
        of one CPU forward, MiB), ``gpu_latency_ms`` (median, CUDA synchronised) and
        ``gpu_peak_mem_mb`` (``max_memory_allocated`` during one forward minus the memory
        allocated before it, MiB); the GPU values are NaN without CUDA.
    """
    device = torch.device(device)
    model = model.cpu().eval()
    x = torch.randn(*input_shape, generator=torch.Generator().manual_seed(0))
    out = {"params": count_params(model), "macs": count_macs(model, input_shape),
           "input_shape": list(input_shape)}
    with torch.inference_mode():
        cpu = time_fn(lambda: model(x), repeats=repeats, warmup=warmup, threads=threads)
        out.update(threads=cpu.threads, latency_ms=cpu.median_ms, latency_p90_ms=cpu.p90_ms)
        out["peak_mem_mb"] = peak_cpu_memory(lambda: model(x)) / 2**20
    out["gpu_latency_ms"] = out["gpu_peak_mem_mb"] = math.nan
    if device.type == "cuda":
        model, xg = model.to(device), x.to(device)
        with torch.inference_mode():
            out["gpu_latency_ms"] = time_fn(lambda: model(xg), repeats=repeats,
                                            warmup=max(warmup, 3), device=device).median_ms
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            model(xg)
            torch.cuda.synchronize(device)
            out["gpu_peak_mem_mb"] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        model.cpu()
    return out
