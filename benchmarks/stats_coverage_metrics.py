"""Coverage of the weighted Jaccard and Dice intervals (``paired_difference(metric=...)``), which
``stats_coverage.py`` does not simulate: the same design and draws, at a true difference of 0.

A and B are exchangeable in the simulation of ``stats_coverage.py``, so every metric's true
difference is exactly 0 there (a true difference of −3 Jaccard points is a different number of
Dice points, so only 0 is checked). Per cell, on the same draws: coverage of 0 and the rate of
false *better* / *worse* for the Jaccard (as a control: it repeats stats_coverage's method on
other draws), the weighted Jaccard and the Dice. Targets as there: coverage 0.93-0.97 with at
least 6 patients, false better and false worse at most 3% each.

    python benchmarks/stats_coverage_metrics.py [--draws 2000] [--jobs 2] [--out PATH]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np

import stats_coverage as C
from bench_common import write_result
from kvseg.experiments import stats as S

OUT = Path(__file__).resolve().parent / "results" / "stats_coverage_metrics.json"
METRICS = ("jaccard", "weighted_jaccard", "dice")


def _cells(task) -> list[dict]:
    index, name, sd, draws = task
    rng = np.random.default_rng([2026, index])
    cells = []
    for label, seeds, patients, days in C.LAYOUTS:
        if patients < 3:
            continue
        hits = {m: {"covered": 0, "better": 0, "worse": 0} for m in METRICS}
        for _ in range(draws):
            a, b = C.simulate(rng, seeds, patients, days, sd, 0.0)
            for m in METRICS:
                d = S.paired_difference(a, b, metric=m)
                hits[m]["covered"] += d.low <= 0 <= d.high
                hits[m]["better"] += d.low > 0
                hits[m]["worse"] += d.high < 0
        cell = {"setting": name, "layout": label, "seeds": seeds, "patients": patients,
                "draws": draws, **{m: {k: v / draws for k, v in h.items()}
                                   for m, h in hits.items()}}
        cells.append(cell)
        print(f"{name:<18} {label:<28} " + "  ".join(
            f"{m} {cell[m]['covered']:.3f} ({cell[m]['better']:.3f}/{cell[m]['worse']:.3f})"
            for m in METRICS), flush=True)
    return cells


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draws", type=int, default=2000)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    t0 = time.time()
    settings = dict(C.SETTINGS)
    settings["demo"] = {"seed": 0.53, "patient": 0.73, "inter": 1.48, "scan": 0.0}
    tasks = [(i, name, sd, args.draws) for i, (name, sd) in enumerate(settings.items())]
    if args.jobs > 1:
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            cells = [c for part in pool.imap(_cells, tasks) for c in part]
    else:
        cells = [c for task in tasks for c in _cells(task)]
    se_cov = math.sqrt(0.97 * 0.03 / args.draws)
    se_tail = math.sqrt(0.03 * 0.97 / args.draws)
    summary = {}
    for m in METRICS:
        cov = [c[m]["covered"] for c in cells if c["patients"] >= 6]
        summary[m] = {"coverage_min": min(cov), "coverage_max": max(cov),
                      "false_better_max": max(c[m]["better"] for c in cells),
                      "false_worse_max": max(c[m]["worse"] for c in cells),
                      "beyond_2se": [f"{c['setting']} / {c['layout']}" for c in cells
                                     if (c["patients"] >= 6 and not
                                         0.93 - 2 * se_cov <= c[m]["covered"] <= 0.97 + 2 * se_cov)
                                     or max(c[m]["better"], c[m]["worse"]) > 0.03 + 2 * se_tail]}
        print(f"{m}: coverage {summary[m]['coverage_min']:.3f}-{summary[m]['coverage_max']:.3f} "
              f"(>= 6 patients), false better <= {summary[m]['false_better_max']:.3f}, false "
              f"worse <= {summary[m]['false_worse_max']:.3f}; beyond 2 MC s.e. of a target: "
              f"{summary[m]['beyond_2se'] or 'none'}")
    result = {"command": "python benchmarks/stats_coverage_metrics.py " + " ".join(sys.argv[1:]),
              "truth": 0.0, "draws_per_cell": args.draws, "summary": summary, "cells": cells}
    write_result(args.out, result, t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
