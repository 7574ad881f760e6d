"""Every mode's parameter and MAC difference to QKV at base size, 224², equals the formulas of
docs/models.md ("Parameters and MACs per mode"), through count_params / count_macs."""

from __future__ import annotations

import math

import pytest

from kvseg.inference.profile import build_on_meta, count_macs, count_params
from kvseg.layers import MODES
from kvseg.models.registry import PRESETS

IMG = 224
SUFFIX = {"qkv": "qkv", "kv": "kv", "kv_pos": "kvpos", "shared_kv": "sharedkv",
          "shared_qv": "sharedqv", "single": "single", "kv_relpos": "kvrelpos"}
#: projections removed against QKV, per attention layer
REMOVED = {"qkv": 0, "kv": 1, "kv_pos": 1, "shared_kv": 1, "shared_qv": 1, "single": 2,
           "kv_relpos": 1}


def _counts(name: str) -> tuple[int, int]:
    model = build_on_meta(name, size="base", img_size=IMG)
    return count_params(model), count_macs(model, (1, 3, IMG, IMG))


def token_deltas(mode: str, depth: int, dim: int, heads: int, grid: int,
                 pos_dim: int = 50) -> tuple[int, int]:
    """SETR / hybrid: L layers of d channels over N = g² tokens. A projection is d² + d
    parameters and N·d² MACs; KV-pos adds pos_dim + 1 parameters and N·n_col MACs (n_col = 24
    column channels at pos_dim 50) per layer; KV-relpos heads·(2g - 1)² parameters, no MACs."""
    n = grid * grid
    params = -REMOVED[mode] * depth * (dim * dim + dim)
    macs = -REMOVED[mode] * depth * n * dim * dim
    if mode == "kv_pos":
        n_col = pos_dim - 2 * math.ceil(pos_dim / 4)
        params += depth * (pos_dim + 1)
        macs += depth * n * n_col
    if mode == "kv_relpos":
        params += depth * heads * (2 * grid - 1) ** 2
    return params, macs


def cvt_deltas(mode: str, pos_dim: int = 50) -> tuple[int, int]:
    """CvT-13: per layer of C channels, N query and M key tokens (stage grid g, keys on
    ceil(g/2)²): a removed branch is 9C + 2C + C² + C parameters and M·(9C + C²) MACs; KV-pos
    adds pos_dim + 1 parameters and M·24 MACs; KV-relpos heads·(2g - 1)² parameters."""
    cfg = PRESETS["setr_cvt"]["base"]
    params = macs = 0
    for c, depth, heads, g in zip(cfg.dims, cfg.depths, cfg.num_heads, (56, 28, 14),
                                  strict=True):
        m = math.ceil(g / 2) ** 2
        params -= REMOVED[mode] * depth * (c * c + 12 * c)
        macs -= REMOVED[mode] * depth * m * (9 * c + c * c)
        if mode == "kv_pos":
            params += depth * (pos_dim + 1)
            macs += depth * m * 24
        if mode == "kv_relpos":
            params += depth * heads * (2 * g - 1) ** 2
    return params, macs


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", ["setr", "setr_conv", "setr_cvt"])
def test_deltas_against_qkv_match_the_formulas(family, mode):
    ref_params, ref_macs = _counts(f"{family}_qkv")
    params, macs = _counts(f"{family}_{SUFFIX[mode]}")
    if family == "setr_cvt":
        want = cvt_deltas(mode)
    else:
        cfg = PRESETS[family]["base"]
        want = token_deltas(mode, cfg.depth, cfg.dim, cfg.num_heads, 14)
    assert (params - ref_params, macs - ref_macs) == want


def test_the_numbers_in_the_docs():
    """SETR-B at 224²: the table of docs/models.md."""
    assert token_deltas("single", 12, 768, 12, 14) == (-14_174_208, -2_774_532_096)
    assert token_deltas("kv_relpos", 12, 768, 12, 14) == (-7_087_104 + 12 * 12 * 729,
                                                          -1_387_266_048)
    assert cvt_deltas("single") == (-3_207_680, -185_475_584)
    assert cvt_deltas("kv_relpos") == (-1_603_840 + 74_211, -92_737_792)
