"""Command-line interface: argument parsing only; every command calls a library function.

Error handling is total: a user mistake or an input fault (a :class:`kvseg.errors.KvsegError`,
an ``OSError`` from the file system such as a missing file, a permission problem or a full disk)
is one line on stderr naming the option, file or row, with exit code 2 and no traceback; a bad
flag value is the same (the numeric checks are :func:`kvseg.config.check_number`, shared with the
config files). A diverged training is one line with exit code 1. Anything else is a bug in
kvseg: its traceback is shown, followed by a line saying so (exit code 1).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import traceback

from kvseg import __version__
from kvseg.errors import ConfigError, KvsegError
from kvseg.utils import MAX_SEED, check_number, read_yaml

USER_ERRORS = (KvsegError, OSError)


def _number(integer: bool = False, **bounds):
    """An argparse ``type`` checking a numeric flag with :func:`kvseg.config.check_number`."""
    def parse(text: str):
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if integer else 'a number'}, got {text!r}") from None
        try:
            return check_number("value", value, integer=integer, **bounds)
        except KvsegError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix("value=")) from None

    parse.__name__ = "integer" if integer else "number"
    return parse


POSITIVE_INT = _number(True, minimum=1)
NONNEG_INT = _number(True, minimum=0)
ANY_INT = _number(True)
SEED = _number(True, minimum=0, maximum=MAX_SEED)  # what NumPy's generators accept
POSITIVE = _number(minimum=0, min_open=True)
PROBABILITY = _number(minimum=0, maximum=1, min_open=True, max_open=True)
UNIT_INTERVAL = _number(minimum=0, maximum=1)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``kvseg CMD: error: ...``, exit code 2)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --------------------------------------------------------------------------- models / profile
def _add_models(sub) -> None:
    p = sub.add_parser("models", help="list the registered variants with family, mode, params")
    p.add_argument("--size", default="base", help="size preset for the parameter count")
    p.add_argument("--img-size", type=POSITIVE_INT, default=224)


def _run_models(args) -> int:
    from kvseg.inference.profile import models_table

    print(models_table(size=args.size, img_size=args.img_size))
    return 0


def _add_profile(sub) -> None:
    p = sub.add_parser("profile", help="params, MACs and KV-vs-QKV reduction (the paper's table)")
    p.add_argument("--models", nargs="+", default=["all"], help="'all' or variant names")
    p.add_argument("--size", default="base")
    p.add_argument("--img-size", type=POSITIVE_INT, default=224)
    p.add_argument("--in-channels", type=POSITIVE_INT, default=3)
    p.add_argument("--num-classes", type=POSITIVE_INT, default=3)
    p.add_argument("--format", choices=["md", "csv", "json"], default="md")


def _run_profile(args) -> int:
    from kvseg.inference.profile import profile_table

    print(profile_table(args.models, size=args.size, img_size=args.img_size,
                        in_channels=args.in_channels, num_classes=args.num_classes,
                        fmt=args.format))
    return 0


# --------------------------------------------------------------------------- data
def _add_synth(sub) -> None:
    p = sub.add_parser("synth", help="write a synthetic dataset in the UW-Madison layout")
    p.add_argument("--out", required=True)
    p.add_argument("--cases", type=POSITIVE_INT, default=8)
    p.add_argument("--days", type=POSITIVE_INT, default=2)
    p.add_argument("--slices", type=POSITIVE_INT, default=32)
    p.add_argument("--seed", type=SEED, default=0)


def _run_synth(args) -> int:
    from kvseg.data.synth import generate

    summary = generate(args.out, cases=args.cases, days=args.days, slices=args.slices,
                       seed=args.seed, progress=True)
    print(summary)
    return 0


def _add_convert(sub) -> None:
    from kvseg.data.convert import FORMATS

    p = sub.add_parser("convert", help="turn a public 2D set (Kvasir-SEG, ISIC 2018, DRIVE, "
                                       "Montgomery) into the images/ + masks/ layout",
                       description="Write OUT/images, OUT/masks and OUT/dataset.yaml from a "
                                   "download as unpacked; see docs/data.md.")
    p.add_argument("format", choices=FORMATS)
    p.add_argument("--src", required=True, help="the unpacked download")
    p.add_argument("--out", required=True, help="new dataset folder (absent or empty)")
    p.add_argument("--link", action="store_true",
                   help="hard-link the images instead of copying them (same file system)")
    p.add_argument("--lungs", choices=["merged", "separate"],
                   help="montgomery: one class (merged, the default), or left and right lung "
                        "as two classes")


def _run_convert(args) -> int:
    from kvseg.data.convert import convert

    if args.lungs is not None and args.format != "montgomery":
        raise ConfigError(f"--lungs applies to montgomery only, not to {args.format}")
    print(convert(args.format, args.src, args.out, link=args.link, lungs=args.lungs or "merged"))
    return 0


# --------------------------------------------------------------------------- train / evaluate
def _add_train(sub) -> None:
    from kvseg.config import add_config_flags

    p = sub.add_parser("train", help="train one variant (torchrun-aware)",
                       description="Train one variant. Every option of kvseg.config.TrainConfig "
                                   "is a flag; `kvseg config show default` lists them in YAML.")
    p.add_argument("--config", help="a YAML file or a packaged config name (see `kvseg config "
                                    "list`); flags override it")
    add_config_flags(p)


def _run_train(args) -> int:
    from kvseg.config import load_config, overrides_from_args
    from kvseg.training.train import train

    config = load_config(args.config, overrides_from_args(args), source="command line")
    try:
        summary = train(config)
    except FloatingPointError as e:  # NaN/inf loss: one line, last good checkpoint kept
        print(f"kvseg train: error: {e}", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") == "0":  # torchrun: one summary line, from rank 0
        print(f"best jaccard {summary['best_jaccard']:.4f} at epoch {summary['best_epoch']} "
              f"({summary['epochs']} epoch{'s' * (summary['epochs'] != 1)}, {summary['steps']} "
              f"step{'s' * (summary['steps'] != 1)}) -> {summary['run_dir']}")
    return 0


def _add_config(sub) -> None:
    p = sub.add_parser("config", help="list the packaged configs or print one for editing")
    p.add_argument("action", choices=["list", "show"])
    p.add_argument("name", nargs="?", help="with show: a packaged config (default, smoke, ...)")


def _run_config(args) -> int:
    from kvseg.config import config_path, packaged_configs

    if args.action == "list":
        if args.name:
            raise KvsegError(f"config list takes no name (got {args.name!r}); to print one: "
                             f"kvseg config show {args.name}")
        names = packaged_configs()
        width = max(map(len, names)) + 2  # the longest name still leaves two spaces
        groups: dict[str, list[str]] = {}
        for name in names:
            path = config_path(name)
            data = read_yaml(path)
            kind = ("sweep presets (kvseg sweep --preset NAME)" if "vary" in data else
                    "reproduce presets (kvseg reproduce --preset NAME)" if "train" in data else
                    "training configs (kvseg train --config NAME)")
            desc = data.get("description") or _first_sentence(path)
            groups.setdefault(kind, []).append(f"  {name:<{width}}{desc}")
        for kind in sorted(groups, key=lambda k: k.startswith("sweep")):
            print(f"{kind}:", *groups[kind], sep="\n")
        return 0
    if not args.name:
        raise KvsegError("config show: name a config (one of "
                         f"{', '.join(packaged_configs())})")
    if args.name not in packaged_configs():
        raise KvsegError(f"config show {args.name!r}: not a packaged config; expected one of "
                         f"{', '.join(packaged_configs())}")
    print(config_path(args.name).read_text(encoding="utf-8"), end="")
    return 0


def _first_sentence(path) -> str:
    """The first sentence of a config file's leading comment (its description)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    text = " ".join(line.lstrip("# ").strip() for line in lines[:next(
        (i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))])
    return text.split(". ")[0].rstrip(".")


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="evaluate a run's best model (or an ensemble of runs)")
    p.add_argument("--run", required=True, nargs="+", metavar="RUN_DIR",
                   help="RUN_DIR written by kvseg train, or a kvseg package folder; several: "
                        "their probabilities are averaged (an ensemble)")
    p.add_argument("--data", help="dataset root (default: the one the run was trained on)")
    p.add_argument("--split", default="val", choices=["train", "val", "test", "all"],
                   help="test: the run's held-out test_fold (default: val)")
    p.add_argument("--out", help="JSON file for the metrics (default RUN_DIR/eval_SPLIT.json; "
                                 "a package folder is not written into)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=8)
    p.add_argument("--slice-thickness", type=POSITIVE, default=3.0,
                   help="mm between slices for the 3D metrics (UW-Madison; volumes use their "
                        "own spacing)")
    _add_precision(p)
    p.add_argument("--workers", type=NONNEG_INT,
                   help="DataLoader workers (default: auto, as for kvseg train)")
    _add_inference_options(p)


def _add_inference_options(p) -> None:
    """What evaluate and predict share: TTA, threshold, tuned post-processing."""
    p.add_argument("--tta", choices=["none", "flip", "flips"], default="none",
                   help="test-time augmentation: flip = horizontal mirror, flips = horizontal, "
                        "vertical and both; probabilities averaged")
    p.add_argument("--threshold", type=PROBABILITY,
                   help="sigmoid threshold (default: the run's tuned thresholds if `kvseg tune` "
                        "stored some, else the run's own, 0.5 unless trained otherwise)")
    p.add_argument("--no-postprocess", dest="postprocess", action="store_false",
                   help="ignore the post-processing `kvseg tune` stored in the run")


def _run_evaluate(args) -> int:
    from kvseg.inference.evaluate import evaluate_run, format_results

    _new_file(args.out, args.overwrite, "--out")
    results = evaluate_run(args.run, data=args.data, split=args.split, out=args.out,
                           device=args.device, batch_size=args.batch_size,
                           slice_thickness_mm=args.slice_thickness, precision=args.precision,
                           workers=args.workers, tta=args.tta, threshold=args.threshold,
                           postprocess=args.postprocess)
    print(format_results(results))
    return 0


def _new_file(path: str | None, overwrite: bool, option: str) -> None:
    """An output file named by the user is not replaced silently: kvseg cannot tell whether it
    wrote it (predict and package keep manifests for their folders; a single file has none)."""
    if path is not None and os.path.lexists(path) and not overwrite:
        raise ConfigError(f"{option} {path}: exists; pass --overwrite to replace it")


def _add_precision(p) -> None:
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16", "int8"],
                   default="auto",
                   help="autocast of the model (auto: on CUDA the precision the run trained "
                        "in, when this GPU has it; fp32 on the CPU); on the CPU bf16 runs bf16 "
                        "weights and int8 an ONNX Runtime model calibrated on the run's training "
                        "slices (kvseg.runtime)")


