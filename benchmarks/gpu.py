"""GPU measurements for the GPU-path issue (needs CUDA; run through benchmarks/gpu_check.sh).

1. ``steps``: a training step (forward under autocast, BCE + soft Dice, backward, AdamW) of
   base models at ``--img-size`` on a fixed batch: ms per step, slices/s, achieved TFLOP/s
   (6 x forward MACs per slice) and its fraction of the dense bf16 peak, in bf16 (or fp16 where
   bf16 is not native) and fp32 with TF32; channels_last for the convolutional families.
2. ``attention``: one SDPA call at SETR-base's shape per kernel (Flash, memory-efficient,
   cuDNN, math) for KV (no mask), KV-pos as it runs (its key bias folded into a padded extra
   q/k channel, no mask), KV-pos as a float mask (as before) and KV-relpos (a float bias):
   which kernels run and how fast (Flash takes no float mask), and the folding's error.
3. ``loader``: the augmented cached loader (synthetic twin, pinned memory) per worker count.
4. ``pipeline``: ``kvseg.training.train`` of setr_kv base for two short epochs with
   ``workers: auto``:
   steps/s of the second epoch against the pure step rate of (1) (loader-bound or not).
5. ``determinism``: two identical micro runs with ``deterministic`` off and on: are the weights
   bit-identical?

    python benchmarks/gpu.py --out benchmarks/results/gpu.json

Writes the JSON and prints one line per measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import kvseg
from data import H100_BF16_PEAK, worker_sweep
from kvseg.data import UWMadison
from kvseg.data.synth import generate
from kvseg.inference.profile import build_on_meta, count_macs, time_fn
from kvseg.models.registry import model_info
from kvseg.training.losses import BCEDiceLoss
from kvseg.training.precision import autocast, precision_for
from kvseg.utils import atomic_write_text

#: The device measured: cuda:0 (``--device cpu`` only smoke-tests this script).
DEVICE = torch.device("cuda", 0)


def step_rates(models: list[str], img_size: int, batch: int, repeats: int) -> list[dict]:
    amp = precision_for("auto", DEVICE)
    rows = []
    for name in models:
        macs = count_macs(build_on_meta(name, size="base", img_size=img_size, in_channels=1),
                          (1, 1, img_size, img_size))
        configs = [(amp, False), ("fp32", False)]
        if model_info(name)["family"] != "setr":
            configs.append((amp, True))
        for precision, channels_last in configs:
            torch.manual_seed(0)
            model = kvseg.create_model(name, size="base", img_size=img_size, in_channels=1)
            model = model.to(DEVICE)
            x = torch.rand(batch, 1, img_size, img_size, device=DEVICE)
            y = (torch.rand(batch, 3, img_size, img_size, device=DEVICE) > 0.7).float()
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
                x = x.contiguous(memory_format=torch.channels_last)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            scaler = torch.amp.GradScaler(DEVICE.type, enabled=precision == "fp16")
            loss_fn = BCEDiceLoss()

            def step(model=model, x=x, y=y, opt=opt, scaler=scaler, precision=precision,
                     loss_fn=loss_fn):
                with autocast(DEVICE, precision):
                    logits = model(x)
                loss = loss_fn(logits, y)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()

            t = time_fn(step, repeats=repeats, warmup=3, device=DEVICE)
            tflops = 6 * macs * batch / (t.median_ms / 1e3) / 1e12
            rows.append({"model": name, "precision": precision, "channels_last": channels_last,
                         "batch": batch, "step_ms": t.median_ms, "p90_ms": t.p90_ms,
                         "slices_per_s": batch / (t.median_ms / 1e3), "gmacs": macs / 1e9,
                         "tflops": tflops, "fraction_of_bf16_peak": tflops * 1e12 / H100_BF16_PEAK,
                         "max_memory_gib": _max_memory_gib()})
            print(f"step {name:<14}{precision:<5}{' channels_last' if channels_last else '':<14}"
                  f"{t.median_ms:8.1f} ms {rows[-1]['slices_per_s']:7.0f} slices/s "
                  f"{tflops:6.0f} TFLOP/s", flush=True)
            del model, opt
            if DEVICE.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
    return rows


def _max_memory_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE.type == "cuda" else None


def attention_kernels(batch: int, heads: int, tokens: int, head_dim: int) -> list[dict]:
    """Forward + backward of one SDPA call per kernel, for the ways the modes call it: KV (no
    mask), KV-pos as it runs now (its key bias folded into one more q/k channel, head dim
    padded to a multiple of 8, no mask), KV-pos as a float mask (how it ran before) and
    KV-relpos (a (heads, N, N) float bias). ``fold_error``: the folded KV-pos output in the
    autocast dtype against the float mask in fp32."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kvseg.layers.attention import HEAD_DIM_MULTIPLE

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision_for("auto", DEVICE),
                                                                 torch.float32)
    scale = head_dim ** -0.5
    q = torch.randn(batch, heads, tokens, head_dim, device=DEVICE, dtype=dtype)
    v = torch.randn_like(q)
    g = torch.randn(tokens, device=DEVICE, dtype=dtype)
    width = -(-(head_dim + 1) // HEAD_DIM_MULTIPLE) * HEAD_DIM_MULTIPLE
    pad = (0, width - head_dim - 1)
    k2 = F.pad(torch.cat((q, (g / scale).view(1, 1, -1, 1).expand_as(q[..., :1])), -1), pad)
    q2 = F.pad(torch.cat((q, torch.ones_like(q[..., :1])), -1), pad)
    v2 = F.pad(v, (0, width - head_dim))
    relpos = torch.randn(1, heads, tokens, tokens, device=DEVICE, dtype=dtype)
    calls = {"kv": (q, q, v, None), "kv_pos_folded": (q2, k2, v2, None),
             "kv_pos_float_mask": (q, q, v, g.view(1, 1, 1, -1)),
             "kv_relpos_float_bias": (q, q, v, relpos)}
    folded = F.scaled_dot_product_attention(q2, k2, v2, scale=scale)[..., :head_dim]
    reference = F.scaled_dot_product_attention(q.float(), q.float(), v.float(),
                                               attn_mask=g.float().view(1, 1, 1, -1),
                                               scale=scale)
    rows = [{"fold_error_max_abs": float((folded.float() - reference).abs().max()),
             "dtype": str(dtype)}]
    print(f"sdpa kv_pos folded vs float mask (fp32): max abs diff "
          f"{rows[0]['fold_error_max_abs']:.2e} in {dtype}", flush=True)
    for mode, (qq, kk, vv, mask) in calls.items():
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (qq, kk, vv))
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):
            def call(qq=qq, kk=kk, vv=vv, mask=mask):
                out = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=scale)
                out.sum().backward()

            row = {"mode": mode, "backend": backend.name,
                   "shape": [batch, heads, tokens, int(qq.shape[-1])]}
            try:
                with sdpa_kernel(backend), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    row["fwd_bwd_ms"] = time_fn(call, repeats=20, warmup=3,
                                                device=DEVICE).median_ms
            except RuntimeError as e:
                row["error"] = str(e).splitlines()[0][:160]
            rows.append(row)
            print(f"sdpa {mode:<22}{backend.name:<22}"
                  f"{row.get('fwd_bwd_ms', float('nan')):8.3f} ms {row.get('error', '')}",
                  flush=True)
    return rows


