"""Loading weights files: kvseg checkpoints by name, the official layouts through converters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from official_files import (
    cvt_state,
    timm_vit_state,
    transunet_arrays,
    write_cvt,
    write_google_vit,
    write_timm_vit,
    write_transunet,
)
from safetensors.torch import save_file

import kvseg
from kvseg.errors import CheckpointError
from kvseg.models.pretrained import detect_layout, load_pretrained, read_tensors

MODES = ("qkv", "kv", "kvpos")


def _micro(name="setr_kv", **kw):
    torch.manual_seed(kw.pop("seed", 0))
    return kvseg.create_model(name, size=kw.pop("size", "micro"), img_size=kw.pop("img_size", 64),
                              **kw)


# --------------------------------------------------------------------------- kvseg layout
def test_safetensors_round_trip_reproduces_outputs(tmp_path):
    src = _micro(seed=1).eval()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    dst = kvseg.create_model("setr_kv", size="micro", img_size=64, pretrained=str(path)).eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    assert dst.pretrained_report.layout == "kvseg"


def test_other_class_count_loads_everything_but_the_head(tmp_path):
    src = _micro(seed=1, num_classes=3)
    path = tmp_path / "ddp.pt"
    # a DDP-style checkpoint: "module." prefix, nested under "model"
    torch.save({"model": {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": 3},
               path)
    dst = _micro(seed=2, num_classes=2)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    report = load_pretrained(dst, path)
    src_sd, dst_sd = src.state_dict(), dst.state_dict()
    differ = [k for k in dst_sd if dst_sd[k].shape != src_sd[k].shape]
    assert differ, "the classifier must differ in shape"
    for k, v in dst_sd.items():
        expected = before[k] if k in differ else src_sd[k]
        assert torch.equal(v, expected), k
    assert sorted(report.skipped) == sorted(differ)
    assert all("shape" in why for why in report.skipped.values())
    assert len(report.loaded) == len(dst_sd) - len(differ)


def test_strict_load_refuses_a_partial_match(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(_micro(num_classes=3).state_dict(), path)
    with pytest.raises(CheckpointError, match="strict"):
        load_pretrained(_micro(num_classes=2), path, strict=True)


def test_bad_files_get_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_pretrained(_micro(), tmp_path / "nope.pt")
    for name, payload in [("junk.pt", b"not a checkpoint"), ("junk.npz", b"PK\x03\x04broken"),
                          ("junk.safetensors", b"\x10\x00")]:
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(CheckpointError, match=name) as e:
            load_pretrained(_micro(), tmp_path / name)
        assert len(str(e.value).splitlines()) == 1
    foreign = tmp_path / "foreign.pt"
    torch.save({"encoder.other.weight": torch.zeros(3)}, foreign)
    with pytest.raises(CheckpointError, match="foreign.pt.*no tensor matches"):
        load_pretrained(_micro(), foreign)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, obj=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CheckpointError, match="pickled.npz"):  # allow_pickle=False
        load_pretrained(_micro(), pickled)


def test_a_kvseg_file_of_another_family_or_size_is_refused_naming_what_it_is(tmp_path):
    """Not '1 tensor loaded, 141 skipped' and training from scratch: one line naming the file,
    how much of the encoder it supplies, and which model it fits."""
    from kvseg.checkpoint import save_model

    cvt = _micro("setr_cvt_kv")
    save_model(tmp_path / "best.safetensors", cvt, {"model": "setr_cvt_kv", "size": "micro",
                                                    "img_size": 64})
    torch.save(cvt.state_dict(), tmp_path / "cvt.pt")
    torch.save(_micro("setr_kv", size="small").state_dict(), tmp_path / "small.pt")
    for file, looks in [("best.safetensors", "a kvseg setr_cvt_kv model (size micro"),
                        ("cvt.pt", "a kvseg setr_cvt checkpoint (kv)"),
                        ("small.pt", "a kvseg setr checkpoint (kv)")]:
        with pytest.raises(CheckpointError) as e:
            load_pretrained(_micro("setr_kv"), tmp_path / file)
        msg = str(e.value)
        assert len(msg.splitlines()) == 1 and msg.startswith(str(tmp_path / file)), msg
        assert "does not fit setr_kv" in msg and "of the encoder's weights" in msg, msg
        assert looks in msg, msg
    with pytest.raises(CheckpointError, match=r"small.pt.*another shape \(first: "):
        load_pretrained(_micro("setr_kv"), tmp_path / "small.pt")


def test_a_kvseg_file_of_another_mode_loads_most_of_the_encoder_with_a_warning(tmp_path, caplog):
    """A QKV checkpoint into a KV model supplies all but the attention's key/value projections:
    accepted (well above MIN_ENCODER_SHARE), and the tensors left at their init are a warning."""
    path = tmp_path / "qkv.pt"
    torch.save(_micro("setr_qkv").state_dict(), path)
    with caplog.at_level("WARNING", logger="kvseg.models.pretrained"):
        report = load_pretrained(_micro("setr_kv"), path)
    assert "encoder.blocks.0.attn.kv.weight" in report.missing
    assert any("keep their initialisation" in r.getMessage() and "attn.kv" in r.getMessage()
               for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="kvseg.models.pretrained"):  # same model: no warning
        load_pretrained(_micro("setr_qkv"), path)
    assert not caplog.records


# --------------------------------------------------------------------------- official layouts
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("official")
    write_timm_vit(d / "vit.pth")
    write_google_vit(d / "ViT-B_16.npz")
    write_transunet(d / "R50+ViT-B_16.npz")
    write_cvt(d / "CvT-13.pth")
    save_file(timm_vit_state(), str(d / "vit.safetensors"))
    return d


def test_layouts_are_detected(files):
    assert detect_layout(read_tensors(files / "vit.pth")) == "timm_vit"
    assert detect_layout(read_tensors(files / "vit.safetensors")) == "timm_vit"
    assert detect_layout(read_tensors(files / "ViT-B_16.npz")) == "google_vit"
    assert detect_layout(read_tensors(files / "R50+ViT-B_16.npz")) == "transunet_r50_vit"
    assert detect_layout(read_tensors(files / "CvT-13.pth")) == "microsoft_cvt"


KV_ONLY = {"setr_cvt": lambda k: k.startswith("stage") and ".conv_proj_q." in k}


@pytest.mark.parametrize("family,file,dropped", [
    ("setr", "vit.pth", {"cls_token", "head.weight", "head.bias", "norm.weight", "norm.bias"}),
    ("setr", "ViT-B_16.npz", {"cls_token", "head.weight", "head.bias", "norm.weight",
                              "norm.bias"}),
    ("setr_conv", "R50+ViT-B_16.npz", {"cls_token", "head.weight", "head.bias",
                                       "pre_logits.fc.weight", "pre_logits.fc.bias"}),
    ("setr_cvt", "CvT-13.pth", {"stage2.cls_token", "norm.weight", "norm.bias", "head.weight",
                                "head.bias"}),
])
@pytest.mark.parametrize("mode", MODES)
def test_every_tensor_is_consumed_or_dropped_with_a_reason(files, family, file, dropped, mode):
    model = _micro(f"{family}_{mode}")
    own = model.state_dict()
    report = load_pretrained(model, files / file)
    extra = {k for k in report.skipped if k not in dropped}
    if mode == "qkv" or family != "setr_cvt":
        assert set(report.skipped) == dropped
    else:  # KV CvT: the query branch's conv and BatchNorm have no slot
        assert extra and all(KV_ONLY["setr_cvt"](k) for k in extra)
    assert all(report.skipped.values())
    enc = {k for k in own if k.startswith("encoder.")}
    fresh = {k for k in enc if k.endswith("num_batches_tracked")
             or (family == "setr" and k.startswith("encoder.norm."))}
    assert set(report.loaded) | set(report.converted) >= enc - fresh
    assert {k for k in report.missing if k.startswith("encoder.")} <= fresh
    if mode != "qkv":
        assert len(report.kv) == len([k for k in enc if k.endswith("proj_k.weight")
                                      or k.endswith("attn.kv.weight")])


@pytest.mark.parametrize("mode", MODES)
def test_timm_and_google_files_give_identical_outputs(files, mode):
    a = _micro(f"setr_{mode}", seed=5, pretrained=str(files / "vit.pth")).eval()
    b = _micro(f"setr_{mode}", seed=5, pretrained=str(files / "ViT-B_16.npz")).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    assert a.pretrained_report.layout == "timm_vit"
    assert b.pretrained_report.layout == "google_vit"


@pytest.mark.parametrize("name,file", [("setr_qkv", "ViT-B_16.npz"),
                                       ("setr_conv_qkv", "R50+ViT-B_16.npz")])
def test_google_kernels_count_as_converted_not_loaded_verbatim(files, name, file):
    """Google's (in, out), HWIO and (D, heads, head_dim) kernels are transposed/reshaped: the
    report says converted; norms and plain biases are the file's own (loaded)."""
    report = _micro(name, pretrained=str(files / file)).pretrained_report
    assert not set(report.loaded) & set(report.converted)
    enc = "encoder.blocks.1."
    for key in ("attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "mlp.fc1.weight",
                "mlp.fc2.weight"):
        assert enc + key in report.converted, key
    assert any(k.startswith("encoder.patch_embed") and k.endswith("weight")
               for k in report.converted)
    for key in ("norm1.weight", "attn.proj.bias", "mlp.fc1.bias"):
        assert enc + key in report.loaded, key
    timm = _micro(name.replace("conv_", ""), pretrained=str(files / "vit.pth")).pretrained_report
    assert enc + "attn.qkv.weight" in timm.loaded  # timm's layout is PyTorch's: verbatim


