"""Command-line interface: argument parsing only; every command calls a library function.

User mistakes (bad paths, bad values, malformed data) surface as ``ValueError`` /
``FileNotFoundError`` / ``OSError`` from the library and become one line on stderr with exit
code 2, no traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               PermissionError)


# --------------------------------------------------------------------------- models / profile
def _add_models(sub) -> None:
    p = sub.add_parser("models", help="list the registered variants with family, mode, params")
    p.add_argument("--size", default="base", help="size preset for the parameter count")
    p.add_argument("--img-size", type=int, default=224)


def _run_models(args) -> int:
    from kvseg.profile import models_table

    print(models_table(size=args.size, img_size=args.img_size))
    return 0


def _add_profile(sub) -> None:
    p = sub.add_parser("profile", help="params, MACs and KV-vs-QKV reduction (the paper's table)")
    p.add_argument("--models", nargs="+", default=["all"], help="'all' or variant names")
    p.add_argument("--size", default="base")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=3)
    p.add_argument("--format", choices=["md", "csv", "json"], default="md")


def _run_profile(args) -> int:
    from kvseg.profile import profile_table

    print(profile_table(args.models, size=args.size, img_size=args.img_size,
                        in_channels=args.in_channels, num_classes=args.num_classes,
                        fmt=args.format))
    return 0


# --------------------------------------------------------------------------- data
def _add_synth(sub) -> None:
    p = sub.add_parser("synth", help="write a synthetic dataset in the UW-Madison layout")
    p.add_argument("--out", required=True)
    p.add_argument("--cases", type=int, default=8)
    p.add_argument("--days", type=int, default=2)
    p.add_argument("--slices", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)


def _run_synth(args) -> int:
    from kvseg.data.synth import generate

    summary = generate(args.out, cases=args.cases, days=args.days, slices=args.slices,
                       seed=args.seed, progress=True)
    print(summary)
    return 0


# --------------------------------------------------------------------------- train / evaluate
def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train one variant (torchrun-aware)")
    p.add_argument("--config", help="YAML file with any training option; flags override it")
    p.add_argument("--model")
    p.add_argument("--data")
    p.add_argument("--out")
    p.add_argument("--size")
    p.add_argument("--img-size", type=int)
    p.add_argument("--pretrained", help="local weights file to initialise from (matching tensors)")
    p.add_argument("--context", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--fold", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--device")
    p.add_argument("--cache-dir")
    p.add_argument("--workers", type=int)
    p.add_argument("--n-folds", type=int)
    p.add_argument("--head", help="SETR decoder head: naive, pup, mla")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "none"])
    p.add_argument("--max-steps-per-epoch", type=int)
    p.add_argument("--time-budget-s", type=float,
                   help="end training once it took this long, then validate")
    p.add_argument("--val-every", type=int)
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue from RUN_DIR/last.ckpt")


def _run_train(args) -> int:
    import os

    from kvseg.train import load_config, train

    overrides = {k: v for k, v in vars(args).items()
                 if k not in ("command", "config", "func", "verbose") and v is not None}
    config = load_config(args.config, overrides)
    try:
        summary = train(config)
    except FloatingPointError as e:  # NaN/inf loss: one line, last good checkpoint kept
        print(f"kvseg train: error: {e}", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") == "0":  # torchrun: one summary line, from rank 0
        print(f"best jaccard {summary['best_jaccard']:.4f} at epoch {summary['best_epoch']} "
              f"({summary['epochs']} epochs, {summary['steps']} steps) -> {summary['run_dir']}")
    return 0


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="evaluate a run's best model")
    p.add_argument("--run", required=True, help="RUN_DIR written by kvseg train")
    p.add_argument("--data", help="dataset root (default: the one the run was trained on)")
    p.add_argument("--split", default="val", choices=["train", "val", "all"])
    p.add_argument("--out", help="JSON file for the metrics (default RUN_DIR/eval_SPLIT.json)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--slice-thickness", type=float, default=3.0,
                   help="mm between slices for the 3D metrics")


def _run_evaluate(args) -> int:
    from kvseg.evaluate import evaluate_run, format_results

    results = evaluate_run(args.run, data=args.data, split=args.split, out=args.out,
                           device=args.device, batch_size=args.batch_size,
                           slice_thickness_mm=args.slice_thickness)
    print(format_results(results))
    return 0


# --------------------------------------------------------------------------- use
def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="segment new images: masks, overlays, submission.csv")
    p.add_argument("--run", required=True)
    p.add_argument("--input", required=True, help="a PNG, a folder of PNGs or a UW-Madison root")
    p.add_argument("--out", required=True)
    p.add_argument("--threshold", type=float,
                   help="sigmoid threshold (default: the run's own, 0.5 unless trained otherwise)")
    p.add_argument("--tta", choices=["none", "flip"], default="none")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=8)


def _run_predict(args) -> int:
    from kvseg.predict import predict

    summary = predict(args.run, args.input, args.out, threshold=args.threshold, tta=args.tta,
                      device=args.device, batch_size=args.batch_size)
    print(summary)
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a run's model to ONNX, checked with onnxruntime")
    p.add_argument("--run", required=True)
    p.add_argument("--onnx", required=True, help="output .onnx file")
    p.add_argument("--img-size", type=int, help="input size (default: the run's img_size)")
    p.add_argument("--dynamic", action="store_true", help="dynamic batch, height and width")
    p.add_argument("--exporter", choices=["auto", "dynamo", "torchscript"], default="auto",
                   help="auto: torch.export (dynamo), the TorchScript exporter if that fails")


def _run_export(args) -> int:
    from kvseg.export import export_onnx

    report = export_onnx(args.run, args.onnx, img_size=args.img_size, dynamic=args.dynamic,
                         exporter=args.exporter)
    print(report)
    return 0


def _add_reproduce(sub) -> None:
    p = sub.add_parser("reproduce", help="train, evaluate and profile every variant; report")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default="smoke", help="smoke, paper, or a YAML file")
    p.add_argument("--models", nargs="+", default=["all"])
    p.add_argument("--seeds", nargs="+", type=int)
    p.add_argument("--device", default="auto")
    p.add_argument("--epochs", type=int, help="override the preset's epochs")


def _run_reproduce(args) -> int:
    from kvseg.reproduce import reproduce

    report = reproduce(args.data, args.out, preset=args.preset, models=args.models,
                       seeds=args.seeds, device=args.device, epochs=args.epochs)
    print(report)
    return 0


COMMANDS = {
    "models": (_add_models, _run_models),
    "profile": (_add_profile, _run_profile),
    "synth": (_add_synth, _run_synth),
    "train": (_add_train, _run_train),
    "evaluate": (_add_evaluate, _run_evaluate),
    "predict": (_add_predict, _run_predict),
    "export": (_add_export, _run_export),
    "reproduce": (_add_reproduce, _run_reproduce),
}


def build_parser() -> argparse.ArgumentParser:
    from kvseg import __version__

    parser = argparse.ArgumentParser(
        prog="kvseg",
        description="QKV vs KV attention in pure and hybrid Transformers, 2D medical segmentation",
    )
    parser.add_argument("--version", action="version", version=f"kvseg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    run = COMMANDS[args.command][1]
    try:
        return run(args)
    except USER_ERRORS as e:
        if args.verbose:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"kvseg {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kvseg {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
