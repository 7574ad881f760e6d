"""Named pretrained sources: ``pretrained="imagenet"`` -> the official file a preset starts from.

Per family and size, the file the official code base starts that network from:

======================  ==========================================================  =============
family, size            file (where it comes from)                                  checksum
======================  ==========================================================  =============
setr, base              timm ``jx_vit_base_p16_384-83fb41ba.pth`` (ViT-B/16,        SHA-256 prefix
                        ImageNet-21k + 1k, 384 px; SETR's Naive-Base config)        ``83fb41ba``
setr, large             timm ``jx_vit_large_p16_384-b3be5167.pth`` (ViT-L/16;       prefix
                        SETR's default ``vit_large_patch16_384``)                   ``b3be5167``
setr_conv, base         Google ``R50+ViT-B_16.npz`` (ImageNet-21k; TransUNet's      none published
                        ``pretrained_path``)
setr_cvt, base / large  Microsoft ``CvT-13-224x224-IN-1k.pth`` /                    none published
                        ``CvT-21-224x224-IN-1k.pth`` (OneDrive model zoo: no
                        direct URL, download by hand)
======================  ==========================================================  =============

timm's release file names end in the first 8 hex digits of the file's SHA-256 (the
``torch.hub`` convention, checked by ``check_hash``); no full SHA-256 is published for any of
these files, so kvseg checks that prefix, and says so. Google's and Microsoft's files have no
published checksum or size: they are checked by their layout (every tensor must convert and
fit, :mod:`kvseg.models.pretrained`), and a warning says that no checksum was verified. TransUNet's
README (update 2026/02) says that Google's ViT weights appear to have expired and points to a copy
in its Google Drive project folder (``model/vit_checkpoint/imagenet21k/R50+ViT-B_16.npz`` after
extraction): the offline and failed-download messages name it (``WeightsFile.elsewhere``).

The file is looked up in the torch hub cache (``torch.hub.get_dir()/checkpoints``) and, only when
it is not there, downloaded (the user named the source; ``download=False`` forbids it). Offline,
the error is one line naming the URL and how to pass a downloaded file instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch.hub

from kvseg.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

_TIMM = "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-vitjx/"
_CVT_ZOO = "https://1drv.ms/u/s!AhIXJn_J-blW9RzF3rMW7SsLHa8h?e=blQ0Al"
_TRANSUNET_DRIVE = ("https://drive.google.com/drive/folders/1ACJEoTp-uqfFJ73qS3eUObQh52nGuzCd "
                    "(TransUNet's project folder; after extraction the file is "
                    "model/vit_checkpoint/imagenet21k/R50+ViT-B_16.npz)")


@dataclass(frozen=True)
class WeightsFile:
    """One official weights file: where it is, its layout and what can be checked."""

    filename: str
    url: str | None  # None: no direct download (``page`` says where to get it)
    layout: str
    sha256: str | None = None  # the full digest, when published
    sha256_prefix: str | None = None  # timm's 8 hex digits in the file name
    size_bytes: int | None = None
    page: str = ""  # where the URL or file is documented
    elsewhere: str = ""  # another place to get the file by hand (a mirror the README names)


SOURCES: dict[str, dict[tuple[str, str], WeightsFile]] = {
    "imagenet": {
        ("setr", "base"): WeightsFile(
            "jx_vit_base_p16_384-83fb41ba.pth", _TIMM + "jx_vit_base_p16_384-83fb41ba.pth",
            "timm_vit", sha256_prefix="83fb41ba",
            page="fudan-zvg/SETR mmseg/models/backbones/vit.py default_cfgs"),
        ("setr", "large"): WeightsFile(
            "jx_vit_large_p16_384-b3be5167.pth", _TIMM + "jx_vit_large_p16_384-b3be5167.pth",
            "timm_vit", sha256_prefix="b3be5167",
            page="fudan-zvg/SETR mmseg/models/backbones/vit.py default_cfgs"),
        ("setr_conv", "base"): WeightsFile(
            "R50+ViT-B_16.npz",
            "https://storage.googleapis.com/vit_models/imagenet21k/R50+ViT-B_16.npz",
            "transunet_r50_vit", page="Beckschen/TransUNet README",
            elsewhere=_TRANSUNET_DRIVE),
        ("setr_cvt", "base"): WeightsFile(
            "CvT-13-224x224-IN-1k.pth", None, "microsoft_cvt",
            page=f"microsoft/CvT README model zoo {_CVT_ZOO}"),
        ("setr_cvt", "large"): WeightsFile(
            "CvT-21-224x224-IN-1k.pth", None, "microsoft_cvt",
            page=f"microsoft/CvT README model zoo {_CVT_ZOO}"),
    },
}


def is_named(source: str) -> bool:
    """Whether ``source`` names a source (``imagenet``) rather than a file."""
    return source in SOURCES


def cache_dir() -> Path:
    """torch hub's checkpoint folder (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def weights_file(name: str, family: str, size: str | None) -> WeightsFile:
    """The :class:`WeightsFile` of source ``name`` for a family at a size (ConfigError if none)."""
    table = SOURCES[name]
    size = size or "base"
    if (family, size) not in table:
        have = ", ".join(f"{f} {s}" for f, s in table)
        raise ConfigError(f"pretrained={name!r}: no official {name} weights for {family} at size "
                          f"{size!r} (there are for: {have}); pass a weights file instead")
    return table[(family, size)]


