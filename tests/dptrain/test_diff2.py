"""DIFF2 driver: zero noise = the non-private recursion; each unit's contribution is clipped; ε as declared."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import accountants
from dptrain.diff2 import Diff2Trainer, make_diff2
from mechanisms.diff2 import Diff2Config


def clients(n_clients: int = 3, per: int = 7, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(per, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (per,), generator=g))
            for _ in range(n_clients)]


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def flat_example_grad(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = nn.functional.cross_entropy(net(x[None]), y[None])
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(net.parameters()))])


def clip(v: torch.Tensor, c: float) -> torch.Tensor:
    return v * min(1.0, c / (float(v.norm()) + 1e-6))


def reference_run(data, rounds: int, t_refresh: int, c1: float, c2: float, lr: float) -> torch.Tensor:
    """DIFF2 without noise, written out example by example (flat parameter vector)."""
    net = model()
    xs = [(x[i], y[i]) for x, y in data for i in range(len(y))]
    theta = torch.nn.utils.parameters_to_vector(net.parameters()).detach()
    prev, v, theta_prev = None, None, None
    for t in range(rounds):
        torch.nn.utils.vector_to_parameters(theta, net.parameters())
        now = [flat_example_grad(net, x, y) for x, y in xs]
        if t % t_refresh == 0:
            v = sum(clip(g, c1) for g in now) / len(xs)
        else:  # the difference clip radius follows the last step: C2·‖θ_t − θ_{t−1}‖
            radius = c2 * float((theta - theta_prev).norm())
            v = v + sum(clip(g - gp, radius) for g, gp in zip(now, prev)) / len(xs)
        prev, theta_prev = now, theta
        theta = theta - lr * v
    return theta


def params(net: nn.Module) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(net.parameters()).detach()


@pytest.mark.parametrize("cache_bytes", [0, 1 << 20])  # g_u(x_{t-1}) recomputed, or kept from round t-1
def test_zero_noise_equals_the_non_private_recursion(cache_bytes):
    # C2 = 0.05 is far below these examples' smoothness: most differences are clipped at r_t
    data, cfg = clients(), Diff2Config(7, 3, clip_grad=0.5, clip_diff=0.05, noise_grad=0.0, noise_diff=0.0)
    trainer = Diff2Trainer(model(), data, cfg, lr=0.8, cache_bytes=cache_bytes)
    assert trainer.cache_gradients == (cache_bytes > 0)
    trainer.fit()
    torch.testing.assert_close(params(trainer.model), reference_run(data, 7, 3, 0.5, 0.05, 0.8),
                               atol=1e-12, rtol=1e-10)  # float64: equal up to summation order
    # the radius matters: a fixed (absolute) difference clip at 0.05 gives another trajectory
    assert (params(trainer.model) - reference_run(data, 7, 3, 0.5, 1e9, 0.8)).abs().max() > 1e-4


def test_zero_noise_without_clipping_is_gradient_descent():
    data = clients()
    trainer = Diff2Trainer(model(), data, Diff2Config(6, 4, 1e9, 1e9, 0.0, 0.0), lr=0.5)
    net = model()
    x = torch.cat([x for x, _ in data]); y = torch.cat([y for _, y in data])
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for _ in range(6):
        est = trainer.step()
        opt.zero_grad(); nn.functional.cross_entropy(net(x), y).backward()
        # the estimator telescopes to the full gradient at the current iterate
        torch.testing.assert_close(torch.cat([e.reshape(-1) for e in est]),
                                   torch.cat([p.grad.reshape(-1) for p in net.parameters()]), atol=1e-12, rtol=1e-9)
        opt.step()


@pytest.mark.parametrize("level", ["example", "client"])
def test_each_unit_contribution_is_clipped(level):
    data = clients()
    big = (data[0][0] * 1e3, data[0][1])  # an outlier client: huge gradients and differences
    cfg = Diff2Config(3, 2, clip_grad=0.3, clip_diff=0.02, noise_grad=1.0, noise_diff=1.0)
    trainer = Diff2Trainer(model(), [big] + data[1:], cfg, lr=2.0, level=level, cache_bytes=0)
    for t in range(3):
        bound = 0.3 if t % 2 == 0 else 0.02 * trainer.step_distance()  # C1, or C2·‖x_t − x_{t−1}‖
        full = trainer.local_clipped_sum(t)
        kept = trainer.clients
        if level == "example":  # remove one example of the outlier client
            trainer.clients = [(big[0][1:], big[1][1:])] + kept[1:]
        else:  # remove the whole outlier client
            trainer.clients = kept[1:]
        without = trainer.local_clipped_sum(t)
        trainer.clients = kept
        diff = torch.sqrt(sum(((full[k] - without[k]) ** 2).sum() for k in full))
        assert diff <= bound * (1 + 1e-9)
        assert diff > 0.5 * bound  # the outlier's contribution is at the bound, not zero
        trainer.step()


def test_calibrated_run_spends_at_most_eps_and_reports_its_neighbours():
    trainer = make_diff2(model(), clients(), eps=2.0, delta=1e-4, rounds=5, refresh_every=2, clip_grad=1.0,
                         clip_diff=0.1, lr=0.5, accountant="pld", seed=0)
    trainer.fit()
    rep = trainer.report()
    assert 2.0 * 0.99 <= rep.epsilon <= 2.0
    assert rep.epsilon == accountants.epsilon_of_event(trainer.mechanism.run_event(), 1e-4, "pld")
    assert "one example" in rep.to_text() and rep.units == 21
    with pytest.raises(Exception, match="planned"):
        trainer.step()
    client_level = make_diff2(model(), clients(), eps=2.0, delta=1e-4, rounds=5, refresh_every=2,
                              level="client", accountant="pld")
    assert client_level.units == 3 and "one client" in client_level.report().to_text()


def test_example_level_refuses_batchnorm():
    net = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double()
    with pytest.raises(Exception, match="BatchNorm"):
        Diff2Trainer(net, clients(), Diff2Config(2, 1, 1.0, 1.0, 1.0, 1.0), lr=0.1)


def test_client_level_refuses_batchnorm_and_names_the_fix():
    """level="client" skipped the model check: BatchNorm's running mean / var became a moving average of the
    clients' raw batches and was released un-noised with the model (one client shifted by 100 moved it by 12.6)."""
    from dptrain.errors import UnsupportedModuleError

    for norm in (nn.BatchNorm1d(4), nn.InstanceNorm1d(4, track_running_stats=True)):
        net = nn.Sequential(nn.Linear(5, 4), norm, nn.Linear(4, 3)).double()
        with pytest.raises(UnsupportedModuleError, match=r"dptrain\.fix\(model\)"):
            make_diff2(net, clients(), eps=1.0, rounds=4, refresh_every=2, level="client")


