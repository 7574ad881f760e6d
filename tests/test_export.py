"""kvseg export: every family and attention mode round-trips through onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from kvseg import cli, create_model, list_models
from kvseg.checkpoint import save_model
from kvseg.data import CLASSES
from kvseg.export import ExportCheckError, export_model
from kvseg.models.registry import model_info


def _ort_logits(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def test_every_family_and_mode_is_covered():
    combos = {(model_info(n)["family"], model_info(n)["mode"]) for n in list_models()}
    assert len(combos) == 9 and {m for _, m in combos} == {"qkv", "kv", "kv_pos"}


@pytest.mark.parametrize("name", list_models())
def test_dynamic_export_matches_pytorch(name, tmp_path):
    torch.manual_seed(0)
    model = create_model(name, size="micro", img_size=32).eval()
    path = tmp_path / f"{name}.onnx"
    # the TorchScript exporter takes ~1 s per micro model here, torch.export ~20 s
    report = export_model(model, path, input_shape=(1, 3, 32, 32), dynamic=True,
                          exporter="torchscript", name=name)
    assert report.passed and report.max_abs_diff < 1e-4 and len(report.checks) == 2
    onnx.checker.check_model(str(path))
    # an input the export never saw: other batch, height and width (multiples of 16)
    x = torch.randn(3, 3, 48, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x).numpy()
    got = _ort_logits(path, x)
    assert got.shape == (3, 3, 48, 64)
    assert np.abs(got - want).max() < 1e-4


@pytest.mark.slow
def test_default_exporter_round_trips(tmp_path):
    """``auto`` (torch.export first) on one variant, static shape; its report says which
    exporter ran."""
    model = create_model("setr_kv", size="micro", img_size=32).eval()
    report = export_model(model, tmp_path / "m.onnx", input_shape=(1, 3, 32, 32))
    assert report.exporter in ("dynamo", "torchscript") and report.passed
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        np.testing.assert_allclose(_ort_logits(tmp_path / "m.onnx", x), model(x).numpy(),
                                   atol=1e-4)


class TracingDiffers(nn.Module):
    """Behaves differently while traced, so the exported graph is wrong by 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1.0 if torch.jit.is_tracing() else x


def test_a_wrong_graph_fails_the_check_and_writes_nothing(tmp_path):
    path = tmp_path / "bad.onnx"
    with pytest.raises(ExportCheckError, match="max abs diff 1 >= 0.0001"):
        export_model(TracingDiffers(), path, input_shape=(1, 3, 16, 16), exporter="torchscript")
    assert not path.exists() and not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("export_run")
    model = create_model("setr_kvpos", size="micro", img_size=32, in_channels=3)
    config = {"model": "setr_kvpos", "size": "micro", "img_size": 32, "in_channels": 3,
              "num_classes": 3, "context": 1, "classes": list(CLASSES)}
    save_model(run / "best.safetensors", model, config)
    return run


def test_cli_exports_a_run_and_prints_the_check(run_dir, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    rc = cli.main(["export", "--run", str(run_dir), "--onnx", str(out), "--exporter",
                   "torchscript"])
    text = capsys.readouterr().out
    assert rc == 0 and out.is_file()
    assert "max abs diff" in text and "OK" in text
    inputs = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).get_inputs()
    assert inputs[0].shape == [1, 3, 32, 32]  # the run's channels (context 1) and img_size


@pytest.mark.parametrize("argv, message", [
    (["--run", "{missing}", "--onnx", "{tmp}/m.onnx"], "no such run folder"),
    (["--run", "{run}", "--onnx", "{tmp}/m.txt"], "ending in .onnx"),
    (["--run", "{run}", "--onnx", "{tmp}/m.onnx", "--img-size", "36", "--dynamic"],
     "multiples of"),
    (["--run", "{tmp}", "--onnx", "{tmp}/m.onnx"], "no best.safetensors"),
])
def test_cli_errors_exit_2_with_one_line(run_dir, tmp_path, capsys, argv, message):
    argv = [a.format(missing=tmp_path / "nope", tmp=tmp_path, run=run_dir) for a in argv]
    rc = cli.main(["export", *argv, "--exporter", "torchscript"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and message in err, err
