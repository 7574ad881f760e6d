"""The bottom of the CPU inference paths (no export here): what the CPU can do
(:func:`cpu_info`), the fp32 inference copy, the bf16 model and the ONNX Runtime model, and the
calibration slices of a run. :mod:`kvseg.inference.export` and :mod:`kvseg.inference.runtime`
build on it; the paths themselves are described in :mod:`kvseg.inference.runtime`.
"""

from __future__ import annotations

import copy
import logging
import os
import platform
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kvseg.data import build_dataset
from kvseg.errors import ConfigError, DataError, KvsegError
from kvseg.models.conv_hybrid import StdConv2d

log = logging.getLogger(__name__)

#: The CPU inference paths.
CPU_PRECISIONS = ("fp32", "bf16", "int8")
_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16",
          "amx_int8")


# --------------------------------------------------------------------------- the CPU
def cpu_info(cpuinfo: str | None = None) -> dict:
    """The CPU's model name and the instruction-set flags that decide bf16 and int8 speed.

    Args:
        cpuinfo: the text of ``/proc/cpuinfo`` (read when None; absent outside Linux).

    Returns ``name`` (the first ``model name``, else ``platform.processor()``), ``cores``,
    ``flags`` (those of avx2, avx512f, avx512_bf16, avx512_vnni, avx_vnni, amx_* present),
    ``bf16``: ``"amx"`` (AMX tiles), ``"avx512_bf16"`` (bf16 dot products at the fp32 FMA rate),
    or ``"emulated"`` (converted to fp32 in software), ``int8``: ``"amx"``, ``"vnni"`` or
    ``"none"`` (ONNX Runtime's u8s8 kernels then saturate: activations use a reduced range),
    and ``mkldnn_bf16`` (oneDNN's own bf16 check).
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            cpuinfo = ""
    name, flags = "", set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not name:
            name = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    try:
        mkldnn_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        mkldnn_bf16 = False
    if not flags and mkldnn_bf16:  # no /proc/cpuinfo: trust oneDNN
        flags.add("avx512_bf16")
    bf16 = ("amx" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags
            else "emulated")
    int8 = ("amx" if "amx_int8" in flags
            else "vnni" if flags & {"avx512_vnni", "avx_vnni"} else "none")
    return {"name": name or platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "flags": [f for f in _FLAGS if f in flags], "bf16": bf16, "int8": int8,
            "mkldnn_bf16": mkldnn_bf16}


def bf16_note(info: Mapping) -> str:
    """One line on how this CPU runs bf16 (for the benchmark's and predict's output)."""
    return {"amx": "bf16 on AMX tiles (native, faster than fp32)",
            "avx512_bf16": "bf16 on AVX-512 BF16 without AMX: native dot products at the fp32 "
                           "FMA rate, plus conversions (not expected to beat fp32)",
            "emulated": "bf16 is EMULATED on this CPU (no AVX-512 BF16, no AMX): converted to "
                        "fp32 in software, slower than fp32"}[info["bf16"]]


# --------------------------------------------------------------------------- models
def inference_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every weight-standardised convolution
    (:class:`kvseg.models.conv_hybrid.StdConv2d`) replaced by a plain ``nn.Conv2d`` holding the
    standardised kernel: the same function, without recomputing the standardisation at every
    forward, and a constant weight that ONNX int8 quantisation can quantise."""
    model = copy.deepcopy(model).eval()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, StdConv2d):
                conv = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size,
                                 child.stride, child.padding, child.dilation, child.groups,
                                 bias=child.bias is not None, padding_mode=child.padding_mode)
                with torch.no_grad():
                    w = child.weight
                    var, mean = torch.var_mean(w, dim=(1, 2, 3), keepdim=True, unbiased=False)
                    conv.weight.copy_((w - mean) / torch.sqrt(var + child.eps))
                    if child.bias is not None:
                        conv.bias.copy_(child.bias)
                setattr(parent, name, conv.to(w.device))
    return model


