"""How much of a pretrained QKV encoder's attention each QKV -> KV rule keeps, layer by layer.

For every attention layer of a QKV model (from an official weights file, or a kvseg QKV run),
the layer's own inputs are captured on sample images (forward pre-hooks); then, for each rule
(``kvseg.models.kv_rules``: key, mean, sym), the KV key projection is computed from W_q, W_k
(b_q) and the relative Frobenius error ‖(L' − L)C‖ / ‖LC‖ of the converted pre-softmax logits
L' = K'K'ᵀ against the QKV logits L = QKᵀ is measured on those inputs, both centred along each
row (C: per-query constants cancel in the softmax and do not count), all heads and images
together. ``floor`` is ‖antisym(CLC)‖ / ‖LC‖: no KV layer can get below it; it says how
asymmetric the pretrained attention is (0: symmetric up to per-row and per-column constants;
about 0.71 for unrelated random W_q, W_k). ``sym_any`` is the symmetric part of W_qᵀW_k with
the exact per-key term but without KV's PSD, rank ≤ head_dim limit (no KV layer reaches it):
the gap ``sym`` − ``sym_any`` is what the PSD constraint costs.

CvT layers are measured as the converter uses them: QKV logits proj_q(dw_bn_q(x)) ·
proj_k(dw_bn_k(x)ᵀ at stride 2) against the KV logits proj_k'(dw_bn_k(x) at stride 1) ·
proj_k'(dw_bn_k(x) at stride 2)ᵀ; their logits are N × M, so there is no symmetric-part floor
(shown as n/a).

Sample images: ``--images`` smoothed Gaussian-noise images (a blur of 4 px; no data needed),
normalised per image like kvseg's slices. The numbers that matter come from a real file::

    python benchmarks/kv_conversion.py --pretrained jx_vit_base_p16_384-83fb41ba.pth \
        --model setr_qkv --size base --img-size 224
    python benchmarks/kv_conversion.py --pretrained R50+ViT-B_16.npz --model setr_conv_qkv
    python benchmarks/kv_conversion.py --pretrained CvT-13-224x224-IN-1k.pth --model setr_cvt_qkv
    python benchmarks/kv_conversion.py --run runs/some_qkv_run      # a kvseg QKV run

With ``--pretrained``, the converter's own numbers on its sample tokens (``LoadReport.kv``: a
``_kv`` model loaded from the file with each rule, mean over the layers) are added as
``sample_tokens``.

Prints a table and writes ``benchmarks/results/kv_conversion[-TAG].json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from bench_common import add_threads_option, apply_threads, machine
from kvseg.models.kv_rules import RULES, centre_rows, convert_qk, floor
from kvseg.utils import atomic_write_text


def _heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, n, c = t.shape  # -> (B, heads, n, head_dim), float64
    return t.double().view(b, n, num_heads, c // num_heads).transpose(1, 2)


def _err(new: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error of the row-centred logits (what the softmax sees)."""
    new, ref = centre_rows(new), centre_rows(ref)
    return float((new - ref).norm() / ref.norm())


def _sym_any(x, wq, bq, wk, num_heads: int, ref: torch.Tensor) -> float:
    """The error of the symmetric part S of W_qᵀW_k, with QKV's exact per-key term and no PSD
    or rank limit: not a KV layer (KKᵀ is PSD), it shows how much of the gap between ``sym``
    and ``floor`` the PSD constraint makes."""
    hd, x = wq.shape[0] // num_heads, x.double()
    outs = []
    for h in range(num_heads):
        r = slice(h * hd, (h + 1) * hd)
        b = wq[r].double().T @ wk[r].double()
        p = 0 if bq is None else (x @ (wk[r].double().T @ bq[r].double()))[:, None, :]
        outs.append(x @ ((b + b.T) / 2) @ x.transpose(1, 2) + p)
    return _err(torch.stack(outs, 1), ref)


def token_layer(attn, x: torch.Tensor) -> dict:
    """A ViT ``QKVAttention`` on its input tokens x (B, N, D)."""
    w, b = attn.qkv.weight.detach(), attn.qkv.bias
    wq, wk, _ = w.chunk(3)
    bq, bk, _ = b.detach().chunk(3) if b is not None else (None, None, None)
    h = attn.num_heads
    q, k = _heads(F.linear(x, wq, bq), h), _heads(F.linear(x, wk, bk), h)
    ref = q @ k.transpose(-2, -1)
    row = {"floor": floor(ref), "sym_any": _sym_any(x, wq, bq, wk, h, ref)}
    for rule in RULES:
        wn, bn = convert_qk(wq, bq, wk, bk, h, rule)
        kn = _heads(F.linear(x, wn, bn), h)
        row[rule] = _err(kn @ kn.transpose(-2, -1), ref)
    return row


