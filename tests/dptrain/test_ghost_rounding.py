"""Rounding on the book-keeping path: pieces of one example that cancel, float32 overflow, float64 models.

The invariant: an example's contribution to the clipped sum stays within C (remove-one sensitivity),
and the fast path equals the vmap engine, also where float32 loses the example's norm.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dptrain import ClippingConfig, clip_and_sum
from dptrain import ghost_algebra as ga
from dptrain import ghost_rounding as gr_
from dptrain.ghost import ghost_norms

C = 1.0


def _dot_loss(out, y):
    return (out * y).sum()


def _sum(model, x, y, method, chunk=None):
    cb = clip_and_sum(model, _dot_loss, x, y, ClippingConfig(C), chunk_size=chunk, method=method)
    return torch.cat([v.reshape(-1).double() for v in cb.sums.values()])


def _remove_one_change(model, x, y, i=0):
    keep = torch.arange(x.shape[0]) != i
    return float((_sum(model, x, y, "fast") - _sum(model, x[keep], y[keep], "fast")).norm())


def _cancelling_linear():
    """Linear over T = 2 tokens; example 0's two tokens share an input and have output gradients a + e and −a
    (‖a‖ = 1000, ‖e‖ = 0.05): ‖G_0‖ = 100·0.05·2 = 5 (tokens of norm 100·2), float32's Gram trick gives ≈ 0."""
    torch.manual_seed(0)
    b, t, d = 4, 2, 4
    model = nn.Linear(d, d, bias=False)  # T²(o+i) = 32 < T·o·i·2 = 64: the Gram trick
    x, y = torch.randn(b, t, d), torch.randn(b, t, d)
    x[0] = 100.0
    a = torch.full((d,), 500.0)
    e = torch.tensor([0.05, 0.0, 0.0, 0.0])
    y[0, 0], y[0, 1] = a + e, -a
    return model, x, y


def test_gram_trick_cancellation_is_recomputed_and_clipped():
    model, x, y = _cancelling_linear()
    exact = float((x[0].double().T @ y[0].double()).norm())  # ‖Σ_t y_t x_tᵀ‖ of the float32 factors
    assert exact > 4 * C
    assert float(ghost_norms(model, _dot_loss, x, y)["weight"][0]) == pytest.approx(exact, rel=1e-6)
    assert _remove_one_change(model, x, y) <= C * (1 + 1e-6)
    torch.testing.assert_close(_sum(model, x, y, "fast"), _sum(model, x, y, "vmap"), atol=1e-5, rtol=0)


def test_embedding_rows_read_repeatedly_with_cancelling_gradients_stay_within_c():
    torch.manual_seed(0)
    b, t, v, d = 4, 3, 10, 16  # 2 < T ≤ ROWS_GRAM_MAX_T: the masked Gram of the reads
    emb = nn.Embedding(v, d)
    idx, y = torch.randint(0, v, (b, t)), torch.randn(b, t, d)
    idx[0] = 5
    a = torch.full((d,), 2.5e5)
    e = torch.randn(d)
    y[0, 0], y[0, 1], y[0, 2] = a + 3.0 * e / e.norm(), -a, 0.0
    exact = float((y[0].double().sum(0)).norm())
    assert float(ghost_norms(emb, _dot_loss, idx, y)["weight"][0]) == pytest.approx(exact, rel=1e-6)
    assert _remove_one_change(emb, idx, y) <= C * (1 + 1e-6)
    torch.testing.assert_close(_sum(emb, idx, y, "fast"), _sum(emb, idx, y, "vmap"), atol=1e-5, rtol=0)


