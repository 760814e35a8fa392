"""``make_private``: the one-line entry to differentially private training.

``priv = make_private(model, eps=3)`` checks the model and the privacy target;
``priv.attach(dataset, batch_size, epochs, optimizer)`` fixes the sampling rate
q = batch_size / N (Poisson sampling) and the number of steps T, and calibrates the
noise multiplier σ so that T Poisson-sampled Gaussian steps spend at most ε at
δ (default 1/N^1.1). Each ``priv.step(x, y)`` clips per-example gradients, adds
N(0, σ²C²) noise, steps the optimizer and records the step's privacy event; a step
that would pass the budget raises :class:`BudgetExceededError` before anything runs.

:class:`PrivateTraining` is assembled from one mixin per concern: :mod:`dptrain.run_plan` (σ and the
plan), :mod:`dptrain.run_probe` (the attach probe), :mod:`dptrain.run_guards` (what each step checks)
and :mod:`dptrain.run_checkpoint` (state_dict / load_state_dict).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

import accountants
from mechanisms import GaussianMechanism, NoiseMechanism

from .adaptive import AdaptiveClipping, adaptive_settings
from .clipping import ClippingConfig, clip_and_sum
from .engine import LossFn, module_list, trainable_parameters
from .errors import PrivacyConfigError, PrivacyError
from .ghost_plan import current_plan
from .optimizer import DPOptimizer
from .privacy_config import (MF_MECHANISMS, PrivacyConfig, TrainingPlan, resolve_delta,
                             weak_default_delta)
from .run_checkpoint import Checkpointing
from .run_guards import Guards, check_precision
from .run_plan import Planning, warn_if_mf_batch_differs
from .run_probe import Probing
from .sampling import PoissonLoader, PoissonSampler, to_device
from .sampling import unpack_batch as _unpack
from .validation import validate


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


class PrivateTraining(Checkpointing, Planning, Probing, Guards):
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
            if batch_size > n:
                warnings.warn(f"attach: batch_size={batch_size} > N={n}: the sampling rate is capped at q = 1, so every "
                              "step trains on the whole dataset (no privacy amplification by sampling); use a "
                              "batch_size below N", stacklevel=5)
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
        delta = resolve_delta(self.config.delta, n, "attach", stacklevel=6)  # warned about if ≥ 1/N or weak
        self._check_same_delta(n, delta)
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
            warn_if_mf_batch_differs(self.config.mechanism, n, sample_rate * n, steps_per_epoch,
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
        with self._state_guard("attach (the probe of per-example gradients)"):
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
        modules = module_list(self.model)
        plan = current_plan(self.model, modules)  # one look at the model's structure for the whole step
        params = plan.params
        self._check_trainable(plan.trainable, params)
        assert self.optimizer is not None
        if self.optimizer.armed:
            raise PrivacyError(
                "priv.backward was called twice without a step: clipped sums do not add up across calls (each "
                "call is one Poisson-sampled batch, accounted as one step). Step in between, or call "
                "priv.optimizer.zero_grad(); for a batch too large for memory use make_private(..., chunk_size=).")
        with self._drawn_batch(inputs, targets, modules):
            inputs, targets = self._to_device(inputs, targets, params=params)
            batch = clip_and_sum(self.model, self.loss_fn, inputs, targets, self.clipping,
                                 chunk_size=self.config.chunk_size, method=self.config.engine, plan=plan)
        for name, p in params.items():
            p.grad = batch.sums[name]
        self.optimizer.arm()
        return batch.mean_loss

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
        weak = weak_default_delta(plan.delta, plan.dataset_size) if self.config.delta is None else None
        if weak is not None:
            warn.append(weak)
        bounds = self.ledger.epsilon_bounds(plan.delta) if self.steps and self.config.accountant == "prv" else None
        return accountants.BudgetReport(
            epsilon_spent=self.epsilon_spent(), delta=plan.delta, target_epsilon=self.config.eps,
            noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=self.steps,
            planned_steps=plan.planned_steps, plan_start=self._plan_start, accountant=self.config.accountant,
            dataset_size=plan.dataset_size, max_grad_norm=self.config.max_grad_norm,
            mechanism=self.config.mechanism, epsilon_bounds=bounds, epsilon_history=history,
            warnings=warn, segments=self.ledger.segments() if self.adaptive is None else [],
            composition=[[q, s, n] for (q, s), n in accountants.flatten(self.ledger.composed())]
            if self.ledger.entries else [], **({} if self.adaptive is None else self.adaptive.report_fields(self.ledger)))


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
    if not isinstance(model, nn.Module):
        raise PrivacyConfigError(f"make_private: model must be a torch.nn.Module, got {type(model).__name__}")
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
