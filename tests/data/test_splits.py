"""Folds grouped by case, fixed before exclusions; n_folds counted over every case."""

from __future__ import annotations

import pytest

from kvseg.data import UWMadison
from kvseg.data.splits import case_folds, select_split
from kvseg.data.synth import generate
from kvseg.errors import ConfigError


def test_folds_are_grouped_by_case_disjoint_and_deterministic(tiny_synth):
    cases = {r.case for r in UWMadison(tiny_synth, split="all", img_size=16).records}
    seen = set()
    for fold in range(3):
        val = UWMadison(tiny_synth, split="val", fold=fold, n_folds=3, img_size=16)
        train = UWMadison(tiny_synth, split="train", fold=fold, n_folds=3, img_size=16)
        val_cases, train_cases = {r.case for r in val.records}, {r.case for r in train.records}
        assert val_cases and train_cases and not val_cases & train_cases
        assert val_cases | train_cases == cases
        assert not val_cases & seen
        seen |= val_cases
        again = UWMadison(tiny_synth, split="val", fold=fold, n_folds=3, img_size=16)
        assert again.ids == val.ids
    assert seen == cases



def test_exclude_never_moves_other_cases_between_folds(tmp_path):
    root = tmp_path / "uw5"
    generate(root, cases=5, days=1, slices=4, seed=3)
    cases = sorted({r.case for r in UWMadison(root, split="all", img_size=8, cache=False).records})
    for dropped in cases:
        for fold in range(2):
            full = UWMadison(root, split="val", fold=fold, n_folds=2, img_size=8, cache=False)
            full_val = {r.case for r in full.records}
            try:
                cut = UWMadison(root, split="val", fold=fold, n_folds=2, img_size=8, cache=False,
                                exclude=[dropped])
            except ValueError as e:  # the fold held only the dropped case
                assert "selects no slices" in str(e) and full_val == {dropped}
                continue
            assert {r.case for r in cut.records} == full_val - {dropped}


def test_case_folds_are_balanced_grouped_and_deterministic():
    cases = [3, 9, 4, 9, 15, 3, 21, 8, 2]
    folds = case_folds(cases, 3)
    assert set(folds) == set(cases)
    sizes = [list(folds.values()).count(k) for k in range(3)]
    assert max(sizes) - min(sizes) <= 1
    assert case_folds(reversed(cases), 3) == folds


def test_excluding_a_case_of_five_with_five_folds_is_allowed(tmp_path):
    """The folds are built from all five cases, so n_folds=5 stays valid after an exclusion."""
    root = tmp_path / "uw5"
    generate(root, cases=5, days=1, slices=3, seed=1)
    cases = sorted({r.case for r in UWMadison(root, split="all", img_size=8, cache=False).records})
    dropped = cases[0]
    seen = set()
    for fold in range(5):
        try:
            val = UWMadison(root, split="val", fold=fold, n_folds=5, img_size=8, cache=False,
                            exclude=[dropped])
        except ValueError as e:  # the fold of the dropped case is empty now
            assert "selects no slices" in str(e)
            continue
        seen |= {r.case for r in val.records}
    assert seen == set(cases) - {dropped}
    with pytest.raises(ConfigError, match="n_folds 6: expected 2..5"):
        UWMadison(root, split="val", n_folds=6, img_size=8, cache=False, exclude=[dropped])


def test_select_split_checks_the_options_against_all_cases():
    items = [1, 1, 2, 3]
    assert select_split(items, int, [1, 2, 3, 4], "all", 0, 5) == items
    val = select_split(items, int, [1, 2, 3, 4], "val", 0, 4)
    train = select_split(items, int, [1, 2, 3, 4], "train", 0, 4)
    assert sorted(val + train) == items
    with pytest.raises(ConfigError, match="fold 4"):
        select_split(items, int, [1, 2, 3, 4], "val", 4, 4)
    with pytest.raises(ConfigError, match="split 'test'"):
        select_split(items, int, [1, 2, 3, 4], "test", 0, 4)
