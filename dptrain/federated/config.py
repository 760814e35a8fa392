"""Configuration of a federated run: algorithm, privacy unit, rounds, local training.

Two privacy units (``dp=``):

- ``"example"`` — example-level DP: every client trains locally with DP-SGD on its own data
  (Poisson rate q_k = batch_size / n_k, clip C, noise σ_k C per step, σ_k calibrated so that
  rounds × local_steps such steps spend ε at δ). Clients' data are disjoint, so the run is
  (max_k ε_k, δ)-DP with respect to one example (parallel composition; the server's averaging
  and FedSVD's SVD are post-processing). Event per local step: PoissonSampled(q_k, Gaussian(σ_k)).
- ``"client"`` — client-level DP (DP-FedAvg, McMahan et al. 2018, "Learning Differentially
  Private Recurrent Language Models", Alg. 1): each round every client joins with probability
  p (Poisson), trains without noise, its model update is clipped to L2 norm S, the server adds
  N(0, σ² S²) once to the sum and divides by the expected number of clients p·K. Event per
  round: PoissonSampled(p, Gaussian(σ)), over K clients.

``"none"`` runs the same rounds without clipping or noise (a non-private reference).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import PrivacyConfigError

ALGORITHMS = ("fedavg", "dp-lora", "ffa-lora", "fedsvd")
DP_UNITS = ("example", "client", "none")


@dataclass(frozen=True)
class FederatedConfig:
    """What ``make_federated`` was asked for."""

    algorithm: str = "fedavg"
    dp: str = "example"
    eps: float | None = 3.0
    delta: float | None = None
    rounds: int = 10
    local_steps: int = 5
    batch_size: int = 32
    lr: float = 0.1
    max_norm: float = 1.0
    client_rate: float = 1.0
    noise_multiplier: float | None = None
    server_lr: float = 1.0
    accountant: str = "prv"
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise PrivacyConfigError(f"make_federated: unknown algorithm {self.algorithm!r}; choose one of {ALGORITHMS}")
        if self.dp not in DP_UNITS:
            raise PrivacyConfigError(f"make_federated: unknown dp={self.dp!r}; choose one of {DP_UNITS} "
                                     "('example': local DP-SGD, 'client': clipped updates + server noise)")
        if self.dp != "none":
            if self.eps is None and self.noise_multiplier is None:
                raise PrivacyConfigError("make_federated: give a target eps (e.g. eps=3) or a noise_multiplier "
                                         "(or dp='none' for a non-private run)")
            if self.eps is not None and not (self.eps > 0 and math.isfinite(self.eps)):
                raise PrivacyConfigError(f"make_federated: eps must be a positive finite number, got {self.eps}")
            if self.noise_multiplier is not None and not self.noise_multiplier >= 0:
                raise PrivacyConfigError(f"make_federated: noise_multiplier must be >= 0, got {self.noise_multiplier}")
            if self.noise_multiplier == 0 and self.eps is not None:
                raise PrivacyConfigError("make_federated: noise_multiplier=0 gives no finite ε; pass eps=None "
                                         "to run clipped but un-noised rounds (ε = ∞)")
        if self.delta is not None and not 0 < self.delta < 1:
            raise PrivacyConfigError(f"make_federated: delta must be in (0, 1), got {self.delta}")
        for name in ("rounds", "local_steps", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise PrivacyConfigError(f"make_federated: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "max_norm", "server_lr"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise PrivacyConfigError(f"make_federated: {name} must be a positive finite number, got {value}")
        if not 0 < self.client_rate <= 1:
            raise PrivacyConfigError(f"make_federated: client_rate must be in (0, 1], got {self.client_rate}")

    @property
    def private(self) -> bool:
        return self.dp != "none"
