"""``kvseg benchmark``: inference latency, throughput and peak memory of each variant on each
inference path, side by side, and the KV/QKV ratios per family.

Paths (device, backend, precision):

- ``cpu torch fp32``: the reference, always measured (:func:`kvseg.runtime.inference_copy`);
- ``cpu torch bf16``: bf16 weights (:class:`kvseg.runtime.Bf16Model`);
- ``cpu onnxruntime fp32`` (``onnx=True``): the exported graph in ONNX Runtime
  (:class:`kvseg.runtime.OrtModel`: one image per call);
- ``cpu onnxruntime int8``: static QDQ int8 (:func:`kvseg.export.quantize_int8`, the graph
  ``kvseg export --quantize int8`` writes), calibrated on
  seeded uniform [0, 1] inputs (the range of prepared slices): a speed measurement of freshly
  initialised models; the accuracy of int8 is checked on a trained run by ``kvseg export
  --quantize int8`` and ``benchmarks/precision_accuracy.py``;
- ``cuda torch fp32`` and ``cuda torch bf16`` (autocast, :mod:`kvseg.precision`; needs a GPU of
  compute capability 8.0+), when ``devices`` has ``cuda``.

Timing: the variants of one family (every mode, path and batch size) are timed round-robin by
:func:`kvseg.inference.profile.time_fns` (one call of each per round), so load from other
processes hits them alike; the first call of each, untimed, is the warm-up and the memory
measurement. Models are freshly initialised (speed does not depend on the weights), inputs
seeded uniform [0, 1].

Columns: ``median_ms``, ``p90_ms`` (per call of a batch), ``images_per_s`` = batch / median,
``speedup`` = images/s over the same model's torch fp32 on the same device and batch,
``vs_qkv_latency`` / ``vs_qkv_throughput`` = this variant over its family's QKV variant on the
same path and batch (from the same run). ``peak_mem_mib``: weights plus working memory of one
call: for torch, the weights' bytes plus the allocator's high-water mark above the level before
the call (:func:`kvseg.inference.profile.peak_cpu_memory`; on CUDA ``max_memory_allocated``);
for ONNX Runtime (its own allocator), the growth of the process's peak resident memory from
before the session was created to the end of its first call at that batch
(``/proc/self/clear_refs``; null where the kernel does not allow it).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kvseg.errors import ConfigError
from kvseg.inference.export import export_model, quantize_int8
from kvseg.inference.profile import peak_cpu_memory, time_fns
from kvseg.inference.runtime import (
    Bf16Model,
    OrtModel,
    bf16_note,
    cpu_info,
    import_onnxruntime,
    inference_copy,
)
from kvseg.models.registry import create_model, list_models, model_info
from kvseg.training.precision import BF16_MIN_CAPABILITY, autocast
from kvseg.utils import atomic_write_text, check_number, gigabytes, jsonable, physical_memory

log = logging.getLogger(__name__)

#: The variants benchmarked by default: each family's QKV and KV twins.
DEFAULT_MODELS = ("setr_qkv", "setr_kv", "setr_conv_qkv", "setr_conv_kv", "setr_cvt_qkv",
                  "setr_cvt_kv")
PRECISIONS = ("fp32", "bf16", "int8")
DEVICES = ("cpu", "cuda")
CALIBRATION_INPUTS = 8


@dataclass(frozen=True)
class InferencePath:
    """One inference path: where and how a model runs."""

    device: str
    backend: str
    precision: str

    @property
    def label(self) -> str:
        return f"{self.device} {self.backend} {self.precision}"


def plan_paths(devices: Sequence[str], precisions: Sequence[str], onnx: bool
               ) -> tuple[list[InferencePath], list[str]]:
    """The paths to measure and a note for each requested one that is not (pure).

    torch fp32 is always measured on each device (the reference of the speedups); int8 runs
    on the CPU only, through ONNX Runtime; ``onnx`` adds ONNX Runtime fp32 on the CPU.
    """
    paths, notes = [], []
    for device in devices:
        paths.append(InferencePath(device, "torch", "fp32"))
        if "bf16" in precisions:
            paths.append(InferencePath(device, "torch", "bf16"))
        if device == "cpu" and onnx:
            paths.append(InferencePath("cpu", "onnxruntime", "fp32"))
        if "int8" in precisions:
            if device == "cpu":
                paths.append(InferencePath("cpu", "onnxruntime", "int8"))
            else:
                notes.append(f"int8 runs on the CPU only (ONNX Runtime): no {device} int8 rows")
    return paths, notes


def _check(models: Sequence[str], batches: Sequence[int], devices: Sequence[str],
           precisions: Sequence[str], repeats: int, threads: int | None) -> list[str]:
    """Validate the options (one-line :class:`ConfigError` naming the value); the model list."""
    names: list[str] = []
    for m in models:
        for n in (list_models() if m == "all" else [m]):
            try:
                model_info(n)
            except ValueError as e:
                raise ConfigError(f"--models {n!r}: unknown model; expected 'all' or one of "
                                  f"{', '.join(list_models())}") from e
            if n not in names:
                names.append(n)
    if not names:
        raise ConfigError("--models: name at least one model")
    if not batches:
        raise ConfigError("--batch: give at least one batch size")
    for b in batches:
        check_number("--batch", b, integer=True, minimum=1)
    check_number("--repeats", repeats, integer=True, minimum=1)
    if threads is not None:
        check_number("--threads", threads, integer=True, minimum=1)
    for d in devices:
        if d not in DEVICES:
            raise ConfigError(f"--device {d!r}: expected cpu or cuda")
    if "cuda" in devices and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here")
    for p in precisions:
        if p not in PRECISIONS:
            raise ConfigError(f"--precision {p!r}: expected one of {', '.join(PRECISIONS)}")
    return names


def machine(threads: int) -> dict:
    """The CPU (model name, flags, bf16/int8 support), thread counts, versions and GPU."""
    info = cpu_info()
    out = {"cpu": info["name"], "cores": info["cores"], "cpu_flags": info["flags"],
           "bf16": info["bf16"], "bf16_note": bf16_note(info), "int8": info["int8"],
           "threads": threads, "torch": torch.__version__, "python": platform.python_version(),
           "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    try:
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        out["onnxruntime"] = None
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


# --------------------------------------------------------------------------- memory
def _reset_peak_rss() -> bool:
    """Return freed heap pages to the system (glibc ``malloc_trim``, so a new allocation shows
    as growth instead of reusing them) and reset the process's peak resident set size (Linux
    ``clear_refs`` 5); False where that is not allowed."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size()
               for t in (*model.parameters(), *model.buffers()))