# --------------------------------------------------------------------------- use
def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="segment new images: masks, overlays, submission.csv")
    p.add_argument("--run", required=True, nargs="+", metavar="RUN_DIR",
                   help="RUN_DIR written by kvseg train, or a kvseg package folder; several: "
                        "their probabilities are averaged (an ensemble)")
    p.add_argument("--input", required=True,
                   help="an image (PNG, JPEG, TIFF) or NIfTI volume, a folder of them, or a "
                        "dataset root (UW-Madison, images/ + masks/, imagesTr/, Synapse, ACDC)")
    p.add_argument("--out", required=True)
    _add_inference_options(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=8)
    p.add_argument("--overwrite", action="store_true",
                   help="write into an OUT used by an earlier predict (its old outputs are "
                        "removed; files predict did not write are kept)")
    _add_precision(p)
    p.add_argument("--min-iou", type=UNIT_INTERVAL,
                   help="--precision int8 (default 0.99): refuse the int8 model unless its "
                        "masks overlap fp32's with at least this IoU in every class, on held-out "
                        "training slices")


def _run_predict(args) -> int:
    from kvseg.inference.predict import predict

    min_iou = _int8_only(args.min_iou, args.precision == "int8", "--precision int8")
    summary = predict(args.run, args.input, args.out, threshold=args.threshold, tta=args.tta,
                      device=args.device, batch_size=args.batch_size, precision=args.precision,
                      min_iou=min_iou, postprocess=args.postprocess,
                      **({"overwrite": True} if args.overwrite else {}))
    print(summary)
    return 0


