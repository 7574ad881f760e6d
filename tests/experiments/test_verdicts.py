"""kvseg.experiments.verdicts: the report's comparisons from per-scan counts (patients, Holm,
per organ, per patient, sweeps), checked against explicit formulas and kvseg.stats itself."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kvseg.experiments.report import sweep_deltas, write_report
from kvseg.experiments.stats import holm, paired_difference
from kvseg.experiments.verdicts import (
    class_deltas,
    class_table,
    family_deltas,
    patient_differences,
)

PATIENTS, DAYS, SEEDS, CLASSES = 6, 2, 3, 3


def _cases(rng, shift: float) -> list[dict]:
    out = []
    for p in range(PATIENTS):
        for day in range(DAYS):
            gt = rng.integers(200, 400, CLASSES)
            tp = np.minimum(gt, (gt * (0.7 + shift + rng.normal(0, 0.05, CLASSES))).astype(int))
            out.append({"case": 10 + p, "day": day, "tp": tp.tolist(),
                        "fp": rng.integers(10, 60, CLASSES).tolist(),
                        "fn": (gt - tp).tolist(),
                        "hd95_mm": [float(v) for v in rng.uniform(2, 8, CLASSES)]})
    return out


def _jaccard(cases, k=None) -> float:
    tp, fp, fn = (np.sum([c[x] for c in cases], axis=0) for x in ("tp", "fp", "fn"))
    per = tp / (tp + fp + fn)
    return float(per.mean() if k is None else per[k])


def _hd95(cases, k=None) -> float:
    per = np.mean([c["hd95_mm"] for c in cases], axis=0)
    return float(per.mean() if k is None else per[k])


def _rows(seed: int = 0, shift: float = 0.0, family: str = "setr") -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for mode, params in (("qkv", 1000), ("kv", 900)):
        for s in range(SEEDS):
            cases = _cases(rng, shift if mode == "kv" else 0.0)
            rows.append({"model": f"{family}_{mode}", "family": family, "attention": mode,
                         "seed": s, "params": params, "macs": params * 5,
                         "jaccard": _jaccard(cases), "weighted_jaccard": _jaccard(cases),
                         "dice": _jaccard(cases), "hd95": _hd95(cases), "cases": cases})
    return rows


def _by_mode(rows, mode):
    return [r for r in rows if r["attention"] == mode]


def test_family_deltas_use_the_patients_and_state_the_design():
    rows = _rows()
    (d,) = family_deltas(rows)
    assert (d["patients"], d["scans"], d["seeds"]) == (PATIENTS, PATIENTS * DAYS, SEEDS)
    assert d["method"] == "patients x seeds" and d["reason"] == "" and d["note"] == ""
    ref = paired_difference([r["cases"] for r in _by_mode(rows, "qkv")],
                            [r["cases"] for r in _by_mode(rows, "kv")], metric="hd95")
    assert (d["hd95_low"], d["hd95_high"]) == pytest.approx((ref.low, ref.high), rel=1e-9)
    naive = np.mean([_hd95(b["cases"]) - _hd95(a["cases"])
                     for a, b in zip(_by_mode(rows, "qkv"), _by_mode(rows, "kv"), strict=True)])
    assert d["hd95_pts"] == pytest.approx(naive, rel=1e-9)
    assert "hd95_verdict" not in d  # lower is better, in mm: an interval, no verdict
    # one comparison: Holm is the unadjusted verdict
    assert d["jaccard_holm_verdict"] == d["jaccard_verdict"]


def test_rows_without_per_class_hd95_fall_back_to_the_seeds_for_hd95_only():
    rows = _rows()
    for r in rows:
        r["cases"] = [{k: v for k, v in c.items() if k != "hd95_mm"} for c in r["cases"]]
    (d,) = family_deltas(rows)
    assert d["method"] == "patients x seeds"  # Jaccard still on the patients
    per_seed = [b["hd95"] - a["hd95"] for a, b in zip(_by_mode(rows, "qkv"), _by_mode(rows, "kv"),
                                                      strict=True)]
    from scipy import stats as st

    half = st.t.ppf(0.975, SEEDS - 1) * np.std(per_seed, ddof=1) / math.sqrt(SEEDS)
    assert d["hd95_high"] - d["hd95_low"] == pytest.approx(2 * half, rel=1e-9)


def test_class_deltas_are_each_organs_own_difference():
    rows = _rows(shift=-0.05)
    entries = class_deltas(rows)
    assert [e["class"] for e in entries] == list(range(CLASSES))
    qkv, kv = _by_mode(rows, "qkv"), _by_mode(rows, "kv")
    for e in entries:
        k = e["class"]
        naive = np.mean([100 * (_jaccard(b["cases"], k) - _jaccard(a["cases"], k))
                         for a, b in zip(qkv, kv, strict=True)])
        assert e["jaccard_pts"] == pytest.approx(naive, rel=1e-9)
        naive_hd = np.mean([_hd95(b["cases"], k) - _hd95(a["cases"], k)
                            for a, b in zip(qkv, kv, strict=True)])
        assert e["hd95_pts"] == pytest.approx(naive_hd, rel=1e-9)
        assert e["jaccard_low"] < e["jaccard_pts"] < e["jaccard_high"]
    table = class_table(rows, ["large_bowel", "small_bowel", "stomach"])
    assert "| setr | KV | small bowel |" in table and table.count("\n") == 2 + CLASSES - 1


def test_patient_differences_are_each_patients_own_jaccard():
    rows = _rows()
    per = patient_differences(rows)["setr KV"]
    assert sorted(per) == [str(10 + p) for p in range(PATIENTS)]
    a, b = _by_mode(rows, "qkv")[1]["cases"], _by_mode(rows, "kv")[1]["cases"]
    pick = [c for c in a if c["case"] == 12], [c for c in b if c["case"] == 12]
    assert per["12"][1] == pytest.approx(100 * (_jaccard(pick[1]) - _jaccard(pick[0])))
    assert all(len(v) == SEEDS for v in per.values())
    for r in rows:
        r["cases"] = None
    assert patient_differences(rows) == {}


def test_holm_runs_over_every_comparison_of_a_report_and_of_a_sweep():
    rows = _rows(seed=1, shift=0.01) + _rows(seed=2, shift=0.01, family="cvt")
    deltas = family_deltas(rows)
    alone = [family_deltas([r for r in rows if r["family"] == f])[0] for f in ("cvt", "setr")]
    diffs = [paired_difference([r["cases"] for r in rows if r["family"] == f
                                and r["attention"] == "qkv"],
                               [r["cases"] for r in rows if r["family"] == f
                                and r["attention"] == "kv"]) for f in ("cvt", "setr")]
    ref = holm(diffs)
    for d, a, r in zip(deltas, alone, ref, strict=True):
        assert d["jaccard_holm_verdict"] == r.verdict
        assert d["jaccard_p_margin_holm"] == pytest.approx(r.p_margin_adjusted, rel=1e-9)
        assert d["jaccard_p_margin"] == pytest.approx(a["jaccard_p_margin"], rel=1e-9)
        # two comparisons in one family: no adjusted p-value below the one tested alone
        assert d["jaccard_p_margin_holm"] >= a["jaccard_p_margin_holm"] - 1e-12
    # a sweep is one family: the same rows as two factor values give the same adjusted values
    sweep = [{**r, "factor": "img_size", "value": 64 if r["family"] == "cvt" else 80}
             for r in rows]
    swept = sweep_deltas(sweep)["img_size"]
    assert [d["jaccard_p_margin_holm"] for d in swept] == pytest.approx(
        [r.p_margin_adjusted for r in ref], rel=1e-9)


def test_the_report_names_patients_holm_limits_and_organs(tmp_path):
    path = write_report(tmp_path, _rows(), title="t", settings={}, measured=[], figures=[],
                        classes=["large_bowel", "small_bowel", "stomach"],
                        selection="**Selection.** test fold 1.")
    text = path.read_text()
    assert "| 6 / 12 / 3 |" in text and "Holm" in text and "**Limits.**" in text
    assert "synthetic" in text and "micro" in text and "tuned for QKV" in text
    assert "**Selection.** test fold 1." in text and "### Per organ" in text
    assert "resample" not in text and "case-days" not in text.split("### Missed")[0]


def test_the_per_patient_plot_is_written_with_an_open_interval(tmp_path):
    from kvseg.experiments.figures import plot_patient_differences

    per = patient_differences(_rows())
    path = plot_patient_differences(per, {"setr KV": (0.5, -math.inf, 2.0)}, tmp_path / "p.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