# --------------------------------------------------------------------------- one family
@dataclass
class _Variant:
    name: str
    path: InferencePath
    batch: int
    fn: Callable[[], object]
    peak_mib: float | None = None


def _runners(model: nn.Module, path: InferencePath, *, shape: tuple[int, int, int], threads: int,
             workdir: Path, cache: dict) -> tuple[Callable[[torch.Tensor], object],
                                                  Callable[[Callable[[], object]],
                                                           float | None]]:
    """``(call(x), measure(fn) -> peak MiB)`` for one model on one path. The ONNX files of a
    model are exported once and shared by its ONNX Runtime paths (``cache``)."""
    if path.backend == "onnxruntime":
        fp32 = workdir / f"{id(model)}-fp32.onnx"
        if "fp32" not in cache:  # checked against PyTorch to 1e-4, as kvseg export does
            export_model(inference_copy(model), fp32, input_shape=(1, *shape), dynamic=True,
                         exporter="torchscript")
            cache["fp32"] = fp32
        file = fp32
        if path.precision == "int8":  # what kvseg.export.export_int8 writes, unchecked
            file = workdir / f"{id(model)}-int8.onnx"
            calib = torch.rand(CALIBRATION_INPUTS, *shape,
                               generator=torch.Generator().manual_seed(1)).numpy()
            quantize_int8(fp32, file, calib, workdir)
        base = _rss_kib("VmRSS") if _reset_peak_rss() else None
        runner = OrtModel(file, threads)

        def measure(fn):
            fn()
            hwm = _rss_kib("VmHWM")
            return None if hwm is None or base is None else (hwm - base) / 1024

        return (lambda x: runner(x)), measure

    device = torch.device(path.device)
    net = (Bf16Model(model) if path.precision == "bf16" and device.type == "cpu"
           else inference_copy(model)).to(device)
    weights = _weight_bytes(net) / 2**20

    def call(x):
        with torch.inference_mode(), autocast(device, "fp32" if device.type == "cpu"
                                              else path.precision):
            return net(x)

    def measure(fn):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            fn()
            torch.cuda.synchronize(device)
            return weights + (torch.cuda.max_memory_allocated(device) - before) / 2**20
        return weights + peak_cpu_memory(fn) / 2**20

    return call, measure


