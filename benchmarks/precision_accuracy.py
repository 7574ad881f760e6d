"""Validation Jaccard of a trained run on each CPU inference path, and how far each path's
masks are from fp32's.

Paths (``kvseg.inference.runtime``): ``fp32`` (the PyTorch model), ``bf16`` (bf16 weights, what
``kvseg predict --precision bf16`` runs on the CPU), ``bf16_autocast`` (fp32 weights under
``torch.autocast``, what ``kvseg evaluate --precision bf16`` runs) and ``int8`` (ONNX Runtime,
static QDQ calibrated on 32 training slices; ``kvseg export --quantize int8``'s check on 32
other training slices is reported too). Each path predicts the whole validation split of the
run's fold; the metrics are ``kvseg evaluate``'s set-level ones
(:class:`kvseg.training.metrics.SegmentationMetrics`, the run's threshold), and
``mask_iou_vs_fp32`` is the IoU per class of the path's masks against fp32's over the split. As a
cross-check the fp32
Jaccard is also taken from ``kvseg.inference.evaluate.evaluate_run`` itself.

    kvseg synth --out /tmp/syn
    kvseg train --model setr_kv --size micro --img-size 128 --data /tmp/syn --out /tmp/run \\
        --epochs 3 --max-steps-per-epoch 60 --batch-size 4 --lr 1e-3 --no-augment --dice-weight 2
    python benchmarks/precision_accuracy.py --run /tmp/run --threads 1

Prints a table and writes ``benchmarks/results/precision_accuracy.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from bench_common import add_threads_option, apply_threads, machine
from kvseg.data import build_dataset
from kvseg.experiments.results import jsonable
from kvseg.inference.evaluate import evaluate_run
from kvseg.inference.export import export_int8
from kvseg.inference.runtime import (
    Bf16Model,
    OrtModel,
    calibration_inputs,
    cpu_info,
    inference_copy,
)
from kvseg.training.checkpoint import load_run
from kvseg.training.metrics import SegmentationMetrics, predicted_masks
from kvseg.utils import atomic_write_text


def paths(model, config, slices: int, threads: int) -> tuple[dict, dict]:
    """name -> callable (B, C, S, S) -> logits, and the int8 export's check report."""
    cpu = torch.device("cpu")
    calibration, check = calibration_inputs(config, n=slices)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "int8.onnx"
        report = export_int8(model, path, calibration=calibration, check=check, dynamic=True,
                             task=config.get("task") or "multilabel",
                             threshold=float(config.get("threshold", 0.5)), min_iou=None)
        int8 = OrtModel(path.read_bytes(), threads)
    fp32, bf16 = inference_copy(model), Bf16Model(model)

    def autocast(x):
        with torch.autocast(cpu.type, dtype=torch.bfloat16):
            return model(x).float()

    check_info = {"calibration_slices": report.calibration_slices,
                  "check_slices": report.check_slices, "mask_iou": report.mask_iou,
                  "max_prob_diff": report.max_prob_diff}
    return {"fp32": fp32, "bf16": bf16, "bf16_autocast": autocast, "int8": int8}, check_info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a kvseg training run folder")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--calibration-slices", type=int, default=32)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"
                                              / "precision_accuracy.json"))
    add_threads_option(parser)
    args = parser.parse_args()
    apply_threads(args)
    model, config = load_run(args.run)
    model.eval()
    task, threshold = config.get("task") or "multilabel", float(config.get("threshold", 0.5))
    fns, int8_check = paths(model, config, args.calibration_slices, torch.get_num_threads())
    ds = build_dataset(config, "val", augment=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=False)
    n_out = int(config["num_classes"]) + (task == "multiclass")
    metrics = {k: SegmentationMetrics(n_out, threshold, task=task) for k in fns}
    inter = {k: 0 for k in fns}
    union = {k: 0 for k in fns}
    seconds = dict.fromkeys(fns, 0.0)
    with torch.inference_mode():
        for batch in loader:
            x, y = batch["image"], batch["mask"]
            masks = {}
            for name, fn in fns.items():
                t0 = time.perf_counter()
                logits = fn(x).float()
                seconds[name] += time.perf_counter() - t0
                metrics[name].update(logits, y)
                masks[name] = predicted_masks(logits, task, threshold)
            dims = (0, *range(2, masks["fp32"].ndim))
            for name, m in masks.items():
                inter[name] = inter[name] + (m & masks["fp32"]).sum(dims)
                union[name] = union[name] + (m | masks["fp32"]).sum(dims)
    reference = evaluate_run(args.run, split="val", out=Path(tempfile.mkdtemp()) / "e.json",
                             device="cpu", precision="fp32", workers=0)
    rows = []
    for name in fns:
        m = metrics[name].compute(sync=False)
        iou = [1.0 if int(u) == 0 else int(i) / int(u)
               for i, u in zip(inter[name], union[name], strict=True)]
        rows.append({"path": name, "jaccard": m["jaccard"], "dice": m["dice"],
                     "jaccard_per_class": m["jaccard_per_class"],
                     "mask_iou_vs_fp32": iou, "seconds": seconds[name]})
    fp32 = rows[0]["jaccard"]
    for r in rows:
        r["jaccard_delta_points"] = 100 * (r["jaccard"] - fp32)
    result = jsonable({"run": args.run, "model": config["model"], "size": config.get("size"),
                       "img_size": config["img_size"], "val_slices": len(ds),
                       "evaluate_fp32_jaccard": reference["mean"]["jaccard"],
                       "int8_export_check": int8_check, "rows": rows,
                       "machine": {**machine(), "cpu": cpu_info()}})
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"{config['model']} {config.get('size')} {config['img_size']}², {len(ds)} validation "
          f"slices; kvseg evaluate fp32 jaccard {reference['mean']['jaccard']:.4f}")
    print("| path | jaccard | Δ vs fp32 (points) | dice | mask IoU vs fp32 (per class) | s |")
    print("|---|---:|---:|---:|---|---:|")
    for r in rows:
        iou = " / ".join(f"{v:.4f}" for v in r["mask_iou_vs_fp32"])
        print(f"| {r['path']} | {r['jaccard']:.4f} | {r['jaccard_delta_points']:+.2f} | "
              f"{r['dice']:.4f} | {iou} | {r['seconds']:.1f} |")
    ious = " / ".join(f"{v:.4f}" for v in int8_check["mask_iou"])
    print(f"int8 export check ({int8_check['check_slices']} training slices it was not "
          f"calibrated on): mask IoU {ious}")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
