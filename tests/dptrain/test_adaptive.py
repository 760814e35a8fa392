"""make_private(clipping="quantile" | "rldp"): accounting of varying σ, the budget guard, clipping bounds, state."""
from __future__ import annotations

import math

import pytest
import torch
from scipy import stats
from torch import nn
from torch.utils.data import TensorDataset

import accountants
import dptrain
from dptrain.adaptive import QuantileClipping
from mechanisms.rldp import RLDPSettings


def _data(n=300, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long())


def _run(clipping, eps=2.0, epochs=2, seed=0, accountant="rdp", **kw):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    priv = dptrain.make_private(model, eps=eps, clipping=clipping, seed=seed, accountant=accountant, **kw)
    priv.attach(_data(), batch_size=30, epochs=epochs, optimizer=torch.optim.SGD(model.parameters(), lr=0.5))
    return model, priv


def _random_policy(priv, low, high, seed=0):
    """Adversarial stand-in for the SAC policy: σ requests drawn at random from [low, high]·σ_ref."""
    g = torch.Generator().manual_seed(seed)
    ref = priv.plan.noise_multiplier
    priv.adaptive.controller.requested_noise = lambda: ref * float(low + (high - low) * torch.rand((), generator=g))


def test_varying_sigma_is_accounted_as_the_composition_of_recorded_steps():
    model, priv = _run("rldp")
    _random_policy(priv, 0.6, 1.6)
    priv.fit()
    sigmas = [r["noise_multiplier"] for r in priv.adaptive.history]
    assert len(set(sigmas)) > 2 and len(sigmas) == priv.steps == priv.plan.planned_steps
    one_by_one = accountants.ComposedEvent(tuple(
        accountants.PoissonSampledEvent(priv.plan.sample_rate, accountants.GaussianEvent(s)) for s in sigmas))
    eps = priv.epsilon_spent()
    assert eps == pytest.approx(accountants.epsilon_of_event(one_by_one, priv.plan.delta, "rdp"), rel=1e-9)
    assert eps <= 2.0
    rep = priv.report()
    assert rep.epsilon_spent == eps and sum(b - a + 1 for a, b, _ in rep.noise_schedule) == priv.steps
    assert [s for a, b, s in rep.noise_schedule for _ in range(a, b + 1)] == sigmas
    assert "σ per step" in rep.to_text() and "rldp" in rep.to_text()


def test_adversarial_policy_asking_for_tiny_sigma_cannot_pass_the_budget():
    model, priv = _run("rldp", eps=1.5)
    _random_policy(priv, 0.01, 0.02)  # asks for 1-2 % of the calibrated noise at every step
    priv.fit()
    sigmas = [r["noise_multiplier"] for r in priv.adaptive.history]
    assert min(sigmas) >= priv.plan.noise_multiplier * 0.8  # raised to the floor every time
    assert priv.epsilon_spent() <= 1.5
    # the ledger's ε with one more step at any of the used σ's would now pass the target, or the guard
    # lets a step through only at a σ that still fits
    state = {k: v.detach().clone() for k, v in priv.model.state_dict().items()}
    for _ in range(30):
        try:
            priv.step(*priv.loader.batch(priv.loader.sampler.sample()))
        except dptrain.BudgetExceededError as exc:
            assert "training stops" in str(exc)
            break
        assert priv.epsilon_spent() <= 1.5
        state = {k: v.detach().clone() for k, v in priv.model.state_dict().items()}
    else:
        pytest.fail("the budget guard never stopped the adversarial policy")
    assert all(torch.equal(state[k], v) for k, v in priv.model.state_dict().items())  # refused before running


def test_exhausted_budget_stops_before_the_step():
    model, priv = _run("rldp")
    priv.ledger.record(accountants.PoissonSampledEvent(0.1, accountants.GaussianEvent(0.3)), 100)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(dptrain.BudgetExceededError, match="no noise multiplier"):
        priv.step(*priv.loader.batch(priv.loader.sampler.sample()))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("clipping", ["quantile", "rldp"])
def test_each_example_contribution_is_bounded_by_the_step_thresholds(clipping):
    model, priv = _run(clipping, epochs=1)
    for _ in range(priv.plan.planned_steps - 1):
        priv.step(*priv.loader.batch(priv.loader.sampler.sample()))
    config = priv.adaptive.clipping()  # the thresholds of the next step
    priv.step(*priv.loader.batch(priv.loader.sampler.sample()))
    # the noise was scaled to the same thresholds
    assert priv.optimizer.mechanism.max_grad_norm == pytest.approx(config.sensitivity)
    x, y = _data().tensors
    x = x * 50  # large gradients: every example is clipped
    for i in range(5):
        batch = dptrain.clip_and_sum(model, priv.loss_fn, x[i:i + 1], y[i:i + 1], config)
        if config.thresholds is None:
            norm = math.sqrt(sum(float(v.pow(2).sum()) for v in batch.sums.values()))
            assert norm <= config.max_grad_norm * (1 + 1e-5)
        else:
            for k, v in batch.sums.items():
                assert float(v.norm()) <= config.thresholds[k] * (1 + 1e-5)


