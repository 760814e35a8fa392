"""The step guards of a private run: each step trains on a batch the Poisson loader drew, with the trainable
parameters of attach time in a dtype wide enough for the clipped sums, within the budget; a user's
``priv.optimizer.step()`` only on ``priv.backward``'s untouched clipped sums, and it is recorded.

Part of :class:`dptrain.private.PrivateTraining` (a mixin: it uses the run's model, optimizer, loader,
ledger, plan, config and adaptive controller).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from .engine import trainable_parameters
from .errors import BudgetExceededError, PrivacyConfigError, PrivacyError, refuse_step_over_budget
from .privacy_config import MF_MECHANISMS, TrainingPlan


def _rows(inputs: Any, targets: Any) -> int | None:
    """The common number of rows (leading dimension) of the batch's tensors; None if they disagree."""
    tensors = [t for t in (*(inputs if isinstance(inputs, (tuple, list)) else (inputs,)), targets)
               if isinstance(t, torch.Tensor)]
    sizes = {int(t.shape[0]) if t.dim() else -1 for t in tensors}
    return sizes.pop() if len(sizes) == 1 and -1 not in sizes else None


#: parameter dtypes too narrow to hold clipped sums and noise (their rounding can push a contribution past C)
NARROW_DTYPES = (torch.bfloat16, torch.float16)


def check_precision(params: dict[str, nn.Parameter], where: str) -> None:
    """Refuse trainable parameters in 16-bit floats (checked at make_private, attach and every step).

    Privacy assumption: each example's clipped contribution has norm ≤ C. Gradients, clipped sums
    and noise are held in the parameters' dtype; rounded to 8–11 bits of mantissa, a clipped
    contribution can exceed C (1.0001·C was seen with fp16), so the accounted sensitivity would not hold.
    """
    narrow = sorted({str(p.dtype) for p in params.values() if p.dtype in NARROW_DTYPES})
    if narrow:
        raise PrivacyConfigError(
            f"{where}: trainable parameters in {', '.join(narrow)}: the clipped sums and the noise would be "
            "rounded to 8–11 bits, so one example's contribution could exceed the clip norm. Keep float32 "
            "parameters (model.float(); do not call model.half() / model.bfloat16() on a private model) and "
            "train under torch.autocast(device, dtype=torch.bfloat16).")


class Guards:
    """Step guards of :class:`dptrain.private.PrivateTraining`."""

    def _before_public_step(self) -> None:
        """``priv.optimizer.step()`` called by the user: the gradients must be ``priv.backward``'s clipped sums,
        untouched, and the budget must allow the step."""
        assert self.optimizer is not None
        if self.adaptive is not None:
            raise PrivacyError("with adaptive clipping, step with priv.step(x, y): the step needs more than the "
                               "optimizer (the controller)")
        check_precision(trainable_parameters(self.model), "priv.optimizer.step() (the model was converted after "
                        "priv.backward)")
        if not self.optimizer.armed:
            raise PrivacyError(
                "priv.optimizer.step(): the gradients are not the clipped sums of priv.backward(x, y): none were "
                "written since the last step or zero_grad. Call priv.backward(x, y) right before, or use "
                "priv.step(x, y).")
        if not self.optimizer.grads_are_armed():
            raise PrivacyError(
                "priv.optimizer.step(): the gradients are not the clipped sums of priv.backward(x, y): a .grad "
                "was changed after it (by clip_grad_norm_, a scaling, or a loss.backward() adding into it). .grad "
                "must hold the clipped sums untouched between priv.backward and the step: dptrain already clips "
                "each example's gradient to max_grad_norm, and the noise and the division by the batch size come "
                "in the step. Do no clipping, scaling or accumulation of your own there (set max_grad_norm in "
                "make_private; change a step's size with the learning rate).")
        self.check_budget()

    def _after_public_step(self) -> None:
        self.ledger.record(self._step_event(self.steps))

    def check_budget(self) -> None:
        """Raise :class:`BudgetExceededError` if one more step would pass the target ε."""
        plan = self._require_attached()
        if self.adaptive is not None:
            self.adaptive.noise_multiplier(self)
            return
        target = self.config.eps
        if target is None:
            return
        if self.config.mechanism in MF_MECHANISMS:
            if self.steps >= plan.planned_steps:
                raise BudgetExceededError(
                    f"{self.config.mechanism}: the correlated-noise stream was planned (and accounted) for "
                    f"{plan.planned_steps} steps; step {self.steps + 1} is outside it. Spent: ε={self.epsilon_spent():.4g}.")
            return  # attach checked ε of the whole planned run <= target
        if self.config.noise_multiplier is None and self._within_calibrated_plan(plan, target):
            return  # calibration guarantees ε(σ, q, planned_steps) <= target
        refuse_step_over_budget(self.ledger, self._step_event(self.steps), plan.delta, self.config.accountant,
                                target, self.steps + 1, self.epsilon_spent)

    def _within_calibrated_plan(self, plan: TrainingPlan, target: float) -> bool:
        """Whether the next step stays inside a plan whose whole run was calibrated to ``target``: the plan's
        ε is at most the target and the ledger holds only this plan's steps (not those of an earlier attach
        or of a checkpoint of another run), fewer than planned."""
        if self.steps >= plan.planned_steps or plan.planned_epsilon > target * (1 + 1e-9):
            return False
        return self._ledger_holds_only_this_plan()

    def _ledger_holds_only_this_plan(self) -> bool:
        """Every recorded step is a step of the current plan (DP-SGD: one event, repeated)."""
        entries = self.ledger.entries
        return not entries or (len(entries) == 1 and entries[0][0] == self._step_event(0))

    @contextlib.contextmanager
    def _drawn_batch(self, inputs: Any, targets: torch.Tensor) -> Iterator[None]:
        """The batch must be one the attached Poisson loader drew and no step has used (checked by its rows);
        it is used up when the block (the clipping) succeeds, so a step that raises leaves it to be retried
        (a correlated-noise schedule must not move on without its step).

        Privacy assumption: the accountant's PoissonSampled(q, ·) event holds only for batches in
        which each example was included independently with probability q — the loader's draws. A
        batch from another loader (fixed size, shuffled) or a hand-picked one is not covered by ε.
        """
        assert self.loader is not None
        rows = _rows(inputs, targets)
        position = None if rows is None else self.loader.find(rows)
        if position is not None:
            yield
            self.loader.use(position)
            return
        raise PrivacyError(
            "priv.step needs the batch the Poisson loader returned by attach yields; a batch from another "
            "DataLoader is not Poisson-sampled at q and would not be covered by ε. Got a batch of "
            f"{'inconsistent' if rows is None else rows} rows, and no unused batch of that size was drawn from "
            "priv.loader (each drawn batch trains one step). Use `for x, y in priv.loader: priv.step(x, y)`.")

    def _check_trainable(self, trainable: set[int], params: dict[str, nn.Parameter]) -> None:
        """The trainable parameters (``params``, their ids ``trainable``) must be those the optimizer noises
        (fixed at attach), still in a dtype wide enough for the clipped sums (:func:`check_precision`)."""
        check_precision(params, "step (the model was converted after attach)")
        if trainable != self._trainable_ids:
            raise PrivacyConfigError(
                "the model's trainable parameters changed since attach (a layer frozen or unfrozen): the noise "
                "is added to the parameters of attach time, so an unfrozen layer would be updated without "
                "noise. Call priv.attach(...) again after changing requires_grad (the budget already spent "
                "still counts).")
