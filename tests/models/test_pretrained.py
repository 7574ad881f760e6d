from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import kvseg
from kvseg.models.pretrained import load_pretrained


def _micro(name="setr_kv", **kw):
    torch.manual_seed(kw.pop("seed", 0))
    return kvseg.create_model(name, size="micro", img_size=64, **kw)


def test_safetensors_round_trip_reproduces_outputs(tmp_path):
    src = _micro(seed=1).eval()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    dst = kvseg.create_model("setr_kv", size="micro", img_size=64, pretrained=str(path)).eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


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
    assert sorted(m.split(" ")[0] for m in report.mismatched) == sorted(differ)
    assert len(report.loaded) == len(dst_sd) - len(differ)
    assert report.unexpected == []


def test_strict_load_refuses_a_partial_match(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(_micro(num_classes=3).state_dict(), path)
    with pytest.raises(ValueError, match="strict"):
        load_pretrained(_micro(num_classes=2), path, strict=True)


def test_bad_files_get_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_pretrained(_micro(), tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        load_pretrained(_micro(), junk)
    foreign = tmp_path / "foreign.pt"
    torch.save({"encoder.other.weight": torch.zeros(3)}, foreign)
    with pytest.raises(ValueError, match="no tensor matches"):
        load_pretrained(_micro(), foreign)
