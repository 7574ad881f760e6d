"""The synthetic twin: layout, sizes, determinism, empty slices, CLI, --out safety."""

from __future__ import annotations

import hashlib
import json
import os
import re

import numpy as np
import pytest

from kvseg.cli import main
from kvseg.data.synth import MARKER, generate, render_scan, scan_layout
from kvseg.errors import RunDirError


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


# --------------------------------------------------------------------------- --out safety
def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_synth_never_deletes_files_it_did_not_write(tmp_path):
    params = dict(cases=1, days=1, slices=3, seed=0)
    out = tmp_path / "s"
    generate(out, **params)
    synth_files = _files(out)
    notes = out / "notes.txt"
    run = out / "runs" / "r1" / "best.safetensors"
    for stray, content in ((notes, b"my notes"), (run, b"weights")):  # a user's file, a run
        stray.parent.mkdir(parents=True, exist_ok=True)
        stray.write_bytes(content)
        digest = _sha(stray)
        name = stray.relative_to(out).parts[0]
        with pytest.raises(RunDirError, match=f"{out}: holds {name}, which kvseg synth did "
                                              "not write"):
            generate(out, **{**params, "seed": 1})
        assert _sha(stray) == digest
        assert {k: v for k, v in _files(out).items() if k in synth_files} == synth_files
        os.replace(out / name, tmp_path / name)  # the user moves it out; synth then proceeds
    generate(out, **{**params, "seed": 1})
    assert (tmp_path / "notes.txt").read_bytes() == b"my notes"
    assert (tmp_path / "runs" / "r1" / "best.safetensors").read_bytes() == b"weights"
    assert _files(out)["train.csv"] != synth_files["train.csv"]


def test_a_folder_that_is_not_a_synth_output_is_refused_untouched(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "data.csv").write_text("a,b\n")
    digest = _sha(out / "data.csv")
    with pytest.raises(RunDirError, match="not a kvseg synth dataset"):
        generate(out, cases=1, days=1, slices=3)
    assert [p.name for p in out.iterdir()] == ["data.csv"] and _sha(out / "data.csv") == digest


def test_rerunning_synth_over_its_output_keeps_the_reader_cache(tmp_path):
    from kvseg.data import UWMadison

    out = tmp_path / "s"
    generate(out, cases=2, days=1, slices=3, seed=0)
    UWMadison(out, split="all", img_size=8)  # writes out/.kvseg_cache
    assert (out / ".kvseg_cache").is_dir()
    generate(out, cases=2, days=1, slices=3, seed=2)
    fresh = tmp_path / "fresh"
    generate(fresh, cases=2, days=1, slices=3, seed=2)
    assert {k: v for k, v in _files(out).items() if not k.startswith(".kvseg_cache/")} == \
        _files(fresh)
    assert (out / ".kvseg_cache").is_dir()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".s.")]  # no leftovers
    ds = UWMadison(out, split="all", img_size=8)  # the stale cache is noticed and rebuilt
    assert ds.cache.built


def test_a_version_1_marker_without_a_file_list_is_still_replaced(tmp_path):
    out = tmp_path / "s"
    generate(out, cases=1, days=1, slices=3, seed=0)
    meta = json.loads((out / MARKER).read_text())
    assert meta["files"] and "train.csv" in meta["files"]
    del meta["files"]
    (out / MARKER).write_text(json.dumps(meta))
    generate(out, cases=1, days=1, slices=3, seed=4)
    assert json.loads((out / MARKER).read_text())["seed"] == 4
