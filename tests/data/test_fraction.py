"""train_fraction: a nested, case-grouped subset of the training split; validation unchanged."""

from __future__ import annotations

import pytest

from kvseg.data import build_dataset
from kvseg.data.splits import nested_cases
from kvseg.data.synth import generate
from kvseg.errors import ConfigError


@pytest.fixture(scope="module")
def eight_cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("frac") / "uw"
    generate(root, cases=8, days=1, slices=3, seed=0)
    return root


def _cases(ds) -> set:
    return {r.case for r in ds.records}


def test_fractions_are_nested_and_grouped_and_val_is_unchanged(eight_cases):
    opts = {"data": str(eight_cases), "img_size": 32, "n_folds": 4, "fold": 1}
    full = build_dataset(opts, "train")
    val = build_dataset(opts, "val")
    subsets = {f: build_dataset({**opts, "train_fraction": f}, "train") for f in (0.25, 0.5, 1.0)}
    cases = {f: _cases(ds) for f, ds in subsets.items()}
    n = len(_cases(full))  # 6 training cases (8 cases, 4 folds)
    assert [len(cases[f]) for f in (0.25, 0.5, 1.0)] == [2, 3, n]  # ceil(0.25·6), ceil(0.5·6)
    assert cases[0.25] <= cases[0.5] <= cases[1.0] == _cases(full)
    assert not cases[1.0] & _cases(val)
    # whole cases: every slice of a kept case is in, and the items are the dataset's own
    per_case = {c: sum(r.case == c for r in full.records) for c in _cases(full)}
    assert len(subsets[0.5]) == sum(per_case[c] for c in cases[0.5])
    assert subsets[0.5][0]["id"] in {r.id for r in full.records}
    assert subsets[0.5].classes == full.classes  # attributes reach the wrapped dataset
    assert _cases(build_dataset({**opts, "train_fraction": 0.5}, "val")) == _cases(val)


def test_nested_cases_rules():
    cases = list(range(10))
    for f1, f2 in [(0.1, 0.3), (0.3, 0.7), (0.7, 1.0)]:
        assert set(nested_cases(cases, f1)) < set(nested_cases(cases, f2))
    assert len(nested_cases(cases, 0.01)) == 1
    for bad in (0.0, 1.5, -1):
        with pytest.raises(ConfigError, match="train_fraction"):
            nested_cases(cases, bad)


def test_test_fold_puts_every_case_in_exactly_one_split(eight_cases):
    """test_fold: train / val / test partition the cases; test is that fold of the same case
    folds (data.splits.case_folds), and train_fraction subsets train only."""
    from kvseg.data.splits import case_folds

    opts = {"data": str(eight_cases), "img_size": 32, "n_folds": 4, "fold": 1, "test_fold": 3}
    parts = {s: _cases(build_dataset(opts, s)) for s in ("train", "val", "test")}
    every = _cases(build_dataset(opts, "all"))
    assert len(every) == 8
    for case in every:
        assert sum(case in parts[s] for s in parts) == 1, case
    folds = case_folds(every, 4)
    assert parts["test"] == {c for c in every if folds[c] == 3}
    assert parts["val"] == {c for c in every if folds[c] == 1}
    without = _cases(build_dataset({**opts, "test_fold": None}, "train"))
    assert parts["train"] == without - parts["test"]  # the old train minus the test fold
    half = _cases(build_dataset({**opts, "train_fraction": 0.5}, "train"))
    assert half < parts["train"] and not half & parts["test"]


def test_test_split_needs_a_test_fold_and_a_valid_one(eight_cases):
    from kvseg.config import load_config

    opts = {"data": str(eight_cases), "img_size": 32, "n_folds": 4}
    with pytest.raises(ConfigError, match="no test_fold"):
        build_dataset(opts, "test")
    for bad, msg in ((0, "must differ from fold"), (4, "test_fold=4"), (-1, "test_fold=-1")):
        with pytest.raises(ConfigError, match=msg):
            load_config(None, {"model": "setr_qkv", "n_folds": 4, "fold": 0, "test_fold": bad})
