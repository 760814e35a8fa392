"""ε of DP-SGD against published reference values (shared/REFERENCE_VALUES.md, 'Accounting' table)."""
from __future__ import annotations

import pytest

import accountants
from accountants import GaussianEvent, PoissonSampledEvent, SelfComposedEvent

# (σ, q, T, δ, ε PLD (dp_accounting 0.6.0), ε RDP)
TABLE = [
    (1.1, 256 / 60000, 14062, 1e-5, 2.3817, 2.5966),
    (1.0, 0.01, 10000, 1e-5, 6.1877, 6.7128),
    (0.8, 0.005, 1000, 1e-6, 2.0041, 2.6265),
]


@pytest.mark.parametrize("sigma,q,steps,delta,pld,rdp", TABLE)
def test_prv_matches_pld_within_one_percent(sigma, q, steps, delta, pld, rdp):
    low, est, up = accountants.epsilon_bounds(SelfComposedEvent(PoissonSampledEvent(q, GaussianEvent(sigma)), steps),
                                              delta)
    assert est == pytest.approx(pld, rel=0.01)
    assert low <= pld <= up  # the claimed upper bound is above dp_accounting's pessimistic PLD bound
    # the value we claim is the upper bound
    assert accountants.epsilon(sigma, q, steps, delta) == pytest.approx(up)


@pytest.mark.parametrize("sigma,q,steps,delta,pld,rdp", TABLE)
def test_rdp_matches_reference_and_is_above_pld(sigma, q, steps, delta, pld, rdp):
    eps = accountants.epsilon(sigma, q, steps, delta, accountant="rdp")
    assert eps == pytest.approx(rdp, rel=0.01)
    assert eps >= pld


def test_gdp_clt_reference_row():
    # REFERENCE_VALUES.md row 1: μ = 0.573581 → ε = 2.3243
    assert accountants.gdp_mu(1.1, 256 / 60000, 14062) == pytest.approx(0.573581, abs=1e-6)
    assert accountants.epsilon(1.1, 256 / 60000, 14062, 1e-5, accountant="gdp") == pytest.approx(2.3243, abs=2e-3)
    # row 3: GDP-CLT gives 1.3245
    assert accountants.epsilon(0.8, 0.005, 1000, 1e-6, accountant="gdp") == pytest.approx(1.3245, abs=2e-3)


def test_epsilon_grows_with_steps_and_shrinks_with_noise():
    e = [accountants.epsilon(1.0, 0.01, t, 1e-5) for t in (100, 1000)]
    assert e[0] < e[1]
    assert accountants.epsilon(2.0, 0.01, 1000, 1e-5) < e[1]


@pytest.mark.parametrize("kwargs,match", [
    (dict(noise_multiplier=0.0, sample_rate=0.1, steps=10, delta=1e-5), "noise_multiplier"),
    (dict(noise_multiplier=1.0, sample_rate=0.0, steps=10, delta=1e-5), "sample_rate"),
    (dict(noise_multiplier=1.0, sample_rate=1.5, steps=10, delta=1e-5), "sample_rate"),
    (dict(noise_multiplier=1.0, sample_rate=0.1, steps=0, delta=1e-5), "steps"),
    (dict(noise_multiplier=1.0, sample_rate=0.1, steps=10, delta=0.0), "delta"),
    (dict(noise_multiplier=1.0, sample_rate=0.1, steps=10, delta=1.0), "delta"),
])
def test_bad_inputs_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        accountants.epsilon(**kwargs)


def test_unknown_accountant():
    with pytest.raises(ValueError, match="accountant"):
        accountants.epsilon(1.0, 0.1, 10, 1e-5, accountant="moments")


def test_tiny_noise_still_gets_a_bound():
    # the PRV discretisation fails at its default ε-error here; a coarser error still bounds ε
    up = accountants.epsilon(0.5, 0.1, 10, 0.01)
    assert up >= accountants.epsilon(0.5, 0.1, 10, 0.01, accountant="gdp") * 0.5
    assert up <= accountants.epsilon(0.5, 0.1, 10, 0.01, accountant="rdp") * 1.05


