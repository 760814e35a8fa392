"""One client: its data, its local training, and (example-level DP) its own noise and ledger.

Local training starts from the global model and returns the update Δ_k = θ_k − θ_global of the
trainable parameters (the model is restored to the global state afterwards, so one model object
serves every client of a process).

- example-level DP: ``local_steps`` DP-SGD steps (Abadi et al. 2016): Poisson batch at rate
  q_k = min(1, b / n_k), per-example clipping at C, sum + N(0, σ_k² C²), divided by q_k n_k,
  SGD step. Each step records PoissonSampled(q_k, Gaussian(σ_k)) in the client's ledger.
- client-level DP / non-private: ``local_steps`` plain SGD steps on Poisson batches of the same
  rate (the privacy comes from clipping Δ_k and the server's noise).
"""
from __future__ import annotations

import secrets
from typing import Any, Mapping

import torch
from torch import nn
from torch.utils.data import Dataset

import accountants
from mechanisms import GaussianMechanism
from mechanisms.rng import derived_seed

from ..clipping import ClippingConfig, clip_and_sum
from ..engine import LossFn
from ..optimizer import DPOptimizer
from ..sampling import PoissonLoader, PoissonSampler, to_device
from .config import FederatedConfig


#: derived_seed label of a federated run's family of seeds (kept apart from other uses of the same seed)
_FEDERATED = int.from_bytes(b"fed", "little")


def client_seed(seed: int | None, client: int, stream: int) -> int:
    """Seed of a client's random stream (0: batches, 1: local noise; client -1: the server's), the same on
    every rank: :func:`~mechanisms.rng.derived_seed` of the run's seed for label 2·(client + 1) + stream.

    Not affine in (seed, client): neighbouring seeds, placed on devices whose generators are seeded by
    offsets, would give two clients one noise stream.
    """
    if seed is None:
        return secrets.randbits(62)
    if not (client >= -1 and stream in (0, 1)):
        raise ValueError(f"client_seed: client must be >= -1 (-1: the server) and stream 0 or 1, got "
                         f"client={client}, stream={stream}")
    return derived_seed(derived_seed(seed, _FEDERATED), 2 * (int(client) + 1) + int(stream))


class Client:
    """A client's dataset, batch sampler and (example-level DP) noise mechanism and ledger."""

    def __init__(self, index: int, dataset: Dataset, config: FederatedConfig,
                 noise_multiplier: float | None = None) -> None:
        n = len(dataset)  # type: ignore[arg-type]
        if n == 0:
            raise ValueError(f"client {index}: the dataset is empty; every client needs at least one example")
        self.index, self.dataset, self.config, self.n = int(index), dataset, config, n
        self.sample_rate = min(1.0, config.batch_size / n)
        self.sampler = PoissonSampler(n, self.sample_rate, config.rounds * config.local_steps,
                                      client_seed(config.seed, index, 0))
        self.loader = PoissonLoader(dataset, self.sampler, max(1, round(1 / self.sample_rate)))
        self.ledger = accountants.PrivacyLedger()
        self.mechanism: GaussianMechanism | None = None
        if config.dp == "example":
            if noise_multiplier is None:
                raise ValueError(f"client {index}: example-level DP needs a noise multiplier")
            self.mechanism = GaussianMechanism(noise_multiplier, config.max_norm, client_seed(config.seed, index, 1))

    def step_event(self) -> accountants.DpEvent:
        """Privacy event of one local DP-SGD step (example-level DP)."""
        assert self.mechanism is not None
        return self.mechanism.step_event(self.sample_rate)

    def train(self, model: nn.Module, params: Mapping[str, nn.Parameter], loss_fn: LossFn
              ) -> dict[str, torch.Tensor]:
        """Run the local steps from the current (global) parameters; return Δ_k and restore them."""
        start = {k: p.detach().clone() for k, p in params.items()}
        try:
            if self.config.dp == "example":
                self._dp_sgd(model, params, loss_fn)
            else:
                self._sgd(model, params, loss_fn)
            return {k: p.detach() - start[k] for k, p in params.items()}
        finally:
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(start[k])

    def _batch(self, device: torch.device) -> tuple[Any, torch.Tensor]:
        """The next Poisson batch, on the model's device (client data may live on the CPU)."""
        x, y = self.loader.batch(self.sampler.sample())
        return to_device(x, device), to_device(y, device)

    def _dp_sgd(self, model: nn.Module, params: Mapping[str, nn.Parameter], loss_fn: LossFn) -> None:
        assert self.mechanism is not None
        plist = list(params.values())
        opt = DPOptimizer(torch.optim.SGD(plist, lr=self.config.lr), plist, self.mechanism,
                          self.sample_rate * self.n)
        clipping = ClippingConfig(self.config.max_norm)
        device = plist[0].device
        for _ in range(self.config.local_steps):
            x, y = self._batch(device)
            opt.zero_grad()
            sums = clip_and_sum(model, loss_fn, x, y, clipping).sums
            for k, p in params.items():
                p.grad = sums[k]
            opt.step()
            if self.mechanism.noise_multiplier > 0:
                self.ledger.record(self.step_event())

    def _sgd(self, model: nn.Module, params: Mapping[str, nn.Parameter], loss_fn: LossFn) -> None:
        plist = list(params.values())
        for _ in range(self.config.local_steps):
            x, y = self._batch(plist[0].device)
            if y.shape[0] == 0:
                continue
            grads = torch.autograd.grad(loss_fn(model(x), y), plist)
            with torch.no_grad():
                for p, g in zip(plist, grads):
                    p.add_(g, alpha=-self.config.lr)

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict(), "ledger": self.ledger.state_dict(),
                "mechanism": None if self.mechanism is None else self.mechanism.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.ledger.load_state_dict(state["ledger"])
        if self.mechanism is not None and state["mechanism"] is not None:
            self.mechanism.load_state_dict(state["mechanism"])
