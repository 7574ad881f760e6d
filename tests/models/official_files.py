"""Small weights files in the official layouts, with random values (tests and benchmarks).

Each writer follows the real file's conventions: key names, shapes, kernel layouts (HWIO conv
kernels and (in, out) dense kernels in Google's ``.npz``, (D, heads, head_dim) attention kernels,
the stacked ``qkv`` of timm, the class-token row of the position tables, BatchNorm running
statistics in CvT), only smaller. The timm and Google writers produce the *same* network from
the same seed, so a model loaded from either must give identical outputs.
"""

from __future__ import annotations

import numpy as np
import torch


def _rand(gen: torch.Generator, *shape: int, std: float | None = None) -> torch.Tensor:
    fan_in = shape[-1] if len(shape) > 1 else 1
    std = std if std is not None else fan_in ** -0.5
    return torch.randn(*shape, generator=gen) * std


def _norm(gen: torch.Generator, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    return 1 + 0.1 * torch.randn(dim, generator=gen), 0.1 * torch.randn(dim, generator=gen)


def timm_vit_state(*, dim: int = 96, depth: int = 4, num_heads: int = 4, patch: int = 8,
                   grid: int = 8, in_channels: int = 3, num_classes: int = 10,
                   seed: int = 0, attn_std: float = 0.3) -> dict[str, torch.Tensor]:
    """A timm ``VisionTransformer`` state dict (class token, ``head``, qkv with bias)."""
    g = torch.Generator().manual_seed(seed)
    sd = {"cls_token": _rand(g, 1, 1, dim, std=0.02),
          "pos_embed": _rand(g, 1, 1 + grid * grid, dim, std=0.5),
          "patch_embed.proj.weight": _rand(g, dim, in_channels, patch, patch,
                                           std=(in_channels * patch * patch) ** -0.5),
          "patch_embed.proj.bias": _rand(g, dim, std=0.02)}
    for i in range(depth):
        b = f"blocks.{i}."
        sd[b + "norm1.weight"], sd[b + "norm1.bias"] = _norm(g, dim)
        sd[b + "attn.qkv.weight"] = _rand(g, 3 * dim, dim, std=attn_std)
        sd[b + "attn.qkv.bias"] = _rand(g, 3 * dim, std=0.1)
        sd[b + "attn.proj.weight"] = _rand(g, dim, dim)
        sd[b + "attn.proj.bias"] = _rand(g, dim, std=0.02)
        sd[b + "norm2.weight"], sd[b + "norm2.bias"] = _norm(g, dim)
        sd[b + "mlp.fc1.weight"] = _rand(g, 4 * dim, dim)
        sd[b + "mlp.fc1.bias"] = _rand(g, 4 * dim, std=0.02)
        sd[b + "mlp.fc2.weight"] = _rand(g, dim, 4 * dim)
        sd[b + "mlp.fc2.bias"] = _rand(g, dim, std=0.02)
    sd["norm.weight"], sd["norm.bias"] = _norm(g, dim)
    sd["head.weight"] = _rand(g, num_classes, dim)
    sd["head.bias"] = torch.zeros(num_classes)
    return sd


def timm_to_google(sd: dict[str, torch.Tensor], num_heads: int) -> dict[str, np.ndarray]:
    """The same network in Google's ``.npz`` naming and kernel layouts."""
    def np_(t: torch.Tensor) -> np.ndarray:
        return t.detach().numpy().astype(np.float32)

    out = {"cls": np_(sd["cls_token"]),
           "embedding/kernel": np_(sd["patch_embed.proj.weight"].permute(2, 3, 1, 0)),
           "embedding/bias": np_(sd["patch_embed.proj.bias"]),
           "Transformer/posembed_input/pos_embedding": np_(sd["pos_embed"]),
           "Transformer/encoder_norm/scale": np_(sd["norm.weight"]),
           "Transformer/encoder_norm/bias": np_(sd["norm.bias"])}
    if "head.weight" in sd:
        out["head/kernel"] = np_(sd["head.weight"].T)
        out["head/bias"] = np_(sd["head.bias"])
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        b, g = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        att = g + "MultiHeadDotProductAttention_1/"
        dim = sd[b + "norm1.weight"].shape[0]
        hd = dim // num_heads
        for src, dst in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_2")):
            out[f"{g}{dst}/scale"] = np_(sd[f"{b}{src}.weight"])
            out[f"{g}{dst}/bias"] = np_(sd[f"{b}{src}.bias"])
        ws, bs = sd[b + "attn.qkv.weight"].chunk(3), sd[b + "attn.qkv.bias"].chunk(3)
        for name, w, bias in zip(("query", "key", "value"), ws, bs, strict=True):
            out[f"{att}{name}/kernel"] = np_(w.T.reshape(dim, num_heads, hd))
            out[f"{att}{name}/bias"] = np_(bias.reshape(num_heads, hd))
        out[f"{att}out/kernel"] = np_(sd[b + "attn.proj.weight"].T.reshape(num_heads, hd, dim))
        out[f"{att}out/bias"] = np_(sd[b + "attn.proj.bias"])
        for src, dst in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
            out[f"{g}MlpBlock_3/{dst}/kernel"] = np_(sd[f"{b}mlp.{src}.weight"].T)
            out[f"{g}MlpBlock_3/{dst}/bias"] = np_(sd[f"{b}mlp.{src}.bias"])
        i += 1
    return out


def write_timm_vit(path, **kw) -> dict[str, torch.Tensor]:
    """torch.save a :func:`timm_vit_state` to ``path``; return it."""
    sd = timm_vit_state(**kw)
    torch.save(sd, path)
    return sd


def write_google_vit(path, *, num_heads: int = 4, **kw) -> dict[str, np.ndarray]:
    """``np.savez`` the same network as :func:`write_timm_vit` (same kwargs) in Google's layout."""
    arrays = timm_to_google(timm_vit_state(num_heads=num_heads, **kw), num_heads)
    np.savez(path, **arrays)
    return arrays


def transunet_arrays(*, width: int = 16, layers: tuple[int, ...] = (1, 1, 1), dim: int = 96,
                     depth: int = 4, num_heads: int = 4, grid: int = 4, in_channels: int = 3,
                     seed: int = 0) -> dict[str, np.ndarray]:
    """TransUNet's ``R50+ViT-B_16.npz`` layout: the ViT (patch 1 on 16·width channels) plus
    ``conv_root``, ``gn_root`` and ``block{b}/unit{u}/{conv,gn}{1,2,3}``, ``conv_proj``,
    ``gn_proj`` (HWIO kernels, GroupNorm ``scale``/``bias``), plus ``pre_logits``."""
    g = torch.Generator().manual_seed(seed + 100)
    vit = timm_vit_state(dim=dim, depth=depth, num_heads=num_heads, patch=1, grid=grid,
                         in_channels=16 * width, num_classes=21843 // 1000, seed=seed)
    out = timm_to_google(vit, num_heads)
    out["pre_logits/kernel"] = _rand(g, dim, dim).numpy()
    out["pre_logits/bias"] = np.zeros(dim, np.float32)

    def conv(name: str, k: int, cin: int, cout: int) -> None:
        out[name + "/kernel"] = torch.randn(k, k, cin, cout, generator=g).numpy()

    def gn(name: str, c: int) -> None:
        w, b = _norm(g, c)
        out[name + "/scale"], out[name + "/bias"] = w.numpy(), b.numpy()

    conv("conv_root", 7, in_channels, width)
    gn("gn_root", width)
    cin = width
    for b, n in enumerate(layers):
        mid = width * 2 ** b
        cout = 4 * mid
        for u in range(n):
            p = f"block{b + 1}/unit{u + 1}/"
            conv(p + "conv1", 1, cin, mid)
            gn(p + "gn1", mid)
            conv(p + "conv2", 3, mid, mid)
            gn(p + "gn2", mid)
            conv(p + "conv3", 1, mid, cout)
            gn(p + "gn3", cout)
            if u == 0:
                conv(p + "conv_proj", 1, cin, cout)
                gn(p + "gn_proj", cout)
            cin = cout
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def write_transunet(path, **kw) -> dict[str, np.ndarray]:
    arrays = transunet_arrays(**kw)
    np.savez(path, **arrays)
    return arrays


def cvt_state(*, dims=(32, 64, 128), depths=(1, 1, 2), num_heads=(1, 2, 4),
              patch_sizes=(7, 3, 3), in_channels: int = 3, num_classes: int = 10,
              seed: int = 0, attn_std: float = 0.3) -> dict[str, torch.Tensor]:
    """Microsoft's CvT state dict (``stage{i}.…``, dw_bn projections with BatchNorm running
    statistics, ``stage2.cls_token`` in the last stage, ``norm``, ``head``)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    cin = in_channels
    for i, (d, depth) in enumerate(zip(dims, depths, strict=True)):
        s = f"stage{i}."
        k = patch_sizes[i]
        sd[s + "patch_embed.proj.weight"] = _rand(g, d, cin, k, k, std=(cin * k * k) ** -0.5)
        sd[s + "patch_embed.proj.bias"] = _rand(g, d, std=0.02)
        sd[s + "patch_embed.norm.weight"], sd[s + "patch_embed.norm.bias"] = _norm(g, d)
        for j in range(depth):
            b = f"{s}blocks.{j}."
            sd[b + "norm1.weight"], sd[b + "norm1.bias"] = _norm(g, d)
            for x in "qkv":
                p = f"{b}attn.conv_proj_{x}."
                sd[p + "conv.weight"] = _rand(g, d, 1, 3, 3, std=1 / 3)
                sd[p + "bn.weight"], sd[p + "bn.bias"] = _norm(g, d)
                sd[p + "bn.running_mean"] = 0.1 * torch.randn(d, generator=g)
                sd[p + "bn.running_var"] = 0.5 + torch.rand(d, generator=g)
                sd[p + "bn.num_batches_tracked"] = torch.tensor(1000)
                sd[f"{b}attn.proj_{x}.weight"] = _rand(g, d, d, std=attn_std)
                sd[f"{b}attn.proj_{x}.bias"] = _rand(g, d, std=0.1)
            sd[b + "attn.proj.weight"] = _rand(g, d, d)
            sd[b + "attn.proj.bias"] = _rand(g, d, std=0.02)
            sd[b + "norm2.weight"], sd[b + "norm2.bias"] = _norm(g, d)
            sd[b + "mlp.fc1.weight"] = _rand(g, 4 * d, d)
            sd[b + "mlp.fc1.bias"] = _rand(g, 4 * d, std=0.02)
            sd[b + "mlp.fc2.weight"] = _rand(g, d, 4 * d)
            sd[b + "mlp.fc2.bias"] = _rand(g, d, std=0.02)
        cin = d
    sd[f"stage{len(dims) - 1}.cls_token"] = _rand(g, 1, 1, dims[-1], std=0.02)
    sd["norm.weight"], sd["norm.bias"] = _norm(g, dims[-1])
    sd["head.weight"] = _rand(g, num_classes, dims[-1])
    sd["head.bias"] = torch.zeros(num_classes)
    return sd


def write_cvt(path, **kw) -> dict[str, torch.Tensor]:
    sd = cvt_state(**kw)
    torch.save(sd, path)
    return sd


#: ``size="micro"`` models of each family that the writers' defaults fit (img_size 64).
MICRO_WRITERS = {"setr": ("vit.pth", write_timm_vit), "setr_conv": ("r50vit.npz", write_transunet),
                 "setr_cvt": ("cvt.pth", write_cvt)}
