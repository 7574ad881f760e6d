"""The one image reader: 16/8/1-bit grayscale as stored, colour as luminance, NaN refused."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from kvseg.data import FolderDataset, UWMadison, load_png
from kvseg.data.png import read_slice
from kvseg.errors import DataError


def test_rgb_png_reads_as_luminance_in_the_dataset(tmp_path, make_uw, write_png):
    """Replaces the earlier refusal of RGB slices: one reader, one behaviour everywhere."""
    root = make_uw(tmp_path)
    png = next((root / "train").rglob("slice_0001_*.png"))
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[..., 0] = np.arange(24, dtype=np.uint8).reshape(4, 6) * 10
    rgb[..., 1] = 200
    write_png(png, rgb)
    expected = np.asarray(Image.fromarray(rgb).convert("L"))
    np.testing.assert_array_equal(load_png(png), expected)
    ds = UWMadison(root, split="all", img_size=8, cache=False)
    assert ds[0]["image"].max() > 0  # read and normalised, not refused and not blank


def test_load_png_accepts_8_bit_and_rejects_missing(tmp_path, write_png):
    p = write_png(tmp_path / "a.png", np.arange(12, dtype=np.uint8).reshape(3, 4))
    arr = load_png(p)
    assert arr.dtype == np.uint8 and arr.shape == (3, 4) and arr[2, 3] == 11
    with pytest.raises(FileNotFoundError, match="b.png"):
        load_png(tmp_path / "b.png")


def test_16_bit_1_bit_palette_and_alpha(tmp_path, write_png):
    wide = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000)
    arr = load_png(write_png(tmp_path / "w.png", wide))
    assert arr.dtype == np.uint16 and arr.dtype.byteorder in "=|" and arr[2, 3] == 55000
    Image.fromarray(np.eye(3, dtype=bool)).save(tmp_path / "b.png")
    bits = load_png(tmp_path / "b.png")
    assert bits.dtype == np.uint8 and bits.tolist() == np.eye(3, dtype=np.uint8).tolist()
    pal = Image.new("P", (2, 2))
    pal.putdata([0, 1, 2, 1])
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * 759)
    pal.save(tmp_path / "p.png")
    np.testing.assert_array_equal(load_png(tmp_path / "p.png"),
                                  np.asarray(pal.convert("L")))  # an image: luminance
    np.testing.assert_array_equal(load_png(tmp_path / "p.png", labels=True),
                                  [[0, 1], [2, 1]])  # a mask: the palette indices
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 1], rgba[..., 3] = 100, 0  # fully transparent: alpha is dropped, not composited
    Image.fromarray(rgba).save(tmp_path / "a.png")
    np.testing.assert_array_equal(load_png(tmp_path / "a.png"),
                                  np.asarray(Image.fromarray(rgba).convert("L")))
    with pytest.raises(DataError, match="colour mode RGBA"):
        load_png(tmp_path / "a.png", labels=True)


def test_unreadable_file_is_a_data_error_naming_it(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n nope")
    with pytest.raises(DataError, match="bad.png: unreadable image: cannot read PNG"):
        load_png(bad)


def _float_image(path, array):
    """A float32 image (a TIFF, whatever the suffix: Pillow reads by content)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.float32)).save(path, format="TIFF")
    return path


def test_non_finite_pixels_are_an_error_naming_the_file_not_a_blank_image(tmp_path):
    img = np.linspace(0, 100, 64, dtype=np.float32).reshape(8, 8)
    ok = _float_image(tmp_path / "ok.png", img)
    raw, prepared = read_slice(ok, 8)
    assert raw.dtype == np.float32 and prepared.shape == (1, 8, 8) and prepared.max() > 0.9
    for value in (np.nan, np.inf, -np.inf):
        bad_img = img.copy()
        bad_img[3, 4] = value
        bad = _float_image(tmp_path / "bad.png", bad_img)
        with pytest.raises(DataError, match="bad.png: 1 non-finite pixel value"):
            read_slice(bad, 8)


def test_folder_dataset_reports_non_finite_pixels(tmp_path, write_png):
    img = np.linspace(0, 1, 48, dtype=np.float32).reshape(6, 8)
    img[0, 0] = np.nan
    _float_image(tmp_path / "img" / "x.png", img)
    write_png(tmp_path / "lab" / "x.png", np.zeros((6, 8), np.uint8))
    ds = FolderDataset(tmp_path / "img", tmp_path / "lab", classes=("a",), img_size=8)
    with pytest.raises(DataError, match="x.png: 1 non-finite"):
        ds[0]
