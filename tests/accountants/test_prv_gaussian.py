"""The float64 PRV of the Poisson-subsampled Gaussian equals prv_accountant's long-double one."""
from __future__ import annotations

import numpy as np
import pytest
from prv_accountant import PoissonSubsampledGaussianMechanism, PRVAccountant

from accountants.prv_gaussian import PoissonSubsampledGaussianPRV

CASES = [(0.001, 2.0), (0.01, 1.0), (256 / 60000, 1.1), (0.5, 0.8), (0.9, 5.0)]


@pytest.mark.parametrize("p, sigma", CASES)
def test_cdf_and_cell_masses_match_the_library(p, sigma):
    ours, ref = PoissonSubsampledGaussianPRV(p, sigma), PoissonSubsampledGaussianMechanism(p, sigma)
    t = np.linspace(-3, 3, 60001)
    assert np.abs(ours.cdf(t) - np.asarray(ref.cdf(t), dtype=float)).max() < 1e-12
    cells = ours.probability(t[:-1], t[1:])
    ref_cells = np.asarray(ref.probability(t[:-1], t[1:]), dtype=float)
    assert np.abs(cells - ref_cells).max() < 1e-12
    assert (cells >= 0).all()
    np.testing.assert_allclose(ours.cdf(t) + ours.sf(t), 1.0, atol=1e-15)
    assert (np.diff(ours.cdf(t)) >= 0).all()
    assert ours.cdf(np.array([np.log1p(-p) - 1e-9]))[0] == 0.0


def test_lower_tail_has_no_cancellation():
    # Far in the lower tail the library's 1 − (…) form rounds to 0; ours keeps the mass.
    prv = PoissonSubsampledGaussianPRV(0.01, 1.0)
    t = np.array([-0.0099, -0.0098])  # just above log(1 − p) = −0.01005
    mass = prv.probability(t[:1], t[1:])[0]
    assert 0 < mass < 1e-3
    assert prv.cdf(t[:1])[0] > 0


@pytest.mark.parametrize("sigma, q, steps, delta", [
    (1.1, 256 / 60000, 14062, 1e-5),  # REFERENCE_VALUES.md, accounting row 1
    (0.8, 0.005, 1000, 1e-6),         # REFERENCE_VALUES.md, accounting row 3
])
def test_epsilon_bounds_match_the_library(sigma, q, steps, delta):
    def bounds(prv):
        acc = PRVAccountant(prvs=[prv], max_self_compositions=[steps], eps_error=0.01, delta_error=delta / 1000)
        return np.array(acc.compute_epsilon(delta=delta, num_self_compositions=[steps]))

    ours = bounds(PoissonSubsampledGaussianPRV(q, sigma))
    ref = bounds(PoissonSubsampledGaussianMechanism(q, sigma))
    np.testing.assert_allclose(ours, ref, rtol=1e-5)


@pytest.mark.parametrize("p, sigma", [(0.0, 1.0), (1.0, 1.0), (0.1, 0.0), (0.1, -1.0)])
def test_bad_parameters(p, sigma):
    with pytest.raises(ValueError, match="PoissonSubsampledGaussianPRV"):
        PoissonSubsampledGaussianPRV(p, sigma)


@pytest.mark.parametrize("sigma", [0.5, 2.0, 10.0])
def test_gaussian_prv_matches_the_library(sigma):
    from prv_accountant import GaussianMechanism

    from accountants.prv_gaussian import GaussianPRV

    ours, ref = GaussianPRV(sigma), GaussianMechanism(sigma)
    t = np.linspace(-5, 5, 2001)
    assert np.abs(ours.cdf(t) - ref.cdf(t)).max() < 1e-14
    np.testing.assert_allclose(ours.cdf(t) + ours.sf(t), 1.0, atol=1e-15)
    lo, hi = ours.support()
    assert ours.cdf(lo) <= 1e-30 and ours.sf(hi) <= 1e-30


@pytest.mark.parametrize("p, sigma", CASES)
def test_support_holds_all_the_mass(p, sigma):
    # the grid keeps only the cells inside the support: each tail outside holds at most 1e-30
    prv = PoissonSubsampledGaussianPRV(p, sigma)
    lo, hi = prv.support()
    assert prv.cdf(np.array([lo]))[0] <= 1e-30 and prv.sf(np.array([hi]))[0] <= 1e-30
    assert prv.cdf(np.array([prv.median()]))[0] == pytest.approx(0.5, abs=1e-9)


def test_privacy_loss_past_709_is_not_cut_off():
    """z(t) = log1p(expm1(t)/p) overflowed for t > 709: P[Y > t] became 0 and every step's loss was capped
    at ~709.8, so ε of a tiny σ was under-reported (709 against the RDP bound's 22104)."""
    import warnings

    from accountants import epsilon

    prv = PoissonSubsampledGaussianPRV(0.5, 0.01)
    # x ~ N(1, σ²) w.p. p: Y > t ⇔ x > σ²z + 1/2 with z ≈ t − log p; at t = 720 that is x > 0.572, P ≈ p·1
    assert float(prv.sf(np.array([720.0]))[0]) == pytest.approx(0.5, rel=1e-9)
    t = np.array([0.999, 1.0, 1.001])  # the two forms of z(t) meet at t = 1
    np.testing.assert_allclose(prv.cdf(t), PoissonSubsampledGaussianMechanism(0.5, 0.01).cdf(t).astype(float),
                               rtol=1e-12, atol=1e-15)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        near_one, full = epsilon(0.01, 1 - 1e-9, 1, 1e-5), epsilon(0.01, 1.0, 1, 1e-5)
        small_q = epsilon(0.005, 0.5, 1, 1e-5)
    assert near_one == pytest.approx(full, rel=1e-6)
    assert 20000 < small_q < epsilon(0.005, 0.5, 1, 1e-5, accountant="rdp")


@pytest.mark.parametrize("p,sigma", [(0.01, 0.3), (0.01, 0.5), (0.3, 0.7), (0.004, 1.1)])
def test_truncated_mean_matches_gauss_hermite(p, sigma):
    """E[Y] by Gauss–Hermite nodes on each mixture component (an independent rule; the support holds all but
    1e-31 of the mass). prv_accountant's quadrature of the CDF is off by 2e-5 at σ = 0.3, q = 0.01."""
    prv = PoissonSubsampledGaussianPRV(p, sigma)
    x, w = np.polynomial.hermite_e.hermegauss(200)  # ∫ f(x) e^{−x²/2} dx ≈ Σ w f(x)
    w = w / np.sqrt(2 * np.pi)

    def loss(v):
        return np.logaddexp(np.log1p(-p), np.log(p) + (2 * v - 1) / (2 * sigma ** 2))

    want = (1 - p) * np.dot(w, loss(sigma * x)) + p * np.dot(w, loss(1 + sigma * x))
    assert prv.truncated_mean(*prv.support()) == pytest.approx(want, rel=1e-9, abs=1e-15)


def test_bounds_bracket_the_pld_accountant_where_the_library_mean_is_off():
    """σ = 0.3, q = 0.01, T = 1000, δ = 1e-2: the library's mean put the PRV lower bound (40.4668) above
    dp_accounting's pessimistic PLD ε (40.4612) and its connect-the-dots estimate (40.4611)."""
    from accountants import epsilon, epsilon_bounds, poisson_gaussian

    low, est, up = epsilon_bounds(poisson_gaussian(0.3, 0.01, 1000), 1e-2)
    pld = epsilon(0.3, 0.01, 1000, 1e-2, accountant="pld")
    assert low <= pld <= up
    assert est == pytest.approx(40.4611, abs=2e-3)
