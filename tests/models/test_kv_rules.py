"""The QKV -> KV rules: key, mean, and sym (the best KV approximation of the logit form)."""

from __future__ import annotations

import pytest
import torch

from kvseg.layers import Attention
from kvseg.models.kv_rules import (
    RULES,
    asymmetry,
    convert_qk,
    floor,
    logit_error,
    sample_tokens,
    sym_factor,
)

D, HEADS, HD = 24, 3, 8


def _augmented(w, b):
    return torch.cat([w, b[:, None]], 1).double()


def _sym_psd_pair(seed: int):
    """Per head Ã_q = P A, Ã_k = P⁻ᵀ A: W_q ≠ W_k, yet Ã_qᵀ Ã_k = AᵀA is symmetric PSD."""
    g = torch.Generator().manual_seed(seed)
    wq, bq, wk, bk = [], [], [], []
    for _ in range(HEADS):
        a = torch.randn(HD, D + 1, generator=g, dtype=torch.float64)
        p = torch.randn(HD, HD, generator=g, dtype=torch.float64) + 3 * torch.eye(HD)
        aq, ak = p @ a, torch.linalg.inv(p).T @ a
        wq.append(aq[:, :-1]), bq.append(aq[:, -1]), wk.append(ak[:, :-1]), bk.append(ak[:, -1])
    return torch.cat(wq), torch.cat(bq), torch.cat(wk), torch.cat(bk)


