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

Exporters: ``"dynamo"`` is ``torch.onnx.export(dynamo=True)`` (``torch.export`` + onnxscript),
``"torchscript"`` the legacy tracer (``dynamo=False``). ``"auto"`` tries dynamo and, if it
raises, the TorchScript exporter; the report names the exporter used and why.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kvseg.errors import ConfigError, KvsegError
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

    @property
    def max_abs_diff(self) -> float:
        return max(d for _, d in self.checks)

    @property
    def passed(self) -> bool:
        return self.max_abs_diff < self.tolerance

    def __str__(self) -> str:
        axes = "dynamic batch/height/width" if self.dynamic else "static shape"
        size_mb = self.path.stat().st_size / 2**20 if self.path.exists() else float("nan")
        lines = [f"exported {self.name} -> {self.path} ({size_mb:.1f} MB, {self.exporter} exporter,"
                 f" opset {self.opset}, {axes}, {self.seconds:.1f} s)"]
        if self.note:
            lines.append(f"note: {self.note}")
        for shape, diff in self.checks:
            lines.append(f"onnxruntime check {tuple(shape)}: max abs diff {diff:.3g} "
                         f"({'<' if diff < self.tolerance else '>='} {self.tolerance:g}) "
                         f"{'OK' if diff < self.tolerance else 'FAILED'}")
        return "\n".join(lines)


def export_onnx(run_dir: str | Path, onnx_path: str | Path, *, img_size: int | None = None,
                dynamic: bool = False, exporter: str = "auto",
                tolerance: float = 1e-4) -> ExportReport:
    """Export ``RUN_DIR``'s best model to ``onnx_path`` and check it with onnxruntime.

    ``img_size`` defaults to the run's training size; the input has the run's channel count
    (2·context + 1).
    """
    from kvseg.checkpoint import load_run

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"--run {run_dir}: no such run folder")
    model, config = load_run(run_dir, map_location="cpu")
    size = int(img_size or config["img_size"])
    if size < 16:
        raise ConfigError(f"--img-size {size}: expected at least 16")
    in_channels = int(config.get("in_channels") or 2 * int(config.get("context", 0) or 0) + 1)
    return export_model(model, onnx_path, input_shape=(1, in_channels, size, size),
                        dynamic=dynamic, exporter=exporter, tolerance=tolerance,
                        name=str(config.get("model", run_dir.name)))


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
    from torch.export import Dim

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
def _quiet():
    """Silence the exporters' console chatter and deprecation warnings (kept in debug logs)."""
    buf = io.StringIO()
    loggers = [logging.getLogger(n) for n in _NOISY_LOGGERS]
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
