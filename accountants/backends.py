"""ε of a flattened composition under three accountants.

- ``prv``: privacy random variables (Gopi, Lee & Wutschitz 2021): prv_accountant's algorithm
  run as vectorised float64 passes (:mod:`accountants.prv_grid`, PRVs in
  :mod:`accountants.prv_gaussian`; equal to the library's numbers to ~1e-7);
  returns (lower, estimate, upper) with ε-error ``PRV_EPS_ERROR``. The upper bound is
  the guarantee we claim. ``prv_search_epsilon`` is the same on a 5× coarser grid, for
  the calibration search only.
- ``rdp``: Rényi DP (Mironov 2017; Mironov, Talwar & Zhang 2019) via opacus' analysis
  functions, converted with opacus' ``get_privacy_spent``. Always ≥ the PRV estimate.
- ``pld``: privacy-loss distributions (Koskela et al. 2020; Doroshenko et al. 2022) via
  Google's ``dp_accounting`` with its pessimistic discretisation (an upper bound).
- ``gdp``: μ-GDP CLT (Dong, Roth & Su 2019), μ² = Σ_k T_k q_k² (e^{1/σ_k²} − 1)
  (exact √(T)/σ terms for unsampled steps). An approximation, not a bound.
"""
from __future__ import annotations

import math
import warnings
from functools import lru_cache

import numpy as np
from .opacus_rdp import rdp as opacus_rdp

from .composition import Flat
from .gdp import eps_from_gdp, expm1_or_inf
from .prv_grid import ComposedPRV, PRVGridError, compose, make_grid, safe_half_width

PRV_EPS_ERROR = 0.01
RDP_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [80, 128, 256, 512])


#: largest PRV discretisation (grid points) we allow; ~10 float64 arrays of this size are live
PRV_MAX_POINTS = 20_000_000


def prv_composition(flat: Flat, delta_error: float, eps_error: float = PRV_EPS_ERROR) -> ComposedPRV | None:
    """The composed PRV of ``flat`` on a grid that fits in memory, or None if none would be useful.

    The grid has 2L/h points, h = ε_err/√(T/2·ln(12/δ_err)) (Gopi et al. 2021, Thm 5.5), so
    long or very lossy runs need a coarser ε-error; past ε_err = 1 we give up on PRV.
    """
    pairs, counts = [pair for pair, _ in flat], [int(n) for _, n in flat]
    total = sum(counts)
    while eps_error <= 1.0:
        half_width = safe_half_width(pairs, counts, eps_error, delta_error)
        grid = make_grid(half_width, total, eps_error, delta_error)
        if grid.size <= PRV_MAX_POINTS:
            try:
                return compose(pairs, counts, grid)
            except PRVGridError:
                pass  # the discretisation fails for very wide privacy-loss distributions
        eps_error *= max(2.0, grid.size / PRV_MAX_POINTS)
    return None


@lru_cache(maxsize=4096)
def prv_bounds(flat: Flat, delta: float, eps_error: float = PRV_EPS_ERROR) -> tuple[float, float, float]:
    """(lower, estimate, upper) ε at ``delta`` from the PRV accountant.

    Where no PRV grid fits in memory, the RDP bound stands in for estimate and upper
    (a valid, looser bound) and the lower bound is 0.
    """
    if not flat:
        return (0.0, 0.0, 0.0)
    composed = prv_composition(flat, delta / 1000, eps_error)
    bounds = None
    if composed is not None:
        try:
            bounds = composed.epsilon(delta)
        except PRVGridError:
            pass
    if bounds is None:
        rdp = rdp_epsilon(flat, delta)
        return (0.0, rdp, rdp)
    low, est, up = bounds
    return (max(float(low), 0.0), max(float(est), 0.0), max(float(up), 0.0))


#: ε-error of the coarse grid the calibration search runs on (5× fewer points than PRV_EPS_ERROR);
#: its estimates are within ~3e-4 relative of the fine grid's on the benchmark rows
PRV_SEARCH_EPS_ERROR = 0.05


