"""One NCCL rank on one GPU, used by test_distributed.py's CUDA test (not a test module itself).

    python nccl_worker.py RANK WORLD_SIZE PORT OUT_DIR

First runs the private training of distributed_worker.py on the GPU without a process group,
then the same run with ``distributed=True`` under NCCL; writes both to OUT_DIR/rank{RANK}.pt.
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist

import dptrain
from dptrain import distributed as ddp
from mechanisms import GaussianMechanism

import distributed_worker as worker


def run(distributed: bool) -> dict:
    net = worker.model(0).cuda()
    priv = dptrain.make_private(net, eps=None, noise_multiplier=worker.SIGMA, max_grad_norm=worker.CLIP,
                                seed=worker.SEED, accountant="rdp", distributed=distributed)
    priv.attach(worker.data(), batch_size=worker.BATCH, steps=worker.STEPS,
                optimizer=torch.optim.SGD(net.parameters(), lr=0.5))
    priv.fit()
    return {"params": {k: v.detach().cpu() for k, v in net.state_dict().items()},
            "epsilon": priv.epsilon_spent(), "device": str(next(net.parameters()).device)}


def main() -> None:
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.cuda.set_device(rank)
    result = {"single": run(distributed=False)}
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    result["nccl"] = run(distributed=True)
    mech = ddp.DistributedNoise(GaussianMechanism(1.0, 1.0, seed=100 + rank))
    noise = mech.privatize([torch.zeros(20_000, device="cuda")], 0)[0]
    result["noise"], result["noise_device"] = noise.cpu(), str(noise.device)
    torch.save(result, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
