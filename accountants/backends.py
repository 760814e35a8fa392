"""ε of a flattened composition under three accountants.

- ``prv``: privacy random variables (Gopi, Lee & Wutschitz 2021) via ``prv_accountant``
  (its Poisson-subsampled Gaussian PRV evaluated in float64: :mod:`accountants.prv_gaussian`);
  returns (lower, estimate, upper) with ε-error ``PRV_EPS_ERROR``. The upper bound is
  the guarantee we claim.
- ``rdp``: Rényi DP (Mironov 2017; Mironov, Talwar & Zhang 2019) via opacus' analysis
  functions, converted with opacus' ``get_privacy_spent``. Always ≥ the PRV estimate.
- ``pld``: privacy-loss distributions (Koskela et al. 2020; Doroshenko et al. 2022) via
  Google's ``dp_accounting`` with its pessimistic discretisation (an upper bound), ~20×
  faster than PRV at the same accuracy; used for the calibration search.
- ``gdp``: μ-GDP CLT (Dong, Roth & Su 2019), μ² = Σ_k T_k q_k² (e^{1/σ_k²} − 1)
  (exact √(T)/σ terms for unsampled steps). An approximation, not a bound.
"""
from __future__ import annotations

import math
import warnings
from functools import lru_cache

import numpy as np
from scipy.fft import next_fast_len
from opacus.accountants.analysis import rdp as opacus_rdp
from prv_accountant import GaussianMechanism, PRVAccountant
from prv_accountant.accountant import compute_safe_domain_size

from .composition import Flat
from .gdp import eps_from_gdp
from .prv_gaussian import PoissonSubsampledGaussianPRV

PRV_EPS_ERROR = 0.01
RDP_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [80, 128, 256, 512])


#: largest PRV discretisation (grid points) we allow; ~10 float64 arrays of this size are live
PRV_MAX_POINTS = 20_000_000


def _prvs(flat: Flat) -> tuple[list, list[int]]:
    prvs, counts = [], []
    for (q, sigma), n in flat:
        prvs.append(GaussianMechanism(noise_multiplier=sigma) if q >= 1
                    else PoissonSubsampledGaussianPRV(sampling_probability=q, noise_multiplier=sigma))
        counts.append(int(n))
    return prvs, counts


def fft_friendly_domain(safe_length: float, mesh: float) -> tuple[float, int]:
    """A half-width L ≥ ``safe_length`` whose grid [−L, L] at step ``mesh`` has a fast FFT size.

    prv_accountant's aligned domain has 2⌈L/h⌉ + 2 points; its FFTs cost up to ~15× more
    when that number has a large prime factor. A wider domain is still safe (Gopi et al.
    2021, Remark 5.6 gives a lower bound on L), so we widen it to the next 5-smooth size.
    Returns (L, number of grid points).
    """
    half = math.ceil(safe_length / mesh) + 1
    size = next_fast_len(2 * half + 2, real=True)
    while size % 2:
        size = next_fast_len(size + 1, real=True)
    half = size // 2 - 1
    return (half - 0.5) * float(mesh), size


def prv_accountant(flat: Flat, delta_error: float, eps_error: float = PRV_EPS_ERROR) -> PRVAccountant | None:
    """A PRVAccountant for ``flat`` whose grid fits in memory, or None if none would be useful.

    The grid has 2L/h points, h = ε_err/√(T/2·ln(12/δ_err)) (Gopi et al. 2021, Thm 5.5), so
    long or very lossy runs need a coarser ε-error; past ε_err = 1 we give up on PRV.
    """
    prvs, counts = _prvs(flat)
    while eps_error <= 1.0:
        safe = compute_safe_domain_size(prvs, counts, eps_error=eps_error, delta_error=delta_error)
        mesh = eps_error / np.sqrt(sum(counts) / 2 * np.log(12 / delta_error))  # as prv_accountant computes it
        length, points = fft_friendly_domain(safe, mesh)
        if points <= PRV_MAX_POINTS:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "assuming that true epsilon < eps_max": L is the safe size
                try:
                    return PRVAccountant(prvs=prvs, max_self_compositions=counts, eps_error=eps_error,
                                         delta_error=delta_error, eps_max=length)
                except RuntimeError:
                    # the discretisation fails for very wide privacy-loss distributions
                    pass
        eps_error *= max(2.0, points / PRV_MAX_POINTS)
    return None


@lru_cache(maxsize=4096)
def prv_bounds(flat: Flat, delta: float, eps_error: float = PRV_EPS_ERROR) -> tuple[float, float, float]:
    """(lower, estimate, upper) ε at ``delta`` from the PRV accountant.

    Where no PRV grid fits in memory, the RDP bound stands in for estimate and upper
    (a valid, looser bound) and the lower bound is 0.
    """
    if not flat:
        return (0.0, 0.0, 0.0)
    acc = prv_accountant(flat, delta / 1000, eps_error)
    if acc is None:
        rdp = rdp_epsilon(flat, delta)
        return (0.0, rdp, rdp)
    counts = _prvs(flat)[1]
    low, est, up = acc.compute_epsilon(delta=delta, num_self_compositions=counts)
    return (max(float(low), 0.0), max(float(est), 0.0), max(float(up), 0.0))


@lru_cache(maxsize=4096)
def rdp_epsilon(flat: Flat, delta: float) -> float:
    """ε from Rényi DP, composed over all (q, σ) groups."""
    if not flat:
        return 0.0
    total = np.zeros(len(RDP_ORDERS))
    for (q, sigma), n in flat:
        total += np.asarray(opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=int(n), orders=RDP_ORDERS))
    eps, _ = opacus_rdp.get_privacy_spent(orders=RDP_ORDERS, rdp=total, delta=delta)
    return float(eps)


PLD_DISCRETIZATION = 1e-3  # privacy-loss grid step for short runs; finer for long ones (see pld_epsilon)


@lru_cache(maxsize=4096)
def pld_epsilon(flat: Flat, delta: float) -> float:
    """ε from dp_accounting's PLD accountant (pessimistic: an upper bound up to its grid)."""
    if not flat:
        return 0.0
    from dp_accounting import dp_event, pld

    # the pessimistic rounding error grows with the number of compositions: refine the grid as 1/√T
    total = sum(n for _, n in flat)
    acc = pld.PLDAccountant(value_discretization_interval=min(PLD_DISCRETIZATION, 0.03 / math.sqrt(total)))
    for (q, sigma), n in flat:
        event = dp_event.GaussianDpEvent(sigma)
        acc.compose(event if q >= 1 else dp_event.PoissonSampledDpEvent(q, event), int(n))
    return float(acc.get_epsilon(delta))


def gdp_mu_of(flat: Flat) -> float:
    """CLT μ of the composition (heterogeneous steps add in μ²)."""
    mu2 = 0.0
    for (q, sigma), n in flat:
        mu2 += n / sigma ** 2 if q >= 1 else n * q * q * math.expm1(1.0 / sigma ** 2)
    return math.sqrt(mu2)


def gdp_epsilon(flat: Flat, delta: float) -> float:
    return eps_from_gdp(gdp_mu_of(flat), delta)
