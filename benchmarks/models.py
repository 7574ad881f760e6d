"""Forward + backward time and peak memory of every variant at base size, 224×224, batch 2.

Train mode, one optimiser-free step (forward, ``logits.mean().backward()``), CPU. The variants
of a family (every attention mode: the paper's three and the other sharing modes) are timed
round-robin (one step of each per round) so that load from other processes hits them alike.
Peak memory is the CPU allocator's high-water mark above the start of the step (torch profiler
memory events), measured on the warm-up step.

Each mode's time is set against its MAC count: ``time_over_qkv`` (measured) next to
``macs_over_qkv`` (what a compute-bound step would take); ``time_over_kv`` and
``peak_over_kv`` compare each mode with its family's KV twin (KV-pos's target: within 2 %).

Efficiency: achieved FLOP/s = 2 FLOPs/MAC × 3 (backward ≈ 2 × forward) × MACs(batch) / time,
as a fraction of this machine's float32 matmul FLOP/s (a 2048³ ``torch.mm``, best of 5, same
thread count).

Usage: ``python benchmarks/models.py [--reps 3] [--models setr_qkv ...] [--size micro]``; prints a
table and writes ``benchmarks/results/models.json``. A family is measured only with its QKV and
KV twins among the models (added if missing), the references of the ratios.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import kvseg
from bench_common import add_threads_option, apply_threads, machine
from kvseg.inference.profile import count_macs, count_params, peak_cpu_memory, time_fn, time_fns
from kvseg.models.registry import model_info
from kvseg.utils import atomic_write_text


def matmul_flops(n: int = 2048, reps: int = 5) -> float:
    """float32 FLOP/s of an n×n by n×n matmul on this machine (best of ``reps``)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best_ms = time_fn(lambda: torch.mm(a, b), repeats=reps, warmup=1).min_ms
    return 2 * n**3 / (best_ms / 1e3)


def bench_family(names: list[str], reps: int, batch: int, img: int,
                 size: str = "base") -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(batch, 3, img, img)
    models = {n: kvseg.create_model(n, size=size, img_size=img).train() for n in names}

    def step(model):
        def run():
            model.zero_grad(set_to_none=True)
            model(x).mean().backward()
        return run

    peaks = {n: peak_cpu_memory(step(m)) for n, m in models.items()}  # also the warm-up step
    times = time_fns({n: step(m) for n, m in models.items()}, repeats=reps, warmup=0)
    rows = []
    for n, m in models.items():
        macs = count_macs(m, (batch, 3, img, img))
        rows.append({"model": n, **model_info(n), "params": count_params(m), "macs": macs,
                     "s": times[n].median_ms / 1e3, "s_min": times[n].min_ms / 1e3,
                     "reps": reps, "peak_mib": peaks[n] / 2**20})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=kvseg.list_models())
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--size", default="base", choices=["micro", "small", "base", "large"],
                        help="model size preset (micro: the demo's models)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "models.json"))
    add_threads_option(parser)
    args = parser.parse_args()
    apply_threads(args)
    peak = matmul_flops()
    families: dict[str, list[str]] = {}
    for n in args.models:
        fam = model_info(n)["family"]
        names = families.setdefault(fam, [f"{fam}_qkv", f"{fam}_kv"])
        if n not in names:
            names.append(n)
    rows = [r for names in families.values()
            for r in bench_family(names, args.reps, args.batch, args.img_size, args.size)]
    peak_after = matmul_flops()
    qkv = {r["family"]: r for r in rows if r["mode"] == "qkv"}
    kv = {r["family"]: r for r in rows if r["mode"] == "kv"}
    for r in rows:
        r["gflops_achieved"] = 6 * r["macs"] / r["s"] / 1e9
        r["matmul_fraction"] = 6 * r["macs"] / r["s"] / peak
        ref, twin = qkv[r["family"]], kv[r["family"]]
        r["macs_over_qkv"] = r["macs"] / ref["macs"]
        r["time_over_qkv"] = r["s"] / ref["s"]
        r["time_over_qkv_min"] = r["s_min"] / ref["s_min"]
        r["time_over_kv"] = r["s"] / twin["s"]
        r["time_over_kv_min"] = r["s_min"] / twin["s_min"]
        r["peak_over_kv"] = r["peak_mib"] / twin["peak_mib"]
    print(f"matmul: {peak / 1e9:.1f} GFLOP/s before, {peak_after / 1e9:.1f} after "
          f"({torch.get_num_threads()} threads)")
    print(f"{'model':<19} {'params M':>9} {'GMACs':>7} {'median s':>9} {'min s':>7} "
          f"{'peak MiB':>9} {'GFLOP/s':>8} {'of mm':>6} {'MACs/qkv':>8} {'t/qkv':>6} "
          f"{'min/qkv':>7} {'t/kv':>5} {'min/kv':>6} {'peak/kv':>7}")
    for r in rows:
        print(f"{r['model']:<19} {r['params'] / 1e6:>9.2f} {r['macs'] / 1e9:>7.2f} "
              f"{r['s']:>9.2f} {r['s_min']:>7.2f} {r['peak_mib']:>9.0f} "
              f"{r['gflops_achieved']:>8.1f} {100 * r['matmul_fraction']:>5.0f}% "
              f"{r['macs_over_qkv']:>8.3f} {r['time_over_qkv']:>6.2f} "
              f"{r['time_over_qkv_min']:>7.2f} {r['time_over_kv']:>5.2f} "
              f"{r['time_over_kv_min']:>6.2f} {r['peak_over_kv']:>7.3f}")
    print("\ntargets: KV fwd+bwd time <= 0.95 x QKV twin; SETR base >= 60% of matmul FLOP/s; "
          "KV-pos time and peak memory within 2% of KV")
    result = {
        "benchmark": "models", "size": args.size, "img_size": args.img_size, "batch": args.batch,
        "pass": "train-mode forward + backward", **machine(),
        "matmul_gflops": [peak / 1e9, peak_after / 1e9], "rows": rows,
    }
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
