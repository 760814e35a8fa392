"""CPU Gaussian noise: one torch generator vs dptrain's two CPU sources, by thread count.

Fills (a) DP-SGD's noise for the 784-512-512-10 MLP (669,706 coordinates, one tensor per
parameter) and (b) one flush block of a lazy table (2^18 rows × 64) with N(0, 1), as
``torch.Tensor.normal_`` on one generator, as torch's parallel streams (``NormalStreams``,
mechanisms/normal_streams.py) and as the compiled Philox sampler (``PhiloxNormals``,
mechanisms/philox_normals.py, the CPU default where it is built), with 1, 2, 4, … torch threads.
Prints one JSON object: median milliseconds per fill.

Usage: python benchmarks/noise_streams.py [--repeats 15] [--threads 1 2 4 8]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from mechanisms import philox_normals
from mechanisms.rng import cpu_torch_streams

MLP_SHAPES = [(512, 784), (512,), (512, 512), (512,), (10, 512), (10,)]
FLUSH_SHAPES = [(1 << 18, 64)]


def _median_ms(fill, repeats: int) -> float:
    fill()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fill()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=15)
    cpus = os.cpu_count() or 1
    p.add_argument("--threads", type=int, nargs="+",
                   default=sorted({t for t in (1, 2, 4, 8, 16) if t <= cpus} | {cpus}))
    a = p.parse_args()
    out = {"machine": {"cpus": cpus, "torch": torch.__version__, "loadavg": os.getloadavg()}, "results": {}}
    for name, shapes in (("mlp_noise", MLP_SHAPES), ("flush_block", FLUSH_SHAPES)):
        bufs = [torch.empty(s) for s in shapes]
        g = torch.Generator().manual_seed(0)
        row = {"coordinates": sum(b.numel() for b in bufs)}
        torch.set_num_threads(1)
        row["one_generator_ms"] = _median_ms(lambda: [b.normal_(generator=g) for b in bufs], a.repeats)
        sources = {"streams": cpu_torch_streams(0)}
        if philox_normals.available():
            sources["philox"] = philox_normals.PhiloxNormals.from_seed(0)
        for label, source in sources.items():
            for t in a.threads:
                torch.set_num_threads(t)
                row[f"{label}_{t}_threads_ms"] = _median_ms(lambda: source.normal_(bufs), a.repeats)
        out["results"][name] = row
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
