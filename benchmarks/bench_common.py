"""What the benchmark scripts share: the ``--threads`` option and the machine description
stored in their JSON. Imported by the scripts beside it (run as ``python benchmarks/X.py``);
the timing itself is :func:`kvseg.inference.profile.time_fn` /
:func:`kvseg.inference.profile.time_fns`."""

from __future__ import annotations

import argparse
import os
import platform

import torch


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """``--threads N``: torch's CPU thread count for the whole script (0: torch's default)."""
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: torch's default). On a CPU shared with other "
                        "jobs use 1: each parallel region otherwise waits for a descheduled "
                        "thread")


def apply_threads(args: argparse.Namespace) -> None:
    """Set torch's thread count from ``--threads`` (0 leaves torch's default)."""
    if args.threads:
        torch.set_num_threads(args.threads)


def machine() -> dict:
    """torch version, thread count, processor, CPU count and load average, for the JSON."""
    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "load_avg_at_end": os.getloadavg()}


def write_result(path, result: dict, t0: float) -> None:
    """Write ``result`` (with the seconds since ``t0``) as JSON to ``path`` atomically, and say
    so on stdout."""
    import json
    import time
    from pathlib import Path

    path = Path(path)
    result = {**result, "seconds": round(time.time() - t0, 1)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)
    print(f"{result['seconds']:.0f} s; wrote {path}")