def _int8_only(min_iou: float | None, int8: bool, needs: str) -> float:
    """``--min-iou`` (default 0.99); refused without int8, where nothing would read it."""
    if min_iou is not None and not int8:
        raise ConfigError(f"--min-iou checks int8 masks: it needs {needs}")
    return 0.99 if min_iou is None else min_iou


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a run's model to ONNX, checked with onnxruntime")
    p.add_argument("--run", required=True)
    p.add_argument("--onnx", required=True, help="output .onnx file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --onnx file")
    p.add_argument("--img-size", type=POSITIVE_INT,
                   help="input size (default: the run's img_size)")
    p.add_argument("--dynamic", action="store_true", help="dynamic batch, height and width")
    p.add_argument("--exporter", choices=["auto", "dynamo", "torchscript"], default="auto",
                   help="auto: torch.export (dynamo), the TorchScript exporter if that fails "
                        "(int8: torchscript)")
    p.add_argument("--quantize", choices=["int8"],
                   help="int8: static quantisation calibrated on training slices; written only "
                        "if its masks match PyTorch fp32's (IoU >= --min-iou per class)")
    p.add_argument("--calibration-data", help="int8: dataset root (default: the run's data)")
    p.add_argument("--calibration-slices", type=POSITIVE_INT, default=32,
                   help="int8: slices to calibrate on, and as many others to check on")
    p.add_argument("--min-iou", type=PROBABILITY,
                   help="int8: the least mask IoU per class against PyTorch fp32 (default 0.99)")


