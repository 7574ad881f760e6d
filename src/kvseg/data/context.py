"""2.5D context: which slices are stacked as channels around each slice (the one stacker).

Used by the dataset (neighbours by slice order within each scan) and by ``kvseg predict``
(neighbours among the readable slices of a scan), so both stack the same way: channel ``j`` of
slice ``i`` is the slice ``j - context`` positions away in the same scan, and at a scan's ends
the border slice repeats.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence

import numpy as np

from kvseg.errors import ConfigError


def neighbour_table(groups: Sequence[Hashable], context: int) -> np.ndarray:
    """Indices of the slices stacked around each slice, clamped to its scan (edge repetition).

    Args:
        groups: one key per slice, in slice order; slices of one scan are a contiguous run of
            equal keys (e.g. the scan id of each record, sorted by scan and slice).
        context: neighbours per side (>= 0).

    Returns:
        int64 (N, 2 * context + 1): row ``i`` lists indices into ``groups``; column ``context``
        is ``i`` itself. ``neighbour_table(["a", "a", "a", "b"], 1)`` is
        ``[[0, 0, 1], [0, 1, 2], [1, 2, 2], [3, 3, 3]]``.
    """
    if context < 0:
        raise ConfigError(f"context {context}: expected >= 0")
    n = len(groups)
    starts = np.zeros(n, np.int64)
    ends = np.zeros(n, np.int64)  # exclusive
    begin = 0
    for i in range(1, n + 1):
        if i == n or groups[i] != groups[begin]:
            starts[begin:i], ends[begin:i] = begin, i
            begin = i
    offsets = np.arange(-context, context + 1, dtype=np.int64)
    table = np.arange(n, dtype=np.int64)[:, None] + offsets[None, :]
    return np.clip(table, starts[:, None], ends[:, None] - 1)


def scan_positions(keys: Iterable[Hashable]) -> dict:
    """``{key: [positions]}``: the items of each scan (volume), in item order, for per-scan (3D)
    metrics."""
    out: dict = {}
    for i, key in enumerate(keys):
        out.setdefault(key, []).append(i)
    return out


__all__ = ["neighbour_table", "scan_positions"]