def test_qkv_tensors_load_verbatim_and_the_rest_stays_fresh(files):
    sd = timm_vit_state()
    fresh = _micro("setr_qkv", seed=9)
    model = _micro("setr_qkv", seed=9, pretrained=str(files / "vit.pth"))
    got = model.state_dict()
    for i in range(4):
        for name in ("attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "mlp.fc1.weight",
                     "norm1.weight"):
            assert torch.equal(got[f"encoder.blocks.{i}.{name}"], sd[f"blocks.{i}.{name}"])
    assert torch.equal(got["encoder.patch_embed.proj.weight"], sd["patch_embed.proj.weight"])
    for k, v in fresh.state_dict().items():
        if not k.startswith("encoder."):
            assert torch.equal(got[k], v), k


@pytest.mark.parametrize("head", ["naive", "pup", "mla"])
def test_setr_drops_timms_final_norm_as_setr_does(files, head):
    """SETR's backbone has no final norm (its loader drops norm.*); naive/PUP's head applies a
    LayerNorm of its own, freshly initialised: kvseg's encoder.norm starts fresh (1, 0)."""
    model = _micro("setr_kv", head=head, pretrained=str(files / "vit.pth"))
    report = model.pretrained_report
    assert {"norm.weight", "norm.bias"} <= set(report.skipped)
    assert "SETR" in report.skipped["norm.weight"]
    if head == "mla":
        assert model.encoder.norm is None
        return
    assert torch.equal(model.encoder.norm.weight.data, torch.ones(96))
    assert torch.equal(model.encoder.norm.bias.data, torch.zeros(96))
    assert "fresh" in report.missing["encoder.norm.weight"]


