"""The plan of a private run: σ calibrated to the target ε for the planned steps (to the budget left on a
re-attach), the correlated-noise plans, and the events the ledger records per step.

Part of :class:`dptrain.private.PrivateTraining` (a mixin: it uses the run's config, clipping, ledger,
plan and mechanism).
"""
from __future__ import annotations

import warnings
from typing import Any

import accountants

from .errors import BudgetExceededError, PrivacyConfigError
from .privacy_config import MF_MECHANISMS, TrainingPlan
from .sampling import ScheduleSampler

def warn_if_mf_batch_differs(mechanism: str, n: int, requested: float, steps_per_epoch: int, mf: Any) -> None:
    """Warn when an MF schedule's expected batch, E|B| = (N / b̂)·q within a partition (cyclic Poisson over b̂
    partitions) or N / b (a fixed split into b = round(N / batch_size) batches), is more than 10 % off
    the requested batch size."""
    actual = n / mf.partitions * mf.sample_rate if mf.partitions is not None else n / steps_per_epoch
    if abs(actual - requested) <= 0.1 * requested:
        return
    sizes = sorted({round(n / k) for k in (max(1, steps_per_epoch - 1), steps_per_epoch, steps_per_epoch + 1)})
    warnings.warn(
        f"attach: {mechanism} uses batches of about {actual:.4g} examples, not the {requested:.4g} requested: its "
        f"schedule splits the N={n} examples into a whole number of batches per epoch, {steps_per_epoch} = "
        f"round(N / batch_size){' (one full-batch step per epoch)' if steps_per_epoch == 1 else ''}. Batch sizes "
        f"near N / k keep what is asked for (here {', '.join(map(str, sizes))}).", stacklevel=6)


