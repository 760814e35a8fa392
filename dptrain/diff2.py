"""DIFF2 training driver: clients simulated in one process, or spread over torch.distributed ranks.

``make_diff2(model, clients, eps=3, rounds=R, refresh_every=T, clip_grad=C1, clip_diff=C2, lr=η)``
calibrates DIFF2's two noise multipliers for the target ε (:func:`mechanisms.diff2.calibrate_diff2`)
and returns a :class:`Diff2Trainer`; ``trainer.fit()`` runs the R rounds of
:mod:`mechanisms.diff2` with its GD subroutine x_{t+1} = x_t − η v_t. Differences are clipped
at r_t = C2·‖x_t − x_{t−1}‖ (the norm over the trainable parameters, one host sync per round).

Units and neighbouring relation (stated in the report):
* ``level="example"`` — example-level DP over the union of all clients' data: each example's
  gradient (refresh) or gradient difference is clipped; neighbours add or remove one example.
* ``level="client"`` — client-level DP: each client's mean-loss gradient (or its difference) is
  clipped as one unit; neighbours add or remove one client with all its data.

At both levels the model must keep no statistics of the data in its buffers (BatchNorm's running
mean / var, …): the buffers are released with the model and no noise reaches them. Such modules are
refused (``dptrain.fix(model)`` replaces BatchNorm / InstanceNorm).

Clients: a sequence of ``(inputs, targets)`` — all clients in a single process, or this rank's
clients under ``torch.distributed`` (the number of units is summed over ranks; rank 0 adds the
noise once, one all-reduce per round; every rank holds the same model).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import nn

import accountants
from mechanisms.diff2 import Diff2Config, Diff2Mechanism, calibrate_diff2

from .clipping import ClippingConfig, clipped_sum
from .engine import LossFn, iter_chunks, per_sample_grads, trainable_parameters
from .errors import BudgetExceededError, PrivacyConfigError
from .privacy_config import resolve_delta, weak_default_delta
from .run_guards import StateGuard, check_precision
from .validation import validate

LEVELS = ("example", "client")
Client = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Diff2Report:
    """What a DIFF2 run spent, and under which neighbouring relation."""

    level: str
    neighbouring: str
    epsilon: float
    delta: float
    rounds_run: int
    config: Diff2Config
    units: int
    accountant: str
    #: e.g. a default δ that is large because there are few units (see dptrain.privacy_config.weak_default_delta)
    warnings: tuple[str, ...] = ()

    def to_text(self) -> str:
        c = self.config
        notes = "".join(f"\n  warning: {w}" for w in self.warnings)
        return (f"DIFF2 ({self.level}-level DP; neighbours: {self.neighbouring})\n"
                f"  ε spent {self.epsilon:.4f} at δ={self.delta:.3g} ({self.accountant}) after {self.rounds_run}/"
                f"{c.rounds} rounds over {self.units} units\n"
                f"  refresh every T={c.refresh_every}: clip C1={c.clip_grad:g}, noise multiplier z1={c.noise_grad:.4g}; "
                f"differences clipped at C2·‖x_t − x_(t−1)‖, C2={c.clip_diff:g}, z2={c.noise_diff:.4g}" + notes)


@contextlib.contextmanager
def _parameters_at(model: nn.Module, values: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily evaluate ``model`` at other values of its trainable parameters."""
    params = trainable_parameters(model)
    saved = {k: p.detach().clone() for k, p in params.items()}
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(values[k])
    try:
        yield
    finally:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(saved[k])


