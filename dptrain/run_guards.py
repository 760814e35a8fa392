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

from .engine import module_list, trainable_parameters
from .errors import (BudgetExceededError, PrivacyConfigError, PrivacyError, UnsupportedModuleError,
                     refuse_step_over_budget)
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


def version(t: torch.Tensor) -> int:
    """``t``'s version counter (moved by every in-place write); -1 for an inference tensor (made under
    ``torch.inference_mode()``), which has none and which nothing outside inference mode can write to."""
    return -1 if t.is_inference() else t._version


#: a saved buffer: (the buffer, its version counter when it was copied, the copy)
SavedBuffer = tuple[torch.Tensor, int, torch.Tensor]


class StateGuard:
    """The model's buffers (and parameters) before a pass over private data; :meth:`check` refuses any change
    the pass made to them, after undoing what can be undone.

    Privacy assumption: only the noised step changes the released model. Buffers are released with it and
    receive no noise, so a forward that keeps a statistic of its inputs in one (a running mean, an observer's
    max |x|) would release it in the clear; a forward that writes to a parameter (``Embedding(max_norm=...)``
    renormalising the rows a batch looked up) releases which rows or values the data touched. A buffer
    updated in place (its version counter moved), reassigned or newly registered is restored from a copy
    (or removed) before the refusal; a parameter changed in place cannot be restored (dptrain keeps no
    copy of the parameters), so the refusal says so.

    Cost per pass: identities and version counters of every buffer and parameter; a buffer's values are
    copied only when ``saved`` holds no copy of it at its current version (at the first pass, and after
    something outside the private passes changed it). Writes through ``.data`` bypass the version counter;
    with ``values`` (the attach probe and the first step after each attach, where the copy is fresh) the
    buffers' values are compared with their copies as well, which catches such a write in a forward that
    makes it every time (the running average of a VQ-VAE codebook, ``buf.data.mul_(d).add_(…)``) at the cost
    of one read of the buffers (and, on a GPU, one synchronisation).
    """

    def __init__(self, model: nn.Module, where: str, parameters: bool = True, written: frozenset[int] = frozenset(),
                 saved: dict[int, SavedBuffer] | None = None, values: bool = False,
                 modules: list[nn.Module] | None = None) -> None:
        """``modules``: :func:`~dptrain.engine.module_list` of ``model`` if the caller has just made it."""
        self.model, self.where, self.parameters, self.written = model, where, parameters, written
        self.values = values
        self.modules = module_list(model) if modules is None else modules
        self.state = self._state(self.modules)
        #: the state without its objects, comparable with ==: (id of module, is a buffer, name, id of tensor, version)
        self.key = [(id(m), is_buffer, k, id(t), v) for m, is_buffer, k, t, v in self.state]
        self.buffers = [(m, k, b, v) for m, is_buffer, k, b, v in self.state if is_buffer]
        #: buffer slots registered as None (to fill on first use): undone to None, not removed
        self.empty = {(id(m), k) for m in self.modules for k, b in m._buffers.items() if b is None}
        copies: dict[int, SavedBuffer] = {}
        for _, _, b, v in self.buffers:
            held = None if saved is None or values else saved.get(id(b))  # values: fresh copies (one taken
            # before a change made through .data outside the private passes would be stale)
            copies[id(b)] = held if held is not None and held[0] is b and held[1] == v else (b, v, b.detach().clone())
        if saved is not None:
            saved.clear()
            saved.update(copies)
        self.copies = copies

    def _state(self, modules: list[nn.Module]) -> list[tuple[nn.Module, bool, str, torch.Tensor, int]]:
        """``(module, is a buffer, name, tensor, version)`` of every buffer (and parameter, unless written by
        the run itself) of ``modules``."""
        out = [(m, True, k, b, version(b)) for m in modules for k, b in m._buffers.items() if b is not None]
        if self.parameters:
            out += [(m, False, k, p, version(p)) for m in modules for k, p in m._parameters.items()
                    if p is not None and id(p) not in self.written]
        return out

    def _key(self, modules: list[nn.Module]) -> list[tuple[int, bool, str, int, int]]:
        """:attr:`key` of the state of ``modules`` now (the state's tensors are held by :attr:`state`, so an id
        seen there is not reused by another tensor while this guard lives)."""
        written = self.written
        try:  # ``_version`` directly (an inference tensor has none: the slow path below)
            out = [(id(m), True, k, id(b), b._version) for m in modules for k, b in m._buffers.items() if b is not None]
            if self.parameters:
                out += [(id(m), False, k, id(p), p._version) for m in modules for k, p in m._parameters.items()
                        if p is not None and id(p) not in written]
        except RuntimeError:
            return [(id(m), is_buffer, k, id(t), v) for m, is_buffer, k, t, v in self._state(modules)]
        return out

    def check(self) -> None:
        """Raise :class:`UnsupportedModuleError` if a buffer or parameter changed since construction (the
        buffers restored first)."""
        modules = module_list(self.model)
        if self._key(modules) == self.key:
            if self.values:
                self._check_values()
            return
        raise self.refusal(*self.undo(modules))

    def _check_values(self) -> None:
        """Refuse (after putting them back) buffers whose values changed while their version counter did not:
        a write through ``.data``."""
        pairs = [(m, k, b, self.copies[id(b)][2]) for m, k, b, _ in self.buffers if b.numel()]
        if not pairs:
            return
        device = pairs[0][2].device
        differ = torch.stack([((b != c) & ~(b.isnan() & c.isnan()) if b.is_floating_point() else b != c)
                              .any().to(device) for _, _, b, c in pairs]).tolist()
        changed = [(m, k, b, c) for (m, k, b, c), d in zip(pairs, differ) if d]
        if not changed:
            return
        with torch.no_grad():
            for _, _, b, c in changed:
                b.copy_(c)
        raise self.refusal([(m, k, "was changed through .data (without a version change)")
                            for m, k, _, _ in changed], [])

    def refusal(self, buffers: list, params: list) -> UnsupportedModuleError:
        """The error naming the changed buffers and parameters (as :meth:`undo` returns them) and the fix."""
        names = {id(m): n or type(m).__name__ for n, m in self.model.named_modules()}
        lines = [f"  - module {names.get(id(m), type(m).__name__)!r} ({type(m).__name__}): buffer {k!r} {how}"
                 for m, k, how in buffers]
        lines += [f"  - module {names.get(id(m), type(m).__name__)!r} ({type(m).__name__}): parameter {k!r} {how}"
                  for m, k, how in params]
        text = [f"{self.where}: the model's forward changed its state while it ran on private data:", *lines] \
            if lines else [f"{self.where}: the model's forward wrote in place to a tensor the per-example (torch.func) "
                           "engine holds fixed (a buffer or parameter), which it refused."]
        if buffers:
            text.append(
                "Buffers are released with the model and receive no noise, so a statistic of the data kept in one "
                "would leave in the clear; the change was undone. Fix: keep no statistics of the data in buffers "
                "(compute them from public data outside the model, or store a constant that forward only reads); "
                "BatchNorm / InstanceNorm: model = dptrain.fix(model).")
            if any(how in ("was registered", "was reassigned") for _, _, how in buffers):
                text.append(
                    "A constant cached on first use (a causal mask, rotary tables built in forward) counts as a "
                    "change too: build it in __init__, or run the model once on a dummy batch before make_private.")
        if params:
            text.append(
                "Parameters may change only in the noised step; a write to one in forward (Embedding(max_norm=...) "
                "renormalising the rows a batch looked up, a weight clamped in place) releases what the data "
                "touched. This write could not be undone: do not release or keep training this model; restart from "
                "a copy taken before. Fix: remove the in-place write from forward (drop max_norm; renormalise or "
                "clip outside the model).")
        if not buffers and not params:
            text.append("Buffers are released with the model without noise, and parameters change only in the "
                        "noised step. Fix: keep no statistics of the data in buffers and write to no parameter in "
                        "forward (Embedding: drop max_norm); BatchNorm / InstanceNorm: model = dptrain.fix(model).")
        return UnsupportedModuleError("\n".join(text))

    def undo(self, modules: list[nn.Module] | None = None) -> tuple[list, list]:
        """Put back every buffer as it was (values, identity; buffers added since are removed) and every
        parameter's identity; return the changed ``(module, name, how)`` of buffers and of parameters."""
        modules = module_list(self.model) if modules is None else modules
        buffers, params = [], []
        with torch.no_grad():
            for m, k, b, v in self.buffers:
                now = m._buffers.get(k)
                if now is not b:
                    buffers.append((m, k, "was reassigned" if now is not None else "was removed"))
                    m._buffers[k] = b
                if version(b) != v:
                    if now is b:
                        buffers.append((m, k, "was updated in place"))
                    b.copy_(self.copies[id(b)][2])
            known = {(id(m), k) for m, k, _, _ in self.buffers}
            for m in modules:
                for k in [k for k, b in m._buffers.items() if b is not None and (id(m), k) not in known]:
                    buffers.append((m, k, "was registered"))
                    if (id(m), k) in self.empty:
                        m._buffers[k] = None
                    else:
                        del m._buffers[k]
            for m, k, p, v in [(m, k, p, v) for m, is_buffer, k, p, v in self.state if not is_buffer]:
                now = m._parameters.get(k)
                if now is not p:
                    params.append((m, k, "was reassigned (put back)"))
                    m._parameters[k] = p
                if version(p) != v:
                    params.append((m, k, "was changed in place"))
        return buffers, params


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
    def _drawn_batch(self, inputs: Any, targets: torch.Tensor, modules: list[nn.Module] | None = None
                     ) -> Iterator[None]:
        """The batch must be one the attached Poisson loader drew and no step has used (checked by its rows);
        it is used up when the block (the clipping) succeeds, so a step that raises leaves it to be retried
        (a correlated-noise schedule must not move on without its step).

        Privacy assumption: the accountant's PoissonSampled(q, ·) event holds only for batches in
        which each example was included independently with probability q — the loader's draws. A
        batch from another loader (fixed size, shuffled) or a hand-picked one is not covered by ε.
        ``modules``: :func:`~dptrain.engine.module_list` of the model if the caller has just made it.
        """
        assert self.loader is not None
        rows = _rows(inputs, targets)
        position = None if rows is None else self.loader.find(rows)
        if position is not None:
            with self._state_guard("step", modules):
                yield
            self.loader.use(position)
            return
        raise PrivacyError(
            "priv.step needs a batch the Poisson loader returned by attach has drawn and not yet used: a batch "
            "from another DataLoader is not Poisson-sampled at q, and a batch used twice is two steps on the same "
            "draw; neither would be covered by ε. Got a batch of "
            f"{'inconsistent' if rows is None else rows} rows, and no unused batch of that size was drawn from "
            "priv.loader (each drawn batch trains one step). Use `for x, y in priv.loader: priv.step(x, y)`.")

    @contextlib.contextmanager
    def _state_guard(self, where: str, modules: list[nn.Module] | None = None) -> Iterator[None]:
        """The block runs the model on private data: it must leave the buffers and parameters as they were
        (:class:`StateGuard`; refused with the buffers restored). If the block raises, the buffers are put
        back and its exception goes on."""
        saved = self.__dict__.setdefault("_saved_buffers", {})
        attach = where.startswith("attach")
        values = attach or not self.__dict__.get("_values_checked", False)  # the probe and the next step
        guard = StateGuard(self.model, where, written=self._written_in_forward(), saved=saved, values=values,
                           modules=modules)
        try:
            yield
        except BaseException as exc:
            buffers, params = guard.undo()
            if not isinstance(exc, Exception):  # an interrupt goes on as it is (the buffers put back)
                raise
            if buffers or params:
                raise guard.refusal(buffers, params) from exc
            if isinstance(exc, RuntimeError) and "mutate a captured Tensor" in str(exc):
                raise guard.refusal([], []) from exc  # torch.func refused the write before it happened
            raise
        guard.check()
        self._values_checked = not attach

    def _written_in_forward(self) -> frozenset[int]:
        """Ids of parameters the run itself writes to during a forward: the tables of a lazy run
        (:mod:`dptrain.lazy`), whose forward pre-hooks catch up their rows' pending noise."""
        if not getattr(self, "lazy", False):
            return frozenset()
        return frozenset(id(m.weight) for m in getattr(self, "table_modules", {}).values())

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
