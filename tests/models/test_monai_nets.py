"""The reference families (MONAI's DynUNet as nnU-Net's 2D U-Net, UNETR, SwinUNETR in 2D):
planning, sizes, and kvseg train / evaluate / export by name on a tiny synthetic twin."""

from __future__ import annotations

import json

import pytest
import torch
from monai.networks.nets import DynUNet, SwinUNETR

import kvseg
from helpers import cli_train_args, train_options
from kvseg import cli
from kvseg.errors import ConfigError
from kvseg.inference.profile import count_params
from kvseg.models.monai_nets import plan_unet

REFERENCE = ["dynunet", "unetr_qkv", "unetr_kv", "unetr_kvpos", "swinunetr_qkv",
             "swinunetr_kv", "swinunetr_kvpos"]


@pytest.mark.parametrize("size", [8, 48, 64, 96, 200, 256, 512])
def test_unet_plan_as_nnunet(size):
    """nnU-Net: halve while the edge is >= 2 × 4 (the min feature-map edge), so the bottleneck
    edge ceil(size / 2^n) lies in [4, 8); stage 0 stride 1; all kernels 3 × 3."""
    kernels, strides = plan_unet(size)
    n = len(strides) - 1
    bottleneck = size
    for _ in range(n):
        bottleneck = -(-bottleneck // 2)
    assert strides == [1] + [2] * n and kernels == [3] * (n + 1)
    assert 4 <= bottleneck < 8
    with pytest.raises(ConfigError, match="img_size=7"):
        plan_unet(7)


def test_dynunet_base_is_nnunet_2d():
    model = kvseg.create_model("dynunet", size="base", img_size=256)
    net = model.encoder
    assert isinstance(net, DynUNet) and net.filters == [32, 64, 128, 256, 512, 512, 512]
    assert net.strides == [1, 2, 2, 2, 2, 2, 2] and not net.deep_supervision
    norms = [m for m in net.modules() if isinstance(m, torch.nn.InstanceNorm2d)]
    acts = [m for m in net.modules() if isinstance(m, torch.nn.LeakyReLU)]
    assert norms and all(m.affine for m in norms)
    assert acts and all(m.negative_slope == 0.01 for m in acts)
    assert model.input_multiple == 64 and model.patch_report is None
    # the micro preset caps the filters lower
    assert kvseg.create_model("dynunet", size="micro", img_size=64).encoder.filters == [
        16, 32, 64, 128, 128]


def test_swinunetr_is_monai_with_kvseg_attention():
    """The QKV variant has exactly MONAI's parameter count (same config); inputs of any size
    are padded to a multiple of 32 (MONAI refuses others)."""
    model = kvseg.create_model("swinunetr_qkv", size="micro", img_size=64)
    monai = SwinUNETR(3, 3, feature_size=12, num_heads=(1, 2, 4, 8), spatial_dims=2)
    assert count_params(model) == count_params(monai)
    assert model.patch_report.replaced == {"WindowAttention": 8}
    with pytest.raises(ValueError, match="divisible"):
        monai(torch.randn(1, 3, 40, 56))
    assert model.predict(torch.randn(1, 3, 40, 56)).shape == (1, 3, 40, 56)


def test_unetr_takes_other_sizes_by_resizing():
    model = kvseg.create_model("unetr_kv", size="micro", img_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        same = model(x)
        torch.testing.assert_close(same, model.encoder(x))  # the built size: no resize
        assert model(torch.randn(2, 3, 50, 70)).shape == (2, 3, 50, 70)
    assert model.patch_report.replaced == {"SABlock": 12}


@pytest.fixture(scope="module")
def runs(synth, tmp_path_factory):
    """One kvseg train run (one step, micro, 64 px) per reference variant."""
    out = {}
    for name in REFERENCE:
        run = tmp_path_factory.mktemp(name)
        opts = train_options(synth, run, model=name, img_size=64, epochs=1,
                             max_steps_per_epoch=1, batch_size=2)
        assert cli.main(cli_train_args(opts)) == 0, name
        out[name] = run
    return out


@pytest.mark.parametrize("name", REFERENCE)
def test_train_evaluate_export_by_name(name, runs, tmp_path, capsys):
    run = runs[name]
    assert (run / "best.safetensors").is_file()
    report = tmp_path / "eval.json"
    assert cli.main(["evaluate", "--run", str(run), "--device", "cpu", "--out",
                     str(report)]) == 0
    assert 0 <= json.loads(report.read_text())["mean"]["jaccard"] <= 1
    onnx_path = tmp_path / f"{name}.onnx"
    assert cli.main(["export", "--run", str(run), "--onnx", str(onnx_path), "--exporter",
                     "torchscript"]) == 0
    text = capsys.readouterr().out  # the export checks ONNX Runtime against PyTorch to 1e-4
    assert "max abs diff" in text and "OK" in text and onnx_path.is_file()


@pytest.mark.parametrize("name", ["dynunet", "unetr_kv", "swinunetr_kvpos"])
def test_profile_by_name(name, capsys):
    assert cli.main(["profile", "--models", name, "--size", "micro", "--img-size", "64",
                     "--format", "json"]) == 0
    row = json.loads(capsys.readouterr().out)["rows"][0]
    model = kvseg.create_model(name, size="micro", img_size=64)
    assert row["params"] == count_params(model) and row["macs"] > 0
    assert (row["params_reduction_pct"] is None) == (name == "dynunet")
