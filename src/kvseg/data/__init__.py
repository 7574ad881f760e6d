"""Data: the UW-Madison GI Tract reader, its synthetic twin, a generic folder dataset.

Class order everywhere: ``CLASSES = ("large_bowel", "small_bowel", "stomach")``.

One home per concept: ``names`` (ids and file names), ``png`` (reading images), ``context``
(2.5D neighbour stacking), ``transforms`` (preprocessing, augmentation), ``rle``, ``cache``
(the on-disk slice cache), ``splits`` (folds by case), ``uwmadison`` (the CSV + folder layout
and its Dataset), ``folder``, ``synth`` and ``factory`` (``build_dataset``: run options ->
Dataset).
"""

from __future__ import annotations

from kvseg.data.factory import build_dataset, detect_layout
from kvseg.data.folder import FolderDataset
from kvseg.data.names import BAD_SCANS, CLASSES, parse_slice_path
from kvseg.data.png import load_png
from kvseg.data.rle import rle_decode, rle_encode
from kvseg.data.transforms import prepare_slices, resize_to_original
from kvseg.data.uwmadison import UWMadison, read_train_csv

__all__ = ["BAD_SCANS", "CLASSES", "FolderDataset", "UWMadison", "build_dataset",
           "detect_layout", "load_png", "parse_slice_path", "prepare_slices", "read_train_csv",
           "resize_to_original", "rle_decode", "rle_encode"]
