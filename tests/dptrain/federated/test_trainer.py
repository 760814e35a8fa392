"""Federated rounds in one process: FedSVD's invariants, events, clipping, budget, resume."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import accountants
import dptrain
from dptrain.federated import make_federated
from dptrain.lora import add_lora, lora_layers

RDP = dict(accountant="rdp")  # fast calibration; the accountant is not what these tests check


def clients(k=4, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in range(k):
        x = torch.randn(n, 6, generator=g)
        y = ((x[:, 0] + 0.5 * c > 0).long() + (x[:, 1] > 0).long())
        out.append(TensorDataset(x, y))
    return out


def lora_model(seed=0, rank=2):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))
    add_lora(model, rank=rank, seed=seed)
    return model


def pairs(model):
    return {name: (m.lora_B.weight.detach().clone(), m.lora_A.weight.detach().clone())
            for name, m in lora_layers(model).items()}


CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                          reason="needs a CUDA device")])


@pytest.mark.parametrize("dp", ["example", "client"])
@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_fedsvd_a_orthonormal_after_every_round_and_product_preserved(device, dp):
    model = lora_model().to(device)  # client data stays on the CPU; batches move to the model's device
    eye = torch.eye(2, device=device)
    fed = make_federated(model, clients(), eps=4.0, algorithm="fedsvd", dp=dp, rounds=4, local_steps=2,
                         batch_size=10, lr=0.5, seed=0, **RDP)
    for name, (_, a) in pairs(model).items():
        torch.testing.assert_close(a @ a.T, eye, atol=1e-5, rtol=0)
    for _ in range(4):
        before = pairs(model)
        result = fed.run_round()
        for name, (b, a) in pairs(model).items():
            assert not lora_layers(model)[name].lora_A.weight.requires_grad  # clients train B only
            assert a.device.type == device
            torch.testing.assert_close(a @ a.T, eye, atol=1e-5, rtol=0)
            b_prev, a_prev = before[name]
            averaged = b_prev + result.mean_update[f"{name}.lora_B.weight"]
            torch.testing.assert_close(b @ a, averaged @ a_prev, atol=1e-5, rtol=1e-4)
            # A is re-set to the top-r right singular subspace of the averaged product (not kept)
            vh = torch.linalg.svd((averaged @ a_prev).double(), full_matrices=False)[2][:2]
            torch.testing.assert_close((a.T @ a).double(), vh.T @ vh, atol=1e-4, rtol=0)
            assert not torch.allclose(a, a_prev, atol=1e-3)
    assert fed.epsilon_spent() <= 4.0


def _client_gd(model, data, steps, lr):
    """Plain full-batch GD on B only, from the given model (the non-private reference)."""
    m = copy.deepcopy(model)
    params = [p for p in m.parameters() if p.requires_grad]
    x, y = data.tensors
    for _ in range(steps):
        grads = torch.autograd.grad(nn.CrossEntropyLoss()(m(x), y), params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= lr * g
    return m


def test_zero_noise_fedsvd_equals_federated_averaging_of_products():
    data = clients(k=3, n=24)
    model = lora_model(seed=1)
    # q = 1 (batch_size >= n), no noise, a clip norm no gradient reaches: local DP-SGD = full-batch GD
    fed = make_federated(model, data, eps=None, algorithm="fedsvd", noise_multiplier=0.0, rounds=3,
                         local_steps=2, batch_size=100, lr=0.3, max_norm=1e6, seed=0)
    for _ in range(3):
        trained = [_client_gd(model, d, 2, 0.3) for d in data]
        expected = {name: sum(lora_layers(t)[name].lora_B.weight @ lora_layers(t)[name].lora_A.weight
                              for t in trained) / len(trained) for name in lora_layers(model)}
        fed.run_round()
        for name, layer in lora_layers(model).items():
            torch.testing.assert_close((layer.lora_B.weight @ layer.lora_A.weight).detach(),
                                       expected[name].detach(), atol=1e-5, rtol=1e-4)
    assert fed.epsilon_spent() == float("inf")  # no noise: no finite guarantee is claimed


def test_ffa_lora_keeps_a_and_dp_lora_trains_both():
    for algorithm, a_moves in (("ffa-lora", False), ("dp-lora", True)):
        model = lora_model()
        a0 = {n: a for n, (_, a) in pairs(model).items()}
        fed = make_federated(model, clients(), eps=None, algorithm=algorithm, dp="none", rounds=2,
                             local_steps=2, lr=0.5, seed=0)
        fed.fit()
        for name, (b, a) in pairs(model).items():
            assert torch.count_nonzero(b) > 0
            assert (not torch.equal(a, a0[name])) == a_moves, (algorithm, name)


def test_example_level_events_match_local_noise_and_clipping():
    data = clients(k=3, n=40)
    fed = make_federated(lora_model(), data, eps=2.0, algorithm="fedsvd", dp="example", rounds=3,
                         local_steps=2, batch_size=8, max_norm=0.7, seed=0, **RDP)
    fed.fit()
    assert fed.delta == pytest.approx(120 ** -1.1)  # default 1/N^1.1 over all clients' examples
    for c in fed.clients.values():
        sigma, q = c.mechanism.noise_multiplier, 8 / 40
        assert c.mechanism.max_grad_norm == 0.7 and c.mechanism.noise_std == pytest.approx(sigma * 0.7)
        event = accountants.SelfComposedEvent(accountants.PoissonSampledEvent(q, accountants.GaussianEvent(sigma)), 6)
        assert c.ledger.composed() == event
        eps = accountants.epsilon(sigma, q, 6, fed.delta, accountant="rdp")
        assert eps <= 2.0 < accountants.epsilon(0.99 * sigma, q, 6, fed.delta, accountant="rdp")
    report = fed.report()
    assert report.epsilon_spent == pytest.approx(eps) and report.dp == "example" and report.rounds == 3


def test_client_level_event_and_noise_once_per_round():
    fed = make_federated(lora_model(), clients(k=8, n=20), eps=3.0, algorithm="ffa-lora", dp="client",
                         client_rate=0.5, rounds=3, local_steps=1, max_norm=0.3, delta=1e-3, seed=0, **RDP)
    fed.fit()
    sigma = fed.server_mechanism.noise_multiplier
    assert fed.server_mechanism.noise_std == pytest.approx(sigma * 0.3)
    event = accountants.SelfComposedEvent(accountants.PoissonSampledEvent(0.5, accountants.GaussianEvent(sigma)), 3)
    assert fed.server_ledger.composed() == event
    assert all(c.ledger.steps == 0 for c in fed.clients.values())  # clients add no noise of their own
    assert fed.epsilon_spent() <= 3.0 < accountants.epsilon(0.99 * sigma, 0.5, 3, 1e-3, accountant="rdp")


def test_clipping_bounds_each_contribution():
    # client-level: one client, huge steps; its released update (σ = 0) has norm <= S
    data = clients(k=1, n=30)
    fed = make_federated(lora_model(), data, eps=None, algorithm="dp-lora", dp="client", noise_multiplier=0.0,
                         rounds=1, local_steps=5, lr=50.0, max_norm=0.25, seed=0)
    res = fed.run_round()
    norm = torch.sqrt(sum(t.pow(2).sum() for t in res.mean_update.values()))
    assert 0.25 * 0.999 < norm <= 0.25 * (1 + 1e-6)
    # example-level: q = 1, σ = 0, one step: the update is lr × (mean of clipped gradients), norm <= lr·C
    fed = make_federated(lora_model(), data, eps=None, algorithm="dp-lora", dp="example", noise_multiplier=0.0,
                         rounds=1, local_steps=1, batch_size=30, lr=2.0, max_norm=0.01, seed=0)
    res = fed.run_round()
    norm = torch.sqrt(sum(t.pow(2).sum() for t in res.mean_update.values()))
    assert 0 < norm <= 2.0 * 0.01 * (1 + 1e-5)
    small = {"w": torch.full((3,), 0.1)}
    assert torch.equal(dptrain.federated.clip_update(small, 1.0)["w"], small["w"])


def test_budget_stops_rounds_and_resume_continues_it():
    def run():
        return make_federated(lora_model(), clients(), eps=3.0, algorithm="fedsvd", rounds=3, local_steps=2,
                              batch_size=10, lr=0.5, seed=5, **RDP)
    straight = run()
    straight.fit()
    with pytest.raises(dptrain.BudgetExceededError, match="target"):
        straight.run_round()
    half = run()
    half.fit(2)
    state = half.state_dict()
    resumed = run()
    resumed.load_state_dict(state)
    assert resumed.round == 2 and resumed.epsilon_spent() == pytest.approx(half.epsilon_spent())
    resumed.fit()
    for (k, p), q in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(p, q, msg=k)
    assert resumed.epsilon_spent() == pytest.approx(straight.epsilon_spent())


def test_bad_configuration_is_refused():
    plain = nn.Linear(4, 2)
    with pytest.raises(dptrain.PrivacyConfigError, match="add_lora"):
        make_federated(plain, clients(k=2), algorithm="fedsvd")
    with pytest.raises(dptrain.PrivacyConfigError, match="dp="):
        make_federated(lora_model(), clients(k=2), dp="user")
    with pytest.raises(dptrain.PrivacyConfigError, match="noise_multiplier=0"):
        make_federated(lora_model(), clients(k=2), eps=3.0, noise_multiplier=0.0)
    with pytest.raises(dptrain.PrivacyConfigError, match="num_clients"):
        make_federated(lora_model(), {0: clients(k=1)[0], 5: clients(k=1)[0]}, num_clients=3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dp", ["example", "client"])
def test_16_bit_parameters_are_refused_at_build_and_before_each_round(dp, dtype):
    """make_private refuses 16-bit trainable parameters (clipped sums and noise rounded to 8–11 bits can
    exceed C); make_federated accepted them and ran."""
    kw = dict(dp=dp, eps=2.0, rounds=3, local_steps=1, batch_size=10, lr=0.5, seed=0, **RDP)
    with pytest.raises(dptrain.PrivacyConfigError, match="make_federated.*clip norm"):
        make_federated(nn.Linear(6, 3).to(dtype), clients(k=2), **kw)
    fed = make_federated(nn.Linear(6, 3), clients(k=2), **kw)
    fed.run_round()
    fed.model.to(dtype)
    with pytest.raises(dptrain.PrivacyConfigError, match="converted after make_federated"):
        fed.run_round()
    assert fed.round == 1


@pytest.mark.parametrize("dp", ["client", "example"])
def test_resuming_a_shorter_plan_cannot_overspend(dp):
    """A checkpoint's σ was calibrated for 4 rounds; loaded into an 8-round run with the same target, every round
    was let through ("calibrated") and ε ended at 3.02 (client) / 2.67 (example) against 2.0."""
    def data(k):
        g = torch.Generator().manual_seed(k)
        x = torch.randn(20, 4, generator=g)
        return TensorDataset(x, (x[:, 0] > 0).long())

    parts = [data(k) for k in range(20)]
    kw = dict(dp=dp, local_steps=1, batch_size=5, lr=0.1, seed=1, accountant="rdp", delta=1e-3)
    short = make_federated(nn.Linear(4, 2), parts, eps=2.0, rounds=4, **kw)
    short.fit()
    long = make_federated(nn.Linear(4, 2), parts, eps=2.0, rounds=8, **kw)
    long.load_state_dict(short.state_dict())
    with pytest.raises(dptrain.BudgetExceededError):
        long.fit()
    assert long.epsilon_spent() <= 2.0


@pytest.mark.parametrize("saved,loading", [
    (dict(dp="none", eps=None), dict(dp="example")),  # 2 non-private rounds, then ε reported as 2.99
    (dict(dp="example"), dict(dp="client")),  # the client-level ledger started empty
    (dict(dp="client", max_norm=0.1), dict(dp="client", max_norm=1.0)),  # server noise σ·0.1 under clipping at 1
])
def test_a_checkpoint_with_other_privacy_settings_is_refused(saved, loading):
    def fed(**kw):
        torch.manual_seed(0)
        opts = dict(rounds=4, local_steps=2, batch_size=8, seed=3, eps=3.0)
        opts.update(kw)
        return make_federated(nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)), parts, **opts)

    g = torch.Generator().manual_seed(0)
    parts = [TensorDataset(torch.randn(20, 5, generator=g), torch.randint(0, 3, (20,), generator=g)) for _ in range(4)]
    first = fed(**saved)
    first.fit(2)
    with pytest.raises(dptrain.PrivacyConfigError, match="other privacy settings"):
        fed(**loading).load_state_dict(first.state_dict())


def test_a_large_default_delta_for_few_clients_is_warned_about_and_reported():
    """examples/federated_digits.py --dp client reported ε≈3 at δ = 1/10^1.1 = 0.079 without a word."""
    import warnings

    with pytest.warns(UserWarning, match=r"δ = 0\.0794 is the default 1/N\^1\.1 for only N = 10 clients"):
        fed = make_federated(nn.Linear(6, 3), clients(k=10, n=20), eps=3.0, dp="client", rounds=2, local_steps=1,
                             batch_size=8)
    report = fed.report()
    assert report.delta == pytest.approx(10 ** -1.1)
    assert len(report.warnings) == 1 and "pass delta=" in report.to_dict()["warnings"][0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit δ below 1/N is taken as given
        fed = make_federated(nn.Linear(6, 3), clients(k=10, n=20), eps=3.0, dp="client", rounds=2, local_steps=1,
                             batch_size=8, delta=1e-5)
        assert fed.report().warnings == ()
    with pytest.warns(UserWarning, match=r"delta=0\.2 is >= 1/N = 0\.1 \(N = 10 clients\)"):
        make_federated(nn.Linear(6, 3), clients(k=10, n=20), eps=3.0, dp="client", rounds=2, delta=0.2)
