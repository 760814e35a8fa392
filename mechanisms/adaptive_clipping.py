"""Quantile adaptive clipping (Andrew, Thakkar, McMahan & Ramaswamy, NeurIPS 2021).

The clip norm C follows a target quantile γ of the per-example gradient norms. Each step
releases, next to the noised gradient sum, the noised *centred* count of unclipped examples

    b̃ = Σ_i (1[‖g_i‖ ≤ C] − ½) + N(0, σ_b²),      fraction estimate  f̃ = b̃ / n̄ + ½

(n̄ = q·N the expected batch size, public), and updates C geometrically (their Alg. 1, Eq. 2):

    C ← C · exp(−η (f̃ − γ)).

Privacy: one example changes the clipped sum by ≤ C (L2) and each centred count by ½. The
gradient sum noised with std σ_Δ·C and k count-like statistics of sensitivity Δ_j noised with
std s_j are together ONE Gaussian mechanism with noise multiplier (their Thm. 1, generalised
to k statistics exactly as DESIGN.md invariant 6 does for parameter groups)

    σ = (σ_Δ⁻² + Σ_j (Δ_j / s_j)²)^(−1/2).

That σ is what the accountant is told; :func:`gradient_noise_multiplier` inverts it so that
a run calibrated to σ adds gradient noise σ_Δ ≥ σ and spends nothing extra on the count.
C for the next step is a post-processing of released values, so it may depend on them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .rng import cpu_generator

#: Andrew et al. recommend η = 0.2 for the geometric update and σ_b = n̄/20
DEFAULT_CLIP_LEARNING_RATE = 0.2
DEFAULT_COUNT_NOISE_FRACTION = 1 / 20
#: thresholds stay within this factor of their initial value (no under/overflow on long runs)
CLIP_RANGE = 1e6


@dataclass(frozen=True)
class NoisedStatistic:
    """A released statistic: L2 ``sensitivity`` of one example's contribution, noise ``std``."""

    sensitivity: float
    std: float

    def __post_init__(self) -> None:
        if not (self.sensitivity >= 0 and math.isfinite(self.sensitivity)):
            raise ValueError(f"NoisedStatistic: sensitivity must be >= 0 and finite, got {self.sensitivity}")
        if not self.std > 0:
            raise ValueError(f"NoisedStatistic: std must be > 0, got {self.std}; a statistic released "
                             "without noise is not private")

    @property
    def precision(self) -> float:
        """(Δ / s)²: this statistic's share of 1/σ² (the Gaussian mechanism's μ²)."""
        return (self.sensitivity / self.std) ** 2


def combined_noise_multiplier(gradient_noise_multiplier: float, statistics: Sequence[NoisedStatistic]) -> float:
    """σ = (σ_Δ⁻² + Σ_j (Δ_j/s_j)²)^(−1/2): gradient sum and statistics as one Gaussian mechanism."""
    if not gradient_noise_multiplier > 0:
        raise ValueError(f"combined_noise_multiplier: gradient noise multiplier must be > 0, "
                         f"got {gradient_noise_multiplier}")
    return 1.0 / math.sqrt(gradient_noise_multiplier ** -2 + sum(s.precision for s in statistics))


def gradient_noise_multiplier(noise_multiplier: float, statistics: Sequence[NoisedStatistic]) -> float:
    """σ_Δ = (σ⁻² − Σ_j (Δ_j/s_j)²)^(−1/2), the inverse of :func:`combined_noise_multiplier`."""
    rest = noise_multiplier ** -2 - sum(s.precision for s in statistics)
    if not rest > 0:
        used = sum(s.precision for s in statistics) * noise_multiplier ** 2
        raise ValueError(
            f"adaptive clipping: the released statistics alone use {used:.0%} of the budget of one step at "
            f"noise multiplier σ={noise_multiplier:.4g}, leaving nothing for the gradient; raise their noise "
            "(count_noise_std / the statistics' budget share) or the batch size")
    return rest ** -0.5


