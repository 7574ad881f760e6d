"""The hybrid's R50 follows TransUNet's ResNetV2: weight standardisation, GroupNorm(32), an
unpadded max-pool with a zero-padded skip, and the parameter count of the official model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kvseg
from kvseg.inference.profile import build_on_meta, count_params
from kvseg.models.conv_hybrid import ResNetV2, StdConv2d


def test_stdconv_standardises_each_output_kernel():
    torch.manual_seed(0)
    conv = StdConv2d(4, 6, 3, 2, 1, bias=False)
    w = conv.weight.detach()
    mean = w.mean(dim=(1, 2, 3), keepdim=True)
    var = ((w - mean) ** 2).mean(dim=(1, 2, 3), keepdim=True)  # biased, as TransUNet
    x = torch.randn(2, 4, 9, 11)
    want = F.conv2d(x, (w - mean) / torch.sqrt(var + 1e-5), None, 2, 1)
    torch.testing.assert_close(conv(x), want)


@pytest.mark.parametrize("norm", ["gn", "bn"])
def test_parameter_count_is_transunets(norm):
    model = build_on_meta("setr_conv_qkv", size="base", img_size=224, num_classes=2, norm=norm)
    assert count_params(model) == 105_276_066


def test_base_uses_groupnorm_32_and_weight_standardisation():
    cnn = build_on_meta("setr_conv_qkv", size="base", img_size=224).encoder.cnn
    assert isinstance(cnn.root_conv, StdConv2d) and cnn.pool.padding == 0
    norms = [m for m in cnn.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 32 and m.eps == 1e-6 for m in norms)
    unit = cnn.stages[1][0]
    assert isinstance(unit.proj_norm, torch.nn.GroupNorm) and unit.proj_norm.num_groups == 32


@pytest.mark.parametrize("h,w", [(224, 224), (256, 256), (48, 80), (16, 16)])
def test_skips_have_the_decoders_sizes_and_the_quarter_skip_is_zero_padded(h, w):
    torch.manual_seed(0)
    cnn = ResNetV2(3, 16, (1, 1, 1)).eval()
    with torch.no_grad():
        feats = cnn(torch.randn(1, 3, h, w))
        pooled = cnn.pool(F.relu(cnn.root_norm(cnn.root_conv(torch.randn(1, 3, h, w)))))
    assert [tuple(f.shape[-2:]) for f in feats] == [(h // s, w // s) for s in (2, 4, 8, 16)]
    assert tuple(pooled.shape[-2:]) == (h // 4 - 1, w // 4 - 1)  # TransUNet: 224 -> 112 -> 55
    quarter = feats[1]
    assert torch.all(quarter[..., -1, :] == 0) and torch.all(quarter[..., :, -1] == 0)
    assert quarter[..., :-1, :-1].abs().sum() > 0


@pytest.mark.parametrize("hw", [(65, 77), (224, 224), (33, 16)])
def test_any_input_size(hw):
    model = kvseg.create_model("setr_conv_kv", size="micro", img_size=64, num_classes=2).eval()
    assert model(torch.randn(1, 3, *hw)).shape == (1, 2, *hw)


def test_unknown_norm_is_a_config_error():
    with pytest.raises(ValueError, match="norm='ln'"):
        kvseg.create_model("setr_conv_kv", size="micro", norm="ln")
