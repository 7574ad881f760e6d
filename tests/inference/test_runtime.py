"""kvseg.inference.runtime: CPU feature detection, the fp32/bf16 model copies, and predict's CPU
paths (bf16 weights, int8 through ONNX Runtime calibrated on the run's training slices)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import kvseg
from kvseg import cli
from kvseg.data import CLASSES
from kvseg.inference.runtime import (
    Bf16Model,
    OrtModel,
    cpu_info,
    inference_copy,
    prepare_for_inference,
)
from kvseg.training.checkpoint import save_model


@pytest.mark.parametrize("flags, bf16, int8", [
    ("fpu avx2 avx512f avx512_bf16 avx512_vnni amx_tile amx_bf16 amx_int8", "amx", "amx"),
    ("fpu avx2 avx512f avx512_bf16 avx512_vnni", "avx512_bf16", "vnni"),
    ("fpu avx2 avx_vnni", "emulated", "vnni"),
    ("fpu sse4_2", "emulated", "none"),
])
def test_cpu_features_from_cpuinfo(flags, bf16, int8):
    text = (f"processor\t: 0\nmodel name\t: Some CPU @ 2.0GHz\nflags\t\t: {flags}\n\n"
            "processor\t: 1\n")
    info = cpu_info(text)
    assert info["name"] == "Some CPU @ 2.0GHz"
    assert (info["bf16"], info["int8"]) == (bf16, int8)
    assert set(info["flags"]) <= set(flags.split())


def test_cpu_model_copies_compute_the_same_function():
    """The folded weight standardisation is exact; bf16 weights stay close."""
    import kvseg

    model = kvseg.create_model("setr_conv_kv", size="micro", img_size=32).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        want = model(x)
        torch.testing.assert_close(inference_copy(model)(x), want, atol=1e-5, rtol=1e-4)
        got = Bf16Model(model)(x)
    assert got.dtype == torch.float32 and (got - want).abs().max() < 0.05
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the original untouched


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """An untrained micro run on a 3-case synthetic twin (its dataset: the calibration)."""
    from kvseg.data.synth import generate

    base = tmp_path_factory.mktemp("runtime_run")
    generate(base / "data", cases=3, days=1, slices=6, seed=0)
    torch.manual_seed(0)
    model = kvseg.create_model("setr_cvt_kv", size="micro", img_size=32, in_channels=3)
    config = {"model": "setr_cvt_kv", "size": "micro", "img_size": 32, "in_channels": 3,
              "num_classes": 3, "context": 1, "classes": list(CLASSES),
              "data": str(base / "data"), "n_folds": 3, "fold": 0}
    save_model(base / "run" / "best.safetensors", model, config)
    return base / "run"


def test_prepare_for_inference_picks_the_cpu_path(run):
    from kvseg.training.checkpoint import load_run

    model, config = load_run(run)
    cpu = torch.device("cpu")
    fp32, p = prepare_for_inference(model, config, "auto", cpu)
    assert p == "fp32" and fp32 is not model and not isinstance(fp32, (Bf16Model, OrtModel))
    bf16, p = prepare_for_inference(model, config, "bf16", cpu)
    assert p == "fp32" and isinstance(bf16, Bf16Model)
    # int8 is refused with a one-line reason when its masks disagree too much with fp32's
    from kvseg.inference.export import ExportCheckError

    with pytest.raises(ExportCheckError, match="int8 check failed"):
        import kvseg.inference.runtime as R

        R.int8_model(model, config, n=2, min_iou=1.01)
    int8 = R.int8_model(model, config, n=2, min_iou=0.0)
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        want, got = model(x), int8(x)
    assert got.shape == want.shape and (got - want).abs().max() < 0.5
    with pytest.raises(kvseg.errors.ConfigError, match="runs on the CPU"):
        prepare_for_inference(model, config, "int8", torch.device("cuda"))


def test_cli_predict_in_bf16_and_int8(run, tmp_path, capsys):
    """predict --precision int8 on the CPU writes the masks of the quantised model; an
    untrained model's logits crowd the threshold, so its agreement is below the default
    --min-iou 0.99: refused in one line naming the flag (not a temporary file), accepted with
    a lower --min-iou."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 36), dtype=np.uint8)).save(images / f"{i}.png")
    args = ["predict", "--run", str(run), "--input", str(images), "--device", "cpu"]
    assert cli.main([*args, "--out", str(tmp_path / "refused"), "--precision", "int8"]) == 2
    err = capsys.readouterr().err.strip()
    assert "int8 check failed" in err and "--min-iou" in err and "kvseg-int8" not in err
    assert len(err.splitlines()) == 1
    masks = {}
    for precision in ("fp32", "bf16", "int8"):
        out = tmp_path / precision
        min_iou = ["--min-iou", "0.8"] if precision == "int8" else []  # int8's check only
        assert cli.main([*args, "--out", str(out), "--precision", precision, *min_iou]) == 0
        masks[precision] = np.stack([np.asarray(Image.open(out / "masks" / f"{i}.png"))
                                     for i in range(2)])
    assert masks["int8"].shape == masks["fp32"].shape == (2, 40, 36)
    for precision in ("bf16", "int8"):
        assert (masks[precision] == masks["fp32"]).mean() > 0.8, precision


def test_cli_evaluate_scores_the_cpu_path_it_is_asked_for(run, tmp_path, capsys):
    """evaluate --precision bf16/int8 on the CPU scores predict's bf16-weights and int8 ONNX
    Runtime models (not an autocast of the fp32 model), says which in the result and, for
    int8, records predict's agreement check instead of refusing the model; fp16 on the CPU is
    one line naming --precision."""
    results = {}
    for precision in ("fp32", "bf16", "int8"):
        out = tmp_path / f"{precision}.json"
        assert cli.main(["evaluate", "--run", str(run), "--device", "cpu", "--precision",
                         precision, "--out", str(out)]) == 0
        results[precision] = json.loads(out.read_text())
    assert [results[p]["precision"] for p in results] == ["fp32", "bf16", "int8"]
    check = results["int8"]["int8_check"]
    assert len(check["mask_iou"]) == 3 and check["check_slices"] >= 1 and check["min_iou"] == 0
    assert "int8_check" not in results["fp32"] and "int8_check" not in results["bf16"]
    fp32 = results["fp32"]["mean"]["jaccard"]
    for precision in ("bf16", "int8"):  # an untrained model: scores near, not equal
        assert abs(results[precision]["mean"]["jaccard"] - fp32) < 0.1, precision
    capsys.readouterr()
    assert cli.main(["evaluate", "--run", str(run), "--device", "cpu", "--precision",
                     "fp16", "--out", str(tmp_path / "fp16.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --precision fp16: needs a CUDA device") or \
        "--precision fp16: needs a CUDA device" in err, err
    assert "amp" not in err and len(err.splitlines()) == 1


def test_ort_model_runs_a_batch_in_pieces_with_the_same_result(tmp_path):
    from kvseg.inference.export import export_model

    model = kvseg.create_model("setr_kv", size="micro", img_size=32).eval()
    export_model(model, tmp_path / "m.onnx", input_shape=(1, 3, 32, 32), dynamic=True,
                 exporter="torchscript")
    x = torch.rand(5, 3, 32, 32)
    whole = OrtModel(tmp_path / "m.onnx", max_batch=None)(x)
    for step in (1, 2):
        torch.testing.assert_close(OrtModel(tmp_path / "m.onnx", max_batch=step)(x), whole,
                                   atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(whole, model(x), atol=1e-4, rtol=1e-4)
