"""The budget floor for adaptive σ: the smallest grid level that keeps the remaining steps within ε."""
from __future__ import annotations

import pytest

import accountants
from accountants.noise_floor import level_at_least, noise_floor, noise_level


def test_grid_levels():
    assert noise_level(1.3, 0) == 1.3 and noise_level(1.0, 8) == pytest.approx(2.0)
    for s in (0.31, 1.0, 1.3, 2.71):
        k = level_at_least(1.3, s)
        assert noise_level(1.3, k) >= s > noise_level(1.3, k - 1)


def test_floor_of_an_empty_ledger_is_the_calibrated_sigma_up_to_the_grid():
    q, steps, delta, eps = 0.05, 60, 1e-5, 2.0
    sigma = accountants.calibrate_noise(eps, delta, q, steps, accountant="rdp")
    ledger = accountants.PrivacyLedger()
    k = noise_floor(ledger, q, steps, delta, eps, reference=sigma, accountant="rdp")
    assert k in (0, 1) or k == -1 and noise_level(sigma, -1) >= sigma / 1.01
    assert accountants.epsilon(noise_level(sigma, k), q, steps, delta, accountant="rdp") <= eps
    assert accountants.epsilon(noise_level(sigma, k - 1), q, steps, delta, accountant="rdp") > eps


def test_overspending_raises_the_floor_and_exhausted_budget_has_none():
    q, steps, delta, eps = 0.05, 60, 1e-5, 2.0
    sigma = accountants.calibrate_noise(eps, delta, q, steps, accountant="rdp")
    ledger = accountants.PrivacyLedger()
    ledger.record(accountants.PoissonSampledEvent(q, accountants.GaussianEvent(sigma / 1.15)), 10)
    k = noise_floor(ledger, q, 50, delta, eps, reference=sigma, accountant="rdp")
    assert k is not None and k > 0
    assert ledger.epsilon_if(accountants.PoissonSampledEvent(q, accountants.GaussianEvent(noise_level(sigma, k))),
                             delta, accountant="rdp", count=50) <= eps
    ledger.record(accountants.PoissonSampledEvent(q, accountants.GaussianEvent(0.2)), 200)
    assert noise_floor(ledger, q, 50, delta, eps, reference=sigma, accountant="rdp") is None
