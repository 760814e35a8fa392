"""Trade-off curves (f-DP) of composed DP-SGD, and the shuffled-sampling limit.

Every (ε, δ(ε)) pair a mechanism satisfies bounds its trade-off function from below:
    β(α) ≥ max(0, 1 − δ(ε) − e^ε α, e^{−ε}(1 − δ(ε) − α))
(Dong, Roth & Su 2019, Prop. 2.4, with the symmetrised form), and the supremum over
all ε ≥ 0 of the privacy profile is the trade-off function the profile implies
(Prop. 2.12). We take δ(ε) from the composed privacy-loss distribution of the PRV
accountant, made conservative with its error bounds (δ at ε − ε_err, plus δ_err and the
float64 round-off), so
the numerical curve is a valid guarantee. For comparison: G_μ(α) = Φ(Φ⁻¹(1−α) − μ).

Shuffled DP-SGD limit (Ertan & van Dijk 2026, arXiv 2601.10237, abstract): for one epoch
of M shuffled steps, either σ ≥ 1/√(2 ln M) or the separation κ of the trade-off curve
from random guessing is at least (1/√8)(1 − 1/√(4π ln M)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from .backends import prv_composition
from .composition import Flat, flatten, poisson_gaussian
from .epsilon import check_run
from .events import DpEvent
from .prv_grid import PRVGridError

DEFAULT_ALPHAS = np.concatenate([np.logspace(-6, -1, 60), np.linspace(0.1, 1.0, 91)[1:]])


@lru_cache(maxsize=64)
def _profile(flat: Flat, eps_max: float, n_eps: int) -> tuple[np.ndarray, np.ndarray]:
    """Conservative privacy profile (ε grid, δ(ε)) of a composition, from one PRV composition."""
    delta_error = 1e-10
    composed = prv_composition(flat, delta_error)
    if composed is None:
        raise ValueError(f"tradeoff curve: the privacy-loss distribution of {flat} is too wide to discretise; "
                         "this configuration has essentially no privacy (ε in the hundreds)")
    eps_error = composed.grid.eps_error
    # beyond the ε where δ(ε) is negligible, lines add nothing: cap the grid there
    try:
        eps_tail = composed.epsilon(1e-9)[2]
    except PRVGridError:
        eps_tail = eps_max
    eps = np.linspace(0.0, min(eps_max, max(float(eps_tail), 1.0) * 1.5), n_eps)
    delta = np.minimum(1.0, composed.delta(eps - eps_error) + delta_error + composed.roundoff)  # δ(ε − ε_err), ε − ε_err < 0 too
    return eps, delta


def tradeoff_of_event(event: DpEvent, alphas: np.ndarray | None = None, eps_max: float = 30.0,
                      n_eps: int = 151) -> tuple[np.ndarray, np.ndarray]:
    """(α, β(α)): a lower bound on the trade-off function of ``event`` (type-II error β at type-I α)."""
    alphas = DEFAULT_ALPHAS if alphas is None else np.asarray(alphas, dtype=float)
    eps, delta = _profile(flatten(event), float(eps_max), int(n_eps))
    a = alphas[:, None]
    lines = np.maximum(1 - delta - np.exp(eps) * a, np.exp(-eps) * (1 - delta - a))
    return alphas, np.clip(lines.max(axis=1), 0.0, 1.0)


def tradeoff_curve(noise_multiplier: float, sample_rate: float, steps: int,
                   alphas: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Numerical trade-off curve of ``steps`` Poisson-sampled Gaussian steps (DP-SGD)."""
    check_run(noise_multiplier, sample_rate, steps)
    return tradeoff_of_event(poisson_gaussian(noise_multiplier, sample_rate, steps), alphas)


def tradeoff_separation(alphas: np.ndarray, betas: np.ndarray) -> float:
    """κ: the largest Euclidean distance between the curve and the line β = 1 − α."""
    alphas, betas = np.asarray(alphas, float), np.asarray(betas, float)
    return float(max(0.0, np.max((1.0 - alphas - betas) / math.sqrt(2.0))))


@dataclass(frozen=True)
class ShuffledLimit:
    """Where a configuration sits w.r.t. the Ertan & van Dijk (2026) dichotomy."""

    steps_per_epoch: int
    noise_multiplier: float
    kappa: float
    sigma_threshold: float  # 1/√(2 ln M)
    kappa_threshold: float  # (1/√8)(1 − 1/√(4π ln M))

    @property
    def weak_regime(self) -> bool:
        """σ below the threshold: the paper proves κ ≥ kappa_threshold (a large separation)."""
        return self.noise_multiplier < self.sigma_threshold

    def warning(self) -> str | None:
        if not self.weak_regime:
            return None
        return (f"σ={self.noise_multiplier:.3g} < 1/√(2 ln M) = {self.sigma_threshold:.3g} for M={self.steps_per_epoch} "
                f"shuffled steps: Ertan & van Dijk (2026) prove separation κ ≥ {self.kappa_threshold:.3g} "
                "from random guessing in this regime (weak privacy whatever ε says)")


def shuffled_limit(noise_multiplier: float, steps_per_epoch: int, kappa: float = float("nan")) -> ShuffledLimit:
    """Thresholds of the shuffled-sampling limit for one epoch of M = ``steps_per_epoch`` steps."""
    if steps_per_epoch < 2:
        raise ValueError(f"shuffled_limit: steps_per_epoch must be >= 2, got {steps_per_epoch}")
    ln_m = math.log(steps_per_epoch)
    return ShuffledLimit(int(steps_per_epoch), float(noise_multiplier), float(kappa),
                         1.0 / math.sqrt(2.0 * ln_m), (1.0 / math.sqrt(8.0)) * (1.0 - 1.0 / math.sqrt(4 * math.pi * ln_m)))