def test_the_hybrid_keeps_the_final_norm_as_transunet(files):
    """TransUNet's encoder has encoder_norm and its load_from loads it."""
    arrays = transunet_arrays()
    model = _micro("setr_conv_kv", pretrained=str(files / "R50+ViT-B_16.npz"))
    assert torch.equal(model.encoder.norm.weight.data,
                       torch.from_numpy(arrays["Transformer/encoder_norm/scale"]))
    assert "norm.weight" not in model.pretrained_report.skipped


def test_position_table_is_the_original_at_the_native_grid_and_bicubic_elsewhere(files):
    sd = timm_vit_state()
    grid = sd["pos_embed"][0, 1:].T.reshape(1, 96, 8, 8)  # row-major 8 × 8, class row dropped
    native = _micro("setr_qkv", img_size=64, pretrained=str(files / "vit.pth"))
    assert torch.equal(native.encoder.pos_embed.weight.data, grid)
    for img_size, g in [(96, 12), (40, 5)]:  # larger, and smaller (antialiased, as timm)
        model = _micro("setr_qkv", img_size=img_size, pretrained=str(files / "vit.pth"))
        want = F.interpolate(grid, size=(g, g), mode="bicubic", align_corners=False,
                             antialias=True)
        torch.testing.assert_close(model.encoder.pos_embed.weight.data, want)


