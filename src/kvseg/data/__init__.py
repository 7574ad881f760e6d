"""Data: the UW-Madison GI Tract reader, its synthetic twin, a generic folder dataset.

Class order everywhere: ``CLASSES = ("large_bowel", "small_bowel", "stomach")``.
"""

from __future__ import annotations

from kvseg.data.folder import FolderDataset
from kvseg.data.rle import rle_decode, rle_encode
from kvseg.data.transforms import prepare_slices, resize_to_original
from kvseg.data.uwmadison import (
    BAD_SCANS,
    CLASSES,
    UWMadison,
    load_png,
    parse_slice_path,
    read_train_csv,
)

__all__ = ["BAD_SCANS", "CLASSES", "FolderDataset", "UWMadison", "load_png", "parse_slice_path",
           "prepare_slices", "read_train_csv", "resize_to_original", "rle_decode", "rle_encode"]