def test_very_long_lossy_runs_get_a_bound_without_exhausting_memory():
    # σ = 1, q = 0.25, T = 1e6: a PRV grid would need ~3e10 points; the RDP bound stands in
    low, est, up = accountants.epsilon_bounds(accountants.poisson_gaussian(1.0, 0.25, 10**6), 1e-5)
    assert low == 0.0 and up == pytest.approx(accountants.epsilon(1.0, 0.25, 10**6, 1e-5, accountant="rdp"))


@pytest.mark.parametrize("sigma,q,steps,delta,pld,rdp", TABLE)
def test_pld_backend_is_an_upper_bound_within_one_percent(sigma, q, steps, delta, pld, rdp):
    eps = accountants.epsilon(sigma, q, steps, delta, accountant="pld")
    assert pld * 0.999 <= eps <= pld * 1.01


@pytest.mark.parametrize("accountant", ["prv", "pld", "rdp", "gdp"])
def test_monotone_in_sigma_q_and_steps(accountant):
    def eps(sigma, q, steps):
        return accountants.epsilon(sigma, q, steps, 1e-5, accountant=accountant)

    base = eps(1.0, 0.02, 100)
    assert eps(1.2, 0.02, 100) < base < eps(0.9, 0.02, 100)
    assert eps(1.0, 0.01, 100) < base < eps(1.0, 0.04, 100)
    assert eps(1.0, 0.02, 50) < base < eps(1.0, 0.02, 200)


@pytest.mark.parametrize("accountant", ["prv", "pld", "rdp", "gdp"])
def test_composition_of_equal_events_is_self_composition(accountant):
    step = PoissonSampledEvent(0.02, GaussianEvent(1.0))
    parts = accountants.ComposedEvent((SelfComposedEvent(step, 30), SelfComposedEvent(step, 50), step,
                                       SelfComposedEvent(step, 19)))
    assert accountants.epsilon_of_event(parts, 1e-5, accountant) == pytest.approx(
        accountants.epsilon(1.0, 0.02, 100, 1e-5, accountant), rel=1e-12)


def test_rdp_epsilon_is_never_negative_and_its_order_warning_stays_inside():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert accountants.epsilon(50, 0.01, 1, 0.01, accountant="rdp") == 0.0  # opacus: −0.0098
        assert accountants.epsilon(1.0, 1.0, 1, 0.9, accountant="rdp") == 0.0  # opacus: −1.75
        assert accountants.epsilon(1.0, 1.0, 100000, 1e-5, accountant="rdp") > 0  # "optimal order …" not raised


def test_tiny_sigma_gives_infinite_gdp_epsilon_instead_of_overflow():
    assert accountants.epsilon(0.03, 0.5, 1, 1e-5, accountant="gdp") == float("inf")  # e^{1/σ²} overflows
    assert accountants.gdp_mu(0.03, 0.5, 10) == float("inf")


def test_numpy_numbers_are_accepted_and_nan_steps_rejected_clearly():
    import numpy as np

    want = accountants.epsilon(1.0, 0.1, 10, 1e-5)
    assert accountants.epsilon(np.float64(1.0), np.float32(0.1), np.int64(10), np.float32(1e-5)) == pytest.approx(
        want, rel=1e-5)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        accountants.epsilon(1.0, 0.1, float("nan"), 1e-5)


def test_invalid_event_counts_and_sigmas_are_errors_not_fewer_steps():
    with pytest.raises(ValueError, match="whole number"):
        SelfComposedEvent(GaussianEvent(1.0), float("nan"))  # was ε = 0
    with pytest.raises(ValueError, match="whole number"):
        SelfComposedEvent(GaussianEvent(1.0), 2.9)  # was floored to 2 by three accountants, 2.9 by gdp
    with pytest.raises(ValueError, match="positive finite"):
        GaussianEvent(float("inf"))
    assert SelfComposedEvent(GaussianEvent(1.0), 3.0).count == 3
    empty = PoissonSampledEvent(0.1, SelfComposedEvent(GaussianEvent(1.0), 0))  # was ZeroDivisionError
    assert accountants.epsilon_of_event(empty, 1e-5) == 0.0


