"""``make_private``: the one-line entry to differentially private training.

``priv = make_private(model, eps=3)`` checks the model and the privacy target;
``priv.attach(dataset, batch_size, epochs, optimizer)`` fixes the sampling rate
q = batch_size / N (Poisson sampling) and the number of steps T, and calibrates the
noise multiplier σ so that T Poisson-sampled Gaussian steps spend at most ε at
δ (default 1/N^1.1). Each ``priv.step(x, y)`` clips per-example gradients, adds
N(0, σ²C²) noise, steps the optimizer and records the step's privacy event; a step
that would pass the budget raises :class:`BudgetExceededError` before anything runs.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, replace
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

import accountants
from mechanisms import GaussianMechanism, NoiseMechanism

from .adaptive import AdaptiveClipping, adaptive_settings
from .clipping import ClippingConfig, clip_and_sum
from .engine import LossFn, _as_tuple, choose_method, trainable_parameters
from .errors import (BudgetExceededError, PrivacyConfigError, PrivacyError, UnsupportedModuleError,
                     refuse_step_over_budget)
from .ghost_plan import current_plan
from .optimizer import DPOptimizer
from .privacy_config import MF_MECHANISMS, PrivacyConfig, TrainingPlan, default_delta
from .sampling import PoissonLoader, PoissonSampler, ScheduleSampler, as_pair, to_device
from .validation import validate

def _rows(inputs: Any, targets: Any) -> int | None:
    """The common number of rows (leading dimension) of the batch's tensors; None if they disagree."""
    tensors = [t for t in (*(inputs if isinstance(inputs, (tuple, list)) else (inputs,)), targets)
               if isinstance(t, torch.Tensor)]
    sizes = {int(t.shape[0]) if t.dim() else -1 for t in tensors}
    return sizes.pop() if len(sizes) == 1 and -1 not in sizes else None


def _dataset_size(dataset: Any) -> int:
    """N of a sized, indexable dataset (Poisson sampling draws each index in range(N) independently)."""
    if isinstance(dataset, DataLoader):
        raise PrivacyConfigError(
            f"attach: got a DataLoader; pass its Dataset instead (attach(loader.dataset, batch_size="
            f"{dataset.batch_size}, ...)). dptrain draws the batches itself by Poisson sampling (each example "
            "joins a batch independently with probability q = batch_size / N), which is what ε accounts for; a "
            "DataLoader's fixed-size shuffled batches are not covered. Iterate the loader attach returns.")
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__") or not hasattr(dataset,
                                                                                          "__getitem__"):
        raise PrivacyConfigError(
            f"attach: a {type(dataset).__name__} has no length or no indexing; Poisson sampling needs a sized, "
            "indexable dataset (len(dataset) and dataset[i], as a map-style torch Dataset or TensorDataset), "
            "since each of the N examples joins a batch independently with probability q. Load the data into "
            "one (e.g. a list of examples, or TensorDataset) before attach.")
    n = len(dataset)
    if n == 0:
        raise PrivacyConfigError("attach: the dataset is empty; DP training needs at least one example")
    return n


def _unpack(batch: Any) -> tuple[Any, torch.Tensor]:
    """(inputs, targets) of a batch: ``(x, y)``, or ``(x1, …, xk, y)`` with the inputs as a tuple."""
    batch = as_pair(batch)
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ValueError("a batch must be (inputs, targets) or (input_1, ..., input_k, targets); got "
                     f"{type(batch).__name__} of length {len(batch) if hasattr(batch, '__len__') else '?'}")


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


def _warn_if_mf_batch_differs(mechanism: str, n: int, requested: float, steps_per_epoch: int, mf: Any) -> None:
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


