"""Per-example norms of embedding gradients (Rows terms) for every length T, rows repeated within an example."""
from __future__ import annotations

import pytest
import torch

from dptrain import ghost_algebra as ga
from dptrain import ghost_rows as gr


@pytest.mark.parametrize("t", [1, 2, 3, gr.ROWS_GRAM_MAX_T, gr.ROWS_GRAM_MAX_T + 1, 40])
def test_rows_norms_equal_the_explicit_gradients(t):
    g = torch.Generator().manual_seed(t)
    b, v, d = 7, 5, 3  # few rows: most examples read some row more than once
    idx = torch.randint(0, v, (b, t), generator=g)
    idx[0] = 2  # one example reads a single row t times
    right = torch.randn(b, t, d, generator=g)
    right[1, 0] = 0  # a padding entry (zero weight)
    term = gr.Rows(idx, right, v)
    explicit = torch.zeros(b, v, d, dtype=torch.float64).index_put_(
        (torch.arange(b)[:, None].expand(b, t), idx), right.double(), accumulate=True)
    want = explicit.square().sum((1, 2))
    got = ga.sq_norms([term])
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("t", [2, 3])
def test_rows_with_cancelling_duplicates_have_norm_zero_up_to_rounding(t):
    # rows read twice with opposite gradients: the true gradient is 0; float32 rounding of the
    # Gram form may leave a tiny positive value (clips slightly more), never a negative one
    right = torch.randn(4, 1, 6, generator=torch.Generator().manual_seed(0)).repeat(1, t, 1)
    right[:, 1] *= -1
    if t == 3:
        right[:, 2] = 0
    got = ga.sq_norms([gr.Rows(torch.zeros(4, t, dtype=torch.long), right, 3)])
    scale = right.double().square().sum((1, 2))
    assert (got >= 0).all() and (got <= 1e-6 * scale).all()
