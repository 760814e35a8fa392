"""Adaptive clipping inside ``make_private``: ``clipping="quantile"`` and ``clipping="rldp"``.

One step, for both:

1. σ_t (the step's *total* noise multiplier, what the accountant is told): quantile — the
   calibrated σ of the plan; RLDP — the controller's request raised to the budget floor
   (:class:`NoiseGuard`), or :class:`BudgetExceededError` if no noise level fits;
2. clip at the current thresholds (flat C, or per-parameter C_g), sum;
3. noise the sum with std σ_Δ·S (S = √Σ C_g², σ_Δ from σ_t minus the statistics' share) and
   release the noised statistics (unclipped counts; for RLDP also the clamped loss);
4. optimizer step; the ledger records PoissonSampled(q, Gaussian(σ_t)); the controller
   updates its thresholds from the released statistics only.

Step scale: with ``scale_step`` (default) the privatized mean gradient is divided by S_t/S_0
(S_0 = ``max_grad_norm``, the first threshold). This is post-processing of the release with a
public factor; it keeps the learning rate's meaning while C adapts (the update of clipped
gradients scales with lr·C, so a C that follows a shrinking median would otherwise stall training).

Gradient sum + statistics are one Gaussian mechanism of multiplier σ_t
(:func:`mechanisms.adaptive_clipping.combined_noise_multiplier`), so each step's event is exact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

import accountants
from accountants.noise_floor import level_at_least, noise_floor, noise_level
from mechanisms.adaptive_clipping import (DEFAULT_CLIP_LEARNING_RATE, DEFAULT_COUNT_NOISE_FRACTION,
                                          QuantileClipController, gradient_noise_multiplier)
from mechanisms.rldp import PublicState, RLDPController, RLDPSettings

from .clipping import ClippingConfig, clip_and_sum
from .engine import trainable_parameters
from .errors import BudgetExceededError, PrivacyConfigError, refuse_step_over_budget

if TYPE_CHECKING:
    from .private import PrivateTraining

ADAPTIVE_CLIPPINGS = ("quantile", "rldp")


@dataclass(frozen=True)
class QuantileClipping:
    """``make_private(clipping=QuantileClipping(...))``; the string "quantile" means the defaults.

    ``count_noise_std`` None → n̄/20 (Andrew et al. 2021); the first C is ``max_grad_norm``.
    """

    target_quantile: float = 0.5
    learning_rate: float = DEFAULT_CLIP_LEARNING_RATE
    count_noise_std: float | None = None
    scale_step: bool = True


def adaptive_settings(clipping: Any) -> QuantileClipping | RLDPSettings | None:
    """The settings object for ``make_private(clipping=...)``, or None for non-adaptive clipping."""
    if isinstance(clipping, (QuantileClipping, RLDPSettings)):
        return clipping
    if clipping == "quantile":
        return QuantileClipping()
    if clipping == "rldp":
        return RLDPSettings()
    return None


class NoiseGuard:
    """Raises a requested σ to the smallest grid level that keeps the planned steps within ε.

    The floor level is only recomputed when a request is below it, at most once every
    ``refresh_every`` steps (the floor stays valid as long as every step uses σ_t ≥ floor: see
    :mod:`accountants.noise_floor`), and at every step past the planned ones.
    """

    def __init__(self, reference: float, sample_rate: float, planned_steps: int, delta: float,
                 target_eps: float, accountant: str, refresh_every: int = 1) -> None:
        self.reference, self.sample_rate, self.planned_steps = reference, sample_rate, planned_steps
        self.delta, self.target_eps, self.accountant = delta, target_eps, accountant
        self.floor = 0  # the calibrated σ fits the whole plan
        self.floor_step = 0
        self.refresh_every = max(1, int(refresh_every))
        self.refreshes = 0

    def admit(self, ledger: accountants.PrivacyLedger, step: int, requested: float) -> float:
        k = level_at_least(self.reference, requested)
        beyond = step >= self.planned_steps
        if (k < self.floor and step >= self.floor_step + self.refresh_every) or beyond:
            self._refresh(ledger, step, k)
        return noise_level(self.reference, max(k, self.floor))

    def _refresh(self, ledger: accountants.PrivacyLedger, step: int, k_req: int) -> None:
        remaining = max(1, self.planned_steps - step)
        beyond = step >= self.planned_steps
        lo = min(k_req, self.floor)
        found = noise_floor(ledger, self.sample_rate, remaining, self.delta, self.target_eps, self.reference,
                            self.accountant, k_min=lo, k_max=self.floor if not beyond else 48)
        self.refreshes += 1
        if found is None:
            spent = ledger.epsilon(self.delta, self.accountant)
            raise BudgetExceededError(
                f"rldp: no noise multiplier up to {noise_level(self.reference, 48):.3g} keeps step {step + 1} within "
                f"the target ε={self.target_eps} (spent so far ε={spent:.4g}, δ={self.delta:.3g}); training stops here")
        self.floor, self.floor_step = found, step

    def state_dict(self) -> dict[str, Any]:
        return {"floor": self.floor, "floor_step": self.floor_step, "refreshes": self.refreshes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.floor, self.floor_step, self.refreshes = int(state["floor"]), int(state["floor_step"]), int(state["refreshes"])


class AdaptiveClipping:
    """The adaptive-clipping part of a :class:`~dptrain.private.PrivateTraining` run."""

    def __init__(self, priv: "PrivateTraining", settings: QuantileClipping | RLDPSettings) -> None:
        plan = priv.plan
        assert plan is not None
        self.settings = settings
        self.sample_rate = plan.sample_rate
        self.expected_batch = plan.sample_rate * plan.dataset_size
        self.reference_sensitivity = priv.config.max_grad_norm
        seed = priv._seed(7)
        names = list(trainable_parameters(priv.model))
        self.history: list[dict[str, float]] = []
        self.guard: NoiseGuard | None = None
        if isinstance(settings, QuantileClipping):
            std = settings.count_noise_std or DEFAULT_COUNT_NOISE_FRACTION * self.expected_batch
            self.controller: QuantileClipController | RLDPController = QuantileClipController(
                priv.config.max_grad_norm, settings.target_quantile, settings.learning_rate, std, seed)
            try:
                gradient_noise_multiplier(plan.noise_multiplier, self.controller.statistics)
            except ValueError as exc:
                raise PrivacyConfigError(str(exc)) from None
        else:
            if priv.config.eps is None:
                raise PrivacyConfigError("make_private(clipping='rldp') needs a target eps: the controller chooses "
                                         "σ per step and is held to that budget")
            c = priv.config.max_grad_norm / math.sqrt(len(names))
            self.controller = RLDPController({n: c for n in names}, plan.noise_multiplier, plan.planned_steps,
                                             self.expected_batch, settings, seed)
            self.guard = NoiseGuard(plan.noise_multiplier, plan.sample_rate, plan.planned_steps, plan.delta,
                                    priv.config.eps, priv.config.accountant, refresh_every=settings.interval)

    # ------------------------------------------------------------------ one step
    def clipping(self) -> ClippingConfig:
        """This step's thresholds (public: functions of past released statistics)."""
        if isinstance(self.controller, QuantileClipController):
            return ClippingConfig(self.controller.clip)
        thresholds = dict(self.controller.thresholds)
        return ClippingConfig(math.sqrt(sum(c * c for c in thresholds.values())), thresholds)

    def noise_multiplier(self, priv: "PrivateTraining") -> float:
        """σ_t for the next step; raises BudgetExceededError when none keeps the run within ε."""
        plan = priv.plan
        assert plan is not None
        if self.guard is not None:
            return self.guard.admit(priv.ledger, priv.steps, self.controller.requested_noise())  # type: ignore[union-attr]
        target = priv.config.eps
        if target is not None and (priv.config.noise_multiplier is not None or priv.steps >= plan.planned_steps):
            refuse_step_over_budget(priv.ledger, self.event(plan.noise_multiplier), plan.delta,
                                    priv.config.accountant, target, priv.steps + 1, priv.epsilon_spent)
        return plan.noise_multiplier

    def event(self, noise_multiplier: float) -> accountants.DpEvent:
        return accountants.PoissonSampledEvent(self.sample_rate, accountants.GaussianEvent(noise_multiplier))

    def step(self, priv: "PrivateTraining", inputs: Any, targets: torch.Tensor) -> float:
        sigma = self.noise_multiplier(priv)
        config = self.clipping()
        if isinstance(self.controller, QuantileClipController):
            statistics: tuple = self.controller.statistics
        else:
            statistics = self.controller.statistics(sigma)
        sigma_grad = gradient_noise_multiplier(sigma, statistics)
        assert priv.optimizer is not None
        mechanism = priv.optimizer.mechanism
        priv.optimizer.zero_grad()
        params = trainable_parameters(priv.model)
        priv._check_trainable({id(p) for p in params.values()}, params)
        with priv._drawn_batch(inputs, targets):
            x, y = priv._to_device(inputs, targets, params=params)
            batch = clip_and_sum(priv.model, priv.loss_fn, x, y, config, chunk_size=priv.config.chunk_size,
                                 method=priv.config.engine)
        for name, p in params.items():
            p.grad = batch.sums[name]
        mechanism.noise_multiplier, mechanism.max_grad_norm = sigma_grad, config.sensitivity  # type: ignore[attr-defined]
        scale = config.sensitivity / self.reference_sensitivity if self.settings.scale_step else 1.0
        priv.optimizer.expected_batch_size = self.expected_batch * scale  # public divisor (post-processing)
        priv.optimizer._apply_step()
        priv.ledger.record(self.event(sigma))
        record = {"noise_multiplier": sigma, "gradient_noise_multiplier": sigma_grad,
                  "sensitivity": config.sensitivity}
        self.history.append(record)
        if isinstance(self.controller, QuantileClipController):
            unclipped = next(iter(batch.unclipped.values())) if batch.unclipped else 0
            fraction = self.controller.release(unclipped, batch.batch_size, self.expected_batch)
            self.controller.update(fraction)
            record["unclipped_fraction"] = fraction
        else:
            signals = self.controller.release(batch.unclipped, batch.batch_size, batch.example_losses, sigma)
            plan = priv.plan
            assert plan is not None and priv.config.eps is not None
            public = PublicState(self._budget_spent_fraction(priv),
                                 max(plan.planned_steps - priv.steps, 0) / plan.planned_steps)
            self.controller.observe(signals, sigma, public)
            record["noised_loss"] = signals.mean_loss
        return batch.mean_loss

    def _budget_spent_fraction(self, priv: "PrivateTraining") -> float:
        """Public, cheap: μ² of the steps taken over μ² of the plan (μ-GDP CLT, Dong, Roth & Su 2019).

        μ² = Σ_t q²(e^{1/σ_t²} − 1) adds over steps; the guarantee itself is enforced by the guard
        with the run's accountant, this is only the policy's view of how fast budget goes.
        """
        plan = priv.plan
        assert plan is not None
        per_step = [math.expm1(r["noise_multiplier"] ** -2) for r in self.history]
        return sum(per_step) / (plan.planned_steps * math.expm1(plan.noise_multiplier ** -2))

    # ------------------------------------------------------------------ report & state
    def noise_schedule(self, ledger: accountants.PrivacyLedger) -> list[tuple[int, int, float]]:
        """(first step, last step, σ) for each run of equal σ in the ledger (steps 1-based)."""
        out, start = [], 1
        for event, count in ledger.entries:
            sigma = float(event.event.noise_multiplier)
            out.append((start, start + count - 1, sigma))
            start += count
        return out

    def prefix_event(self, ledger: accountants.PrivacyLedger):
        """t ↦ the composed event of the first t recorded steps."""
        return ledger.prefix

    def report_fields(self, ledger: accountants.PrivacyLedger) -> dict[str, Any]:
        return {"noise_schedule": self.noise_schedule(ledger), "clipping": self.describe()}

    def describe(self) -> str:
        if isinstance(self.controller, QuantileClipController):
            return (f"quantile (γ={self.controller.target_quantile:g}, η={self.controller.learning_rate:g}), "
                    f"C now {self.controller.clip:.4g}")
        c = self.clipping().sensitivity
        return f"rldp ({len(self.controller.names)} groups, {self.controller.decisions} decisions), √ΣC_g² now {c:.4g}"

    def state_dict(self) -> dict[str, Any]:
        return {"controller": self.controller.state_dict(), "history": list(self.history),
                "guard": None if self.guard is None else self.guard.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.controller.load_state_dict(state["controller"])
        self.history = list(state["history"])
        if self.guard is not None and state.get("guard") is not None:
            self.guard.load_state_dict(state["guard"])
