"""Where the clients run: one process (simulation) or one process per rank (torch.distributed).

Clients are assigned to ranks round-robin (client k on rank k mod world_size); a rank may hold
several clients. The only collective operations a round needs are a sum of the clients'
contributions (all-reduce), a broadcast of the server's state from rank 0, and the maximum of
the clients' ε (all-reduce max). Server noise is added on rank 0 only, after the sum, so it is
added exactly once whatever the number of ranks.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist


class LocalComm:
    """Every client in this process; collectives are identities."""

    rank, world_size = 0, 1

    def owns(self, client: int) -> bool:
        return True

    def all_reduce_sum(self, tensors: Sequence[torch.Tensor]) -> None:
        """In place: each tensor becomes the sum over ranks."""

    def all_reduce_max(self, value: float) -> float:
        return value

    def broadcast(self, tensors: Sequence[torch.Tensor]) -> None:
        """In place: each tensor becomes rank 0's."""


class DistributedComm(LocalComm):
    """torch.distributed process group (gloo on CPU, NCCL on GPU); must be initialised."""

    def __init__(self, group: "dist.ProcessGroup | None" = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("DistributedComm: torch.distributed is not initialised; call "
                               "torch.distributed.init_process_group('gloo') first (or run under torchrun)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def owns(self, client: int) -> bool:
        return client % self.world_size == self.rank

    def all_reduce_sum(self, tensors: Sequence[torch.Tensor]) -> None:
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)

    def all_reduce_max(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return float(t.item())

    def broadcast(self, tensors: Sequence[torch.Tensor]) -> None:
        for t in tensors:
            dist.broadcast(t, src=0, group=self.group)