def _run_export(args) -> int:
    from kvseg.inference.export import export_onnx

    min_iou = _int8_only(args.min_iou, args.quantize == "int8", "--quantize int8")
    _new_file(args.onnx, args.overwrite, "--onnx")
    report = export_onnx(args.run, args.onnx, img_size=args.img_size, dynamic=args.dynamic,
                         exporter=args.exporter, quantize=args.quantize,
                         calibration_data=args.calibration_data,
                         calibration_slices=args.calibration_slices, min_iou=min_iou)
    print(report)
    return 0


def _add_tune(sub) -> None:
    p = sub.add_parser("tune", help="choose per-class thresholds and a minimum component size "
                                    "on validation; stored in the run, used by evaluate/predict",
                       description="nnU-Net-style post-processing chosen on the run's validation "
                                   "fold: each is kept only where it improves the validation "
                                   "Jaccard; written to RUN_DIR/postprocess.json.")
    p.add_argument("--run", required=True, help="RUN_DIR written by kvseg train")
    p.add_argument("--data", help="dataset root (default: the one the run was trained on)")
    p.add_argument("--tta", choices=["none", "flip", "flips"], default="none",
                   help="tune on the probabilities of this TTA (use the same in evaluate/predict)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=8)


def _run_tune(args) -> int:
    from kvseg.inference.tune import tune_run

    print(tune_run(args.run, data=args.data, tta=args.tta, device=args.device,
                   batch_size=args.batch_size))
    return 0


def _add_package(sub) -> None:
    p = sub.add_parser("package", help="a run as a shareable model folder: config.json, "
                                       "model.safetensors, README.md model card",
                       description="Load it with kvseg.from_pretrained(DIR); kvseg predict --run "
                                   "DIR accepts it. See docs/deployment.md.")
    p.add_argument("--run", required=True, help="RUN_DIR written by kvseg train")
    p.add_argument("--out", required=True, help="new folder (absent, empty, or an earlier "
                                                "package of kvseg package)")


def _run_package(args) -> int:
    from kvseg.inference.package import package_run

    print(package_run(args.run, args.out))
    return 0


def _add_benchmark(sub) -> None:
    from kvseg.inference.benchmark import DEFAULT_MODELS

    p = sub.add_parser("benchmark", help="inference latency, throughput and memory per variant "
                                         "and path (CPU torch/ONNX Runtime, CUDA); KV/QKV ratios",
                       description="Time every model on every inference path side by side "
                                   "(round-robin); a Markdown table on stdout, JSON with --out.")
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                   help="variant names or 'all' (default: each family's QKV and KV)")
    p.add_argument("--size", default="base")
    p.add_argument("--img-size", type=POSITIVE_INT, default=256)
    p.add_argument("--batch", nargs="+", type=ANY_INT, default=[1], help="batch sizes")
    p.add_argument("--device", nargs="+", default=["cpu"], help="cpu and/or cuda")
    p.add_argument("--onnx", action="store_true", help="also ONNX Runtime fp32 on the CPU")
    p.add_argument("--precision", nargs="+", default=["fp32"],
                   help="fp32, bf16, int8 (int8: ONNX Runtime on the CPU; torch fp32 is always "
                        "measured as the reference)")
    p.add_argument("--threads", type=POSITIVE_INT,
                   help="CPU threads for torch and ONNX Runtime (default: torch's)")
    p.add_argument("--repeats", type=POSITIVE_INT, default=5, help="timed calls per row")
    p.add_argument("--in-channels", type=POSITIVE_INT, default=3)
    p.add_argument("--num-classes", type=POSITIVE_INT, default=3)
    p.add_argument("--out", help="JSON file for the results")


