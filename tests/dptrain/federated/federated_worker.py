"""One rank of the 2-process gloo run used by test_distributed.py (not a test module itself).

    python federated_worker.py RANK WORLD_SIZE PORT OUT_DIR

Writes OUT_DIR/rank{RANK}.pt with what test_distributed.py compares to a single process.
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import TensorDataset

from dptrain.federated import DistributedComm, LocalComm, make_federated
from dptrain.federated.server import server_noise
from dptrain.lora import add_lora
from mechanisms import GaussianMechanism

RUNS = {
    # example-level FedSVD: clients add their own noise, the server averages and re-factorises
    "fedsvd-example": dict(algorithm="fedsvd", dp="example", noise_multiplier=0.9, rounds=3, local_steps=2,
                           batch_size=8, lr=0.5, max_norm=0.5),
    # client-level DP-FedAvg: sampled clients, clipped updates, server noise once per round
    "fedavg-client": dict(algorithm="fedavg", dp="client", noise_multiplier=1.0, client_rate=0.5, rounds=3,
                          local_steps=2, batch_size=8, lr=0.5, max_norm=0.3),
}
CLIENTS = 5
#: each run's FederatedTraining, for the calls after the compared runs
LAST: dict = {}


def client_data(k: int) -> TensorDataset:
    g = torch.Generator().manual_seed(100 + k)
    x = torch.randn(24, 6, generator=g)
    return TensorDataset(x, (x[:, 0] + 0.4 * k > 0).long())


def model(name: str, init_seed: int) -> nn.Module:
    torch.manual_seed(init_seed)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
    if "fedsvd" in name:
        add_lora(net, rank=2, seed=init_seed)
    return net


def run(name: str, comm: LocalComm, init_seed: int) -> tuple[dict, float]:
    """The run compared across 1 and 2 processes: this rank's clients only."""
    net = model(name, init_seed)
    mine = {k: client_data(k) for k in range(CLIENTS) if comm.owns(k)}
    fed = make_federated(net, mine, eps=None, num_clients=CLIENTS, comm=comm, seed=11, accountant="rdp",
                         **RUNS[name])
    fed.fit()
    LAST[name] = fed
    return {k: v.detach().clone() for k, v in net.state_dict().items()}, fed.epsilon_spent()


def main() -> None:
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    comm = DistributedComm()
    result: dict = {}
    for name in RUNS:  # every rank starts from its own init: rank 0's must be broadcast
        result[name] = run(name, comm, init_seed=rank)
    # server noise on zero sums, each rank's generator seeded differently: noise drawn on every
    # rank would differ between ranks and show a larger variance
    mech = GaussianMechanism(1.3, 0.7, seed=100 + rank)
    result["noise"] = server_noise([torch.zeros(50_000)], mech, comm, 0)[0]
    if rank == 0:  # report() on one rank only, as examples print it; the other rank leaves at once
        result["report"] = LAST["fedsvd-example"].report().to_dict()
    torch.save(result, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