class PrivateTraining:
    """State of one private training run. Create it with :func:`make_private`."""

    def __init__(self, model: nn.Module, config: PrivacyConfig) -> None:
        validate(model)
        params = trainable_parameters(model)
        if not params:
            raise PrivacyConfigError("make_private: the model has no trainable parameters")
        check_precision(params, "make_private")
        self.model, self.config = model, config
        self.plan: TrainingPlan | None = None
        self.ledger = accountants.PrivacyLedger()
        self.loss_fn: LossFn = nn.CrossEntropyLoss()
        self.optimizer: DPOptimizer | None = None
        self.loader: PoissonLoader | None = None
        self.mechanism: NoiseMechanism | None = None
        self.clipping: ClippingConfig | None = None
        self.distributed: bool | None = None  # None: data-parallel iff torch.distributed is initialised
        self.adaptive: AdaptiveClipping | None = None
        self._trainable_ids: set[int] = set()  # the trainable parameters at attach (the ones noised)
        self._attaches = 0  # successful attaches of this run (and of the run a checkpoint continues)
        self._plan_start = 0  # steps recorded before the current plan's attach (its plan counts its own steps)

    # ------------------------------------------------------------------ setup
    def attach(self, dataset: Dataset, batch_size: int | None = 128, epochs: float | None = 10,
               optimizer: torch.optim.Optimizer | None = None, loss_fn: LossFn | None = None,
               sample_rate: float | None = None, steps: int | None = None,
               lr: float | None = None) -> PoissonLoader:
        """Fix the data, sampling and optimizer; calibrate σ; return the Poisson loader.

        Attaching again after steps continues the same ledger, judged at the same δ: ε(δ) of a
        ledger falls as δ grows, so a δ that changed with the dataset (the default 1/N^1.1 of a
        smaller dataset is larger) would reopen a spent budget. Such a re-attach is refused rather
        than keeping the first δ, because a dataset of another size is another neighbouring
        relation (q·N, δ < 1/N) than the one the recorded steps were accounted under.

        All or nothing: if any check fails (the model, the optimizer, the budget), the run is left
        exactly as it was before the call.
        """
        return self._all_or_nothing(lambda: self._attach(dataset, batch_size, epochs, optimizer, loss_fn,
                                                         sample_rate, steps, lr))

    def _all_or_nothing(self, attach: Callable[[], PoissonLoader]) -> PoissonLoader:
        """Run ``attach``; if it raises, leave this run exactly as it was (unattached, or its previous
        attachment): a refused model or optimizer must not leave a half-built plan that trains, nor a new
        plan (σ the ledger records) beside the old optimizer (σ the noise has)."""
        snapshot = dict(self.__dict__)
        try:
            loader = attach()
        except BaseException:
            self._undo_attach(snapshot)
            raise
        assert self.optimizer is not None
        self.optimizer._previous = None  # attached: the earlier wrapper is not coming back
        return loader

    def _undo_attach(self, snapshot: dict[str, Any]) -> None:
        """Back to ``snapshot`` (this object's attributes before the attach), hooks on optimizers included."""
        if self.optimizer is not None and self.optimizer is not snapshot.get("optimizer"):
            self.optimizer.release()
        self.__dict__.clear()
        self.__dict__.update(snapshot)

    def _attach(self, dataset: Dataset, batch_size: int | None, epochs: float | None,
                optimizer: torch.optim.Optimizer | None, loss_fn: LossFn | None, sample_rate: float | None,
                steps: int | None, lr: float | None) -> PoissonLoader:
        n = _dataset_size(dataset)
        check_precision(trainable_parameters(self.model), "attach (the model was converted after make_private)")
        if sample_rate is None:
            if batch_size is None or not batch_size >= 1 or not math.isfinite(batch_size):
                raise PrivacyConfigError(f"attach: batch_size must be a whole number >= 1, got {batch_size}")
            sample_rate = min(1.0, batch_size / n)
        if not 0 < sample_rate <= 1:
            raise PrivacyConfigError(f"attach: sample_rate must be in (0, 1], got {sample_rate}")
        steps_per_epoch = max(1, round(1 / sample_rate))
        if steps is None:
            if epochs is None or not 0 < epochs < math.inf:
                raise PrivacyConfigError(f"attach: epochs must be a finite number > 0, got {epochs} (or pass steps=)")
            steps = max(1, round(epochs * steps_per_epoch))
        if self.config.delta is None and n < 2:
            raise PrivacyConfigError(
                f"attach: the dataset has N={n} example; the default δ = 1/N^1.1 is then 1, which allows releasing "
                "it in the clear. Pass make_private(..., delta=...) with the δ you mean (DP over one record is "
                "rarely what is wanted: train on more data)")
        delta = self.config.delta if self.config.delta is not None else default_delta(n)
        self._check_same_delta(n, delta)
        if delta >= 1 / n:
            warnings.warn(f"delta={delta:g} is >= 1/N = {1 / n:g}: such a δ allows leaking a whole record; "
                          f"use delta < 1/N (default 1/N^1.1 = {default_delta(n):.3g})", stacklevel=5)
        if self.config.clipping == "per-layer":
            self.clipping = ClippingConfig.per_layer(self.model, self.config.max_grad_norm)
        else:
            self.clipping = ClippingConfig(self.config.max_grad_norm)
        seed = self._seed(1)
        ddp = self._distributed_setup()
        if ddp is not None:
            seed = ddp.broadcast_seed(seed)  # one global Poisson mask on every rank
        if self.steps and adaptive_settings(self.config.clipping) is not None:
            raise PrivacyConfigError(
                f"attach: this run with clipping={self.config.clipping!r} has taken {self.steps} steps; its noise "
                "guard budgets a fresh plan, so it cannot be attached again. Plan all steps in one attach (or "
                "start a new make_private run and account both yourself).")
        if self.config.mechanism in MF_MECHANISMS:
            if self.steps:
                raise PrivacyConfigError(
                    f"attach: this {self.config.mechanism} run has taken {self.steps} steps; its correlated noise "
                    "stream cannot restart with a new plan. Plan all steps in one attach (or start a new "
                    "make_private run and account both yourself).")
            sampler, expected_batch = self._attach_mf(n, steps, steps_per_epoch, delta, seed)
            _warn_if_mf_batch_differs(self.config.mechanism, n, sample_rate * n, steps_per_epoch,
                                      self.mechanism.plan)  # type: ignore[union-attr]
            sample_rate = sampler.sample_rate
        else:
            sigma, planned_eps = self._calibrate(sample_rate, steps, delta)
            self.mechanism = GaussianMechanism(sigma, self.clipping.sensitivity, seed=self._seed())
            self.plan = TrainingPlan(n, sample_rate, steps_per_epoch, steps, delta, sigma, planned_eps)
            sampler, expected_batch = PoissonSampler(n, sample_rate, steps, seed), sample_rate * n
            self._warn_if_plan_passes_budget()
        settings = adaptive_settings(self.config.clipping)
        if settings is not None:
            self.adaptive = AdaptiveClipping(self, settings)
        if loss_fn is not None:
            self.loss_fn = loss_fn
        mechanism: NoiseMechanism = self.mechanism
        if ddp is not None:  # rank 0 adds the noise, one all-reduce of the sums; each rank its share
            ddp.expected_consistency(n, sample_rate, steps, self.plan.noise_multiplier, self.clipping.sensitivity,
                                     self.config.eps, self.plan.delta)
            sampler, mechanism = ddp.ShardedSampler(sampler, ddp.rank(), ddp.world_size()), ddp.DistributedNoise(
                mechanism)
        self._trainable_ids = {id(p) for p in trainable_parameters(self.model).values()}
        self.optimizer = self._private_optimizer(optimizer, lr, mechanism, expected_batch)
        self.loader = PoissonLoader(dataset, sampler, steps_per_epoch)
        self._probe(dataset)
        self._attaches += 1
        self._plan_start = self.steps
        return self.loader

    def _seed(self, offset: int = 0) -> int | None:
        """The seed of this attach's stream ``offset`` (noise: 0, sampling: 1, …); None: OS entropy.

        The first attach uses ``config.seed``; the k-th re-attach a seed derived from (seed, k)
        (:func:`mechanisms.rng.derived_seed`), so its noise and Poisson draws are fresh. Re-seeding
        from ``config.seed`` would replay the first attach's noise: two releases with the same noise
        are not the independent Gaussian steps the ledger records.
        """
        if self.config.seed is None:
            return None
        from mechanisms.rng import derived_seed

        base = self.config.seed if self._attaches == 0 else derived_seed(self.config.seed, self._attaches)
        return base + offset

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

    def _private_optimizer(self, optimizer: torch.optim.Optimizer | None, lr: float | None,
                           mechanism: NoiseMechanism, expected_batch: float) -> DPOptimizer:
        """Wrap ``optimizer`` (default: SGD with momentum if ``lr`` is given, else Adam) with the noise."""
        params = list(trainable_parameters(self.model).values())
        if optimizer is None:
            optimizer = (torch.optim.SGD(params, lr=lr, momentum=0.9) if lr is not None
                         else torch.optim.Adam(params, lr=1e-3))
        wrapped = DPOptimizer(optimizer, params, mechanism, expected_batch)
        wrapped.on_public_step = (self._before_public_step, self._after_public_step)
        return wrapped

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

    def _distributed_setup(self):
        """The :mod:`dptrain.distributed` module when this run is data-parallel (else None)."""
        from . import distributed as ddp

        if not ddp.resolve(self.distributed):
            return None
        lazy = type(self) is not PrivateTraining  # LazyDP (chosen by itself for large tables)
        if lazy or self.config.mechanism != "dpsgd" or self.config.clipping not in ("flat", "per-layer"):
            raise PrivacyConfigError(
                f"distributed training supports mechanism='dpsgd' with flat or per-layer clipping, not "
                f"mechanism={'lazy' if lazy else self.config.mechanism!r}, clipping={self.config.clipping!r}; "
                "run it in one process "
                "(make_private(..., distributed=False))")
        ddp.check_model(self.model)
        ddp.broadcast_module(self.model)
        return ddp

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
        was_training = self.model.training
        self.model.eval()  # same dropout masks (none) on both paths
        try:
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
        finally:
            self.model.train(was_training)
        fix = ("so per-example clipping would not bound each example's influence. Remove batch-level operations "
               "(batch statistics, normalisation over dim 0) from forward().")
        if fast is not None:
            for name, value in ref.sums.items():
                if not torch.allclose(fast.sums[name], value, atol=1e-4, rtol=1e-3):
                    raise UnsupportedModuleError(
                        f"the model's forward mixes examples within a batch (parameter {name!r} gets a different "
                        f"gradient when examples are processed together than one by one), {fix}")
        elif ref.example_losses is not None:  # the fast path refused: compare the losses instead
            batched = self._batched_losses(x, y)
            if batched is not None and not torch.allclose(batched.float(), ref.example_losses.float(),
                                                          atol=1e-5, rtol=1e-4, equal_nan=True):
                raise UnsupportedModuleError(
                    "the model's forward mixes examples within a batch (the per-example losses differ when "
                    f"examples are processed together than one by one), {fix}")

    def _batched_losses(self, x: Any, y: torch.Tensor) -> torch.Tensor | None:
        """Per-example losses of one batched forward in eval mode (None where they cannot be formed)."""
        from .ghost import per_example_losses

        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                return per_example_losses(self.loss_fn, self.model(*_as_tuple(x)), y).reshape(-1)
        except Exception:  # noqa: BLE001 - a model the batched forward cannot run gives no evidence either way
            return None
        finally:
            self.model.train(was_training)

    def _to_device(self, *values: Any, params: dict[str, nn.Parameter] | None = None) -> tuple:
        """``values`` moved to the device of the model's trainable parameters (``params``, if at hand)."""
        params = trainable_parameters(self.model) if params is None else params
        device = next(iter(params.values())).device
        return tuple(to_device(v, device) for v in values)

    def _require_attached(self) -> TrainingPlan:
        if self.plan is None or self.optimizer is None:
            raise RuntimeError("call priv.attach(dataset, batch_size=..., epochs=...) before training")
        return self.plan

    # ------------------------------------------------------------------ budget
    @property
    def steps(self) -> int:
        return self.ledger.steps

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

    def epsilon_spent(self) -> float:
        """ε spent so far at the run's δ (0 before the first step)."""
        plan = self._require_attached()
        if self.steps == 0:
            return 0.0
        return self.ledger.epsilon(plan.delta, accountant=self.config.accountant)

    # ------------------------------------------------------------------ training
    def backward(self, inputs: Any, targets: torch.Tensor) -> float:
        """Write the clipped per-example gradient sum into each ``p.grad``; return the mean loss."""
        self._require_attached()
        assert self.clipping is not None
        plan = current_plan(self.model)  # one look at the model's structure for the whole step
        params = plan.params
        self._check_trainable(plan.trainable, params)
        assert self.optimizer is not None
        if self.optimizer.armed:
            raise PrivacyError(
                "priv.backward was called twice without a step: clipped sums do not add up across calls (each "
                "call is one Poisson-sampled batch, accounted as one step). Step in between, or call "
                "priv.optimizer.zero_grad(); for a batch too large for memory use make_private(..., chunk_size=).")
        self._take_drawn(inputs, targets)
        inputs, targets = self._to_device(inputs, targets, params=params)
        batch = clip_and_sum(self.model, self.loss_fn, inputs, targets, self.clipping,
                             chunk_size=self.config.chunk_size, method=self.config.engine, plan=plan)
        for name, p in params.items():
            p.grad = batch.sums[name]
        self.optimizer.arm()
        return batch.mean_loss

    def _take_drawn(self, inputs: Any, targets: torch.Tensor) -> None:
        """The batch must be one the attached Poisson loader drew and no step has used (checked by its rows).

        Privacy assumption: the accountant's PoissonSampled(q, ·) event holds only for batches in
        which each example was included independently with probability q — the loader's draws. A
        batch from another loader (fixed size, shuffled) or a hand-picked one is not covered by ε.
        """
        assert self.loader is not None
        rows = _rows(inputs, targets)
        if rows is not None and self.loader.take(rows):
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

    def step(self, inputs: Any, targets: torch.Tensor | None = None) -> float:
        """One private step on a Poisson-sampled batch; returns the batch's mean loss.

        The returned loss is computed from the batch before any noise: a data-dependent number that ε does
        not cover. Use it to watch training; do not publish it (evaluate a released model on public or
        held-out data instead)."""
        self._require_attached()
        if targets is None:
            inputs, targets = _unpack(inputs)
        if self.adaptive is not None:
            return self.adaptive.step(self, inputs, targets)
        self.check_budget()
        assert self.optimizer is not None and self.mechanism is not None
        self.optimizer.zero_grad()
        loss = self.backward(inputs, targets)
        self.optimizer._apply_step()
        self.ledger.record(self._step_event(self.steps))
        return loss

    def fit(self, epochs: float | None = None, progress: bool = False) -> list[float]:
        """Run the remaining steps of the current plan (or ``epochs`` more epochs); return the losses.

        A plan counts its own steps: after a re-attach, the new plan's ``planned_steps`` are planned from
        that attach on (the steps before it are in the ledger, not in this plan).
        """
        plan = self._require_attached()
        assert self.loader is not None
        n_steps = (plan.planned_steps - self.plan_steps if epochs is None
                   else round(epochs * plan.steps_per_epoch))
        steps: Iterable[int] = range(max(0, n_steps))
        if progress:
            from tqdm import tqdm
            steps = tqdm(steps, desc="private training", unit="step")
        losses = []
        for _ in steps:
            batch = self.loader.batch(self.loader.sampler.sample())
            losses.append(self.step(batch))
        return losses

    @property
    def plan_steps(self) -> int:
        """Steps taken since the current plan's attach (``steps`` counts the whole run)."""
        return self.steps - self._plan_start

    # ------------------------------------------------------------------ report & state
    def report(self, history_points: int = 10) -> "accountants.BudgetReport":
        """Budget report: ε spent, δ, σ, q, steps, accountant (and ε over steps)."""
        plan = self._require_attached()
        history: list[tuple[int, float]] = []
        if self.steps > 0:
            points = sorted({max(1, round(self.steps * k / history_points)) for k in range(1, history_points + 1)})
            planned = self.adaptive is None and (self.config.mechanism in MF_MECHANISMS
                                                 or self._ledger_holds_only_this_plan())
            run_event = self._run_event if planned else self.ledger.prefix  # after a re-attach: the ledger
            history = [(t, accountants.epsilon_of_event(run_event(t), plan.delta,
                                                        accountant=self.config.accountant)) for t in points]
        warn = []
        if plan.steps_per_epoch >= 2 and self.config.mechanism in ("dpsgd", "lazy"):
            limit = accountants.shuffled_limit(plan.noise_multiplier, plan.steps_per_epoch)
            if limit.warning():
                warn.append("if batches were shuffled instead of Poisson-sampled: " + str(limit.warning()))
        bounds = self.ledger.epsilon_bounds(plan.delta) if self.steps and self.config.accountant == "prv" else None
        return accountants.BudgetReport(
            epsilon_spent=self.epsilon_spent(), delta=plan.delta, target_epsilon=self.config.eps,
            noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=self.steps,
            planned_steps=plan.planned_steps, plan_start=self._plan_start, accountant=self.config.accountant,
            dataset_size=plan.dataset_size, max_grad_norm=self.config.max_grad_norm,
            mechanism=self.config.mechanism, epsilon_bounds=bounds, epsilon_history=history,
            warnings=warn, segments=self.ledger.segments() if self.adaptive is None else [], **({} if self.adaptive is None else self.adaptive.report_fields(self.ledger)))

    def state_dict(self) -> dict[str, Any]:
        """Model, optimizer (+ mechanism RNG), sampler RNG, accountant history and plan."""
        plan = self._require_attached()
        assert self.optimizer is not None and self.loader is not None
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "sampler": self.loader.sampler.state_dict(), "ledger": self.ledger.state_dict(),
                "plan": asdict(plan), "config": asdict(self.config), "attaches": self._attaches,
                "plan_start": self._plan_start, **self._order_state(),
                **({} if self.adaptive is None else {"adaptive": self.adaptive.state_dict()})}

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


