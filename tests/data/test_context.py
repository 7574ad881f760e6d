"""2.5D context: one stacker (neighbours by slice order within a scan, edges repeated)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvseg.data import UWMadison
from kvseg.data.context import neighbour_table


def test_neighbour_table_clamps_to_each_scan():
    table = neighbour_table(["a", "a", "a", "b", "c", "c"], 1)
    assert table.dtype == np.int64 and table.shape == (6, 3)
    assert table.tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 2], [3, 3, 3], [4, 4, 5], [4, 5, 5]]
    assert neighbour_table(["a"] * 3, 0).tolist() == [[0], [1], [2]]
    wide = neighbour_table(["s"] * 4, 3)
    assert wide[0].tolist() == [0, 0, 0, 0, 1, 2, 3] and wide[3].tolist() == [0, 1, 2, 3, 3, 3, 3]
    assert neighbour_table([], 2).shape == (0, 5)
    with pytest.raises(ValueError, match="context"):
        neighbour_table(["a"], -1)


def test_context_stacks_neighbours_by_slice_id_with_edge_repetition(tiny_synth):
    k = 2
    ds = UWMadison(tiny_synth, split="all", img_size=24, context=k)
    single = UWMadison(tiny_synth, split="all", img_size=24, context=0)
    index = {r.id: i for i, r in enumerate(single.records)}
    for i in range(len(ds)):
        item = ds[i]
        n = 8  # slices per scan in TINY
        scan = f"case{item['case']}_day{item['day']}"
        expected = [f"{scan}_slice_{min(max(item['slice'] + o, 1), n):04d}"
                    for o in range(-k, k + 1)]
        assert ds.neighbour_ids(item["id"]) == expected
        assert item["image"].shape[0] == 2 * k + 1
        for c, sid in enumerate(expected):
            assert torch.equal(item["image"][c], single[index[sid]]["image"][0]), (item["id"], c)
        assert torch.equal(item["mask"], single[index[item["id"]]]["mask"])
