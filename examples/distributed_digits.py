"""Data-parallel private digits classifier on torch.distributed.

    torchrun --nproc_per_node=2 examples/distributed_digits.py --eps 3

Each rank passes the *whole* training set to ``attach``; dptrain draws one global Poisson
batch per step and gives each rank its share, clips per example on every rank, adds the
noise once (rank 0) and all-reduces the noised sum, so the run spends the ε of the
single-process run. gloo on CPU, NCCL when every rank has a GPU. Rank 0 prints the report
and writes the checkpoint.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

import dptrain
from dptrain import distributed as ddp
from dptrain.demo import accuracy, digits_split


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--eps", type=float, default=3.0)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--checkpoint", default=None, help="write the run's state here (rank 0)")
    a = p.parse_args()

    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ.get("WORLD_SIZE", 1))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    train, test = digits_split(seed=0)
    torch.manual_seed(0)
    model = nn.Linear(64, 10).to(device)
    priv = dptrain.make_private(model, eps=a.eps, max_grad_norm=1.0)  # distributed: detected
    priv.attach(train, batch_size=128, epochs=a.epochs,
                optimizer=torch.optim.SGD(model.parameters(), lr=0.25, momentum=0.9))
    priv.fit()
    if ddp.is_main_process():
        print(f"ranks {ddp.world_size()} ({dist.get_backend()})  test acc {accuracy(model.cpu(), test):.4f}")
        print(priv.report().to_text())
    if a.checkpoint:
        ddp.save_checkpoint(priv, a.checkpoint)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
