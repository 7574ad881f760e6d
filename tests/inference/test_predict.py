"""kvseg predict: original-size masks whose RLE decodes back to them, 8/16-bit input, bad files."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from kvseg import cli, create_model
from kvseg.data import CLASSES
from kvseg.errors import RunDirError
from kvseg.inference.predict import (
    MANIFEST,
    decode_mask_png,
    discover_inputs,
    encode_mask_png,
    predict,
    predict_with_model,
    read_image,
)
from kvseg.training.checkpoint import save_model
from reference import naive_decode


class HalvesModel(nn.Module):
    """Class 0 everywhere, class 1 nowhere, class 2 on the left half of the columns: exact
    masks to check orientation and the resize back (a transposed 360 x 310 mask would fail)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        left = (torch.arange(w) < w // 2).float() * 20 - 10  # +10 left, -10 right
        return torch.stack([torch.full((h, w), 10.0), torch.full((h, w), -10.0),
                            left.expand(h, w)])[None].expand(b, -1, -1, -1)


class ThresholdModel(nn.Module):
    """Logits from the input intensity: class c where the normalised image exceeds t_c."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centre = x[:, x.shape[1] // 2]
        return torch.stack([(centre - t) * 40 for t in (0.3, 0.5, 0.7)], dim=1)


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)  # uint16 -> a 16-bit PNG, uint8 -> 8-bit


def _phantom(height: int, width: int, peak: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    blob = np.exp(-(((yy - height * 0.4) / (height * 0.25)) ** 2
                    + ((xx - width * 0.6) / (width * 0.2)) ** 2))
    return blob * peak * 0.9 + rng.uniform(0, peak * 0.1, (height, width))


def _read_submission(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_masks_at_original_size_and_rle_decodes_back(tmp_path):
    root = tmp_path / "uw" / "test" / "case7" / "case7_day3" / "scans"
    # a non-square 360 x 310 slice (W x H in the name: array (310, 360)) and a square one
    _write_png(root / "slice_0002_360_310_1.50_1.50.png",
               _phantom(310, 360, 12000).astype(np.uint16))
    _write_png(root / "slice_0001_360_310_1.50_1.50.png",
               _phantom(310, 360, 9000, seed=1).astype(np.uint16))
    items = discover_inputs(tmp_path / "uw")
    assert [it.id for it in items] == ["case7_day3_slice_0001", "case7_day3_slice_0002"]
    out = tmp_path / "out"
    summary = predict_with_model(HalvesModel(), items, out, img_size=32, context=1)
    assert summary.slices == 2 and not summary.skipped
    rows = _read_submission(out / "submission.csv")
    assert [(r["id"], r["class"]) for r in rows] == [
        (i, c) for i in ("case7_day3_slice_0001", "case7_day3_slice_0002") for c in CLASSES]
    for item in items:
        png = np.asarray(Image.open(out / "masks" / f"{item.id}.png"))
        assert png.shape == (310, 360) and png.dtype == np.uint8
        bits = [(png >> c) & 1 for c in range(3)]
        assert bits[0].all() and not bits[1].any()
        # class 2: the left half of the columns, at the original resolution
        assert bits[2][:, :179].all() and not bits[2][:, 181:].any()
        for c, name in enumerate(CLASSES):
            (row,) = [r for r in rows if r["id"] == item.id and r["class"] == name]
            np.testing.assert_array_equal(naive_decode(row["predicted"], 310, 360), bits[c])
        assert (out / "overlays" / f"{item.id}.png").is_file()
        assert np.asarray(Image.open(out / "overlays" / f"{item.id}.png")).shape == (310, 360, 3)
    assert [r["predicted"] for r in rows if r["class"] == "small_bowel"] == ["", ""]


def test_bit_packed_mask_png_roundtrip():
    rng = np.random.default_rng(0)
    mask = (rng.random((3, 7, 5)) > 0.5).astype(np.uint8)
    png = encode_mask_png(mask)
    expected = mask[0] * 1 + mask[1] * 2 + mask[2] * 4
    np.testing.assert_array_equal(png, expected)
    np.testing.assert_array_equal(decode_mask_png(png, 3), mask)


def test_16_bit_and_8_bit_pngs_read_raw_and_predict_alike(tmp_path):
    base = _phantom(50, 70, 255, seed=3).round().astype(np.uint8)
    wide = base.astype(np.uint16) * 257  # the same picture in 16 bits (0..65535)
    _write_png(tmp_path / "in" / "a8.png", base)
    _write_png(tmp_path / "in" / "b16.png", wide)
    np.testing.assert_array_equal(read_image(tmp_path / "in" / "a8.png"), base)
    np.testing.assert_array_equal(read_image(tmp_path / "in" / "b16.png"), wide)
    assert wide.max() > 255
    for name, mode in (("b16.png", "I;16"), ("a8.png", "L")):  # really 16 and 8 bits on disk
        with Image.open(tmp_path / "in" / name) as im:
            assert im.mode == mode
    items = discover_inputs(tmp_path / "in")
    assert [it.id for it in items] == ["a8", "b16"]
    predict_with_model(ThresholdModel(), items, tmp_path / "out", img_size=32)
    m8 = np.asarray(Image.open(tmp_path / "out" / "masks" / "a8.png"))
    m16 = np.asarray(Image.open(tmp_path / "out" / "masks" / "b16.png"))
    assert m8.shape == (50, 70)
    # percentile normalisation is scale-free: the same picture gives the same masks
    np.testing.assert_array_equal(m8, m16)
    assert len(np.unique(m8)) > 1  # the phantom crosses some thresholds


def test_colour_png_is_read_as_luminance(tmp_path):
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[..., 1] = 200
    Image.fromarray(rgb).save(tmp_path / "c.png")
    expected = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.float32)
    np.testing.assert_array_equal(read_image(tmp_path / "c.png"), expected)


def test_corrupt_png_is_skipped_and_the_rest_written(tmp_path, capsys):
    folder = tmp_path / "in"
    _write_png(folder / "good1.png", _phantom(40, 30, 3000).astype(np.uint16))
    _write_png(folder / "sub" / "good2.png", _phantom(33, 41, 200).astype(np.uint8))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    summary = predict_with_model(ThresholdModel(), discover_inputs(folder), tmp_path / "out",
                                 img_size=32)
    assert summary.slices == 2
    assert [Path(p).name for p, _ in summary.skipped] == ["broken.png"]
    assert "broken.png" in str(summary)
    assert (tmp_path / "out" / "masks" / "good1.png").is_file()
    assert np.asarray(Image.open(tmp_path / "out" / "masks" / "sub" / "good2.png")).shape == (33,
                                                                                             41)
    ids = {r["id"] for r in _read_submission(tmp_path / "out" / "submission.csv")}
    assert ids == {"good1", "sub/good2"}


def test_neighbour_stacking_steps_over_unreadable_slices(tmp_path, monkeypatch, caplog):
    """context=1 stacks the previous and next readable slice of the same scan (edges repeat)."""
    scans = tmp_path / "uw" / "train" / "case1" / "case1_day0" / "scans"
    for k, level in ((1, 10), (2, 20), (4, 40)):
        _write_png(scans / f"slice_{k:04d}_16_16_1.50_1.50.png",
                   np.full((16, 16), level, np.uint8))
    (scans / "slice_0003_16_16_1.50_1.50.png").write_bytes(b"garbage")
    seen = []

    class Spy(nn.Module):
        def forward(self, x):
            seen.extend(x.numpy().copy())
            return torch.zeros(x.shape[0], 3, *x.shape[-2:])

    # constant slices normalise to 0, so pass the raw levels through instead
    monkeypatch.setattr("kvseg.data.transforms.prepare_slices",
                        lambda stack, size: torch.as_tensor(stack, dtype=torch.float32))
    summary = predict_with_model(Spy(), discover_inputs(tmp_path / "uw"), tmp_path / "out",
                                 img_size=16, context=1)
    assert summary.slices == 3 and len(summary.skipped) == 1
    levels = [tuple(int(s[c, 0, 0]) for c in range(3)) for s in seen]
    assert levels == [(10, 10, 20), (10, 20, 40), (20, 40, 40)]
    # ... and says so: slices 2 and 4 wanted slice 3 as a neighbour
    broken = str(scans / "slice_0003_16_16_1.50_1.50.png")
    assert summary.neighbours_replaced == [
        ("case1_day0_slice_0002", broken, "case1_day0_slice_0004"),
        ("case1_day0_slice_0004", broken, "case1_day0_slice_0002")]
    assert "replaced 2 2.5D neighbour(s)" in str(summary)
    assert "cannot be used" in caplog.text and "case1_day0_slice_0002" in caplog.text


def test_discover_prefers_the_test_folder_of_a_uw_root(tmp_path):
    for split, case in (("train", 2), ("test", 5)):
        _write_png(tmp_path / split / f"case{case}" / f"case{case}_day1" / "scans"
                   / "slice_0010_8_8_1.50_1.50.png", np.zeros((8, 8), np.uint8))
    assert [it.id for it in discover_inputs(tmp_path)] == ["case5_day1_slice_0010"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("predict_run")
    torch.manual_seed(0)
    model = create_model("setr_cvt_kv", size="micro", img_size=32, in_channels=1)
    config = {"model": "setr_cvt_kv", "size": "micro", "img_size": 32, "in_channels": 1,
              "num_classes": 3, "context": 0, "classes": list(CLASSES), "threshold": 0.5}
    save_model(run / "best.safetensors", model, config)
    return run


def test_predict_from_a_run_dir_through_the_cli(run_dir, tmp_path, capsys):
    src = tmp_path / "slice_0066_360_310_1.50_1.50.png"
    _write_png(src, _phantom(310, 360, 15000).astype(np.uint16))
    out = tmp_path / "out"
    rc = cli.main(["predict", "--run", str(run_dir), "--input", str(src), "--out", str(out),
                   "--tta", "flip", "--device", "cpu"])
    assert rc == 0
    assert "predicted 1 slices" in capsys.readouterr().out
    png = np.asarray(Image.open(out / "masks" / "slice_0066_360_310_1.50_1.50.png"))
    assert png.shape == (310, 360)
    rows = _read_submission(out / "submission.csv")
    assert len(rows) == 3
    for c, row in enumerate(rows):
        np.testing.assert_array_equal(naive_decode(row["predicted"], 310, 360),
                                      (png >> c) & 1)
    # predict() itself: the same masks without going through argparse
    summary = predict(run_dir, src, tmp_path / "again", tta="flip", device="cpu")
    again = np.asarray(Image.open(tmp_path / "again" / "masks" / f"{src.stem}.png"))
    assert summary.slices == 1
    np.testing.assert_array_equal(again, png)


@pytest.mark.parametrize("argv, message", [
    (["--run", "{missing}", "--input", "{png}"], "no such run folder"),
    (["--run", "{run}", "--input", "{missing}"], "no such file or folder"),
    (["--run", "{run}", "--input", "{png}", "--threshold", "1.5"], "--threshold"),
    (["--run", "{run}", "--input", "{bad}"], "cannot read PNG"),
    (["--run", "{run}", "--input", "{txt}"], "expected a .png file"),
])
def test_cli_errors_exit_2_with_one_line(run_dir, tmp_path, capsys, argv, message):
    png = tmp_path / "ok.png"
    _write_png(png, np.zeros((8, 8), np.uint8))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    txt = tmp_path / "notes.txt"
    txt.write_text("x")
    paths = {"missing": str(tmp_path / "nope"), "png": str(png), "run": str(run_dir),
             "bad": str(bad), "txt": str(txt)}
    argv = [a.format(**paths) for a in argv]
    try:
        rc = cli.main(["predict", *argv, "--out", str(tmp_path / "out"), "--device", "cpu"])
    except SystemExit as e:  # a bad flag value is refused by argparse itself
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and message in err, err


def test_default_threshold_is_the_runs_own(tmp_path):
    run = tmp_path / "run"
    torch.manual_seed(0)
    model = create_model("setr_kv", size="micro", img_size=32, in_channels=1)
    config = {"model": "setr_kv", "size": "micro", "img_size": 32, "in_channels": 1,
              "num_classes": 3, "context": 0, "classes": list(CLASSES), "threshold": 0.45}
    save_model(run / "best.safetensors", model, config)
    src = tmp_path / "slice_0001_40_30_1.50_1.50.png"
    _write_png(src, _phantom(30, 40, 15000).astype(np.uint16))

    def masks(out, **kw):
        predict(run, src, tmp_path / out, device="cpu", **kw)
        return np.asarray(Image.open(tmp_path / out / "masks" / f"{src.stem}.png"))

    default, at_045, at_05 = masks("d"), masks("a", threshold=0.45), masks("b", threshold=0.5)
    np.testing.assert_array_equal(default, at_045)
    assert not np.array_equal(at_045, at_05)  # the threshold matters for this model


def test_a_slice_with_non_finite_pixels_is_skipped_naming_the_file(tmp_path):
    folder = tmp_path / "in"
    _write_png(folder / "good.png", _phantom(20, 24, 3000).astype(np.uint16))
    data = _phantom(20, 24, 1.0).astype(np.float32)
    data[5, 5] = np.nan
    Image.fromarray(data).save(folder / "nan.png", format="TIFF")  # float pixels, .png name
    summary = predict_with_model(ThresholdModel(), discover_inputs(folder), tmp_path / "out",
                                 img_size=32)
    assert summary.slices == 1
    assert summary.skipped == [(str(folder / "nan.png"),
                                "1 non-finite pixel value(s) (NaN or inf); expected finite "
                                "intensities")]
    assert not (tmp_path / "out" / "masks" / "nan.png").exists()  # no blank mask written


def _predict_into(out, folder, **kw):
    return predict_with_model(ThresholdModel(), discover_inputs(folder), out, img_size=32, **kw)


def test_a_used_output_folder_is_refused_unless_overwrite(tmp_path):
    first, second = tmp_path / "in1", tmp_path / "in2"
    for name in ("a", "b", "c"):
        _write_png(first / f"{name}.png", _phantom(20, 24, 3000).astype(np.uint16))
    _write_png(second / "a.png", _phantom(20, 24, 900, seed=5).astype(np.uint16))
    out = tmp_path / "out"
    _predict_into(out, first)
    assert (out / MANIFEST).is_file()
    with pytest.raises(RunDirError, match="not empty.*--overwrite"):
        _predict_into(out, second)
    assert len(_read_submission(out / "submission.csv")) == 9  # untouched
    summary = _predict_into(out, second, overwrite=True)
    # the earlier prediction's 3 masks, 3 overlays and submission.csv are gone, not mixed in
    assert summary.removed == 7 and "removed 7 file(s) of an earlier prediction" in str(summary)
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["a.png"]
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["a.png"]
    assert {r["id"] for r in _read_submission(out / "submission.csv")} == {"a"}


def test_overwrite_never_deletes_or_overwrites_files_predict_did_not_write(tmp_path):
    folder = tmp_path / "in"
    _write_png(folder / "a.png", _phantom(20, 24, 3000).astype(np.uint16))
    out = tmp_path / "out"
    _predict_into(out, folder)
    notes = out / "notes.txt"
    notes.write_text("keep me")
    mine = out / "masks" / "mine.png"
    mine.write_bytes(b"a user's mask")
    summary = _predict_into(out, folder, overwrite=True)
    assert summary.removed == 3
    assert notes.read_text() == "keep me" and mine.read_bytes() == b"a user's mask"
    # a file predict would write but did not write before: refused, nothing touched
    _write_png(folder / "mine.png", _phantom(20, 24, 3000).astype(np.uint16))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(RunDirError, match="masks/mine.png exists and was not written by kvseg"):
        _predict_into(out, folder, overwrite=True)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_cli_predict_refuses_a_used_output_folder(run_dir, tmp_path, capsys):
    src = tmp_path / "x.png"
    _write_png(src, _phantom(30, 40, 15000).astype(np.uint16))
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.txt").write_text("not from predict")
    rc = cli.main(["predict", "--run", str(run_dir), "--input", str(src), "--out", str(out),
                   "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "report.txt" in err, err
    assert [p.name for p in out.iterdir()] == ["report.txt"]