@pytest.mark.parametrize("in_channels", [1, 2, 5])
def test_stems_are_adapted_to_the_input_channels(files, in_channels):
    """timm's adapt_input_conv: summed for 1 channel, else RGB repeated, cut and × 3/C."""
    def adapt(w):
        if in_channels == 1:
            return w.sum(1, keepdim=True)
        return w.repeat(1, 2, 1, 1)[:, :in_channels] * (3 / in_channels)

    vit = _micro("setr_kv", in_channels=in_channels, pretrained=str(files / "vit.pth"))
    torch.testing.assert_close(vit.encoder.patch_embed.proj.weight.data,
                               adapt(timm_vit_state()["patch_embed.proj.weight"]))
    hyb = _micro("setr_conv_kv", in_channels=in_channels,
                 pretrained=str(files / "R50+ViT-B_16.npz"))
    root = torch.from_numpy(transunet_arrays()["conv_root/kernel"]).permute(3, 2, 0, 1)
    torch.testing.assert_close(hyb.encoder.cnn.root_conv.weight.data, adapt(root))
    cvt = _micro("setr_cvt_kv", in_channels=in_channels, pretrained=str(files / "CvT-13.pth"))
    torch.testing.assert_close(cvt.encoder.stages[0].embed.weight.data,
                               adapt(cvt_state()["stage0.patch_embed.proj.weight"]))
    for m in (vit, hyb, cvt):
        assert torch.isfinite(m.eval()(torch.randn(1, in_channels, 48, 40))).all()


def test_transunet_r50_loads_with_hwio_kernels_and_groupnorm(files):
    arrays = transunet_arrays()
    model = _micro("setr_conv_qkv", pretrained=str(files / "R50+ViT-B_16.npz"))
    unit = model.encoder.cnn.stages[1][0]
    want = torch.from_numpy(arrays["block2/unit1/conv2/kernel"]).permute(3, 2, 0, 1)
    assert torch.equal(unit.conv2.weight.data, want)
    assert torch.equal(unit.proj_norm.weight.data,
                       torch.from_numpy(arrays["block2/unit1/gn_proj/scale"]))
    patch = torch.from_numpy(arrays["embedding/kernel"]).permute(3, 2, 0, 1)
    assert torch.equal(model.encoder.patch_embed.weight.data, patch)


def test_a_batchnorm_hybrid_takes_the_vit_and_reports_the_r50_as_skipped(files):
    fresh = _micro("setr_conv_kv", seed=4, norm="bn")
    model = _micro("setr_conv_kv", seed=4, norm="bn", pretrained=str(files / "R50+ViT-B_16.npz"))
    report = model.pretrained_report
    assert any(k.startswith("block1/unit1/") for k in report.skipped)
    assert all("BatchNorm" in why for k, why in report.skipped.items() if k.startswith("block"))
    for k, v in fresh.state_dict().items():
        if k.startswith("encoder.cnn."):
            assert torch.equal(model.state_dict()[k], v), k
            assert k in report.missing


