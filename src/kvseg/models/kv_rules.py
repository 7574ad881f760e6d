"""Pretrained QKV attention weights into the query-free modes (KV, KV-pos): three rules.

No official checkpoint has KV attention: W_q has no slot. Per head h, with the Linear weights
W_q, W_k (head_dim × D) and biases b_q, b_k of that head, QKV's pre-softmax logits are

    L_ij = q_i · k_j = x_iᵀ W_qᵀ W_k x_j + b_qᵀ W_k x_j + [x_iᵀ W_qᵀ b_k + b_q · b_k].

Softmax over j discards every term constant along a row (the bracket: b_k never matters), so
what a layer computes is the **row-centred** form: a bilinear part B = W_qᵀ W_k and a per-key
vector p = W_kᵀ b_q (the per-key term p · x_j). A KV layer has one projection (W, b), the keys
are the queries: L'_ij = x_iᵀ WᵀW x_j + (Wᵀ b) · x_j + [row constants], a symmetric positive
semi-definite bilinear part of rank ≤ head_dim and a per-key vector Wᵀ b. The rules choose W:

* ``key``: W = W_k. ``mean``: W = (W_q + W_k) / 2.
* ``sym`` (default): the best such bilinear part in the Frobenius norm. Only the symmetric part
  S = (B + Bᵀ)/2 can be represented (the antisymmetric part is orthogonal to every symmetric
  matrix); the nearest PSD matrix of rank ≤ head_dim to S keeps its largest positive eigenvalues
  λ_1..λ_r with eigenvectors u_1..u_r, so W = diag(√λ) [u_1..u_r]ᵀ and WᵀW ≈ S, exactly when S
  is PSD of rank ≤ head_dim (e.g. W_q = P A, W_k = P⁻ᵀ A). S has rank ≤ 2·head_dim and lives in
  the row space of [W_q; W_k], so the eigenproblem is solved there (2·head_dim wide, not D).

and every rule then takes the key bias that reproduces the per-key term as well as W allows:
b = argmin ‖Wᵀ b − W_kᵀ b_q‖ (least squares, per head), which is exact whenever W_kᵀ b_q lies in
the row space of W (always for ``key``, where b = b_q; for W_q = W_k every rule is exact).

The scale 1/sqrt(head_dim) (or CvT's 1/sqrt(dim)) is the same in both modes and untouched.

How much of the layer a rule keeps, on sample tokens: :func:`logit_error` is the relative
Frobenius error ‖(L' − L)C‖ / ‖LC‖ of the row-centred logits (C = I − 11ᵀ/n centres each row;
0: the same attention), summed over the heads; :func:`asymmetry` is ‖(CLC − (CLC)ᵀ)/2‖ / ‖LC‖,
the error no KV layer can go below on those tokens: any symmetric L' gives ‖(L' − L)C‖ ≥
‖antisym(CLC)‖ (in a basis [1/√n, U] the row-centred symmetric matrices are exactly those with a
symmetric UᵀL'U block and a free first row), with equality for some symmetric L'.
"""

from __future__ import annotations

import torch

RULES = ("key", "mean", "sym")
DEFAULT_RULE = "sym"


def sym_factor(a_q: torch.Tensor, a_k: torch.Tensor) -> torch.Tensor:
    """One head: W (d × E) whose Wᵀ W is the nearest PSD rank-≤d matrix to sym(a_qᵀ a_k)."""
    d = a_q.shape[0]
    basis, _ = torch.linalg.qr(torch.cat([a_q, a_k]).T)  # (E, r): r = min(E, 2d) orthonormal
    pq, pk = a_q @ basis, a_k @ basis  # (d, r)
    s_small = (pq.T @ pk + pk.T @ pq) / 2  # S = basis · s_small · basisᵀ exactly
    evals, evecs = torch.linalg.eigh(s_small)  # ascending
    keep = torch.argsort(evals, descending=True)[:d]
    lam = evals[keep].clamp(min=0)
    factor = lam.sqrt()[:, None] * (basis @ evecs[:, keep]).T  # (≤d, E)
    if factor.shape[0] < d:  # fewer eigenvalues than head_dim (tiny D): pad with zero rows
        factor = torch.cat([factor, factor.new_zeros(d - factor.shape[0], factor.shape[1])])
    return factor


