"""Checkpoints of a private run: ``state_dict`` / ``load_state_dict`` of :class:`dptrain.private.PrivateTraining`.

A checkpoint resumes the same run only (DESIGN invariant 4, the budget never resets): the same
``make_private`` / ``attach`` arguments (only :data:`RESUME_FREE` may differ), a plan this attach would
have made where the checkpoint's plan began (a plan attached after steps has σ calibrated to the budget
those steps left), a ledger that continues the run's own, and for correlated-noise runs the same order of
the dataset (their participation schedule is by index).
"""
from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any

import accountants
from mechanisms import GaussianMechanism

from .errors import PrivacyConfigError
from .privacy_config import MF_MECHANISMS, TrainingPlan
from .sampling import ScheduleSampler

#: make_private arguments a resumed run may change (memory and compute, not privacy)
RESUME_FREE = ("chunk_size", "engine", "seed")  # seed: the checkpoint carries the RNG states


class Checkpointing:
    """The checkpoint half of :class:`dptrain.private.PrivateTraining` (a mixin: it uses the run's model,
    optimizer, loader, ledger, plan, config and mechanism)."""

    def state_dict(self) -> dict[str, Any]:
        """Model, optimizer (+ mechanism RNG), sampler RNG, accountant history and plan."""
        plan = self._require_attached()
        assert self.optimizer is not None and self.loader is not None
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "sampler": self._sampler_state(), "ledger": self.ledger.state_dict(),
                "plan": asdict(plan), "config": asdict(self.config), "attaches": self._attaches,
                "plan_start": self._plan_start, **self._order_state(),
                **({} if self.adaptive is None else {"adaptive": self.adaptive.state_dict()})}

    def _check_schedule_position(self, state: dict[str, Any]) -> None:
        """A correlated-noise checkpoint resumes at the schedule's batch for its next step: batches drawn equal
        steps recorded (a checkpoint saved between a draw and its step would start one batch ahead)."""
        if self.config.mechanism not in MF_MECHANISMS:
            return
        drawn = int(state["sampler"].get("drawn", 0))
        steps = sum(int(n) for _, n in state["ledger"]["entries"])
        if drawn != steps:
            raise PrivacyConfigError(
                f"load_state_dict: the checkpoint's schedule has drawn {drawn} batches for {steps} recorded steps; "
                "resuming would make step t train on another batch than the schedule's batch t, which the "
                "correlated-noise sensitivity assumes. Save the checkpoint after a step (not between drawing a "
                "batch and stepping on it).")

    def _sampler_state(self) -> dict[str, Any]:
        """The sampler's state; a schedule's rewound past batches drawn but not yet stepped on, so that the
        resumed run draws them again (step t must train on the schedule's batch t)."""
        assert self.loader is not None
        state = self.loader.sampler.state_dict()
        if isinstance(self.loader.sampler, ScheduleSampler):
            state["drawn"] = int(state["drawn"]) - self.loader.pending()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a run: the budget already spent is restored, never reset."""
        plan = self._require_attached()
        assert self.optimizer is not None and self.loader is not None
        saved = TrainingPlan(**state["plan"])
        if (saved.dataset_size, saved.sample_rate, saved.delta) != (plan.dataset_size, plan.sample_rate, plan.delta):
            raise PrivacyConfigError(
                f"load_state_dict: checkpoint was trained with N={saved.dataset_size}, q={saved.sample_rate}, "
                f"δ={saved.delta:g}, this run has N={plan.dataset_size}, q={plan.sample_rate}, δ={plan.delta:g}; "
                "attach the same dataset and batch size before loading")
        # Resuming continues the same run: its clip norm, target, mechanism, accountant and plan (σ, steps). A
        # checkpoint of another run would bring its σ·C noise, its budget check or its tables' σ into this one.
        mine = asdict(self.config)
        theirs = state.get("config", {})
        differ = sorted(k for k in mine if k not in RESUME_FREE and theirs.get(k, mine[k]) != mine[k])
        expected = self._plan_at(plan, state)
        if "config" not in state or differ or asdict(saved) != asdict(expected):
            what = ", ".join(f"{k}={theirs.get(k)!r} (this run: {mine[k]!r})" for k in differ) or (
                f"plan {asdict(saved)} (this run: {asdict(expected)})")
            raise PrivacyConfigError(
                f"load_state_dict: the checkpoint is of another run: {what}. Resume with the same make_private and "
                "attach arguments as the run that saved it (chunk_size, engine and seed may differ).")
        self._check_ledger_continues(state["ledger"])
        self._check_same_order(state)
        self._check_schedule_position(state)
        self.plan = saved
        if expected is not plan:
            self._use_sigma(saved.noise_multiplier)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.loader.sampler.load_state_dict(state["sampler"])
        self.ledger.load_state_dict(state["ledger"])
        self._attaches = max(self._attaches, int(state.get("attaches", 1)))  # a later attach: fresh streams
        self._plan_start = int(state.get("plan_start", 0))
        if self.adaptive is not None:
            if "adaptive" not in state:
                raise PrivacyConfigError("load_state_dict: this run uses adaptive clipping but the checkpoint has no "
                                         "controller state; load a checkpoint saved by the same kind of run")
            self.adaptive.load_state_dict(state["adaptive"])

    def _plan_at(self, plan: TrainingPlan, state: dict[str, Any]) -> TrainingPlan:
        """The plan this attach would have made where the checkpoint's plan began: a plan attached after steps
        has σ calibrated to the budget those steps left (:meth:`_calibrate`), which a fresh attach, with no steps
        yet, cannot know. ``plan`` itself when the checkpoint's plan began the run (or σ was given)."""
        start = int(state.get("plan_start", 0))
        if start <= 0 or self.config.noise_multiplier is not None or self.config.eps is None \
                or self.config.mechanism in MF_MECHANISMS or "ledger" not in state:
            return plan
        saved = accountants.PrivacyLedger()
        saved.load_state_dict(state["ledger"])
        before = saved.first(start)
        acc = self.config.accountant
        try:
            sigma = accountants.calibrate_noise_after(before, self.config.eps, plan.delta, plan.sample_rate,
                                                      plan.planned_steps, accountant=acc)
        except accountants.UnreachableTargetError:
            return plan  # no such plan could have been attached: the comparison refuses the checkpoint
        eps = before.epsilon_if(accountants.poisson_gaussian(sigma, plan.sample_rate, 1), plan.delta, accountant=acc,
                                count=plan.planned_steps)
        return replace(plan, noise_multiplier=sigma, planned_epsilon=eps)

    def _use_sigma(self, sigma: float) -> None:
        """Noise at the resumed plan's σ from now on (the mechanism is shared with the private optimizer)."""
        assert isinstance(self.mechanism, GaussianMechanism)
        self.mechanism.noise_multiplier = float(sigma)

    def _order_state(self) -> dict[str, Any]:
        """MF runs: the fingerprint of the attached dataset's order (:mod:`dptrain.fingerprint`)."""
        if self.config.mechanism not in MF_MECHANISMS:
            return {}  # Poisson sampling draws every index with the same q: the order does not matter
        from .fingerprint import order_fingerprint

        assert self.loader is not None and self.plan is not None
        return {"order_fingerprint": order_fingerprint(self.loader.dataset, self.plan.dataset_size)}

    def _check_same_order(self, state: dict[str, Any]) -> None:
        """An MF checkpoint resumes only on the dataset in the order it was saved with.

        Privacy assumption: the correlated-noise accounting holds each example to its partition of the
        schedule (at most k participations, b steps apart); the schedule replays by index, so another
        order of the same N examples would move real examples between partitions, uncounted.
        """
        saved = state.get("order_fingerprint")
        if self.config.mechanism not in MF_MECHANISMS or saved is None:
            return
        from .fingerprint import fingerprints_differ

        differ = fingerprints_differ(saved, self._order_state()["order_fingerprint"])
        if differ:
            raise PrivacyConfigError(
                f"load_state_dict: this {self.config.mechanism} checkpoint was saved with the dataset in another "
                f"order (the {' and '.join(differ)} at fixed indices differ). Its batch schedule assigns examples "
                "to partitions by index, and the privacy accounting assumes each example stays in its partition; "
                "in another order examples would join more steps than accounted. Attach the same dataset in the "
                "same order (e.g. the same random_split generator seed) before loading.")

    def _check_ledger_continues(self, saved: dict[str, Any]) -> None:
        """A run that has recorded steps may load only a checkpoint whose ledger continues its own.

        Invariant 4 (the budget never resets): loading an earlier checkpoint into a run that has
        stepped since would replace its ledger by a shorter one, and the releases made after that
        checkpoint would no longer be counted.
        """
        if not self.steps:
            return
        theirs = accountants.PrivacyLedger()
        theirs.load_state_dict(saved)
        if not theirs.extends(self.ledger):
            raise PrivacyConfigError(
                f"load_state_dict: this run has recorded {self.steps} steps and the checkpoint's ledger "
                f"({theirs.steps} steps) does not continue them; loading it would roll the budget back and "
                "leave the releases since that checkpoint uncounted. Build a new run object (make_private and "
                "attach) to resume a checkpoint.")