def test_cvt_loads_the_official_names_and_running_statistics(files):
    sd = cvt_state()
    model = _micro("setr_cvt_qkv", pretrained=str(files / "CvT-13.pth"))
    attn = model.encoder.stages[2].blocks[1].attn
    prefix = "stage2.blocks.1.attn."
    assert torch.equal(attn.conv_proj_q[0].weight.data, sd[prefix + "conv_proj_q.conv.weight"])
    assert torch.equal(attn.conv_proj_k[1].running_var, sd[prefix + "conv_proj_k.bn.running_var"])
    assert torch.equal(attn.proj_v.weight.data, sd[prefix + "proj_v.weight"])
    assert torch.equal(model.encoder.stages[1].norm.weight.data,
                       sd["stage1.patch_embed.norm.weight"])


@pytest.mark.parametrize("mode", ["qkv", "kv"])
def test_cvt_head_scale_is_folded_into_the_weights(files, mode):
    """A model built with attn_scale='head' behaves as the official (scale 1/sqrt(dim))."""
    path = str(files / "CvT-13.pth")
    official = _micro(f"setr_cvt_{mode}", seed=3, pretrained=path).eval().double()
    head = _micro(f"setr_cvt_{mode}", seed=3, attn_scale="head", pretrained=path).eval().double()
    assert official.encoder.stages[2].blocks[0].attn.core.scale == 128 ** -0.5
    assert head.encoder.stages[2].blocks[0].attn.core.scale == 32 ** -0.5
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        for a, b in zip(official.encoder(x), head.encoder(x), strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)  # float32 weights


def test_key_and_mean_rules(files):
    sd = timm_vit_state()
    for rule in ("key", "mean"):
        model = _micro("setr_kv", pretrained=str(files / "vit.pth"), pretrained_rule=rule)
        wq, wk, wv = sd["blocks.2.attn.qkv.weight"].chunk(3)
        kv = model.encoder.blocks[2].attn.kv.weight.data
        assert torch.equal(kv[96:], wv)
        torch.testing.assert_close(kv[:96], wk if rule == "key" else (wq + wk) / 2)
        assert model.pretrained_report.kv[2]["rule"] == rule


@pytest.mark.parametrize("family,file", [("setr", "vit.pth"), ("setr_conv", "R50+ViT-B_16.npz"),
                                         ("setr_cvt", "CvT-13.pth")])