def key_bias(w: torch.Tensor, wk: torch.Tensor, bq: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The KV key bias b = argmin ‖Wᵀ b − W_kᵀ b_q‖ per head (minimum-norm least squares):
    the per-key term (Wᵀ b) · x_j closest to QKV's b_qᵀ W_k x_j. float64 (heads·head_dim,)."""
    hd = w.shape[0] // num_heads
    out = []
    for h in range(num_heads):
        rows = slice(h * hd, (h + 1) * hd)
        target = wk[rows].double().T @ bq[rows].double()  # (D,) = W_kᵀ b_q
        out.append(torch.linalg.pinv(w[rows].double().T) @ target)
    return torch.cat(out)


def convert_qk(wq: torch.Tensor, bq: torch.Tensor | None, wk: torch.Tensor,
               bk: torch.Tensor | None, num_heads: int,
               rule: str = DEFAULT_RULE) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The KV key projection from a QKV layer's query and key projections.

    Args:
        wq: query weight (heads·head_dim, D), head-major rows (as a Linear).
        bq: query bias (heads·head_dim,) or None.
        wk: key weight, same shape.
        bk: key bias or None; it never changes QKV's attention (constant along a softmax row)
            and is not used, but it says that the layer has biases.
        num_heads: heads.
        rule: ``"key"``, ``"mean"`` or ``"sym"`` (see the module docstring): chooses W; the
            bias is then :func:`key_bias` for every rule.

    Returns ``(weight, bias)`` in ``wk``'s dtype; bias None when neither input has one.
    """
    if rule not in RULES:
        raise ValueError(f"rule={rule!r}: expected one of {', '.join(RULES)}")
    if rule == "key":
        w = wk.clone()
    elif rule == "mean":
        w = (wq + wk) / 2
    else:
        hd = wq.shape[0] // num_heads
        wq64, wk64 = wq.double(), wk.double()
        w = torch.cat([sym_factor(wq64[h * hd:(h + 1) * hd], wk64[h * hd:(h + 1) * hd])
                       for h in range(num_heads)]).to(wk.dtype)
    if bq is None and bk is None:
        return w.contiguous(), None
    if bq is None:  # no per-key term to reproduce
        return w.contiguous(), torch.zeros(wk.shape[0], dtype=wk.dtype)
    return w.contiguous(), key_bias(w, wk, bq, num_heads).to(wk.dtype)


def sample_tokens(weight: torch.Tensor | None, bias: torch.Tensor | None, dim: int,
                  n: int = 256, seed: int = 0) -> torch.Tensor:
    """(n, dim) float64 sample tokens: standard-normal rows, normalised per row (a LayerNorm
    without affine) and passed through the affine ``weight``/``bias`` of the normalisation
    before the attention (None: identity)."""
    z = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = (z - z.mean(1, keepdim=True)) / z.std(1, unbiased=False, keepdim=True)
    if weight is not None:
        z = z * weight.double()
    if bias is not None:
        z = z + bias.double()
    return z


def _logits(x: torch.Tensor, wa: torch.Tensor, ba: torch.Tensor | None, wb: torch.Tensor,
            bb: torch.Tensor | None, num_heads: int) -> torch.Tensor:
    """(heads, n, n) logits (x Waᵀ + ba)_h (x Wbᵀ + bb)_hᵀ, unscaled, float64."""
    a = x @ wa.double().T + (0 if ba is None else ba.double())
    b = x @ wb.double().T + (0 if bb is None else bb.double())
    n = x.shape[0]
    a = a.view(n, num_heads, -1).transpose(0, 1)
    b = b.view(n, num_heads, -1).transpose(0, 1)
    return a @ b.transpose(1, 2)


def centre_rows(logits: torch.Tensor) -> torch.Tensor:
    """Logits minus their mean along the keys (the last axis): what softmax depends on."""
    return logits - logits.mean(dim=-1, keepdim=True)


def logit_error(x: torch.Tensor, wq: torch.Tensor, bq: torch.Tensor | None, wk: torch.Tensor,
                bk: torch.Tensor | None, wk_new: torch.Tensor, bk_new: torch.Tensor | None,
                num_heads: int) -> float:
    """‖(K'K'ᵀ − QKᵀ)C‖_F / ‖QKᵀC‖_F over all heads on tokens ``x`` (n, D), C centring each
    row (per-query constants, which softmax discards, do not count): 0 keeps the attention."""
    ref = centre_rows(_logits(x, wq, bq, wk, bk, num_heads))
    new = centre_rows(_logits(x, wk_new, bk_new, wk_new, bk_new, num_heads))
    return float((new - ref).norm() / ref.norm().clamp_min(1e-300))


def asymmetry(x: torch.Tensor, wq: torch.Tensor, bq: torch.Tensor | None, wk: torch.Tensor,
              bk: torch.Tensor | None, num_heads: int) -> float:
    """‖antisym(CLC)‖_F / ‖LC‖_F of the QKV logits L on ``x``: the floor of every KV rule's
    :func:`logit_error` (0: symmetric attention up to per-row and per-column constants; about
    1/√2 for unrelated random W_q, W_k)."""
    return floor(_logits(x, wq, bq, wk, bk, num_heads))


def floor(logits: torch.Tensor) -> float:
    """The least row-centred error of any symmetric logit matrix against ``logits`` (..., n, n),
    relative: ‖antisym(CLC)‖_F / ‖LC‖_F (see the module docstring)."""
    both = centre_rows(centre_rows(logits).transpose(-2, -1)).transpose(-2, -1)  # C L C
    anti = (both - both.transpose(-2, -1)) / 2
    return float(anti.norm() / centre_rows(logits).norm().clamp_min(1e-300))


__all__ = ["DEFAULT_RULE", "RULES", "asymmetry", "centre_rows", "convert_qk", "floor", "key_bias",
           "logit_error", "sample_tokens", "sym_factor"]
