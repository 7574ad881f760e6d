"""Attention maps of a trained model, by hooks on its attention modules.

:func:`attention_maps` runs one image through a model with hooks on every attention module
(token attention :class:`kvseg.layers.Attention` and CvT's
:class:`kvseg.models.cvt.ConvAttention`): a pre-hook turns on the module's own
``return_attention`` switch (the explicit, unfused path, so the probabilities exist), a hook
takes them out of the module's output (the block sees the plain output, so blocks and models do
not thread the switch through), and a hook on the module's :class:`~kvseg.layers.AttentionCore`
reads its inputs to recompute the pre-softmax logits. Per layer and head it gives:

* **maps**: the post-softmax attention of chosen query positions over the key grid. A point is
  an (x, y) pixel of the model input (column, row; the input is zero-padded on the
  bottom/right to the encoder's stride, as in the forward pass) and selects the query token
  whose cell contains it. CvT's keys sit on the stride-2 grid of the stage (``ConvAttention``),
  so its maps are on that grid.
* **symmetry**: ‖L − Lᵀ‖_F / ‖L‖_F of the pre-softmax logits L, per head, over the batch's one
  image. 0 for the Q = K modes (``kv``, ``single``) by construction; for ``kv_pos`` the logits
  are the factored ones the layer computes (t·s·K Kᵀ + g(j): Borji's row terms f(i) + b cancel
  in the softmax and are not part of them); for ``kv_relpos`` they include the relative-position
  bias. In CvT the queries (stride 1, N) and keys (stride 2, M) differ, so L is N × M; the index
  is taken on its square part, the M queries at the keys' own positions (every second row and
  column) against the M keys: for ``kv`` and ``single`` those queries are the keys themselves
  (the keys are the stride-1 K subsampled), so the index is 0 there too.
* **distance**: the mean attention distance per head in input pixels, Σ_j p_ij ‖x_i − x_j‖
  averaged over all query tokens i (Dosovitskiy et al.'s measure), with x the centre of a
  token's cell (CvT's keys: the centre of the query cell they are centred on).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kvseg.data.manifest import read_manifest, write_manifest
from kvseg.data.png import read_slice
from kvseg.errors import ConfigError, RunDirError
from kvseg.layers.attention import AttentionCore
from kvseg.models.patch import WindowTokenAttention
from kvseg.training.checkpoint import open_run
from kvseg.training.rundir import FolderLock, command_line
from kvseg.utils import atomic_write_text, pyplot, save_figure


@dataclass
class LayerAttention:
    """One attention layer's figures (see the module docstring).

    Attributes:
        index: the layer's position among the model's attention modules (forward order).
        name: its module path, e.g. ``encoder.blocks.3.attn``.
        mode: its attention mode.
        query_grid: (h, w) of the query tokens.
        key_grid: (h, w) of the key tokens.
        cell: (height, width) in input pixels of one query token's cell.
        key_stride: the keys sit on every ``key_stride``-th query row and column.
        maps: (points, heads, key h, key w) post-softmax attention of each query point.
        symmetry: per head, ‖L − Lᵀ‖ / ‖L‖ of the pre-softmax logits.
        distance: per head, the mean attention distance in input pixels.
    """

    index: int
    name: str
    mode: str
    query_grid: tuple[int, int]
    key_grid: tuple[int, int]
    cell: tuple[float, float]
    key_stride: int
    maps: torch.Tensor
    symmetry: list[float]
    distance: list[float]

    def to_dict(self) -> dict:
        """JSON-ready summary (the maps as nested lists)."""
        return {"index": self.index, "name": self.name, "mode": self.mode,
                "query_grid": list(self.query_grid), "key_grid": list(self.key_grid),
                "key_stride": self.key_stride, "symmetry": self.symmetry,
                "symmetry_mean": _mean(self.symmetry), "distance_px": self.distance,
                "distance_px_mean": _mean(self.distance)}


@dataclass
class AttentionMaps:
    """What :func:`attention_maps` returns: the query points and the selected layers."""

    image_size: tuple[int, int]
    points: list[tuple[float, float]]
    num_layers: int
    layers: list[LayerAttention] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"image_size": list(self.image_size), "points": [list(p) for p in self.points],
                "num_layers": self.num_layers, "layers": [la.to_dict() for la in self.layers]}


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else math.nan


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's attention modules in forward order: (name, module) of every module with an
    :class:`AttentionCore` child ``core`` and a ``mode``."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(getattr(m, "core", None), AttentionCore) and hasattr(m, "mode")]


def check_points(points: Sequence[Sequence[float]] | None, height: int,
                 width: int) -> list[tuple[float, float]]:
    """Validate (x, y) pixel points inside a height × width image; None -> the centre."""
    if points is None:
        return [((width - 1) / 2, (height - 1) / 2)]
    out = []
    for p in points:
        if len(p) != 2:
            raise ConfigError(f"point {tuple(p)}: expected x,y")
        x, y = float(p[0]), float(p[1])
        if not (0 <= x < width and 0 <= y < height) or not (math.isfinite(x)
                                                              and math.isfinite(y)):
            raise ConfigError(f"point {x:g},{y:g}: outside the {width}×{height} image "
                              f"(x in [0, {width}), y in [0, {height}))")
        out.append((x, y))
    return out


def check_layers(layers: Sequence[int] | None, count: int) -> list[int]:
    """Layer indices (negative from the end) -> sorted positions; None -> all ``count``."""
    if layers is None:
        return list(range(count))
    out = []
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int) or not -count <= i < count:
            raise ConfigError(f"layer {i!r}: out of range; the model has {count} attention "
                              f"layers (0..{count - 1}, or -{count}..-1 from the end)")
        out.append(i % count)
    return sorted(set(out))


def attention_maps(model: nn.Module, image: torch.Tensor,
                   points: Sequence[Sequence[float]] | None = None,
                   layers: Sequence[int] | None = None) -> AttentionMaps:
    """Attention of ``points`` in the chosen ``layers`` of ``model`` for one image.

    Args:
        model: a kvseg model (any family and mode); run in eval mode under ``no_grad`` and put
            back in its previous mode.
        image: the model input, (C, H, W) or (1, C, H, W).
        points: (x, y) pixel coordinates in the image (column, row); None: its centre.
        layers: attention-layer indices in forward order (negative from the end); None: all.

    Returns an :class:`AttentionMaps`. Raises :class:`ConfigError` for a point outside the image
    or a layer index out of range (naming it).
    """
    x = image[None] if image.ndim == 3 else image
    if x.ndim != 4 or x.shape[0] != 1:
        raise ConfigError(f"image of shape {tuple(image.shape)}: expected (C, H, W) or "
                          "(1, C, H, W)")
    height, width = x.shape[-2:]
    pts = check_points(points, height, width)
    modules = attention_modules(model)
    if not modules:
        raise ConfigError(f"{type(model).__name__}: no attention modules to hook")
    if any(isinstance(mod, WindowTokenAttention) for mod in model.modules()):
        raise ConfigError(f"{type(model).__name__}: windowed attention (Swin): its tokens are "
                          "cells of (shifted) windows, not points of the image; no attention "
                          "maps")
    chosen = check_layers(layers, len(modules))
    m = int(getattr(model, "input_multiple", 1))
    padded = (math.ceil(height / m) * m, math.ceil(width / m) * m)
    if getattr(model, "fixed_size", None):  # UNETR: the whole input resized to its token grid
        padded = (int(height), int(width))
    captured: dict[int, dict] = {}
    handles = []
    for i in chosen:
        handles += _hook(modules[i][1], captured.setdefault(i, {}))
    was_training = model.training
    try:
        model.eval()
        first = next(iter(model.parameters()), None)
        with torch.no_grad():
            model(x.to(first.device if first is not None else "cpu"))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    result = AttentionMaps(image_size=(int(height), int(width)), points=pts,
                           num_layers=len(modules))
    for i in chosen:
        name, module = modules[i]
        result.layers.append(_summarise(i, name, module, captured[i], pts, padded))
    return result


def _hook(module: nn.Module, store: dict) -> list:
    """Hooks that capture one attention module's probabilities, grid and logits."""

    def pre(mod, args, kwargs):
        store["args"], store["kwargs"] = args, dict(kwargs)
        return args, {**kwargs, "return_attention": True}

    def post(mod, args, kwargs, output):
        out, store["attn"] = output
        return out

    def core_post(core, args, kwargs, output):
        q, k, _, *rest = args
        terms = dict(kwargs)
        names = ("temperature", "key_bias")
        terms.update({n: a for n, a in zip(names, rest, strict=False)})
        terms.pop("return_attention", None)
        store["logits"] = core.logits(q, k, **terms)

    return [module.register_forward_pre_hook(pre, with_kwargs=True),
            module.register_forward_hook(post, with_kwargs=True),
            module.core.register_forward_hook(core_post, with_kwargs=True)]