def test_conv_patch_gram_cancellation_stays_within_c():
    torch.manual_seed(1)
    conv = nn.Conv2d(16, 16, 3, bias=False)  # 4 output positions: the conv is an Outer term on patches
    x, y = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 2, 2)
    x[0] = 3.0
    a, e = torch.full((16,), 100.0), torch.randn(16)
    y[0, :, 0, 0], y[0, :, 0, 1], y[0, :, 1, :] = a + 0.1 * e / e.norm(), -a, 0.0
    assert _remove_one_change(conv, x, y) <= C * (1 + 1e-6)
    torch.testing.assert_close(_sum(conv, x, y, "fast"), _sum(conv, x, y, "vmap"), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_float32_overflow_of_a_formed_gradient_does_not_poison_the_sum(kind):
    """The float32 per-example gradient overflows (inf − inf = NaN) while its float64 norm is finite: the
    example is clipped from float64, and the sum stays finite and within C of the sum without it."""
    torch.manual_seed(0)
    if kind == "linear":
        model = nn.Linear(4, 4)  # T = 8: T·o·i < T²(o+i), the per-example gradient is formed and kept
        x, y = torch.randn(4, 8, 4), torch.randn(4, 8, 4)
        x[0], y[0] = 0.0, 0.0
        x[0, 0] = x[0, 1] = 1e19
        y[0, 0], y[0, 1] = 1e20 * (1 + 2 ** -10), -1e20
    else:
        model = nn.Conv2d(2, 8, 3, padding=1)
        x, y = torch.randn(4, 2, 8, 8), torch.randn(4, 8, 8, 8)
        x[0], y[0] = 1e19, 0.0
        y[0, :, 3, 3], y[0, :, 3, 4] = 1e20 * (1 + 2 ** -10), -1e20
    s = _sum(model, x, y, "fast")
    assert bool(torch.isfinite(s).all())
    assert _remove_one_change(model, x, y) <= C * (1 + 1e-6)


def test_float64_model_is_clipped_in_float64():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    x[0] = 1e50  # finite in float64, beyond float32
    fast, vmap = _sum(model, x, y, "fast"), _sum(model, x, y, "vmap")
    torch.testing.assert_close(fast, vmap, atol=1e-12, rtol=0)
    x[0] = torch.randn(4, dtype=torch.float64)
    torch.testing.assert_close(_sum(model, x, y, "fast"), _sum(model, x, y, "vmap"), atol=1e-13, rtol=0)


def test_gram_bound_covers_the_error_and_leaves_ordinary_tokens_certain():
    """The bound is at least the float32 error (against float64), and for tokens that do not cancel it is
    far below TAU·‖G‖², so ordinary examples are not recomputed."""
    from dptrain.ghost_layers import Outer
    torch.manual_seed(3)
    b, t, o, i = 8, 16, 64, 64  # T·o·i > T²(o+i): the Gram trick
    term = Outer(torch.randn(b, 1, t, o), torch.randn(b, 1, t, i))
    sq, err = ga.sq_norms_bounded([term])
    wide = ga.sq_norms([Outer(term.left.double(), term.right.double())])
    assert bool(((sq - wide).abs() <= gr_.excess(sq, err)).all())
    assert not bool(gr_.uncertain(sq, err, 0.0).any())
    model, x, y = _cancelling_linear()
    from dptrain.ghost_layers import linear_terms
    bad = linear_terms(model, x, y)["weight"]
    sq, err = ga.sq_norms_bounded([bad])
    assert bool(gr_.uncertain(sq, err, C)[0]) and not bool(gr_.uncertain(sq, err, C)[1:].any())


def test_gamma_and_unit():
    assert gr_.unit(torch.float32) == 2.0 ** -24 and gr_.unit(torch.bfloat16) == 2.0 ** -24
    assert gr_.unit(torch.float64) == 2.0 ** -53
    assert gr_.gamma(10, 2.0 ** -24) == pytest.approx(10 * 2.0 ** -24, rel=1e-5)
    assert math.isinf(gr_.gamma(2 ** 24, 2.0 ** -24))


def test_two_terms_of_one_parameter_add_their_norm_errors():
    """A tied weight's Outer and Rows pieces are one gradient: the fused sums' errors add (c_o + c_r), which
    the bound must cover (Cauchy–Schwarz across parameters would give only √(c_o² + c_r²))."""
    from dptrain.ghost_layers import Outer
    from dptrain.ghost_rows import Rows
    torch.manual_seed(0)
    b, t, d, v = 2, 4, 8, 30
    outer = Outer(torch.randn(b, 1, t, v), torch.randn(b, 1, t, d))
    rows = Rows(torch.randint(0, v, (b, t)), torch.randn(b, t, d), v)
    sq, err = ga.sq_norms_bounded([outer, rows])
    _, eo = ga.sq_norms_bounded([outer])
    _, er = ga.sq_norms_bounded([rows])
    c = gr_._gram_pieces(eo)[1].sqrt() + er.norm_err2.sqrt()
    inner = sq * (1 + gr_._REL) + gr_._gram_pieces(err)[0] + err.sq_err
    assert bool((gr_.excess(sq, err) - (inner - sq) >= 2 * c * inner.sqrt() + c * c).all())


def test_the_algebra_runs_in_full_float32_whatever_the_users_matmul_precision(monkeypatch):
    """TF32 / bf16 passes (set_float32_matmul_precision('high'/'medium')) have a 10-bit mantissa, far beyond the
    bound's 2^-24: the norms and sums run at 'highest', and the user's setting comes back afterwards."""
    seen = []
    inner = ga.total_sq_norms

    def spy(*args, **kwargs):
        seen.append(torch.get_float32_matmul_precision())
        return inner(*args, **kwargs)
    monkeypatch.setattr(ga, "total_sq_norms", spy)
    model, x, y = _cancelling_linear()
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        _sum(model, x, y, "fast")
        assert seen == ["highest"] and torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(before)
