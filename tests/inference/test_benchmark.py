"""kvseg benchmark: the JSON's fields, ratios recomputed from the same run's rows, the paths
planned, and bad options as one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from kvseg import cli
from kvseg.errors import ConfigError
from kvseg.inference.benchmark import InferencePath, add_ratios, benchmark, plan_paths

ROW_FIELDS = {"model", "family", "mode", "size", "img_size", "batch", "device", "backend",
              "precision", "median_ms", "p90_ms", "min_ms", "repeats", "threads", "images_per_s",
              "peak_mem_mib", "speedup", "vs_qkv_latency", "vs_qkv_throughput"}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """One CLI run on two micro SETR twins, every CPU path, batches 1 and 2."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    argv = ["benchmark", "--models", "setr_qkv", "setr_kv", "--size", "micro", "--img-size", "32",
            "--batch", "1", "2", "--onnx", "--precision", "fp32", "bf16", "int8", "--threads",
            "1", "--repeats", "2", "--out", str(out)]
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(argv)
    return rc, buf.getvalue(), json.loads(out.read_text())


def test_cli_prints_the_table_and_writes_the_json(bench):
    rc, text, result = bench
    assert rc == 0
    assert "| model | path | batch | median ms |" in text and "| family | mode / QKV |" in text
    assert "setr_kv | cpu onnxruntime int8 | 2 |" in text
    m = result["machine"]
    assert m["threads"] == 1 and m["cpu"] and m["bf16"] in ("amx", "avx512_bf16", "emulated")
    assert "1 thread(s)" in text and m["cpu"] in text
    assert result["settings"]["paths"] == ["cpu torch fp32", "cpu torch bf16",
                                           "cpu onnxruntime fp32", "cpu onnxruntime int8"]
    rows = result["rows"]
    assert len(rows) == 2 * 4 * 2
    for r in rows:
        assert ROW_FIELDS <= set(r), ROW_FIELDS - set(r)
        assert r["repeats"] == 2 and r["threads"] == 1 and r["median_ms"] > 0
        assert r["p90_ms"] >= r["median_ms"] >= r["min_ms"]
        assert r["images_per_s"] == pytest.approx(r["batch"] * 1000 / r["median_ms"])
        assert r["peak_mem_mib"] is None or r["peak_mem_mib"] >= 0
        if r["backend"] == "torch":
            assert r["peak_mem_mib"] > 0  # at least the weights


def test_ratios_come_from_the_same_runs_rows(bench):
    rows, ratios = bench[2]["rows"], bench[2]["ratios"]
    index = {(r["model"], r["backend"], r["precision"], r["batch"]): r for r in rows}
    assert len(ratios) == 4 * 2  # setr_kv over setr_qkv, per path and batch
    for q in ratios:
        kv = index[("setr_kv", q["backend"], q["precision"], q["batch"])]
        ref = index[("setr_qkv", q["backend"], q["precision"], q["batch"])]
        assert q["family"] == "setr" and q["mode"] == "kv"
        assert q["latency_ratio"] == pytest.approx(kv["median_ms"] / ref["median_ms"])
        assert q["throughput_ratio"] == pytest.approx(kv["images_per_s"] / ref["images_per_s"])
        assert kv["vs_qkv_latency"] == pytest.approx(q["latency_ratio"])
    for r in rows:
        fp32 = index[(r["model"], "torch", "fp32", r["batch"])]
        assert r["speedup"] == pytest.approx(r["images_per_s"] / fp32["images_per_s"])
        if r["model"] == "setr_qkv":
            assert r["vs_qkv_latency"] == pytest.approx(1.0)


def test_add_ratios_by_hand():
    def row(model, mode, backend, precision, batch, ms):
        return {"model": model, "family": "f", "mode": mode, "device": "cpu",
                "backend": backend, "precision": precision, "batch": batch, "median_ms": ms,
                "images_per_s": batch * 1000 / ms}

    rows = [row("f_qkv", "qkv", "torch", "fp32", 4, 100.0),
            row("f_kv", "kv", "torch", "fp32", 4, 80.0),
            row("f_qkv", "qkv", "onnxruntime", "int8", 4, 40.0),
            row("f_kv", "kv", "onnxruntime", "int8", 4, 30.0),
            row("f_kv", "kv", "torch", "bf16", 4, 50.0)]  # no QKV twin on this path
    ratios = add_ratios(rows)
    assert [(r["backend"], r["latency_ratio"], r["throughput_ratio"]) for r in ratios] == [
        ("torch", 0.8, 1.25), ("onnxruntime", 0.75, pytest.approx(4 / 3))]
    assert rows[3]["speedup"] == pytest.approx(80 / 30)  # over f_kv's torch fp32
    assert rows[2]["speedup"] == pytest.approx(100 / 40)
    assert rows[4]["vs_qkv_latency"] is None and rows[4]["speedup"] == pytest.approx(80 / 50)


def test_paths_always_have_the_torch_fp32_reference():
    paths, notes = plan_paths(["cpu", "cuda"], ["int8"], onnx=False)
    assert paths == [InferencePath("cpu", "torch", "fp32"),
                     InferencePath("cpu", "onnxruntime", "int8"),
                     InferencePath("cuda", "torch", "fp32")]
    assert notes and "CPU only" in notes[0]
    paths, notes = plan_paths(["cpu"], ["fp32", "bf16"], onnx=True)
    assert [p.label for p in paths] == ["cpu torch fp32", "cpu torch bf16",
                                        "cpu onnxruntime fp32"] and not notes


@pytest.mark.parametrize("argv, message", [
    (["--models", "setr_nope"], "--models 'setr_nope': unknown model"),
    (["--batch", "0"], "--batch=0: must be >= 1"),
    (["--precision", "fp16"], "--precision 'fp16'"),
    (["--device", "tpu"], "--device 'tpu'"),
    (["--size", "huge"], "--size 'huge'"),
])
def test_bad_options_are_one_line_errors(argv, message, capsys):
    rc = cli.main(["benchmark", "--size", "micro", "--img-size", "32", "--repeats", "1", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err, err


def test_library_raises_config_error():
    with pytest.raises(ConfigError, match="unknown model"):
        benchmark(["nope"], size="micro", img_size=32, repeats=1)
    with pytest.raises(ConfigError, match="--batch=0"):
        benchmark(["setr_kv"], size="micro", img_size=32, batches=[0], repeats=1)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            benchmark(["setr_kv"], size="micro", img_size=32, devices=["cuda"], repeats=1)
