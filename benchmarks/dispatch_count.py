"""Host-side cost of one fast-path clipping pass: the aten operators it dispatches (each is a kernel launch
on a GPU, where the host can be what a step waits for) and its median CPU time.

Model: benchmarks/engine.py's Transformer shaped like GPT-2 (causal, 12 layers) but small (d 64, 4 heads,
vocabulary 1000, sequence 32, batch 8), so that the count, not the arithmetic, dominates.
    python benchmarks/dispatch_count.py [--repeats 5]   → JSON
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from engine import Transformer

from dptrain import ClippingConfig, clip_and_sum


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    torch.manual_seed(0)
    model = Transformer(vocab=1000, d=64, heads=4, layers=12, seq=32, gpt=True)
    x, y = torch.randint(0, 1000, (8, 32)), torch.randint(0, 2, (8,))
    loss, config = nn.CrossEntropyLoss(), ClippingConfig(1.0)

    def run() -> None:
        clip_and_sum(model, loss, x, y, config, method="fast")

    for _ in range(3):
        run()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    aten = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in aten if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    times = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"top_level_aten_ops": len(top), "all_aten_ops": len(aten),
                      "median_ms": round(statistics.median(times) * 1e3, 2), "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
