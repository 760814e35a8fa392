"""DP-SGD's Gaussian mechanism (Abadi et al. 2016).

Given the sum of clipped per-example gradients S (each contribution has L2 norm ≤ C),
release S + N(0, σ²C² I). With Poisson sampling at rate q this is one
``PoissonSampledEvent(q, GaussianEvent(σ))`` per step.

Randomness: a torch.Generator per device, seeded from the OS's entropy unless a seed
is given (a seed is for reproducible experiments; a deployment should not fix it).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from accountants.events import DpEvent, GaussianEvent, PoissonSampledEvent

from .base import NoiseMechanism
from .rng import DeviceGenerators


class GaussianMechanism(NoiseMechanism):
    """Adds i.i.d. N(0, (σ·C)²) noise to every coordinate of every clipped sum."""

    name = "dpsgd"

    def __init__(self, noise_multiplier: float, max_grad_norm: float, seed: int | None = None) -> None:
        if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
            raise ValueError(f"GaussianMechanism: noise_multiplier must be >= 0, got {noise_multiplier}")
        if not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
            raise ValueError(f"GaussianMechanism: max_grad_norm must be > 0, got {max_grad_norm}")
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self._rng = DeviceGenerators(seed)

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise per coordinate: σ·C."""
        return self.noise_multiplier * self.max_grad_norm

    @property
    def seed(self) -> int:
        return self._rng.seed

    def privatize(self, clipped_sums: Sequence[torch.Tensor], step: int) -> list[torch.Tensor]:
        return self.privatize_mean(clipped_sums, step, 1.0)

    def privatize_mean(self, clipped_sums: Sequence[torch.Tensor], step: int, divisor: float) -> list[torch.Tensor]:
        """(S + σC·Z) / m with Z ~ N(0, I) from the device's noise source (:mod:`mechanisms.rng`): one
        new buffer per parameter, written in one pass with the draw on the CPU's Philox source.
        """
        return self._rng.noised(clipped_sums, self.noise_std / divisor, 1.0 / divisor)

    def privatize_mean_(self, clipped_sums: Sequence[torch.Tensor], step: int, divisor: float) -> list[torch.Tensor]:
        """:meth:`privatize_mean` written into the sums themselves when each is a contiguous tensor of
        its own (a view's storage is left alone): the same numbers, no new buffer."""
        if not all(s.is_contiguous() and s._base is None for s in clipped_sums):
            return self.privatize_mean(clipped_sums, step, divisor)
        self._rng.noised_(clipped_sums, self.noise_std / divisor, 1.0 / divisor)
        return list(clipped_sums)

    def step_event(self, sample_rate: float) -> DpEvent:
        return PoissonSampledEvent(sample_rate, GaussianEvent(self.noise_multiplier))

    def state_dict(self) -> dict[str, Any]:
        return {"noise_multiplier": self.noise_multiplier, "max_grad_norm": self.max_grad_norm,
                "seed": self.seed,
                "generators": self._rng.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.noise_multiplier = float(state["noise_multiplier"])
        self.max_grad_norm = float(state["max_grad_norm"])
        self._rng.load_state_dict(state["seed"], state["generators"])