def _run_benchmark(args) -> int:
    from kvseg.inference.benchmark import benchmark, format_table

    result = benchmark(args.models, size=args.size, img_size=args.img_size, batches=args.batch,
                       devices=args.device, onnx=args.onnx, precisions=args.precision,
                       threads=args.threads, repeats=args.repeats,
                       in_channels=args.in_channels, num_classes=args.num_classes, out=args.out)
    print(format_table(result))
    return 0


_POINT_LIKE = re.compile(r"^-\d*\.?\d+(,-?\d*\.?\d*)*$")


def _add_attention(sub) -> None:
    p = sub.add_parser("attention", help="a run's attention maps for one image (PNG + JSON)",
                       description="Per attention layer and head: the post-softmax attention "
                                   "of query points over the slice, the logits' symmetry "
                                   "index and the mean attention distance (kvseg.explain).")
    p.add_argument("--run", required=True)
    p.add_argument("--input", required=True, help="an image file")
    p.add_argument("--points", nargs="+", metavar="X,Y",
                   help="query points in the image's pixels (default: the centre)")
    # "-3,-3" is a point, not a flag (argparse only takes plain numbers like -3 as values)
    p._negative_number_matcher = _POINT_LIKE
    p.add_argument("--layers", nargs="+", type=ANY_INT, metavar="I",
                   help="attention layers in forward order, negative from the end "
                        "(default: all)")
    p.add_argument("--out", required=True, help="folder for attention.png and attention.json")
    p.add_argument("--overwrite", action="store_true",
                   help="replace attention.png / attention.json that kvseg attention did not "
                        "write (its own it always replaces)")


def _run_attention(args) -> int:
    from kvseg.inference.explain import explain_run, parse_point

    points = [parse_point(t) for t in args.points] if args.points else None
    print(explain_run(args.run, args.input, args.out, points=points, layers=args.layers,
                      **({"overwrite": True} if args.overwrite else {})))
    return 0


def _add_reproduce(sub) -> None:
    p = sub.add_parser("reproduce", help="train, evaluate and profile every variant; report")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default="smoke",
                   help="smoke, paper, or a YAML file (`kvseg config show smoke` prints one)")
    p.add_argument("--epochs", type=POSITIVE_INT, help="override the preset's epochs")
    _add_run_set_options(p, "reproduce")
    p.add_argument("--cv", action="store_true",
                   help="k-fold cross-validation: every fold held out once (last epoch, no "
                        "selection on it), out-of-fold counts pooled (n_folds x the runs)")


def _add_run_set_options(p, command: str) -> None:
    """The options every multi-run command (reproduce, sweep) shares."""
    p.add_argument("--models", nargs="+", default=["all"],
                   help="'all' (the preset's list: by default the paper's nine), 'reference' "
                        "(dynunet, UNETR, SwinUNETR in --modes) and/or variant names")
    p.add_argument("--modes", nargs="+", metavar="MODE",
                   help="attention modes to run: 'all' or names (qkv kv kv_pos shared_kv "
                        "shared_qv single kv_relpos); default: the paper's qkv kv kv_pos")
    p.add_argument("--seeds", nargs="+", type=SEED)
    p.add_argument("--device", default="auto")
    p.add_argument("--jobs", type=POSITIVE_INT,
                   help="runs trained at once in separate processes (default: 1 on CUDA, "
                        "else the cores divided by the preset's threads per run)")
    p.add_argument("--margin", type=_number(minimum=0),
                   help="non-inferiority margin of the verdicts in Jaccard points "
                        "(default: the preset's, 2)")
    p.add_argument("--list-runs", action="store_true",
                   help="print one `kvseg train` command per pending run (for a cluster "
                        f"scheduler) and exit; run {command} again afterwards to report")


