"""The synthetic twin: layout, sizes, determinism, empty slices, CLI."""

from __future__ import annotations

import re

import numpy as np

from kvseg.cli import main
from kvseg.data.synth import generate, render_scan, scan_layout


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_has_the_real_sizes_and_spacings():
    specs = scan_layout(cases=8, days=2, slices=32, seed=0)
    assert len(specs) == 16 and len({s.case for s in specs}) == 8
    kinds = {(s.width, s.height, s.spacing) for s in specs}
    assert {(266, 266, 1.5), (360, 310, 1.5), (276, 276, 1.63), (234, 234, 1.5)} <= kinds
    name = next(s for s in specs if s.width == 360).slice_filename(7)
    assert name == "slice_0007_360_310_1.50_1.50.png"


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    params = dict(cases=2, days=1, slices=5, seed=4)
    generate(tmp_path / "a", **params)
    generate(tmp_path / "b", **params)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(a) == 2 + 2 * 5 and a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    generate(tmp_path / "c", **{**params, "seed": 5})
    c = _files(tmp_path / "c")
    assert c["train.csv"] != a["train.csv"]
    generate(tmp_path / "a", **{**params, "seed": 5})  # an earlier synth folder is replaced
    assert _files(tmp_path / "a") == c


def test_written_layout_matches_the_uw_madison_format(tiny_synth_master):
    lines = (tiny_synth_master / "train.csv").read_text().splitlines()
    assert lines[0] == "id,class,segmentation"
    assert [ln.split(",")[1] for ln in lines[1:4]] == ["large_bowel", "small_bowel", "stomach"]
    pngs = sorted((tiny_synth_master / "train").rglob("*.png"))
    assert len(pngs) == (len(lines) - 1) // 3
    pat = re.compile(r"train/case(\d+)/case\1_day\d+/scans/"
                     r"slice_\d{4}_\d+_\d+_\d\.\d\d_\d\.\d\d\.png")
    for p in pngs:
        assert pat.search(p.as_posix()), p


def test_anatomy_about_half_empty_overlapping_and_moving():
    specs = scan_layout(cases=2, days=1, slices=24, seed=3)
    empty, total, overlap = 0, 0, 0
    for spec in specs:
        image, masks = render_scan(spec, 3)
        assert image.dtype == np.uint16 and image.shape == (24, spec.height, spec.width)
        assert masks.shape == (24, 3, spec.height, spec.width)
        present = masks.reshape(24, 3, -1).any(-1)
        empty += int((~present.any(1)).sum())
        total += 24
        overlap += int((masks.sum(1) > 1).sum())
        assert present.any(0).all()  # every organ appears somewhere in the scan
        areas = masks[:, 2].reshape(24, -1).sum(1)
        assert len(set(areas[areas > 0].tolist())) > 2  # the stomach changes size
        # organs are brighter than the body around them on average (learnable contrast)
        body = image[(masks.sum(1) == 0) & (image > 0.2 * image.max())]
        assert image[masks[:, 2] > 0].mean() > 1.5 * body.mean()
    assert 0.3 <= empty / total <= 0.7
    assert overlap > 0


def test_cli_synth_prints_a_summary(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "s"), "--cases", "1", "--days", "1",
                 "--slices", "4", "--seed", "2"]) == 0
    out = capsys.readouterr().out
    assert "4 slices" in out and (tmp_path / "s" / "train.csv").exists()
