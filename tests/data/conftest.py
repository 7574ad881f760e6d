"""Fixtures for the data tests: a tiny synthetic dataset and a hand-built UW-Madison layout."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kvseg.data.synth import generate

TINY = dict(cases=3, days=1, slices=8, seed=0)


@pytest.fixture(scope="session")
def tiny_synth_master(tmp_path_factory) -> Path:
    """A 3-case, 1-day, 8-slice synthetic dataset, generated once per test process."""
    root = tmp_path_factory.mktemp("synth") / "uw"
    generate(root, **TINY)
    return root


@pytest.fixture
def tiny_synth(tiny_synth_master, tmp_path) -> Path:
    """A private copy of the tiny dataset (tests may build caches or break files in it)."""
    root = tmp_path / "uw"
    shutil.copytree(tiny_synth_master, root)
    return root


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def make_uw(root: Path, rows: dict[str, dict[str, str]] | None = None, width: int = 6,
            height: int = 4, slices: int = 2, case: int = 1, day: int = 0,
            header: str = "id,class,segmentation") -> Path:
    """Hand-build a one-scan UW-Madison dataset of ``width`` x ``height`` 16-bit slices.

    ``rows`` maps slice id -> {class: rle}; classes not given are written empty.
    """
    scans = root / "train" / f"case{case}" / f"case{case}_day{day}" / "scans"
    rng = np.random.default_rng(0)
    lines = [header]
    for s in range(1, slices + 1):
        write_png(scans / f"slice_{s:04d}_{width}_{height}_1.50_1.50.png",
                  rng.integers(0, 4000, (height, width)).astype(np.uint16))
        sid = f"case{case}_day{day}_slice_{s:04d}"
        for cls in ("large_bowel", "small_bowel", "stomach"):
            lines.append(f"{sid},{cls},{(rows or {}).get(sid, {}).get(cls, '')}")
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def tiny_params() -> dict:
    """The ``generate`` arguments of :func:`tiny_synth`."""
    return dict(TINY)


@pytest.fixture(name="make_uw")
def make_uw_fixture():
    """The :func:`make_uw` builder (conftest modules cannot be imported by tests)."""
    return make_uw


@pytest.fixture(name="write_png")
def write_png_fixture():
    return write_png
