"""Gaussian DP formulas against exact published values (REFERENCE_VALUES.md, 'Gaussian DP')."""
from __future__ import annotations

import math

import pytest

from accountants import delta_from_gdp, eps_from_gdp, gaussian_tradeoff, gdp_mu


@pytest.mark.parametrize("eps,mu,want", [(1, 1, 0.126936737507), (2, 1, 0.020923635821),
                                          (0, 1, 0.382924922548), (3, 2, 0.183813076544)])
def test_delta_from_gdp(eps, mu, want):
    assert delta_from_gdp(eps, mu) == pytest.approx(want, abs=1e-9)


@pytest.mark.parametrize("mu,want", [(1.0, 4.377178096), (0.5, 1.993091404)])
def test_eps_from_gdp(mu, want):
    assert eps_from_gdp(mu, 1e-5) == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("alpha,want", [(0.1, 0.6108563084), (0.01, 0.9076377519)])
def test_gaussian_tradeoff(alpha, want):
    assert float(gaussian_tradeoff(alpha, 1.0)) == pytest.approx(want, abs=1e-9)


def test_mu_without_subsampling_is_exact_composition():
    assert gdp_mu(2.0, 1.0, 16) == pytest.approx(math.sqrt(16) / 2.0)


def test_eps_zero_when_delta_is_loose():
    assert eps_from_gdp(0.1, 0.5) == 0.0


@pytest.mark.parametrize("steps", [math.nan, 2.5, -1, math.inf, True])
def test_gdp_mu_refuses_a_count_of_steps_that_is_not_whole(steps):
    """NaN steps gave μ = NaN, 2.5 steps a μ for a fractional run."""
    with pytest.raises(ValueError, match="steps"):
        gdp_mu(1.0, 0.01, steps)
    assert gdp_mu(1.0, 0.01, 0) == 0.0


def test_delta_from_gdp_refuses_nan():
    with pytest.raises(ValueError, match="mu"):
        delta_from_gdp(1.0, math.nan)
    with pytest.raises(ValueError, match="eps"):
        delta_from_gdp(math.nan, 1.0)
