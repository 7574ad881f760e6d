"""Every bad input named in the issue raises a clear error naming the file / row / class."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from kvseg.cli import main
from kvseg.data import UWMadison, parse_slice_path, read_train_csv, rle_decode
from kvseg.errors import DataError

SID = "case1_day0_slice_0001"


def test_the_hand_built_dataset_itself_is_valid(tmp_path, make_uw):
    root = make_uw(tmp_path, {SID: {"stomach": "2 3 8 2"}})
    ds = UWMadison(root, split="all", img_size=8)
    mask = ds.full_mask(SID)
    expected = np.zeros((4, 6), np.uint8)
    expected.flat[[1, 2, 3, 7, 8]] = 1  # row-major over (height 4, width 6)
    np.testing.assert_array_equal(mask[2], expected)
    assert not mask[:2].any()


@pytest.mark.parametrize("rle, words", [
    ("1 2 3", "odd number"),
    ("1 two", "not an integer"),
    ("0 2", "< 1"),
    ("20 10", "past the end"),          # 24-pixel image
    ("1 5 3 2", "overlapping"),
    ("9 2 1 2", "unsorted"),
    ("99999999999999999999 5", "past the end"),   # beyond int64: no OverflowError
    ("9223372036854775807 1", "past the end"),    # int64 max: no wrap-around
])
def test_bad_rle_in_csv_names_file_line_id_and_class(tmp_path, make_uw, rle, words):
    root = make_uw(tmp_path, {SID: {"small_bowel": rle}})
    with pytest.raises(ValueError, match=words) as e:
        UWMadison(root, split="all", img_size=8)
    msg = str(e.value)
    assert "train.csv" in msg and "line 3" in msg and SID in msg and "small_bowel" in msg


def test_missing_image_for_a_csv_row(tmp_path, make_uw):
    root = make_uw(tmp_path)
    png = next((root / "train").rglob("slice_0002_*.png"))
    png.unlink()
    with pytest.raises(FileNotFoundError, match="case1_day0_slice_0002") as e:
        UWMadison(root, split="all", img_size=8)
    assert "train.csv" in str(e.value)


def test_unreadable_png(tmp_path, make_uw):
    root = make_uw(tmp_path)
    png = next((root / "train").rglob("slice_0001_*.png"))
    png.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    with pytest.raises(ValueError, match="unreadable") as e:
        UWMadison(root, split="all", img_size=8)
    assert png.name in str(e.value)
    with pytest.raises(ValueError, match="unreadable"):
        UWMadison(root, split="all", img_size=8, cache=False)[0]


def test_file_name_that_does_not_parse(tmp_path, make_uw, write_png):
    root = make_uw(tmp_path)
    bad = next((root / "train").rglob("scans")) / "slice_0003_6_4.png"
    write_png(bad, np.zeros((4, 6), np.uint16))
    with pytest.raises(ValueError, match="slice_0003_6_4.png"):
        UWMadison(root, split="all", img_size=8)
    with pytest.raises(ValueError, match="does not parse"):
        parse_slice_path("case1/case1_day0/scans/slice_1_6_4_1.5_1.5.png")
    with pytest.raises(ValueError, match="case"):
        parse_slice_path("somewhere/scans/slice_0001_6_4_1.50_1.50.png")


def test_csv_with_a_missing_column(tmp_path, make_uw):
    root = make_uw(tmp_path, header="id,class,predicted")
    with pytest.raises(ValueError, match="missing column.*segmentation") as e:
        UWMadison(root, split="all", img_size=8)
    assert "train.csv" in str(e.value)


def test_csv_with_an_unknown_class(tmp_path, make_uw):
    root = make_uw(tmp_path)
    csv = root / "train.csv"
    csv.write_text(csv.read_text().replace(f"{SID},stomach,", f"{SID},liver,"))
    with pytest.raises(ValueError, match="unknown class 'liver'") as e:
        read_train_csv(csv)
    assert SID in str(e.value) and "line 4" in str(e.value)


def test_csv_with_a_malformed_id_or_repeated_row(tmp_path, make_uw):
    root = make_uw(tmp_path)
    csv = root / "train.csv"
    text = csv.read_text()
    csv.write_text(text.replace(f"{SID},stomach,", "case1_slice_1,stomach,"))
    with pytest.raises(ValueError, match="case1_slice_1"):
        read_train_csv(csv)
    csv.write_text(text + f"{SID},stomach,\n")
    with pytest.raises(ValueError, match="repeated row"):
        read_train_csv(csv)


def test_image_size_that_disagrees_with_its_name(tmp_path, make_uw, write_png):
    root = make_uw(tmp_path)
    png = next((root / "train").rglob("slice_0002_*.png"))
    write_png(png, np.zeros((6, 4), np.uint16))  # transposed: 4 wide, 6 tall
    with pytest.raises(ValueError, match="file name says 6x4") as e:
        UWMadison(root, split="all", img_size=8)
    assert png.name in str(e.value)


def test_missing_root_or_csv(tmp_path):
    with pytest.raises(FileNotFoundError):
        UWMadison(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="train.csv"):
        UWMadison(tmp_path)


def test_bad_split_fold_and_sizes(tmp_path, make_uw):
    root = make_uw(tmp_path)
    with pytest.raises(ValueError, match="split"):
        UWMadison(root, split="test")
    with pytest.raises(ValueError, match="n_folds"):
        UWMadison(root, split="train", n_folds=5, img_size=8)  # one case only
    with pytest.raises(ValueError, match="context"):
        UWMadison(root, split="all", context=-1)


def _exit_code(argv: list[str]) -> int:
    """``kvseg ARGV``'s exit status, whether an error is returned or raised by argparse."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code)


