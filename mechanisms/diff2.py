"""DIFF2: private gradient estimator from gradient differences (Murata & Suzuki, ICML 2023).

"DIFF2: Differential Private Optimization via Gradient Differences for Nonconvex Distributed
Learning", arXiv 2302.03884 (PMLR v202). Units u (examples, or whole clients for client-level
DP) hold gradients g_u(x). At round t (0-based) with iterate x_t and N units:

* refresh rounds, t mod T = 0:  v_t = (Σ_u clip_{C1}(g_u(x_t)) + ξ_t) / N,       ξ_t ~ N(0, (z1·C1)² I)
* other rounds:                 v_t = v_{t−1} + (Σ_u clip_{r_t}(g_u(x_t) − g_u(x_{t−1})) + ξ_t) / N,
                                r_t = C2·‖x_t − x_{t−1}‖,                          ξ_t ~ N(0, (z2·r_t)² I)

and the GD subroutine ("DIFF2-GD") steps x_{t+1} = x_t − η v_t. With T = 1 every round is a
refresh and DIFF2 is DP-GD. The difference clip radius moves with the step: for L-smooth
per-unit losses ‖g_u(x_t) − g_u(x_{t−1})‖ ≤ L‖x_t − x_{t−1}‖, so C2 plays the role of a per-unit
smoothness constant and, with C2 ≥ L, no difference is clipped at all; a round's sensitivity
and noise shrink with the step η‖v_{t−1}‖.

Privacy (add/remove-one-unit neighbours; example-level DP when units are examples,
client-level DP when they are clients). The iterates are public functions of earlier releases
(and of the public initialisation), so r_t is fixed before round t looks at the data. Adding or
removing one unit changes a round's sum by at most C1 (refresh) or r_t (difference), and the
noise std is z1·C1 or z2·r_t: round t is a Gaussian mechanism with noise multiplier z1 or z2
whatever r_t is (r_t = 0 releases exactly zero: no loss). R rounds are the adaptive composition
of K1 = ⌈R/T⌉ GaussianEvent(z1) and R − K1 GaussianEvent(z2): exactly μ-GDP with
μ² = K1/z1² + (R − K1)/z2² (Dong, Roth & Su 2019, Corollary 3.3). The paper's calibration
σ1 ∝ C1√(R/T), σ2 ∝ C2√R splits the budget between the two phases; :func:`calibrate_diff2`
gives the refresh phase a share s of μ² (default s = 0.8, the split of the authors' public
reproduction code, u = 1.25 → 1/u to the refreshes) and finds μ for a target ε through
:mod:`accountants` (exact composition, where the paper bounds it through RDP).
The noise is added once to the sum over all units (trusted aggregator, or rank 0 of a
``torch.distributed`` group).

Checked against (facts only): the authors' reproduction code ("Diff2_GD_Server" in a public fork
of it, lawrenceztang/CE-PLSGM, src/optimizers.py) and a public summary of the paper: the
recursion and refresh at t mod T = 0 from t = 0, per-example clipping of the full local
gradients and of their differences, r_t = C2·‖x_t − x_{t−1}‖ with the noise scaled to r_t, the
two noise scales σ1² ∝ R/T and σ2² ∝ R, and the GD step with the current estimate. Deliberate
differences: add/remove neighbours and a plain sum over all N units divided by N (the code
uses replace-one neighbours and a mean of client means, sensitivity 2C/(n_min·P)); exact GDP/PLD
composition of the K1 + K2 rounds instead of an RDP bound that charges the difference phase
for all R rounds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

import accountants
from accountants.events import ComposedEvent, DpEvent, GaussianEvent, SelfComposedEvent

from .rng import DeviceGenerators


@dataclass(frozen=True)
class Diff2Config:
    """R rounds, refresh period T, gradient clip C1, difference clip per unit distance C2, noise multipliers.

    ``clip_grad`` C1 bounds each unit's gradient; ``clip_diff`` C2 scales the difference clip
    radius r_t = C2·‖x_t − x_{t−1}‖ (a per-unit smoothness bound); z1 = std / C1, z2 = std / r_t.
    """

    rounds: int
    refresh_every: int
    clip_grad: float
    clip_diff: float
    noise_grad: float
    noise_diff: float

    def __post_init__(self) -> None:
        if int(self.rounds) != self.rounds or self.rounds < 1:
            raise ValueError(f"Diff2Config: rounds must be a positive integer, got {self.rounds}")
        if int(self.refresh_every) != self.refresh_every or self.refresh_every < 1:
            raise ValueError(f"Diff2Config: refresh_every (T) must be a positive integer, got {self.refresh_every}; "
                             "T = 1 is DP-GD")
        for name in ("clip_grad", "clip_diff"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise ValueError(f"Diff2Config: {name} must be a positive finite threshold, got {v}")
        for name in ("noise_grad", "noise_diff"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"Diff2Config: {name} must be >= 0 (0 = no noise, not private), got {v}")

    @property
    def refresh_rounds(self) -> int:
        """K1 = ⌈R/T⌉: rounds t < R with t mod T = 0."""
        return -(-self.rounds // self.refresh_every)

    @property
    def diff_rounds(self) -> int:
        return self.rounds - self.refresh_rounds

    @property
    def private(self) -> bool:
        return self.noise_grad > 0 and (self.noise_diff > 0 or self.diff_rounds == 0)


def diff2_event(noise_grad: float, noise_diff: float, refresh_rounds: int, diff_rounds: int) -> DpEvent:
    """K1 refreshes at GaussianEvent(z1) composed with K2 difference rounds at GaussianEvent(z2)."""
    parts: list[DpEvent] = []
    if refresh_rounds:
        parts.append(SelfComposedEvent(GaussianEvent(noise_grad), int(refresh_rounds)))
    if diff_rounds:
        parts.append(SelfComposedEvent(GaussianEvent(noise_diff), int(diff_rounds)))
    if not parts:
        raise ValueError("diff2_event: no rounds")
    return parts[0] if len(parts) == 1 else ComposedEvent(tuple(parts))


def diff2_mu(noise_grad: float, noise_diff: float, refresh_rounds: int, diff_rounds: int) -> float:
    """Exact GDP μ of the composition: μ = √(K1/z1² + K2/z2²)."""
    return math.sqrt(refresh_rounds / noise_grad ** 2 + (diff_rounds / noise_diff ** 2 if diff_rounds else 0.0))


def calibrate_diff2(target_eps: float, delta: float, rounds: int, refresh_every: int,
                    accountant: str = "prv", grad_share: float = 0.8, rtol: float = 1e-3) -> tuple[float, float]:
    """(z1, z2) with ε(R rounds) ≤ ``target_eps`` at ``delta``, each phase given its share of μ².

    z1 = √(K1/(s·μ²)), z2 = √(K2/((1−s)·μ²)) with s = ``grad_share`` (the paper's σ1 ∝ C1√(R/T),
    σ2 ∝ C2√R; s = 0.8 is the authors' code's split); μ is found by bisection on ε from ``accountants.epsilon_of_event``,
    largest μ (least noise) within ``rtol`` whose ε ≤ target. With T = 1 this is DP-GD's σ.
    """
    if not (target_eps > 0 and math.isfinite(target_eps)):
        raise ValueError(f"calibrate_diff2: target_eps must be a positive finite number, got {target_eps}")
    cfg = Diff2Config(rounds, refresh_every, 1.0, 1.0, 1.0, 1.0)
    k1, k2 = cfg.refresh_rounds, cfg.diff_rounds
    s = 1.0 if k2 == 0 else float(grad_share)
    if not 0 < s <= 1 or (k2 and s == 1):
        raise ValueError(f"calibrate_diff2: grad_share must be in (0, 1), got {grad_share}")

    def noises(mu: float) -> tuple[float, float]:
        z1 = math.sqrt(k1 / (s * mu * mu))
        z2 = math.sqrt(k2 / ((1 - s) * mu * mu)) if k2 else z1
        return z1, z2

    def eps_of(mu: float) -> float:
        return accountants.epsilon_of_event(diff2_event(*noises(mu), k1, k2), delta, accountant)

    lo = hi = max(1e-3, _gdp_mu_for(target_eps, delta))
    while eps_of(lo) > target_eps:
        lo /= 1.5
    while eps_of(hi) <= target_eps:
        hi *= 1.5
    while hi / lo > 1 + rtol:
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if eps_of(mid) <= target_eps else (lo, mid)
    return noises(lo)


def _gdp_mu_for(eps: float, delta: float) -> float:
    """μ with ε(μ; δ) = eps for μ-GDP (a starting point for the bisection)."""
    lo, hi = 1e-4, 1.0
    while accountants.eps_from_gdp(hi, delta) < eps:
        hi *= 2
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if accountants.eps_from_gdp(mid, delta) < eps else (lo, mid)
    return lo


class Diff2Mechanism:
    """DIFF2's noise and estimator recursion; state: the estimate v, the round, the noise RNG.

    ``noise(sums, t, distance)`` adds round t's Gaussian noise to the clipped sums (done once, by
    the aggregator); ``update(noised, t, n_units)`` applies the recursion on every replica.
    ``distance`` is ‖x_t − x_{t−1}‖ (public), needed on difference rounds only.
    """

    name = "diff2"

    def __init__(self, config: Diff2Config, seed: int | None = None) -> None:
        self.config = config
        self.estimate: list[torch.Tensor] | None = None
        self.round = 0
        self._rng = DeviceGenerators(seed)

    def is_refresh(self, t: int) -> bool:
        return t % self.config.refresh_every == 0

    def clip_threshold(self, t: int, distance: float | None = None) -> float:
        """C1 on refreshes; r_t = C2·‖x_t − x_{t−1}‖ on difference rounds (``distance`` = ‖x_t − x_{t−1}‖)."""
        if self.is_refresh(t):
            return self.config.clip_grad
        if distance is None or not (distance >= 0 and math.isfinite(distance)):
            raise ValueError(f"Diff2Mechanism: difference round {t} needs distance = ‖x_t − x_(t−1)‖ >= 0 (finite), "
                             f"got {distance}; the clip radius is C2·distance")
        return self.config.clip_diff * float(distance)

    def noise_std(self, t: int, distance: float | None = None) -> float:
        """z1·C1 on refreshes, z2·r_t on difference rounds."""
        z = self.config.noise_grad if self.is_refresh(t) else self.config.noise_diff
        return z * self.clip_threshold(t, distance)

    def noise(self, clipped_sums: Sequence[torch.Tensor], t: int, distance: float | None = None) -> list[torch.Tensor]:
        """Σ_u clip(·) + ξ_t, ξ_t ~ N(0, noise_std(t, distance)² I)."""
        std = self.noise_std(t, distance)
        if std == 0:
            return [s.clone() for s in clipped_sums]
        return self._rng.noised(clipped_sums, std)

    def update(self, noised_sums: Sequence[torch.Tensor], t: int, n_units: int) -> list[torch.Tensor]:
        """v_t from round t's noised sum (refresh or difference); returns the new estimate."""
        if t != self.round:
            raise ValueError(f"Diff2Mechanism: update(t={t}) but the estimator is at round {self.round}; rounds "
                             "run in order (restore with load_state_dict when resuming)")
        if t >= self.config.rounds:
            raise ValueError(f"Diff2Mechanism: round {t} is past the {self.config.rounds} planned (and accounted) "
                             "rounds")
        if n_units < 1:
            raise ValueError(f"Diff2Mechanism: n_units must be >= 1, got {n_units}")
        step = [s / n_units for s in noised_sums]
        if self.is_refresh(t):
            self.estimate = step
        else:
            assert self.estimate is not None
            self.estimate = [v + d for v, d in zip(self.estimate, step)]
        self.round += 1
        return self.estimate

    def round_event(self, t: int) -> DpEvent:
        """Round t's event: GaussianEvent(z1) on refreshes, GaussianEvent(z2) otherwise."""
        if not self.config.private:
            raise ValueError("Diff2Mechanism: noise_grad / noise_diff = 0 releases exact sums; there is no privacy "
                             "event (the run is not private)")
        c = self.config
        return GaussianEvent(c.noise_grad if self.is_refresh(t) else c.noise_diff)

    def run_event(self, rounds: int | None = None) -> DpEvent:
        """Event of the first ``rounds`` rounds (all planned rounds by default)."""
        rounds = self.config.rounds if rounds is None else int(rounds)
        k1 = -(-rounds // self.config.refresh_every)
        self.round_event(0)  # refuses a non-private configuration
        return diff2_event(self.config.noise_grad, self.config.noise_diff, k1, rounds - k1)

    def state_dict(self) -> dict[str, Any]:
        return {"round": self.round, "estimate": self.estimate, "seed": self._rng.seed,
                "generators": self._rng.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.round, self.estimate = int(state["round"]), state["estimate"]
        self._rng.load_state_dict(state["seed"], state["generators"])
