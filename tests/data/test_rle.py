"""RLE: row-major, 1-indexed, validated; checked pixel by pixel and against naive codecs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from kvseg.data import rle_decode, rle_encode
from reference import naive_decode, naive_encode


@settings(max_examples=150, deadline=None)
@given(arrays(np.uint8, st.tuples(st.integers(1, 17), st.integers(1, 23)),
              elements=st.integers(0, 1)))
def test_round_trip_and_naive_agreement(mask):
    rle = rle_encode(mask)
    assert rle == naive_encode(mask)
    decoded = rle_decode(rle, mask.shape)
    assert decoded.dtype == np.uint8 and decoded.shape == mask.shape
    np.testing.assert_array_equal(decoded, mask)
    np.testing.assert_array_equal(naive_decode(rle, *mask.shape), mask)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 12), st.integers(1, 12), st.data())
def test_decode_random_runs_matches_naive(height, width, data):
    n = height * width
    cuts = sorted(data.draw(st.sets(st.integers(0, n), max_size=8)))
    if len(cuts) % 2:
        cuts = cuts[:-1]
    pairs = [(a + 1, b - a) for a, b in zip(cuts[0::2], cuts[1::2], strict=True) if b > a]
    rle = " ".join(f"{s} {l}" for s, l in pairs)
    np.testing.assert_array_equal(rle_decode(rle, (height, width)),
                                  naive_decode(rle, height, width))


def test_run_wraps_from_one_row_into_the_next():
    # 3 rows x 4 columns; "3 4" covers 1-indexed pixels 3..6 in reading order
    m = rle_decode("3 4", (3, 4))
    expected = {(0, 2), (0, 3), (1, 0), (1, 1)}
    for r in range(3):
        for c in range(4):
            assert m[r, c] == ((r, c) in expected), (r, c)


def test_non_square_360_wide_310_tall_row_major():
    # shape is (height, width) = (310, 360): pixel p (1-indexed) is row (p-1)//360, col (p-1)%360
    m = rle_decode("360 3 45601 5 111600 1", (310, 360))
    expected = {(0, 359), (1, 0), (1, 1),                       # wraps after the first row
                (126, 240), (126, 241), (126, 242), (126, 243), (126, 244),
                (309, 359)}                                      # the very last pixel
    assert m.sum() == len(expected)
    for r, c in expected:
        assert m[r, c] == 1, (r, c)
    assert rle_encode(m) == "360 3 45601 5 111600 1"


def test_real_row_decodes_to_a_compact_blob_only_in_row_major():
    # First runs of train.csv row case131_day0_slice_0066,large_bowel (a 360 x 310 slice), as
    # printed in a public EDA notebook (see docs/data.md). Row-major on (310, 360) stacks the
    # runs in consecutive rows at nearly the same columns; the transposed reading does not.
    rle = "45601 5 45959 10 46319 12 46678 14 47037 16"
    good = rle_decode(rle, (310, 360))
    rows = np.flatnonzero(good.any(axis=1))
    np.testing.assert_array_equal(rows, np.arange(126, 131))
    centres = [np.flatnonzero(good[r]).mean() for r in rows]
    assert max(abs(a - b) for a, b in zip(centres[:-1], centres[1:], strict=True)) <= 2
    wrong = rle_decode(rle, (360, 310))  # as if the first number were the height
    wrong_rows = np.flatnonzero(wrong.any(axis=1))
    wrong_centres = [np.flatnonzero(wrong[r]).mean() for r in wrong_rows]
    assert max(abs(a - b) for a, b in zip(wrong_centres[:-1], wrong_centres[1:], strict=True)) > 40


@pytest.mark.parametrize("empty", ["", "   ", None, math.nan, float("nan")])
def test_empty_inputs_give_an_empty_mask(empty):
    m = rle_decode(empty, (4, 5))
    assert m.shape == (4, 5) and m.dtype == np.uint8 and not m.any()


def test_empty_mask_encodes_to_empty_string():
    assert rle_encode(np.zeros((7, 3), bool)) == ""
    assert rle_encode(np.ones((2, 3), np.uint8)) == "1 6"


@pytest.mark.parametrize("rle, words", [
    ("1", "odd number"),
    ("1 2 3", "odd number"),
    ("1 x", "not an integer"),
    ("1.5 2", "not an integer"),
    ("0 3", "< 1"),
    ("-2 3", "< 1"),
    ("2 0", "length 0"),
    ("10 4", "past the end"),      # 12-pixel image: pixels 10..13
    ("1 3 3 2", "overlapping"),
    ("7 1 1 2", "unsorted"),
])
def test_bad_rle_raises_value_error(rle, words):
    with pytest.raises(ValueError, match=words):
        rle_decode(rle, (3, 4))


def test_encode_rejects_non_binary_and_non_2d():
    with pytest.raises(ValueError, match="binary"):
        rle_encode(np.array([[0, 2]]))
    with pytest.raises(ValueError, match="2D"):
        rle_encode(np.zeros((2, 2, 2)))