def pipeline(root: Path, cache: Path, img_size: int, batch: int, steps: int) -> dict:
    """``kvseg.training.train`` of setr_kv base for 3 epochs of ``steps`` steps, ``workers: auto``;
    epoch 2 has no validation, so its metrics.csv ``seconds`` is its training loop alone."""
    from kvseg.training.distributed import loader_workers
    from kvseg.training.train import load_config, train

    with tempfile.TemporaryDirectory() as out:
        config = load_config(None, dict(model="setr_kv", size="base", img_size=img_size,
                                        data=str(root), cache_dir=str(cache),
                                        out=str(Path(out) / "run"), epochs=3, batch_size=batch,
                                        max_steps_per_epoch=steps, val_every=100, seed=0))
        t0 = time.perf_counter()
        summary = train(config, progress=False)
    h = summary["history"]
    epoch2_steps = h[1]["steps"] - h[0]["steps"]
    return {"model": "setr_kv", "batch": batch, "steps_per_epoch": steps,
            "workers": loader_workers(None, DEVICE.type), "wall_s": time.perf_counter() - t0,
            "epoch_seconds": [r["seconds"] for r in h], "epoch2_steps": epoch2_steps,
            "epoch2_slices_per_s": epoch2_steps * batch / h[1]["seconds"]}


