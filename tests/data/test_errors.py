"""Every bad input named in the issue raises a clear error naming the file / row / class."""

from __future__ import annotations

import numpy as np
import pytest

from kvseg.cli import main
from kvseg.data import UWMadison, load_png, parse_slice_path, read_train_csv

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


def test_rgb_png_is_not_16_bit_compatible(tmp_path, make_uw, write_png):
    root = make_uw(tmp_path)
    png = next((root / "train").rglob("slice_0001_*.png"))
    write_png(png, np.zeros((4, 6, 3), np.uint8))
    with pytest.raises(ValueError, match="16-bit grayscale") as e:
        UWMadison(root, split="all", img_size=8)
    assert png.name in str(e.value)


def test_load_png_accepts_8_bit_and_rejects_missing(tmp_path, write_png):
    p = write_png(tmp_path / "a.png", np.arange(12, dtype=np.uint8).reshape(3, 4))
    arr = load_png(p)
    assert arr.dtype == np.uint8 and arr.shape == (3, 4) and arr[2, 3] == 11
    with pytest.raises(FileNotFoundError, match="b.png"):
        load_png(tmp_path / "b.png")


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


def test_cli_reports_one_line_and_exit_2(tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("x")
    assert main(["synth", "--out", str(target), "--cases", "1", "--days", "1",
                 "--slices", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "file.txt" in err and "Traceback" not in err
    assert main(["synth", "--out", str(tmp_path / "x"), "--cases", "0"]) == 2
    assert "--cases" in capsys.readouterr().err


def test_unwritable_cache_dir_says_how_to_fix_it(tmp_path, make_uw):
    root = make_uw(tmp_path / "uw")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match="cache_dir"):
        UWMadison(root, split="all", img_size=8, cache_dir=blocker / "cache")
