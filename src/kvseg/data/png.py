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
A dataset of colour images (:func:`is_colour`) reads them with :func:`load_image` and
``channels=3`` instead: RGB as stored (alpha dropped, palette expanded), a grayscale image of
that dataset repeated into three channels. Pillow reads PNG, JPEG, TIFF, BMP and GIF alike
(:data:`IMAGE_SUFFIXES`), by content, whatever the suffix.
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
_GRAY_MODES = (*_RAW_MODES, "1", "LA", "La")
#: File suffixes kvseg takes for 2D images and masks (lower case).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif")


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


def image_info(path: str | os.PathLike) -> tuple[int, int, bool]:
    """``(height, width, colour)`` from an image's header (the pixels are not decoded).

    ``colour``: RGB, palette, CMYK, ... (anything :func:`load_png` would turn into luminance).
    Raises like :func:`load_png`.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: image file not found")
    try:
        with Image.open(p) as im:
            return im.height, im.width, im.mode not in _GRAY_MODES
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{p}: unreadable image: cannot read image ({e})") from None


def load_image(path: str | os.PathLike, channels: int = 1) -> np.ndarray:
    """Read an image with ``channels`` channels: 1 is :func:`load_png` (colour as luminance);
    3 is RGB uint8 as stored (height, width, 3), a grayscale image repeated three times."""
    if channels == 1:
        return load_png(path)
    arr = load_png(path) if image_info(path)[2] is False else None
    if arr is not None:
        return np.repeat(arr[..., None], 3, axis=-1)
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: unreadable image: cannot read image ({e})") from None


def read_slice(path: str | os.PathLike, img_size: int, *, channels: int = 1,
               window: tuple[float, float] | None = None) -> tuple[np.ndarray, torch.Tensor]:
    """Read one slice and prepare it for a model.

    Args:
        path: the image file.
        img_size: side of the prepared square.
        channels: 1 (luminance) or 3 (RGB, normalised with joint percentiles).
        window: a fixed intensity window instead of the percentiles.

    Returns:
        ``(raw, image)``: the :func:`load_image` array ((height, width), or (height, width, 3))
        and the :func:`~kvseg.data.transforms.prepare_slices` output, float32 (channels,
        img_size, img_size). A :class:`~kvseg.errors.DataError` from the preprocessing
        (non-finite pixels) is raised again with the file name in front.
    """
    raw = load_image(path, channels)
    stack = raw[None] if raw.ndim == 2 else raw.transpose(2, 0, 1)
    try:
        # looked up at call time: tests replace prepare_slices to see the raw values
        if channels == 1 and window is None:
            image = transforms.prepare_slices(stack, img_size)
        else:
            image = transforms.prepare_slices(stack, img_size, window=window,
                                              joint=channels > 1)
    except DataError as e:
        raise DataError(f"{path}: {e}") from None
    return raw, image


__all__ = ["IMAGE_SUFFIXES", "image_info", "load_image", "load_png", "read_slice"]