def test_client_level_accepts_a_batchnorm_without_running_statistics():
    """At client level a client's examples are one unit: a BatchNorm without running statistics mixes only them
    and keeps nothing (the check refused it at both levels; at example level it is still refused)."""
    from dptrain.errors import UnsupportedModuleError

    net = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 3)).double()
    trainer = make_diff2(net, clients(), eps=1.0, rounds=2, refresh_every=2, level="client", delta=1e-5)
    trainer.fit()
    assert trainer.epsilon_spent() <= 1.0
    with pytest.raises(UnsupportedModuleError, match="BatchNorm1d"):
        make_diff2(net, clients(), eps=1.0, rounds=2, refresh_every=2, level="example")


class _Fails(nn.Module):
    """Updates its buffer in place, then raises (a forward that fails half-way)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("seen", torch.zeros(5, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.add_(x.detach().mean(0))
        raise RuntimeError("boom")


def test_a_forward_that_raises_leaves_the_buffers_as_they_were():
    """DIFF2 put the buffers back only after a forward that returned: one that updated a buffer and then raised
    left the client's statistic in the model."""
    net = nn.Sequential(_Fails(), nn.Linear(5, 3)).double()
    trainer = make_diff2(net, clients(), eps=1.0, rounds=2, refresh_every=2, level="client", delta=1e-5)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit()
    assert float(net[0].seen.abs().max()) == 0.0


