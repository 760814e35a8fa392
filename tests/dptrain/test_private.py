"""make_private end to end: calibration, budget enforcement, noise scale, resume, errors."""
from __future__ import annotations


import warnings

import pytest
import torch
from scipy import stats
from torch import nn
from torch.utils.data import TensorDataset

import accountants
import dptrain
from dptrain.demo import accuracy, digits_split, train_private


def _data(n=200, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long())


def _run(steps_first=None, seed=3):
    torch.manual_seed(0)
    model = nn.Linear(5, 2)
    priv = dptrain.make_private(model, eps=2.0, seed=seed)
    priv.attach(_data(), batch_size=20, epochs=2, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    return model, priv


def test_calibrated_run_meets_target_and_report_is_complete():
    model, priv = _run()
    plan = priv.plan
    assert plan.sample_rate == pytest.approx(20 / 200)
    assert plan.delta == pytest.approx(200 ** -1.1)
    assert plan.planned_steps == 20
    assert plan.planned_epsilon <= 2.0
    # σ is the calibrated one: 1 % less noise would pass the target
    assert accountants.epsilon(plan.noise_multiplier * 0.99, plan.sample_rate, 20, plan.delta) > 2.0
    losses = priv.fit()
    assert len(losses) == 20 and priv.steps == 20
    rep = priv.report()
    assert rep.epsilon_spent == pytest.approx(accountants.epsilon(plan.noise_multiplier, 0.1, 20, plan.delta))
    assert rep.epsilon_spent <= 2.0
    assert (rep.steps, rep.accountant, rep.dataset_size, rep.mechanism) == (20, "prv", 200, "dpsgd")
    assert rep.noise_multiplier == plan.noise_multiplier and rep.sample_rate == plan.sample_rate
    assert "ε" in rep.to_text() or "eps" in rep.to_text().lower()


def test_budget_stops_training_before_it_is_exceeded():
    _, priv = _run()
    priv.fit()
    with pytest.raises(dptrain.BudgetExceededError, match="target"):
        for _ in range(1000):
            priv.step(*priv.loader.batch(priv.loader.sampler.sample()))
            assert priv.epsilon_spent() <= 2.0
    assert priv.epsilon_spent() <= 2.0


def test_user_sigma_is_capped_by_target_eps():
    torch.manual_seed(0)
    model = nn.Linear(5, 2)
    priv = dptrain.make_private(model, eps=1.0, noise_multiplier=2.0, seed=0)
    with pytest.warns(UserWarning, match="more than the target"):
        priv.attach(_data(), batch_size=50, epochs=5, lr=0.1)
    with pytest.raises(dptrain.BudgetExceededError):
        priv.fit()
    assert 0.7 < priv.epsilon_spent() <= 1.0 and 5 <= priv.steps < 10


def test_resume_continues_the_same_budget_and_model():
    model_a, a = _run()
    a.fit()
    eps_uninterrupted = a.epsilon_spent()

    model_b, b = _run()
    for _ in range(7):
        b.step(*b.loader.batch(b.loader.sampler.sample()))
    state = b.state_dict()
    assert not any(k.startswith("_module") for k in state["model"])

    model_c, c = _run(seed=99)  # a fresh process: different seed, state restores the streams
    c.load_state_dict(state)
    assert c.steps == 7 and c.epsilon_spent() == pytest.approx(b.epsilon_spent())
    c.fit()
    assert c.steps == 20
    assert c.epsilon_spent() == pytest.approx(eps_uninterrupted)
    torch.testing.assert_close(model_c.weight, model_a.weight)


CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                          reason="needs a CUDA device")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_noise_reaching_the_parameters_has_the_stated_scale(device):
    # A model whose loss does not depend on its parameter: the clipped sum is 0, so the
    # plain-SGD update is exactly -lr * noise / (q N), noise ~ N(0, σ²C²) per coordinate.
    class Constant(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(20_000))

        def forward(self, x):
            return x[:, :2] + 0 * self.w.sum()

    model = Constant().to(device)
    priv = dptrain.make_private(model, eps=None, noise_multiplier=0.8, max_grad_norm=1.5, seed=1)
    priv.attach(_data(), batch_size=40, steps=3, optimizer=torch.optim.SGD(model.parameters(), lr=1.0))
    priv.step(*priv.loader.batch(priv.loader.sampler.sample()))  # CPU batch: moved to the model's device
    assert model.w.device.type == device
    update = -model.w.detach().cpu().double() * (0.2 * 200)
    n = update.numel()
    chi = (n - 1) * float(update.var()) / (0.8 * 1.5) ** 2
    # two-sided chi-square test of the variance, false-failure probability 1e-7
    assert stats.chi2.ppf(0.5e-7, n - 1) < chi < stats.chi2.isf(0.5e-7, n - 1)


def test_stray_optimizer_step_is_refused():
    model, priv = _run()
    opt = priv.optimizer.original_optimizer
    model(torch.randn(3, 5)).sum().backward()
    with pytest.raises(dptrain.PrivacyError, match="non-private"):
        opt.step()


def test_model_is_not_wrapped():
    model, priv = _run()
    assert priv.model is model
    assert set(model.state_dict()) == {"weight", "bias"}


@pytest.mark.parametrize("kwargs,match", [
    ({"eps": 0.0}, "eps"), ({"eps": -1.0}, "eps"), ({"eps": 3.0, "delta": 0.0}, "delta"),
    ({"eps": 3.0, "delta": 1.0}, "delta"), ({"eps": 3.0, "mechanism": "nope"}, "mechanism"),
    ({"eps": None}, "eps"), ({"eps": 3.0, "max_grad_norm": 0.0}, "max_grad_norm"),
])
def test_bad_privacy_parameters(kwargs, match):
    with pytest.raises(dptrain.PrivacyConfigError, match=match):
        dptrain.make_private(nn.Linear(2, 2), **kwargs)


