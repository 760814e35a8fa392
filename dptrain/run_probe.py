"""The attach probe of a private run: before step 1, per-example gradients must be computable and
independent per example (a forward that mixes examples is refused).

Part of :class:`dptrain.private.PrivateTraining` (a mixin: it uses the run's model, loss, loader,
clipping and config).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils.data import Dataset

from .clipping import clip_and_sum
from .engine import _as_tuple, choose_method
from .errors import UnsupportedModuleError
from .sampling import unpack_batch as _unpack


def probe_tolerance(model: torch.nn.Module, floor: float) -> float:
    """Relative tolerance of a probe comparison: ``floor``, or 4 ulps of the model's narrowest floating
    parameter if that is more (a frozen bf16 layer rounds a batched product differently from one example's,
    by about an ulp of bf16, ≈ 0.8 %). The price: with such a layer the probe cannot see mixing that moves
    the result by less than that (e.g. ``x + 0.01 * x.mean(0)``). The probe is a check on accidents, not a
    proof; the model must not mix examples (README, "make_private")."""
    eps = [torch.finfo(p.dtype).eps for p in model.parameters() if p.is_floating_point()]
    return max([floor] + [4 * e for e in eps])


@contextmanager
def modes_restored(model: torch.nn.Module) -> Iterator[None]:
    """Restore every module's own train/eval flag on exit. ``model.train(was_training)`` would set every
    submodule to the top-level mode, turning back on a layer the user keeps in eval mode on purpose
    (a frozen normaliser using its stored statistics, dropout switched off)."""
    saved = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, training in saved:
            m.training = training


class Probing:
    """The probe methods of :class:`dptrain.private.PrivateTraining`."""

    def _probe(self, dataset: Dataset) -> None:
        """Before step 1: per-example gradients must be computable, and independent per example.

        The torch.func engine evaluates each example alone, so it cannot see other examples.
        The book-keeping fast path runs one batched forward; if the model mixes examples
        there (batch statistics, ``x - x.mean(0)``, …) the two disagree, and clipping would
        not bound an example's influence — that is refused.
        """
        assert self.loader is not None and self.clipping is not None
        from .ghost import ghost_clip_and_sum

        x, y = _unpack(self.loader.batch(torch.arange(min(4, len(dataset)))))  # type: ignore[arg-type]
        x, y = self._to_device(x, y)
        with modes_restored(self.model):
            self.model.eval()  # same dropout masks (none) on both paths
            try:
                ref = clip_and_sum(self.model, self.loss_fn, x, y, self.clipping, method="vmap" if
                                   choose_method(self.model) == "vmap" else "loop")
            except Exception as exc:  # noqa: BLE001 - re-raised with context
                raise UnsupportedModuleError(
                    f"per-example gradients cannot be computed for this model ({type(exc).__name__}: {exc}). "
                    "Check that forward() does not mix examples (no BatchNorm, no in-place ops on inputs, "
                    "no .item() calls) and that the loss_fn takes (output, target).") from exc
            fast = (ghost_clip_and_sum(self.model, self.loss_fn, x, y, self.clipping) if self.config.engine == "auto"
                    else None)  # engine="vmap" / "loop": the fast path is not used, the losses are compared
        fix = ("so per-example clipping would not bound each example's influence. Remove batch-level operations "
               "(batch statistics, normalisation over dim 0) from forward().")
        if fast is not None:
            rtol = probe_tolerance(self.model, 1e-3)
            for name, value in ref.sums.items():
                if not torch.allclose(fast.sums[name], value, atol=0.1 * rtol, rtol=rtol):
                    raise UnsupportedModuleError(
                        f"the model's forward mixes examples within a batch (parameter {name!r} gets a different "
                        f"gradient when examples are processed together than one by one), {fix}")
        elif ref.example_losses is not None:  # the fast path refused: compare the losses instead
            batched, rtol = self._batched_losses(x, y), probe_tolerance(self.model, 1e-4)
            if batched is not None and not torch.allclose(batched.float(), ref.example_losses.float(),
                                                          atol=0.1 * rtol, rtol=rtol, equal_nan=True):
                raise UnsupportedModuleError(
                    "the model's forward mixes examples within a batch (the per-example losses differ when "
                    f"examples are processed together than one by one), {fix}")

    def _batched_losses(self, x: Any, y: torch.Tensor) -> torch.Tensor | None:
        """Per-example losses of one batched forward in eval mode (None where they cannot be formed)."""
        from .ghost import per_example_losses

        with modes_restored(self.model):
            self.model.eval()
            try:
                with torch.no_grad():
                    return per_example_losses(self.loss_fn, self.model(*_as_tuple(x)), y).reshape(-1)
            except Exception:  # noqa: BLE001 - a model the batched forward cannot run gives no evidence either way
                return None
