"""The attach probe (dptrain/run_probe.py, and the lazy path's in dptrain/lazy.py)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import dptrain
from dptrain.errors import UnsupportedModuleError
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


class _Center(nn.Module):
    """Centres the batch in training mode with a statistic that has no gradient: example i's output depends on
    every example, yet no gradient says so (the eval-mode probe and the fast path's row check both missed it)."""

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                mu = x.mean(0, keepdim=True)
            return x - mu
        return x


class _FunctionalDropout(nn.Module):
    def forward(self, x):
        return nn.functional.dropout(x, 0.5, self.training)


def _mlp(middle):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), middle, nn.Tanh(), nn.Linear(16, 2))


def test_mixing_only_in_training_mode_without_gradient_is_refused_at_attach():
    priv = dptrain.make_private(_mlp(_Center()), eps=3.0, seed=0)
    with pytest.raises(dptrain.UnsupportedModuleError, match="mixes examples within a batch in training mode"):
        priv.attach(_data(), batch_size=20, epochs=1, lr=0.1)


def test_training_mode_mixing_is_refused_when_the_model_is_attached_in_eval_mode():
    """Training calls model.train(): the check runs in the modes it sets."""
    model = _mlp(_Center()).eval()
    with pytest.raises(dptrain.UnsupportedModuleError, match="in training mode"):
        dptrain.make_private(model, eps=3.0, seed=0).attach(_data(), batch_size=20, epochs=1, lr=0.1)
    assert not any(m.training for m in model.modules())


def test_a_layer_kept_in_eval_mode_is_checked_in_eval_mode():
    model = _mlp(_Center())
    model[1].eval()
    priv = dptrain.make_private(model, eps=3.0, seed=0)
    priv.attach(_data(), batch_size=20, epochs=1, lr=0.1)
    priv.step(*priv.loader.batch(priv.loader.sampler.sample()))
    assert model.training and not model[1].training


def test_the_vmap_engine_evaluates_each_example_alone_and_is_not_refused():
    dptrain.make_private(_mlp(_Center()), eps=3.0, seed=0, engine="vmap").attach(_data(), batch_size=20, epochs=1,
                                                                                 lr=0.1)


@pytest.mark.parametrize("middle", [nn.Dropout(0.5), nn.AlphaDropout(0.3), _FunctionalDropout()],
                         ids=["Dropout", "AlphaDropout", "functional"])
def test_dropout_passes_the_training_mode_check(middle):
    model = _mlp(middle)
    rng = torch.get_rng_state()
    priv = dptrain.make_private(model, eps=3.0, seed=0)
    priv.attach(_data(), batch_size=20, epochs=1, lr=0.1)
    assert torch.equal(torch.get_rng_state(), rng)  # the check's seeded forwards leave the global RNG as it was
    priv.step(*priv.loader.batch(priv.loader.sampler.sample()))
    assert all(m.training for m in model.modules())


def test_a_buffer_updated_in_the_checks_forward_is_put_back():
    class Count(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("n", torch.zeros(()))

        def forward(self, x):
            if self.training:
                self.n += 1
            return x

    model = _mlp(Count())
    # a forward that updates a buffer is refused (the step guard: buffers are released un-noised), and the
    # training-mode check's own forwards leave the buffer as it was
    with pytest.raises(UnsupportedModuleError, match="buffer 'n' was updated in place"):
        dptrain.make_private(model, eps=3.0, seed=0, engine="auto").attach(_data(), batch_size=20, epochs=1, lr=0.1)
    assert model[1].n.item() == 0


class _TwoInputs(nn.Module):
    """Token ids and a float weight per example (a forward with several inputs)."""

    def __init__(self, center: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 8)
        self.center = _Center() if center else nn.Identity()
        self.out = nn.Linear(8, 2)

    def forward(self, ids, w):
        return self.out(self.center(self.emb(ids).mean(1) * w[:, None]))


@pytest.mark.parametrize("center", [False, True])
def test_several_inputs_with_token_ids(center):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 30, (50, 6), generator=g)
    data = TensorDataset(ids, torch.rand(50, generator=g), ids[:, 0] % 2)
    priv = dptrain.make_private(_TwoInputs(center), eps=3.0, seed=0)
    if center:
        with pytest.raises(dptrain.UnsupportedModuleError, match="in training mode"):
            priv.attach(data, batch_size=10, epochs=1, lr=0.1)
    else:
        priv.attach(data, batch_size=10, epochs=1, lr=0.1)


class _RecWith(_Rec):
    def __init__(self, middle) -> None:
        super().__init__()
        self.mlp[1] = middle


@pytest.mark.parametrize("middle,refused", [(_Center(), True), (nn.Dropout(0.5), False),
                                            (_FunctionalDropout(), False)], ids=["center", "Dropout", "functional"])
def test_lazy_path_checks_the_training_mode_values(middle, refused):
    torch.manual_seed(0)
    model = _RecWith(middle)
    priv = dptrain.make_private(model, eps=3.0, mechanism="lazy", seed=0, accountant="rdp")
    attach = lambda: priv.attach(_rec_data(), batch_size=10, epochs=1,  # noqa: E731
                                 optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    if refused:
        with pytest.raises(dptrain.UnsupportedModuleError, match="in training mode"):
            attach()
    else:
        attach()
        assert priv.lazy
        priv.step(*priv.loader.batch(priv.loader.sampler.sample()))


class _ReadThenUpdate(nn.Module):
    """A running mean read before it is updated: within a forward no example sees another (not mixing)."""

    def __init__(self, d):
        super().__init__()
        self.register_buffer("mu", torch.zeros(d))

    def forward(self, x):
        out = x - self.mu
        if self.training:
            with torch.no_grad():
                self.mu.mul_(0.9).add_(0.1 * x.mean(0))
        return out


def test_the_two_forwards_of_the_check_start_from_the_same_buffers():
    from dptrain.run_probe import mixes_in_training_mode

    model = _mlp(_ReadThenUpdate(16))
    x, y = _data().tensors
    # the check itself: not mixing (each forward starts from the same running mean), buffers put back
    assert not mixes_in_training_mode(model, nn.CrossEntropyLoss(), x[:4], y[:4], 1e-4)
    assert torch.equal(model[1].mu, torch.zeros(16))
    # attach refuses the model all the same: the running mean is a statistic of the data, released un-noised
    with pytest.raises(UnsupportedModuleError, match="buffer 'mu' was updated in place"):
        dptrain.make_private(model, eps=3.0, seed=0).attach(_data(), batch_size=20, epochs=1, lr=0.1)
    assert torch.equal(model[1].mu, torch.zeros(16))
