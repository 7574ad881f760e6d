"""UW-Madison names: the class list, slice / scan / case ids and slice file names.

The one parser of the dataset's naming conventions, used by the reader
(:mod:`kvseg.data.uwmadison`), the synthetic twin (:mod:`kvseg.data.synth`) and
``kvseg predict``::

    id         case{C}_day{D}_slice_{SSSS}      (case and day not padded, slice 4 digits)
    scan id    case{C}_day{D}
    file       .../case{C}/case{C}_day{D}/scans/slice_{SSSS}_{W}_{H}_{PW}_{PH}.png

W and H are the slice's width and height in pixels (width first: ``slice_0066_360_310_...`` is
an array of shape (310, 360)), PW and PH the pixel spacing in mm; slices are 3 mm thick.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from kvseg.errors import DataError

CLASSES = ("large_bowel", "small_bowel", "stomach")
SLICE_THICKNESS_MM = 3.0
# Scans with known annotation issues, as listed by the dataset's authors
# (happyharrycn/UW-Madison-GI-Tract-Segmentation-Data-Tools, common.py get_blacklist_case_ids).
BAD_SCANS = ("case61_day14", "case9_day27", "case7_day0", "case81_day30", "case43_day18",
             "case138_day0", "case34_day20", "case43_day26", "case124_day19", "case144_day15",
             "case83_day11", "case13_day0")

ID_RE = re.compile(r"^case(\d+)_day(\d+)_slice_(\d{4})$")
SCAN_RE = re.compile(r"^case(\d+)_day(\d+)$")
CASE_RE = re.compile(r"^case(\d+)$")
FILE_RE = re.compile(r"^slice_(\d{4})_(\d+)_(\d+)_(\d+(?:\.\d+)?)_(\d+(?:\.\d+)?)\.png$")


def scan_id(case: int, day: int) -> str:
    """``case{C}_day{D}``."""
    return f"case{case}_day{day}"


def slice_id(case: int, day: int, slice_no: int) -> str:
    """``case{C}_day{D}_slice_{SSSS}`` (the ``train.csv`` / submission id)."""
    return f"{scan_id(case, day)}_slice_{slice_no:04d}"


def slice_filename(slice_no: int, width: int, height: int, spacing: float) -> str:
    """``slice_{SSSS}_{W}_{H}_{PW}_{PH}.png`` (width first, spacing with two decimals)."""
    sp = f"{spacing:.2f}"
    return f"slice_{slice_no:04d}_{width}_{height}_{sp}_{sp}.png"


@dataclass(frozen=True)
class SliceInfo:
    """What a slice's path says: ids, size in pixels (width, height) and pixel spacing (mm)."""

    case: int
    day: int
    slice: int
    width: int
    height: int
    spacing: float

    @property
    def id(self) -> str:
        return slice_id(self.case, self.day, self.slice)

    @property
    def scan_id(self) -> str:
        return scan_id(self.case, self.day)


def parse_slice_path(path: str | os.PathLike) -> SliceInfo:
    """Parse ``.../case{C}_day{D}/scans/slice_{SSSS}_{W}_{H}_{PW}_{PH}.png``.

    Width comes first in the name. Case and day come from the ``case{C}_day{D}`` folder above
    ``scans``. Raises :class:`~kvseg.errors.DataError` naming the file if any part does not
    parse.
    """
    p = Path(path)
    m = FILE_RE.match(p.name)
    if not m:
        raise DataError(f"{p}: file name does not parse as slice_SSSS_W_H_PW_PH.png")
    scan = SCAN_RE.match(p.parent.parent.name)
    if p.parent.name != "scans" or not scan:
        raise DataError(f"{p}: expected the image under case{{C}}/case{{C}}_day{{D}}/scans/")
    width, height = int(m.group(2)), int(m.group(3))
    spacing_w, spacing_h = float(m.group(4)), float(m.group(5))
    if width < 1 or height < 1 or spacing_w <= 0 or spacing_h <= 0:
        raise DataError(f"{p}: non-positive size or spacing in the file name")
    return SliceInfo(int(scan.group(1)), int(scan.group(2)), int(m.group(1)), width, height,
                     spacing_w)


def parse_slice_id(text: str | None) -> tuple[int, int, int] | None:
    """``(case, day, slice)`` of ``case{C}_day{D}_slice_{SSSS}``; ``None`` if it is not one."""
    m = ID_RE.match(text) if isinstance(text, str) else None
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None


def parse_scan_id(text: object) -> tuple[int, int] | None:
    """``(case, day)`` of ``case{C}_day{D}``; ``None`` if it is not one."""
    m = SCAN_RE.match(text) if isinstance(text, str) else None
    return (int(m.group(1)), int(m.group(2))) if m else None


def parse_case_id(text: object) -> int | None:
    """``C`` of ``case{C}``; ``None`` if it is not one."""
    m = CASE_RE.match(text) if isinstance(text, str) else None
    return int(m.group(1)) if m else None


__all__ = ["BAD_SCANS", "CLASSES", "SLICE_THICKNESS_MM", "SliceInfo", "parse_case_id",
           "parse_scan_id", "parse_slice_id", "parse_slice_path", "scan_id", "slice_filename",
           "slice_id"]
