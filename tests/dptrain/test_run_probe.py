"""The attach probe (dptrain/run_probe.py, and the lazy path's in dptrain/lazy.py)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import dptrain
from dptrain.lazy import LazyPrivateTraining


def _data(n=200, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long())


class _Rec(nn.Module):
    """A user table and an MLP with dropout: trained with lazy table noise under mechanism='lazy'."""

    def __init__(self) -> None:
        super().__init__()
        self.user = nn.Embedding(30, 4)
        self.mlp = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 2))

    def forward(self, x):
        return self.mlp(self.user(x))


def _rec_data(n=60):
    x = torch.randint(0, 30, (n,), generator=torch.Generator().manual_seed(0))
    return TensorDataset(x, (x % 2).long())


def _modes(model):
    return {name: m.training for name, m in model.named_modules()}


@pytest.mark.parametrize("top", [True, False])
@pytest.mark.parametrize("engine", ["auto", "vmap"])
def test_attach_keeps_every_module_mode(engine, top):
    """attach set every submodule to the top-level mode: a layer kept in eval mode (dropout switched off, a
    normaliser using its stored statistics) came back in train mode, and the other way round."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 2))
    model.train(top)
    model[1].train(not top)
    before = _modes(model)
    dptrain.make_private(model, eps=3.0, seed=0, engine=engine).attach(_data(), batch_size=20, epochs=1, lr=0.1)
    assert _modes(model) == before


@pytest.mark.parametrize("top", [True, False])
def test_lazy_attach_keeps_every_module_mode(top):
    torch.manual_seed(0)
    model = _Rec()
    model.train(top)
    model.mlp[1].train(not top)
    before = _modes(model)
    priv = dptrain.make_private(model, eps=3.0, mechanism="lazy", seed=0, accountant="rdp")
    priv.attach(_rec_data(), batch_size=10, epochs=1, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    assert isinstance(priv, LazyPrivateTraining) and priv.lazy
    assert _modes(model) == before
