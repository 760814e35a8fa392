"""DPOptimizer: each p.grad (the clipped sum) becomes (sum + noise) / (q·N) before the wrapped step."""
from __future__ import annotations

import torch
from torch import nn

from dptrain import DPOptimizer
from mechanisms import GaussianMechanism


def _setup(grads: list[torch.Tensor]):
    params = [nn.Parameter(torch.zeros(g.shape, dtype=g.dtype)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g
    opt = DPOptimizer(torch.optim.SGD(params, lr=1.0), params, GaussianMechanism(1.0, 2.0, seed=3), 10.0)
    return params, opt


def test_step_noises_each_grad_in_place_with_the_mechanisms_numbers():
    sums = [torch.randn(5, 3), torch.randn(70_000), torch.randn(4, dtype=torch.float64)]
    want = GaussianMechanism(1.0, 2.0, seed=3).privatize_mean(sums, 0, 10.0)
    grads = [s.clone() for s in sums]
    params, opt = _setup(grads)
    opt.step()
    for p, g, w in zip(params, grads, want):
        assert p.grad is g  # no new buffer
        assert torch.equal(g, w)
        assert torch.equal(p.detach(), -w)  # SGD, lr 1, from zero


def test_a_view_gradient_is_noised_out_of_place_with_the_same_numbers():
    sums = [torch.randn(3, 5).t(), torch.randn(4)]  # a transposed view: not written through
    want = GaussianMechanism(1.0, 2.0, seed=3).privatize_mean([s.contiguous() for s in sums], 0, 10.0)
    before = [s.clone() for s in sums]
    params, opt = _setup(sums)
    opt.step()
    assert torch.equal(sums[0], before[0])  # the view's storage is left alone
    for p, w in zip(params, want):
        assert torch.equal(p.grad, w)


def test_the_unchecked_noise_and_step_is_not_public():
    """DPOptimizer.apply_step() noised and stepped with no budget check and no ledger record (50 calls:
    the model trained, ε spent 0); only step() is public, and in a run it checks and records."""
    import dptrain
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    priv = dptrain.make_private(model, eps=1.0, seed=1)
    data = TensorDataset(torch.randn(100, 4), torch.randint(0, 2, (100,)))
    priv.attach(data, batch_size=10, epochs=1, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    own = {n for n in vars(DPOptimizer) if not n.startswith("_") and callable(getattr(DPOptimizer, n))}
    assert "apply_step" not in own and "step" in own
    priv.backward(*priv.loader.batch(priv.loader.sampler.sample()))
    priv.optimizer.step()
    assert priv.steps == 1