class Planning:
    """Plan-making methods of :class:`dptrain.private.PrivateTraining`."""

    def _warn_if_plan_passes_budget(self) -> None:
        """A re-attach's plan counts its own steps, on top of those already recorded: warn when the target
        ε stops training before the plan ends (a noise_multiplier= fixed for the run; a calibrated σ fits
        the budget left)."""
        assert self.plan is not None
        target = self.config.eps
        if not self.steps or target is None:
            return
        plan, acc = self.plan, self.config.accountant
        total = self.ledger.epsilon_if(self._step_event(0), plan.delta, accountant=acc, count=plan.planned_steps)
        if total > target * (1 + 1e-9):
            warnings.warn(
                f"attach: this run has taken {self.steps} steps (ε={self.epsilon_spent():.3g}); with this plan's "
                f"{plan.planned_steps} steps at σ={plan.noise_multiplier:.3g} it would spend ε={total:.3g} > target "
                f"ε={target:g}, so training stops at the budget before the plan ends (noise_multiplier= fixes σ; "
                "without it σ is calibrated to the budget left).",
                stacklevel=6)

    def _check_same_delta(self, n: int, delta: float) -> None:
        """Once the ledger has steps, a new attach must judge it at the δ it was judged at."""
        if self.steps and self.plan is not None and delta != self.plan.delta:
            raise PrivacyConfigError(
                f"attach: this run has taken {self.steps} steps accounted at δ={self.plan.delta:.3g} "
                f"(N={self.plan.dataset_size}); the new dataset of N={n} gives δ={delta:.3g}, and judging the same "
                "steps at another δ would change the budget they spent (a larger δ reopens it). Attach a dataset of "
                f"N={self.plan.dataset_size} examples, fix δ for the whole run with make_private(..., delta=...), "
                "or start a new make_private run.")

    def _attach_mf(self, n: int, steps: int, steps_per_epoch: int, delta: float,
                   seed: int | None) -> tuple[ScheduleSampler, float]:
        """Correlated-noise mechanism: σ calibrated for the whole run, batches by its schedule.

        banded-mf: cyclic Poisson sampling over b̂ partitions (amplified accounting);
        multi-epoch-mf / fft-mf: one fixed split into ``steps_per_epoch`` batches, in order.
        """
        from mechanisms.mf import cyclic_poisson_batches, fixed_epoch_batches, make_mf_mechanism

        assert self.clipping is not None
        mech = make_mf_mechanism(self.config.mechanism, steps, steps_per_epoch, self.clipping.sensitivity,
                                 noise_multiplier=self.config.noise_multiplier, target_eps=self.config.eps,
                                 delta=delta, bands=self.config.bands, accountant=self.config.accountant,
                                 seed=self._seed())
        mf = mech.plan
        if mf.partitions is not None:
            schedule = lambda g: cyclic_poisson_batches(n, mf.partitions, mf.sample_rate, steps, g)  # noqa: E731
        else:
            schedule = lambda g: fixed_epoch_batches(n, steps_per_epoch, steps, g)  # noqa: E731
        planned = accountants.epsilon_of_event(mech.run_event(mf.sample_rate, steps), delta,
                                               accountant=self.config.accountant)
        if self.config.eps is not None and planned > self.config.eps * (1 + 1e-9):
            raise PrivacyConfigError(
                f"{self.config.mechanism}: noise_multiplier={mech.noise_multiplier} spends ε={planned:.3g} over the "
                f"planned {steps} steps, more than the target ε={self.config.eps}; a correlated-noise stream cannot "
                "stop early without its planned noise, so raise the noise or lower the steps")
        self.mechanism = mech
        self.plan = TrainingPlan(n, mf.sample_rate, steps_per_epoch, steps, delta, mech.noise_multiplier, planned)
        return ScheduleSampler(schedule, mf.sample_rate, steps, seed), n / steps_per_epoch

    def _step_event(self, step: int) -> "accountants.DpEvent":
        """The event the ledger records for step ``step`` (0-based)."""
        assert self.plan is not None and self.mechanism is not None
        if self.config.mechanism in MF_MECHANISMS:
            return self.mechanism.ledger_event(self.plan.sample_rate, step)
        return self.mechanism.step_event(self.plan.sample_rate)

    def _run_event(self, steps: int) -> "accountants.DpEvent":
        """The event of the first ``steps`` steps of the planned run."""
        assert self.plan is not None and self.mechanism is not None
        if self.config.mechanism in MF_MECHANISMS:
            return self.mechanism.run_event(self.plan.sample_rate, steps)
        return accountants.poisson_gaussian(self.plan.noise_multiplier, self.plan.sample_rate, steps)

    def _calibrate(self, q: float, steps: int, delta: float) -> tuple[float, float]:
        """(σ, the run's ε when the plan ends): the given noise multiplier, or σ calibrated to the target ε —
        for a first attach over the plan's steps, for a re-attach over the steps taken and the plan's together
        (:func:`accountants.calibrate_noise_after`)."""
        acc = self.config.accountant
        if self.config.noise_multiplier is not None:
            sigma = float(self.config.noise_multiplier)
            try:
                eps = accountants.epsilon(sigma, q, steps, delta, accountant=acc)
            except OverflowError:  # the privacy-loss domain of so small a σ does not fit the accountant's grid
                raise PrivacyConfigError(
                    f"make_private: noise_multiplier={sigma:g} is too small to account ({acc} accountant: ε "
                    f"overflows for q={q:g}, {steps} steps); noise that small next to the clip norm gives no "
                    "privacy. Use noise_multiplier of about 0.3 or more, or leave it None and give eps= to "
                    "calibrate it.") from None
            if self.config.eps is not None and eps > self.config.eps:
                warnings.warn(f"noise_multiplier={sigma} spends ε={eps:.3g} over {steps} steps, more than the "
                              f"target ε={self.config.eps}; training will stop when the budget is reached",
                              stacklevel=6)
            return sigma, eps
        assert self.config.eps is not None
        if self.steps:  # a re-attach: the new plan gets the budget that is left, not a fresh one
            try:
                sigma = accountants.calibrate_noise_after(self.ledger, self.config.eps, delta, q, steps, accountant=acc)
            except accountants.UnreachableTargetError as exc:
                raise BudgetExceededError(
                    f"attach: the {self.steps} steps taken spend ε={self.epsilon_spent():.4g} of the target "
                    f"ε={self.config.eps:g}, and no noise level fits {steps} more steps at q={q:.4g} in what is left. "
                    "Plan fewer steps or a smaller batch, or stop here.") from exc
            return sigma, self.ledger.epsilon_if(accountants.poisson_gaussian(sigma, q, 1), delta, accountant=acc,
                                                 count=steps)
        sigma = accountants.calibrate_noise(self.config.eps, delta, q, steps, accountant=acc)
        return sigma, accountants.epsilon(sigma, q, steps, delta, accountant=acc)
