"""The reference rows in the comparison: dynunet (no attention), UNETR and SwinUNETR selected by
--models/--modes, reported (UNETR's own KV verdicts, each family's QKV minus dynunet without a
verdict), drawn, swept and explained, or refused with one line."""

from __future__ import annotations

import csv
import math
import statistics

import pytest
import torch
from scipy import stats as sps

from helpers import make_tiny
from kvseg.errors import ConfigError
from kvseg.experiments.figures import plot_jaccard_vs_macs, plot_training_curves
from kvseg.experiments.reference import reference_deltas, reference_section
from kvseg.experiments.reproduce import reproduce
from kvseg.experiments.shared import resolve_models
from kvseg.experiments.sweep import apply_factor

PNG = b"\x89PNG\r\n\x1a\n"


def test_models_keywords_and_modes_keep_the_reference():
    assert len(resolve_models(["all"])) == 9
    assert resolve_models(["reference"]) == [
        "dynunet", "unetr_qkv", "unetr_kv", "unetr_kvpos", "swinunetr_qkv", "swinunetr_kv",
        "swinunetr_kvpos"]
    both = resolve_models(["all", "dynunet", "unetr_qkv", "unetr_kv", "setr_kv"])
    assert both[:9] == resolve_models(["all"]) and both[9:] == ["dynunet", "unetr_qkv",
                                                                "unetr_kv"]
    # a mode selection keeps dynunet (mode none) and filters the transformers
    assert resolve_models(["dynunet", "unetr_qkv", "unetr_kv"], ["kv"]) == ["dynunet",
                                                                          "unetr_kv"]
    assert "dynunet" in resolve_models(["reference"], ["all"])
    assert "swinunetr_kvrelpos" not in resolve_models(["reference"], ["all"])  # not a variant
    with pytest.raises(ConfigError, match="valid: all, reference"):
        resolve_models(["unetr_qq"])


def _rows():
    """Three seeds of dynunet and UNETR in QKV and KV (scores only)."""
    jac = {"dynunet": [0.60, 0.64, 0.61], "unetr_qkv": [0.55, 0.58, 0.60],
           "unetr_kv": [0.56, 0.57, 0.59]}
    cost = {"dynunet": (1000, 9000), "unetr_qkv": (2000, 3000), "unetr_kv": (1800, 2900)}
    rows = []
    for model, values in jac.items():
        family, _, suffix = model.partition("_")
        for seed, j in enumerate(values):
            rows.append({"model": model, "family": family,
                         "attention": {"": "none", "qkv": "qkv", "kv": "kv"}[suffix],
                         "seed": seed, "params": cost[model][0], "macs": cost[model][1],
                         "jaccard": j, "weighted_jaccard": j - 0.05, "dice": j + 0.1})
    return rows


def test_reference_deltas_are_the_paired_t_interval_of_qkv_minus_dynunet():
    (d,) = reference_deltas(_rows())
    diffs = [100 * (q - r) for q, r in zip([0.55, 0.58, 0.60], [0.60, 0.64, 0.61],
                                           strict=True)]
    half = sps.t.ppf(0.975, 2) * statistics.stdev(diffs) / math.sqrt(3)
    assert d["family"] == "unetr" and d["model"] == "unetr_qkv" and d["seeds"] == 3
    assert d["jaccard_pts"] == pytest.approx(statistics.fmean(diffs), abs=1e-9)
    assert d["jaccard_low"] == pytest.approx(statistics.fmean(diffs) - half, abs=1e-6)
    assert d["jaccard_high"] == pytest.approx(statistics.fmean(diffs) + half, abs=1e-6)
    assert d["params_pct"] == pytest.approx(100.0) and d["macs_pct"] == pytest.approx(-66.667,
                                                                                      abs=1e-3)
    text = "\n".join(reference_section(_rows()))
    assert "| unetr | `unetr_qkv` |" in text and "verdict" not in text.split("\n| family")[1]
    assert reference_deltas([r for r in _rows() if r["model"] != "dynunet"]) == []


def test_figures_place_the_reference_row(tmp_path):
    rows = _rows()
    for r in rows:  # a diverged run is drawn without its point
        if r["model"] == "unetr_kv" and r["seed"] == 2:
            r["jaccard"] = math.nan
    assert plot_jaccard_vs_macs(rows, tmp_path / "j.png").read_bytes()[:8] == PNG
    assert plot_jaccard_vs_macs(rows[:3], tmp_path / "only.png").read_bytes()[:8] == PNG
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("epoch,train_loss,jaccard\n1,1.0,0.2\n2,0.8,0.4\n")
    runs = {"dynunet/s0": ("dynunet", "none", csv_path), "unetr_kv/s0": ("unetr", "kv", csv_path)}
    assert plot_training_curves(runs, tmp_path / "c.png").read_bytes()[:8] == PNG