def test_empty_dataset_and_large_delta():
    priv = dptrain.make_private(nn.Linear(5, 2), eps=3.0)
    with pytest.raises(dptrain.PrivacyConfigError, match="empty"):
        priv.attach(TensorDataset(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long)))
    priv = dptrain.make_private(nn.Linear(5, 2), eps=3.0, delta=0.01)
    with pytest.warns(UserWarning, match="1/N"):
        priv.attach(_data(), batch_size=20, epochs=1)


def test_model_that_cannot_give_per_example_gradients_fails_at_attach():
    class MixesExamples(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 2)

        def forward(self, x):
            return self.fc(x) - float(x.mean())  # .item()-style call breaks vmap

    priv = dptrain.make_private(MixesExamples(), eps=3.0)
    with pytest.raises(dptrain.UnsupportedModuleError, match="per-example gradients"):
        priv.attach(_data(), batch_size=20, epochs=1)


def test_model_mixing_examples_is_refused_before_training():
    class CentersBatch(nn.Module):  # subtracts the batch mean: example i's output depends on example j
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 2)

        def forward(self, x):
            h = self.fc(x)
            return h - h.mean(0, keepdim=True)

    priv = dptrain.make_private(CentersBatch(), eps=3.0)
    with pytest.raises(dptrain.UnsupportedModuleError, match="mixes examples"):
        priv.attach(_data(), batch_size=20, epochs=1)


def test_per_layer_clipping_trains_with_the_same_sigma():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    flat = dptrain.make_private(model, eps=2.0, seed=0)
    flat.attach(_data(), batch_size=20, epochs=1, lr=0.1)
    per = dptrain.make_private(model, eps=2.0, clipping="per-layer", seed=0)
    per.attach(_data(), batch_size=20, epochs=1, lr=0.1)
    assert per.plan.noise_multiplier == flat.plan.noise_multiplier
    assert per.mechanism.noise_std == pytest.approx(flat.mechanism.noise_std)  # sensitivity √(Σ C_g²) = C
    per.fit()


def test_empty_batches_still_step_and_count():
    torch.manual_seed(0)
    model = nn.Linear(5, 2)
    priv = dptrain.make_private(model, eps=None, noise_multiplier=1.0, seed=0)
    priv.attach(_data(), batch_size=20, steps=5, lr=0.1)
    before = model.weight.detach().clone()
    priv.loader._record_drawn(0)  # an empty draw (internal: q = 0.1 rarely gives one)
    priv.step(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long))
    assert priv.steps == 1 and not torch.equal(before, model.weight)


@pytest.mark.slow
def test_digits_demo_reaches_90_percent_at_eps_3():
    train, test = digits_split(0)
    model, priv = train_private(train, eps=3.0, epochs=30, seed=0)
    acc = accuracy(model, test)
    assert priv.epsilon_spent() <= 3.0
    assert acc >= 0.90, acc


@pytest.mark.parametrize("accountant", ["pld", "rdp", "gdp"])
def test_every_accountant_calibrates_and_reports(accountant):
    torch.manual_seed(0)
    model = nn.Linear(5, 2)
    priv = dptrain.make_private(model, eps=2.0, accountant=accountant, seed=1)
    priv.attach(_data(), batch_size=20, epochs=1, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    plan = priv.plan
    assert plan.noise_multiplier == pytest.approx(
        accountants.calibrate_noise(2.0, plan.delta, plan.sample_rate, plan.planned_steps, accountant=accountant))
    priv.fit()
    rep = priv.report()
    assert rep.accountant == accountant and rep.steps == plan.planned_steps
    assert rep.epsilon_spent == pytest.approx(
        accountants.epsilon(plan.noise_multiplier, plan.sample_rate, plan.planned_steps, plan.delta, accountant))
    assert rep.epsilon_spent <= 2.0


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_each_example_contribution_is_bounded_on_every_device(device):
    # small σ (σ = 0 is refused) isolates the clipped sum: one example moves the parameters by lr·C/(qN)
    # at most; the noise adds ≈ σ·sqrt(#params)·lr·C/(qN) = 1.1 % of that.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 2)).to(device)
    before = [p.detach().clone() for p in model.parameters()]
    priv = dptrain.make_private(model, eps=None, noise_multiplier=1e-3, max_grad_norm=0.25, seed=0,
                                accountant="rdp")
    priv.attach(_data(), batch_size=40, steps=2, optimizer=torch.optim.SGD(model.parameters(), lr=1.0))
    x, y = _data()[:1]
    priv.loader._record_drawn(1)  # a chosen one-example batch (internal)
    priv.step(x * 100, y)
    moved = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(model.parameters(), before)))
    assert 0.25 / 40 * 0.95 < float(moved) <= 0.25 / 40 * 1.05  # the ×100 input is clipped to C


def test_demo_json_is_strict_when_an_audit_estimate_is_infinite():
    import json
    import math
    from types import SimpleNamespace

    from dptrain.demo import DemoResult

    report = SimpleNamespace(to_dict=lambda: {"epsilon": 2.9})
    audit = SimpleNamespace(to_dict=lambda: {"intervals": {"clopper-pearson": [0.1, math.inf, math.inf]}})
    text = DemoResult(0.9, 0.95, report, 1.0, audit).to_json()
    assert "Infinity" not in text
    assert json.loads(text)["audit"]["intervals"]["clopper-pearson"] == [0.1, None, None]


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2))


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1)


