"""Cross-validation splits grouped by case (patient): no case is in two folds.

Folds are fixed by the dataset's full case list, before any exclusion, so excluding a scan or a
case never moves the other cases between folds, and ``n_folds`` is checked against that same
full list. A "case" is any sortable key: the UW-Madison case number, or the group of a folder
or volume dataset (a patient id, a file name). A dataset may instead list its split
(:func:`select_listed`, the ``split:`` of a ``dataset.yaml``).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import TypeVar

import numpy as np
from torch.utils.data import Dataset

from kvseg.errors import ConfigError

T = TypeVar("T")
SPLITS = ("train", "val", "all")


def case_folds(cases: Iterable[Hashable], n_folds: int, seed: int = 0) -> dict:
    """Assign each case a fold: sorted case ids, a fixed permutation (``seed``), round-robin.

    Deterministic and grouped by case (no case in two folds); fold sizes differ by at most one.
    Case ids are ints (UW-Madison) or strings (group keys), not a mix.
    """
    unique = sorted(set(cases))
    order = np.random.default_rng(seed).permutation(len(unique))
    return {unique[j]: k % n_folds for k, j in enumerate(order.tolist())}


def check_split(split: str, fold: int = 0, n_folds: int = 2, n_cases: int | None = None,
                where: str = "") -> None:
    """Raise :class:`~kvseg.errors.ConfigError` for a bad ``split``, ``n_folds`` or ``fold``.

    Args:
        split: ``"train"``, ``"val"`` or ``"all"``.
        fold: the validation fold, 0..n_folds-1 (ignored for ``"all"``).
        n_folds: number of folds, 2..n_cases (ignored for ``"all"``).
        n_cases: the number of cases the folds are built from (all of them, before exclusion);
            ``None`` checks ``split`` alone.
        where: the dataset (named in the message).
    """
    if split not in SPLITS:
        raise ConfigError(f"split {split!r}: expected 'train', 'val' or 'all'")
    if split == "all" or n_cases is None:
        return
    if n_folds < 2:
        raise ConfigError(f"n_folds {n_folds}: expected 2..{max(n_cases, 2)} (number of cases)")
    if n_folds > n_cases:
        raise ConfigError(
            f"n_folds {n_folds}: expected 2..{n_cases}: {where or 'the dataset'} has only "
            f"{n_cases} case(s) (a patient, volume or image is one case, kept in one fold); "
            "is it the dataset you meant (a run evaluated on other data keeps its n_folds: "
            "use split 'all' there)?")
    if not 0 <= fold < n_folds:
        raise ConfigError(f"fold {fold}: expected 0..{n_folds - 1}")


def select_split(items: Sequence[T], case_of: Callable[[T], Hashable],
                 all_cases: Iterable[Hashable], split: str, fold: int, n_folds: int,
                 seed: int = 0, where: str = "") -> list[T]:
    """The items of ``split``: ``"val"`` is fold ``fold``, ``"train"`` the others, ``"all"`` all.

    Args:
        items: what to select from (possibly after exclusions).
        case_of: an item's case id.
        all_cases: every case of the dataset, before exclusions: the folds come from these.
        split, fold, n_folds: as in :func:`check_split` (checked here).
        seed: the permutation of :func:`case_folds`.
        where: the dataset, for messages.
    """
    all_cases = sorted(set(all_cases))
    check_split(split, fold, n_folds, len(all_cases), where)
    if split == "all":
        return list(items)
    folds = case_folds(all_cases, n_folds, seed)
    want_val = split == "val"
    return [it for it in items if (folds[case_of(it)] == fold) == want_val]


def select_listed(items: Sequence[T], names_of: Callable[[T], Iterable[str]],
                  lists: Mapping[str, Sequence[str]], split: str) -> list[T]:
    """The items of ``split`` from a listed split (``{"train": [...], "val": [...]}``).

    An item belongs to a list when one of ``names_of(item)`` (its volume id, its group) is in
    it. With only ``val`` listed, ``train`` is everything else; with both, an item in neither
    list is in ``"all"`` only. ``"all"`` is every item.
    """
    check_split(split)
    if split == "all":
        return list(items)
    listed = {k: set(v) for k, v in lists.items()}

    def member(it: T, key: str) -> bool:
        return any(n in listed[key] for n in names_of(it))

    if split in listed:
        return [it for it in items if member(it, split)]
    other = "val" if split == "train" else "train"
    return [it for it in items if not member(it, other)]


def item_groups(dataset) -> list[Hashable]:
    """The case (group) of every item of a kvseg dataset, without loading any image."""
    records = getattr(dataset, "records", None)
    if records is None:
        raise ConfigError(f"{type(dataset).__name__}: cannot subset by case (no records)")
    return [r.case if hasattr(r, "case") else r.group for r in records]


def nested_cases(cases: Iterable[Hashable], fraction: float, seed: int = 0) -> list[Hashable]:
    """The first ``ceil(fraction · n)`` (at least 1) of a fixed permutation of the sorted cases:
    for fractions f1 < f2 the f1 subset lies inside the f2 subset."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"train_fraction={fraction}: must be in (0, 1]")
    unique = sorted(set(cases))
    order = np.random.default_rng(seed).permutation(len(unique)).tolist()
    keep = max(1, int(np.ceil(fraction * len(unique) - 1e-9)))
    return [unique[j] for j in order[:keep]]


class GroupSubset(Dataset):
    """A dataset restricted to some of its cases; forwards every other attribute (``classes``,
    ``task``, ``preprocess`` ...) to the dataset it wraps."""

    def __init__(self, dataset, indices: Sequence[int], cases: Sequence[Hashable]) -> None:
        self.dataset, self.indices, self.cases = dataset, list(indices), list(cases)

    @classmethod
    def fraction(cls, dataset, fraction: float, seed: int = 0) -> GroupSubset:
        groups = item_groups(dataset)
        keep = set(nested_cases(groups, fraction, seed))
        return cls(dataset, [i for i, g in enumerate(groups) if g in keep], sorted(keep))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.dataset[self.indices[i]]

    def __getattr__(self, name: str):
        if name in ("dataset", "indices", "cases") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    @property
    def records(self):
        return [self.dataset.records[i] for i in self.indices]


__all__ = ["SPLITS", "GroupSubset", "case_folds", "check_split", "item_groups", "nested_cases",
           "select_listed", "select_split"]
