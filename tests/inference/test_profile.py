"""Parameter and MAC counts against hand formulas and torch's FlopCounterMode; the timing helper."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import kvseg
from kvseg.cli import main
from kvseg.inference.profile import build_on_meta, count_macs, count_params, profile_table
from kvseg.models.registry import PRESETS

POS_DIM = 50
N_COL = POS_DIM - 2 * math.ceil(POS_DIM / 4)  # key-index channels of the 2D encoding: 24


def _counts(name: str, size: str = "base", img: int = 224) -> tuple[int, int]:
    model = build_on_meta(name, size=size, img_size=img)
    return count_params(model), count_macs(model, (1, 3, img, img))


@pytest.mark.parametrize("family", ["setr", "setr_conv"])
def test_vit_families_kv_saves_exactly_the_query_projection(family):
    """Base, 224²: N = 14·14 tokens, L layers of width d. KV removes Linear(d, d) (+bias) per
    layer: L(d² + d) parameters and L·N·d² MACs; KV-pos adds Linear(pos_dim, 1) per layer and
    N·n_col MACs for its key bias."""
    cfg = PRESETS[family]["base"]
    n, d, depth = 14 * 14, cfg.dim, cfg.depth
    p_qkv, m_qkv = _counts(f"{family}_qkv")
    p_kv, m_kv = _counts(f"{family}_kv")
    p_pos, m_pos = _counts(f"{family}_kvpos")
    assert p_qkv - p_kv == depth * (d * d + d)
    assert m_qkv - m_kv == depth * n * d * d
    assert p_qkv - p_pos == depth * (d * d + d) - depth * (POS_DIM + 1)
    assert m_qkv - m_pos == depth * n * d * d - depth * n * N_COL
    assert p_pos < p_qkv and m_pos < m_qkv


def test_cvt_kv_saves_exactly_the_query_branch_minus_the_stride1_keys():
    """CvT-13, 224²: stage grids 56, 28, 14; keys at stride 2: M = 28², 14², 7². Per layer KV
    removes the Q branch (dw 3×3: 9C, BN: 2C, Linear: C² + C) and, since K now runs at stride 1,
    saves M·(9C + C²) MACs net (Q's N·(9C + C²) gone, K's cost grows from M to N tokens)."""
    cfg = PRESETS["setr_cvt"]["base"]
    grids = [56, 28, 14]
    d_params = sum(depth * (c * c + 12 * c) for c, depth in zip(cfg.dims, cfg.depths, strict=True))
    d_macs = sum(depth * math.ceil(g / 2) ** 2 * (c * c + 9 * c)
                 for c, depth, g in zip(cfg.dims, cfg.depths, grids, strict=True))
    pos_params = sum(cfg.depths) * (POS_DIM + 1)
    pos_macs = sum(depth * math.ceil(g / 2) ** 2 * N_COL
                   for depth, g in zip(cfg.depths, grids, strict=True))
    p_qkv, m_qkv = _counts("setr_cvt_qkv")
    p_kv, m_kv = _counts("setr_cvt_kv")
    p_pos, m_pos = _counts("setr_cvt_kvpos")
    assert p_qkv - p_kv == d_params
    assert m_qkv - m_kv == d_macs
    assert p_qkv - p_pos == d_params - pos_params
    assert m_qkv - m_pos == d_macs - pos_macs
    assert p_pos < p_qkv and m_pos < m_qkv


def test_macs_of_a_tiny_setr_by_hand():
    """SETR-naive, patch 8, dim 16, 1 layer, 2 heads, decoder 8, input 16×24 -> 2×3 = 6 tokens."""
    model = kvseg.create_model("setr_qkv", size="micro", patch_size=8, dim=16, depth=1,
                               num_heads=2, head="naive", decoder_channels=8, img_size=16)
    n, d = 6, 16
    expected = (n * (3 * 8 * 8) * d  # patch embedding conv
                + n * d * 3 * d  # fused qkv
                + n * n * d + n * n * d  # QKᵀ and AV over all heads
                + n * d * d  # output projection
                + n * d * 4 * d + n * 4 * d * d  # MLP
                + n * d * 8  # naive head 1×1 conv
                + n * 8 * 3)  # classifier 1×1 conv
    assert count_macs(model, (1, 3, 16, 24)) == expected
    assert count_macs(model, (2, 3, 16, 24)) == 2 * expected


def test_macs_of_grouped_and_transposed_convolutions_by_hand():
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=2),
                          nn.ConvTranspose2d(6, 4, 2, stride=2, groups=2), nn.Flatten(),
                          nn.Linear(4 * 10 * 10, 7))
    expected = (6 * 25 * (4 // 2) * 9  # conv: outputs × in/groups × k²
                + 6 * 25 * (4 // 2) * 4  # transposed: inputs × out/groups × k²
                + 400 * 7)
    assert count_macs(model, (1, 4, 5, 5)) == expected


def _explicit_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, scale=None, **_):
    logits = (q @ k.transpose(-2, -1)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if attn_mask is not None:
        logits = logits + attn_mask
    return logits.softmax(-1) @ v


@pytest.mark.parametrize("name", ["setr_qkv", "setr_kv", "setr_conv_qkv", "setr_conv_kv",
                                  "setr_cvt_qkv", "setr_cvt_kv", "setr_kvpos"])
def test_count_macs_agrees_with_flop_counter_mode(name, monkeypatch):
    """FlopCounterMode (FLOPs = 2·MACs) sees SDPA as 0 on CPU, so the attention runs as explicit
    matmuls here. It does not count the KV-pos bias (a matrix-vector product): added by hand
    (setr micro, 32×48: 4×6 tokens, 4 layers). KV-pos runs its products on q, k (and v) widened
    from head_dim 24 to 25 on the CPU (the folded key bias, mask-free); count_macs counts the
    maths, so the counter's extra channel in both products is taken off (4 layers x 4 heads x
    24 x 24 tokens x 2 products x 1)."""
    monkeypatch.setattr(F, "scaled_dot_product_attention", _explicit_sdpa)
    model = kvseg.create_model(name, size="micro", img_size=32).eval()
    shape = (1, 3, 32, 48)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(shape))
    extra = 4 * 24 * N_COL - 4 * 4 * 24 * 24 * 2 * (25 - 24) if name == "setr_kvpos" else 0
    assert counter.get_total_flops() // 2 + extra == count_macs(model, shape)


def test_meta_counts_equal_real_counts():
    for name in ("setr_conv_kvpos", "setr_cvt_qkv"):
        real = kvseg.create_model(name, size="micro", img_size=64)
        meta = build_on_meta(name, size="micro", img_size=64)
        assert count_params(real) == count_params(meta) == sum(p.numel() for p in
                                                               real.parameters())
        assert count_macs(real, (1, 3, 64, 64)) == count_macs(meta, (1, 3, 64, 64))


def test_profile_table_formats():
    rows = json.loads(profile_table("all", size="micro", img_size=64, fmt="json"))["rows"]
    assert [r["model"] for r in rows] == kvseg.list_models()
    for r in rows:
        if r["model"] in ("setr_qkv", "setr_conv_kv", "setr_cvt_kvpos"):
            model = kvseg.create_model(r["model"], size="micro", img_size=64)
            assert r["params"] == count_params(model)
        if r["mode"] == "qkv":
            assert r["params_reduction_pct"] == 0.0
        elif r["mode"] == "none":  # dynunet: no attention, no QKV twin
            assert r["params_reduction_pct"] is None and r["macs_reduction_pct"] is None
        else:
            assert r["params_reduction_pct"] > 0 and r["macs_reduction_pct"] > 0
    table = list(csv.DictReader(io.StringIO(profile_table(["setr_kv"], size="micro",
                                                          img_size=64, fmt="csv"))))
    assert len(table) == 1 and int(table[0]["params"]) == rows[1]["params"]
    md = profile_table(["setr_cvt_qkv", "setr_cvt_kv"], size="micro", img_size=64)
    assert md.count("| setr_cvt_") == 2
    with pytest.raises(ValueError, match="xml"):
        profile_table("all", size="micro", fmt="xml")
    with pytest.raises(ValueError, match="setr_x"):
        profile_table(["setr_x"], size="micro")


def test_cli_profile_and_models(capsys):
    assert main(["profile", "--models", "setr_kv", "setr_qkv", "--size", "micro",
                 "--img-size", "64", "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in out["rows"]] == ["setr_kv", "setr_qkv"]
    assert main(["models", "--size", "micro", "--img-size", "64"]) == 0
    assert capsys.readouterr().out.count("\n| ") == len(kvseg.list_models())  # every variant
    assert main(["profile", "--models", "nope", "--size", "micro"]) == 2


def test_peak_cpu_memory_follows_allocations_and_frees(capfd):
    from kvseg.inference.profile import peak_cpu_memory

    mib = 2**20
    weights = torch.empty(8 * mib, dtype=torch.uint8)  # alive before: not counted

    def fn():
        a = torch.empty(1 * mib, dtype=torch.uint8)
        b = torch.empty(2 * mib, dtype=torch.uint8)
        del a  # 2 MiB alive
        c = torch.empty(int(1.5 * mib), dtype=torch.uint8)  # 3.5 MiB alive: the peak
        return b, c

    peak = peak_cpu_memory(fn)
    assert weights.numel() == 8 * mib
    assert 3.5 * mib <= peak <= 3.5 * mib + 4096  # allocator rounding at most
    assert "USDT" not in capfd.readouterr().err  # Kineto's native chatter is silenced


class _FakeClock:
    """A perf_counter that only moves when a fake function 'runs' for a known time."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_time_fn_times_only_the_calls_after_warmup(monkeypatch):
    from kvseg.inference import profile

    clock = _FakeClock()
    monkeypatch.setattr(profile.time, "perf_counter", clock)
    durations_ms = iter([500.0, 400.0] + [float(k) for k in range(1, 11)])  # 2 warm-up, 10 timed
    calls = []

    def fn():
        calls.append(1)
        clock.now += next(durations_ms) / 1e3

    t = profile.time_fn(fn, repeats=10, warmup=2)
    assert len(calls) == 12
    assert t.repeats == 10 and t.times_ms == pytest.approx(tuple(range(1, 11)))
    assert t.median_ms == pytest.approx(5.5)
    assert t.mean_ms == pytest.approx(5.5)
    assert t.min_ms == pytest.approx(1.0)
    assert t.p90_ms == pytest.approx(9.1)  # numpy's default (linear) percentile
    assert t.p90_ms == pytest.approx(float(np.percentile(range(1, 11), 90)))
    assert t.p90_ms >= t.median_ms and t.device == "cpu"


