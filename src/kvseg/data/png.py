"""Reading images: the one PNG reader of kvseg (dataset, FolderDataset, ``kvseg predict``).

:func:`load_png` returns a 2D array (height, width) of raw intensities:

=====================================  ==========================================================
stored as                              returned
=====================================  ==========================================================
16-bit grayscale (``I;16``/``B``/``L``)  uint16, values as stored (the UW-Madison slices)
8-bit grayscale (``L``)                uint8, values as stored
1-bit (``1``)                          uint8 in {0, 1}
32-bit integer / float (``I``, ``F``)  int32 / float32 as stored (e.g. a TIFF; non-finite
                                       values are rejected later, by the normalisation)
colour, palette, with alpha            uint8 luminance, ``L = 0.299 R + 0.587 G + 0.114 B``
(``RGB``, ``RGBA``, ``P``, ``LA``...)  (Pillow's ``convert("L")``); alpha is dropped, not
                                       composited
=====================================  ==========================================================

The same file therefore gives the same numbers in training, evaluation and prediction.
Masks are read with ``labels=True``: a palette PNG then gives its palette *indices* (the usual
way label maps are stored), and a colour mask is refused (its classes would be guesswork).

:func:`read_slice` reads a file and runs the one preprocessing
(:func:`kvseg.data.transforms.prepare_slices`) on it, naming the file in any error (e.g.
non-finite pixels).

Errors: ``FileNotFoundError`` if the file is absent; :class:`~kvseg.errors.DataError` naming the
file if it cannot be decoded or is not a 2D image.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kvseg.data import transforms
from kvseg.errors import DataError

_RAW_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F", "L")


def load_png(path: str | os.PathLike, *, labels: bool = False) -> np.ndarray:
    """Read an image file as a 2D array of raw intensities (see the module docstring).

    Args:
        path: the image file (any format Pillow reads; PNG in practice).
        labels: read a label mask: palette images give their indices, colour is an error.

    Returns:
        (height, width) uint16 / uint8 / int32 / float32, native byte order.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: image file not found")
    try:
        with Image.open(p) as im:
            im.load()
            mode = im.mode
            if mode in _RAW_MODES or (labels and mode == "P"):
                arr = np.array(im)
            elif mode == "1":
                arr = np.array(im).astype(np.uint8)
            elif labels:
                raise DataError(f"{p}: mask in colour mode {mode}; save label masks as "
                                "grayscale or palette PNGs")
            else:
                arr = np.array(im.convert("L"))
    except (OSError, SyntaxError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{p}: unreadable image: cannot read PNG ({e})") from None
    if arr.ndim != 2 or arr.size == 0:
        raise DataError(f"{p}: expected a 2D image, got shape {arr.shape}")
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr


def read_slice(path: str | os.PathLike, img_size: int) -> tuple[np.ndarray, torch.Tensor]:
    """Read one slice and prepare it for a model.

    Returns:
        ``(raw, image)``: the :func:`load_png` array (height, width) and the
        :func:`~kvseg.data.transforms.prepare_slices` output, float32 (1, img_size, img_size).
        A :class:`~kvseg.errors.DataError` from the preprocessing (non-finite pixels) is raised
        again with the file name in front.
    """
    raw = load_png(path)
    try:
        # looked up at call time: tests replace prepare_slices to see the raw values
        image = transforms.prepare_slices(raw[None], img_size)
    except DataError as e:
        raise DataError(f"{path}: {e}") from None
    return raw, image


__all__ = ["load_png", "read_slice"]