def test_attaching_again_does_not_restart_the_budget():
    """A second attach calibrated σ for a fresh run and skipped every check: ε 1.24 against a target of 1."""
    model = _mlp()
    priv = dptrain.make_private(model, eps=1.0, seed=1)
    priv.attach(_data(), batch_size=20, epochs=2, optimizer=_sgd(model))
    priv.fit()
    priv.attach(_data(), batch_size=20, epochs=4, optimizer=_sgd(model))  # σ for the budget left (≤ 1 %)
    priv.fit()
    assert priv.epsilon_spent() <= 1.0
    history = priv.report().epsilon_history  # from the ledger (both plans), not from the new plan alone
    assert history[-1][0] == priv.steps and history[-1][1] == pytest.approx(priv.epsilon_spent(), rel=1e-9)
    mf_model = _mlp()
    mf = dptrain.make_private(mf_model, eps=3.0, mechanism="banded-mf", seed=1)
    mf.attach(_data(), batch_size=20, epochs=1, optimizer=_sgd(mf_model))
    mf.step(mf.loader.batch(mf.loader.sampler.sample()))
    with pytest.raises(dptrain.PrivacyConfigError, match="cannot restart"):
        mf.attach(_data(), batch_size=20, epochs=1, optimizer=_sgd(mf_model))
    for clipping in ("quantile", "rldp"):  # their noise guard budgets a fresh plan: ε 1.31 / 1.14 against 1.0
        adaptive_model = _mlp()
        adaptive = dptrain.make_private(adaptive_model, eps=1.0, clipping=clipping, seed=3)
        adaptive.attach(_data(), batch_size=20, epochs=1, optimizer=_sgd(adaptive_model))
        adaptive.step(adaptive.loader.batch(adaptive.loader.sampler.sample()))
        with pytest.raises(dptrain.PrivacyConfigError, match="cannot be attached again"):
            adaptive.attach(_data(), batch_size=20, epochs=2, optimizer=_sgd(adaptive_model))


def test_a_checkpoint_of_a_run_with_a_larger_target_cannot_train_past_this_target():
    model = _mlp()
    big = dptrain.make_private(model, eps=8.0, seed=1)
    big.attach(_data(), batch_size=20, epochs=3, optimizer=_sgd(model))
    for _ in range(10):
        big.step(big.loader.batch(big.loader.sampler.sample()))
    assert big.epsilon_spent() > 1.0
    model2 = _mlp()
    small = dptrain.make_private(model2, eps=1.0)
    small.attach(_data(), batch_size=20, epochs=3, optimizer=_sgd(model2))
    before = [p.detach().clone() for p in model2.parameters()]
    with pytest.raises(dptrain.PrivacyConfigError, match="another run"):
        small.load_state_dict(big.state_dict())  # it ran all 30 steps to ε = 7.97
    assert all(torch.equal(a, b) for a, b in zip(before, model2.parameters())) and small.steps == 0


def test_unfreezing_or_freezing_a_layer_after_attach_is_refused():
    """An unfrozen layer was updated with its clipped sum and no noise."""
    model = _mlp()
    model[0].requires_grad_(False)
    priv = dptrain.make_private(model, eps=1.0, seed=1)
    priv.attach(_data(), batch_size=20, epochs=3, optimizer=_sgd(model))
    x, y = priv.loader.batch(priv.loader.sampler.sample())
    priv.step(x, y)
    model[0].requires_grad_(True)
    with pytest.raises(dptrain.PrivacyConfigError, match="trainable parameters changed"):
        priv.step(x, y)
    model[0].requires_grad_(False)
    model[2].bias.requires_grad_(False)
    with pytest.raises(dptrain.PrivacyConfigError, match="trainable parameters changed"):
        priv.step(x, y)


def test_public_optimizer_step_is_checked_and_recorded():
    """priv.backward + priv.optimizer.step() recorded nothing, and stepped any gradient (an unclipped one too)."""
    model = _mlp()
    priv = dptrain.make_private(model, eps=1.0, seed=1)
    priv.attach(_data(), batch_size=20, epochs=1, optimizer=_sgd(model))
    draw = lambda: priv.loader.batch(priv.loader.sampler.sample())  # noqa: E731
    priv.optimizer.zero_grad()
    priv.backward(*draw())
    priv.optimizer.step()
    assert priv.steps == 1 and priv.epsilon_spent() > 0
    with pytest.raises(dptrain.PrivacyError, match="not the clipped sums"):
        priv.optimizer.step()  # no new clipped sums
    priv.optimizer.zero_grad()
    x, y = draw()
    priv.backward(x, y)
    nn.functional.cross_entropy(model(x), y).backward()  # adds an unclipped gradient into .grad
    with pytest.raises(dptrain.PrivacyError, match="not the clipped sums"):
        priv.optimizer.step()
    priv.optimizer.zero_grad()
    priv.backward(*draw())
    with pytest.raises(dptrain.PrivacyError, match="twice"):
        priv.backward(*draw())
    assert priv.steps == 1
    while True:  # the budget holds on this path too
        priv.optimizer.zero_grad()
        priv.backward(*draw())
        try:
            priv.optimizer.step()
        except dptrain.BudgetExceededError:
            break
    assert priv.epsilon_spent() <= 1.0


def test_an_optimizer_can_be_attached_to_a_second_run():
    model = _mlp()
    opt = _sgd(model)
    first = dptrain.make_private(model, eps=1.0, seed=1)
    first.attach(_data(), batch_size=20, epochs=1, optimizer=opt)
    first.fit()
    second = dptrain.make_private(model, eps=1.0, seed=2)
    second.attach(_data(), batch_size=20, epochs=1, optimizer=opt)
    second.fit()  # was: PrivacyError from the first run's guard
    assert second.steps == second.plan.planned_steps


def test_gdp_accountant_warns_that_it_is_an_approximation():
    with pytest.warns(UserWarning, match="not an upper bound"):
        dptrain.make_private(_mlp(), eps=1.0, accountant="gdp")