class Bf16Model(nn.Module):
    """``model`` with bfloat16 weights and activations: (B, C, H, W) float32 -> float32 logits.

    The norms and softmax keep float32 accumulators inside PyTorch's bf16 CPU kernels.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = inference_copy(model).to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(torch.bfloat16)).float()


def ort_session(model: str | os.PathLike | bytes, threads: int | None = None,
                arena: bool = True):
    """An ONNX Runtime CPU session (all graph optimisations; ``threads`` intra-op threads,
    None: ONNX Runtime's default, one per core).

    ``arena``: ONNX Runtime's CPU memory arena. It keeps a session's largest call's memory for
    the life of the process (four SETR-B sessions called at batch 16, 256², held 14 GB and were
    killed for memory), so it suits calls of a bounded size (:class:`OrtModel`'s pieces); it
    made SETR-KV int8 at batch 1 18 % faster here (235 vs 288 ms), CvT-KV 2 %.
    """
    ort = import_onnxruntime()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.enable_cpu_mem_arena = bool(arena)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise KvsegError("ONNX Runtime is not installed: pip install 'kvseg[onnx]'") from e
    return onnxruntime


class OrtModel(nn.Module):
    """An exported graph (``image`` -> ``logits``) behind the ``nn.Module`` call of a model:
    (B, C, H, W) float32 tensor -> float32 logits tensor on the CPU. Not trainable.

    A batch runs in pieces of at most ``max_batch`` images (None: whole). ONNX Runtime's time
    per image grows with the batch here, unlike PyTorch's: its full-resolution resizes and
    layout reorders are memory-bound (measured, int8, base, 256², one thread, ms per image for
    16 images as 1 / 2 / 4 / 16-image calls: SETR-KV 283 / 285 / 311 / 350, CvT-KV 71 / 80 /
    84 / 100), so the default is one image per call. The memory arena (:func:`ort_session`)
    is on when the pieces are bounded.
    """

    def __init__(self, model: str | os.PathLike | bytes, threads: int | None = None,
                 max_batch: int | None = 1):
        super().__init__()
        self.session = ort_session(model, threads, arena=max_batch is not None)
        self.max_batch = max_batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image = x.detach().float().cpu().contiguous().numpy()
        step = self.max_batch or len(image)
        parts = [self.session.run(["logits"], {"image": image[i:i + step]})[0]
                 for i in range(0, len(image), step)]
        return torch.from_numpy(parts[0] if len(parts) == 1 else np.concatenate(parts))


# --------------------------------------------------------------------------- calibration
def calibration_inputs(config: Mapping, data: str | os.PathLike | None = None, n: int = 32,
                       split: str = "train", flag: str = "--calibration-data"
                       ) -> tuple[np.ndarray, np.ndarray]:
    """``(calibration, check)`` model inputs (N, C, S, S) float32 from a run's dataset: 2·n
    slices evenly spaced over ``split`` (case order), alternately for calibrating the int8
    activation ranges and for checking the quantised model on slices it was not calibrated on.

    Args:
        config: the run's config (its dataset options: data, fold, img_size, context, ...).
        data: the dataset root (default: the run's ``data``).
        n: slices of each kind (fewer when the split is smaller; at least one of each).
        split: the split to draw from (``train``: the validation split stays unseen).
        flag: the command's option that names the dataset (for the error message).
    """
    root = data or config.get("data")
    if not root or not Path(root).is_dir():
        raise ConfigError(f"int8 calibration needs slices of the run's dataset: "
                          f"{root or flag} not found (pass {flag} DIR)")
    if n < 1:
        raise ConfigError(f"--calibration-slices {n}: expected >= 1")
    ds = build_dataset({**config, "data": str(root), "cache": False}, split, augment=False)
    if len(ds) < 2:
        raise DataError(f"{root}: split {split!r} has {len(ds)} slice(s); int8 calibration "
                        "needs at least 2")
    count = min(2 * n, len(ds))
    index = np.unique(np.linspace(0, len(ds) - 1, count).round().astype(int))
    images = np.stack([ds[int(i)]["image"].numpy() for i in index]).astype(np.float32)
    return images[0::2], images[1::2]


# --------------------------------------------------------------------------- the choice


__all__ = ["CPU_PRECISIONS", "Bf16Model", "OrtModel", "bf16_note", "calibration_inputs",
           "cpu_info", "import_onnxruntime", "inference_copy", "ort_session"]
