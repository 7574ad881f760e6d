"""Time and peak memory of the four attention forms: qkv, kv, kv_pos (factored), kv_pos naive.

One ViT-B attention layer (dim 768, 12 heads, pos_dim 50), batch 1, forward in eval mode under
``torch.no_grad()``, at N = 196, 784 and 1024 tokens. The ``*_core`` rows time the KV-pos
attention products alone (given K and V: logits, bias, softmax, AV), without the projections
that both forms share. ``kv_pos naive`` is Borji's form: the
(B, heads, N, N, pos_dim) tensor logits + P(i, j) mapped by ``Linear(pos_dim, 1)``; its fixed
(N, N, pos_dim) table is built before timing, as Borji precomputes it.

Peak memory: the CPU allocator's high-water mark above the start of the call, from the torch
profiler's memory events (``profile_memory=True``) — the tensors torch allocates, not the
process RSS. Time: median (and min) of repeated calls after one warm-up call, the forms
interleaved round-robin (:func:`kvseg.inference.profile.time_fns`).

Usage: ``python benchmarks/attention.py [--reps 5] [--tokens 196 784 1024]``; prints a table and
writes ``benchmarks/results/attention.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench_common import add_threads_option, apply_threads, machine
from kvseg.inference.profile import peak_cpu_memory, time_fns
from kvseg.layers import Attention, sinusoidal_2d
from kvseg.utils import atomic_write_text

FORMS = ("qkv", "kv", "kv_pos", "kv_pos_naive")


def naive_kv_pos(attn: Attention, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Borji's ViT_pos.py KV-pos: materialises (B, heads, N, N, pos_dim)."""
    b, n, c = x.shape
    k, v = attn.kv(x).view(b, n, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    dots = (k @ k.transpose(-2, -1)) * attn.head_dim ** -0.5  # (B, h, N, N)
    dots = attn.pos.map_pos(dots.unsqueeze(-1) + table).squeeze(-1)  # via (B, h, N, N, pos_dim)
    out = dots.softmax(-1) @ v
    return attn.proj(out.transpose(1, 2).reshape(b, n, c))


def naive_kv_pos_core(k: torch.Tensor, v: torch.Tensor, map_pos: torch.nn.Linear,
                      table: torch.Tensor, scale: float) -> torch.Tensor:
    """Only the part that differs: logits, Borji's 5D map, softmax, AV."""
    dots = (k @ k.transpose(-2, -1)) * scale
    return map_pos(dots.unsqueeze(-1) + table).squeeze(-1).softmax(-1) @ v


def bench(n: int, reps: int, dim: int = 768, heads: int = 12, pos_dim: int = 50) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(1, n, dim)
    modules = {m: Attention(dim, heads, m, pos_dim=pos_dim).eval() for m in ("qkv", "kv",
                                                                           "kv_pos")}
    table = sinusoidal_2d(n, n, pos_dim)
    calls = {
        "qkv": lambda: modules["qkv"](x),
        "kv": lambda: modules["kv"](x),
        "kv_pos": lambda: modules["kv_pos"](x),
        "kv_pos_naive": lambda: naive_kv_pos(modules["kv_pos"], x, table),
    }
    # The attention products alone (projections excluded: they are the same in both forms).
    pos = modules["kv_pos"]
    k, v = torch.randn(2, 1, heads, n, dim // heads)

    def factored_core():
        temperature, key_bias = pos.pos(n)
        return pos.core(k, k, v, temperature, key_bias)

    core_calls = {
        "kv_pos_core": factored_core,
        "kv_pos_naive_core": lambda: naive_kv_pos_core(k, v, pos.pos.map_pos, table,
                                                       pos.core.scale),
    }
    with torch.no_grad():
        torch.testing.assert_close(calls["kv_pos"](), calls["kv_pos_naive"](), atol=1e-4,
                                   rtol=1e-4)
        torch.testing.assert_close(core_calls["kv_pos_core"](), core_calls["kv_pos_naive_core"](),
                                   atol=1e-4, rtol=1e-4)
        calls.update(core_calls)
        peaks = {form: peak_cpu_memory(fn) for form, fn in calls.items()}  # also the warm-up calls
        reps_of = {form: min(reps, 3) if "naive" in form else reps for form in calls}
        times = time_fns(calls, repeats=reps_of, warmup=0)
    rows = []
    for form in calls:
        rows.append({"tokens": n, "form": form, "ms": times[form].median_ms,
                     "ms_min": times[form].min_ms, "reps": times[form].repeats,
                     "peak_mib": peaks[form] / 2**20})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[196, 784, 1024])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "attention.json"))
    add_threads_option(parser)
    args = parser.parse_args()
    apply_threads(args)
    rows = [r for n in args.tokens for r in bench(n, args.reps)]
    by = {(r["tokens"], r["form"]): r for r in rows}
    print(f"{'N':>5} {'form':<18} {'median ms':>10} {'min ms':>9} {'peak MiB':>9} "
          f"{'time/kv':>8}")
    for r in rows:
        kv = by[(r["tokens"], "kv")]
        print(f"{r['tokens']:>5} {r['form']:<18} {r['ms']:>10.2f} {r['ms_min']:>9.2f} "
              f"{r['peak_mib']:>9.1f} {r['ms'] / kv['ms']:>8.2f}")
    targets = {}
    for n in args.tokens:
        fac, kv, naive = by[(n, "kv_pos")], by[(n, "kv")], by[(n, "kv_pos_naive")]
        targets[str(n)] = {
            "kv_pos_time_over_kv": fac["ms"] / kv["ms"],
            "kv_pos_time_over_kv_min": fac["ms_min"] / kv["ms_min"],
            "naive_time_over_factored": naive["ms"] / fac["ms"],
            "naive_peak_over_factored": naive["peak_mib"] / fac["peak_mib"],
            "core_naive_time_over_factored": by[(n, "kv_pos_naive_core")]["ms"]
            / by[(n, "kv_pos_core")]["ms"],
            "core_naive_peak_over_factored": by[(n, "kv_pos_naive_core")]["peak_mib"]
            / by[(n, "kv_pos_core")]["peak_mib"],
        }
    print("\ntargets: kv_pos/kv time <= 1.15; naive/factored time and peak >= 20 at N = 784")
    for n, t in targets.items():
        print(f"  N={n}: kv_pos/kv {t['kv_pos_time_over_kv']:.2f} (min "
              f"{t['kv_pos_time_over_kv_min']:.2f}), naive/factored time "
              f"{t['naive_time_over_factored']:.1f}x, peak {t['naive_peak_over_factored']:.1f}x; "
              f"products only: time {t['core_naive_time_over_factored']:.1f}x, peak "
              f"{t['core_naive_peak_over_factored']:.1f}x")
    result = {
        "benchmark": "attention", "dim": 768, "heads": 12, "pos_dim": 50, "batch": 1,
        "pass": "forward, eval, no_grad", **machine(), "rows": rows,
        "ratios": targets,
    }
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
