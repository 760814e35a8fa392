"""The float64 FFT-grid PRV composition equals prv_accountant's, and its bounds hold."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from prv_accountant import GaussianMechanism, PoissonSubsampledGaussianMechanism, PRVAccountant

from accountants.backends import prv_bounds, prv_composition
from accountants.prv_grid import discretise, make_grid, safe_half_width

FLATS = [
    ((((256 / 60000, 1.1), 2000),), 1e-5),
    ((((0.02, 0.9), 30), ((0.02, 1.2), 60), ((0.05, 1.5), 20)), 1e-5),  # heterogeneous run
    ((((0.01, 1.0), 500), ((1.0, 3.0), 4)), 1e-6),  # subsampled and full-batch Gaussian steps
    ((((1.0, 10.0), 1),), 1e-5),
]


def library(flat, delta):
    prvs = [GaussianMechanism(s) if q >= 1 else PoissonSubsampledGaussianMechanism(q, s) for (q, s), _ in flat]
    counts = [n for _, n in flat]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        acc = PRVAccountant(prvs=prvs, max_self_compositions=counts, eps_error=0.01, delta_error=delta / 1000)
    return acc, counts


@pytest.mark.parametrize("flat,delta", FLATS)
def test_bounds_and_delta_profile_equal_prv_accountant(flat, delta):
    acc, counts = library(flat, delta)
    want = np.array(acc.compute_epsilon(delta=delta, num_self_compositions=counts))
    np.testing.assert_allclose(prv_bounds(flat, delta), np.maximum(want, 0.0), rtol=1e-6, atol=1e-9)
    ref = acc.compute_composition(counts)
    eps = np.array([0.0, 0.3, 1.0, 2.0])
    want_delta = np.array([float(ref.compute_delta_estimate(e)) for e in eps])
    np.testing.assert_allclose(prv_composition(flat, delta / 1000).delta(eps), want_delta, rtol=1e-6, atol=1e-12)


def test_gaussian_composition_brackets_the_exact_value():
    # 4 Gaussian releases with σ = 2 are exactly 1-GDP: ε(δ=1e-5) = 4.377178096 (REFERENCE_VALUES.md)
    low, est, up = prv_bounds((((1.0, 2.0), 4),), 1e-5)
    assert low <= 4.377178096 <= up
    assert est == pytest.approx(4.377178096, abs=1e-3)


@pytest.mark.parametrize("pair", [(0.001, 2.0), (256 / 60000, 1.1), (0.3, 0.7), (1.0, 1.5)])
def test_discretisation_is_a_mean_preserving_distribution(pair):
    grid = make_grid(safe_half_width([pair], [100], 0.01, 1e-8), 100, 0.01, 1e-8)
    pmf, shift = discretise(pair, grid)
    assert (pmf >= 0).all() and pmf.sum() == pytest.approx(1.0, abs=1e-12)
    assert abs(shift) < grid.mesh / 2


def test_grid_is_safe_and_fft_friendly():
    width = safe_half_width([(0.01, 1.0)], [1000], 0.01, 1e-8)
    grid = make_grid(width, 1000, 0.01, 1e-8)
    assert grid.t_min <= -width and grid.t_max >= width
    n = grid.size
    assert n % 2 == 0
    for p in (2, 3, 5):
        while n % p == 0:
            n //= p
    assert n == 1  # 5-smooth: FFTs of this size are fast


def test_heterogeneous_path_equals_self_composition_for_equal_steps():
    # two PRVs that differ only in the last bits of σ go through the heterogeneous product
    # of transforms; the result must be the homogeneous one
    same = prv_bounds((((0.02, 1.0), 100),), 1e-5)
    split = prv_bounds((((0.02, 1.0), 30), ((0.02, 1.0 + 1e-13), 70)), 1e-5)
    np.testing.assert_allclose(split, same, rtol=1e-9)


@pytest.mark.parametrize("sigma,q,steps,delta,pld_fine", [
    (1.0, 0.01, 10_000, 1e-11, 9.83262),
    (0.8, 0.005, 1000, 1e-11, 4.24496),
    (2.0, 0.001, 100_000, 1e-9, 0.92773),
])
def test_upper_bound_holds_at_tiny_delta(sigma, q, steps, delta, pld_fine):
    # At tiny δ the FFT's float64 round-off (~1e-11 summed over the tail) exceeds δ_err = δ/1000;
    # without it in the error the upper bound fell below the truth (9.827 < 9.8326 in row 1).
    # pld_fine: dp_accounting 0.6.0, privacy_loss_distribution.from_gaussian_mechanism(σ, sampling_prob=q,
    # value_discretization_interval=min(1e-4, 0.01/√T)).self_compose(T).get_epsilon_for_delta(δ)
    # (pessimistic, so an upper bound itself, accurate to ~1e-4 here).
    assert prv_bounds((((q, sigma), steps),), delta)[2] >= pld_fine


def test_epsilon_in_the_thousands_is_finite_and_exact():
    """ε past e^709 (float64's exp limit): the bounds stay finite and bracket the closed form.

    100 full-batch Gaussian steps at σ = 0.2 are μ-GDP with μ = √100/0.2 (exact); δ(ε) near the answer needs
    e^ε ≈ e^1462, which overflowed to ε = inf before the tail sums were formed without e^t.
    """
    import math

    from accountants.gdp import delta_from_gdp, eps_from_gdp

    flat, delta = (((1.0, 0.2), 100),), 1e-5
    want = eps_from_gdp(math.sqrt(100) / 0.2, delta)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        low, est, up = prv_bounds(flat, delta)
        got_delta = prv_composition(flat, delta / 1000).delta(np.array([want - 5, want]))
    assert want > 1000 and low <= want <= up and up - low < 0.1
    assert est == pytest.approx(want, rel=1e-7)
    np.testing.assert_allclose(got_delta, [delta_from_gdp(want - 5, 50.0), delta], rtol=1e-4)


def test_subsampled_epsilon_in_the_thousands_is_finite_and_below_rdp():
    from accountants.backends import rdp_epsilon

    flat, delta = (((0.5, 0.5), 2000),), 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        low, est, up = prv_bounds(flat, delta)
    assert 709 < low <= est <= up < rdp_epsilon(flat, delta)
