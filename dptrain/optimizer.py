"""A private optimizer that wraps any ``torch.optim.Optimizer``.

Before ``step()``, each trainable parameter's ``.grad`` holds the *sum of clipped
per-example gradients* (written by :func:`dptrain.clip_and_sum`). ``step()`` asks the
noise mechanism to privatize those sums, divides by the expected batch size q·N (not the
realised, data-dependent size), and runs the wrapped optimizer. The wrapped optimizer
refuses to step on its own, so a stray ``optimizer.step()`` cannot apply a non-private
update.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from mechanisms.base import NoiseMechanism

from .errors import PrivacyError


class DPOptimizer(torch.optim.Optimizer):
    """Noise + averaging on top of ``optimizer``; param groups and state are the wrapped ones."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter],
                 mechanism: NoiseMechanism, expected_batch_size: float) -> None:
        # No super().__init__: param_groups / state / defaults are the wrapped optimizer's.
        if expected_batch_size <= 0:
            raise ValueError(f"DPOptimizer: expected_batch_size must be > 0, got {expected_batch_size}")
        self.original_optimizer = optimizer
        self.params = list(params)
        self.mechanism = mechanism
        self.expected_batch_size = float(expected_batch_size)
        self.steps = 0
        self._inside_step = False
        known = {id(p) for g in optimizer.param_groups for p in g["params"]}
        stray = [i for i, p in enumerate(self.params) if id(p) not in known]
        if len(stray) == len(self.params):
            raise ValueError("DPOptimizer: the optimizer holds none of the model's trainable parameters; "
                             "build it from model.parameters()")
        #: set by a PrivateTraining run: (before, after) a public ``step()`` — check that the gradients are the
        #: clipped sums of ``priv.backward`` and that the budget allows a step; record the step in the ledger
        self.on_public_step: tuple[Callable[[], None], Callable[[], None]] | None = None
        self._armed: list[tuple[torch.nn.Parameter, Any, int]] | None = None
        #: the wrapper that guarded ``optimizer`` before this one (an earlier run's), restored by :meth:`release`
        self._previous: DPOptimizer | None = getattr(optimizer, "_dptrain_owner", None)
        self._install_guard()
        self._optimizer_step_pre_hooks: dict = {}
        self._optimizer_step_post_hooks: dict = {}

    def _install_guard(self) -> None:
        """Make the wrapped optimizer refuse to step outside this wrapper (replacing an earlier wrapper's guard)."""
        optimizer = self.original_optimizer
        old = getattr(optimizer, "_dptrain_guard", None)
        if old is not None:  # the optimizer was wrapped by an earlier run: this wrapper replaces that one
            old.remove()
        self._hook = optimizer.register_step_pre_hook(self._guard)
        optimizer._dptrain_guard, optimizer._dptrain_owner = self._hook, self  # type: ignore[attr-defined]

    def release(self) -> None:
        """Undo this wrapper's hold on the optimizer (an attach that failed): the earlier wrapper's guard, if
        any, is back, else the optimizer is unguarded as before it was wrapped."""
        optimizer = self.original_optimizer
        if getattr(optimizer, "_dptrain_owner", None) is not self:
            return
        self._hook.remove()
        if self._previous is not None:
            self._previous._install_guard()
        else:
            del optimizer._dptrain_guard, optimizer._dptrain_owner  # type: ignore[attr-defined]

    def _guard(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self._inside_step:
            raise PrivacyError(
                "this optimizer is attached to a private training run and cannot step on its own "
                "(that would apply a non-private update). Use priv.step(x, y), or call "
                "priv.optimizer.step() after priv.backward(x, y).")

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.original_optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.original_optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.original_optimizer.defaults

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._armed = None
        self.original_optimizer.zero_grad(set_to_none=set_to_none)

    def arm(self) -> None:
        """Mark the current ``.grad`` tensors as clipped sums (written by ``priv.backward``)."""
        self._armed = [(p, p.grad, -1 if p.grad is None else p.grad._version) for p in self.params]

    @property
    def armed(self) -> bool:
        return self._armed is not None

    def grads_are_armed(self) -> bool:
        """Every ``.grad`` is still the clipped sum it was when armed: the same tensor, not modified since
        (a ``loss.backward()`` after ``priv.backward`` would add an unclipped gradient into it)."""
        return self._armed is not None and all(
            p.grad is g and (g is None or g._version == v) for p, g, v in self._armed)

    def privatize_grads(self) -> None:
        """Replace each ``p.grad`` (clipped sum) by (sum + noise) / (q·N); the sums are given up, so the
        mechanism may write into them (``privatize_mean_``)."""
        sums = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        noised = self.mechanism.privatize_mean_(sums, self.steps, self.expected_batch_size)
        for p, g in zip(self.params, noised):
            if g is not p.grad:
                p.grad = g

    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        """Noise the clipped sums and step; in a PrivateTraining run also check the gradients and the budget
        before, and record the step in the run's ledger after (``priv.backward(x, y)`` then this)."""
        if closure is not None:
            raise ValueError("DPOptimizer.step does not take a closure: gradients come from clip_and_sum")
        if self.on_public_step is None:
            self._apply_step()
            return
        before, after = self.on_public_step
        before()
        self._apply_step()
        after()

    def _apply_step(self) -> None:
        """Noise the clipped sums and run the wrapped optimizer (the caller checks and records the step)."""
        self.privatize_grads()
        self._inside_step = True
        try:
            self.original_optimizer.step()
        finally:
            self._inside_step = False
        self.count_step()

    def count_step(self) -> None:
        """Count one private step (also a step that updated no dense parameter, e.g. lazy tables only).

        torch's LR schedulers wrap ``optimizer.step`` to set ``optimizer._opt_called`` and warn
        ("lr_scheduler.step() before optimizer.step()") when it is unset; ``priv.step`` steps through
        :meth:`_apply_step`, so the flag is set here for a scheduler built on this wrapper.
        """
        self.steps += 1
        self._armed = None
        self._opt_called = True

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"optimizer": self.original_optimizer.state_dict(),
                "mechanism": self.mechanism.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # type: ignore[override]
        self.original_optimizer.load_state_dict(state["optimizer"])
        self.mechanism.load_state_dict(state["mechanism"])
        self.steps = int(state["steps"])

    def __repr__(self) -> str:
        return f"DPOptimizer({self.original_optimizer!r}, mechanism={self.mechanism.name})"