def _grids(module: nn.Module, store: dict) -> tuple[tuple[int, int], int]:
    """The query grid (h, w) and the key stride of one captured call."""
    args, kwargs = store["args"], store["kwargs"]
    stride = getattr(module, "stride_kv", None)
    if stride is not None:  # CvT: forward(x, h, w)
        h = kwargs.get("h", args[1] if len(args) > 1 else None)
        w = kwargs.get("w", args[2] if len(args) > 2 else None)
        return (int(h), int(w)), int(stride)
    grid = kwargs.get("grid", args[2] if len(args) > 2 else None) or module.grid_size
    n = args[0].shape[1]
    if grid is None or grid[0] * grid[1] != n:
        side = math.isqrt(n)
        if side * side != n:
            raise ConfigError(f"{type(module).__name__}: {n} tokens and no grid to place them")
        grid = (side, side)
    return (int(grid[0]), int(grid[1])), 1


def _summarise(index: int, name: str, module: nn.Module, store: dict,
               points: list[tuple[float, float]], padded: tuple[int, int]) -> LayerAttention:
    (h, w), s = _grids(module, store)
    hk, wk = -(-h // s), -(-w // s)
    attn = store["attn"][0].float()  # (heads, N, M)
    logits = store["logits"][0].float()
    cell = (padded[0] / h, padded[1] / w)
    rows = [min(int(py // cell[0]), h - 1) * w + min(int(px // cell[1]), w - 1)
            for px, py in points]
    maps = attn[:, rows, :].permute(1, 0, 2).reshape(len(points), -1, hk, wk)
    # symmetry: the square part (queries at the keys' positions) against its transpose
    on_keys = (torch.arange(h)[::s, None] * w + torch.arange(w)[None, ::s]).flatten()
    square = logits[:, on_keys, :]
    symmetry = ((square - square.transpose(-2, -1)).flatten(1).norm(dim=1)
                / square.flatten(1).norm(dim=1).clamp_min(1e-30))
    # distance: query cell centres against key centres, in pixels
    qy = (torch.arange(h) + 0.5) * cell[0]
    qx = (torch.arange(w) + 0.5) * cell[1]
    q_pos = torch.stack(torch.meshgrid(qy, qx, indexing="ij"), -1).reshape(-1, 2)
    k_pos = torch.stack(torch.meshgrid(qy[::s], qx[::s], indexing="ij"), -1).reshape(-1, 2)
    dist = torch.cdist(q_pos.double(), k_pos.double()).float()  # (N, M)
    distance = (attn * dist).sum(-1).mean(-1)
    return LayerAttention(index=index, name=name, mode=module.mode, query_grid=(h, w),
                          key_grid=(hk, wk), cell=cell, key_stride=s, maps=maps,
                          symmetry=[float(v) for v in symmetry],
                          distance=[float(v) for v in distance])


# --------------------------------------------------------------------------- kvseg attention
@dataclass
class ExplainSummary:
    """What :func:`explain_run` wrote."""

    png: Path
    json: Path
    maps: AttentionMaps

    def __str__(self) -> str:
        lines = [f"{'layer':>5} {'name':<34} {'mode':<10} {'symmetry':>9} {'distance px':>11}"]
        for la in self.maps.layers:
            lines.append(f"{la.index:>5} {la.name:<34} {la.mode:<10} "
                         f"{_mean(la.symmetry):>9.4f} {_mean(la.distance):>11.1f}")
        return "\n".join(lines + [f"wrote {self.png} and {self.json}"])


def parse_point(text: str) -> tuple[float, float]:
    """``"x,y"`` -> (x, y) pixels; :class:`ConfigError` naming the text otherwise."""
    parts = text.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        x, y = (float(p) for p in parts)
    except ValueError:
        raise ConfigError(f"--points {text!r}: expected x,y pixel coordinates") from None
    return x, y


#: What kvseg attention writes into ``out``, and the manifest listing them.
OUTPUTS = ("attention.png", "attention.json")
MANIFEST = ".kvseg_attention.json"


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse to replace an output file kvseg attention did not write (as predict does)."""
    meta = read_manifest(out / MANIFEST) if out.is_dir() else None
    own = set(meta["files"]) if meta else set()
    for name in OUTPUTS:
        if (out / name).exists() and name not in own and not overwrite:
            raise RunDirError(f"{out / name}: exists and was not written by kvseg attention; "
                              "refusing to overwrite it (choose another --out, move it, or "
                              "pass --overwrite)")


def explain_run(run_dir: str | Path, image: str | Path, out: str | Path, *,
                points: Sequence[Sequence[float]] | None = None,
                layers: Sequence[int] | None = None, overwrite: bool = False
                ) -> ExplainSummary:
    """``kvseg attention``: a run's attention maps for one image, as a PNG grid and a JSON.

    Args:
        run_dir: the training run folder (its ``best.safetensors`` and config).
        image: an image file (read and prepared as ``kvseg predict`` does; a run trained with
            2.5D context sees the slice as its own neighbours).
        out: the output folder (created): ``attention.png`` (rows: layer × point; columns:
            heads and the head mean; the attention over the slice at the model's input size,
            query points marked) and ``attention.json`` (per layer and head the symmetry index
            and mean attention distance, in model-input pixels; the points in both the image's
            and the model input's pixels).
        points: (x, y) pixels of the image (column, row); None: its centre.
        layers: attention-layer indices (forward order, negative from the end); None: all.
        overwrite: replace an ``attention.png`` / ``attention.json`` in ``out`` that kvseg
            attention did not write (its own, listed in ``.kvseg_attention.json``, it replaces).

    Raises :class:`ConfigError` (one line) for a point outside the image or a layer out of range.
    """
    run_dir, out = Path(run_dir), Path(out)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"--run {run_dir}: no such run folder")
    if not Path(image).is_file():
        raise FileNotFoundError(f"--input {image}: no such file")
    _check_out(out, overwrite)
    model, config = open_run(run_dir, map_location="cpu")
    size = config.img_size
    raw, prepared = read_slice(image, size, channels=config.preprocess["channels"],
                               window=config.preprocess.get("window"))
    height, width = raw.shape[:2]
    pts = check_points(points, height, width)
    x = prepared.repeat(2 * config.context + 1, 1, 1)
    if x.shape[0] != model.in_channels:
        raise ConfigError(f"--input {image}: gives {x.shape[0]} channels, the run's model takes "
                          f"{model.in_channels}")
    scaled = [(px * size / width, py * size / height) for px, py in pts]  # model-input px
    maps = attention_maps(model, x, points=scaled, layers=layers)
    rows, row_points = [], []
    for la in maps.layers:
        for p, point in enumerate(scaled):
            m = la.maps[p]  # (heads, h, w)
            rows.append((f"layer {la.index}" + (f", point {p}" if len(scaled) > 1 else ""),
                         torch.cat([m, m.mean(0, keepdim=True)]).numpy()))
            row_points.append(point)
    heads = maps.layers[0].maps.shape[1] if maps.layers else 0
    columns = [f"head {h}" for h in range(heads)] + ["mean"]
    if any(la.maps.shape[1] != heads for la in maps.layers):  # CvT: heads differ per stage
        columns = [f"head {h}" for h in range(max(la.maps.shape[1] for la in maps.layers))]
        columns.append("mean")
        rows = [(label, _pad_heads(m, len(columns))) for label, m in rows]
    with FolderLock(out, command_line()):
        _check_out(out, overwrite)
        write_manifest(out / MANIFEST, OUTPUTS, generator="kvseg.attention")
        png = plot_attention_grid(prepared[prepared.shape[0] // 2].numpy(), rows, columns,
                                  row_points, out / "attention.png")
        record = {"run": str(run_dir), "model": config.model, "input": str(image),
                  "img_size": size, "points_image_px": [list(p) for p in pts],
                  "points_model_px": [list(p) for p in scaled],
                  "distance_unit": "model-input pixels", **maps.to_dict()}
        path = out / "attention.json"
        atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    return ExplainSummary(png=png, json=path, maps=maps)


def _pad_heads(maps, columns: int):
    """(heads + 1, h, w) -> (columns, h, w): the mean moved last, empty heads as NaN (blank)."""
    out = np.full((columns, *maps.shape[1:]), np.nan, dtype=maps.dtype)
    out[:maps.shape[0] - 1] = maps[:-1]
    out[-1] = maps[-1]
    return out


# --------------------------------------------------------------------------- the figure
def attention_panel(ax, image: np.ndarray, attn: np.ndarray,
                     points: Sequence[tuple[float, float]], title: str | None = None) -> None:
    """One panel: the slice in grey, the attention map (resized to the slice, normalised to its
    maximum) as a translucent heat map, the query points as crosses."""
    size = image.shape[-2:]
    heat = F.interpolate(torch.as_tensor(attn, dtype=torch.float32)[None, None], size=size,
                         mode="bilinear", align_corners=False)[0, 0].numpy()
    heat = heat / max(float(heat.max()), 1e-12)
    lo, hi = np.percentile(image, [1, 99]) if image.size else (0.0, 1.0)
    ax.imshow(image, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
    ax.imshow(heat, cmap="inferno", alpha=0.55, vmin=0, vmax=1)
    for x, y in points:
        ax.plot([x], [y], marker="x", color="cyan", markersize=5, mew=1.5)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7)


def plot_attention_grid(image: np.ndarray, rows: Sequence[tuple[str, np.ndarray]],
                        columns: Sequence[str], points: Sequence[tuple[float, float]],
                        path: str | Path) -> Path:
    """``kvseg attention``'s figure: one row per (layer, point), one column per head and the
    head mean; each panel the attention of the row's query point over the slice.

    Args:
        image: the slice (S, S) as the model saw it (the centre channel of its input).
        rows: (label, maps (columns, h, w)) per row; the maps are on the layer's key grid.
        columns: the column titles (``head 0`` ... ``mean``).
        points: per row, the query point (x, y) in the slice's pixels (one per row, or one for
            all rows).
        path: the PNG to write.
    """
    plt = pyplot()

    n, cols = len(rows), len(columns)
    fig, axes = plt.subplots(n, cols, figsize=(1.5 * cols, 1.55 * n), squeeze=False)
    for i, (label, maps) in enumerate(rows):
        point = points[i] if len(points) == n else points[0]
        for j in range(cols):
            ax = axes[i][j]
            attention_panel(ax, image, maps[j], [point], columns[j] if i == 0 else None)
            if j == 0:
                ax.set_ylabel(label, fontsize=6)
    fig.tight_layout()
    path = Path(path)
    save_figure(fig, path)
    return path


__all__ = ["AttentionMaps", "ExplainSummary", "LayerAttention", "attention_maps", "attention_panel",
           "attention_modules", "check_layers", "check_points", "explain_run", "parse_point",
           "plot_attention_grid"]