def _download(url: str, dst: Path) -> None:
    """Fetch ``url`` into ``dst`` (a temporary name, renamed when complete)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".partial")
    torch.hub.download_url_to_file(url, str(tmp), progress=True)
    os.replace(tmp, dst)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path, wf: WeightsFile) -> None:
    """Check ``path`` against what is published for it; CheckpointError on a mismatch."""
    if wf.size_bytes is not None and path.stat().st_size != wf.size_bytes:
        raise CheckpointError(f"{path}: {path.stat().st_size} bytes, expected {wf.size_bytes} "
                              "(truncated or another file); delete it and try again")
    if wf.sha256 is None and wf.sha256_prefix is None:
        log.warning("%s: no checksum is published for %s; checked by its layout only", path,
                    wf.filename)
        return
    digest = sha256_of(path)
    want = wf.sha256 or wf.sha256_prefix
    if not digest.startswith(want):
        raise CheckpointError(f"{path}: SHA-256 {digest[:16]}... does not match the published "
                              f"{want}; delete it and download {wf.filename} again")


def resolve(name: str, family: str, size: str | None, *, download: bool = True) -> Path:
    """The local path of source ``name`` for ``family`` at ``size``, downloaded if needed.

    Raises ConfigError when no such file exists for the family/size, CheckpointError when it
    cannot be had (no direct URL, offline, download refused) or fails its check.
    """
    wf = weights_file(name, family, size)
    path = cache_dir() / wf.filename
    how = f"download it yourself and pass the file (--pretrained PATH), or put it at {path}"
    if wf.elsewhere:
        how += f"; Google's copy may have expired, the {wf.page} names another: {wf.elsewhere}"
    if not path.is_file():
        if wf.url is None:
            raise CheckpointError(f"pretrained={name!r} for {family}: {wf.filename} has no direct "
                                  f"download ({wf.page}); {how}")
        if not download:
            raise CheckpointError(f"pretrained={name!r} for {family}: {wf.filename} is not in "
                                  f"the cache and downloading is off; {how} (URL: {wf.url})")
        log.info("downloading %s to %s", wf.url, path)
        try:
            _download(wf.url, path)
        except Exception as e:  # offline, DNS, HTTP error: one line with the way out
            raise CheckpointError(f"pretrained={name!r} for {family}: cannot download {wf.url} "
                                  f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                                  f"); offline? {how}") from None
    verify(path, wf)
    return path


__all__ = ["SOURCES", "WeightsFile", "cache_dir", "is_named", "resolve", "verify",
           "weights_file"]