def determinism(root: Path, cache: Path) -> dict:
    from safetensors.torch import load_file

    from kvseg.training.train import load_config, train

    result = {}
    for deterministic in (False, True):
        weights, messages, seconds = [], set(), []
        for _ in range(2):
            with tempfile.TemporaryDirectory() as out:
                config = load_config(None, dict(
                    model="setr_conv_kvpos", size="micro", img_size=128, data=str(root),
                    cache_dir=str(cache), out=str(Path(out) / "run"), epochs=1, batch_size=8,
                    max_steps_per_epoch=20, seed=0, deterministic=deterministic))
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    seconds.append(train(config, progress=False)["train_seconds"])
                messages |= {str(w.message).splitlines()[0][:160] for w in caught
                             if "deterministic" in str(w.message)}
                weights.append(load_file(str(Path(out) / "run" / "best.safetensors")))
        same = all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
        result["on" if deterministic else "off"] = {
            "bit_identical": same, "train_seconds": seconds, "warnings": sorted(messages)}
        print(f"deterministic={deterministic}: two runs bit-identical: {same}", flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--img-size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--models", nargs="+",
                    default=["setr_qkv", "setr_kv", "setr_kvpos", "setr_conv_kv", "setr_cvt_kv"])
    ap.add_argument("--worker-counts", type=int, nargs="+", default=[0, 1, 2, 4, 8, 15])
    ap.add_argument("--pipeline-steps", type=int, default=12)
    ap.add_argument("--skip", nargs="*", default=[],
                    choices=["steps", "attention", "loader", "pipeline", "determinism"])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: only a smoke test of this script (tiny sizes)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu.json"))
    args = ap.parse_args()
    global DEVICE
    if args.device == "cpu":
        DEVICE = torch.device("cpu")
    elif not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA device")
    t0 = time.perf_counter()
    cuda = DEVICE.type == "cuda"
    result = {"device": torch.cuda.get_device_name(0) if cuda else "cpu",
              "capability": list(torch.cuda.get_device_capability(0)) if cuda else None,
              "auto_precision": precision_for("auto", DEVICE), "torch": torch.__version__,
              "cpus": os.cpu_count(), "machine": platform.machine(), "img_size": args.img_size}
    print(json.dumps(result), flush=True)

    def save() -> None:
        result["wall_s"] = time.perf_counter() - t0
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")

    torch.backends.cudnn.benchmark = True  # as kvseg train sets them on CUDA
    torch.set_float32_matmul_precision("high")
    if "steps" not in args.skip:
        result["steps"] = step_rates(args.models, args.img_size, args.batch, args.repeats)
        save()
    if "attention" not in args.skip:
        result["attention"] = attention_kernels(args.batch, 12, (args.img_size // 16) ** 2, 64)
        save()
    with tempfile.TemporaryDirectory(prefix="kvseg-gpu-") as tmp:
        root = Path(tmp) / "synth"
        generate(root, cases=8, days=2, slices=32, seed=0)
        cache = Path(tmp) / "cache"
        if "loader" not in args.skip:
            ds = UWMadison(root, cache=True, cache_dir=cache, augment=True, split="train",
                           n_folds=5, img_size=args.img_size)
            result["loader"] = worker_sweep(ds, args.worker_counts, args.batch, 3)
            for r in result["loader"]:
                print(f"loader {r['workers']:>2} workers {r['slices_per_s']:7.0f} slices/s",
                      flush=True)
            save()
        if "pipeline" not in args.skip:
            result["pipeline"] = pipeline(root, cache, args.img_size, args.batch,
                                          args.pipeline_steps)
            print(f"pipeline {result['pipeline']}", flush=True)
            save()
        if "determinism" not in args.skip:
            result["determinism"] = determinism(root, Path(tmp) / "cache128")
            save()
    save()
    print(f"-> {args.out} ({result['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
