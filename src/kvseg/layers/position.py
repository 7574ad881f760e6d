"""Position terms that make query-free attention asymmetric: Borji's KV-pos bias (factored) and
a learned 2D relative-position bias (Swin-style). Both enter the pre-softmax logits.

* :class:`KVPosBias` (``kv_pos``): Borji's ``map_pos = Linear(pos_dim, 1)`` over a fixed 2D
  sinusoidal encoding P(i, j) of the (query index, key index) plane. It separates into a learned
  temperature on the logits and a per-key bias g(j) (docs/models.md); only those are computed.
* :class:`RelPosBias` (``kv_relpos``): a learned table per head over the 2D token offsets,
  B_h[Δrow, Δcol], (2h − 1)(2w − 1) values per head for an h × w grid; B(Δ) ≠ B(−Δ) in general,
  so the logits become pairwise asymmetric while the projections stay query-free.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kvseg.errors import ConfigError


def sinusoidal_2d(num_rows: int, num_cols: int, pos_dim: int, *, device=None,
                  dtype=torch.float32) -> torch.Tensor:
    """The fixed 2D sinusoidal encoding P of a (row, col) plane: (num_rows, num_cols, pos_dim).

    Follows ``positional_encodings.torch_encodings.PositionalEncoding2D`` (the encoding Borji's
    KV-pos uses): ``c = 2·ceil(pos_dim / 4)`` channels encode the row index as interleaved
    (sin, cos) pairs with inverse frequencies ``10000^(-2k/c)``, the next channels encode the
    column index the same way, and the result is truncated to ``pos_dim`` channels (for 50: 26 row
    channels, 24 column channels).
    """
    row, col = _axis_encodings(num_rows, num_cols, pos_dim, device=device, dtype=dtype)
    return torch.cat((row[:, None, :].expand(-1, num_cols, -1),
                      col[None, :, :].expand(num_rows, -1, -1)), dim=-1)


def _sincos(positions: torch.Tensor, channels: int) -> torch.Tensor:
    """(n,) positions -> (n, channels) interleaved sin/cos features (channels even)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, channels, 2, device=positions.device,
                                             dtype=torch.float32) / channels))
    angles = positions.float()[:, None] * inv_freq[None, :]  # (n, channels/2)
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(1)


