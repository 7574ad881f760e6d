"""Named sources (``pretrained="imagenet"``): cache, download on demand, checksum, offline.

Nothing here touches the network: the downloader is replaced by a copy of a file made here.
"""

from __future__ import annotations

import hashlib
import shutil
import urllib.error

import pytest
from official_files import write_timm_vit

import kvseg
from kvseg.errors import CheckpointError, ConfigError
from kvseg.models import hub


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "hub" / "checkpoints"
    monkeypatch.setattr(hub, "cache_dir", lambda: folder)
    return folder


@pytest.fixture
def vit_file(tmp_path):
    path = tmp_path / "made" / "vit.pth"
    path.parent.mkdir()
    write_timm_vit(path)
    return path


def _register(monkeypatch, vit_file, **kw) -> hub.WeightsFile:
    wf = hub.WeightsFile("vit-micro.pth", "https://example.invalid/vit-micro.pth", "timm_vit",
                         **kw)
    monkeypatch.setitem(hub.SOURCES["imagenet"], ("setr", "micro"), wf)
    return wf


def test_downloaded_once_into_the_cache_and_checked(cache, vit_file, monkeypatch):
    digest = hashlib.sha256(vit_file.read_bytes()).hexdigest()
    _register(monkeypatch, vit_file, sha256=digest, size_bytes=vit_file.stat().st_size)
    calls = []

    def fake_download(url, dst):
        calls.append(url)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(vit_file, dst)

    monkeypatch.setattr(hub, "_download", fake_download)
    for _ in range(2):
        model = kvseg.create_model("setr_kv", size="micro", img_size=64, pretrained="imagenet")
        assert model.pretrained_report.layout == "timm_vit"
        assert model.pretrained_report.source == str(cache / "vit-micro.pth")
    assert calls == ["https://example.invalid/vit-micro.pth"]  # the second time: the cache


def test_a_checksum_mismatch_is_refused(cache, vit_file, monkeypatch):
    _register(monkeypatch, vit_file, sha256_prefix="00000000")
    cache.mkdir(parents=True)
    shutil.copy(vit_file, cache / "vit-micro.pth")
    with pytest.raises(CheckpointError, match="vit-micro.pth.*does not match.*00000000"):
        kvseg.create_model("setr_kv", size="micro", img_size=64, pretrained="imagenet")
    prefix = hashlib.sha256(vit_file.read_bytes()).hexdigest()[:8]  # timm's file-name prefix
    _register(monkeypatch, vit_file, sha256_prefix=prefix)
    kvseg.create_model("setr_kv", size="micro", img_size=64, pretrained="imagenet")


def test_offline_is_one_line_naming_the_url_and_the_way_out(cache, vit_file, monkeypatch):
    _register(monkeypatch, vit_file)

    def offline(url, dst):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(hub, "_download", offline)
    with pytest.raises(CheckpointError) as e:
        kvseg.create_model("setr_kv", size="micro", img_size=64, pretrained="imagenet")
    msg = str(e.value)
    assert len(msg.splitlines()) == 1
    assert "https://example.invalid/vit-micro.pth" in msg and "--pretrained PATH" in msg
    with pytest.raises(CheckpointError, match="downloading is off"):
        hub.resolve("imagenet", "setr", "micro", download=False)


def test_the_official_table(cache, monkeypatch):
    monkeypatch.setattr(hub, "_download", lambda url, dst: pytest.fail("no download expected"))
    table = hub.SOURCES["imagenet"]
    assert table[("setr", "base")].url.endswith("jx_vit_base_p16_384-83fb41ba.pth")
    assert table[("setr", "base")].sha256_prefix == "83fb41ba"
    assert table[("setr_conv", "base")].layout == "transunet_r50_vit"
    with pytest.raises(CheckpointError, match=r"CvT-13-224x224-IN-1k.pth has no direct download"
                                              r".*1drv.ms.*--pretrained PATH"):
        hub.resolve("imagenet", "setr_cvt", "base")
    with pytest.raises(ConfigError, match="no official imagenet weights for setr at size 'micro'"):
        kvseg.create_model("setr_kv", size="micro", img_size=64, pretrained="imagenet")
    with pytest.raises(ConfigError, match="setr_conv at size 'large'"):
        hub.resolve("imagenet", "setr_conv", "large")


def test_the_hybrids_offline_message_names_transunets_current_copy(cache, monkeypatch):
    """Google's bucket may have expired R50+ViT-B_16.npz; TransUNet's README (2026/02) points to
    a Drive folder: both appear in the one line, offline or with downloading off."""
    def offline(url, dst):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(hub, "_download", offline)
    for download in (True, False):
        with pytest.raises(CheckpointError) as e:
            hub.resolve("imagenet", "setr_conv", "base", download=download)
        msg = str(e.value)
        assert len(msg.splitlines()) == 1
        assert "storage.googleapis.com/vit_models/imagenet21k/R50+ViT-B_16.npz" in msg
        assert "drive.google.com/drive/folders/1ACJEoTp-uqfFJ73qS3eUObQh52nGuzCd" in msg
        assert "TransUNet" in msg and "--pretrained PATH" in msg
