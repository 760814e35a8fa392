"""Federated private digits classifier: 10 label-skewed clients, DP-FedAvg or FedSVD.

    python examples/federated_digits.py --eps 3                       # clients simulated in one process
    torchrun --nproc_per_node=2 examples/federated_digits.py --eps 3  # clients spread over 2 gloo ranks
    python examples/federated_digits.py --algorithm fedsvd            # LoRA adapters on a pre-trained base

Under torchrun every rank builds the same split and trains only its own clients (client k on rank
k mod world size); server noise (client-level DP) is drawn once on rank 0, and the run is seeded
(seed=0), so the run equals the simulated one. For ``fedsvd`` the base MLP is first trained non-privately on digits 0–4 (the
"public" part) and only rank-4 adapters are fine-tuned privately on all ten digits.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import TensorDataset

from dptrain.client_split import label_skew_split
from dptrain.demo import accuracy, digits_split
from dptrain.federated import DistributedComm, LocalComm, make_federated
from dptrain.lora import add_lora


def pretrained_base(train: TensorDataset) -> nn.Module:
    """An MLP trained without privacy on digits 0–4 only (stand-in for a public pre-trained model)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    x, y = train.tensors
    keep = y < 5
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[keep]), y[keep]).backward()
        opt.step()
    return model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--eps", type=float, default=3.0)
    p.add_argument("--algorithm", default="fedavg", choices=("fedavg", "dp-lora", "ffa-lora", "fedsvd"))
    p.add_argument("--dp", default="example", choices=("example", "client"))
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--delta", type=float, default=None,
                   help="δ (default: 1e-5 for --dp client, which has only 10 units; 1/N^1.1 over the N examples else)")
    a = p.parse_args()

    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    comm = DistributedComm() if distributed else LocalComm()
    train, test = digits_split(seed=0)
    x, y = train.tensors
    parts = label_skew_split(y.numpy(), 10, classes_per_client=2, seed=0)
    clients = {k: TensorDataset(x[torch.as_tensor(idx)], y[torch.as_tensor(idx)])
               for k, idx in enumerate(parts) if comm.owns(k)}
    if a.algorithm == "fedavg":
        torch.manual_seed(0)
        model: nn.Module = nn.Linear(64, 10)
    else:
        model = pretrained_base(train)
        print(f"base model (digits 0-4 only): test acc {accuracy(model, test):.4f}") if comm.rank == 0 else None
        add_lora(model, rank=4, seed=0)
    # with 10 clients the default δ = 1/10^1.1 = 0.079 would be a weak client-level guarantee: pass one
    delta = a.delta if a.delta is not None else (1e-5 if a.dp == "client" else None)
    fed = make_federated(model, clients, eps=a.eps, algorithm=a.algorithm, dp=a.dp, num_clients=10, comm=comm,
                         rounds=a.rounds, local_steps=3, batch_size=32, lr=0.5 if a.algorithm == "fedavg" else 2.0,
                         delta=delta, seed=0)
    fed.fit()
    report = fed.report()  # not a collective: printing it on rank 0 only is fine
    if comm.rank == 0:
        print(f"ranks {comm.world_size}  {a.algorithm} ({a.dp}-level DP)  test acc {accuracy(model, test):.4f}")
        print(report.to_dict())
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
