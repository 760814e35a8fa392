"""The attach probe of a private run: before step 1, per-example gradients must be computable and
independent per example (a forward that mixes examples is refused), in eval mode and, by the values of
the batched forward, in training mode.

Part of :class:`dptrain.private.PrivateTraining` (a mixin: it uses the run's model, loss, loader,
clipping and config).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from .clipping import clip_and_sum
from .engine import _as_tuple, choose_method
from .errors import UnsupportedModuleError
from .run_guards import version
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


#: random layers switched to eval for the training-mode check (their masks would differ between the two forwards)
DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)

TRAIN_MODE_MIXING = (
    "the model's forward mixes examples within a batch in training mode (changing one example changes the "
    "other examples' losses, e.g. through batch statistics computed without gradient, such as "
    "`with torch.no_grad(): mu = x.mean(0)` under `if self.training`), so per-example clipping would not bound "
    "each example's influence. Remove batch-level operations from forward(); for BatchNorm use "
    "`model = dptrain.fix(model)`. (A layer that mixes only in training mode may be kept in eval mode: "
    "call layer.eval() after model.train(), before attach.)")


@contextmanager
def _buffers_restored(model: nn.Module) -> Iterator[None]:
    """Put every buffer back on exit, the tensor object and its values (a forward may update or replace one).
    Only what changed is put back: a write would move the buffer's version counter, which the step guard
    (:class:`dptrain.run_guards.StateGuard`) reads as a forward that updates the buffer."""
    saved = [(m, k, b, version(b), b.detach().clone()) for m in model.modules() for k, b in m._buffers.items()
             if b is not None]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, k, b, saved_version, values in saved:
                m._buffers[k] = b
                if version(b) != saved_version:
                    b.copy_(values)


def _change_first(xs: tuple[torch.Tensor, ...], b: int) -> tuple[torch.Tensor, ...] | None:
    """The inputs with example 0 changed and still valid (None if nothing could be changed): float inputs
    x0 → −3·x0 + 5; integer inputs (token ids, indices) take another example's values, or (x0 + 1) mod
    (max + 1) if every example has the same; boolean inputs (masks) are kept."""
    out, changed = [], False
    for t in xs:
        if t.dim() == 0 or t.shape[0] != b or t.dtype == torch.bool or t.numel() == 0:
            out.append(t)
            continue
        new = t.clone()
        if t.is_floating_point() or t.is_complex():
            new[0] = -3 * t[0] + 5
        else:
            other = next((k for k in range(1, b) if not torch.equal(t[k], t[0])), None)
            if other is not None:
                new[0] = t[other]
            elif int(t.max()) >= 0:
                new[0] = torch.remainder(t[0] + 1, int(t.max()) + 1)
        changed = changed or not torch.equal(new, t)
        out.append(new)
    return tuple(out) if changed else None


def mixes_in_training_mode(model: nn.Module, loss_fn: Any, x: Any, y: torch.Tensor, rtol: float,
                           seed: int = 0) -> bool:
    """True if, in training mode, changing example 0 of the batched forward changes another example's loss.

    The eval-mode probe cannot see mixing that happens only in training mode, and the fast path's row
    check compares gradients only, so a batch statistic computed without gradient (``with torch.no_grad():
    mu = x.mean(0)`` under ``if self.training``) passed both. Two forwards under ``torch.no_grad()`` — the
    batch as is, and with example 0 changed (:func:`_change_first`) — are compared on the losses of
    examples 1.. . The modes are those the user set (a layer kept in eval mode stays so) if the model is
    in training mode, else those ``model.train()`` sets (training would call it); dropout-family layers
    are put in eval mode, and both forwards run from the same RNG seed, so any other randomness (functional
    dropout in a custom forward) draws the same numbers in both; each forward starts from the buffers as
    they were, which are put back afterwards, as are the modes and the RNG state. A forward that fails
    gives no evidence (False), as in the eval-mode probe.
    """
    from .ghost import per_example_losses

    xs = _as_tuple(x)
    b = int(y.shape[0])
    changed = _change_first(xs, b) if b >= 2 else None
    if changed is None:
        return False
    tensors = list(model.parameters()) + list(model.buffers()) + list(xs)
    cuda = sorted({t.device.index or 0 for t in tensors if t.is_cuda})
    with modes_restored(model), torch.random.fork_rng(devices=cuda), torch.no_grad():
        if not model.training:
            model.train()
        for m in model.modules():
            if isinstance(m, DROPOUT_TYPES):
                m.eval()
        try:
            losses = []
            for inputs in (xs, changed):
                with _buffers_restored(model):  # both forwards from the same state (a running statistic)
                    torch.manual_seed(seed)
                    losses.append(per_example_losses(loss_fn, model(*inputs), y).reshape(-1)[1:].float())
        except Exception:  # noqa: BLE001 - a model the batched forward cannot run gives no evidence either way
            return False
    return not torch.allclose(losses[0], losses[1], atol=0.1 * rtol, rtol=rtol, equal_nan=True)


class Probing:
    """The probe methods of :class:`dptrain.private.PrivateTraining`."""

    def _probe(self, dataset: Dataset) -> None:
        """Before step 1: per-example gradients must be computable, and independent per example.

        The torch.func engine evaluates each example alone, so it cannot see other examples.
        The book-keeping fast path runs one batched forward; if the model mixes examples
        there (batch statistics, ``x - x.mean(0)``, …) the two disagree, and clipping would
        not bound an example's influence — that is refused. The comparison runs in eval mode; with
        the fast path (engine "auto"), :func:`mixes_in_training_mode` also checks the batched forward's
        values in training mode (the vmap / loop engines evaluate each example alone).
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
                    "Common causes: the data does not fit the model (dtype, shape or device of the inputs or "
                    "targets: run model(x) and loss_fn(model(x), y) on one batch to see); the loss_fn does not "
                    "take (output, target); forward() mixes examples or calls .item() (BatchNorm: "
                    "dptrain.fix(model); no in-place ops on inputs).") from exc
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
        if self.config.engine == "auto" and mixes_in_training_mode(self.model, self.loss_fn, x, y,
                                                                   probe_tolerance(self.model, 1e-4)):
            raise UnsupportedModuleError(TRAIN_MODE_MIXING)  # the fast path's batched forward would mix them

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