def _bench_family(names: list[str], paths: list[InferencePath], batches: list[int], *, size: str,
                  img_size: int, in_channels: int, num_classes: int, repeats: int,
                  threads: int) -> list[dict]:
    shape = (in_channels, img_size, img_size)
    variants: list[_Variant] = []
    with tempfile.TemporaryDirectory(prefix="kvseg-bench-") as tmp:
        for name in names:
            torch.manual_seed(0)
            model = create_model(name, size=size, img_size=img_size, in_channels=in_channels,
                                 num_classes=num_classes).eval()
            cache: dict = {}
            for path in paths:
                start = time.perf_counter()
                call, measure = _runners(model, path, shape=shape, threads=threads,
                                         workdir=Path(tmp), cache=cache)
                for batch in batches:
                    x = torch.rand(batch, *shape, generator=torch.Generator().manual_seed(0))
                    x = x.to(path.device)
                    v = _Variant(name, path, batch, fn=lambda call=call, x=x: call(x))
                    v.peak_mib = measure(v.fn)  # also the warm-up call
                    variants.append(v)
                log.info("%s %s ready (%.0f s)", name, path.label, time.perf_counter() - start)
        devices = {v.path.device for v in variants}
        timings = {}
        for device in sorted(devices):  # CUDA calls are synchronised, CPU ones are not
            group = {i: v.fn for i, v in enumerate(variants) if v.path.device == device}
            got = time_fns({str(i): fn for i, fn in group.items()}, repeats=repeats, warmup=0,
                           device=device, threads=threads)
            timings.update({int(k): t for k, t in got.items()})
    rows = []
    for i, v in enumerate(variants):
        t = timings[i]
        rows.append({"model": v.name, **model_info(v.name), "size": size, "img_size": img_size,
                     "batch": v.batch, "device": v.path.device, "backend": v.path.backend,
                     "precision": v.path.precision, "median_ms": t.median_ms, "p90_ms": t.p90_ms,
                     "min_ms": t.min_ms, "repeats": t.repeats, "threads": t.threads,
                     "images_per_s": v.batch * 1000.0 / t.median_ms, "peak_mem_mib": v.peak_mib})
    return rows


