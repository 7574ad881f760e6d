"""Data: the UW-Madison GI Tract reader, its synthetic twin, folder and volume datasets.

Class order everywhere: ``CLASSES = ("large_bowel", "small_bowel", "stomach")``.

One home per concept: ``names`` (ids and file names), ``png`` (reading images), ``context``
(2.5D neighbour stacking), ``transforms`` (preprocessing, augmentation), ``rle``, ``cache``
(the on-disk slice cache), ``splits`` (folds by case), ``uwmadison`` (the CSV + folder layout
and its Dataset), ``spec`` (``dataset.yaml``), ``slices`` (the shared body of the folder and
volume datasets), ``folder`` (2D images + masks), ``nifti`` (volumes), ``medical`` (Synapse,
ACDC, Decathlon), ``convert`` (public sets into the folder layout), ``synth`` and ``factory``
(``build_dataset``: run options -> Dataset).
"""

from __future__ import annotations

from kvseg.data.factory import LAYOUTS, build_dataset, detect_layout, find_layout
from kvseg.data.folder import FolderDataset
from kvseg.data.names import BAD_SCANS, CLASSES, parse_slice_path
from kvseg.data.nifti import NiftiDataset
from kvseg.data.png import load_png
from kvseg.data.rle import rle_decode, rle_encode
from kvseg.data.transforms import prepare_slices, resize_to_original
from kvseg.data.uwmadison import UWMadison, read_train_csv

__all__ = ["BAD_SCANS", "CLASSES", "LAYOUTS", "FolderDataset", "NiftiDataset", "UWMadison",
           "build_dataset", "detect_layout", "find_layout", "load_png", "parse_slice_path",
           "prepare_slices", "read_train_csv", "resize_to_original", "rle_decode", "rle_encode"]
