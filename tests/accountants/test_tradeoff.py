"""Numerical trade-off curves, separation κ and the shuffled-sampling limit."""
from __future__ import annotations

import math

import numpy as np
import pytest

import accountants
from accountants import gaussian_tradeoff, shuffled_limit, tradeoff_curve, tradeoff_separation


def test_unsampled_gaussian_curve_matches_g_mu_from_below():
    # T Gaussian releases with noise σ are exactly μ-GDP with μ = √T/σ (no subsampling)
    a, b = tradeoff_curve(2.0, 1.0, 4)
    g = gaussian_tradeoff(a, 1.0)
    assert np.all(b <= g + 1e-9)  # a valid (conservative) lower bound on the true curve
    assert np.max(g - b) < 0.01  # and tight


def test_dp_sgd_curve_is_a_valid_tradeoff_function():
    a, b = tradeoff_curve(1.1, 256 / 60000, 2000)
    assert np.all(np.diff(b) <= 1e-12)  # non-increasing
    assert np.all(b <= 1 - a + 1e-12)  # never better than random guessing
    assert b[0] <= 1.0 and b[-1] == pytest.approx(0.0, abs=1e-9)


def test_curve_is_consistent_with_the_claimed_epsilon():
    # the (ε, δ) guarantee implies β ≥ 1 − δ − e^ε α; the curve must respect it
    eps = accountants.epsilon(1.0, 0.02, 300, 1e-5)
    a, b = tradeoff_curve(1.0, 0.02, 300)
    assert np.all(b >= 1 - 1e-5 - math.exp(eps) * a - 1e-6)


def test_separation():
    a = np.linspace(0, 1, 101)
    assert tradeoff_separation(a, 1 - a) == 0.0
    assert tradeoff_separation(a, np.zeros_like(a)) == pytest.approx(1 / math.sqrt(2))
    assert tradeoff_separation(a, gaussian_tradeoff(a, 1.0)) > tradeoff_separation(a, gaussian_tradeoff(a, 0.5))


def test_shuffled_limit_thresholds_reference():
    # REFERENCE_VALUES.md: σ threshold 0.269 at M = 1e3, 0.233 at M = 1e4
    assert shuffled_limit(1.0, 1000).sigma_threshold == pytest.approx(0.269, abs=5e-4)
    assert shuffled_limit(1.0, 10_000).sigma_threshold == pytest.approx(0.233, abs=5e-4)
    lim = shuffled_limit(0.2, 1000)
    assert lim.weak_regime and "Ertan" in lim.warning()
    assert shuffled_limit(0.5, 1000).warning() is None
    assert lim.kappa_threshold == pytest.approx((1 / math.sqrt(8)) * (1 - 1 / math.sqrt(4 * math.pi * math.log(1000))))


@pytest.mark.parametrize("sigma", [5.0, 50.0, 100.0])
def test_curve_stays_below_g_mu_when_mu_is_smaller_than_the_eps_error(sigma):
    """One unsampled release is exactly (1/σ)-GDP. For ε < ε_err the profile must use δ(ε − ε_err) at a
    negative argument; δ(0) there put the curve above G_μ by up to 1.3e-5 at σ = 100."""
    alphas = np.linspace(0.3, 0.7, 81)
    a, b = tradeoff_curve(sigma, 1.0, 1, alphas=alphas)
    assert np.all(b <= gaussian_tradeoff(a, 1.0 / sigma) + 1e-12)


@pytest.mark.parametrize("sigma, q, steps", [(1.0, 0.5, 2.7), (1.0, 0.01, 0), (1.0, 1.5, 10), (1.0, 0.01, math.nan),
                                             (0.0, 0.01, 10)])
def test_tradeoff_curve_refuses_what_epsilon_refuses(sigma, q, steps):
    """steps = 2.7 was taken as 2 (a curve more private than 3 steps'), steps = 0 divided by zero, q = 1.5 was q = 1."""
    with pytest.raises(ValueError):
        accountants.epsilon(sigma, q, steps, 1e-5)
    with pytest.raises(ValueError):
        tradeoff_curve(sigma, q, steps, alphas=[0.1])