def test_quantile_noise_reaching_the_parameters_has_the_stated_scale():
    # Loss independent of the parameter: the update is -lr·noise/(qN) with noise std σ_Δ·C, where
    # σ_Δ = (σ⁻² − (2σ_b)⁻²)^(−1/2) (Andrew et al. Thm 1). Chi-square test, false failure 1e-7.
    class Constant(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(20_000))

        def forward(self, x):
            return x[:, :2] + 0 * self.w.sum()

    model = Constant()
    priv = dptrain.make_private(model, eps=None, noise_multiplier=0.8, max_grad_norm=1.5, seed=1,
                                clipping=QuantileClipping(count_noise_std=0.5))
    priv.attach(_data(), batch_size=30, steps=3, optimizer=torch.optim.SGD(model.parameters(), lr=1.0))
    priv.step(*priv.loader.batch(priv.loader.sampler.sample()))
    sigma_delta = (0.8 ** -2 - (2 * 0.5) ** -2) ** -0.5
    assert priv.adaptive.history[0]["gradient_noise_multiplier"] == pytest.approx(sigma_delta)
    update = -model.w.detach().double() * 30
    n = update.numel()
    chi = (n - 1) * float(update.var()) / (sigma_delta * 1.5) ** 2
    assert stats.chi2.ppf(0.5e-7, n - 1) < chi < stats.chi2.isf(0.5e-7, n - 1)
    assert priv.ledger.entries[0][0] == accountants.PoissonSampledEvent(0.1, accountants.GaussianEvent(0.8))


@pytest.mark.parametrize("clipping", ["quantile", "rldp"])
def test_controller_state_is_in_the_checkpoint(clipping):
    settings = RLDPSettings(interval=2) if clipping == "rldp" else clipping
    model, priv = _run(settings, epochs=1)
    for _ in range(5):
        priv.step(*priv.loader.batch(priv.loader.sampler.sample()))
    state = priv.state_dict()
    model2, priv2 = _run(settings, epochs=1, seed=9)
    priv2.load_state_dict(state)
    assert priv2.adaptive.clipping() == priv.adaptive.clipping()
    assert priv2.steps == 5 and priv2.epsilon_spent() == priv.epsilon_spent()
    batch = priv.loader.batch(priv.loader.sampler.sample())
    priv2.loader.sampler.sample()
    priv.step(*batch), priv2.step(*batch)
    assert priv2.adaptive.clipping() == priv.adaptive.clipping()
    assert priv2.adaptive.history[-1] == priv.adaptive.history[-1]
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


def test_quantile_clip_tracks_the_median_in_training():
    model, priv = _run("quantile", epochs=4, eps=8.0)
    priv.fit()
    fractions = [r["unclipped_fraction"] for r in priv.adaptive.history[-20:]]
    assert 0.2 < sum(fractions) / len(fractions) < 0.8
    assert priv.epsilon_spent() <= 8.0
    assert "quantile" in priv.report().to_text()


def test_bad_adaptive_configurations():
    model = nn.Linear(3, 2)
    with pytest.raises(dptrain.PrivacyConfigError, match="needs a target eps"):
        dptrain.make_private(model, eps=None, noise_multiplier=1.0, clipping="rldp").attach(
            TensorDataset(torch.randn(50, 3), torch.zeros(50, dtype=torch.long)), batch_size=10, epochs=1)
    with pytest.raises(dptrain.PrivacyConfigError, match="mechanism='dpsgd' only"):
        dptrain.make_private(model, eps=3, clipping="quantile", mechanism="fft-mf")
    with pytest.raises(dptrain.PrivacyConfigError, match="leaving nothing for the gradient"):
        dptrain.make_private(model, eps=3, clipping=QuantileClipping(count_noise_std=0.01)).attach(
            TensorDataset(torch.randn(50, 3), torch.zeros(50, dtype=torch.long)), batch_size=10, epochs=1)


@pytest.mark.parametrize("per_layer", [False, True])
def test_unclipped_counts_and_losses_agree_between_engines(per_layer):
    """The raw statistics adaptive clipping noises are the same on the fast path and the vmap engine."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    x, y = _data(n=40).tensors
    x = x * torch.linspace(0.05, 5, 40)[:, None]  # norms spread around the thresholds
    config = (dptrain.ClippingConfig(1.0, {"0.weight": 0.5, "0.bias": 0.2, "2.weight": 0.6, "2.bias": 0.3})
              if per_layer else dptrain.ClippingConfig(0.8))
    fast = dptrain.clip_and_sum(model, nn.CrossEntropyLoss(), x, y, config, method="fast")
    ref = dptrain.clip_and_sum(model, nn.CrossEntropyLoss(), x, y, config, method="vmap", chunk_size=7)
    assert fast.unclipped == ref.unclipped
    assert 0 < min(ref.unclipped.values()) and max(ref.unclipped.values()) < 40
    assert torch.allclose(fast.example_losses, ref.example_losses, atol=1e-6)
    assert fast.example_losses.shape == (40,)


def test_adaptive_clipping_is_not_swapped_for_lazy_noise_on_large_tables():
    from dptrain.lazy import AUTO_MIN_ROWS

    model = nn.Sequential(nn.Embedding(AUTO_MIN_ROWS, 2), nn.Flatten(), nn.Linear(2, 2))
    priv = dptrain.make_private(model, eps=3, clipping="quantile")
    assert type(priv) is dptrain.PrivateTraining
    with pytest.raises(dptrain.PrivacyConfigError, match="mechanism='dpsgd' only"):
        dptrain.make_private(model, eps=3, clipping="rldp", mechanism="lazy")