#: make_private arguments a resumed run may change (memory and compute, not privacy)
RESUME_FREE = ("chunk_size", "engine", "seed")  # seed: the checkpoint carries the RNG states


def make_private(model: nn.Module, eps: float | None = 3.0, delta: float | None = None,
                 max_grad_norm: float = 1.0, mechanism: str = "dpsgd", accountant: str = "prv",
                 clipping: str = "flat", noise_multiplier: float | None = None,
                 chunk_size: int | None = None, seed: int | None = None,
                 bands: int | None = None, distributed: bool | None = None, engine: str = "auto") -> PrivateTraining:
    """Make training of ``model`` (ε, δ)-differentially private.

    The model stays the same object (no wrapper, no renamed state dict). Call
    ``attach(dataset, ...)`` next; it calibrates σ for the planned steps.
    ``noise_multiplier`` skips calibration (ε is then reported, and still capped at
    ``eps`` if given). ``chunk_size`` bounds how many examples' gradients are in memory.
    ``mechanism``: ``"dpsgd"`` or a correlated-noise mechanism (``"banded-mf"`` with
    ``bands`` bands, ``"multi-epoch-mf"``, ``"fft-mf"``), or ``"lazy"``: DP-SGD with lazy noise
    for embedding tables (:mod:`dptrain.lazy`; chosen by itself under ``"dpsgd"`` when a table has
    at least ``dptrain.lazy.AUTO_MIN_ROWS`` rows and is trained by plain SGD).
    ``clipping``: ``"flat"``, ``"per-layer"``, ``"quantile"`` (Andrew et al. 2021) or ``"rldp"``
    (SAC controller of per-layer thresholds and σ per step), or their settings objects
    (:mod:`dptrain.adaptive`).
    ``distributed``: data-parallel DP-SGD over ``torch.distributed`` ranks (:mod:`dptrain.distributed`);
    ``None`` turns it on when a process group with more than one rank is initialised at ``attach``.
    ``engine``: ``"auto"`` (the book-keeping fast path where it covers the model, else vmap), or ``"vmap"`` /
    ``"loop"`` always — for a model whose ``forward`` reorders examples depending on the data, which the fast
    path assumes it does not.
    """
    config = PrivacyConfig(eps, delta, float(max_grad_norm), mechanism, accountant, clipping,
                           noise_multiplier, chunk_size, seed, bands, engine)
    if accountant == "gdp" and eps is not None:
        warnings.warn("accountant='gdp' is the central-limit approximation of Gaussian DP, not an upper bound: "
                      f"the budget ε={eps} it enforces can be exceeded under exact accounting (by several times "
                      "for few, weakly noised steps). Use accountant='prv' (the default) for a guarantee.",
                      stacklevel=2)
    from .lazy import LazyPrivateTraining, wants_lazy

    lazy = mechanism == "lazy" or (mechanism == "dpsgd" and adaptive_settings(clipping) is None and engine == "auto"
                                   and wants_lazy(model))
    priv = LazyPrivateTraining(model, config) if lazy else PrivateTraining(model, config)
    priv.distributed = distributed
    return priv
