"""Pretrained QKV attention weights into the query-free modes (KV, KV-pos): three rules.

No official checkpoint has KV attention: W_q has no slot. Per head h, with the Linear weights
W_q, W_k (head_dim × D) and biases b_q, b_k of that head, QKV's pre-softmax logits are a
bilinear form of the augmented tokens x̃ = [x, 1]:

    L_ij = q_i · k_j = x̃_i M x̃_jᵀ,   M = Ã_qᵀ Ã_k,   Ã = [W | b]  (head_dim × (D + 1)).

A KV layer has one projection Ã (the keys are the queries): L'_ij = x̃_i Ãᵀ Ã x̃_jᵀ, a
symmetric positive semi-definite form of rank ≤ head_dim. The rules choose Ã:

* ``key``: Ã = Ã_k (W_q and b_q dropped).
* ``mean``: Ã = (Ã_q + Ã_k) / 2.
* ``sym`` (default): the best such form in the Frobenius norm. Only the symmetric part
  S = (M + Mᵀ)/2 can be represented (the antisymmetric part (M − Mᵀ)/2 is orthogonal to every
  symmetric matrix); the nearest PSD matrix of rank ≤ head_dim to S keeps its largest positive
  eigenvalues λ_1..λ_r (r ≤ head_dim) with eigenvectors u_1..u_r, so Ã = diag(√λ) [u_1..u_r]ᵀ
  and Ãᵀ Ã ≈ S, exactly when S is PSD of rank ≤ head_dim (e.g. when Ã_q = P A, Ã_k = P⁻ᵀ A).
  S has rank ≤ 2·head_dim and lives in the row space of [Ã_q; Ã_k], so the eigenproblem is
  solved there (2·head_dim wide, not D + 1).

The scale 1/sqrt(head_dim) (or CvT's 1/sqrt(dim)) is the same in both modes and untouched.

How much of the logit form a rule keeps: :func:`logit_error` is the relative Frobenius error
‖L' − L‖ / ‖L‖ of the converted logits against the QKV logits on sample tokens, summed over the
heads; :func:`asymmetry` is ‖(L − Lᵀ)/2‖ / ‖L‖, the error no KV layer can go below on those
tokens (how asymmetric the pretrained attention is).
"""

from __future__ import annotations

import torch

RULES = ("key", "mean", "sym")
DEFAULT_RULE = "sym"


def _augmented(w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """(out, D) weight and (out,) bias -> (out, D + 1) float64 [W | b] (zero bias if None)."""
    b = torch.zeros(w.shape[0], dtype=w.dtype) if b is None else b
    return torch.cat([w, b[:, None]], dim=1).double()


def sym_factor(a_q: torch.Tensor, a_k: torch.Tensor) -> torch.Tensor:
    """One head: Ã (d × E) whose Ãᵀ Ã is the nearest PSD rank-≤d matrix to sym(Ã_qᵀ Ã_k)."""
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


def convert_qk(wq: torch.Tensor, bq: torch.Tensor | None, wk: torch.Tensor,
               bk: torch.Tensor | None, num_heads: int,
               rule: str = DEFAULT_RULE) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The KV key projection from a QKV layer's query and key projections.

    Args:
        wq: query weight (heads·head_dim, D), head-major rows (as a Linear).
        bq: query bias (heads·head_dim,) or None.
        wk: key weight, same shape.
        bk: key bias or None (then the result has no bias either, unless ``rule="sym"``
            needs one; it is returned when any input bias exists).
        num_heads: heads.
        rule: ``"key"``, ``"mean"`` or ``"sym"`` (see the module docstring).

    Returns ``(weight, bias)`` in ``wk``'s dtype; bias None when neither input has one.
    """
    if rule not in RULES:
        raise ValueError(f"rule={rule!r}: expected one of {', '.join(RULES)}")
    has_bias = bq is not None or bk is not None
    if rule == "key":
        return wk.clone(), (bk.clone() if bk is not None else None)
    if rule == "mean":
        w = (wq + wk) / 2
        if not has_bias:
            return w, None
        zero = torch.zeros(wk.shape[0], dtype=wk.dtype)
        return w, ((bq if bq is not None else zero) + (bk if bk is not None else zero)) / 2
    a_q, a_k = _augmented(wq, bq), _augmented(wk, bk)
    hd = wq.shape[0] // num_heads
    heads = [sym_factor(a_q[h * hd:(h + 1) * hd], a_k[h * hd:(h + 1) * hd])
             for h in range(num_heads)]
    a = torch.cat(heads).to(wk.dtype)  # (heads·head_dim, D + 1)
    return a[:, :-1].contiguous(), (a[:, -1].contiguous() if has_bias else None)


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


def logit_error(x: torch.Tensor, wq: torch.Tensor, bq: torch.Tensor | None, wk: torch.Tensor,
                bk: torch.Tensor | None, wk_new: torch.Tensor, bk_new: torch.Tensor | None,
                num_heads: int) -> float:
    """‖K'K'ᵀ − QKᵀ‖_F / ‖QKᵀ‖_F over all heads on tokens ``x`` (n, D): 0 keeps the logits."""
    ref = _logits(x, wq, bq, wk, bk, num_heads)
    new = _logits(x, wk_new, bk_new, wk_new, bk_new, num_heads)
    return float((new - ref).norm() / ref.norm().clamp_min(1e-300))


def asymmetry(x: torch.Tensor, wq: torch.Tensor, bq: torch.Tensor | None, wk: torch.Tensor,
              bk: torch.Tensor | None, num_heads: int) -> float:
    """‖(L − Lᵀ)/2‖_F / ‖L‖_F of the QKV logits L on ``x``: the floor of every KV rule's
    :func:`logit_error` (0: symmetric attention; 1/√2 ≈ 0.71 for unrelated random W_q, W_k)."""
    ref = _logits(x, wq, bq, wk, bk, num_heads)
    return float(((ref - ref.transpose(1, 2)) / 2).norm() / ref.norm().clamp_min(1e-300))


__all__ = ["DEFAULT_RULE", "RULES", "asymmetry", "convert_qk", "logit_error", "sample_tokens",
           "sym_factor"]