def test_half_precision_parameters_and_dict_inputs_get_errors_that_name_the_fix():
    """A bf16 model was refused as "mixing examples"; a dict of inputs failed inside vmap on its keys."""
    with pytest.raises(dptrain.PrivacyConfigError, match="autocast"):
        dptrain.make_private(_mlp().bfloat16(), eps=1.0)
    with pytest.raises(TypeError, match="tuple / list of tensors"):
        dptrain.clip_and_sum(_mlp(), nn.CrossEntropyLoss(), {"x": torch.randn(4, 5)}, torch.zeros(4, dtype=torch.long),
                             1.0)


def test_engine_vmap_trains_without_the_fast_path(monkeypatch):
    """For a forward that reorders examples depending on the data (the fast path assumes it does not)."""
    import dptrain.ghost

    class SortByNorm(nn.Module):  # sorts the batch, then restores its order: per example, the same function
        def __init__(self):
            super().__init__()
            self.enc, self.head = nn.Linear(5, 8), nn.Linear(8, 2)

        def forward(self, x):
            order = torch.argsort(x.norm(dim=1))
            return self.head(torch.tanh(self.enc(x[order]))[torch.argsort(order)])

    with pytest.raises(dptrain.PrivacyConfigError, match="unknown engine"):
        dptrain.make_private(SortByNorm(), eps=1.0, engine="ghost")
    calls = []
    real = dptrain.ghost.ghost_clip_and_sum
    monkeypatch.setattr(dptrain.ghost, "ghost_clip_and_sum", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = SortByNorm()
    priv = dptrain.make_private(model, eps=1.0, seed=0, engine="vmap")
    priv.attach(_data(), batch_size=20, epochs=1, optimizer=_sgd(model))
    priv.fit()
    assert priv.steps == priv.plan.planned_steps and not calls


def _resumable(eps=3.0, epochs=2, clip=1.0, **kw):
    torch.manual_seed(0)
    priv = dptrain.make_private(_mlp(), eps=eps, seed=1, max_grad_norm=clip, **kw)
    priv.attach(_data(64), batch_size=16, epochs=epochs, lr=0.1)
    return priv


@pytest.mark.parametrize("saved,loading", [
    (dict(clip=0.1), dict(clip=1.0)),  # the loaded mechanism noised at σ·0.1 while clipping at 1.0
    (dict(eps=8.0, clipping="quantile"), dict(eps=1.0, clipping="quantile")),  # trained on to ε 7.97 (target 1)
    (dict(eps=8.0, clipping="rldp"), dict(eps=1.0, clipping="rldp")),
    (dict(eps=8.0, mechanism="banded-mf"), dict(eps=1.0, mechanism="banded-mf")),
    (dict(clipping="quantile"), dict(clipping="rldp")),  # a bare KeyError after half the state was loaded
    (dict(epochs=4), dict(epochs=1)),  # another plan: another σ (lazy tables kept this run's)
])
def test_a_checkpoint_of_another_run_is_refused_before_anything_is_loaded(saved, loading):
    first = _resumable(**saved)
    for _ in range(3):
        first.step(first.loader.batch(first.loader.sampler.sample()))
    second = _resumable(**loading)
    before = [p.detach().clone() for p in second.model.parameters()]
    with pytest.raises(dptrain.PrivacyConfigError, match="another run"):
        second.load_state_dict(first.state_dict())
    assert second.steps == 0 and all(torch.equal(a, b) for a, b in zip(before, second.model.parameters()))


def test_a_step_needs_an_unused_batch_drawn_by_the_attached_loader():
    """priv.step / priv.backward took any batch (a shuffled DataLoader's, the whole dataset, one chosen
    example) and recorded a Poisson(q) step for it."""
    model = _mlp()
    priv = dptrain.make_private(model, eps=2.0, seed=1)
    loader = priv.attach(_data(), batch_size=20, epochs=2, optimizer=_sgd(model))
    x_all, y_all = _data().tensors
    own = next(iter(torch.utils.data.DataLoader(_data(), batch_size=20, shuffle=True)))
    before = [p.detach().clone() for p in model.parameters()]
    for x, y in (own, (x_all, y_all), (x_all[:1], y_all[:1])):
        with pytest.raises(dptrain.PrivacyError, match="Poisson loader returned by attach"):
            priv.step(x, y)
        with pytest.raises(dptrain.PrivacyError, match="not Poisson-sampled at q"):
            priv.backward(x, y)
    assert priv.steps == 0 and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    for x, y in loader:  # the loader's own batches train, once each
        priv.step(x, y)
    assert priv.steps == len(loader)
    with pytest.raises(dptrain.PrivacyError, match="no unused batch"):
        priv.step(x, y)
    x, y = loader.batch(loader.sampler.sample())  # drawn through the sampler: also one of the loader's batches
    priv.backward(x, y)
    priv.optimizer.step()
    assert priv.steps == len(loader) + 1


def test_attaching_a_dataset_of_another_size_after_steps_cannot_change_delta():
    """Re-attaching to a 20-example Subset recomputed δ = 1/N^1.1 from N=20 and judged the spent ledger
    at that larger δ: 8 more steps were allowed past an exhausted ε = 1 (ε 3.49 at the first δ)."""
    model = _mlp()
    priv = dptrain.make_private(model, eps=1.0, seed=1)
    priv.attach(_data(), batch_size=20, epochs=2, optimizer=_sgd(model))
    priv.fit()
    plan = priv.plan
    small = torch.utils.data.Subset(_data(), list(range(20)))
    with pytest.raises(dptrain.PrivacyConfigError, match="another δ"):
        priv.attach(small, batch_size=2, epochs=1, optimizer=_sgd(model))
    assert priv.plan is plan and priv.report().delta == plan.delta
    priv.attach(_data(), batch_size=40, epochs=1, optimizer=_sgd(model))  # same N: the same δ, allowed
    assert priv.plan.delta == plan.delta
    fixed = dptrain.make_private(_mlp(), eps=1.0, delta=1e-3, seed=1)  # δ fixed by the user: N may change
    fixed.attach(_data(), batch_size=20, epochs=1, optimizer=_sgd(fixed.model))
    fixed.step(fixed.loader.batch(fixed.loader.sampler.sample()))
    fixed.attach(small, batch_size=2, epochs=1, optimizer=_sgd(fixed.model))
    assert fixed.plan.delta == 1e-3


def test_attaching_again_with_a_seed_draws_fresh_noise_and_batches():
    """With seed= set, a re-attach reseeded noise and Poisson sampling from config.seed: step 2 added exactly
    step 1's noise on exactly step 1's batch (two releases with one noise are not two Gaussian steps)."""
    model = nn.Linear(5, 200, bias=False)
    nn.init.zeros_(model.weight)
    priv = dptrain.make_private(model, eps=3.0, seed=1234)
    kw = dict(batch_size=20, epochs=2, loss_fn=lambda out, target: (out * 0).sum())  # the update is the noise
    updates, batches = [], []
    for _ in range(2):  # e.g. a notebook cell run twice
        priv.attach(_data(), optimizer=torch.optim.SGD(model.parameters(), lr=1.0), **kw)
        before = model.weight.detach().clone()
        batches.append(priv.loader.sampler.sample())
        priv.step(priv.loader.batch(batches[-1]))
        updates.append(model.weight.detach() - before)
    corr = torch.corrcoef(torch.stack([u.flatten() for u in updates]))[0, 1]
    assert abs(float(corr)) < 0.2  # independent: |corr| of 1000 pairs < 0.2 w.p. 1 - 2e-10
    assert not torch.equal(batches[0], batches[1])
    # a checkpoint carries the attach count: attaching the resumed run again does not replay attach 2's streams
    again = dptrain.make_private(nn.Linear(5, 200, bias=False), eps=3.0, seed=1234)
    again.attach(_data(), optimizer=torch.optim.SGD(again.model.parameters(), lr=1.0), **kw)
    again.load_state_dict(priv.state_dict())
    assert again._seed() not in (1234, priv.mechanism.seed)  # the seeds of attach 1 and attach 2


class _Centres(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        return self.fc(x - x.mean(0, keepdim=True))  # mixes examples: refused by the probe


def test_a_refused_attach_leaves_the_run_unattached():
    """The probe ran after the plan, optimizer and loader were set: after the UnsupportedModuleError,
    priv.step trained the example-mixing model (one example moved the clipped sum by 12.7 > 2C)."""
    model = _Centres()
    priv = dptrain.make_private(model, eps=3.0, seed=1)
    opt = _sgd(model)
    with pytest.raises(dptrain.UnsupportedModuleError):
        priv.attach(_data(), batch_size=20, epochs=1, optimizer=opt)
    assert (priv.plan, priv.optimizer, priv.loader, priv.mechanism) == (None, None, None, None)
    with pytest.raises(RuntimeError, match="call priv.attach"):
        priv.step(*_data()[:20])
    nn.functional.cross_entropy(model(_data()[:20][0]), _data()[:20][1]).backward()
    opt.step()  # the optimizer is the user's again, not held by a run that does not exist


def test_a_failed_re_attach_keeps_the_previous_attachment_whole():
    """A re-attach refused in the optimizer check kept the new plan (σ 1.54, recorded) with the old
    optimizer (σ 0.69, added): ε 0.38 reported for ε 2.27 spent."""
    model = _mlp()
    priv = dptrain.make_private(model, eps=3.0, seed=1)
    opt = _sgd(model)
    priv.attach(_data(), batch_size=20, epochs=1, optimizer=opt)
    state = dict(vars(priv))
    with pytest.raises(ValueError, match="none of the model's trainable parameters"):
        priv.attach(_data(), batch_size=20, epochs=20, optimizer=_sgd(nn.Linear(3, 3)))
    assert vars(priv) == state  # plan, mechanism, optimizer, loader: the first attach's

    def broken_loss(out, target):
        raise RuntimeError("no loss")

    with pytest.raises(dptrain.UnsupportedModuleError):  # refused by the probe, after opt was wrapped again
        priv.attach(_data(), batch_size=20, epochs=20, optimizer=opt, loss_fn=broken_loss)
    assert vars(priv) == state
    with pytest.raises(dptrain.PrivacyError, match="cannot step on its own"):
        opt.step()  # still guarded, by the first attach's wrapper, which still steps
    priv.step(priv.loader.batch(priv.loader.sampler.sample()))
    assert priv.ledger.entries[0][0].event.noise_multiplier == priv.optimizer.mechanism.noise_multiplier


def test_loading_an_earlier_checkpoint_into_a_run_that_stepped_is_refused():
    """load_state_dict replaced the ledger with the checkpoint's: reloading the step-5 checkpoint after each
    exhausted budget gave 50 noisy releases (ε 4.73) reported as ε 1.64."""
    import copy

    _, priv = _run()
    draw = lambda: priv.loader.batch(priv.loader.sampler.sample())  # noqa: E731
    for _ in range(5):
        priv.step(draw())
    early = copy.deepcopy(priv.state_dict())
    priv.load_state_dict(copy.deepcopy(early))  # its own ledger: nothing to roll back
    for _ in range(3):
        priv.step(draw())
    later = copy.deepcopy(priv.state_dict())
    with pytest.raises(dptrain.PrivacyConfigError, match="new run object"):
        priv.load_state_dict(early)
    assert priv.steps == 8
    priv.load_state_dict(later)  # continues this run's ledger
    _, fresh = _run()
    fresh.load_state_dict(early)  # a new run object resumes any checkpoint of the run
    assert fresh.steps == 5



def test_the_report_after_a_re_attach_states_every_plan_and_mu_of_the_ledger():
    from accountants.backends import gdp_mu_of
    from accountants.composition import flatten

    model = _mlp()
    priv = dptrain.make_private(model, eps=3.0, seed=1)
    priv.attach(_data(), batch_size=20, epochs=10, optimizer=_sgd(model))
    priv.fit(epochs=1)
    first = priv.plan
    priv.attach(_data(), batch_size=100, epochs=2, optimizer=_sgd(model))
    for _ in range(3):
        priv.step(priv.loader.batch(priv.loader.sampler.sample()))
    r = priv.report()
    assert r.segments == [(1, 10, first.noise_multiplier, 0.1), (11, 13, priv.plan.noise_multiplier, 0.5)]
    assert r.gdp_mu == pytest.approx(gdp_mu_of(flatten(priv.ledger.composed())), rel=1e-12)
    assert "mixed" in r.to_text()


@pytest.mark.parametrize("kwargs, attach, match", [
    ({}, {"epochs": float("nan")}, "epochs must be a finite number"),
    ({}, {"epochs": float("inf")}, "epochs must be a finite number"),
    ({}, {"batch_size": float("nan")}, "batch_size must be"),
    ({"eps": None, "noise_multiplier": 1e-9}, {}, "too small to account"),
])
def test_unusable_attach_arguments_are_named(kwargs, attach, match):
    """epochs NaN / inf: ValueError / OverflowError from round(); batch_size NaN: q = 1 silently; σ = 1e-9:
    OverflowError from the accountant's grid."""
    model = _mlp()
    priv = dptrain.make_private(model, **{"eps": 3.0, "seed": 1, **kwargs})
    with pytest.raises(dptrain.PrivacyConfigError, match=match):
        priv.attach(_data(), **{"batch_size": 20, "epochs": 1, "optimizer": _sgd(model), **attach})


def test_a_one_example_dataset_or_an_iterable_dataset_is_refused_with_the_fix():
    """N = 1 gave δ = 1/N^1.1 = 1 and a ValueError deep in the accountant; an IterableDataset a TypeError
    (no len)."""
    model = _mlp()
    priv = dptrain.make_private(model, eps=3.0, seed=1)
    with pytest.raises(dptrain.PrivacyConfigError, match=r"N=1 .*delta="):
        priv.attach(_data(1), batch_size=1, epochs=1, optimizer=_sgd(model))

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(_data())

    with pytest.raises(dptrain.PrivacyConfigError, match="sized, indexable dataset"):
        priv.attach(Stream(), batch_size=10, epochs=1, optimizer=_sgd(model))
    assert priv.plan is None


def test_after_a_re_attach_fit_runs_the_new_plans_own_steps_and_the_report_says_so():
    """fit() subtracted the earlier attach's steps from the new plan (6 taken, a 10-step plan: 4 run) and the
    report read "10 of 10 planned"."""
    model = _mlp()
    priv = dptrain.make_private(model, eps=None, noise_multiplier=1.0, seed=1)
    priv.attach(_data(), batch_size=20, epochs=1, optimizer=_sgd(model))
    for _ in range(6):
        priv.step(priv.loader.batch(priv.loader.sampler.sample()))
    priv.attach(_data(), batch_size=40, epochs=2, optimizer=_sgd(model))
    assert priv.plan.planned_steps == 10 and priv.plan_steps == 0
    assert len(priv.fit()) == 10 and priv.steps == 16 and priv.plan_steps == 10
    assert priv.fit() == []  # the plan is done
    rep = priv.report()
    assert (rep.steps, rep.planned_steps, rep.plan_start) == (16, 10, 6)
    assert "16 in total; 10 of 10 planned since the last attach (at step 6)" in rep.to_text()
    resumed_model = _mlp()
    resumed = dptrain.make_private(resumed_model, eps=None, noise_multiplier=1.0, seed=1)
    resumed.attach(_data(), batch_size=40, epochs=2, optimizer=_sgd(resumed_model))
    state = priv.state_dict()
    resumed.load_state_dict(state)
    assert resumed.plan_steps == 10 and resumed.fit() == []


def test_a_re_attach_calibrates_its_plan_to_the_budget_left():
    """A re-attach calibrated σ for its own steps as if nothing were spent, so its plan could never finish
    within the target; now σ fits the budget left: the plan runs to its end at ε within [0.99, 1]·target."""
    model = _mlp()
    priv = dptrain.make_private(model, eps=2.0, seed=1)
    priv.attach(_data(), batch_size=20, epochs=1, optimizer=_sgd(model))
    for _ in range(6):
        priv.step(priv.loader.batch(priv.loader.sampler.sample()))
    first_sigma = priv.plan.noise_multiplier
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "stops at the budget before the plan ends"
        warnings.filterwarnings("ignore", message=".*weak guarantee")  # N = 200 with the default δ
        priv.attach(_data(), batch_size=40, epochs=2, optimizer=_sgd(model))
    assert priv.plan.noise_multiplier > first_sigma
    assert priv.plan.planned_epsilon == pytest.approx(2.0, rel=0.011) and priv.plan.planned_epsilon <= 2.0
    priv.fit()
    assert priv.plan_steps == priv.plan.planned_steps and priv.steps == 6 + priv.plan.planned_steps
    assert 0.99 * 2.0 <= priv.epsilon_spent() <= 2.0


def test_a_re_attach_with_the_budget_spent_is_refused_and_a_fixed_sigma_warns(monkeypatch):
    model = _mlp()
    priv = dptrain.make_private(model, eps=1.0, seed=1)
    priv.attach(_data(), batch_size=20, epochs=2, optimizer=_sgd(model))
    priv.fit()

    def spent(*args, **kwargs):  # what calibrate_noise_after says when the target is already passed
        raise accountants.UnreachableTargetError("spent")
    monkeypatch.setattr(accountants, "calibrate_noise_after", spent)
    with pytest.raises(dptrain.BudgetExceededError, match="no noise level fits"):
        priv.attach(_data(), batch_size=100, epochs=40, optimizer=_sgd(model))
    assert priv.plan.planned_steps == priv.steps  # the refused attach left the run as it was
    monkeypatch.undo()
    fixed = dptrain.make_private(_mlp(), eps=2.0, noise_multiplier=1.0, seed=1)
    fixed.attach(_data(), batch_size=20, epochs=1, optimizer=_sgd(fixed.model))
    for _ in range(6):
        fixed.step(fixed.loader.batch(fixed.loader.sampler.sample()))
    with pytest.warns(UserWarning, match="stops at the budget before the plan ends"):
        fixed.attach(_data(), batch_size=40, epochs=20, optimizer=_sgd(fixed.model))


def test_converting_the_model_to_16_bit_after_make_private_or_attach_is_refused():
    """model.half() after attach trained silently with fp16 sums (a clipped contribution reached 1.0001·C);
    model.bfloat16() between make_private and attach was refused as "forward mixes examples"."""
    model = _mlp()
    priv = dptrain.make_private(model, eps=3.0, seed=1)
    model.bfloat16()
    with pytest.raises(dptrain.PrivacyConfigError, match=r"attach .*bfloat16.*autocast"):
        priv.attach(_data(), batch_size=20, epochs=1, optimizer=_sgd(model))
    model.float()
    priv.attach(_data(), batch_size=20, epochs=1, optimizer=_sgd(model))
    draw = lambda: priv.loader.batch(priv.loader.sampler.sample())  # noqa: E731
    priv.step(draw())
    model.half()
    with pytest.raises(dptrain.PrivacyConfigError, match=r"step .*float16.*model.float\(\)"):
        priv.step(draw())
    with pytest.raises(dptrain.PrivacyConfigError, match="float16"):
        priv.backward(*draw())
    model.float()
    priv.optimizer.zero_grad()
    priv.backward(*draw())
    model.half()
    with pytest.raises(dptrain.PrivacyConfigError, match="float16"):
        priv.optimizer.step()
    model.double()  # wider is fine
    priv.optimizer.zero_grad()
    x, y = draw()
    priv.step(x.double(), y)
    assert priv.steps == 2


def test_attaching_a_dataloader_names_the_fix():
    """attach(DataLoader) failed with "has no length or no indexing" (a DataLoader has a length)."""
    model = _mlp()
    priv = dptrain.make_private(model, eps=3.0, seed=1)
    loader = torch.utils.data.DataLoader(_data(), batch_size=20, shuffle=True)
    with pytest.raises(dptrain.PrivacyConfigError, match=r"DataLoader; pass its Dataset .*loader\.dataset"):
        priv.attach(loader, batch_size=20, epochs=1, optimizer=_sgd(model))
    priv.attach(loader.dataset, batch_size=20, epochs=1, optimizer=_sgd(model))
    assert priv.plan.dataset_size == 200


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 2), nn.Linear(2, 2)

    def forward(self, x1, x2):
        return self.a(x1) + self.b(x2)


def test_a_tensor_dataset_of_several_inputs_trains_with_the_last_tensor_as_target():
    """TensorDataset(x1, x2, y) failed with "a batch must be (inputs, targets); got tuple of length 3"."""
    torch.manual_seed(0)
    x1, x2 = torch.randn(200, 3), torch.randn(200, 2)
    data = TensorDataset(x1, x2, (x1[:, 0] > 0).long())
    model = _TwoInputs()
    priv = dptrain.make_private(model, eps=3.0, seed=1)
    loader = priv.attach(data, batch_size=20, epochs=2, optimizer=_sgd(model))
    for (a, b), y in loader:
        priv.step((a, b), y)
    assert priv.steps == 10
    batch = priv.loader.batch(priv.loader.sampler.sample())  # the whole batch, as one argument
    priv.step(batch)
    assert priv.steps == 11
    w = model.a.weight.detach().clone()
    assert len(priv.fit()) == 9 and not torch.equal(w, model.a.weight)


def test_a_scheduler_on_the_private_optimizer_sees_its_steps_and_user_clipping_is_named():
    """A scheduler built on priv.optimizer warned "lr_scheduler.step() before optimizer.step()" although
    priv.step had stepped; clip_grad_norm_ between priv.backward and the step was blamed on loss.backward()."""
    import warnings

    model = _mlp()
    priv = dptrain.make_private(model, eps=3.0, seed=1)
    loader = priv.attach(_data(), batch_size=20, epochs=2, optimizer=_sgd(model))
    scheduler = torch.optim.lr_scheduler.StepLR(priv.optimizer, 1, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            for x, y in loader:
                priv.step(x, y)
            scheduler.step()
    assert priv.optimizer.param_groups[0]["lr"] == pytest.approx(0.025)
    with pytest.raises(dptrain.PrivacyError, match="optimizer is attached"):  # the guards still hold
        nn.functional.cross_entropy(model(x), y).backward()
        priv.optimizer.original_optimizer.step()
    priv.optimizer.zero_grad()
    priv.backward(*priv.loader.batch(priv.loader.sampler.sample()))
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    with pytest.raises(dptrain.PrivacyError, match=r"clip_grad_norm_.*untouched.*already clips"):
        priv.optimizer.step()


@pytest.mark.parametrize("mechanism", ["dpsgd", "lazy"])
def test_a_checkpoint_of_a_re_attached_plan_resumes_at_its_sigma(mechanism):
    """A plan attached after steps has σ calibrated to the budget left; resuming it (make_private and attach
    with the same arguments, then load_state_dict) re-derives that σ from the checkpoint's ledger and noises at
    it, and the run ends at the same ε as without the interruption."""
    def run():
        if mechanism == "lazy":
            model = nn.Sequential(nn.Embedding(30, 4), nn.Flatten(), nn.Linear(12, 3))
            data = TensorDataset(torch.randint(0, 30, (200, 3)), torch.randint(0, 3, (200,)))
        else:
            model, data = _mlp(), _data()
        return dptrain.make_private(model, eps=2.0, mechanism=mechanism, seed=5), data

    priv, data = run()
    priv.attach(data, batch_size=20, epochs=1, lr=0.1)
    for _ in range(3):
        priv.step(priv.loader.batch(priv.loader.sampler.sample()))
    priv.attach(data, batch_size=40, epochs=1, lr=0.1)
    sigma = priv.plan.noise_multiplier
    priv.step(priv.loader.batch(priv.loader.sampler.sample()))
    state = priv.state_dict()
    priv.fit()
    resumed, data = run()
    resumed.attach(data, batch_size=40, epochs=1, lr=0.1)
    assert resumed.plan.noise_multiplier != sigma  # a fresh attach cannot know the budget spent
    resumed.load_state_dict(state)
    assert resumed.plan.noise_multiplier == sigma and resumed.mechanism.noise_multiplier == sigma
    if mechanism == "lazy":
        assert all(t.noise_std == resumed.mechanism.noise_std for t in resumed.tables.noise.values())
    resumed.fit()
    assert resumed.steps == priv.steps and resumed.epsilon_spent() == pytest.approx(priv.epsilon_spent(), rel=1e-12)
    assert resumed.epsilon_spent() <= 2.0


class _FrozenBf16(nn.Module):
    """A frozen bf16 layer (and bf16 buffer) in front of a trainable float32 head; optionally mixing examples."""

    def __init__(self, mix: bool = False) -> None:
        super().__init__()
        self.head, self.mix = nn.Linear(4, 3), mix
        self.frozen = nn.Linear(4, 4).to(torch.bfloat16).requires_grad_(False)
        self.register_buffer("scale", torch.ones(4, dtype=torch.bfloat16))

    def forward(self, x):
        h = (self.frozen(x.bfloat16()) * self.scale).float()
        return self.head(h - h.mean(0) if self.mix else h)


@pytest.mark.parametrize("engine", ["auto", "vmap"])
def test_a_frozen_bf16_layer_is_not_taken_for_mixing_but_mixing_still_is(engine):
    """bf16 rounds a batched product differently from one example's (≈ an ulp of bf16): the probe refused such
    models as "mixing examples"; its tolerance now follows the narrowest dtype, and real mixing is still refused."""
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(100, 4), torch.randint(0, 3, (100,)))
    priv = dptrain.make_private(_FrozenBf16(), eps=3.0, seed=1, engine=engine)
    priv.attach(data, batch_size=10, epochs=1, lr=0.1)
    priv.step(priv.loader.batch(priv.loader.sampler.sample()))
    mixing = dptrain.make_private(_FrozenBf16(mix=True), eps=3.0, seed=1, engine=engine)
    with pytest.raises(dptrain.UnsupportedModuleError, match="mixes examples"):
        mixing.attach(data, batch_size=10, epochs=1, lr=0.1)


def _small_run(n, delta=None, batch_size=16):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 2))
    data = TensorDataset(torch.randn(n, 4), torch.randint(0, 2, (n,)))
    priv = dptrain.make_private(model, eps=3.0, delta=delta, seed=0)
    priv.attach(data, batch_size=batch_size, epochs=1, lr=0.1)
    return priv


