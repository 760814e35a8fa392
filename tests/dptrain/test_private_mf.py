"""make_private with correlated-noise (matrix-factorization) mechanisms."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import accountants
import dptrain


def _data(n=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long())


def _run(mechanism, seed=0):
    torch.manual_seed(0)
    model = nn.Linear(5, 2)
    priv = dptrain.make_private(model, eps=2.0, mechanism=mechanism, seed=seed)
    priv.attach(_data(), batch_size=20, epochs=4, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    return model, priv


@pytest.mark.parametrize("mechanism", ["banded-mf", "multi-epoch-mf", "fft-mf"])
def test_mf_run_meets_target_and_refuses_past_the_plan(mechanism):
    model, priv = _run(mechanism)
    assert priv.plan.planned_steps == 24 and priv.plan.planned_epsilon <= 2.0
    priv.fit()
    assert priv.steps == 24
    eps = priv.epsilon_spent()
    assert eps == pytest.approx(priv.plan.planned_epsilon) and eps <= 2.0
    rep = priv.report()
    assert rep.mechanism == mechanism and rep.epsilon_spent == pytest.approx(eps)
    with pytest.raises(dptrain.BudgetExceededError, match="planned"):
        priv.step(*priv.loader.batch(torch.arange(3)))


def test_mf_noise_is_correlated_not_dpsgd():
    _, priv = _run("banded-mf")
    assert priv.mechanism.name == "banded-mf" and not isinstance(priv.mechanism, dptrain.private.GaussianMechanism)


@pytest.mark.parametrize("mechanism", ["banded-mf", "fft-mf"])
def test_mf_resume_mid_stream_equals_uninterrupted(mechanism):
    model_a, a = _run(mechanism)
    a.fit()
    model_b, b = _run(mechanism)
    for _ in range(9):
        b.step(*b.loader.batch(b.loader.sampler.sample()))
    state = b.state_dict()
    model_c, c = _run(mechanism, seed=77)
    c.load_state_dict(state)
    c.fit()
    assert c.steps == 24 and c.epsilon_spent() == pytest.approx(a.epsilon_spent())
    torch.testing.assert_close(model_c.weight, model_a.weight)


def test_mf_ledger_round_trips_through_json():
    import json

    _, priv = _run("banded-mf")
    priv.fit(epochs=1)
    state = json.loads(json.dumps(priv.ledger.state_dict()))
    other = accountants.PrivacyLedger()
    other.load_state_dict(state)
    assert other.epsilon(priv.plan.delta) == pytest.approx(priv.epsilon_spent())


def test_bands_argument():
    torch.manual_seed(0)
    model = nn.Linear(5, 2)
    priv = dptrain.make_private(model, eps=2.0, mechanism="banded-mf", bands=3, seed=0)
    priv.attach(_data(), batch_size=20, epochs=4, lr=0.1)
    assert priv.mechanism.plan.bands == 3 and priv.mechanism.plan.partitions == 3
    with pytest.raises(dptrain.PrivacyConfigError, match="banded-mf"):
        dptrain.make_private(nn.Linear(5, 2), eps=2.0, bands=3)


def _attached(mechanism, data):
    torch.manual_seed(0)
    model = nn.Linear(5, 2)
    priv = dptrain.make_private(model, eps=2.0, mechanism=mechanism, seed=0)
    priv.attach(data, batch_size=20, epochs=4, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    return priv


class _Augmented(torch.utils.data.Dataset):
    """Random noise on the inputs at every read (as data augmentation); the targets are fixed."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        x, y = self.data[i]
        return x + 0.01 * torch.randn_like(x), y


@pytest.mark.parametrize("mechanism", ["banded-mf", "multi-epoch-mf"])
def test_an_mf_checkpoint_resumes_only_on_the_dataset_in_the_same_order(mechanism):
    """A dataset of the same N in another order was accepted: the schedule replays by index, so examples
    moved between partitions and joined more steps than accounted (ε 3.99 reported, 5.79 realised)."""
    priv = _attached(mechanism, _data())
    for _ in range(5):
        priv.step(priv.loader.batch(priv.loader.sampler.sample()))
    state = priv.state_dict()
    x, y = _data().tensors
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(7))
    shuffled = _attached(mechanism, TensorDataset(x[order], y[order]))
    with pytest.raises(dptrain.PrivacyConfigError, match="another order"):
        shuffled.load_state_dict(state)
    assert shuffled.steps == 0
    same = _attached(mechanism, _data())
    same.load_state_dict(state)
    assert same.steps == 5
    augmented = _attached(mechanism, _Augmented(_data()))  # random inputs: checked by the targets alone
    saved = augmented.state_dict()
    assert set(saved["order_fingerprint"]) == {"targets"}
    _attached(mechanism, _Augmented(_data())).load_state_dict(saved)
    with pytest.raises(dptrain.PrivacyConfigError, match="another order"):
        _attached(mechanism, _Augmented(TensorDataset(x[order], y[order]))).load_state_dict(saved)