# --------------------------------------------------------------------------- ratios
def add_ratios(rows: list[dict]) -> list[dict]:
    """Fill ``speedup`` (over torch fp32 of the same model, device and batch) and
    ``vs_qkv_latency`` / ``vs_qkv_throughput`` (over the family's QKV variant on the same path
    and batch) in ``rows`` (None where the reference was not measured); return the KV/QKV
    ratio rows (one per non-QKV variant, path and batch)."""
    def key(r, **over):
        r = {**r, **over}
        return (r["model"], r["device"], r["backend"], r["precision"], r["batch"])

    by_key = {key(r): r for r in rows}
    qkv = {(r["family"], r["device"], r["backend"], r["precision"], r["batch"]): r
           for r in rows if r["mode"] == "qkv"}
    ratios = []
    for r in rows:
        ref = by_key.get(key(r, backend="torch", precision="fp32"))
        r["speedup"] = r["images_per_s"] / ref["images_per_s"] if ref else None
        q = qkv.get((r["family"], r["device"], r["backend"], r["precision"], r["batch"]))
        r["vs_qkv_latency"] = r["median_ms"] / q["median_ms"] if q else None
        r["vs_qkv_throughput"] = r["images_per_s"] / q["images_per_s"] if q else None
        if q and r["mode"] != "qkv":
            ratios.append({"family": r["family"], "mode": r["mode"], "model": r["model"],
                           "device": r["device"], "backend": r["backend"],
                           "precision": r["precision"], "batch": r["batch"],
                           "latency_ratio": r["vs_qkv_latency"],
                           "throughput_ratio": r["vs_qkv_throughput"]})
    return ratios


# --------------------------------------------------------------------------- the command
def _check_memory(devices: list[str], batch: int, img_size: int, in_channels: int,
                  num_classes: int) -> None:
    """Refuse sizes whose input and output tensors alone (a lower bound of what a forward
    pass holds: fp32, plus one 64-channel map at 1/16 resolution) exceed the device's memory,
    before anything is allocated."""
    need = 4 * batch * img_size**2 * (in_channels + num_classes + 64 / 16**2)
    for device in devices:
        if device.startswith("cuda") and torch.cuda.is_available():
            have, where = torch.cuda.get_device_properties(0).total_memory, "this GPU has"
        else:
            have, where = physical_memory(), "this machine has"
        if have is not None and need > have:
            raise ConfigError(f"--batch {batch} at --img-size {img_size}: the input and output "
                              f"tensors alone need {gigabytes(need)}; {where} {gigabytes(have)} "
                              f"({device}); use smaller batches or images")


