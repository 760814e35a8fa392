"""Where a step's time goes: torch.profiler over a few steps of one engine.py model and mode.

    python benchmarks/profile_step.py --model gpt2small --mode dptrain --device cuda [--rows 25]

Prints the profiler's table of operators sorted by self device time (CUDA) or self CPU time.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import build, make_step  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="mlp")
    p.add_argument("--mode", default="dptrain")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=None, help="default: 32 for gpt2small, else 256")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rows", type=int, default=25)
    a = p.parse_args()
    batch = a.batch or (32 if a.model == "gpt2small" else 256)
    model, x, y = build(a.model, batch, a.device)
    step = make_step(a.mode, model, x, y, None)
    step()
    step()
    cuda = a.device.startswith("cuda")
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(a.steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(f"# {a.model} / {a.mode} / {a.device} / batch {batch} / {a.steps} steps")
    print(prof.key_averages().table(sort_by=key, row_limit=a.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
