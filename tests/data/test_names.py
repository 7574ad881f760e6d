"""The one parser of UW-Madison names: slice ids, scan ids, file names (width first)."""

from __future__ import annotations

import pytest

from kvseg.data import BAD_SCANS, parse_slice_path
from kvseg.data.names import (
    parse_case_id,
    parse_scan_id,
    parse_slice_id,
    scan_id,
    slice_filename,
    slice_id,
)
from kvseg.errors import DataError


def test_parse_slice_path_is_width_first():
    info = parse_slice_path("x/train/case131/case131_day0/scans/slice_0066_360_310_1.50_1.50.png")
    assert (info.case, info.day, info.slice) == (131, 0, 66)
    assert (info.width, info.height, info.spacing) == (360, 310, 1.5)
    assert info.id == "case131_day0_slice_0066"
    info = parse_slice_path("case118/case118_day0/scans/slice_0031_276_276_1.63_1.63.png")
    assert (info.width, info.height, info.spacing) == (276, 276, 1.63)



def test_bad_scans_are_the_authors_twelve():
    assert len(BAD_SCANS) == len(set(BAD_SCANS)) == 12
    assert {"case7_day0", "case81_day30", "case43_day18", "case138_day0"} <= set(BAD_SCANS)


def test_ids_and_file_names_round_trip_through_the_parser():
    assert slice_id(131, 0, 66) == "case131_day0_slice_0066"
    assert parse_slice_id("case131_day0_slice_0066") == (131, 0, 66)
    assert scan_id(7, 12) == "case7_day12" and parse_scan_id("case7_day12") == (7, 12)
    assert parse_case_id("case7") == 7
    name = slice_filename(7, 360, 310, 1.5)
    assert name == "slice_0007_360_310_1.50_1.50.png"
    info = parse_slice_path(f"case3/case3_day1/scans/{name}")
    assert (info.slice, info.width, info.height, info.spacing) == (7, 360, 310, 1.5)
    assert info.id == "case3_day1_slice_0007" and info.scan_id == "case3_day1"


@pytest.mark.parametrize("text", ["case1_slice_1", "case1_day0_slice_66", "case1_day0", None, 5])
def test_malformed_ids_are_not_slice_ids(text):
    assert parse_slice_id(text) is None


def test_a_slice_outside_a_scans_folder_does_not_parse():
    with pytest.raises(DataError, match="scans"):
        parse_slice_path("case1/case1_day0/images/slice_0001_6_4_1.50_1.50.png")
