"""Federated rounds: ``make_federated(model, clients, eps=3, algorithm=..., dp=...)``.

One round: the server samples clients (rate p; p = 1: all), every sampled client trains locally
from the global model (:mod:`dptrain.federated.client`), the updates are summed over clients and
ranks, noised once (client-level DP) and averaged (:mod:`dptrain.federated.server`), and the
server applies θ ← θ + η_s Δ̄. Algorithms (what the clients train, what the server does after):

- ``"fedavg"``: every trainable parameter (DP-FedAvg under ``dp="client"``).
- ``"dp-lora"``: a LoRA model (:func:`dptrain.lora.add_lora`), both A and B trained and averaged
  separately.
- ``"ffa-lora"``: A frozen at its random init, only B trained (Sun et al. 2024, FFA-LoRA).
- ``"fedsvd"``: only B trained; after averaging, each (B, A) is re-factorised by the SVD of B A
  (Lee et al. 2025; :mod:`mechanisms.fedsvd`), so A has orthonormal rows after every round.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

import accountants
from mechanisms import GaussianMechanism
from mechanisms.rng import cpu_generator

from ..engine import LossFn, trainable_parameters
from ..errors import BudgetExceededError, PrivacyConfigError
from ..lora import lora_layers
from ..privacy_config import resolve_delta, weak_default_delta
from ..run_guards import check_precision
from ..validation import validate
from .client import Client, client_seed
from .comm import DistributedComm, LocalComm
from .config import ALGORITHMS, DP_UNITS, FederatedConfig
from .server import clip_update, fedsvd_refactor_model, orthonormalize_adapters, server_noise


@lru_cache(maxsize=1024)
def _calibrate(eps: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """σ for ``steps`` Poisson-sampled Gaussian steps at rate q (memoised: clients of one size share it)."""
    return accountants.calibrate_noise(eps, delta, sample_rate, steps, accountant=accountant)


@dataclass(frozen=True)
class RoundResult:
    """One round: the (privatized) mean update, which is what is released, and who took part.

    ``participants`` stays with the server: client-level ε is amplified by the client sampling, which
    assumes the sample is secret; publishing it voids that amplification (the round then costs the
    unsampled Gaussian mechanism's ε)."""

    round: int
    participants: tuple[int, ...]
    mean_update: dict[str, torch.Tensor]


@dataclass(frozen=True)
class FederatedReport:
    """Budget of a federated run (ε of the privacy unit ``dp``)."""

    dp: str
    algorithm: str
    epsilon_spent: float
    target_epsilon: float | None
    delta: float
    noise_multiplier: float  # client-level: server σ; example-level: the largest client σ_k
    rounds: int
    planned_rounds: int
    num_clients: int
    accountant: str
    #: e.g. a default δ that is large because there are few units (see dptrain.privacy_config.weak_default_delta)
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _setup_algorithm(model: nn.Module, algorithm: str) -> None:
    if algorithm == "fedavg":
        return
    layers = lora_layers(model)
    if not layers:
        raise PrivacyConfigError(f"make_federated(algorithm={algorithm!r}): the model has no LoRA adapters; "
                                 "add them first with dptrain.lora.add_lora(model, rank=...)")
    for layer in layers.values():
        layer.lora_A.weight.requires_grad_(algorithm == "dp-lora")
        layer.lora_B.weight.requires_grad_(True)
    if algorithm == "fedsvd":
        orthonormalize_adapters(model)


class FederatedTraining:
    """State of one federated run. Create it with :func:`make_federated`."""

    def __init__(self, model: nn.Module, clients: Mapping[int, Dataset], num_clients: int,
                 config: FederatedConfig, loss_fn: LossFn | None = None, comm: LocalComm | None = None) -> None:
        validate(model)
        self.model, self.config, self.comm = model, config, comm or LocalComm()
        self.loss_fn: LossFn = loss_fn or nn.CrossEntropyLoss()
        self.num_clients = int(num_clients)
        if self.num_clients < 1:
            raise PrivacyConfigError(f"make_federated: need at least one client, got {num_clients}")
        _setup_algorithm(model, config.algorithm)
        self.params = trainable_parameters(model)
        if not self.params:
            raise PrivacyConfigError("make_federated: the model has no trainable parameters")
        if config.private:  # clipped updates and noise must hold their bounds in the parameters' dtype
            check_precision(self.params, "make_federated")
        # every rank starts from rank 0's model (frozen base and A included)
        self.comm.broadcast([p.data for p in model.parameters()] + [b.data for b in model.buffers()])
        self.round = 0
        self._resumed = False  # set by load_state_dict: σ and ledgers from a checkpoint
        self.server_ledger = accountants.PrivacyLedger()
        self.delta = self._delta(clients)
        if isinstance(self.comm, DistributedComm):  # every rank must run the same plan (its clip norm, σ, q, …)
            from .. import distributed as ddp

            c = config
            ddp.check_same_on_all_ranks(
                "federated plans (algorithm, dp, target ε, δ, rounds, local steps, batch, lr, max_norm, client rate, "
                "σ, server lr, accountant, clients)",
                [ALGORITHMS.index(c.algorithm), DP_UNITS.index(c.dp), -1.0 if c.eps is None else c.eps, self.delta,
                 c.rounds, c.local_steps, c.batch_size, c.lr, c.max_norm, c.client_rate,
                 -1.0 if c.noise_multiplier is None else c.noise_multiplier, c.server_lr,
                 accountants.ACCOUNTANTS.index(c.accountant) if c.accountant in accountants.ACCOUNTANTS else -1.0,
                 self.num_clients], who="federated training", how="call make_federated")
        sigma = self._server_sigma()
        self.server_mechanism = (GaussianMechanism(sigma, config.max_norm, client_seed(config.seed, -1, 1))
                                 if config.dp == "client" else None)
        self.clients = {k: Client(k, ds, config, self._client_sigma(ds)) for k, ds in clients.items()
                        if self.comm.owns(k)}
        self._example_sigma = self._largest_client_sigma()
        self._example_epsilon = self._gather_example_epsilon() if config.dp == "example" else 0.0
        self._participation = cpu_generator(client_seed(config.seed, -1, 0))

    # ------------------------------------------------------------------ calibration
    def _delta(self, clients: Mapping[int, Dataset]) -> float:
        if self.config.dp == "client":
            self._units = (self.num_clients, "clients")
            return resolve_delta(self.config.delta, self.num_clients, "make_federated(dp='client')", "clients",
                                 private=self.config.private)
        local = torch.tensor([float(sum(len(ds) for k, ds in clients.items() if self.comm.owns(k)))])  # type: ignore[arg-type]
        self.comm.all_reduce_sum([local])  # every rank takes part, with or without an explicit δ
        self._units = (int(local.item()), "examples")
        return resolve_delta(self.config.delta, int(local.item()), f"make_federated(dp={self.config.dp!r})",
                             "examples", private=self.config.private)

    def _largest_client_sigma(self) -> float:
        """max_k σ_k over every rank's clients (example-level DP; else 0). Collective: every rank calls it, at
        construction and in load_state_dict, so that :meth:`report` needs no collective."""
        if self.config.dp != "example":
            return 0.0
        local = max((c.mechanism.noise_multiplier for c in self.clients.values() if c.mechanism), default=0.0)
        return self.comm.all_reduce_max(local)

    def _calibrated(self, sample_rate: float, steps: int) -> float:
        cfg = self.config
        if cfg.noise_multiplier is not None:
            return float(cfg.noise_multiplier)
        assert cfg.eps is not None
        return _calibrate(cfg.eps, self.delta, sample_rate, steps, cfg.accountant)

    def _server_sigma(self) -> float:
        if self.config.dp != "client":
            return 0.0
        return self._calibrated(self.config.client_rate, self.config.rounds)

    def _client_sigma(self, dataset: Dataset) -> float | None:
        if self.config.dp != "example":
            return None
        q = min(1.0, self.config.batch_size / len(dataset))  # type: ignore[arg-type]
        return self._calibrated(q, self.config.rounds * self.config.local_steps)

    # ------------------------------------------------------------------ budget
    def _server_event(self) -> accountants.DpEvent:
        assert self.server_mechanism is not None
        inner = accountants.GaussianEvent(self.server_mechanism.noise_multiplier)
        p = self.config.client_rate
        return inner if p >= 1 else accountants.PoissonSampledEvent(p, inner)

    def epsilon_spent(self) -> float:
        """ε spent at ``delta`` by the privacy unit: the server's (client-level) or max_k ε_k (example-level)."""
        cfg = self.config
        if not cfg.private:
            return math.inf
        if cfg.dp == "client":
            if self.server_mechanism is None or self.server_mechanism.noise_multiplier == 0:
                return math.inf if self.round else 0.0
            return self.server_ledger.epsilon(self.delta, cfg.accountant)
        return self._example_epsilon  # gathered from every rank when it last changed: not a collective

    def _gather_example_epsilon(self) -> float:
        """max_k ε_k over every rank's clients (example-level DP). Collective: every rank calls it at
        construction, at the end of each round and in load_state_dict, so that :meth:`epsilon_spent` and
        :meth:`report` need no collective (one rank alone may call them)."""
        local = 0.0
        for c in self.clients.values():
            assert c.mechanism is not None
            if c.mechanism.noise_multiplier == 0:
                local = math.inf if self.round else 0.0
            else:
                local = max(local, c.ledger.epsilon(self.delta, self.config.accountant))
        return self.comm.all_reduce_max(local)

    def check_budget(self) -> None:
        """Raise :class:`BudgetExceededError` if one more round could pass the target ε."""
        cfg = self.config
        if not cfg.private or cfg.eps is None:
            return
        if cfg.noise_multiplier is None and self.round < cfg.rounds and not self._resumed:
            return  # calibrated: the planned rounds spend at most ε (a checkpoint's σ may be of another plan)
        if cfg.dp == "client":
            nxt = self.server_ledger.epsilon_if(self._server_event(), self.delta, cfg.accountant)
        else:
            nxt = 0.0
            for c in self.clients.values():
                nxt = max(nxt, c.ledger.epsilon_if(c.step_event(), self.delta, cfg.accountant, count=cfg.local_steps))
            nxt = self.comm.all_reduce_max(nxt)
        if nxt > cfg.eps:
            raise BudgetExceededError(
                f"federated round {self.round + 1} would spend ε={nxt:.4g} > target ε={cfg.eps} "
                f"(δ={self.delta:.3g}, dp={cfg.dp!r}); training stops here. Spent: ε={self.epsilon_spent():.4g}.")

    # ------------------------------------------------------------------ rounds
    def _participants(self) -> torch.Tensor:
        p = self.config.client_rate
        mask = (torch.rand(self.num_clients, generator=self._participation) < p) if p < 1 \
            else torch.ones(self.num_clients, dtype=torch.bool)
        mask = mask.to(torch.float32)
        self.comm.broadcast([mask])  # rank 0's draw decides
        return mask.bool()

    def run_round(self) -> RoundResult:
        """One round; returns its mean update (released) and its participants (server-side only)."""
        cfg = self.config
        if cfg.private:
            check_precision(trainable_parameters(self.model),
                            f"federated round {self.round + 1} (the model was converted after make_federated)")
        self.check_budget()
        mask = self._participants()
        sums = {k: torch.zeros_like(p) for k, p in self.params.items()}
        for k, client in self.clients.items():
            if not mask[k]:
                continue
            update = client.train(self.model, self.params, self.loss_fn)
            if cfg.dp == "client":
                update = clip_update(update, cfg.max_norm)
            for name in sums:
                sums[name] += update[name]
        names = list(sums)
        tensors = [sums[n] for n in names]
        self.comm.all_reduce_sum(tensors)
        noised = server_noise(tensors, self.server_mechanism, self.comm, self.round)
        count = int(mask.sum())
        denominator = cfg.client_rate * self.num_clients if cfg.dp == "client" else max(count, 1)
        mean = {n: t / denominator for n, t in zip(names, noised)}
        with torch.no_grad():
            for n, p in self.params.items():
                p.add_(mean[n], alpha=cfg.server_lr)
        if cfg.algorithm == "fedsvd":
            fedsvd_refactor_model(self.model, self.comm)
        if self.server_mechanism is not None and self.server_mechanism.noise_multiplier > 0:
            self.server_ledger.record(self._server_event())
        self.round += 1
        if cfg.dp == "example":  # every rank is here: gather max_k ε_k now, so that reading it is not collective
            self._example_epsilon = self._gather_example_epsilon()
        return RoundResult(self.round, tuple(int(i) for i in torch.nonzero(mask).flatten()), mean)

    def fit(self, rounds: int | None = None) -> list[RoundResult]:
        """Run the remaining planned rounds (or ``rounds`` more)."""
        n = self.config.rounds - self.round if rounds is None else rounds
        return [self.run_round() for _ in range(max(0, n))]

    def report(self) -> FederatedReport:
        """The run's budget; not a collective (one rank alone may call it, e.g. to print it on rank 0)."""
        cfg = self.config
        if cfg.dp == "client":
            sigma = self.server_mechanism.noise_multiplier if self.server_mechanism else 0.0
        else:  # example-level: max_k σ_k, gathered from every rank at construction / load_state_dict
            sigma = self._example_sigma
        note = weak_default_delta(self.delta, *self._units) if cfg.private else None
        return FederatedReport(cfg.dp, cfg.algorithm, self.epsilon_spent(), cfg.eps, self.delta, sigma,
                               self.round, cfg.rounds, self.num_clients, cfg.accountant,
                               () if note is None else (note,))

    def state_dict(self) -> dict[str, Any]:
        """Global model, round, participation RNG, server ledger / noise RNG, this rank's clients."""
        return {"model": self.model.state_dict(), "round": self.round,
                "participation": self._participation.get_state(),
                "server_ledger": self.server_ledger.state_dict(),
                "server_mechanism": None if self.server_mechanism is None else self.server_mechanism.state_dict(),
                "clients": {k: c.state_dict() for k, c in self.clients.items()}, "config": asdict(self.config)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a run: budgets already spent are restored, never reset.

        The checkpoint must come from a run with the same privacy settings (unit, clip norm, client rate,
        noise, target, δ, accountant, algorithm, local steps and batch); only the seed, the learning rates and
        the number of rounds may differ (every resumed round is checked against the restored ledgers).
        """
        mine, theirs = asdict(self.config), state.get("config", {})
        differ = sorted(k for k in mine if k not in ("seed", "rounds", "lr", "server_lr") and theirs.get(k) != mine[k])
        if differ:
            raise PrivacyConfigError(
                "load_state_dict: the checkpoint is of a run with other privacy settings: "
                + ", ".join(f"{k}={theirs.get(k)!r} (this run: {mine[k]!r})" for k in differ)
                + ". Resume with the same make_federated arguments (a changed unit or clip norm would restart or "
                "misstate the budget).")
        missing = set(self.clients) - set(state["clients"])
        if missing:
            raise PrivacyConfigError(f"load_state_dict: the checkpoint has no state for clients {sorted(missing)}")
        self.model.load_state_dict(state["model"])
        self._resumed = True  # σ and ledgers now come from the checkpoint: every round is checked against them
        self.round = int(state["round"])
        self._participation.set_state(state["participation"])
        self.server_ledger.load_state_dict(state["server_ledger"])
        if self.server_mechanism is not None and state["server_mechanism"] is not None:
            self.server_mechanism.load_state_dict(state["server_mechanism"])
        for k, c in self.clients.items():
            c.load_state_dict(state["clients"][k])
        self._example_sigma = self._largest_client_sigma()  # the clients' σ now come from the checkpoint
        if self.config.dp == "example":
            self._example_epsilon = self._gather_example_epsilon()


def make_federated(model: nn.Module, clients: Sequence[Dataset] | Mapping[int, Dataset], eps: float | None = 3.0,
                   algorithm: str = "fedavg", dp: str = "example", *, num_clients: int | None = None,
                   loss_fn: LossFn | None = None, comm: LocalComm | None = None, **options: Any
                   ) -> FederatedTraining:
    """Federated (ε, δ)-DP training of ``model`` over ``clients`` (one dataset per client).

    ``dp``: ``"example"`` (local DP-SGD, ε per example) or ``"client"`` (clipped updates, server
    noise, ε per client); ``algorithm``: ``"fedavg"``, ``"dp-lora"``, ``"ffa-lora"``, ``"fedsvd"``.
    ``options``: the other :class:`FederatedConfig` fields (rounds, local_steps, batch_size, lr,
    max_norm, client_rate, noise_multiplier, delta, server_lr, accountant, seed). On
    torch.distributed pass ``comm=DistributedComm()`` and either every client's dataset or a
    mapping holding this rank's clients (client k runs on rank k mod world size) with ``num_clients``.
    """
    config = FederatedConfig(algorithm=algorithm, dp=dp, eps=eps, **options)
    mapping = dict(clients) if isinstance(clients, Mapping) else dict(enumerate(clients))
    total = len(mapping) if num_clients is None else int(num_clients)
    bad = [k for k in mapping if not 0 <= k < total]
    if bad:
        raise PrivacyConfigError(f"make_federated: client indices {bad} are outside [0, num_clients={total})")
    return FederatedTraining(model, mapping, total, config, loss_fn, comm)