@pytest.mark.parametrize("mechanism", ["banded-mf", "multi-epoch-mf", "fft-mf"])
def test_an_mf_plan_whose_batches_differ_from_the_requested_size_warns(mechanism):
    """N=100: batch_size=40 silently gave batches of 50 and batch_size=70 full-batch steps."""
    import warnings

    data = TensorDataset(torch.randn(100, 5), torch.zeros(100, dtype=torch.long))
    for batch_size, actual in ((40, 50), (70, 100)):
        model = nn.Linear(5, 2)
        priv = dptrain.make_private(model, eps=8.0, delta=1e-3, mechanism=mechanism, seed=0)
        with pytest.warns(UserWarning, match=f"batches of about {actual} examples, not the {batch_size} requested"):
            priv.attach(data, batch_size=batch_size, epochs=2, lr=0.1)
        priv.loader.sampler.before_draw = None  # internal: read the whole schedule's sizes without stepping
        sizes = [len(priv.loader.sampler.sample()) for _ in range(priv.plan.planned_steps)]
        assert sum(sizes) / len(sizes) == actual
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = nn.Linear(5, 2)
        priv = dptrain.make_private(model, eps=8.0, delta=1e-3, mechanism=mechanism, seed=0)
        priv.attach(data, batch_size=48, epochs=2, lr=0.1)  # 50: within 10 %


@pytest.mark.parametrize("mechanism", ["banded-mf", "multi-epoch-mf"])
def test_an_mf_run_takes_the_schedules_batches_in_order(mechanism):
    """The sensitivity assumes step t trains on the schedule's batch t; drawing a batch ahead of the steps (to
    step on it instead of the one before) would move an example's steps closer than b̂ — refused; a Poisson
    DP-SGD run may skip draws."""
    model = nn.Linear(5, 2)
    priv = dptrain.make_private(model, eps=3.0, mechanism=mechanism, seed=0)
    priv.attach(_data(), batch_size=12, epochs=2, lr=0.1)
    first = priv.loader.sampler.sample()
    with pytest.raises(dptrain.PrivacyError, match="in order"):
        priv.loader.sampler.sample()
    priv.step(priv.loader.batch(first))
    for x, y in priv.loader:  # the loader's own iteration draws one batch per step
        priv.step(x, y)
        break
    assert priv.steps == 2
    plain = dptrain.make_private(nn.Linear(5, 2), eps=3.0, seed=0)
    plain.attach(_data(), batch_size=12, epochs=2, lr=0.1)
    plain.loader.sampler.sample()
    plain.step(plain.loader.batch(plain.loader.sampler.sample()))


def test_an_mf_step_that_fails_or_a_checkpoint_between_draw_and_step_does_not_skip_a_batch(monkeypatch):
    """A step that raised had used up its drawn batch, so the next draw was allowed: step t then trained on
    batch t + 1; a checkpoint saved between a draw and its step resumed one batch ahead."""
    model = nn.Linear(5, 2)
    priv = dptrain.make_private(model, eps=3.0, mechanism="multi-epoch-mf", seed=0)
    priv.attach(_data(), batch_size=12, epochs=2, lr=0.1)
    first = priv.loader.batch(priv.loader.sampler.sample())
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda x: (_ for _ in ()).throw(RuntimeError("out of memory")))
    with pytest.raises(RuntimeError, match="out of memory"):
        priv.step(first)
    monkeypatch.setattr(model, "forward", forward)
    with pytest.raises(dptrain.PrivacyError, match="in order"):
        priv.loader.sampler.sample()  # the failed step's batch is still to be stepped on
    state = priv.state_dict()  # saved between a draw and its step: rewound to the undrawn batch
    assert state["sampler"]["drawn"] == priv.steps == 0
    priv.step(first)
    assert priv.steps == 1
    resumed = dptrain.make_private(nn.Linear(5, 2), eps=3.0, mechanism="multi-epoch-mf", seed=0)
    resumed.attach(_data(), batch_size=12, epochs=2, lr=0.1)
    resumed.load_state_dict(state)
    torch.testing.assert_close(resumed.loader.batch(resumed.loader.sampler.sample())[0], first[0])
    state["sampler"]["drawn"] = 1  # as an older version saved it between the draw and the step
    again = dptrain.make_private(nn.Linear(5, 2), eps=3.0, mechanism="multi-epoch-mf", seed=0)
    again.attach(_data(), batch_size=12, epochs=2, lr=0.1)
    with pytest.raises(dptrain.PrivacyConfigError, match="drawn 1 batches for 0 recorded steps"):
        again.load_state_dict(state)


@pytest.mark.parametrize("mechanism", ["banded-mf", "multi-epoch-mf"])
def test_the_report_of_an_mf_run_gives_the_mu_of_its_ledger(mechanism):
    """The report's μ-GDP treated an MF run as T DP-SGD steps (the ledger has no segments once a no-op is
    recorded): μ overstated by √T (multi-epoch) or √b̂ (banded)."""
    from accountants.backends import gdp_mu_of

    _, priv = _run(mechanism)
    priv.fit()
    rep = priv.report()
    assert rep.gdp_mu == pytest.approx(gdp_mu_of(accountants.flatten(priv.ledger.composed())), rel=1e-12)
