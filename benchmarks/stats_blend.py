"""Why ``kvseg.experiments.stats`` blends Banerjee's and Welch's half-widths 0.7 / 0.3: the
coverage of each candidate interval on the balanced normal two-way model, exactly (issue 19).

The seeds x patients table of pseudo-value differences ``D[s, p] = θ + a_s + b_p + e_sp`` has,
when every effect is normal and the table balanced, independent mean squares
``MS_s ~ (σ²_e + Pσ²_a)·χ²(S−1)/(S−1)``, ``MS_p ~ (σ²_e + Sσ²_b)·χ²(P−1)/(P−1)``,
``MS_e ~ σ²_e·χ²((S−1)(P−1))/((S−1)(P−1))`` and an error ``Δ − θ ~ N(0, σ²_e/(SP) + σ²_a/S +
σ²_b/P)`` independent of them. So each interval's coverage can be simulated with a few million
draws in seconds, without pixel counts. Candidates (half-widths):

* ``three parts`` (the method before this benchmark): residual MS_e/(SP) at t((S−1)(P−1)), seed
  excess max(MS_s − MS_e, 0)/(SP) at t(S−1), patient excess max(MS_p − MS_e, 0)/(SP) at t(P−1),
  Banerjee's per-source quantiles;
* the two parts kvseg uses (seed rows MS_s/(SP) at t(S−1), patient excess at t(P−1)) with
  ``(1 − w)·Banerjee + w·Welch-Satterthwaite`` for w = 0 ... 1.

The full simulation with pixel counts, unbalanced scan days and jackknife pseudo-values is
``benchmarks/stats_coverage.py``; this one only picks the weight.

    python benchmarks/stats_blend.py [--draws 400000] [--out PATH]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
from scipy import stats

from bench_common import write_result
from kvseg.experiments import stats as S

OUT = Path(__file__).resolve().parent / "results" / "stats_blend.json"
#: sd (points) of the seed x variant, patient x variant and seed x patient x variant effects of
#: the difference: the settings of stats_coverage.py (its scan part lies inside the last one)
#: and one where seeds and patients weigh alike
SETTINGS = {"demo": (1.0, 1.0, 1.0), "interaction-heavy": (0.5, 0.5, 3.0),
            "patient-heavy": (0.3, 3.0, 0.5), "seed-heavy": (3.0, 0.5, 0.5),
            "seeds and patients alike": (1.0, 2.0, 0.5)}
LAYOUTS = ((3, 6), (3, 10), (3, 17), (3, 20), (5, 6), (5, 20), (8, 10))
WEIGHTS = (0.0, 0.2, 0.3, 0.4, 0.5, 1.0)


def t(q, df):
    return stats.t.ppf(q, df)


def half_widths(ms_s, ms_p, ms_e, s: int, p: int, weights=WEIGHTS) -> dict:
    """Each candidate's 95% half-width per draw (vectorised)."""
    q = 0.975
    n = s * p
    out = {"three parts": np.sqrt(t(q, (s - 1) * (p - 1)) ** 2 * ms_e / n
                                  + t(q, s - 1) ** 2 * np.maximum(ms_s - ms_e, 0) / n
                                  + t(q, p - 1) ** 2 * np.maximum(ms_p - ms_e, 0) / n)}
    v1, v2 = ms_s / n, np.maximum(ms_p - ms_e, 0) / n
    banerjee = np.sqrt(t(q, s - 1) ** 2 * v1 + t(q, p - 1) ** 2 * v2)
    with np.errstate(divide="ignore", invalid="ignore"):
        df_w = (v1 + v2) ** 2 / (v1**2 / (s - 1) + v2**2 / (p - 1))
    welch = t(q, df_w) * np.sqrt(v1 + v2)
    for w in weights:
        out[f"w={w:g}"] = (1 - w) * banerjee + w * welch
    return out


def check_against_kvseg(rng) -> None:
    """The vectorised formula above is the one kvseg computes (it cannot drift unnoticed)."""
    for s, p in ((3, 6), (5, 20)):
        d = rng.normal(0, 1, (s, p)) + rng.normal(0, 1.5, (1, p)) + rng.normal(0, 1, (s, 1))
        fit = S.two_way(d)
        row, col, g = d.mean(1), d.mean(0), d.mean()
        ms_s = p * ((row - g) ** 2).sum() / (s - 1)
        ms_p = s * ((col - g) ** 2).sum() / (p - 1)
        ms_e = ((d - row[:, None] - col[None] + g) ** 2).sum() / ((s - 1) * (p - 1))
        mine = half_widths(np.array([ms_s]), np.array([ms_p]), np.array([ms_e]), s, p,
                           weights=(S.WELCH_WEIGHT,))[f"w={S.WELCH_WEIGHT:g}"][0]
        assert math.isclose(mine, S._half_width(fit.components), rel_tol=1e-9), (mine, fit)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draws", type=int, default=400_000)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    t0 = time.time()
    rng = np.random.default_rng(2026)
    check_against_kvseg(rng)
    n = args.draws
    rows = []
    names = ["three parts", *(f"w={w:g}" for w in WEIGHTS)]
    print(f"{'setting':<25} {'S':>2} {'P':>3} " + " ".join(f"{k:>11}" for k in names))
    for name, (sa, sb, se) in SETTINGS.items():
        for s, p in LAYOUTS:
            e_s, e_p, e_e = se**2 + p * sa**2, se**2 + s * sb**2, se**2
            ms_s = e_s * rng.chisquare(s - 1, n) / (s - 1)
            ms_p = e_p * rng.chisquare(p - 1, n) / (p - 1)
            ms_e = e_e * rng.chisquare((s - 1) * (p - 1), n) / ((s - 1) * (p - 1))
            err = rng.normal(0, math.sqrt(e_s / (s * p) + sb**2 / p), n)
            cov = {k: float((np.abs(err) <= h).mean())
                   for k, h in half_widths(ms_s, ms_p, ms_e, s, p).items()}
            rows.append({"setting": name, "sd_points": {"seed": sa, "patient": sb, "inter": se},
                         "seeds": s, "patients": p, "coverage": cov})
            print(f"{name:<25} {s:>2} {p:>3} " + " ".join(f"{cov[k]:>11.3f}" for k in names),
                  flush=True)
    span = {k: (min(r["coverage"][k] for r in rows), max(r["coverage"][k] for r in rows))
            for k in names}
    for k, (lo, hi) in span.items():
        print(f"{k:>12}: coverage {lo:.3f}-{hi:.3f}")
    result = {"command": "python benchmarks/stats_blend.py " + " ".join(sys.argv[1:]),
              "draws_per_cell": n, "kvseg_weight": S.WELCH_WEIGHT, "cells": rows,
              "coverage_range": span}
    write_result(args.out, result, t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