def test_cli_reports_one_line_and_exit_2(tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("x")
    assert _exit_code(["synth", "--out", str(target), "--cases", "1", "--days", "1",
                       "--slices", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "file.txt" in err and "Traceback" not in err
    assert _exit_code(["synth", "--out", str(tmp_path / "x"), "--cases", "0"]) == 2
    assert "--cases" in capsys.readouterr().err




# --------------------------------------------------------------------------- data faults
def test_a_comma_inside_an_rle_is_a_row_with_too_many_fields(tmp_path, make_uw):
    root = make_uw(tmp_path)
    csv = root / "train.csv"
    csv.write_text(csv.read_text().replace(f"{SID},stomach,", f"{SID},stomach,2 3,8 2"))
    with pytest.raises(DataError, match="4 fields but the header has 3") as e:
        UWMadison(root, split="all", img_size=8)
    assert "train.csv: line 4" in str(e.value) and SID in str(e.value)


def test_an_rle_number_too_large_for_an_integer_is_one_data_error(tmp_path, make_uw):
    with pytest.raises(DataError, match="past the end"):
        rle_decode("99999999999999999999 5", (4, 6))
    root = make_uw(tmp_path, {SID: {"large_bowel": "99999999999999999999 5"}})
    with pytest.raises(DataError) as e:
        UWMadison(root, split="all", img_size=8)
    msg = str(e.value)
    assert "train.csv: line 2" in msg and "99999999999999999999" in msg and "\n" not in msg


@pytest.mark.parametrize("encoding, words", [
    ("latin-1", "line 3: byte 0xe9 is not UTF-8"),
    ("utf-16", r"UTF-16 text \(byte order mark ff fe\); expected UTF-8"),
])
def test_a_csv_in_another_encoding_is_a_data_error(tmp_path, make_uw, encoding, words):
    root = make_uw(tmp_path)
    csv = root / "train.csv"
    text = csv.read_text().replace(f"{SID},small_bowel,", f"{SID},small_bowel,\u00e9")
    csv.write_bytes(text.encode(encoding))
    with pytest.raises(DataError, match=words) as e:
        read_train_csv(csv)
    assert "train.csv" in str(e.value)


def test_a_class_without_any_mask_is_warned_about_with_counts(tmp_path, make_uw, caplog):
    root = make_uw(tmp_path, {SID: {"stomach": "2 3"}})
    csv = root / "train.csv"
    with caplog.at_level(logging.WARNING, logger="kvseg.data.uwmadison"):
        read_train_csv(csv)
    assert "large_bowel (2 rows, all empty); small_bowel (2 rows, all empty)" in caplog.text
    assert "non-empty masks per class: large_bowel 0, small_bowel 0, stomach 1" in caplog.text
    caplog.clear()
    csv.write_text("".join(line for line in csv.read_text().splitlines(keepends=True)
                           if ",small_bowel," not in line))
    with caplog.at_level(logging.WARNING, logger="kvseg.data.uwmadison"):
        read_train_csv(csv)
    assert "small_bowel (no rows)" in caplog.text
    caplog.clear()
    root2 = make_uw(tmp_path / "full", {SID: {"stomach": "2 3", "large_bowel": "1 1",
                                              "small_bowel": "5 1"}})
    with caplog.at_level(logging.WARNING, logger="kvseg.data.uwmadison"):
        read_train_csv(root2 / "train.csv")
    assert "non-empty" not in caplog.text
