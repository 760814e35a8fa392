"""One rank of the 2-process gloo run used by test_distributed.py (not a test module itself).

    python distributed_worker.py RANK WORLD_SIZE PORT OUT_DIR

Writes OUT_DIR/rank{RANK}.pt with what test_distributed.py compares to a single process.
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import TensorDataset

import dptrain
from dptrain import distributed as ddp
from dptrain.diff2 import make_diff2
from mechanisms import GaussianMechanism

SIGMA, CLIP, SEED, BATCH, STEPS = 0.8, 0.5, 7, 16, 6


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(96, 6, generator=g), torch.randint(0, 3, (96,), generator=g))


def model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def train(model_seed: int) -> tuple[dptrain.PrivateTraining, list[torch.Tensor]]:
    """The run compared across 1 and 2 processes; returns it and the index batches it drew."""
    net = model(model_seed)
    priv = dptrain.make_private(net, eps=None, noise_multiplier=SIGMA, max_grad_norm=CLIP, seed=SEED,
                                accountant="rdp")
    priv.attach(data(), batch_size=BATCH, steps=STEPS, optimizer=torch.optim.SGD(net.parameters(), lr=0.5))
    drawn = []
    for _ in range(STEPS):
        idx = priv.loader.sampler.sample()
        drawn.append(idx)
        priv.step(priv.loader.batch(idx))
    return priv, drawn


def diff2_clients() -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = data().tensors
    return [(x[i::5], y[i::5]) for i in range(5)]


def diff2_run(clients, model_seed: int) -> dptrain.diff2.Diff2Trainer:
    """A noised DIFF2 run (noise seeded) over ``clients``: all of them, or this rank's."""
    trainer = make_diff2(model(model_seed), clients, eps=4.0, delta=1e-3, rounds=4, refresh_every=2,
                         clip_grad=1.0, clip_diff=0.2, lr=0.5, accountant="gdp", seed=11)
    trainer.fit()
    return trainer


def mismatches_refused(rank: int, world: int) -> dict[str, bool]:
    """Per kind of run, whether a plan that differs between ranks raised PrivacyConfigError on this rank."""
    from dptrain.errors import PrivacyConfigError
    from dptrain.federated import make_federated
    from dptrain.federated.comm import DistributedComm

    x, y = data().tensors
    clients = [TensorDataset(x[i::6], y[i::6]) for i in range(6)]
    runs = {
        "federated clip norm": lambda: make_federated(
            model(0), {k: clients[k] for k in range(rank, 6, world)}, eps=None, comm=DistributedComm(), dp="client",
            num_clients=6, noise_multiplier=1.0, max_norm=1.0 if rank == 0 else 100.0, client_rate=0.5, rounds=2,
            local_steps=1, batch_size=5, lr=0.1, seed=1),
        "diff2 level": lambda: make_diff2(model(0), diff2_clients()[rank::world], eps=2.0, rounds=4, refresh_every=2,
                                          level="example" if rank == 0 else "client", seed=3),
        "dpsgd target eps": lambda: dptrain.make_private(model(0), eps=3.0 if rank == 0 else 100.0, noise_multiplier=1.0,
                                                         delta=1e-3, seed=1).attach(data(), batch_size=BATCH, steps=STEPS),
    }
    out = {}
    for name, run in runs.items():
        try:
            run()
            out[name] = False
        except PrivacyConfigError:
            out[name] = True
    return out


def main() -> None:
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    result: dict = {}
    # 1. clipped sum of a fixed batch: each rank clips its share, one all-reduce
    x, y = data().tensors
    net = model(0)
    mine = torch.arange(20)[torch.arange(20) % world == rank]
    local = dptrain.clip_and_sum(net, nn.CrossEntropyLoss(), x[mine], y[mine], CLIP)
    names = list(local.sums)
    result["clipped_sum"] = dict(zip(names, ddp.all_reduce_sums([local.sums[k] for k in names])))
    # 2. noise on zero sums; every rank's own generator is seeded differently, so noise added on
    #    every rank would show as a larger variance
    mech = ddp.DistributedNoise(GaussianMechanism(1.0, 1.0, seed=100 + rank))
    result["noise"] = mech.privatize([torch.zeros(20_000)], 0)[0]
    # 3. a full private run; this rank's model starts from a different init (rank 0's is broadcast)
    priv, drawn = train(model_seed=rank)
    result["drawn"] = drawn
    result["params"] = {k: v.detach().clone() for k, v in priv.model.state_dict().items()}
    result["epsilon"] = priv.epsilon_spent()
    result["report"] = priv.report(history_points=2).to_dict()
    # 4. checkpoint written by rank 0 only
    saves = []
    real_save = torch.save
    torch.save = lambda obj, path, *a, **k: (saves.append(path), real_save(obj, path, *a, **k))
    ddp.save_checkpoint(priv, f"{out}/ckpt.pt")
    torch.save = real_save
    result["saves"] = len(saves)
    resumed, _ = train(model_seed=0)
    ddp.load_checkpoint(resumed, f"{out}/ckpt.pt")
    result["resumed_steps"] = resumed.steps
    # 5. DIFF2 with clients spread over ranks (client p on rank p mod W)
    trainer = diff2_run(diff2_clients()[rank::world], model_seed=rank)
    result["diff2_params"] = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    result["diff2_epsilon"] = trainer.epsilon_spent()
    # 6. ranks that disagree on the plan are refused before any round / step (each check is collective)
    result["refused"] = mismatches_refused(rank, world)
    torch.save(result, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
