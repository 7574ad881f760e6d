"""Numeric precision of a run and the CUDA backend switches that go with it.

One home for "which precision does this device train and infer in":

- :func:`resolve_precision` is the pure rule ``(amp, device type, compute capability) ->
  "fp32" | "bf16" | "fp16"`` (table below), unit-tested without a GPU;
- :func:`precision_for` applies it to a real device (asking that device, not the current one,
  for its capability);
- :func:`inference_precision` is what ``kvseg evaluate`` / ``predict`` use: by default on CUDA
  the precision the run trained (and validated) in;
- :func:`autocast` is the matching ``torch.autocast`` context (a no-op for fp32);
- :func:`backend_settings` sets, for the duration of a run, cuDNN autotuning, TF32 matmuls
  and deterministic algorithms, and restores the previous values afterwards.

=========  ==========  =====================  ====================
``amp``    CPU         CUDA, capability < 8.0  CUDA, capability >= 8.0
=========  ==========  =====================  ====================
auto       fp32        fp16 (+ GradScaler)     bf16
none/fp32  fp32        fp32                    fp32
bf16       bf16        refused                 bf16
fp16       refused     fp16                    fp16
=========  ==========  =====================  ====================

bf16 needs compute capability 8.0 (Ampere: A100, RTX 30xx; Hopper H100 is 9.0). Older GPUs
(V100 7.0, T4 7.5) can only emulate it (``torch.cuda.is_bf16_supported()`` says yes there
unless ``including_emulation=False``), slowly and with kernels that may be missing, so ``auto``
picks fp16 with a gradient scaler on them and an explicit ``bf16`` is refused. On the CPU, bf16
autocast is allowed (fast on CPUs with AVX-512 BF16 or AMX) but not the default: see
``docs/training.md`` for the measurement; fp16 autocast on the CPU is refused.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from kvseg.errors import ConfigError

#: The precisions a run can resolve to.
PRECISIONS = ("fp32", "bf16", "fp16")
#: Accepted spellings of a requested precision (``none`` is TrainConfig's name for fp32).
REQUESTS = ("auto", "none", "fp32", "bf16", "fp16")
#: The compute capability from which a GPU has native bf16 (Ampere).
BF16_MIN_CAPABILITY = (8, 0)
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(amp: str, device_type: str,
                      capability: tuple[int, int] | None = None, option: str = "amp") -> str:
    """The precision ``amp`` gives on a device (pure: see the table in the module docstring).

    Args:
        amp: ``auto``, ``none`` (= ``fp32``), ``fp32``, ``bf16`` or ``fp16``.
        device_type: ``"cpu"`` or ``"cuda"``.
        capability: the CUDA device's compute capability ``(major, minor)``; ignored on CPU.
        option: the setting the messages name (``amp``, or ``--precision`` for inference).

    Returns ``"fp32"``, ``"bf16"`` or ``"fp16"``. Raises :class:`ConfigError` naming ``amp``
    for a precision the device cannot train in.
    """
    if amp not in REQUESTS:
        raise ConfigError(f"amp={amp!r}: expected one of {', '.join(REQUESTS)}")
    if amp in ("none", "fp32"):
        return "fp32"
    if device_type != "cuda":
        if amp == "fp16":
            raise ConfigError(f"amp=fp16: needs a CUDA device (device is {device_type}); use "
                              "amp: bf16, none or auto")
        return "bf16" if amp == "bf16" else "fp32"
    native_bf16 = capability is not None and tuple(capability) >= BF16_MIN_CAPABILITY
    if amp == "auto":
        return "bf16" if native_bf16 else "fp16"
    if amp == "bf16" and not native_bf16:
        cc = "unknown" if capability is None else f"{capability[0]}.{capability[1]}"
        head, use = ("amp=bf16", "amp: ") if option == "amp" else (f"{option} bf16", "")
        raise ConfigError(f"{head}: this GPU (compute capability {cc}) has no native bf16 "
                          f"(needs 8.0+, Ampere or newer); use {use}fp16 or auto")
    return amp


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """``(major, minor)`` of a CUDA ``device`` (its own, not the current device's); None on CPU."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return tuple(torch.cuda.get_device_capability(index))


def precision_for(amp: str, device: torch.device) -> str:
    """:func:`resolve_precision` for a real ``device`` (queries its compute capability)."""
    return resolve_precision(amp, device.type, device_capability(device))


def inference_precision(requested: str, device_type: str, capability: tuple[int, int] | None,
                        run_precision: str | None) -> str:
    """The precision ``kvseg evaluate`` / ``predict`` run a model in (pure).

    ``requested`` other than ``auto`` is resolved like a training ``amp``. ``auto`` is fp32 on
    the CPU; on CUDA it is ``run_precision`` (the precision the run trained and validated in,
    stored in its config) when this GPU supports it, otherwise this GPU's own ``auto``.
    """
    if requested != "auto":
        if requested == "fp16" and device_type != "cuda":
            raise ConfigError(f"--precision fp16: needs a CUDA device (device is "
                              f"{device_type}); use fp32, bf16, int8 or auto")
        if requested not in REQUESTS or requested == "none":
            raise ConfigError(f"--precision {requested}: expected one of auto, fp32, bf16, "
                              "fp16" + (", int8 (on the CPU)" if device_type == "cpu" else ""))
        return resolve_precision(requested, device_type, capability, option="--precision")
    if device_type != "cuda":
        return "fp32"
    if run_precision in PRECISIONS:
        try:
            return resolve_precision(run_precision, device_type, capability)
        except ConfigError:
            pass  # e.g. a bf16 run evaluated on a V100
    return resolve_precision("auto", device_type, capability)


def dtype_of(precision: str) -> torch.dtype | None:
    """The autocast dtype of ``precision`` (None for fp32)."""
    return _DTYPES[precision]


def autocast(device: torch.device, precision: str):
    """``torch.autocast`` for ``precision`` on ``device`` (a null context for fp32)."""
    dtype = dtype_of(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def backend_settings(device: torch.device, *, tf32: bool = True,
                     deterministic: bool = False) -> Iterator[None]:
    """Set the backend switches of a run for the duration of the block, then restore them.

    On CUDA: ``cudnn.benchmark`` (autotuned convolutions: the input size is fixed) unless
    ``deterministic``; fp32 matmuls on TF32 tensor cores (``set_float32_matmul_precision("high")``;
    cuDNN convolutions already default to TF32) when ``tf32``. ``deterministic`` (any device):
    ``torch.use_deterministic_algorithms(True, warn_only=True)``, ``cudnn.deterministic`` and
    ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (needed by cuBLAS; set only when absent, before the first
    CUDA matmul). ``warn_only``: an op without a deterministic CUDA kernel (the backward of
    bilinear ``F.interpolate``, used by every decoder here) warns instead of stopping the run,
    so bit-identical GPU runs also need those ops replaced (see docs/training.md).
    """
    cudnn = torch.backends.cudnn
    saved = (cudnn.benchmark, cudnn.deterministic, torch.get_float32_matmul_precision(),
             torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    try:
        if deterministic:
            if device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
        if device.type == "cuda":
            cudnn.benchmark = not deterministic
            cudnn.deterministic = deterministic
            torch.set_float32_matmul_precision("high" if tf32 else "highest")
        yield
    finally:
        cudnn.benchmark, cudnn.deterministic = saved[0], saved[1]
        torch.set_float32_matmul_precision(saved[2])
        torch.use_deterministic_algorithms(saved[3], warn_only=saved[4])
        if saved[5] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[5]


__all__ = ["BF16_MIN_CAPABILITY", "PRECISIONS", "REQUESTS", "autocast", "backend_settings",
           "device_capability", "dtype_of", "inference_precision", "precision_for",
           "resolve_precision"]