class Diff2Trainer:
    """State of one DIFF2 run (model, previous iterate, estimator, ledger)."""

    def __init__(self, model: nn.Module, clients: Sequence[Client], config: Diff2Config, lr: float,
                 level: str = "example", loss_fn: LossFn | None = None, delta: float | None = None,
                 accountant: str = "prv", seed: int | None = None, chunk_size: int | None = 1024,
                 distributed: bool | None = None, cache_bytes: int = 1 << 28) -> None:
        from . import distributed as ddp

        if level not in LEVELS:
            raise PrivacyConfigError(f"DIFF2: level must be one of {LEVELS}, got {level!r}")
        if not (lr > 0 and math.isfinite(lr)):
            raise PrivacyConfigError(f"DIFF2: lr must be a positive finite step size, got {lr}")
        if not trainable_parameters(model):
            raise PrivacyConfigError("DIFF2: the model has no trainable parameters")
        # per-example gradients must depend on their own example only; at both levels no module may keep
        # statistics of the data it sees (BatchNorm's running mean / var): the model's buffers are released
        # with it and receive no noise. A client's examples are one unit: a BatchNorm without running
        # statistics mixes only them, and is allowed at client level
        validate(model, mixing_allowed=level == "client")
        if config.private:  # the clip bound must hold in the parameters' dtype (as make_private checks)
            check_precision(trainable_parameters(model), "make_diff2")
        self.model, self.clients, self.config, self.lr = model, list(clients), config, float(lr)
        self.level, self.accountant, self.chunk_size = level, accountant, chunk_size
        self.loss_fn: LossFn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
        self.ddp = ddp if ddp.resolve(distributed) else None
        local_units = sum(int(y.shape[0]) for _, y in self.clients) if level == "example" else len(self.clients)
        self.units = self._global_count(local_units)
        if self.units < 1:
            raise PrivacyConfigError("DIFF2: no data — every client is empty")
        self.delta = resolve_delta(delta, self.units, "DIFF2", "clients" if level == "client" else "examples",
                                   private=config.private)
        if self.ddp is not None:
            ddp.check_model(model)
            ddp.broadcast_module(model)
            ddp.check_same_on_all_ranks("DIFF2 plans (level, R, T, C1, C2, z1, z2, lr, δ)",
                                        [LEVELS.index(level), config.rounds, config.refresh_every, config.clip_grad,
                                         config.clip_diff, config.noise_grad, config.noise_diff, lr, self.delta],
                                        who="distributed DIFF2", how="call make_diff2")
        self.mechanism = Diff2Mechanism(config, seed)
        self.ledger = accountants.PrivacyLedger()
        self.previous: dict[str, torch.Tensor] | None = None
        # keep round t's per-unit gradients for round t+1's differences (same numbers, half the work)
        # when they fit in ``cache_bytes``; otherwise g_u(x_{t-1}) is recomputed
        n_params = sum(p.numel() for p in trainable_parameters(model).values())
        self.cache_gradients = local_units * n_params * 4 <= cache_bytes
        self._cache: dict[tuple[int, int], dict[str, torch.Tensor]] | None = None  # at x_{t-1}
        self._fresh: dict[tuple[int, int], dict[str, torch.Tensor]] | None = None  # at x_t

    def _global_count(self, local: int) -> int:
        if self.ddp is None:
            return int(local)
        t = torch.tensor([float(local)], dtype=torch.float64)
        return int(round(self.ddp.all_reduce_sums([t])[0].item()))

    # ------------------------------------------------------------------ per-unit contributions
    def _example_grads(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return per_sample_grads(self.model, self.loss_fn, x, y)

    def _client_grad(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        params = trainable_parameters(self.model)
        g = torch.autograd.grad(self.loss_fn(self.model(x), y), list(params.values()), allow_unused=True)
        return {k: (gi if gi is not None else torch.zeros_like(p)).unsqueeze(0)
                for (k, p), gi in zip(params.items(), g)}

    @staticmethod
    def _guarded(unit_grads, buffers: StateGuard, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """``unit_grads(x, y)``, then the buffers checked (:meth:`StateGuard.check`); if it raises, the buffers
        are put back first."""
        try:
            g = unit_grads(x, y)
        except BaseException:
            buffers.undo()
            raise
        buffers.check()
        return g

    def step_distance(self) -> float:
        """‖x_t − x_{t−1}‖ over the trainable parameters (public: both iterates were released)."""
        if self.previous is None:
            raise RuntimeError("DIFF2: no previous iterate yet (round 0 is a refresh)")
        sq = sum(((p.detach() - self.previous[k]).double() ** 2).sum()
                 for k, p in trainable_parameters(self.model).items())
        return float(torch.sqrt(sq))

    def local_clipped_sum(self, t: int, distance: float | None = None) -> dict[str, torch.Tensor]:
        """Σ over this process's units of clip_{C1}(g_u(x_t)) (refresh) or clip_{r_t}(g_u(x_t) − g_u(x_{t−1})).

        r_t = C2·``distance``, ``distance`` = ‖x_t − x_{t−1}‖ (computed here when not given).
        """
        refresh = self.mechanism.is_refresh(t)
        if not refresh and distance is None:
            distance = self.step_distance()
        threshold = self.mechanism.clip_threshold(t, distance)
        params = trainable_parameters(self.model)
        total = {k: torch.zeros_like(p) for k, p in params.items()}
        if threshold == 0:  # x_t = x_{t−1}: every difference is zero (and the round releases exactly 0)
            self._fresh = self._cache
            return total
        clip = ClippingConfig(threshold)
        unit_grads = self._example_grads if self.level == "example" else self._client_grad
        # DIFF2 releases the model with its buffers, and noise reaches the trainable parameters only: a forward
        # that updates a buffer from the data is refused, and the update undone (both levels)
        buffers = StateGuard(self.model, "DIFF2", parameters=False, values=True)
        cache: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        for c, (x, y) in enumerate(self.clients):
            parts = iter_chunks(x, y, self.chunk_size) if self.level == "example" else [((x,), y)]
            for j, ((xc,), yc) in enumerate(parts):
                if int(yc.shape[0]) == 0:
                    continue
                g = self._guarded(unit_grads, buffers, xc, yc)
                if self.cache_gradients:
                    cache[(c, j)] = g
                if not refresh:
                    g_prev = self._cache.get((c, j)) if self._cache is not None else None
                    if g_prev is None or next(iter(g_prev.values())).shape[0] != yc.shape[0]:
                        assert self.previous is not None
                        with _parameters_at(self.model, self.previous):
                            g_prev = self._guarded(unit_grads, buffers, xc, yc)
                    g = {k: g[k] - g_prev[k] for k in g}
                part = clipped_sum(g, clip)
                for k in total:
                    total[k] += part[k]
        self._fresh = cache if self.cache_gradients else None
        return total

    # ------------------------------------------------------------------ rounds
    @property
    def rounds_run(self) -> int:
        return self.mechanism.round

    def epsilon_spent(self) -> float:
        """ε spent so far at the run's δ: 0 before the first round, inf once a round ran without noise."""
        if not self.rounds_run:
            return 0.0
        if not self.config.private:
            return math.inf
        return self.ledger.epsilon(self.delta, accountant=self.accountant)

    def step(self) -> list[torch.Tensor]:
        """One round: clipped sums → noise once → (all-reduce) → estimator update → GD step."""
        t = self.rounds_run
        if t >= self.config.rounds:
            raise BudgetExceededError(f"DIFF2: all {self.config.rounds} planned (and accounted) rounds have run; "
                                      f"ε spent {self.epsilon_spent():.4g}. Plan more rounds at attach time.")
        params = trainable_parameters(self.model)
        if self.config.private:
            check_precision(params, f"DIFF2 round {t} (the model was converted after make_diff2)")
        names = list(params)
        distance = None if self.mechanism.is_refresh(t) else self.step_distance()
        local = self.local_clipped_sum(t, distance)
        self._cache, self._fresh = self._fresh, None
        sums = [local[k] for k in names]
        if self.ddp is None:
            noised = self.mechanism.noise(sums, t, distance)
        else:
            noised = self.ddp.all_reduce_sums(self.mechanism.noise(sums, t, distance) if self.ddp.is_main_process()
                                              else sums)
        estimate = self.mechanism.update(noised, t, self.units)
        self.previous = {k: p.detach().clone() for k, p in params.items()}
        with torch.no_grad():
            for p, v in zip(params.values(), estimate):
                p.sub_(self.lr * v)
        if self.config.private:
            self.ledger.record(self.mechanism.round_event(t))
        return estimate

    def fit(self, rounds: int | None = None) -> None:
        for _ in range(self.config.rounds - self.rounds_run if rounds is None else rounds):
            self.step()

    # ------------------------------------------------------------------ checkpoints
    def _settings(self) -> dict[str, Any]:
        """What a resumed run must share with the one that saved the checkpoint."""
        return {"config": asdict(self.config), "level": self.level, "lr": self.lr, "units": self.units,
                "delta": self.delta, "accountant": self.accountant}

    def state_dict(self) -> dict[str, Any]:
        """Model, round, estimator and noise streams, ledger, and x_{t−1} (for the next difference)."""
        return {"model": self.model.state_dict(), "mechanism": self.mechanism.state_dict(),
                "ledger": self.ledger.state_dict(), "settings": self._settings(),
                "previous": None if self.previous is None else {k: v.clone() for k, v in self.previous.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a run: the budget already spent is restored, never reset (same settings required)."""
        if state.get("settings") != self._settings():
            raise PrivacyConfigError(f"DIFF2 load_state_dict: the checkpoint is of another run ({state.get('settings')}; "
                                     f"this run: {self._settings()}); resume with the same make_diff2 arguments "
                                     "and clients")
        self.model.load_state_dict(state["model"])
        self.mechanism.load_state_dict(state["mechanism"])
        self.ledger.load_state_dict(state["ledger"])
        self.previous = state["previous"]
        self._cache = self._fresh = None  # g_u(x_{t−1}) is recomputed from ``previous``

    def report(self) -> Diff2Report:
        neighbours = ("add/remove one example of any client; the number of examples N is public (updates are "
                      "divided by N)" if self.level == "example"
                      else "add/remove one client with all its examples; the number of clients N is public "
                      "(updates are divided by N)")
        eps = self.epsilon_spent() if self.config.private else math.inf
        note = (weak_default_delta(self.delta, self.units, "clients" if self.level == "client" else "examples")
                if self.config.private else None)
        return Diff2Report(self.level, neighbours, eps, self.delta, self.rounds_run, self.config, self.units,
                           self.accountant, () if note is None else (note,))


def make_diff2(model: nn.Module, clients: Sequence[Client], *, eps: float | None = 3.0, delta: float | None = None,
               rounds: int = 100, refresh_every: int = 10, clip_grad: float = 1.0, clip_diff: float = 1.0,
               lr: float = 0.5, level: str = "example", noise_grad: float | None = None,
               noise_diff: float | None = None, grad_share: float = 0.8, accountant: str = "prv",
               loss_fn: LossFn | None = None, seed: int | None = None,
               distributed: bool | None = None) -> Diff2Trainer:
    """A DIFF2 run with noise calibrated to ``eps`` at ``delta`` (default 1/N^1.1, N units).

    ``clip_diff`` is C2 in r_t = C2·‖x_t − x_{t−1}‖ (per unit of parameter distance, not an
    absolute norm). Give ``noise_grad`` and ``noise_diff`` to fix the noise: with ``eps`` they must
    spend at most ``eps`` (else an error); with ``eps=None`` ε is what they spend, and both 0 is the
    non-private recursion (ε = ∞; refused while a target ``eps`` is given). ``refresh_every=1`` is DP-GD.
    """
    from . import distributed as ddp

    if eps is not None and not (eps > 0 and math.isfinite(eps)):
        raise PrivacyConfigError(f"make_diff2: eps must be a positive finite number (or None with both noises "
                                 f"given), got {eps}")
    units = sum(int(y.shape[0]) for _, y in clients) if level == "example" else len(clients)
    if ddp.resolve(distributed):
        t = torch.tensor([float(units)], dtype=torch.float64)
        units = int(round(ddp.all_reduce_sums([t])[0].item()))
    unit_name = "clients" if level == "client" else "examples"
    if (noise_grad is None) != (noise_diff is None):
        raise PrivacyConfigError(f"make_diff2: give both noise_grad and noise_diff, or neither (calibrated to eps); "
                                 f"got noise_grad={noise_grad}, noise_diff={noise_diff}")
    if noise_grad is None or noise_diff is None:
        if eps is None:
            raise PrivacyConfigError("make_diff2: give a target eps, or both noise_grad and noise_diff")
        delta = resolve_delta(delta, units, "make_diff2", unit_name)
        noise_grad, noise_diff = calibrate_diff2(eps, delta, rounds, refresh_every, accountant, grad_share)
    config = Diff2Config(rounds, refresh_every, clip_grad, clip_diff, noise_grad, noise_diff)
    # a run with noise (ε finite) needs a meaningful δ; the non-private recursion (ε = ∞) only records one
    delta = resolve_delta(delta, units, "make_diff2", unit_name, private=config.private or eps is not None)
    if eps is not None and not config.private:  # a target ε was asked for: no round may go un-noised
        if noise_grad == 0 and noise_diff == 0:
            raise PrivacyConfigError(f"make_diff2: noise_grad=0 and noise_diff=0 give no finite ε, but eps={eps} "
                                     "was asked for; pass eps=None to run the non-private recursion (ε = ∞), or "
                                     "leave the noise to calibration")
        raise PrivacyConfigError(f"make_diff2: eps={eps} was asked for, but noise_grad={noise_grad}, "
                                 f"noise_diff={noise_diff} release some rounds without noise (no finite ε); "
                                 "give both noises > 0, leave them to calibration, or pass eps=None for a run "
                                 "without a target (ε = ∞)")
    if eps is not None and config.private:
        planned = accountants.epsilon_of_event(Diff2Mechanism(config).run_event(), delta, accountant)
        if planned > eps * (1 + 1e-9):
            raise PrivacyConfigError(f"make_diff2: noise_grad={noise_grad}, noise_diff={noise_diff} spend ε={planned:.4g} "
                                     f"over {rounds} rounds, more than eps={eps}; raise the noise, lower the rounds, "
                                     "or leave the noise to calibration")
    return Diff2Trainer(model, clients, config, lr, level, loss_fn, delta, accountant, seed, distributed=distributed)
