"""Data-parallel DP-SGD: 1 process vs W gloo processes on the digits task. Prints one JSON object.

    python benchmarks/distributed.py [--world 2] [--steps 60] [--hidden 256]

Each configuration trains the same private MLP (same seeds) for ``--steps`` steps of
Poisson-sampled DP-SGD (q = 256/N); the W-process run is launched here as W local processes
(gloo, 1 torch thread each). Reported: median milliseconds per step (after 5 warm-up steps),
the ε each run reports, and the largest parameter difference between the runs' final models
(same global batches and the same noise, so it should be float rounding only).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

import dptrain
from dptrain.demo import digits_split

WARMUP = 5


def train(steps: int, hidden: int) -> dict:
    train_set, _ = digits_split(seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))
    priv = dptrain.make_private(model, eps=3.0, max_grad_norm=1.0, seed=5)
    priv.attach(train_set, batch_size=256, steps=steps,
                optimizer=torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        priv.step(priv.loader.batch(priv.loader.sampler.sample()))
        times.append(time.perf_counter() - t0)
    return {"ms_per_step": 1000 * statistics.median(times[WARMUP:]), "epsilon": priv.epsilon_spent(),
            "params": {k: v.clone() for k, v in model.state_dict().items()}}


def worker(rank: int, world: int, port: int, out: str, steps: int, hidden: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    result = train(steps, hidden)
    if rank == 0:
        torch.save(result, out)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--worker", type=int, nargs=3, metavar=("RANK", "PORT", "WORLD"), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a.worker[0], a.worker[2], a.worker[1], a.out, a.steps, a.hidden)
        return
    torch.set_num_threads(1)
    single = train(a.steps, a.hidden)
    with tempfile.TemporaryDirectory() as tmp:
        out, port = os.path.join(tmp, "rank0.pt"), free_port()
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(r), str(port), str(a.world),
                                   "--out", out, "--steps", str(a.steps), "--hidden", str(a.hidden)])
                 for r in range(a.world)]
        if any(proc.wait() != 0 for proc in procs):
            raise SystemExit("a rank failed")
        multi = torch.load(out, weights_only=False)
    diff = max(float((multi["params"][k] - v).abs().max()) for k, v in single["params"].items())
    print(json.dumps({"task": f"digits, 64-{a.hidden}-10 MLP, q = 256/N, eps = 3", "steps": a.steps,
                      "ms_per_step_1_process": round(single["ms_per_step"], 2),
                      f"ms_per_step_{a.world}_processes": round(multi["ms_per_step"], 2),
                      "speedup": round(single["ms_per_step"] / multi["ms_per_step"], 3),
                      "epsilon_1_process": single["epsilon"], f"epsilon_{a.world}_processes": multi["epsilon"],
                      "max_abs_param_diff": diff, "torch_threads_per_process": 1}))


if __name__ == "__main__":
    main()
