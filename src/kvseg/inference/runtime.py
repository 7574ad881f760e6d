"""How a trained model runs for inference on the CPU: fp32, bf16 or int8, and what the CPU has.

One home for "which CPU inference path", used by ``kvseg predict`` and ``kvseg benchmark``:

- ``fp32``: the PyTorch model as trained, with the hybrid's weight-standardised convolutions
  folded into plain ones (:func:`inference_copy`; the standardisation is a function of the
  weights alone, recomputed at every forward in training);
- ``bf16``: a copy with bfloat16 weights (:class:`Bf16Model`: float32 in, float32 logits out).
  Fast where the CPU multiplies bf16 in hardware at a higher rate than fp32 (AMX); AVX-512 BF16
  alone runs bf16 dot products at the fp32 FMA rate, and without either bf16 is emulated
  (:func:`cpu_info` says which, ``kvseg benchmark`` measures it);
- ``int8``: an ONNX Runtime session of the model exported to ONNX and quantised statically with
  calibration (:func:`kvseg.inference.export.export_int8`: weights per channel, activations
  per tensor from min/max over calibration slices of the run's training data), checked against the
  fp32 masks before it is used (:class:`OrtModel`).

On CUDA the precision is an autocast (:mod:`kvseg.training.precision`);
:func:`prepare_for_inference` picks between the two. The parts below the export (what the CPU
has, the model copies, the ONNX Runtime model, calibration slices) are in
:mod:`kvseg.inference.cpu`, re-exported here.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from kvseg.config import RunConfig
from kvseg.errors import ConfigError
from kvseg.inference.cpu import (
    CPU_PRECISIONS,
    Bf16Model,
    OrtModel,
    bf16_note,
    calibration_inputs,
    cpu_info,
    import_onnxruntime,
    inference_copy,
    ort_session,
)
from kvseg.inference.export import export_int8
from kvseg.training.precision import device_capability, inference_precision

log = logging.getLogger(__name__)


def prepare_for_inference(model: nn.Module, config: Mapping, precision: str,
                          device: torch.device, *, data: str | os.PathLike | None = None,
                          threads: int | None = None,
                          min_iou: float = 0.99) -> tuple[nn.Module, str]:
    """``(model to call, autocast precision)`` for ``precision`` on ``device``.

    On the CPU ``fp32``, ``bf16`` and ``int8`` are the paths of the module docstring (int8:
    calibrated on the run's training slices, refused with
    :class:`kvseg.export.ExportCheckError` when its masks' IoU with fp32's is below ``min_iou``
    in a class; the int8 model's ``int8_check`` holds the check's figures); their
    autocast is ``fp32``. Otherwise (CUDA, ``auto``, ``fp16``) the model is returned as it is
    with :func:`kvseg.precision.inference_precision`'s choice (on the CPU ``auto`` is fp32).
    """
    config = _typed(config)
    if precision == "int8" and device.type != "cpu":
        raise ConfigError(f"--precision int8 runs on the CPU (ONNX Runtime), not {device}; pass "
                          "--device cpu")
    if device.type == "cpu" and precision in ("auto", *CPU_PRECISIONS):
        precision = "fp32" if precision == "auto" else precision
        if precision == "bf16":
            if cpu_info()["bf16"] == "emulated":
                log.warning(bf16_note(cpu_info()))
            return Bf16Model(model), "fp32"
        if precision == "int8":
            return int8_model(model, config, data=data, threads=threads,
                              min_iou=min_iou), "fp32"
        return inference_copy(model), "fp32"
    return model, inference_precision(precision, device.type, device_capability(device),
                                      config.precision)


def int8_model(model: nn.Module, config: Mapping, *, data: str | os.PathLike | None = None,
               n: int = 32, threads: int | None = None, min_iou: float = 0.99) -> OrtModel:
    """The int8 ONNX Runtime model of a run's ``model``, calibrated on and checked against
    slices of its training data (:func:`calibration_inputs`, :func:`kvseg.export.export_int8`).
    Its ``int8_check`` attribute: the check's per-class mask IoU vs fp32, the largest
    probability difference and the slice counts (``min_iou`` 0 never refuses)."""
    config = _typed(config)
    calibration, check = calibration_inputs(config, data, n, flag="--data")
    with tempfile.TemporaryDirectory(prefix="kvseg-int8-") as tmp:
        path = Path(tmp) / "model-int8.onnx"
        report = export_int8(model, path, calibration=calibration, check=check, dynamic=True,
                             task=config.task, threshold=config.threshold, min_iou=min_iou,
                             name=config.model,
                             on_failure="pass --min-iou to accept a lower agreement")
        log.info("%s", report)
        ort = OrtModel(path.read_bytes(), threads)
    ort.int8_check = {"mask_iou": [float(v) for v in report.mask_iou],
                      "max_prob_diff": float(report.max_prob_diff),
                      "check_slices": len(check), "calibration_slices": len(calibration),
                      "min_iou": min_iou}
    return ort


def _typed(config: Mapping) -> RunConfig:
    """A run's config as :class:`RunConfig` (a plain mapping, e.g. ``load_run``'s, converted)."""
    return config if isinstance(config, RunConfig) else RunConfig.from_dict(config)


__all__ = ["CPU_PRECISIONS", "Bf16Model", "OrtModel", "bf16_note", "calibration_inputs",
           "cpu_info", "import_onnxruntime", "inference_copy", "int8_model", "ort_session",
           "prepare_for_inference"]
