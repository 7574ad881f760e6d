"""The markdown tables of docs/reproduce.md ("Measured: coverage and verdict rates") from
``benchmarks/results/stats_coverage.json``, so the docs repeat the JSON, not a hand copy.

    python benchmarks/stats_tables.py [PATH]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

DEFAULT = Path(__file__).resolve().parent / "results" / "stats_coverage.json"


def _mark(c: dict) -> str:
    if all(v is not False for v in c["targets"].values()):
        return "ok"
    return "at a bound, within 2 MC s.e." if all(
        v is not False for v in c["targets_within_2se"].values()) else "MISSED"


def demo_table(cells: list[dict]) -> list[str]:
    out = ["| layout | seeds | patients | days | true Δ | coverage | old method's coverage | "
           "better | not worse | worse within margin | worse | inconclusive | mean width (pts) "
           "| targets |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        if c["setting"] != "demo":
            continue
        r = c["rates"]
        width = "∞" if c["mean_width"] == float("inf") else f"{c['mean_width']:.2f}"
        out.append(f"| {c['layout']} | {c['seeds']} | {c['patients']} | {c['days']} | "
                   f"{c['truth']:+g} | {c['coverage']:.3f} | {c.get('legacy_coverage', 0):.3f} | "
                   f"{r['better']:.3f} | {r['not worse']:.3f} | {r['worse within margin']:.3f} | "
                   f"{r['worse']:.3f} | {r['inconclusive']:.3f} | {width} | {_mark(c)} |")
    return out


def summary_table(cells: list[dict]) -> list[str]:
    out = ["| variances (sd of the difference, pts: seed / patient / seed×patient / scan) | "
           "coverage, cells with ≥ 6 patients | false better at Δ = 0 (max) | false worse at "
           "Δ = 0 (max) | false not worse at Δ = −3 (max) | cells at a bound |",
           "|---|---|---|---|---|---|"]
    for name in dict.fromkeys(c["setting"] for c in cells):
        mine = [c for c in cells if c["setting"] == name]
        sd = mine[0]["sd_points"]
        cov = [c["coverage"] for c in mine if c["patients"] >= 6]
        zero = [c["rates"] for c in mine if c["truth"] == 0]
        neg = [r["not worse"] + r["worse within margin"] + r["better"]
               for r in (c["rates"] for c in mine if c["truth"] < 0)]
        edge = sum(_mark(c) != "ok" for c in mine)
        label = " / ".join(f"{sd[k]:g}" for k in ("seed", "patient", "inter", "scan"))
        out.append(f"| {name} ({label}) | {min(cov):.3f}–{max(cov):.3f} | "
                   f"{max(r['better'] for r in zero):.3f} | "
                   f"{max(r['worse'] + r['worse within margin'] for r in zero):.3f} | "
                   f"{max(neg):.3f} | {edge} of {len(mine)} |")
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    data = json.loads(Path(argv[0] if argv else DEFAULT).read_text())
    print("\n".join(demo_table(data["cells"])), end="\n\n")
    print("\n".join(summary_table(data["cells"])), end="\n\n")
    for f in data["holm_family"]:
        print(f"Holm, {f['layout']}: {f['families']} families, any false better/worse "
              f"{f['fwer_unadjusted']:.3f} unadjusted, {f['fwer_holm']:.3f} with Holm")
    print(f"draws per cell {data['draws_per_cell']}, {data['seconds']:.0f} s; beyond 2 MC s.e.: "
          f"{data['targets_missed_beyond_2se'] or 'none'}; at a bound: {data['targets_missed']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
