"""Independent references for tests: the Kaggle RLE written out pixel by pixel.

Row-major over (height, width), 1-indexed starts; deliberately naive (no numpy tricks) so that
it shares nothing with ``kvseg.data.rle``.
"""

from __future__ import annotations

import numpy as np


def naive_encode(mask: np.ndarray) -> str:
    """Walk the pixels in reading order (row by row), collecting 1-indexed runs."""
    height, width = mask.shape
    runs, start, length = [], None, 0
    for r in range(height):
        for c in range(width):
            p = r * width + c + 1
            if mask[r, c]:
                if start is None:
                    start, length = p, 0
                length += 1
            elif start is not None:
                runs += [start, length]
                start = None
    if start is not None:
        runs += [start, length]
    return " ".join(map(str, runs))


def naive_decode(rle: str, height: int, width: int) -> np.ndarray:
    out = np.zeros((height, width), np.uint8)
    v = [int(t) for t in rle.split()]
    for start, length in zip(v[0::2], v[1::2], strict=True):
        for p in range(start - 1, start - 1 + length):
            out[p // width, p % width] = 1
    return out