def test_a_converted_kv_pos_model_starts_as_the_converted_kv_model(files, family, file):
    """map_pos has no counterpart in a QKV file: it starts at temperature Σw = 1 with no per-key
    bias, so step 0 is the converted KV encoder (not a random, often negative, temperature)."""
    kv = _micro(f"{family}_kv", seed=3, pretrained=str(files / file)).eval()
    pos = _micro(f"{family}_kvpos", seed=3, pretrained=str(files / file)).eval()
    maps = [m for m in pos.modules() if hasattr(m, "map_pos")]
    assert maps and len(maps) == len(pos.pretrained_report.kv)
    for m in maps:
        temperature, key_bias = m(49)
        torch.testing.assert_close(temperature, torch.tensor(1.0), atol=1e-6, rtol=0)
        torch.testing.assert_close(key_bias, torch.zeros(49), atol=1e-6, rtol=0)
    assert not any("map_pos" in k for k in pos.pretrained_report.missing)
    assert sum("map_pos" in k for k in pos.pretrained_report.converted) == 2 * len(maps)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(pos.encoder(x), kv.encoder(x), strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        fresh = _micro(f"{family}_kvpos", seed=3).eval()  # a fresh map_pos would differ
        fresh.load_state_dict({k: v for k, v in pos.state_dict().items() if "map_pos" not in k},
                              strict=False)
        assert (fresh.encoder(x)[-1] - kv.encoder(x)[-1]).abs().max() > 1e-2


@pytest.mark.parametrize("name,file,match", [
    ("setr_conv_kv", "vit.pth", "cannot initialise a setr_conv model"),
    ("setr_kv", "R50+ViT-B_16.npz", "cannot initialise a setr model"),
    ("setr_cvt_kv", "ViT-B_16.npz", "cannot initialise a setr_cvt model"),
    ("setr_kv", "CvT-13.pth", "cannot initialise a setr model"),
])
def test_a_file_of_another_family_is_one_line_naming_it(files, name, file, match):
    with pytest.raises(CheckpointError, match=match) as e:
        _micro(name, pretrained=str(files / file))
    assert file in str(e.value) and len(str(e.value).splitlines()) == 1


def test_files_that_do_not_fit_name_the_problem(tmp_path):
    deeper = tmp_path / "deeper.pth"
    write_timm_vit(deeper, depth=6)
    with pytest.raises(CheckpointError, match=r"deeper.pth.*no place.*blocks\.4\."):
        _micro("setr_kv", pretrained=str(deeper))
    wider = tmp_path / "wider.pth"
    write_timm_vit(wider, dim=128)
    with pytest.raises(CheckpointError, match=r"wider.pth.*shape"):
        _micro("setr_kv", pretrained=str(wider))
    sd = timm_vit_state()
    del sd["blocks.3.mlp.fc2.bias"]
    torch.save(sd, tmp_path / "cut.pth")
    with pytest.raises(CheckpointError, match=r"cut.pth.*blocks\.3\.mlp\.fc2\.bias"):
        _micro("setr_kv", pretrained=str(tmp_path / "cut.pth"))
    sd = timm_vit_state()
    sd["blocks.0.ls1.gamma"] = torch.ones(96)  # a feature kvseg's ViT lacks (layer scale)
    torch.save(sd, tmp_path / "layerscale.pth")
    with pytest.raises(CheckpointError, match=r"layerscale.pth.*ls1\.gamma"):
        _micro("setr_kv", pretrained=str(tmp_path / "layerscale.pth"))


def test_an_explicit_layout_overrides_detection(files):
    with pytest.raises(CheckpointError, match="microsoft_cvt file cannot initialise a setr"):
        _micro("setr_kv", pretrained=str(files / "vit.pth"), pretrained_layout="microsoft_cvt")
    model = _micro("setr_kv", pretrained=str(files / "vit.pth"), pretrained_layout="timm_vit")
    assert model.pretrained_report.layout == "timm_vit"


@pytest.mark.parametrize("family,file", [("setr", "vit.pth"), ("setr_conv", "R50+ViT-B_16.npz"),
                                         ("setr_cvt", "CvT-13.pth")])
def test_kv_relpos_converts_as_kv_with_a_fresh_zero_table(files, family, file):
    """kv_relpos takes KV's conversion; its table (no counterpart) stays zero, so the converted
    KV-relpos model is the converted KV model."""
    kv = _micro(f"{family}_kv", seed=3, pretrained=str(files / file)).eval()
    rel = _micro(f"{family}_kvrelpos", seed=3, pretrained=str(files / file)).eval()
    tables = [k for k in rel.pretrained_report.missing if k.endswith("rel_pos.table")]
    assert tables and all("starts at zero" in rel.pretrained_report.missing[k] for k in tables)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        # equal up to float rounding: SDPA's masked (math) and mask-free (flash) kernels
        torch.testing.assert_close(rel.encoder(x)[-1], kv.encoder(x)[-1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("suffix,mode", [("sharedkv", "shared_kv"), ("sharedqv", "shared_qv"),
                                         ("single", "single")])
def test_sharing_modes_without_a_rule_are_one_line_errors(files, suffix, mode):
    with pytest.raises(ValueError, match=f"no QKV -> {mode} conversion"):
        _micro(f"setr_{suffix}", pretrained=str(files / "vit.pth"))
