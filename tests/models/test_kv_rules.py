"""The QKV -> KV rules: key, mean, and sym (the best KV approximation of the logit form)."""

from __future__ import annotations

import pytest
import torch

from kvseg.layers import Attention
from kvseg.models.kv_rules import (
    RULES,
    asymmetry,
    convert_qk,
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
    assert torch.equal(w, wk) and torch.equal(b, bk)
    w, b = convert_qk(wq, bq, wk, bk, HEADS, "mean")
    torch.testing.assert_close(w, (wq + wk) / 2)
    torch.testing.assert_close(b, (bq + bk) / 2)
    w, b = convert_qk(wq, None, wk, None, HEADS, "sym")
    assert w.shape == wk.shape and w.dtype == wk.dtype and b is None
    w, b = convert_qk(wq, bq, wk, bk, HEADS, "sym")
    assert b.shape == bk.shape
    with pytest.raises(ValueError, match="rule='best'"):
        convert_qk(wq, bq, wk, bk, HEADS, "best")


def test_fidelity_numbers():
    g = torch.Generator().manual_seed(2)
    wq, wk = torch.randn(D, D, generator=g), torch.randn(D, D, generator=g)
    bq, bk = torch.zeros(D), torch.zeros(D)
    x = sample_tokens(torch.ones(D), torch.zeros(D), D)
    floor = asymmetry(x, wq, bq, wk, bk, HEADS)
    assert 0.5 < floor < 0.85  # unrelated random W_q, W_k: about 1/√2
    errors = {r: logit_error(x, wq, bq, wk, bk, *convert_qk(wq, bq, wk, bk, HEADS, r), HEADS)
              for r in RULES}
    assert all(e >= floor - 1e-9 for e in errors.values())  # no KV layer beats the floor
    # W_q = W_k: KV is exact. Zero up to float64 rounding, whose last bits depend on the BLAS
    # code path (1.06e-17 on an AMD EPYC, 0.0 on an Intel Xeon): the floor above is ~0.7.
    assert logit_error(x, wk, bk, wk, bk, wk, bk, HEADS) < 1e-12
    assert asymmetry(x, wk, bk, wk, bk, HEADS) < 1e-12