def test_a_weak_default_delta_for_a_small_dataset_is_warned_about_and_reported():
    """With N = 100 the default 1/N^1.1 is 6.3e-3: federated and DIFF2 runs warned about it, make_private did not."""
    with pytest.warns(UserWarning, match="weak guarantee"):
        priv = _small_run(100)
    priv.step(*priv.loader.batch(priv.loader.sampler.sample()))
    assert any("weak guarantee" in w for w in priv.report().warnings)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = _small_run(100, delta=1e-5)  # an explicit δ, or enough data, is not warned about
        _small_run(1000)
    quiet.step(*quiet.loader.batch(quiet.loader.sampler.sample()))
    assert not any("weak guarantee" in w for w in quiet.report().warnings)


def test_a_batch_size_above_the_dataset_size_is_warned_about():
    with pytest.warns(UserWarning, match="capped at q = 1"):
        priv = _small_run(1000, batch_size=2000)
    assert priv.plan.sample_rate == 1.0


def test_data_that_does_not_fit_the_model_is_named_as_the_likely_cause():
    """A dtype mismatch between data and model was reported with advice about BatchNorm and mixing only."""
    model = nn.Sequential(nn.Linear(4, 2))
    data = TensorDataset(torch.randn(1000, 4, dtype=torch.float64), torch.randint(0, 2, (1000,)))
    priv = dptrain.make_private(model, eps=3.0, seed=0)
    with pytest.raises(dptrain.UnsupportedModuleError, match="the data does not fit the model"):
        priv.attach(data, batch_size=16, epochs=1, lr=0.1)


def test_make_private_of_something_that_is_not_a_module_is_a_clear_error():
    with pytest.raises(dptrain.PrivacyConfigError, match="model must be a torch.nn.Module, got str"):
        dptrain.make_private("model", eps=3.0)
