"""Data-parallel DP-SGD on ``torch.distributed`` (gloo on CPU, NCCL on GPU).

One step on W ranks is the single-process step, split by examples:

1. *Global Poisson sampling.* Every rank draws the same global mask over the N examples
   (the sampler's seed is broadcast from rank 0), so example j is in the batch w.p. q,
   independently; rank r keeps the sampled j with j mod W = r. Each sampled example is
   therefore processed exactly once, on one rank, and the union of the ranks' batches is
   the single-process batch.
2. *Per-example clipping on each rank* (the usual engine): rank r holds S_r = Σ_{j∈B_r} clip(g_j).
3. *Noise once.* Rank 0 adds the mechanism's noise to S_0 (Z ~ N(0, σ²C²I) for DP-SGD);
   the other ranks add none.
4. *One all-reduce* (sum) of the flattened sums: every rank gets Σ_r S_r + Z — exactly the
   single-process release — and divides by the expected global batch q·N, then steps.

Privacy: the released Σ_j clip(g_j) + Z is the single-process Gaussian mechanism, so the
step is one ``PoissonSampled(q, Gaussian(σ))`` event, recorded once (identically on every
rank's ledger). The threat model is that of single-process DP-SGD with a trusted training
job: the ranks see each other's clipped sums (the all-reduce), only the model and what is
released from it are private. With rank 0's noise stream seeded like the single-process
run's, the W-rank run and the single-process run produce the same models (up to float
summation order).

Checkpoints: every rank holds the same state; :func:`save_checkpoint` writes it from rank 0
only, and all ranks resume from that file with :func:`load_checkpoint`.
"""
from __future__ import annotations

import math
import secrets
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from mechanisms.base import NoiseMechanism

from .errors import PrivacyConfigError
from .sampling import announce


def is_distributed() -> bool:
    """True when a ``torch.distributed`` process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Rank 0 (or the only process): the one that writes checkpoints and prints reports."""
    return rank() == 0


def _comm_device(reference: torch.Tensor | None = None) -> torch.device:
    """Tensors for collectives: CUDA under NCCL, else CPU (or the reference's device)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu") if reference is None else reference.device


def broadcast_seed(seed: int | None) -> int:
    """Rank 0's seed (its own, or 62 fresh random bits) on every rank."""
    value = int(seed) if seed is not None else secrets.randbits(62)
    t = torch.tensor([value], dtype=torch.int64, device=_comm_device())
    dist.broadcast(t, src=0)
    return int(t.item())


def check_same_on_all_ranks(what: str, values: Sequence[float], who: str = "distributed DP-SGD",
                            how: str = "call make_private and attach") -> None:
    """Raise if ``values`` (dataset size, q, steps, σ, …) differ between ranks."""
    local = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    for r, g in enumerate(gathered):
        if not torch.equal(g, gathered[0]):
            raise PrivacyConfigError(
                f"{who}: {what} differ between ranks (rank 0: {gathered[0].tolist()}, rank {r}: "
                f"{g.tolist()}). Every rank must {how} with the same arguments and the "
                "same (full, global) data; each rank takes its share.")


def broadcast_module(model: nn.Module) -> None:
    """Start every rank from rank 0's parameters and buffers (as DistributedDataParallel does)."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            buf = t.detach().to(_comm_device(t))
            dist.broadcast(buf, src=0)
            t.copy_(buf.to(t.device))


class ShardedSampler:
    """Rank ``rank``'s share of a global sampler's batches: sampled indices j with j mod W = rank.

    Every rank runs the same global sampler (same seed), so the shards of one step
    partition the global batch. State is the global sampler's (identical on all ranks).
    """

    def __init__(self, sampler: Any, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"ShardedSampler: rank {rank} is outside [0, {world_size})")
        self.sampler, self.rank, self.world_size = sampler, int(rank), int(world_size)
        self.on_draw: Callable[[int], None] | None = None  # set by the PoissonLoader: this rank's rows per draw

    @property
    def sample_rate(self) -> float:
        return self.sampler.sample_rate

    @property
    def steps(self) -> int:
        return self.sampler.steps

    def __len__(self) -> int:
        return len(self.sampler)

    def sample(self) -> torch.Tensor:
        """This rank's indices of the next global batch."""
        batch = self.sampler.sample()
        return announce(self, batch[batch % self.world_size == self.rank])

    def __iter__(self):
        for _ in range(self.steps):
            yield self.sample()

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


def all_reduce_sums(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Σ over ranks of each tensor, in one all-reduce of their concatenation."""
    if not tensors:
        return []
    flat = torch.cat([t.reshape(-1) for t in tensors])
    device = flat.device
    flat = flat.to(_comm_device(flat))
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat = flat.to(device)
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
    return out


class DistributedNoise(NoiseMechanism):
    """``mechanism``'s noise added on rank 0 only, then the clipped sums all-reduced.

    ``privatize`` returns, on every rank, Σ_ranks clipped sums + the noise of ``mechanism``
    drawn once (by rank 0). The privacy event is the wrapped mechanism's: one release.
    """

    def __init__(self, mechanism: NoiseMechanism) -> None:
        self.inner = mechanism
        self.name = mechanism.name

    def privatize(self, clipped_sums: Sequence[torch.Tensor], step: int) -> list[torch.Tensor]:
        local = self.inner.privatize(clipped_sums, step) if is_main_process() else list(clipped_sums)
        return all_reduce_sums(local)

    def step_event(self, sample_rate: float):
        return self.inner.step_event(sample_rate)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)

    def __getattr__(self, name: str) -> Any:  # noise_std, noise_multiplier, … of the wrapped mechanism
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def resolve(distributed: bool | None) -> bool:
    """``make_private(distributed=...)``: None → on when a multi-rank process group is initialised."""
    if distributed is None:
        return is_distributed()
    if distributed and not (dist.is_available() and dist.is_initialized()):
        raise PrivacyConfigError(
            "make_private(distributed=True): torch.distributed is not initialised. Call "
            "torch.distributed.init_process_group('gloo' or 'nccl') first (torchrun sets the environment), "
            "or pass distributed=False")
    return bool(distributed)


def check_model(model: nn.Module) -> None:
    """The bare module is required: DDP's own gradient all-reduce would bypass clipping and noise."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise PrivacyConfigError(
            "make_private: the model is wrapped in DistributedDataParallel, whose gradient all-reduce would "
            "average unclipped, un-noised gradients. Pass the bare module (model.module); dptrain all-reduces "
            "the clipped sums itself")


def expected_consistency(n: int, sample_rate: float, steps: int, sigma: float, clip: float,
                         target_eps: float | None = None, delta: float | None = None) -> None:
    """All ranks agree on the plan (N, q, T, σ, C, target ε, δ) before the first step."""
    check_same_on_all_ranks("the training plans (N, q, steps, σ, C, target ε, δ)",
                            [n, sample_rate, steps, sigma, clip, -1.0 if target_eps is None else target_eps,
                             -1.0 if delta is None else delta])  # -1: not given
    if not math.isfinite(sigma):
        raise PrivacyConfigError(f"distributed DP-SGD: noise multiplier {sigma} is not finite")


def save_checkpoint(priv: Any, path: str) -> None:
    """Write ``priv.state_dict()`` from rank 0 only; other ranks wait until it is written."""
    state = priv.state_dict()
    if is_main_process():
        torch.save(state, path)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def load_checkpoint(priv: Any, path: str) -> None:
    """Every rank resumes from rank 0's checkpoint (same model, sampler, ledger and noise stream)."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    priv.load_state_dict(state)
