"""Forward + backward time and peak memory of every variant at base size, 224×224, batch 2.

Train mode, one optimiser-free step (forward, ``logits.mean().backward()``), CPU. The three
variants of a family are timed round-robin (one step of each per round) so that load from other
processes hits them alike. Peak memory is the CPU allocator's high-water mark above the start
of the step (torch profiler memory events), measured on the warm-up step.

Efficiency: achieved FLOP/s = 2 FLOPs/MAC × 3 (backward ≈ 2 × forward) × MACs(batch) / time,
as a fraction of this machine's float32 matmul FLOP/s (a 2048³ ``torch.mm``, best of 5, same
thread count).

Usage: ``python benchmarks/models.py [--reps 3] [--models setr_qkv ...]``; prints a table and
writes ``benchmarks/results/models.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import kvseg
from kvseg.models.registry import model_info
from kvseg.profile import count_macs, count_params, peak_cpu_memory
from kvseg.utils import atomic_write_text


def matmul_flops(n: int = 2048, reps: int = 5) -> float:
    """float32 FLOP/s of an n×n by n×n matmul on this machine (best of ``reps``)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(reps))
    return 2 * n**3 / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_family(names: list[str], reps: int, batch: int, img: int) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(batch, 3, img, img)
    models = {n: kvseg.create_model(n, size="base", img_size=img).train() for n in names}

    def step(model):
        def run():
            model.zero_grad(set_to_none=True)
            model(x).mean().backward()
        return run

    peaks = {n: peak_cpu_memory(step(m)) for n, m in models.items()}  # also the warm-up step
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(reps):
        for n, m in models.items():
            times[n].append(_timed(step(m)))
    rows = []
    for n, m in models.items():
        macs = count_macs(m, (batch, 3, img, img))
        rows.append({"model": n, **model_info(n), "params": count_params(m), "macs": macs,
                     "s": statistics.median(times[n]), "s_min": min(times[n]),
                     "reps": reps, "peak_mib": peaks[n] / 2**20})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=kvseg.list_models())
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "models.json"))
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: torch's default). On a CPU shared with other "
                        "jobs use 1: each parallel region otherwise waits for a descheduled "
                        "thread")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    peak = matmul_flops()
    families: dict[str, list[str]] = {}
    for n in args.models:
        families.setdefault(model_info(n)["family"], []).append(n)
    rows = [r for names in families.values()
            for r in bench_family(names, args.reps, args.batch, args.img_size)]
    peak_after = matmul_flops()
    qkv = {r["family"]: r for r in rows if r["mode"] == "qkv"}
    for r in rows:
        r["gflops_achieved"] = 6 * r["macs"] / r["s"] / 1e9
        r["matmul_fraction"] = 6 * r["macs"] / r["s"] / peak
        ref = qkv.get(r["family"])
        r["time_over_qkv"] = r["s"] / ref["s"] if ref else None
        r["time_over_qkv_min"] = r["s_min"] / ref["s_min"] if ref else None
    print(f"matmul: {peak / 1e9:.1f} GFLOP/s before, {peak_after / 1e9:.1f} after "
          f"({torch.get_num_threads()} threads)")
    print(f"{'model':<16} {'params M':>9} {'GMACs':>7} {'median s':>9} {'min s':>7} "
          f"{'peak MiB':>9} {'GFLOP/s':>8} {'of mm':>6} {'t/qkv':>6} {'min/qkv':>7}")
    for r in rows:
        ratio = f"{r['time_over_qkv']:.2f}" if r["time_over_qkv"] else "-"
        ratio_min = f"{r['time_over_qkv_min']:.2f}" if r["time_over_qkv_min"] else "-"
        print(f"{r['model']:<16} {r['params'] / 1e6:>9.2f} {r['macs'] / 1e9:>7.2f} "
              f"{r['s']:>9.2f} {r['s_min']:>7.2f} {r['peak_mib']:>9.0f} "
              f"{r['gflops_achieved']:>8.1f} {100 * r['matmul_fraction']:>5.0f}% {ratio:>6} "
              f"{ratio_min:>7}")
    print("\ntargets: KV fwd+bwd time <= 0.95 x QKV twin; SETR base >= 60% of matmul FLOP/s")
    result = {
        "benchmark": "models", "size": "base", "img_size": args.img_size, "batch": args.batch,
        "pass": "train-mode forward + backward", "torch": torch.__version__,
        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "load_avg_at_end": os.getloadavg(),
        "matmul_gflops": [peak / 1e9, peak_after / 1e9], "rows": rows,
    }
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
