"""Attention maps by hooks (kvseg.inference.explain) and `kvseg attention`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import kvseg
from kvseg import cli
from kvseg.data import CLASSES
from kvseg.errors import ConfigError
from kvseg.inference.explain import attention_maps, attention_modules
from kvseg.training.checkpoint import save_model


def _model(name: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = kvseg.create_model(name, size="micro", img_size=64, **kw)
    with torch.no_grad():  # away from the near-uniform init, a random relative-position table
        for key, p in model.named_parameters():
            if ".attn." in key:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def _maps_and_inputs(model, x, **kw):
    """attention_maps(model, x, **kw) and the (args, kwargs) each attention module was called
    with during it (recorded by a hook of the test's own, registered first)."""
    seen, handles = {}, []
    for i, (_, module) in enumerate(attention_modules(model)):
        handles.append(module.register_forward_pre_hook(
            lambda m, args, kwargs, i=i: seen.__setitem__(i, (args, dict(kwargs))),
            with_kwargs=True))
    result = attention_maps(model, x, **kw)
    for h in handles:
        h.remove()
    return result, seen


@pytest.mark.parametrize("name", ["setr_qkv", "setr_kvpos", "setr_conv_sharedkv",
                                  "setr_cvt_kv", "setr_cvt_kvrelpos", "setr_single"])
def test_a_point_map_is_its_row_of_the_module_attention(name):
    model = _model(name)
    x = torch.randn(3, 64, 80)
    points = [(0, 0), (79, 63), (33.5, 20)]
    result, inputs = _maps_and_inputs(model, x, points=points)
    modules = attention_modules(model)
    assert result.num_layers == len(modules) == len(result.layers)
    for la in result.layers:
        sums = la.maps.sum(dim=(-2, -1))
        torch.testing.assert_close(sums, torch.ones_like(sums))  # rows sum to 1
        module = modules[la.index][1]
        args, kwargs = inputs[la.index]
        with torch.no_grad():
            _, attn = module(*args, **kwargs, return_attention=True)
        h, w = la.query_grid
        cell_h, cell_w = la.cell
        for p, (px, py) in enumerate(points):
            row = int(py // cell_h) * w + int(px // cell_w)
            torch.testing.assert_close(la.maps[p].flatten(1), attn[0, :, row], msg=la.name)


@pytest.mark.parametrize("name,zero", [("setr_kv", True), ("setr_single", True),
                                       ("setr_cvt_kv", True), ("setr_cvt_single", True),
                                       ("setr_qkv", False), ("setr_sharedkv", False),
                                       ("setr_sharedqv", False), ("setr_kvrelpos", False),
                                       ("setr_kvpos", False), ("setr_cvt_qkv", False)])
def test_symmetry_index_is_zero_exactly_for_the_q_equals_k_modes(name, zero):
    result = attention_maps(_model(name), torch.randn(3, 64, 64))
    for la in result.layers:
        if zero:
            assert max(la.symmetry) < 1e-5, la.name
        else:
            assert min(la.symmetry) > 1e-3, la.name


def test_distance_is_the_attention_weighted_pixel_distance():
    """Against a brute-force sum over every (query, key) pair of the last layer."""
    model = _model("setr_cvt_qkv", seed=3)
    x = torch.randn(3, 64, 64)
    result, inputs = _maps_and_inputs(model, x, layers=[-1])
    la = result.layers[0]
    module = attention_modules(model)[-1][1]
    args, kwargs = inputs[la.index]
    with torch.no_grad():
        _, attn = module(*args, **kwargs, return_attention=True)
    (h, w), (hk, wk), s = la.query_grid, la.key_grid, la.key_stride
    cy, cx = la.cell
    want = torch.zeros(attn.shape[1], dtype=torch.float64)
    for i in range(h * w):
        for j in range(hk * wk):
            dy = (i // w - s * (j // wk)) * cy
            dx = (i % w - s * (j % wk)) * cx
            want += attn[0, :, i, j].double() * (dy * dy + dx * dx) ** 0.5
    torch.testing.assert_close(torch.tensor(la.distance, dtype=torch.float64),
                               want / (h * w), rtol=1e-4, atol=1e-4)


def test_hooks_leave_the_model_as_it_was():
    model = _model("setr_kv").train()
    x = torch.randn(1, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        before = model(x)
    model.train()
    attention_maps(model, x, layers=[0, -1])
    assert model.training
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("kwargs,match", [
    ({"points": [(64, 3)]}, r"point 64,3: outside the 64×48 image"),
    ({"points": [(-1, 3)]}, "outside"),
    ({"layers": [4]}, "layer 4: out of range; the model has 4 attention layers"),
    ({"layers": [-5]}, "layer -5: out of range"),
])
def test_bad_points_and_layers_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        attention_maps(_model("setr_kv"), torch.randn(3, 48, 64), **kwargs)


# --------------------------------------------------------------------------- kvseg attention
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("attention_run")
    torch.manual_seed(0)
    model = kvseg.create_model("setr_cvt_kvrelpos", size="micro", img_size=32, in_channels=3)
    config = {"model": "setr_cvt_kvrelpos", "size": "micro", "img_size": 32, "in_channels": 3,
              "num_classes": 3, "context": 1, "classes": list(CLASSES)}
    save_model(run / "best.safetensors", model, config)
    image = run / "slice.png"
    Image.fromarray((np.random.default_rng(0).random((40, 50)) * 60000).astype(np.uint16)) \
        .save(image)
    return run


def test_cli_writes_the_png_and_the_json(run_dir, tmp_path, capsys):
    out = tmp_path / "att"
    rc = cli.main(["attention", "--run", str(run_dir), "--input", str(run_dir / "slice.png"),
                   "--points", "10,20", "49,0", "--layers", "0", "-1", "--out", str(out)])
    assert rc == 0
    assert "wrote" in capsys.readouterr().out
    png = np.asarray(Image.open(out / "attention.png"))
    assert png.ndim == 3 and png.shape[0] > 100
    record = json.loads((out / "attention.json").read_text())
    assert record["points_image_px"] == [[10.0, 20.0], [49.0, 0.0]]
    assert [la["index"] for la in record["layers"]] == [0, 3] and record["num_layers"] == 4
    for la in record["layers"]:
        assert len(la["symmetry"]) == len(la["distance_px"]) >= 1
        assert la["mode"] == "kv_relpos"


@pytest.mark.parametrize("argv,message", [
    (["--points", "50,3"], "point 50,3: outside the 50×40 image"),
    (["--points", "3;4"], "--points '3;4': expected x,y"),
    (["--layers", "9"], "layer 9: out of range; the model has 4 attention layers"),
])
def test_cli_errors_are_one_line(run_dir, tmp_path, capsys, argv, message):
    rc = cli.main(["attention", "--run", str(run_dir), "--input", str(run_dir / "slice.png"),
                   "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1, err