def geometric_clip_update(clip: float, unclipped_fraction: float, target_quantile: float,
                          learning_rate: float = DEFAULT_CLIP_LEARNING_RATE) -> float:
    """C · exp(−η (f̃ − γ)) (Andrew et al. 2021, Eq. 2): C grows while fewer than γ are unclipped."""
    return float(clip * math.exp(-learning_rate * (unclipped_fraction - target_quantile)))


def noised_unclipped_fraction(unclipped: torch.Tensor | Sequence[int], batch_size: int, expected_batch_size: float,
                              std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """f̃ = (Σ_i (b_i − ½) + N(0, std²)) / n̄ + ½ for each entry of ``unclipped`` (counts Σ_i b_i).

    Only the noised value leaves this function; it is unbiased for the unclipped fraction
    (up to n/n̄, the realised over the expected batch size).
    """
    counts = torch.as_tensor(unclipped, dtype=torch.float64)
    noise = torch.randn(counts.shape, generator=generator, dtype=torch.float64)
    return (counts - 0.5 * batch_size + std * noise) / expected_batch_size + 0.5


def noised_mean_loss(example_losses: torch.Tensor, bound: float, expected_batch_size: float, std: float,
                     generator: torch.Generator | None = None) -> float:
    """(Σ_i (clamp(ℓ_i, 0, B) − B/2) + N(0, std²)) / n̄ + B/2: a private batch loss (sensitivity B/2)."""
    clamped = example_losses.detach().double().nan_to_num(nan=bound, posinf=bound).clamp(0.0, bound)
    noise = torch.randn((), generator=generator, dtype=torch.float64)
    return float((clamped - bound / 2).sum() + std * noise) / expected_batch_size + bound / 2


class QuantileClipController:
    """State of quantile adaptive clipping: the current C and the count's noise generator.

    ``clip`` is the norm used at the next step; :meth:`update` takes the *noised* fraction.
    """

    def __init__(self, initial_clip: float, target_quantile: float = 0.5,
                 learning_rate: float = DEFAULT_CLIP_LEARNING_RATE, count_noise_std: float = 1.0,
                 seed: int | None = None) -> None:
        if not (initial_clip > 0 and math.isfinite(initial_clip)):
            raise ValueError(f"QuantileClipController: initial_clip must be > 0, got {initial_clip}")
        if not 0 < target_quantile < 1:
            raise ValueError(f"QuantileClipController: target_quantile must be in (0, 1), got {target_quantile}; "
                             "0.5 clips at the median norm")
        if not learning_rate > 0:
            raise ValueError(f"QuantileClipController: learning_rate must be > 0, got {learning_rate}")
        self.clip = self.initial_clip = float(initial_clip)
        self.target_quantile = float(target_quantile)
        self.learning_rate = float(learning_rate)
        self.count_statistic = NoisedStatistic(0.5, float(count_noise_std))
        self.generator = cpu_generator(seed)  # the count noise: every bit of the seed counts

    @property
    def statistics(self) -> tuple[NoisedStatistic, ...]:
        return (self.count_statistic,)

    def release(self, unclipped: int, batch_size: int, expected_batch_size: float) -> float:
        """The noised unclipped fraction of this step (the only data-dependent value kept)."""
        return float(noised_unclipped_fraction([unclipped], batch_size, expected_batch_size,
                                               self.count_statistic.std, self.generator)[0])

    def update(self, noised_fraction: float) -> float:
        clip = geometric_clip_update(self.clip, noised_fraction, self.target_quantile, self.learning_rate)
        self.clip = min(max(clip, self.initial_clip / CLIP_RANGE), self.initial_clip * CLIP_RANGE)
        return self.clip

    def state_dict(self) -> dict[str, Any]:
        return {"clip": self.clip, "initial_clip": self.initial_clip, "target_quantile": self.target_quantile, "learning_rate": self.learning_rate,
                "count_noise_std": self.count_statistic.std, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clip, self.initial_clip = float(state["clip"]), float(state["initial_clip"])
        self.target_quantile = float(state["target_quantile"])
        self.learning_rate = float(state["learning_rate"])
        self.count_statistic = NoisedStatistic(0.5, float(state["count_noise_std"]))
        self.generator.set_state(state["generator"])