def _axis_encodings(num_rows: int, num_cols: int, pos_dim: int, *, device=None,
                    dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The row part (num_rows, n_row) and the column part (num_cols, n_col) of P.

    ``n_row + n_col == pos_dim``; P(i, j) = concat(row[i], col[j]).
    """
    channels = 2 * math.ceil(pos_dim / 4)
    n_row = min(channels, pos_dim)
    n_col = pos_dim - n_row
    row = _sincos(torch.arange(num_rows, device=device), channels)[:, :n_row]
    col = _sincos(torch.arange(num_cols, device=device), channels)[:, :n_col]
    return row.to(dtype), col.to(dtype)


class KVPosBias(nn.Module):
    """Borji's ``map_pos = Linear(pos_dim, 1)`` in its factored form.

    ``forward(num_keys)`` returns ``(temperature, key_bias)``: the scalar Σw that multiplies the
    logits and the (num_keys,) bias g(j) + b, g(j) = w_col · P_col(j), added to every query row.
    The query part f(i) cancels in the softmax and is not computed. b cancels too; it is kept in
    the bias (one add) so that it stays a used parameter (DDP-safe) whose gradient is zero, as in
    Borji's naive layer; parameter count and checkpoints match the naive form.

    MACs: ``num_keys · n_col`` per forward (the per-key bias), reported by :meth:`macs`.
    """

    def __init__(self, pos_dim: int = 50) -> None:
        super().__init__()
        if pos_dim < 2:
            raise ConfigError(f"pos_dim={pos_dim}: KV-pos needs at least 2 channels")
        self.pos_dim = pos_dim
        # PyTorch's default Linear init, as in Borji's ViT_pos.py.
        self.map_pos = nn.Linear(pos_dim, 1)
        self.map_pos._kvseg_keep_init = True
        # P_col for each key count seen: fixed sinusoids, so cached (not state, not saved).
        self._col_cache: dict[tuple, torch.Tensor] = {}

    @property
    def num_col_channels(self) -> int:
        return self.pos_dim - min(2 * math.ceil(self.pos_dim / 4), self.pos_dim)

    @staticmethod
    def kv_start(pos_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``map_pos`` weight (1, pos_dim) and bias (1,) under which the layer is plain KV:
        temperature Σw = 1 (the row channels share it equally) and no per-key bias (column
        channels and b zero, so g(j) + b = 0). What a layer converted from a QKV file starts
        from, so that a converted KV-pos model starts as the converted KV model."""
        n_row = min(2 * math.ceil(pos_dim / 4), pos_dim)
        weight = torch.zeros(1, pos_dim)
        weight[0, :n_row] = 1.0 / n_row
        return weight, torch.zeros(1)

    def forward(self, num_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.map_pos.weight[0]  # (pos_dim,)
        key = (num_keys, w.device, w.dtype)
        col = self._col_cache.get(key)
        # an encoding made under torch.inference_mode() (model.predict) is an inference tensor,
        # which autograd refuses to save for backward: make it again for training
        if col is None or (col.is_inference() and not torch.is_inference_mode_enabled()):
            _, col = _axis_encodings(1, num_keys, self.pos_dim, device=w.device, dtype=w.dtype)
            self._col_cache = {key: col}  # one entry: the current input size
        n_row = self.pos_dim - col.shape[1]
        key_bias = col @ w[n_row:] + self.map_pos.bias  # (num_keys,)
        return w.sum(), key_bias

    def macs(self, args: tuple, output) -> int:
        return int(args[0]) * self.num_col_channels


class RelPosBias(nn.Module):
    """A learned relative-position bias per head over a 2D token grid (Swin's table).

    ``table`` (heads, 2h − 1, 2w − 1) holds B_h[Δrow, Δcol] for the grid (h, w) = ``grid_size``
    the model was built for (offsets −(h − 1)..h − 1 along the rows, likewise the columns).
    ``forward(grid, key_stride=1)`` returns the bias (heads, Nq, Nk) for queries on the
    ``grid`` = (h', w') tokens (row-major) and keys at every ``key_stride``-th row and column of
    that grid (CvT's stride-2 keys; 1 for token attention, keys = queries): entry (i, j) is
    B[row_i − row_j, col_i − col_j] in query-grid units. The bias is gathered from the table by
    indexing (never stored; the index is cached per grid). For another grid the table is first
    resampled bicubically to (2h' − 1, 2w' − 1) with ``align_corners=True``: the zero offset stays
    at the centre and the largest offsets map onto the largest ones, so offsets scale with the
    grid as the bilinearly resized absolute position embedding does (a grid of one row or column
    reads the table's centre line).

    Initialised to zero (BEiT's choice): at initialisation ``kv_relpos`` equals ``kv``. The
    gather and the resampling cost no multiply-accumulates (not counted by ``count_macs``).
    """

    def __init__(self, num_heads: int, grid_size: tuple[int, int]) -> None:
        super().__init__()
        h, w = (int(s) for s in grid_size)
        if h < 1 or w < 1:
            raise ConfigError(f"grid_size={tuple(grid_size)}: expected positive sizes")
        self.grid_size = (h, w)
        self.table = nn.Parameter(torch.zeros(num_heads, 2 * h - 1, 2 * w - 1))
        self._index_cache: dict[tuple, torch.Tensor] = {}

    def resized_table(self, h: int, w: int) -> torch.Tensor:
        """The table for an (h, w) grid: (heads, 2h − 1, 2w − 1), resampled if needed."""
        gh, gw = self.grid_size
        table = self.table
        if (h, w) == (gh, gw):
            return table
        if h == 1:  # only the zero row offset exists: the centre row
            table = table[:, gh - 1:gh]
        if w == 1:
            table = table[:, :, gw - 1:gw]
        size = (2 * h - 1, 2 * w - 1)
        if tuple(table.shape[-2:]) != size:
            table = F.interpolate(table[None], size=size, mode="bicubic", align_corners=True)[0]
        return table

    def index(self, h: int, w: int, key_stride: int, device) -> torch.Tensor:
        """(Nq, Nk) long indices into the flattened (2h − 1)(2w − 1) table."""
        key = (h, w, key_stride, device)
        cached = self._index_cache.get(key)
        # an index made under torch.inference_mode() cannot be saved for backward (the gather
        # keeps it): make it again for training, as KVPosBias does with its encoding
        fresh = cached is None or torch.jit.is_tracing() or (
            cached.is_inference() and not torch.is_inference_mode_enabled())
        if not fresh:
            return cached
        rows = torch.arange(h, device=device)
        cols = torch.arange(w, device=device)
        q_rows, q_cols = (t.flatten() for t in torch.meshgrid(rows, cols, indexing="ij"))
        k_rows, k_cols = (t.flatten() for t in torch.meshgrid(rows[::key_stride],
                                                               cols[::key_stride],
                                                               indexing="ij"))
        d_row = q_rows[:, None] - k_rows[None, :] + (h - 1)  # (Nq, Nk), 0..2h − 2
        d_col = q_cols[:, None] - k_cols[None, :] + (w - 1)
        index = d_row * (2 * w - 1) + d_col
        self._index_cache = {key: index}  # one entry: the current input size
        return index

    def forward(self, grid: tuple[int, int], key_stride: int = 1) -> torch.Tensor:
        h, w = grid
        table = self.resized_table(h, w).flatten(1)  # (heads, (2h − 1)(2w − 1))
        return table[:, self.index(h, w, key_stride, table.device)]  # (heads, Nq, Nk)


__all__ = ["KVPosBias", "RelPosBias", "sinusoidal_2d"]