def benchmark(models: Sequence[str] = DEFAULT_MODELS, *, size: str = "base",
              img_size: int = 256, batches: Sequence[int] = (1,),
              devices: Sequence[str] = ("cpu",), onnx: bool = False,
              precisions: Sequence[str] = ("fp32",), threads: int | None = None,
              repeats: int = 5, in_channels: int = 3, num_classes: int = 3,
              out: str | os.PathLike | None = None) -> dict:
    """Measure every model on every path and batch size (see the module docstring).

    Args:
        models: variant names or ``all``.
        size: the size preset.
        img_size: the square input side (pixels).
        batches: batch sizes.
        devices: ``cpu`` and/or ``cuda``.
        onnx: also ONNX Runtime fp32 on the CPU.
        precisions: ``fp32``, ``bf16``, ``int8`` (torch fp32 is always measured).
        threads: CPU threads of torch and ONNX Runtime (None: torch's current count).
        repeats: timed calls per variant (after one untimed warm-up call).
        in_channels: input channels.
        num_classes: output classes.
        out: a JSON file to write (atomically).

    Returns a dict: ``machine`` (:func:`machine`), ``settings``, ``rows`` (one per model, path
    and batch), ``ratios`` (KV/QKV per family), ``notes``.
    """
    names = _check(models, list(batches), list(devices), list(precisions), repeats, threads)
    check_number("--img-size", img_size, integer=True, minimum=16)
    if size not in ("micro", "small", "base", "large"):
        raise ConfigError(f"--size {size!r}: expected micro, small, base or large")
    _check_memory(list(devices), max(batches), img_size, in_channels, num_classes)
    paths, notes = plan_paths(list(devices), list(precisions), onnx)
    if any(p.backend == "onnxruntime" for p in paths):
        import_onnxruntime()
    if "cuda" in devices and "bf16" in precisions:
        if torch.cuda.get_device_capability() < BF16_MIN_CAPABILITY:
            paths = [p for p in paths if not (p.device == "cuda" and p.precision == "bf16")]
            notes.append("cuda bf16 skipped: this GPU has no native bf16 (compute capability "
                         "< 8.0)")
    threads = int(threads or torch.get_num_threads())
    families: dict[str, list[str]] = {}
    for n in names:
        families.setdefault(model_info(n)["family"], []).append(n)
    rows = []
    for family_names in families.values():
        rows += _bench_family(family_names, paths, sorted(set(batches)), size=size,
                              img_size=img_size, in_channels=in_channels,
                              num_classes=num_classes, repeats=repeats, threads=threads)
    ratios = add_ratios(rows)
    info = machine(threads)
    if "bf16" in precisions:
        notes.append(info["bf16_note"])
    if any(p.backend == "onnxruntime" for p in paths):
        notes.append("ONNX Runtime runs a batch one image per call (kvseg.runtime.OrtModel: "
                     "faster per image than whole batches on this kind of CPU; memory arena on)")
    if "int8" in precisions:
        notes.append(f"int8: ONNX Runtime static QDQ, calibrated on {CALIBRATION_INPUTS} "
                     "seeded uniform inputs (speed only; accuracy: kvseg export --quantize "
                     "int8, benchmarks/precision_accuracy.py); CPU int8 dot products: "
                     f"{info['int8']}")
    result = jsonable({"machine": info,
                       "settings": {"models": names, "size": size, "img_size": img_size,
                                    "batches": sorted(set(batches)), "devices": list(devices),
                                    "paths": [p.label for p in paths], "repeats": repeats,
                                    "threads": threads, "in_channels": in_channels,
                                    "num_classes": num_classes},
                       "rows": rows, "ratios": ratios, "notes": notes})
    if out is not None:
        atomic_write_text(out, json.dumps(result, indent=2) + "\n")
        result["out"] = str(out)
    return result


def _f(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_table(result: dict) -> str:
    """Markdown: the machine line, one row per variant, the KV/QKV ratios, the notes."""
    m, s = result["machine"], result["settings"]
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    lines = [f"CPU {m['cpu']} ({m['cores']} cores; {', '.join(m['cpu_flags']) or 'no AVX'}), "
             f"{s['threads']} thread(s){gpu}; torch {m['torch']}, onnxruntime "
             f"{m['onnxruntime'] or '-'}; size {s['size']}, {s['img_size']}² input, "
             f"{s['repeats']} timed calls per row",
             "",
             "| model | path | batch | median ms | p90 ms | images/s | × torch fp32 | "
             "peak MiB | latency / QKV | throughput / QKV |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['device']} {r['backend']} {r['precision']} | "
                     f"{r['batch']} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} | "
                     f"{r['images_per_s']:.2f} | {_f(r['speedup'], '.2f')} | "
                     f"{_f(r['peak_mem_mib'], '.0f')} | {_f(r['vs_qkv_latency'], '.3f')} | "
                     f"{_f(r['vs_qkv_throughput'], '.3f')} |")
    if result["ratios"]:
        lines += ["", "| family | mode / QKV | path | batch | latency ratio | throughput ratio |",
                  "|---|---|---|---:|---:|---:|"]
        for r in result["ratios"]:
            lines.append(f"| {r['family']} | {r['mode']} | {r['device']} {r['backend']} "
                         f"{r['precision']} | {r['batch']} | {r['latency_ratio']:.3f} | "
                         f"{r['throughput_ratio']:.3f} |")
    if result["notes"]:
        lines += [""] + [f"note: {n}" for n in result["notes"]]
    if "out" in result:
        lines.append(f"-> {result['out']}")
    return "\n".join(lines)


__all__ = ["DEFAULT_MODELS", "add_ratios", "benchmark", "format_table", "machine",
           "plan_paths"]