@pytest.mark.parametrize("q, steps", [(1.5, 10), (0.0, 10), (float("nan"), 10), (0.5, 2.7), (0.5, -1)])
def test_poisson_gaussian_refuses_a_rate_outside_0_1_or_a_fractional_count(q, steps):
    """q = 1.5 was silently taken as q = 1 (no subsampling), 2.7 steps as 2."""
    with pytest.raises(ValueError):
        accountants.poisson_gaussian(1.0, q, steps)
    assert accountants.flatten(accountants.poisson_gaussian(1.0, 1.0, 10)) == (((1.0, 1.0), 10),)


def test_pld_coarsens_a_grid_past_its_cap_and_stays_an_upper_bound(monkeypatch):
    """The pld accountant sized its grid as 0.03/√T whatever the ε: σ = 2, q = 1, T = 1e5 asked for 2.2 GiB
    arrays (MemoryError or the OOM killer). Past PLD_MAX_POINTS the step is coarsened instead (here with a small
    cap on a small run)."""
    from dp_accounting import pld

    from accountants import backends

    steps, sigma, delta = 1000, 2.0, 1e-5
    flat = accountants.flatten(accountants.poisson_gaussian(sigma, 1.0, steps))
    fine = 0.03 / steps ** 0.5
    intervals = []
    real = pld.PLDAccountant

    def spy(*args, **kwargs):
        intervals.append(kwargs["value_discretization_interval"])
        return real(*args, **kwargs)

    monkeypatch.setattr(pld, "PLDAccountant", spy)
    monkeypatch.setattr(backends, "PLD_MAX_POINTS", 100_000, raising=False)
    backends.pld_epsilon.cache_clear()
    try:
        eps = accountants.epsilon(sigma, 1.0, steps, delta, accountant="pld")
    finally:
        backends.pld_epsilon.cache_clear()
    assert len(intervals) == 1 and intervals[0] > fine
    assert backends.pld_points(flat, fine) > 4e5  # the grid it would have been (~5e5 points)
    assert backends.pld_points(flat, intervals[0]) <= 100_000 * (1 + 1e-9)
    exact = accountants.eps_from_gdp(steps ** 0.5 / sigma, delta)  # unsampled Gaussian steps: exactly μ-GDP
    assert exact <= eps <= exact * 1.01


def test_a_bool_is_not_a_sampling_rate():
    """epsilon(1.0, True, 10, δ) was taken as q = 1, as check_delta and whole_count already refuse bools."""
    from accountants.mf_events import BandedCyclicPoissonEvent

    with pytest.raises(ValueError, match="sample_rate"):
        accountants.epsilon(1.0, True, 10, 1e-5)
    with pytest.raises(ValueError, match="sample_rate"):
        PoissonSampledEvent(True, GaussianEvent(1.0))
    with pytest.raises(ValueError, match="sample_rate"):
        accountants.gdp_mu(1.0, True, 10)
    with pytest.raises(ValueError, match="sample_rate"):
        BandedCyclicPoissonEvent(1.0, 1.0, 2, 10, sample_rate=True)


def test_mf_events_take_numpy_scalars_like_gaussian_events():
    import numpy as np

    from accountants.mf_events import MatrixFactorizationEvent

    event = MatrixFactorizationEvent(np.float32(2.0), np.float64(1.0), 10)
    assert type(event.noise_multiplier) is float and event.noise_multiplier == 2.0
    assert GaussianEvent(np.float32(2.0)) == GaussianEvent(2.0)


def test_composed_event_takes_a_list():
    """A list gave "TypeError: unhashable type: 'list'" from flatten's cache."""
    parts = [GaussianEvent(1.0), SelfComposedEvent(GaussianEvent(2.0), 3)]
    event = accountants.ComposedEvent(parts)
    assert event == accountants.ComposedEvent(tuple(parts))
    assert accountants.flatten(event) == (((1.0, 1.0), 1), ((1.0, 2.0), 3))
    with pytest.raises(ValueError, match="DpEvent"):
        accountants.ComposedEvent([1.0])


def test_poisson_sampling_an_mf_event_is_refused_without_wrong_advice():
    from accountants.mf_events import MatrixFactorizationEvent

    with pytest.raises(NotImplementedError, match="only a GaussianEvent") as info:
        accountants.flatten(PoissonSampledEvent(0.1, MatrixFactorizationEvent(2.0, 1.0, 10)))
    assert "to_gaussian_event" not in str(info.value)
