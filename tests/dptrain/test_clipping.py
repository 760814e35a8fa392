"""After clipping, every example's contribution has norm <= C (flat) or C_g (per layer)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dptrain import ClippingConfig, clip_and_sum, clip_factors, clipped_sum, per_sample_grads
import dptrain

LOSS = nn.CrossEntropyLoss()


def _contributions(grads, config):
    """Each example's clipped gradient, flattened over all parameters: [B, D]."""
    factors = clip_factors(grads, config)
    flat = [torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0).flatten(1) * factors[k].to(g.dtype)[:, None]
            for k, g in grads.items()]
    return torch.cat(flat, dim=1)


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(0, 9), width=st.integers(1, 7), depth=st.integers(1, 3),
       c=st.floats(1e-3, 10.0), outlier=st.sampled_from([0.0, 1e3, 1e12, 1e30]), seed=st.integers(0, 10_000))
def test_flat_clipping_bounds_each_contribution(batch, width, depth, c, outlier, seed):
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    d = 3
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.Tanh()]
        d = width
    model = nn.Sequential(*layers, nn.Linear(d, 2))
    x = torch.randn(batch, 3)
    if batch and outlier:
        x[0] *= outlier  # huge-gradient outlier
    y = torch.randint(0, 2, (batch,))
    grads = per_sample_grads(model, LOSS, x, y)
    config = ClippingConfig(c)
    contrib = _contributions(grads, config)
    norms = torch.linalg.vector_norm(contrib.double(), dim=1)
    assert bool((norms <= c * (1 + 1e-5)).all()), norms.max()
    total = clipped_sum(grads, config)
    torch.testing.assert_close(torch.cat([v.flatten() for v in total.values()]).double(),
                               contrib.double().sum(0), rtol=1e-4, atol=1e-6)


def test_small_gradients_are_left_unchanged():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x, y = torch.randn(4, 3) * 1e-3, torch.tensor([0, 1, 0, 1])
    grads = per_sample_grads(model, LOSS, x, y)
    total = clipped_sum(grads, ClippingConfig(1e6))
    for k, g in grads.items():
        torch.testing.assert_close(total[k], g.sum(0))


def test_non_finite_gradients_contribute_zero():
    grads = {"w": torch.tensor([[1.0, 2.0], [float("nan"), 1.0], [float("inf"), 0.0]])}
    total = clipped_sum(grads, ClippingConfig(10.0))
    torch.testing.assert_close(total["w"], torch.tensor([1.0, 2.0]))


def test_per_layer_clipping_bounds_each_group_and_total():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    x, y = torch.randn(6, 5) * 100, torch.randint(0, 3, (6,))
    config = ClippingConfig.per_layer(model, 2.0)
    assert math.isclose(config.sensitivity, 2.0)
    grads = per_sample_grads(model, LOSS, x, y)
    factors = clip_factors(grads, config)
    for k, g in grads.items():
        norms = torch.linalg.vector_norm((g * factors[k][:, None, None] if g.dim() == 3
                                          else g * factors[k][:, None]).flatten(1), dim=1)
        assert bool((norms <= config.thresholds[k] * (1 + 1e-5)).all())
    assert bool((torch.linalg.vector_norm(_contributions(grads, config), dim=1) <= 2.0 * (1 + 1e-5)).all())


def test_clip_and_sum_chunks_equal_one_pass():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    x, y = torch.randn(10, 5) * 10, torch.randint(0, 3, (10,))
    a = clip_and_sum(model, LOSS, x, y, 0.5)
    b = clip_and_sum(model, LOSS, x, y, 0.5, chunk_size=3)
    assert a.batch_size == b.batch_size == 10
    for k in a.sums:
        torch.testing.assert_close(a.sums[k], b.sums[k], atol=1e-6, rtol=1e-5)
    empty = clip_and_sum(model, LOSS, x[:0], y[:0], 0.5)
    assert empty.batch_size == 0 and all(float(v.abs().sum()) == 0 for v in empty.sums.values())


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_clip_norm_is_rejected(bad):
    with pytest.raises(ValueError, match="max_grad_norm"):
        ClippingConfig(bad)


def test_bad_chunks_and_mismatched_inputs_are_errors_not_a_wrong_batch():
    """chunk_size=-2 summed example 1 twice and dropped example 3; 6 input rows for 4 targets were cut to 4."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    model, x, y = nn.Linear(3, 2), torch.randn(4, 3), torch.randint(0, 2, (4,))
    for method in ("auto", "vmap", "loop"):
        with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
            clip_and_sum(model, F.cross_entropy, x, y, 1.0, chunk_size=-2, method=method)
        with pytest.raises(ValueError, match="one row per target"):
            clip_and_sum(model, F.cross_entropy, torch.randn(6, 3), y, 1.0, method=method)
    with pytest.raises(dptrain.PrivacyConfigError, match="chunk_size"):
        dptrain.make_private(model, eps=1.0, chunk_size=0)


def test_float64_gradients_beyond_float32_range_are_clipped_not_dropped():
    """The float32 normal-range floor on the factors dropped a float64 example with ‖g‖ = 2e40."""
    import torch.nn.functional as F

    model = nn.Linear(1, 1).double()
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(0.0)
    x, y = torch.tensor([[1e20], [1.0]], dtype=torch.float64), torch.zeros(2, 1, dtype=torch.float64)
    sums = clip_and_sum(model, F.mse_loss, x, y, 1.0, method="vmap").sums
    assert float(sums["weight"]) == pytest.approx(1 + 2 ** -0.5, rel=1e-6)  # example 0 clipped to norm 1


def test_rnn_cells_take_the_loop_engine():
    import torch.nn.functional as F

    from dptrain.engine import choose_method

    class Cell(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell, self.out = nn.GRUCell(5, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.out(self.cell(x))

    assert choose_method(Cell()) == "loop"
    grads = dptrain.per_sample_grads(Cell(), F.cross_entropy, torch.randn(4, 5), torch.randint(0, 3, (4,)))
    assert grads["out.weight"].shape == (4, 3, 6)


def test_loop_engine_works_under_no_grad_like_vmap():
    import torch.nn.functional as F

    torch.manual_seed(0)
    model, x, y = nn.Linear(3, 2), torch.randn(4, 3), torch.randint(0, 2, (4,))
    with torch.no_grad():
        loop = per_sample_grads(model, F.cross_entropy, x, y, method="loop")
        vmap = per_sample_grads(model, F.cross_entropy, x, y, method="vmap")
    for k in vmap:
        torch.testing.assert_close(loop[k], vmap[k])