def _logits(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    q, k, _ = attn.project(x)
    return q @ k.transpose(-2, -1)


def test_sym_reproduces_a_symmetric_psd_form_exactly_and_the_layer_with_it():
    wq, bq, wk, bk = _sym_psd_pair(0)
    qkv = Attention(D, HEADS, "qkv").double().eval()
    kv = Attention(D, HEADS, "kv").double().eval()
    with torch.no_grad():
        wv, bv = torch.randn(D, D, dtype=torch.float64), torch.randn(D, dtype=torch.float64)
        qkv.qkv.weight.copy_(torch.cat([wq, wk, wv]))
        qkv.qkv.bias.copy_(torch.cat([bq, bk, bv]))
        kv.proj.load_state_dict(qkv.proj.state_dict())
        wk_new, bk_new = convert_qk(wq, bq, wk, bk, HEADS, "sym")
        kv.kv.weight.copy_(torch.cat([wk_new, wv]))
        kv.kv.bias.copy_(torch.cat([bk_new, bv]))
        x = torch.randn(2, 30, D, dtype=torch.float64)
        ref = _logits(qkv, x)
        sym = (ref + ref.transpose(-2, -1)) / 2
        torch.testing.assert_close(ref, sym, atol=1e-9, rtol=0)  # the form is symmetric here
        torch.testing.assert_close(_logits(kv, x), sym, atol=1e-9, rtol=0)
        torch.testing.assert_close(kv(x), qkv(x), atol=1e-10, rtol=0)  # same attention
        assert not torch.allclose(wk_new, wk)  # ...though W_k itself is not kept
    for rule in ("key", "mean"):  # the other rules lose it
        w, b = convert_qk(wq, bq, wk, bk, HEADS, rule)
        assert logit_error(sample_tokens(None, None, D), wq, bq, wk, bk, w, b, HEADS) > 0.1


@pytest.mark.parametrize("seed", range(4))
def test_sym_is_the_nearest_psd_rank_limited_form(seed):
    """Against a direct eigendecomposition of the full (D+1)² symmetric part; and no other
    rule gets closer to it in the Frobenius norm."""
    g = torch.Generator().manual_seed(seed)
    a_q = torch.randn(HD, D + 1, generator=g, dtype=torch.float64)
    a_k = torch.randn(HD, D + 1, generator=g, dtype=torch.float64) + 0.5 * a_q
    s = (a_q.T @ a_k + a_k.T @ a_q) / 2
    evals, evecs = torch.linalg.eigh(s)
    top = evals.argsort(descending=True)[:HD]
    want = evecs[:, top] @ torch.diag(evals[top].clamp(min=0)) @ evecs[:, top].T
    a = sym_factor(a_q, a_k)
    torch.testing.assert_close(a.T @ a, want, atol=1e-9, rtol=0)
    best = (a.T @ a - s).norm()
    for other in (a_k, (a_q + a_k) / 2, a_q):
        assert best <= (other.T @ other - s).norm() + 1e-9


def test_rules_on_biases_and_shapes():
    g = torch.Generator().manual_seed(1)
    wq, wk = torch.randn(D, D, generator=g), torch.randn(D, D, generator=g)
    bq, bk = torch.randn(D, generator=g), torch.randn(D, generator=g)
    w, b = convert_qk(wq, bq, wk, bk, HEADS, "key")
    # key: W = W_k and the bias b_q, which gives exactly QKV's per-key term b_qᵀ W_k x_j
    assert torch.equal(w, wk)
    torch.testing.assert_close(b, bq, atol=1e-5, rtol=0)
    w, b = convert_qk(wq, bq, wk, bk, HEADS, "mean")
    torch.testing.assert_close(w, (wq + wk) / 2)
    for rule in RULES:  # the bias solves the least-squares normal equations W (Wᵀb − W_kᵀb_q) = 0
        w, b = convert_qk(wq, bq, wk, bk, HEADS, rule)
        for h in range(HEADS):
            r = slice(h * HD, (h + 1) * HD)
            resid = w[r].double().T @ b[r].double() - wk[r].double().T @ bq[r].double()
            assert (w[r].double() @ resid).abs().max() < 1e-4
    w, b = convert_qk(wq, None, wk, None, HEADS, "sym")
    assert w.shape == wk.shape and w.dtype == wk.dtype and b is None
    w, b = convert_qk(wq, None, wk, bk, HEADS, "sym")  # no query bias: no per-key term
    assert torch.equal(b, torch.zeros(D))
    w, b = convert_qk(wq, bq, wk, bk, HEADS, "sym")
    assert b.shape == bk.shape
    with pytest.raises(ValueError, match="rule='best'"):
        convert_qk(wq, bq, wk, bk, HEADS, "best")


def _random_layer(seed: int, related: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    wq, wk = torch.randn(D, D, generator=g), torch.randn(D, D, generator=g)
    wq = related * wk + (1 - related) * wq
    return wq, torch.randn(D, generator=g), wk, torch.randn(D, generator=g)


@pytest.mark.parametrize("seed,related", [(2, 0.0), (3, 0.0), (4, 0.5), (5, 0.9)])
def test_no_rule_beats_the_floor(seed, related):
    wq, bq, wk, bk = _random_layer(seed, related)
    x = sample_tokens(1 + 0.1 * torch.randn(D), 0.3 * torch.randn(D), D, seed=seed)
    floor_ = asymmetry(x, wq, bq, wk, bk, HEADS)
    if related == 0:
        assert 0.5 < floor_ < 0.85  # unrelated random W_q, W_k: about 1/√2
    for rule in RULES:
        err = logit_error(x, wq, bq, wk, bk, *convert_qk(wq, bq, wk, bk, HEADS, rule), HEADS)
        assert err >= floor_ - 1e-9, rule


def test_w_q_equal_w_k_with_a_query_bias_converts_exactly():
    """The per-query constants softmax discards no longer count: W_q = W_k with its own query
    and key biases is the same attention in KV (the key bias takes b_q), for every rule."""
    _, bq, wk, bk = _random_layer(6)
    x = sample_tokens(torch.ones(D), 0.5 * torch.ones(D), D)
    # zero up to float64 rounding, whose last bits depend on the BLAS code path
    assert asymmetry(x, wk, bq, wk, bk, HEADS) < 1e-12
    for rule in RULES:
        w, b = convert_qk(wk.double(), bq.double(), wk.double(), bk.double(), HEADS, rule)
        assert logit_error(x, wk, bq, wk, bk, w, b, HEADS) < 1e-9, rule
    # raw logits would call this layer far off: b_q·b_k, x_i·W_kᵀb_k and b_k's own terms differ
    q, k = x @ wk.double().T + bq.double(), x @ wk.double().T + bk.double()
    kk = x @ w.T + b
    raw = [((kk[:, r] @ kk[:, r].T) - (q[:, r] @ k[:, r].T)).norm() / (q[:, r] @ k[:, r].T).norm()
           for r in (slice(h * HD, (h + 1) * HD) for h in range(HEADS))]
    assert min(raw) > 0.1


def test_the_metrics_against_the_naive_formulas():
    """logit_error: the layers' own logits, centred row by row in a loop; asymmetry: the
    least-squares minimum over every symmetric matrix, solved directly (one head, n = 7)."""
    wq, bq, wk, bk = _random_layer(7)
    qkv = Attention(D, HEADS, "qkv").double().eval()
    kv = Attention(D, HEADS, "kv").double().eval()
    w, b = convert_qk(wq, bq, wk, bk, HEADS, "sym")
    with torch.no_grad():
        qkv.qkv.weight.copy_(torch.cat([wq, wk, torch.zeros(D, D)]))
        qkv.qkv.bias.copy_(torch.cat([bq, bk, torch.zeros(D)]))
        kv.kv.weight.copy_(torch.cat([w, torch.zeros(D, D)]))
        kv.kv.bias.copy_(torch.cat([b, torch.zeros(D)]))
        x = sample_tokens(None, None, D, n=40)
        ref, new = _logits(qkv, x[None])[0], _logits(kv, x[None])[0]  # (heads, n, n)
    num = den = 0.0
    for h in range(HEADS):
        for i in range(40):
            r, n = ref[h, i] - ref[h, i].mean(), new[h, i] - new[h, i].mean()
            num, den = num + float(((n - r) ** 2).sum()), den + float((r ** 2).sum())
    assert logit_error(x, wq, bq, wk, bk, w, b, HEADS) == pytest.approx((num / den) ** 0.5,
                                                                        rel=1e-9)
    # the floor: min over symmetric S of ‖(S − L)C‖ by least squares on S's upper triangle
    n = 7
    L = torch.randn(n, n, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    C = torch.eye(n, dtype=torch.float64) - 1 / n
    iu = torch.triu_indices(n, n)
    cols = []
    for a, c in zip(*iu.tolist(), strict=True):
        e = torch.zeros(n, n, dtype=torch.float64)
        e[a, c] = e[c, a] = 1
        cols.append((e @ C).flatten())
    basis = torch.stack(cols, 1)
    target = (L @ C).flatten()
    sol = torch.linalg.lstsq(basis, target[:, None]).solution
    best = float((basis @ sol - target[:, None]).norm() / target.norm())
    assert floor(L) == pytest.approx(best, rel=1e-9)
    assert floor(L) > 0.3
