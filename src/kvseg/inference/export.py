"""ONNX export of a trained run, checked against PyTorch with onnxruntime before it is written.

The graph takes ``image`` (batch, in_channels, height, width) float32, prepared exactly like
training input (:func:`kvseg.data.transforms.prepare_slices`), and returns ``logits``
(batch, num_classes, height, width); apply a sigmoid per class (multi-label). Without
``dynamic`` every dimension is fixed to (1, in_channels, img_size, img_size); with it the batch,
height and width are free.

Check: the exported file is run with onnxruntime (CPU) on a seeded standard-normal input — and,
when dynamic, also on a second input of another batch size, height and width — and the maximum
absolute difference to the PyTorch logits must stay below ``tolerance`` (1e-4). The file is
written (atomically) only if the check passes; otherwise :class:`ExportCheckError` says by how
much it failed.

int8 (``quantize="int8"``, :func:`export_int8`): the model, with the hybrid's weight
standardisation folded into its kernels (:func:`kvseg.inference.cpu.inference_copy`), is exported
and checked in fp32 as above, then quantised statically by ONNX Runtime (QDQ format, int8
weights per output channel, uint8 activations per tensor from min/max calibration on slices of
the run's training data; the convolutions and the weight matmuls). Three things stay float32:
the attention's activation-by-activation products and its softmax (8 bits cost accuracy there,
and ONNX Runtime's quantised softmax was slower than float32), and the classifier, the last
weighted layer before the logits (quantised, it alone lowered the mask IoU of a trained micro
SETR from 0.992-0.995 to 0.980-0.990). A quantised model cannot match
logits to 1e-4; what must hold is the segmentation: on other training slices (not those it was
calibrated on) the int8 masks (thresholded or argmax, as the run predicts) must overlap the
PyTorch fp32 masks with an IoU of at least ``min_iou`` (0.99) in every class, over all check
slices together (a class empty in both counts as 1). Otherwise nothing is written.

Exporters: ``"dynamo"`` is ``torch.onnx.export(dynamo=True)`` (``torch.export`` + onnxscript),
``"torchscript"`` the legacy tracer (``dynamo=False``). ``"auto"`` tries dynamo and, if it
raises, the TorchScript exporter; the report names the exporter used and why.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import re
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.export import Dim

from kvseg.errors import ConfigError, KvsegError
from kvseg.inference.cpu import calibration_inputs, cpu_info, inference_copy, ort_session
from kvseg.training.checkpoint import open_run
from kvseg.training.metrics import predicted_masks
from kvseg.utils import atomic_path

log = logging.getLogger(__name__)

EXPORTERS = ("auto", "dynamo", "torchscript")
_NOISY_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export")
OPSET = 18


class ExportError(KvsegError, ValueError):
    """An exporter failed on this model (the message names the root cause)."""


class ExportCheckError(ExportError):
    """The exported graph's output differs from PyTorch's by more than the tolerance."""


@dataclass
class ExportReport:
    """What :func:`export_model` wrote and how it was checked."""

    path: Path
    name: str
    exporter: str
    opset: int
    dynamic: bool
    tolerance: float
    checks: list[tuple[tuple[int, ...], float]] = field(default_factory=list)
    seconds: float = 0.0
    note: str = ""
    quantize: str | None = None
    calibration_slices: int = 0
    check_slices: int = 0
    mask_iou: list[float] = field(default_factory=list)
    min_iou: float | None = None
    max_prob_diff: float = float("nan")

    @property
    def max_abs_diff(self) -> float:
        return max(d for _, d in self.checks)

    @property
    def passed(self) -> bool:
        int8_ok = self.min_iou is None or not self.mask_iou or min(self.mask_iou) >= self.min_iou
        return self.max_abs_diff < self.tolerance and int8_ok

    def __str__(self) -> str:
        axes = "dynamic batch/height/width" if self.dynamic else "static shape"
        size_mb = self.path.stat().st_size / 2**20 if self.path.exists() else float("nan")
        lines = [f"exported {self.name} -> {self.path} ({size_mb:.1f} MB, {self.exporter} exporter,"
                 f" opset {self.opset}, {axes}, {self.seconds:.1f} s)"]
        if self.note:
            lines.append(f"note: {self.note}")
        graph = "fp32 graph before quantisation, " if self.quantize else ""
        for shape, diff in self.checks:
            lines.append(f"onnxruntime check ({graph}{tuple(shape)}): max abs diff {diff:.3g} "
                         f"({'<' if diff < self.tolerance else '>='} {self.tolerance:g}) "
                         f"{'OK' if diff < self.tolerance else 'FAILED'}")
        if self.quantize:
            lines.append(f"{self.quantize}: static QDQ, calibrated on {self.calibration_slices} "
                         "training slices")
        if self.mask_iou:
            worst = min(self.mask_iou)
            ok = self.min_iou is None or worst >= self.min_iou
            ious = ", ".join(f"{v:.4f}" for v in self.mask_iou)
            bound = "" if self.min_iou is None else f" ({'>=' if ok else '<'} {self.min_iou:g})"
            lines.append(f"{self.quantize} check on {self.check_slices} other slices: mask IoU "
                         f"vs PyTorch fp32 per class {ious}, min {worst:.4f}{bound}, max abs "
                         f"probability diff {self.max_prob_diff:.3g} {'OK' if ok else 'FAILED'}")
        return "\n".join(lines)


def export_onnx(run_dir: str | Path, onnx_path: str | Path, *, img_size: int | None = None,
                dynamic: bool = False, exporter: str = "auto", tolerance: float = 1e-4,
                quantize: str | None = None, calibration_data: str | Path | None = None,
                calibration_slices: int = 32, min_iou: float = 0.99) -> ExportReport:
    """Export ``RUN_DIR``'s best model to ``onnx_path`` and check it with onnxruntime.

    Args:
        run_dir: the training run folder.
        onnx_path: the ``.onnx`` file to write (only if the check passes).
        img_size: the input size (default: the run's training size); the input has the run's
            channel count.
        dynamic: free batch, height and width.
        exporter: ``auto``, ``dynamo`` or ``torchscript``.
        tolerance: max abs logit difference of the fp32 graph.
        quantize: None (fp32) or ``"int8"`` (:func:`export_int8`).
        calibration_data: int8: the dataset root to calibrate on (default: the run's data).
        calibration_slices: int8: training slices to calibrate on, and as many others to
            check on (:func:`kvseg.inference.cpu.calibration_inputs`).
        min_iou: int8: the least mask IoU per class against PyTorch fp32.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"--run {run_dir}: no such run folder")
    model, config = open_run(run_dir, map_location="cpu")
    size = int(img_size or config.img_size)
    if size < 16:
        raise ConfigError(f"--img-size {size}: expected at least 16")
    if quantize not in (None, "int8"):
        raise ConfigError(f"--quantize {quantize!r}: expected int8")
    if quantize == "int8":
        if Path(onnx_path).suffix.lower() != ".onnx":
            raise ConfigError(f"--onnx {onnx_path}: expected a file name ending in .onnx")
        calibration, check = calibration_inputs({**config, "img_size": size}, calibration_data,
                                                calibration_slices)
        return export_int8(model, onnx_path, calibration=calibration, check=check,
                           dynamic=dynamic, exporter="torchscript" if exporter == "auto"
                           else exporter, tolerance=tolerance,
                           task=config.task, threshold=config.threshold, min_iou=min_iou,
                           name=config.model)
    return export_model(model, onnx_path, input_shape=(1, config.in_channels, size, size),
                        dynamic=dynamic, exporter=exporter, tolerance=tolerance,
                        name=config.model)


def export_model(model: torch.nn.Module, onnx_path: str | Path, *,
                 input_shape: tuple[int, int, int, int], dynamic: bool = False,
                 exporter: str = "auto", tolerance: float = 1e-4, opset: int = OPSET,
                 name: str = "model") -> ExportReport:
    """Export any segmentation ``model`` (B, C, H, W) -> (B, K, H, W) and check it.

    ``input_shape`` is the example input's shape (its batch is 1 for a static export).
    Raises :class:`ExportCheckError` (nothing written) when onnxruntime disagrees with PyTorch
    by ``tolerance`` or more, and ``ValueError`` when the exporter(s) fail.
    """
    if exporter not in EXPORTERS:
        raise ConfigError(f"--exporter {exporter!r}: expected one of {', '.join(EXPORTERS)}")
    onnx_path = Path(onnx_path)
    if onnx_path.suffix.lower() != ".onnx":
        raise ConfigError(f"--onnx {onnx_path}: expected a file name ending in .onnx")
    model = model.eval()
    gen = torch.Generator().manual_seed(0)
    b, c, h, w = input_shape
    inputs = [torch.randn(*input_shape, generator=gen)]
    example = inputs[0]
    notes = []
    if dynamic:
        # Trace at a size other than img_size so that shape-dependent branches (the position
        # embedding's resize) are recorded; padding to the model's multiple is not traced, so
        # the graph needs height and width divisible by it.
        m = int(getattr(model, "input_multiple", 16))
        if h % m or w % m:
            raise ConfigError(f"--img-size {h}x{w}: a dynamic export needs multiples of {m}")
        example = torch.randn(1, c, h + m, w, generator=gen)
        inputs.append(torch.randn(b + 1, c, h + 2 * m, max(w - m, m), generator=gen))
        notes.append(f"dynamic graph: height and width must be multiples of {m}")
    start = time.perf_counter()
    with atomic_path(onnx_path) as tmp:
        used, note = _export(model, example, tmp, dynamic=dynamic, exporter=exporter, opset=opset)
        report = ExportReport(path=onnx_path, name=name, exporter=used, opset=opset,
                              dynamic=dynamic, tolerance=tolerance,
                              note="; ".join(notes + [note] if note else notes))
        report.checks = [(tuple(x.shape), _max_abs_diff(model, tmp, x)) for x in inputs]
        report.seconds = time.perf_counter() - start
        if not report.passed:
            raise ExportCheckError(
                f"ONNX check failed for {name}: max abs diff {report.max_abs_diff:.3g} >= "
                f"{tolerance:g} ({report.exporter} exporter); {onnx_path} not written")
    return report


def export_int8(model: torch.nn.Module, onnx_path: str | Path, *, calibration: np.ndarray,
                check: np.ndarray | None, dynamic: bool = False, exporter: str = "torchscript",
                tolerance: float = 1e-4, task: str = "multilabel", threshold: float = 0.5,
                min_iou: float | None = 0.99, name: str = "model",
                on_failure: str | None = None) -> ExportReport:
    """Export ``model`` to an int8 ONNX file, calibrated on ``calibration`` and checked on
    ``check`` (see the module docstring); nothing is written when a check fails.

    Args:
        model: the fp32 PyTorch model (the reference of the checks).
        onnx_path: the ``.onnx`` file to write.
        calibration: model inputs (N, C, H, W) float32 for the activation ranges; their
            (C, H, W) is the export's input shape.
        check: other inputs (M, C, H, W) on which the masks are compared (None: no check, for
            speed measurements on untrained models).
        dynamic: free batch, height and width.
        exporter: the fp32 exporter (``torchscript``: ~10x quicker than dynamo here).
        tolerance: max abs logit difference of the fp32 graph before quantisation.
        task: ``multilabel`` (sigmoid >= threshold) or ``multiclass`` (argmax).
        threshold: the run's sigmoid threshold.
        min_iou: the least mask IoU per class (None: report only).
        name: the model's name in the report.
        on_failure: the end of a failed check's message (default: ``ONNX_PATH not written``).
    """
    onnx_path = Path(onnx_path)
    if onnx_path.suffix.lower() != ".onnx":
        raise ConfigError(f"--onnx {onnx_path}: expected a file name ending in .onnx")
    calibration = np.ascontiguousarray(calibration, dtype=np.float32)
    if calibration.ndim != 4 or not len(calibration):
        raise ConfigError(f"calibration inputs of shape {calibration.shape}: expected (N, C, H, "
                          "W) with N >= 1")
    model = model.eval()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kvseg-int8-") as tmp:
        fp32_path = Path(tmp) / "fp32.onnx"
        report = export_model(inference_copy(model), fp32_path,
                              input_shape=(1, *calibration.shape[1:]), dynamic=dynamic,
                              exporter=exporter, tolerance=tolerance, name=name)
        report.path, report.quantize, report.min_iou = onnx_path, "int8", min_iou
        report.calibration_slices = len(calibration)
        with atomic_path(onnx_path) as out:
            quantize_int8(fp32_path, out, calibration, Path(tmp))
            if check is not None:
                report.check_slices = len(check)
                report.mask_iou, report.max_prob_diff = _mask_agreement(
                    model, out, np.ascontiguousarray(check, dtype=np.float32), task, threshold,
                    chunk=8 if dynamic else 1)
            report.seconds = time.perf_counter() - start
            if not report.passed:
                worst = math.floor(min(report.mask_iou) * 1e4) / 1e4  # 0.98996 is not 0.9900
                raise ExportCheckError(
                    f"int8 check failed for {name}: mask IoU vs PyTorch fp32 {worst:.4f} < "
                    f"{min_iou:g} on {len(check)} training slices; "
                    f"{on_failure or f'{onnx_path} not written'}")
    return report


def quantize_int8(src: Path, dst: Path, calibration: np.ndarray, workdir: Path) -> None:
    """Static QDQ int8 quantisation of the fp32 graph ``src`` into ``dst`` (see the module
    docstring for what is quantised), calibrated by min/max on ``calibration`` one slice at a
    time (a static graph takes batch 1)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(calibration[i:i + 1] for i in range(len(calibration)))

        def get_next(self):
            item = next(self.items, None)
            return None if item is None else {"image": item}

    pre = workdir / "pre.onnx"
    with _quiet(root=True):
        # constant folding and Conv+BatchNorm fusion first, so the fused kernels are quantised
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        graph = onnx.load(str(pre)).graph
        constants = {t.name for t in graph.initializer} | {
            o for n in graph.node if n.op_type == "Constant" for o in n.output}
        # attention's Q·Kᵀ and P·V: both operands are activations
        products = [n.name for n in graph.node
                    if n.op_type == "MatMul" and not constants.intersection(n.input)]
        quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        per_channel=True, reduce_range=cpu_info()["int8"] == "none",
                        op_types_to_quantize=list(_QUANTIZED),
                        nodes_to_exclude=products + _classifier(graph),
                        calibrate_method=CalibrationMethod.MinMax)


_QUANTIZED = ("Conv", "MatMul", "Gemm")


def _classifier(graph) -> list[str]:
    """The layers whose outputs reach the logits without another weighted layer between
    (walking back from the graph's outputs through resizes, slices and activations): kept in
    float32, as the first layers to flip a thresholded pixel."""
    producer = {o: n for n in graph.node for o in n.output}
    found, seen = [], set()
    stack = [o.name for o in graph.output]
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in _QUANTIZED:
            found.append(node.name)
        else:
            stack.extend(node.input)
    return found


def _mask_agreement(model: torch.nn.Module, path: Path, inputs: np.ndarray, task: str,
                    threshold: float, chunk: int) -> tuple[list[float], float]:
    """``(IoU per class of the ONNX masks against the PyTorch masks over all inputs together,
    max abs probability difference)``; a class empty in both has IoU 1."""
    session = ort_session(path)
    inter = union = None
    worst = 0.0
    for lo in range(0, len(inputs), chunk):
        x = inputs[lo:lo + chunk]
        got = torch.from_numpy(session.run(["logits"], {"image": x})[0])
        with torch.inference_mode():
            want = model(torch.from_numpy(x)).float()
        if got.shape != want.shape:
            raise ExportCheckError(f"ONNX output shape {tuple(got.shape)} != PyTorch "
                                   f"{tuple(want.shape)} for input {x.shape}")
        act = (lambda t: t.softmax(1)) if task == "multiclass" else torch.sigmoid
        worst = max(worst, float((act(got) - act(want)).abs().max()))
        a, b = predicted_masks(got, task, threshold), predicted_masks(want, task, threshold)
        dims = (0, *range(2, a.ndim))
        i, u = (a & b).sum(dims), (a | b).sum(dims)
        inter, union = (i, u) if inter is None else (inter + i, union + u)
    iou = [1.0 if int(u) == 0 else int(i) / int(u) for i, u in zip(inter, union, strict=True)]
    return iou, worst


def _export(model: torch.nn.Module, example: torch.Tensor, path: Path, *, dynamic: bool,
            exporter: str, opset: int) -> tuple[str, str]:
    """Run the chosen exporter; returns (exporter used, note on a fallback)."""
    if exporter in ("auto", "dynamo"):
        try:
            _export_dynamo(model, example, path, dynamic=dynamic, opset=opset)
            return "dynamo", ""
        except Exception as e:  # the dynamo exporter raises many types; report, then fall back
            reason = _reason(e)
            if exporter == "dynamo":
                raise ExportError(f"dynamo ONNX export failed: {reason}") from e
            log.warning("dynamo ONNX export failed (%s); using the TorchScript exporter", reason)
            note = f"dynamo exporter failed ({reason}); used the TorchScript exporter"
    else:
        note = ""
    try:
        _export_torchscript(model, example, path, dynamic=dynamic, opset=opset)
    except Exception as e:
        raise ExportError(f"TorchScript ONNX export failed: {e}") from e
    return "torchscript", note


def _reason(e: Exception) -> str:
    """One short line: the root cause the dynamo exporter lists under "Exception summary"."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    causes = [ln for ln in lines if ln.startswith("<class ")]
    line = causes[0] if causes else (lines[0] if lines else type(e).__name__)
    return line.replace("<class '", "").replace("'>", "", 1)[:200]


def _export_dynamo(model: torch.nn.Module, example: torch.Tensor, path: Path, *, dynamic: bool,
                   opset: int) -> None:
    shapes = ({0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO},) if dynamic else None
    with _quiet():
        program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=shapes,
                                    input_names=["image"], output_names=["logits"],
                                    opset_version=opset, optimize=True, verbose=False)
        program.save(str(path), external_data=False)


def _export_torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path, *,
                        dynamic: bool, opset: int) -> None:
    axes = {0: "batch", 2: "height", 3: "width"}
    with _quiet(), torch.no_grad():
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": axes, "logits": axes} if dynamic else None)


@contextlib.contextmanager
def _quiet(root: bool = False):
    """Silence the exporters' console chatter and deprecation warnings (kept in debug logs);
    ``root``: also the root logger, where ONNX Runtime's quantisation tools log."""
    buf = io.StringIO()
    loggers = [logging.getLogger(n) for n in _NOISY_LOGGERS + (("",) if root else ())]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
    if buf.getvalue():
        log.debug("exporter output:\n%s", buf.getvalue())


def _max_abs_diff(model: torch.nn.Module, path: Path, x: torch.Tensor) -> float:
    """Max |onnxruntime(x) - model(x)| over all logits."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise KvsegError("the ONNX check needs onnxruntime: pip install 'kvseg[onnx]'") from e

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"image": x.numpy()})
    with torch.inference_mode():
        want = model(x).float().numpy()
    if got.shape != want.shape:
        raise ExportCheckError(f"ONNX output shape {got.shape} != PyTorch {want.shape} "
                               f"for input {tuple(x.shape)}")
    return float(np.abs(got.astype(np.float32) - want).max())