def cvt_layer(attn, x: torch.Tensor, hh: int, ww: int) -> dict:
    """A CvT ``ConvAttention`` (QKV) on its input tokens x (B, h·w, C)."""
    b, n, c = x.shape
    m = x.transpose(1, 2).reshape(b, c, hh, ww)

    def tokens(t):
        return t.flatten(2).transpose(1, 2)

    xq = tokens(attn.conv_proj_q(m))
    xk = tokens(attn.conv_proj_k(m))  # stride 2
    conv, bn = attn.conv_proj_k
    xk1 = tokens(bn(F.conv2d(m, conv.weight, None, 1, 1, groups=c)))  # the same at stride 1
    h = attn.num_heads
    wq, bq = attn.proj_q.weight.detach(), attn.proj_q.bias
    wk, bk = attn.proj_k.weight.detach(), attn.proj_k.bias
    bq, bk = (None if t is None else t.detach() for t in (bq, bk))
    ref = _heads(F.linear(xq, wq, bq), h) @ _heads(F.linear(xk, wk, bk), h).transpose(-2, -1)
    row: dict = {"floor": None, "sym_any": None}  # N × M logits: no symmetric-part floor
    for rule in RULES:
        wn, bn_ = convert_qk(wq, bq, wk, bk, h, rule)
        q = _heads(F.linear(xk1, wn, bn_), h)
        k = _heads(F.linear(xk, wn, bn_), h)
        row[rule] = _err(q @ k.transpose(-2, -1), ref)
    return row


def sample_images(n: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size, size, generator=g)
    k = torch.ones(channels, 1, 4, 4) / 16
    x = F.conv2d(F.pad(x, (2, 1, 2, 1), mode="reflect"), k, groups=channels)
    return (x - x.mean(dim=(1, 2, 3), keepdim=True)) / x.std(dim=(1, 2, 3), keepdim=True)


def measure(model, images: torch.Tensor) -> list[dict]:
    from kvseg.layers.attention import QKVAttention
    from kvseg.models.cvt import ConvAttention

    captured: dict[str, tuple] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, (QKVAttention, ConvAttention)):
            hooks.append(mod.register_forward_pre_hook(
                lambda m, args, name=name: captured.__setitem__(name, (m, args))))
    if not hooks:
        raise SystemExit("the model has no QKV attention layer (build the _qkv variant)")
    rows = []
    model.eval()
    with torch.no_grad():
        model(images)
        for name, (mod, args) in captured.items():
            if isinstance(mod, ConvAttention):
                row = cvt_layer(mod, args[0], args[1], args[2])
            else:
                row = token_layer(mod, args[0])
            rows.append({"layer": name, **row})
    for h in hooks:
        h.remove()
    return rows


def report_means(model_name: str, size: str, img_size: int, source: str) -> dict:
    """Mean ``LoadReport.kv`` numbers (floor, then each rule) of the ``_kv`` twin of a QKV
    variant loaded from ``source``: the converter's sample-token estimate."""
    import kvseg

    out: dict = {}
    for rule in RULES:
        model = kvseg.create_model(model_name.replace("_qkv", "_kv"), size=size,
                                   img_size=img_size, pretrained=source, pretrained_rule=rule)
        rows = model.pretrained_report.kv
        out["floor"] = sum(r["asymmetry"] for r in rows) / len(rows)
        out[rule] = sum(r["logit_error"] for r in rows) / len(rows)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pretrained", help="an official weights file (or 'imagenet')")
    src.add_argument("--run", help="a kvseg run folder of a QKV model")
    p.add_argument("--model", default="setr_qkv", help="the QKV variant the file fits")
    p.add_argument("--size", default="base")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--images", type=int, default=4, help="sample images")
    p.add_argument("--tag", default="", help="suffix of the JSON file name")
    add_threads_option(p)
    args = p.parse_args()
    apply_threads(args)
    if args.run:
        from kvseg.training.checkpoint import load_run

        model, config = load_run(args.run)
        img_size, source = int(config["img_size"]), args.run
    else:
        import kvseg

        model = kvseg.create_model(args.model, size=args.size, img_size=args.img_size,
                                   pretrained=args.pretrained)
        img_size, source = args.img_size, args.pretrained
    rows = measure(model, sample_images(args.images, model.in_channels, img_size))
    cols = ["floor", "sym_any", *RULES]
    print(f"{source}: relative Frobenius error of the KV logits against the QKV logits")
    print(f"| layer | {' | '.join(cols)} |")
    print("|---|" + "---:|" * len(cols))
    def fmt(v) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    for r in rows:
        print(f"| {r['layer']} | " + " | ".join(fmt(r[c]) for c in cols) + " |")
    mean = {c: (None if any(r[c] is None for r in rows) else sum(r[c] for r in rows) / len(rows))
            for c in cols}
    print("| mean | " + " | ".join(fmt(mean[c]) for c in cols) + " |")
    tokens = None
    if args.pretrained:
        tokens = report_means(args.model, args.size, img_size, args.pretrained)
        print("| sample tokens (LoadReport.kv) | " + " | ".join(fmt(tokens.get(c)) for c in cols)
              + " |")
    name = f"kv_conversion{'-' + args.tag if args.tag else ''}.json"
    out = Path(__file__).parent / "results" / name
    out.parent.mkdir(exist_ok=True)
    atomic_write_text(out, json.dumps({"source": str(source), "images": args.images,
                                       "img_size": img_size, "layers": rows, "mean": mean,
                                       "sample_tokens": tokens,
                                       "machine": machine()}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
