"""``kvseg convert``: public 2D sets of other modalities into the folder layout.

Each converter reads a download as it unpacks and writes ``OUT/images/``, ``OUT/masks/`` and
``OUT/dataset.yaml`` (:mod:`kvseg.data.folder`, :mod:`kvseg.data.spec`); images are copied
unchanged (``link=True``: hard links where the file system allows), masks are decoded,
thresholded at 127 and written as 8-bit PNGs (0/255 for one class: the file stays viewable and
reads as that class). The folder is built beside ``OUT`` and renamed into place at the end, so
an interrupted conversion leaves no half-written dataset; ``OUT`` must be absent or empty.

=============  ================================================================================
format         input (``SRC``)
=============  ================================================================================
kvasir         Kvasir-SEG: ``images/NAME.jpg`` + ``masks/NAME.jpg`` (JPEG masks: thresholded)
isic2018       ISIC 2018 task 1: ``ISIC2018_Task1-2_Training_Input/ISIC_N.jpg`` +
               ``ISIC2018_Task1_Training_GroundTruth/ISIC_N_segmentation.png``; the
               ``..._Validation_...`` pair too when present (then listed as the ``val`` split)
drive          DRIVE: ``training/images/21_training.tif`` + ``training/1st_manual/21_manual1.gif``
               (+ ``test/`` with ``1st_manual/`` when present: the ``val`` split); the
               field-of-view masks (``mask/*_mask.gif``) go to ``OUT/fov/`` (not used by
               training: documented in docs/data.md)
montgomery     Montgomery County chest X-rays: ``CXR_png/NAME.png`` + ``ManualMask/leftMask/``
               and ``rightMask/``; ``lungs="merged"``: one class ``lungs`` (left OR right),
               ``"separate"``: ``masks/left_lung/`` and ``masks/right_lung/`` (multi-label)
=============  ================================================================================
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from kvseg.data.masks import LOSSY_SUFFIXES, binary_mask
from kvseg.data.png import IMAGE_SUFFIXES, image_info
from kvseg.errors import ConfigError, DataError, RunDirError

log = logging.getLogger(__name__)

FORMATS = ("kvasir", "isic2018", "drive", "montgomery")


@dataclass
class ConvertSummary:
    out: Path
    images: int
    classes: tuple[str, ...]
    val: int = 0

    def __str__(self) -> str:
        split = f", {self.val} listed as val" if self.val else " (folds by image)"
        return (f"converted {self.images} images ({', '.join(self.classes)}{split}) -> "
                f"{self.out} (images/, masks/, dataset.yaml)")


def _binary(path: Path, like: Path | None = None) -> np.ndarray:
    """A mask file as 0/255 uint8 (:func:`kvseg.data.masks.binary_mask` on its luminance: 0/1,
    0/255, or 0/255 with JPEG artefacts; any other value set is a :class:`DataError`). ``like``:
    the image it belongs to, whose size it must have."""
    try:
        with Image.open(path) as im:
            lossy = im.format == "JPEG" or path.suffix.lower() in LOSSY_SUFFIXES
            arr = np.asarray(im.convert("L"))
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: unreadable mask ({e})") from None
    if like is not None:
        h, w, _ = image_info(like)
        if arr.shape != (h, w):
            raise DataError(f"{path}: mask is {arr.shape[1]}x{arr.shape[0]} but image {like} is "
                            f"{w}x{h} (width x height)")
    return np.where(binary_mask(arr, path, lossy), 255, 0).astype(np.uint8)


#: What each format's ``--src`` holds (a download unpacked one folder deeper is found too).
MARKERS = {"kvasir": ("images", "masks"), "isic2018": ("ISIC2018_Task1-2_Training_Input",),
           "drive": ("training",), "montgomery": ("CXR_png",)}


def locate(fmt: str, src: Path) -> Path:
    """``src``, or its one sub-folder that holds the format's folders (``--src`` pointed at the
    folder the archive was unpacked into, e.g. the parent of ``Kvasir-SEG/``)."""
    def has(folder: Path) -> bool:
        return all((folder / m).is_dir() for m in MARKERS[fmt])

    if has(src):
        return src
    inside = sorted(c for c in src.iterdir() if c.is_dir() and has(c))
    if len(inside) == 1:
        log.info("--src %s: reading the %s download in %s", src, fmt, inside[0])
        return inside[0]
    if len(inside) > 1:
        raise DataError(f"--src {src}: {len(inside)} {fmt} downloads inside "
                        f"({', '.join(c.name for c in inside)}); name one")
    return src  # the converter names the folder it misses


def _files(folder: Path, suffixes=IMAGE_SUFFIXES) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: folder not found (see kvseg convert --help)")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in suffixes
                  and not p.name.startswith("."))


class _Writer:
    """Writes one converted dataset into ``tmp`` (renamed to ``out`` by :func:`convert`)."""

    def __init__(self, tmp: Path, link: bool) -> None:
        self.tmp, self.link, self.names = tmp, link, []

    def image(self, src: Path, name: str) -> None:
        dst = self.tmp / "images" / f"{name}{src.suffix.lower()}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        if self.link:
            try:
                os.link(src, dst)
                self.names.append(name)
                return
            except OSError:
                pass  # another file system: copy
        shutil.copy2(src, dst)
        self.names.append(name)

    def mask(self, array: np.ndarray, name: str, sub: str = "masks") -> None:
        dst = self.tmp / sub / f"{name}.png"
        dst.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(dst)


def _pairs(images: list[Path], masks: dict[str, Path], where: Path) -> list[tuple[Path, Path]]:
    out = []
    for img in images:
        if img.stem not in masks:
            raise DataError(f"{img}: no mask for this image in {where}")
        out.append((img, masks[img.stem]))
    return out


def _kvasir(src: Path, w: _Writer, **_) -> dict:
    masks = {p.stem: p for p in _files(src / "masks")}
    for img, mask in _pairs(_files(src / "images"), masks, src / "masks"):
        w.image(img, img.stem)
        w.mask(_binary(mask, img), img.stem)
    return {"classes": ["polyp"]}


def _isic(src: Path, w: _Writer, **_) -> dict:
    val: list[str] = []
    for part, required in (("Training", True), ("Validation", False)):
        images = src / f"ISIC2018_Task1-2_{part}_Input"
        truth = src / f"ISIC2018_Task1_{part}_GroundTruth"
        if not required and not (images.is_dir() and truth.is_dir()):
            continue
        masks = {p.stem.removesuffix("_segmentation"): p for p in _files(truth)}
        for img, mask in _pairs(_files(images, (".jpg", ".jpeg", ".png")), masks, truth):
            w.image(img, img.stem)
            w.mask(_binary(mask, img), img.stem)
            if part == "Validation":
                val.append(img.stem)
    return {"classes": ["lesion"], **({"split": {"val": val}} if val else {})}


def _drive(src: Path, w: _Writer, **_) -> dict:
    val: list[str] = []
    for part in ("training", "test"):
        manual = src / part / "1st_manual"
        if part == "test" and not manual.is_dir():
            continue
        masks = {p.stem.split("_")[0]: p for p in _files(manual)}
        fov = {p.stem.split("_")[0]: p for p in _files(src / part / "mask")}
        for img in _files(src / part / "images"):
            name = img.stem.split("_")[0]  # 21_training -> 21
            if name not in masks:
                raise DataError(f"{img}: no vessel mask {name}_manual1.gif in {manual}")
            w.image(img, name)
            w.mask(_binary(masks[name], img), name)
            if name in fov:
                w.mask(_binary(fov[name], img), name, sub="fov")
            if part == "test":
                val.append(name)
    return {"classes": ["vessel"], **({"split": {"val": val}} if val else {})}


def _montgomery(src: Path, w: _Writer, lungs: str = "merged", **_) -> dict:
    if lungs not in ("merged", "separate"):
        raise ConfigError(f"--lungs {lungs!r}: expected merged or separate")
    # mask names as the image's (NLM's download), or with a "_mask" suffix (some copies)
    left = {p.stem.removesuffix("_mask"): p for p in _files(src / "ManualMask" / "leftMask")}
    right = {p.stem.removesuffix("_mask"): p for p in _files(src / "ManualMask" / "rightMask")}
    for img, lmask in _pairs(_files(src / "CXR_png"), left, src / "ManualMask" / "leftMask"):
        if img.stem not in right:
            raise DataError(f"{img}: no mask in {src / 'ManualMask' / 'rightMask'}")
        w.image(img, img.stem)
        a, b = _binary(lmask, img), _binary(right[img.stem], img)
        if lungs == "merged":
            w.mask(np.maximum(a, b), img.stem)
        else:
            w.mask(a, img.stem, sub="masks/left_lung")
            w.mask(b, img.stem, sub="masks/right_lung")
    return {"classes": ["lungs"] if lungs == "merged" else ["left_lung", "right_lung"]}


CONVERTERS: dict[str, Callable[..., dict]] = {
    "kvasir": _kvasir, "isic2018": _isic, "drive": _drive, "montgomery": _montgomery}


def convert(fmt: str, src: str | os.PathLike, out: str | os.PathLike, *, link: bool = False,
            lungs: str = "merged") -> ConvertSummary:
    """Convert the download ``src`` of ``fmt`` (:data:`FORMATS`) into the folder layout at
    ``out`` (see the module docstring). ``lungs`` applies to ``montgomery``."""
    if fmt not in CONVERTERS:
        raise ConfigError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise FileNotFoundError(f"--src {src}: no such folder")
    src = locate(fmt, src)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunDirError(f"--out {out}: exists and is not an empty folder")
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        w = _Writer(tmp, link)
        spec = CONVERTERS[fmt](src, w, lungs=lungs)
        if not w.names:
            raise DataError(f"{src}: no images found for format {fmt}")
        spec = {"classes": spec["classes"], **{k: v for k, v in spec.items() if k != "classes"}}
        header = f"# written by kvseg convert {fmt} from {src}\n"
        (tmp / "dataset.yaml").write_text(header + yaml.safe_dump(spec, sort_keys=False))
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    val = len(spec.get("split", {}).get("val", []))
    return ConvertSummary(out, len(w.names), tuple(spec["classes"]), val)


__all__ = ["CONVERTERS", "FORMATS", "MARKERS", "ConvertSummary", "convert", "locate"]