def test_time_fns_interleaves_and_honours_per_function_repeats():
    from kvseg.inference.profile import time_fns

    order = []
    t = time_fns({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                 repeats={"a": 3, "b": 1}, warmup=1)
    assert order == ["a", "b", "a", "b", "a", "a"]  # warm-up round, then round-robin
    assert (t["a"].repeats, t["b"].repeats) == (3, 1)
    assert t["b"].p90_ms == t["b"].median_ms == t["b"].min_ms
    with pytest.raises(ValueError, match="repeats"):
        time_fns({"a": lambda: None}, repeats=0)


def test_time_fn_sets_threads_and_restores_them_also_after_an_error():
    from kvseg.inference.profile import time_fn

    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    seen = []
    t = time_fn(lambda: seen.append(torch.get_num_threads()), repeats=2, warmup=1, threads=want)
    assert seen == [want] * 3 and t.threads == want
    assert torch.get_num_threads() == before

    def boom():
        assert torch.get_num_threads() == want
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        time_fn(boom, repeats=1, threads=want)
    assert torch.get_num_threads() == before


def test_profile_model_keys_and_counts():
    from kvseg.inference.profile import profile_model

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    prof = profile_model(model, (1, 3, 16, 16), repeats=3, warmup=1, threads=1)
    assert set(prof) == {"params", "macs", "input_shape", "threads", "latency_ms",
                         "latency_p90_ms", "peak_mem_mb", "gpu_latency_ms", "gpu_peak_mem_mb"}
    assert prof["params"] == count_params(model) and prof["macs"] == count_macs(model,
                                                                                (1, 3, 16, 16))
    assert prof["input_shape"] == [1, 3, 16, 16] and prof["threads"] == 1
    assert 0 < prof["latency_ms"] <= prof["latency_p90_ms"]
    assert math.isnan(prof["gpu_latency_ms"]) and math.isnan(prof["gpu_peak_mem_mb"])
    assert not model.training


def test_time_fn_synchronises_cuda_around_every_timed_call(monkeypatch):
    from kvseg.inference.profile import time_fn

    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("sync"))
    t = time_fn(lambda: events.append("call"), repeats=2, warmup=1, device="cuda:0")
    assert events == ["call", "sync", "sync", "call", "sync", "sync", "call", "sync"]
    assert t.device == "cuda:0"
