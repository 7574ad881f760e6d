"""What ``kvseg predict`` segments: the images and volumes found under an input path.

Inputs (:func:`discover_inputs`):

- one image file (PNG, JPEG, TIFF, BMP, GIF) or one NIfTI volume (``.nii`` / ``.nii.gz``);
- a dataset root of a layout kvseg knows (:data:`kvseg.data.LAYOUTS`): its images only, never
  its masks (``images/`` of a folder dataset; ``imagesTs/`` or else ``imagesTr/`` of the
  Decathlon layout; ``img/`` of Synapse; ACDC's frames without ``_gt``);
- a UW-Madison-layout root: a folder holding ``test/`` and/or ``train/`` with
  ``case*/case*_day*/scans/slice_*.png``. ``test/`` is used when it holds PNGs (the Kaggle test
  set), otherwise ``train/``;
- any other folder: every image and volume below it (each image is one slice).

``id`` is the Kaggle id ``case{C}_day{D}_slice_{SSSS}`` for files named and placed as in
UW-Madison (:func:`kvseg.data.parse_slice_path`; such slices carry their scan, for 2.5D
stacking), otherwise the file's path relative to the input folder without its suffix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvseg.data.factory import LAYOUTS, find_layout
from kvseg.data.names import parse_slice_path
from kvseg.data.nifti import is_nifti, nifti_stem
from kvseg.data.png import IMAGE_SUFFIXES, load_png
from kvseg.errors import ConfigError, DataError


@dataclass(frozen=True)
class SliceInput:
    """One image (or, with ``volume``, one NIfTI volume) to segment.

    ``id`` names its outputs; ``scan`` groups the slices whose neighbours may be stacked
    (``None``: the slice stands alone) and ``index`` orders them within the scan.
    """

    path: Path
    id: str
    scan: str | None = None
    index: int = 0
    volume: bool = False


def _is_input(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and (
        p.suffix.lower() in IMAGE_SUFFIXES or is_nifti(p))


def _layout_files(path: Path) -> list[Path] | None:
    """The images of a dataset root a layout recognises (not UW-Madison), else ``None``."""
    name = find_layout(path)
    if name is None or LAYOUTS[name].images is None:
        return None
    return LAYOUTS[name].images(path)


def discover_inputs(path: str | Path) -> list[SliceInput]:
    """Find the images and volumes under ``path`` (see the module docstring).

    Returns them sorted by scan and slice index (UW-Madison) or by id. Raises
    ``FileNotFoundError`` for a missing path, :class:`~kvseg.errors.ConfigError` when ``path``
    is not an image or holds none, :class:`~kvseg.errors.DataError` when two files map to the
    same id.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--input {path}: no such file or folder")
    if path.is_file():
        if not _is_input(path):
            raise ConfigError(f"--input {path}: expected a .png file (or .jpg, .tif, ...), a "
                              ".nii.gz volume, a folder or a dataset root")
        return [_slice_input(path, path.parent)]
    root = path
    for split in ("test", "train"):
        if (path / split).is_dir() and any((path / split).glob("case*/case*_day*/scans/*.png")):
            root = path / split
            break
    files = _layout_files(path) if root == path else None
    if files:
        root = files[0].parent if len({f.parent for f in files}) == 1 else path
    else:
        files = sorted(p for p in root.rglob("*") if _is_input(p))
    if not files:
        raise ConfigError(f"--input {path}: no image files found ({', '.join(IMAGE_SUFFIXES)}, "
                          ".nii.gz)")
    items = [_slice_input(f, root) for f in files]
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"--input {path}: two files map to the same slice id {dup!r}")
    return sorted(items, key=lambda it: (it.scan or "", it.index, it.id))


def _slice_input(file: Path, root: Path) -> SliceInput:
    """Kaggle id and scan for a UW-Madison slice file, else an id from the relative path."""
    try:
        rel = file.relative_to(root)
    except ValueError:
        rel = Path(file.name)
    if is_nifti(file):
        return SliceInput(file, (rel.parent / nifti_stem(rel)).as_posix(), volume=True)
    try:
        info = parse_slice_path(file)
    except DataError:
        info = None
    if info is not None:
        return SliceInput(file, info.id, info.scan_id, info.slice)
    return SliceInput(file, rel.with_suffix("").as_posix())


def read_image(path: str | Path) -> np.ndarray:
    """Read an image as raw intensities, float32 (height, width): :func:`kvseg.data.load_png`
    (16-bit and 8-bit grayscale as stored, colour as luminance) as float32.

    Raises :class:`~kvseg.errors.DataError` naming the file when it cannot be decoded.
    """
    return load_png(path).astype(np.float32)


__all__ = ["SliceInput", "discover_inputs", "read_image"]
