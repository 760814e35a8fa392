"""FedSVD re-factorisation: B'A' = BA, A' has orthonormal rows spanning BA's row space."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mechanisms.fedsvd import svd_refactor


@settings(max_examples=30, deadline=None)
@given(out=st.integers(2, 12), inp=st.integers(2, 12), r=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_product_preserved_and_rows_orthonormal(out, inp, r, seed):
    r = min(r, out, inp)
    g = torch.Generator().manual_seed(seed)
    b, a = torch.randn(out, r, generator=g, dtype=torch.float64), torch.randn(r, inp, generator=g, dtype=torch.float64)
    nb, na = svd_refactor(b, a)
    assert nb.shape == b.shape and na.shape == a.shape
    torch.testing.assert_close(nb @ na, b @ a, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(na @ na.T, torch.eye(r, dtype=torch.float64), atol=1e-12, rtol=0)
    # B' = U_r Σ_r: orthogonal columns with norms = singular values of BA, in decreasing order
    s = torch.linalg.svdvals(b @ a)[:r]
    torch.testing.assert_close(torch.linalg.vector_norm(nb, dim=0), s, atol=1e-10, rtol=1e-8)
    gram = nb.T @ nb
    torch.testing.assert_close(gram - torch.diag(torch.diag(gram)), torch.zeros(r, r, dtype=torch.float64),
                               atol=1e-9, rtol=0)


def test_a_is_the_top_right_singular_subspace_and_float32_is_kept():
    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(20, 3, generator=g), torch.randn(3, 30, generator=g)
    nb, na = svd_refactor(b, a)
    assert nb.dtype == na.dtype == torch.float32
    _, _, vh = torch.linalg.svd((b @ a).double())
    proj = vh[:3].T @ vh[:3]  # projector on the top-3 right singular subspace
    torch.testing.assert_close(na.double() @ proj, na.double(), atol=1e-5, rtol=0)
    torch.testing.assert_close(nb @ na, b @ a, atol=1e-4, rtol=1e-4)


def test_zero_b_still_gives_orthonormal_a_and_bad_input_is_refused():
    nb, na = svd_refactor(torch.zeros(5, 2), torch.randn(2, 4))
    assert torch.count_nonzero(nb) == 0
    torch.testing.assert_close(na @ na.T, torch.eye(2), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="rank"):
        svd_refactor(torch.randn(2, 3), torch.randn(3, 5))
    with pytest.raises(ValueError, match="non-finite"):
        svd_refactor(torch.full((4, 2), float("nan")), torch.randn(2, 4))
    with pytest.raises(ValueError, match="out × r"):
        svd_refactor(torch.randn(4, 2), torch.randn(3, 4))