@lru_cache(maxsize=4096)
def prv_search_epsilon(flat: Flat, delta: float, upper: bool = True) -> float:
    """Cheap stand-in for the PRV ε, for root finding: the coarse grid's ε(δ − δ_err) + PRV_EPS_ERROR
    (what ``prv_bounds(...)[2]`` reports, up to the coarse grid's discretisation), or with
    ``upper=False`` its estimate ε(δ). Not a guarantee: calibration verifies on the fine grid.
    """
    if not flat:
        return 0.0
    composed = prv_composition(flat, delta / 1000, PRV_SEARCH_EPS_ERROR)
    try:
        if composed is not None:
            if upper:
                return max(composed.epsilon_at(delta - delta / 1000) + PRV_EPS_ERROR, 0.0)
            return max(composed.epsilon_at(delta), 0.0)
    except PRVGridError:
        pass
    return rdp_epsilon(flat, delta)


@lru_cache(maxsize=4096)
def rdp_epsilon(flat: Flat, delta: float) -> float:
    """ε from Rényi DP, composed over all (q, σ) groups (opacus's conversion, clamped at 0)."""
    if not flat:
        return 0.0
    total = np.zeros(len(RDP_ORDERS))
    for (q, sigma), n in flat:
        total += np.asarray(opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=int(n), orders=RDP_ORDERS))
    with warnings.catch_warnings():  # "optimal order is the smallest/largest alpha": still a valid bound
        warnings.simplefilter("ignore", UserWarning)
        eps, _ = opacus_rdp.get_privacy_spent(orders=RDP_ORDERS, rdp=total, delta=delta)
    return max(float(eps), 0.0)  # the conversion can go below 0 for tiny losses and large δ; ε ≥ 0 always holds


PLD_DISCRETIZATION = 1e-3  # privacy-loss grid step for short runs; finer for long ones (see pld_epsilon)
#: largest privacy-loss grid (points) we let dp_accounting build; its composition holds ~20 float64 / complex
#: arrays of up to this size (~1 GB here); past it the grid step is coarsened (see pld_epsilon)
PLD_MAX_POINTS = 5_000_000


def pld_points(flat: Flat, interval: float) -> float:
    """About the size of dp_accounting's composition arrays for ``flat`` with grid step ``interval``: it
    bounds the composed privacy loss by Chernoff (moment) bounds at tail mass ~1e-15, which spans about
    ±ε_RDP(δ = 1e-15)."""
    return 2.0 * rdp_epsilon(flat, 1e-15) / interval


@lru_cache(maxsize=4096)
def pld_epsilon(flat: Flat, delta: float) -> float:
    """ε from dp_accounting's PLD accountant (pessimistic: an upper bound up to its grid).

    Where the grid would exceed ``PLD_MAX_POINTS`` points (high-ε runs: σ = 2, T = 1e5 asked for 2.2 GiB
    arrays), its step is coarsened to fit, as the prv accountant coarsens its ε-error: the pessimistic
    discretisation is an upper bound at any step, only a looser one. If no grid size can be estimated (the
    RDP bound is infinite), the RDP ε stands in, as for prv.
    """
    if not flat:
        return 0.0
    from dp_accounting import dp_event, pld

    # the pessimistic rounding error grows with the number of compositions: refine the grid as 1/√T
    total = sum(n for _, n in flat)
    interval = min(PLD_DISCRETIZATION, 0.03 / math.sqrt(total))
    points = pld_points(flat, interval)
    if not math.isfinite(points):
        return rdp_epsilon(flat, delta)
    if points > PLD_MAX_POINTS:
        interval *= points / PLD_MAX_POINTS
    acc = pld.PLDAccountant(value_discretization_interval=interval)
    for (q, sigma), n in flat:
        event = dp_event.GaussianDpEvent(sigma)
        acc.compose(event if q >= 1 else dp_event.PoissonSampledDpEvent(q, event), int(n))
    return float(acc.get_epsilon(delta))


def gdp_mu_of(flat: Flat) -> float:
    """CLT μ of the composition (heterogeneous steps add in μ²)."""
    mu2 = 0.0
    for (q, sigma), n in flat:
        mu2 += n / sigma ** 2 if q >= 1 else n * q * q * expm1_or_inf(1.0 / sigma ** 2)
    return math.sqrt(mu2)


def gdp_epsilon(flat: Flat, delta: float) -> float:
    return eps_from_gdp(gdp_mu_of(flat), delta)
