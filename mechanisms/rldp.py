"""RLDP: a soft actor-critic hyper-policy that sets per-group clip thresholds and the step's σ
(after Khadangi et al. 2025, "Efficient Differentially Private Fine-Tuning of LLMs via
Reinforcement Learning", arXiv 2507.22565).

Every ``interval`` steps the policy (:class:`mechanisms.sac.SoftActorCritic`, trained online)
reads an observation and outputs a ∈ [−1, 1]^(G+1):

- a_g sets group g's target quantile γ_g = γ_lo + (γ_hi − γ_lo)(a_g + 1)/2; the threshold C_g
  then follows γ_g by the private geometric update of Andrew et al. 2021 at every step
  (:func:`mechanisms.adaptive_clipping.geometric_clip_update`), so the policy sets the
  thresholds through the quantile of the norm distribution each group is clipped at;
- a_G sets the requested noise multiplier σ_req = σ_ref · r^(a_G) (r = ``noise_range``);
  the caller raises it to the budget floor (:mod:`accountants.noise_floor`) before use.

What the controller sees — only privatized or public quantities:

- private, noised and accounted (part of each step's Gaussian mechanism, see
  :func:`mechanisms.adaptive_clipping.combined_noise_multiplier`): per-group unclipped
  fractions f̃_g (one point of each group's norm CDF, at C_g: the private quantile estimate),
  and the batch loss, clamped to [0, B] and noised (:func:`noised_mean_loss`);
- public: its own thresholds and σ (functions of past releases), the fraction of the budget
  spent (μ²-GDP of the recorded σ's over the plan's) and the fraction of planned steps left.

Raw per-example norms, counts and losses enter :meth:`RLDPController.release` only, which
returns them noised; everything downstream (:meth:`observe`, the reward, the policy) takes a
:class:`PrivateSignals`. Budget: with a share ρ of each step's precision 1/σ_t² given to the
statistics, the gradient noise is σ_Δ = σ_t/√(1 − ρ).

Reward of an interval: relative decrease of the noised loss minus ``privacy_penalty`` times the
excess spending rate σ_ref² · mean(1/σ_t²) − 1 (borrowing budget now costs noise later).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from .adaptive_clipping import CLIP_RANGE, NoisedStatistic, geometric_clip_update, noised_mean_loss, noised_unclipped_fraction
from .rng import cpu_generator
from .sac import SoftActorCritic


@dataclass(frozen=True)
class PrivateSignals:
    """What one step released about the data: noised unclipped fractions per group, noised mean loss."""

    unclipped_fraction: tuple[float, ...]
    mean_loss: float


@dataclass(frozen=True)
class PublicState:
    """Quantities that carry no new information about the data."""

    budget_spent_fraction: float  # μ²-GDP of the steps taken over that of the plan
    steps_left_fraction: float


@dataclass(frozen=True)
class RLDPSettings:
    """Hyper-parameters of the controller (defaults used by ``make_private(clipping="rldp")``)."""

    interval: int = 10
    statistics_share: float = 0.1
    loss_bound: float = 5.0
    quantile_range: tuple[float, float] = (0.3, 0.95)
    noise_range: float = 1.5
    clip_learning_rate: float = 0.2
    privacy_penalty: float = 0.05
    updates_per_decision: int = 8
    scale_step: bool = True  # dptrain: divide the update by S_t/S_0 (see dptrain.adaptive)

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise ValueError(f"RLDPSettings: interval must be >= 1 step, got {self.interval}")
        if not 0 < self.statistics_share < 1:
            raise ValueError(f"RLDPSettings: statistics_share must be in (0, 1), got {self.statistics_share}")
        lo, hi = self.quantile_range
        if not 0 < lo <= hi < 1:
            raise ValueError(f"RLDPSettings: quantile_range must satisfy 0 < lo <= hi < 1, got {self.quantile_range}")
        if not self.noise_range >= 1:
            raise ValueError(f"RLDPSettings: noise_range must be >= 1, got {self.noise_range}")
        if not self.loss_bound > 0:
            raise ValueError(f"RLDPSettings: loss_bound must be > 0, got {self.loss_bound}")


class RLDPController:
    """Per-group thresholds and requested σ from an online SAC policy on private signals."""

    def __init__(self, initial_thresholds: Mapping[str, float], reference_noise: float, planned_steps: int,
                 expected_batch_size: float, settings: RLDPSettings = RLDPSettings(), seed: int | None = None) -> None:
        if not initial_thresholds:
            raise ValueError("RLDPController: no parameter groups given")
        self.settings, self.names = settings, list(initial_thresholds)
        self.initial = {k: float(v) for k, v in initial_thresholds.items()}
        self.thresholds = dict(self.initial)
        self.reference_noise, self.planned_steps = float(reference_noise), int(planned_steps)
        self.expected_batch_size = float(expected_batch_size)
        g = len(self.names)
        self.agent = SoftActorCritic(2 * g + 5, g + 1, lr=3e-3, seed=seed)
        # the noise on the statistics (a privacy guarantee rests on it): a full-entropy stream of its own, not
        # one seeded through torch's manual_seed (which keeps 32 bits: 2^32 seeds would recover the noise)
        self.generator = cpu_generator(seed, device_key="rldp-statistics")
        self.action = torch.zeros(g + 1)
        self.window: list[PrivateSignals] = []
        self.window_noise: list[float] = []
        self.last_obs: torch.Tensor | None = None
        self.last_loss: float | None = None
        self.decisions, self.rewards = 0, []

    # ------------------------------------------------------------------ what the step uses
    @property
    def target_quantiles(self) -> list[float]:
        lo, hi = self.settings.quantile_range
        return [lo + (hi - lo) * (float(a) + 1) / 2 for a in self.action[:-1]]

    def requested_noise(self) -> float:
        return self.reference_noise * self.settings.noise_range ** float(self.action[-1])

    def statistics(self, noise_multiplier: float) -> tuple[NoisedStatistic, NoisedStatistic]:
        """The step's released statistics at total σ: each gets half the share ρ of 1/σ²."""
        rho = self.settings.statistics_share / 2
        counts_sens = math.sqrt(len(self.names)) / 2  # G centred indicators, ½ each
        loss_sens = self.settings.loss_bound / 2
        return (NoisedStatistic(counts_sens, noise_multiplier * counts_sens / math.sqrt(rho)),
                NoisedStatistic(loss_sens, noise_multiplier * loss_sens / math.sqrt(rho)))

    def gradient_noise(self, noise_multiplier: float) -> float:
        return noise_multiplier / math.sqrt(1 - self.settings.statistics_share)

    # ------------------------------------------------------------------ privatization (the only data entry)
    def release(self, unclipped: Mapping[str, int], batch_size: int, example_losses: torch.Tensor,
                noise_multiplier: float) -> PrivateSignals:
        """Noise the step's raw counts and losses; only the returned signals are kept."""
        counts_stat, loss_stat = self.statistics(noise_multiplier)
        counts = [int(unclipped[k]) for k in self.names]
        fractions = noised_unclipped_fraction(counts, batch_size, self.expected_batch_size, counts_stat.std,
                                              self.generator)
        loss = noised_mean_loss(example_losses, self.settings.loss_bound, self.expected_batch_size,
                                loss_stat.std, self.generator)
        return PrivateSignals(tuple(float(f) for f in fractions), loss)

    # ------------------------------------------------------------------ control
    def observation(self, window: Sequence[PrivateSignals], public: PublicState) -> torch.Tensor:
        """Observation vector from released signals and public state only."""
        frac = torch.tensor([[s.unclipped_fraction[i] for i in range(len(self.names))] for s in window],
                            dtype=torch.float32).mean(0).clamp(-1.0, 2.0)
        log_clip = torch.tensor([math.log(self.thresholds[k] / self.initial[k]) for k in self.names],
                                dtype=torch.float32).clamp(-10, 10)
        loss = sum(s.mean_loss for s in window) / len(window)
        trend = 0.0 if self.last_loss is None else (loss - self.last_loss)
        b = self.settings.loss_bound
        tail = torch.tensor([loss / b, trend / b, public.budget_spent_fraction, public.steps_left_fraction,
                             math.log(self.requested_noise() / self.reference_noise)], dtype=torch.float32)
        return torch.cat([frac, log_clip, tail.clamp(-10, 10)])

    def decision_due(self) -> bool:
        """Whether the next :meth:`observe` ends an interval (the policy then acts)."""
        return len(self.window) + 1 >= self.settings.interval

    def observe(self, signals: PrivateSignals, noise_multiplier: float, public: PublicState) -> None:
        """After a step: update thresholds toward their quantiles; every ``interval`` steps, learn and act."""
        for k, f, gamma in zip(self.names, signals.unclipped_fraction, self.target_quantiles):
            c = geometric_clip_update(self.thresholds[k], f, gamma, self.settings.clip_learning_rate)
            self.thresholds[k] = min(max(c, self.initial[k] / CLIP_RANGE), self.initial[k] * CLIP_RANGE)
        self.window.append(signals)
        self.window_noise.append(float(noise_multiplier))
        if len(self.window) < self.settings.interval:
            return
        obs = self.observation(self.window, public)
        loss = sum(s.mean_loss for s in self.window) / len(self.window)
        if self.last_obs is not None and self.last_loss is not None:
            gain = (self.last_loss - loss) / max(abs(self.last_loss), 1e-2)
            spend = self.reference_noise ** 2 * sum(s ** -2 for s in self.window_noise) / len(self.window_noise) - 1
            reward = float(gain - self.settings.privacy_penalty * spend)
            self.rewards.append(reward)
            self.agent.store(self.last_obs, self.action, reward, obs, done=public.steps_left_fraction <= 0)
            self.agent.update(self.settings.updates_per_decision)
        self.action = self.agent.act(obs)
        self.last_obs, self.last_loss = obs, loss
        self.window, self.window_noise = [], []
        self.decisions += 1

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"thresholds": dict(self.thresholds), "initial": dict(self.initial), "action": self.action.clone(),
                "window": [(list(s.unclipped_fraction), s.mean_loss) for s in self.window],
                "window_noise": list(self.window_noise),
                "last_obs": None if self.last_obs is None else self.last_obs.clone(), "last_loss": self.last_loss,
                "decisions": self.decisions, "rewards": list(self.rewards), "agent": self.agent.state_dict(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["thresholds"]) != self.names:
            raise ValueError(f"RLDPController.load_state_dict: checkpoint groups {list(state['thresholds'])} "
                             f"differ from this model's {self.names}")
        self.thresholds = {k: float(v) for k, v in state["thresholds"].items()}
        self.initial = {k: float(v) for k, v in state["initial"].items()}
        self.action = state["action"].clone()
        self.window = [PrivateSignals(tuple(f), float(l)) for f, l in state["window"]]
        self.window_noise = [float(s) for s in state["window_noise"]]
        self.last_obs = None if state["last_obs"] is None else state["last_obs"].clone()
        self.last_loss = state["last_loss"]
        self.decisions, self.rewards = int(state["decisions"]), list(state["rewards"])
        self.agent.load_state_dict(state["agent"])
        self.generator.set_state(state["generator"])
