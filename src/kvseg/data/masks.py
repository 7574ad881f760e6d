"""What the masks of a folder hold: a survey of their values, and binary masks as they ship.

Public 2D sets store one-class masks as 0/255 (a viewable PNG), as 0/1, or as JPEGs of 0/255
whose compression leaves artefacts near the edges (Kvasir-SEG; some ISIC copies). kvseg reads:

* ``0/1`` and ``0/255``: binary, exactly;
* **near-binary 8-bit masks** (:func:`near_binary`): at least 95 % of the pixels within 0-15 or
  240-255, some in 240-255, at least 8 distinct values, and every value that holds 1 % of the
  pixels or more within 0-7 or 248-255 (lossy artefacts are many rare values around two
  narrow modes; label values are few, and each covers an area): binary, value ``>= 128``
  (``> 127``) being the class. A lossy mask whose values all lie in 0-15 is empty (a black
  JPEG decodes to 0 or 1, never to a class);
* anything else is not binary: a label map (value = class), or ambiguous.

:func:`survey` reads every mask of a folder once (threads) into one histogram of values, for
:class:`~kvseg.data.folder.FolderDataset` to infer the classes, check ``mask_threshold`` and
detect near-binary masks; :func:`binary_mask` is the per-file rule ``kvseg convert`` uses.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kvseg.data.png import load_png
from kvseg.errors import DataError

#: Mask suffixes of lossy formats (artefacts: never exact label values).
LOSSY_SUFFIXES = (".jpg", ".jpeg")
#: Binary masks: the value above which a pixel is the class.
BINARY_THRESHOLD = 127
_DARK, _BRIGHT = 16, 240  # near-binary: pixels in [0, 16) or [240, 255]
_MODES, _RARE, _PEAK, _DISTINCT = 0.95, 0.01, 8, 8
_MODES_LOSSY = 0.9  # one JPEG file of a binary format: 90 % within 0-63 or 192-255


def near_binary(hist: np.ndarray) -> bool:
    """Whether a 256-bin histogram of 8-bit mask values is that of 0/255 masks with lossy
    artefacts (see the module docstring)."""
    hist = np.asarray(hist, np.int64)
    total = int(hist.sum())
    if total == 0 or hist[_BRIGHT:].sum() == 0 or np.count_nonzero(hist) < _DISTINCT:
        return False
    modes = hist[:_DARK].sum() + hist[_BRIGHT:].sum()
    peaks = np.flatnonzero(hist >= _RARE * total)
    return bool(modes >= _MODES * total
                and ((peaks < _PEAK) | (peaks >= 256 - _PEAK)).all())


def all_dark(values: set[int]) -> bool:
    """A lossy mask (or folder) whose values are all near 0: empty."""
    return bool(values) and max(values) < _DARK


@dataclass
class Survey:
    """Pixel counts per value over a folder's masks (``colour``: masks stored in colour, read
    as luminance)."""

    counts: Counter = field(default_factory=Counter)
    colour: list[Path] = field(default_factory=list)
    lossy: bool = False

    @property
    def values(self) -> set[int]:
        return {int(v) for v in self.counts}

    def range(self) -> str:
        """``0..255`` (for messages)."""
        return f"{min(self.counts)}..{max(self.counts)}" if self.counts else "none"

    def hist8(self) -> np.ndarray | None:
        """256-bin histogram when every value is 8-bit, else ``None``."""
        if not self.counts or min(self.counts) < 0 or max(self.counts) > 255:
            return None
        hist = np.zeros(256, np.int64)
        for v, c in self.counts.items():
            hist[int(v)] = c
        return hist

    def exact_binary(self) -> bool:
        """0/255, or 0/1 from a lossless file: binary as stored."""
        return self.values <= {0, 255} or (not self.lossy and self.values <= {0, 1})

    def near_binary(self) -> bool:
        hist = self.hist8()
        return hist is not None and not self.exact_binary() and near_binary(hist)


def _read(path: Path, luminance: bool) -> tuple[np.ndarray, bool]:
    """A mask's values: as labels (palette indices), or luminance when asked or when colour."""
    if luminance:
        return load_png(path), False
    try:
        return load_png(path, labels=True), False
    except DataError as e:
        if "colour mode" not in str(e):
            raise
        return load_png(path), True


def survey(paths: Sequence[Path], *, luminance: bool = False) -> Survey:
    """Read every mask in ``paths`` once (threads) and count its values; colour masks are read
    as luminance (and listed), ``luminance=True`` reads every mask so."""
    def one(p: Path) -> tuple[Counter, bool]:
        arr, colour = _read(p, luminance)
        if arr.dtype.kind == "f":
            arr = arr[np.isfinite(arr)]
        values, counts = np.unique(arr, return_counts=True)
        return Counter(dict(zip(values.tolist(), counts.tolist(), strict=True))), colour

    out = Survey(lossy=any(Path(p).suffix.lower() in LOSSY_SUFFIXES for p in paths))
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        for p, (counts, colour) in zip(paths, pool.map(one, paths), strict=True):
            out.counts.update(counts)
            if colour:
                out.colour.append(Path(p))
    return out


def binary_mask(arr: np.ndarray, path: str | os.PathLike, lossy: bool = False) -> np.ndarray:
    """A one-class mask of any of the binary forms above -> bool (H, W); any other value set is
    a :class:`DataError` naming ``path`` and the values. ``lossy``: the file is a JPEG of a
    format known to be binary (``kvseg convert``), so 0/1 is no form of it, and one small file
    is judged alone: some values >= 192 and 90 % of the pixels within 0-63 or 192-255."""
    arr = np.asarray(arr)
    values = np.unique(arr)
    found = set(values.tolist())
    if found <= {0, 255}:
        return arr == 255
    if not lossy and found <= {0, 1}:
        return arr == 1
    if lossy and all_dark(found):
        return np.zeros(arr.shape, bool)
    hist = np.bincount(arr.ravel(), minlength=256) if arr.dtype == np.uint8 else None
    if hist is not None and lossy and hist[192:].sum() and (
            hist[:64].sum() + hist[192:].sum() >= _MODES_LOSSY * arr.size):
        return arr > BINARY_THRESHOLD  # a JPEG of a binary mask: its values are artefacts
    if hist is not None and near_binary(hist):
        return arr > BINARY_THRESHOLD
    shown = ", ".join(map(str, values[:6].tolist())) + (", ..." if len(values) > 6 else "")
    raise DataError(f"{path}: mask values {shown} ({len(values)} distinct) are not a binary "
                    "mask (0/1, 0/255, or 0/255 with lossy-compression artefacts)")


__all__ = ["BINARY_THRESHOLD", "LOSSY_SUFFIXES", "Survey", "all_dark", "binary_mask",
           "near_binary", "survey"]