class _RunningMean(nn.Module):
    """Keeps a running mean of its inputs in a buffer (a statistic of the data no model check knows)."""

    def __init__(self, width: int, reassign: bool) -> None:
        super().__init__()
        self.reassign = reassign
        self.register_buffer("seen", torch.zeros(width, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            if self.reassign:
                self.seen = 0.9 * self.seen + 0.1 * x.detach().mean(0)
            else:
                self.seen.mul_(0.9).add_(0.1 * x.detach().mean(0))
        return x - self.seen


@pytest.mark.parametrize("reassign", [False, True])
def test_client_level_refuses_a_forward_that_updates_a_buffer_and_undoes_it(reassign):
    from dptrain.errors import UnsupportedModuleError

    torch.manual_seed(0)
    net = nn.Sequential(_RunningMean(5, reassign), nn.Linear(5, 3)).double()
    trainer = make_diff2(net, clients(), eps=1.0, rounds=4, refresh_every=2, level="client")
    with pytest.raises(UnsupportedModuleError, match="seen"):
        trainer.fit()
    assert float(net[0].seen.abs().max()) == 0.0  # the update from the client's data is not left in the model


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_parameters_are_refused_at_build_and_before_each_round(dtype):
    """make_private refuses 16-bit trainable parameters (clipped sums and noise rounded to 8–11 bits can
    exceed C); DIFF2 accepted them and ran."""
    from dptrain.errors import PrivacyConfigError

    for level in ("example", "client"):
        with pytest.raises(PrivacyConfigError, match="make_diff2.*clip norm"):
            make_diff2(model().to(dtype), clients(), eps=1.0, rounds=2, refresh_every=2, level=level)
        trainer = make_diff2(model(), clients(), eps=1.0, rounds=4, refresh_every=2, level=level)
        trainer.step()
        trainer.model.to(dtype)
        with pytest.raises(PrivacyConfigError, match="converted after make_diff2"):
            trainer.step()
        assert trainer.rounds_run == 1


def test_no_step_means_a_zero_difference_round():
    # x_t = x_{t−1}: the radius C2·0 releases exactly zero; the estimate carries over unchanged
    trainer = Diff2Trainer(model(), clients(), Diff2Config(3, 2, 1.0, 5.0, 1.0, 1.0), lr=0.5, cache_bytes=0)
    trainer.step()
    trainer.previous = {k: p.detach().clone() for k, p in trainer.model.named_parameters()}
    assert trainer.step_distance() == 0.0
    assert all(float(s.abs().max()) == 0.0 for s in trainer.local_clipped_sum(1).values())


def test_difference_round_noise_follows_the_step_just_taken():
    # the noise of round t is z2·C2·‖x_t − x_{t−1}‖, with the distance of the released iterates
    trainer = Diff2Trainer(model(), clients(), Diff2Config(4, 4, 1.0, 0.7, 2.0, 3.0), lr=0.5, seed=0)
    seen = []
    noise = trainer.mechanism.noise
    trainer.mechanism.noise = lambda sums, t, distance=None: (seen.append((t, distance)), noise(sums, t, distance))[1]
    trainer.step()
    for t in (1, 2, 3):
        expected = trainer.step_distance()
        trainer.step()
        assert seen[t] == (t, expected) and expected > 0
        assert trainer.mechanism.noise_std(t, expected) == pytest.approx(3.0 * 0.7 * expected, rel=1e-15)
    assert seen[0] == (0, None)


def test_partly_noised_configuration_is_refused_when_eps_is_asked_and_spends_infinity():
    """noise_diff = 0 with eps = 3: the difference rounds would release exact clipped sums (no finite ε),
    and the run reported ε spent = 0."""
    from dptrain.errors import PrivacyConfigError

    with pytest.raises(PrivacyConfigError, match="without noise"):
        make_diff2(model(), clients(), eps=3.0, rounds=4, refresh_every=2, noise_grad=1.0, noise_diff=0.0)
    run = make_diff2(model(), clients(), eps=None, rounds=4, refresh_every=2, noise_grad=1.0, noise_diff=0.0)
    assert run.epsilon_spent() == 0.0
    run.fit()
    assert run.epsilon_spent() == float("inf") and run.report().epsilon == float("inf")


def test_zero_noise_is_refused_while_a_target_eps_is_asked_for():
    """make_diff2(noise_grad=0, noise_diff=0) with the default eps=3.0 trained without noise and no error
    (make_federated refuses the same call); the non-private recursion needs eps=None."""
    from dptrain.errors import PrivacyConfigError

    for eps in ({}, dict(eps=3.0)):  # the default eps, and one given
        with pytest.raises(PrivacyConfigError, match="noise_grad=0 and noise_diff=0 .*eps=None"):
            make_diff2(model(), clients(), rounds=4, refresh_every=2, noise_grad=0.0, noise_diff=0.0, **eps)
    run = make_diff2(model(), clients(), eps=None, rounds=4, refresh_every=2, noise_grad=0.0, noise_diff=0.0)
    run.fit()
    assert run.epsilon_spent() == float("inf")
    # fixed noise that cannot meet the target, and targets no noise can meet, are refused too
    with pytest.raises(PrivacyConfigError, match="more than eps"):
        make_diff2(model(), clients(), eps=1.0, rounds=4, refresh_every=2, noise_grad=0.5, noise_diff=0.5)
    for bad in (float("nan"), float("inf"), 0.0, -1.0):
        with pytest.raises(PrivacyConfigError, match="positive finite"):
            make_diff2(model(), clients(), eps=bad, rounds=4, refresh_every=2, noise_grad=1.0, noise_diff=1.0)


def test_one_noise_alone_is_refused_not_recalibrated():
    from dptrain.errors import PrivacyConfigError

    with pytest.raises(PrivacyConfigError, match="both noise_grad and noise_diff"):
        make_diff2(model(), clients(), eps=3.0, rounds=10, refresh_every=5, noise_grad=50.0)  # ran with z1 = 1.17


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run():
    """DIFF2 had no checkpoint: the mechanism state alone resumed with ε spent 0 and no previous iterate."""
    import io

    from dptrain.errors import PrivacyConfigError

    def run():
        return make_diff2(model(), clients(), eps=3.0, rounds=6, refresh_every=3, lr=0.5, seed=5)

    whole = run()
    whole.fit()
    first = run()
    first.fit(4)  # stop after a difference round
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = run()
    resumed.load_state_dict(torch.load(buf, weights_only=False))
    assert resumed.rounds_run == 4 and resumed.epsilon_spent() == first.epsilon_spent() > 0
    resumed.fit()
    torch.testing.assert_close(params(resumed.model), params(whole.model), rtol=0, atol=1e-12)
    assert resumed.epsilon_spent() == whole.epsilon_spent()
    other = make_diff2(model(), clients(), eps=3.0, rounds=6, refresh_every=3, lr=0.5, clip_grad=0.5, seed=5)
    with pytest.raises(PrivacyConfigError, match="another run"):
        other.load_state_dict(first.state_dict())


def test_a_large_default_delta_for_few_units_is_warned_about_with_its_numbers():
    """With 5 clients the default δ = 1/5^1.1 = 0.17 was used without a word (the report said "ε≈3 at δ=0.17")."""
    import warnings

    with pytest.warns(UserWarning, match=r"δ = 0\.17 is the default 1/N\^1\.1 for only N = 5 clients.*delta="):
        run = make_diff2(model(), clients(5), eps=1.0, rounds=4, refresh_every=2, level="client")
    assert run.delta == pytest.approx(5 ** -1.1)
    report = run.report()
    assert len(report.warnings) == 1 and "warning: δ = 0.17" in report.to_text()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit δ below 1/N is taken as given, without a warning
        run = make_diff2(model(), clients(5), eps=1.0, delta=1e-5, rounds=4, refresh_every=2, level="client")
        assert run.delta == 1e-5 and run.report().warnings == ()
        # the non-private recursion (ε = ∞) only records δ
        make_diff2(model(), clients(5), eps=None, rounds=4, refresh_every=2, noise_grad=0.0, noise_diff=0.0,
                   level="client")
    with pytest.warns(UserWarning, match=r"delta=0\.5 is >= 1/N"):
        make_diff2(model(), clients(5), eps=1.0, delta=0.5, rounds=4, refresh_every=2, level="client")