def test_sweep_factors_alias_or_refuse_for_the_reference_families():
    base = {"size": "micro"}
    assert apply_factor("dim", 192, base, "unetr_kv", "micro")["model_overrides"] == {
        "hidden_size": 192, "mlp_dim": 768}
    assert apply_factor("heads", 2, base, "unetr_kv", "micro")["model_overrides"] == {
        "num_heads": 2}
    assert apply_factor("mlp_ratio", 2, base, "unetr_qkv", "micro")["model_overrides"] == {
        "mlp_dim": 192}
    assert apply_factor("heads", 2, base, "dynunet", "micro") is None  # no attention
    assert apply_factor("img_size", 64, base, "dynunet", "micro")["img_size"] == 64
    with pytest.raises(ConfigError, match="depth for unetr: MONAI's UNETR has 12 layers"):
        apply_factor("depth", 6, base, "unetr_kv", "micro")
    with pytest.raises(ConfigError, match="heads for swinunetr: SwinUNETR sets it per stage"):
        apply_factor("heads", 4, base, "swinunetr_kv", "micro")
    assert apply_factor("num_heads", [2, 4, 8, 16], base, "swinunetr_kv", "micro")[
        "model_overrides"] == {"num_heads": [2, 4, 8, 16]}


def test_pretrained_is_refused_in_one_line_for_the_reference_families():
    import kvseg
    from kvseg.config import load_config

    for name in ("dynunet", "unetr_kv", "swinunetr_qkv"):
        with pytest.raises(ConfigError, match=f"pretrained= for {name}: the reference"):
            kvseg.create_model(name, size="micro", pretrained="imagenet")
    with pytest.raises(ConfigError, match="patch_attention"):
        load_config(None, {"model": "unetr_kv", "pretrained": "weights.pth"})


def test_attention_maps_on_unetr_grid_and_refused_for_windows():
    import kvseg
    from kvseg.inference.explain import attention_maps

    torch.manual_seed(0)
    model = kvseg.create_model("unetr_kv", size="micro", img_size=72, in_channels=1)
    la = attention_maps(model, torch.randn(1, 72, 72), points=[(71, 71)], layers=[-1]).layers[0]
    # 72 px resized to UNETR's 80 px: a 5 × 5 token grid, each cell 72 / 5 input pixels
    assert la.query_grid == (5, 5) and la.cell == pytest.approx((14.4, 14.4))
    assert la.maps.shape == (1, 4, 5, 5) and max(la.symmetry) < 1e-5  # KV: Q = K
    swin = kvseg.create_model("swinunetr_kv", size="micro", img_size=64, in_channels=1)
    with pytest.raises(ConfigError, match="windowed attention"):
        attention_maps(swin, torch.randn(1, 64, 64))


@pytest.mark.slow
def test_reproduce_writes_the_reference_rows_and_unetr_verdicts(tmp_path):
    data, preset = make_tiny(tmp_path, seed=4)
    out = tmp_path / "out"
    reproduce(data, out, preset=str(preset), models=["dynunet", "unetr_qkv", "unetr_kv"],
              modes=["kv", "qkv"], device="cpu", jobs=1, progress=False)
    with open(out / "results.csv", newline="") as f:
        rows = {r["model"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"dynunet", "unetr_qkv", "unetr_kv"}  # --modes kept dynunet
    assert rows["dynunet"]["attention"] == "none" and rows["dynunet"]["family"] == "dynunet"
    assert rows["unetr_kv"]["family"] == "unetr"
    assert int(rows["unetr_kv"]["params"]) < int(rows["unetr_qkv"]["params"])
    report = (out / "report.md").read_text()
    assert "| unetr | KV |" in report  # UNETR's own verdict against its QKV
    assert "| dynunet | KV" not in report and "| dynunet | QKV" not in report
    assert "CNN reference (`dynunet`)" in report and "| unetr | `unetr_qkv` |" in report
    assert "Not shown: `dynunet` (a CNN: no attention)" in report
    for name in ("jaccard_vs_macs.png", "training_curves.png", "attention.png"):
        assert (out / name).read_bytes()[:8] == PNG