def _run_reproduce(args) -> int:
    from kvseg.experiments.reproduce import reproduce

    report = reproduce(args.data, args.out, preset=args.preset, models=args.models,
                       seeds=args.seeds, device=args.device, epochs=args.epochs,
                       jobs=args.jobs, margin=args.margin, list_runs=args.list_runs,
                       modes=args.modes, cv=args.cv)
    print(report)
    return 0


def _add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="KV vs QKV across heads, width, depth, resolution, data size",
                       description="Train every model at every value of every factor (one "
                                   "factor at a time, or --grid), same seeds and budget; "
                                   "sweep.csv, report.md and one plot per factor.")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default="ablation_smoke",
                   help="ablation_smoke, ablation_paper, smoke, paper or a YAML file")
    p.add_argument("--vary", action="append", metavar="NAME=V1,V2,...",
                   help="a factor and its values (repeatable): a training option (img_size, "
                        "train_fraction, lr, ...) or a model preset field (heads, dim, depth, "
                        "patch_size, pos_dim, ...); default: the preset's vary")
    p.add_argument("--grid", action=argparse.BooleanOptionalAction, default=None,
                   help="every combination of the factors (default: one at a time)")
    _add_run_set_options(p, "the sweep")


def _run_sweep(args) -> int:
    from kvseg.experiments.sweep import parse_vary, sweep

    summary = sweep(args.data, args.out, preset=args.preset, vary=parse_vary(args.vary),
                    grid=args.grid, models=args.models, seeds=args.seeds, device=args.device,
                    jobs=args.jobs, margin=args.margin, list_runs=args.list_runs,
                    modes=args.modes)
    print(summary)
    return 0


COMMANDS = {
    "models": (_add_models, _run_models),
    "profile": (_add_profile, _run_profile),
    "synth": (_add_synth, _run_synth),
    "convert": (_add_convert, _run_convert),
    "train": (_add_train, _run_train),
    "config": (_add_config, _run_config),
    "evaluate": (_add_evaluate, _run_evaluate),
    "predict": (_add_predict, _run_predict),
    "export": (_add_export, _run_export),
    "tune": (_add_tune, _run_tune),
    "package": (_add_package, _run_package),
    "benchmark": (_add_benchmark, _run_benchmark),
    "attention": (_add_attention, _run_attention),
    "reproduce": (_add_reproduce, _run_reproduce),
    "sweep": (_add_sweep, _run_sweep),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="kvseg",
        description="QKV vs KV attention in pure and hybrid Transformers, 2D medical segmentation",
    )
    parser.add_argument("--version", action="version", version=f"kvseg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def _reproducible_blas() -> None:
    """Ask MKL for results that do not depend on memory alignment (``MKL_CBWR=AUTO,STRICT``).

    MKL picks kernels by the alignment of each buffer, so the same training in two processes
    with different allocation histories (a cache built first, another run before it) drifts
    apart in the last bits and, over hundreds of steps, in the scores (measured: one smoke run
    gave validation Jaccard 0.54, 0.53 and 0.47 in three processes). STRICT mode fixes that on
    a given machine at no measured speed cost. MKL reads the variable when it loads, so this
    runs before torch is imported; a value the user set is kept.
    """
    if "torch" not in sys.modules:
        os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")


def main(argv: list[str] | None = None) -> int:
    _reproducible_blas()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    run = COMMANDS[args.command][1]
    try:
        return run(args)
    except BrokenPipeError:  # `kvseg ... | head`: the reader left; stop quietly, as cat does
        _silence_stdout()
        return 141
    except USER_ERRORS as e:
        if args.verbose:
            raise
        print(f"kvseg {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kvseg {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print(f"kvseg {args.command}: internal error: this is a bug in kvseg, not in your input; "
              "please report it with the traceback above", file=sys.stderr)
        return 1


def _silence_stdout() -> None:
    """Point stdout at /dev/null so Python's final flush does not fail on the closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (captured in tests)
        pass


def _one_line(e: BaseException) -> str:
    """The first line of an error's message; an OSError names its file and what went wrong."""
    if isinstance(e, OSError) and not isinstance(e, KvsegError) and e.strerror:
        where = f"{e.filename}: " if e.filename else ""
        text = f"{where}{e.strerror}"
        if e.filename2:
            text += f" ({e.filename2})"
        if not e.filename and str(e).strip():
            text = str(e)
    else:
        text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


if __name__ == "__main__":
    raise SystemExit(main())
