"""Run-length encoding of binary masks, exactly as in the UW-Madison GI Tract ``train.csv``.

Convention (verified against the data; see ``docs/data.md``):

* a mask of shape ``(height, width)`` is flattened in **row-major (C) order** — pixel ``p``
  (0-based) is ``(p // width, p % width)``; runs may wrap from one row into the next;
* the string is space-separated ``start length`` pairs with **1-indexed** starts;
* runs are sorted, positive and do not overlap; an empty string (or NaN / None) is an empty mask.

The Kaggle page's sentence "pixels are numbered from top to bottom, then left to right" is
boilerplate that the data does not follow: decoding column-major smears a 360×310 mask.
"""

from __future__ import annotations

import math

import numpy as np

from kvseg.errors import DataError


def _is_empty(rle: object) -> bool:
    if rle is None:
        return True
    if isinstance(rle, float) and math.isnan(rle):
        return True
    return isinstance(rle, str) and not rle.strip()


def parse_runs(rle: str | float | None, num_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate an RLE string and return ``(starts, lengths)`` as int64 arrays, starts 0-based.

    Raises :class:`~kvseg.errors.DataError` (a ``ValueError``) for: an odd number of values, a
    value that is not an integer, a start < 1, a length < 1, a run past the end of the
    ``num_pixels`` image (however large the number), or runs that are unsorted or overlap. The
    message says which pair is wrong; callers add the file / row.
    """
    if _is_empty(rle):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if not isinstance(rle, str):
        raise DataError(f"RLE must be a string, got {type(rle).__name__}")
    tokens = rle.split()
    if len(tokens) % 2:
        raise DataError(f"RLE has an odd number of values ({len(tokens)}); expected "
                        "'start length' pairs")
    try:
        values = [int(t) for t in tokens]
    except ValueError:
        bad = next(t for t in tokens if not _is_int(t))
        raise DataError(f"RLE value {bad!r} is not an integer") from None
    if min(values) < 1 or max(values) > num_pixels:
        # checked on Python ints: a number beyond int64 (99999999999999999999) is "too large"
        # here, never an OverflowError from numpy
        k = next(k for k, v in enumerate(values) if v < 1 or v > num_pixels)
        what, v = ("start" if k % 2 == 0 else "length"), values[k]
        if v < 1:
            hint = "; starts are 1-indexed" if what == "start" else ""
            raise DataError(f"RLE {what} {v} (pair {k // 2 + 1}) is < 1{hint}")
        raise DataError(f"RLE {what} {v} (pair {k // 2 + 1}) runs past the end of the image "
                        f"({num_pixels} pixels)")
    arr = np.array(values, dtype=np.int64)
    starts, lengths = arr[0::2] - 1, arr[1::2]
    ends = starts + lengths
    if (ends > num_pixels).any():
        i = int(np.argmax(ends > num_pixels))
        raise DataError(f"RLE run '{starts[i] + 1} {lengths[i]}' (pair {i + 1}) runs past the "
                        f"end of the image ({num_pixels} pixels)")
    if len(starts) > 1 and (starts[1:] < ends[:-1]).any():
        i = int(np.argmax(starts[1:] < ends[:-1])) + 1
        kind = "unsorted" if starts[i] < starts[i - 1] else "overlapping"
        raise DataError(f"RLE runs are {kind}: pair {i + 1} starts at {starts[i] + 1}, before "
                        f"the end of pair {i} at {ends[i - 1]}")
    return starts, lengths


def _is_int(token: str) -> bool:
    try:
        int(token)
    except ValueError:
        return False
    return True


def rle_decode(rle: str | float | None, shape: tuple[int, int]) -> np.ndarray:
    """Decode ``rle`` into a uint8 0/1 mask of ``shape = (height, width)`` (row-major, 1-indexed).

    Empty string, NaN or None give an all-zero mask. Invalid strings raise ``ValueError``
    (see :func:`parse_runs`).
    """
    height, width = (int(s) for s in shape)
    if height < 1 or width < 1:
        raise ValueError(f"mask shape must be positive, got {shape}")
    n = height * width
    starts, lengths = parse_runs(rle, n)
    # Runs are validated disjoint, so a +1/-1 difference array and a cumulative sum paint them.
    delta = np.zeros(n + 1, np.int32)
    np.add.at(delta, starts, 1)
    np.add.at(delta, starts + lengths, -1)
    return np.cumsum(delta[:n], dtype=np.int32).astype(np.uint8).reshape(height, width)


def rle_encode(mask: np.ndarray) -> str:
    """Encode a 2D binary mask (bool or values in {0, 1}), shape ``(height, width)``.

    Returns 1-indexed ``start length`` pairs over the row-major flattening; ``""`` for an
    empty mask. ``rle_decode(rle_encode(m), m.shape)`` equals ``m``.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"rle_encode expects a 2D (height, width) mask, got shape {mask.shape}")
    if mask.dtype != bool:
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError("rle_encode expects a binary mask (bool or 0/1); threshold first")
        mask = mask.astype(bool)
    pixels = np.concatenate([[False], mask.ravel(order="C"), [False]])
    changes = np.flatnonzero(pixels[1:] != pixels[:-1]) + 1  # 1-indexed run starts and ends
    changes[1::2] -= changes[0::2]
    return " ".join(map(str, changes.tolist()))
