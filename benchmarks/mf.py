"""Matrix-factorization mechanisms vs DP-SGD: prefix-sum RMSE at equal ε, and streaming cost.

Prints one JSON object.

1. ``rmse``: for n ∈ {128, 1024, 10000} steps with k epochs (n/k steps per epoch, expected
   batch N·k/n in every mechanism) and each target ε (δ = 1e-6), the per-step RMSE of the
   prefix sums Σ_{s≤t} (noisy gradient sum)_s at clip norm 1,
       RMSE = σ(ε) · sens(C) · ‖A C⁻¹‖_F / √n,
   where σ(ε) is calibrated (PRV accountant) under each mechanism's own accounting:
     dpsgd        C = I, Poisson rate q = k/n, n steps;
     banded-b     optimised banded Toeplitz C (b bands), cyclic Poisson over b partitions,
                  rate b·k/n, ⌈n/b⌉ DP-SGD-equivalent steps (arXiv:2306.08153 Sec. 5, Thms 4–5);
                  b = n/k means rate 1, i.e. no amplification;
     fft          Toeplitz square root, k participations n/k apart, one Gaussian;
     multi-epoch  dense optimum for fixed-epoch participation (n = 128 only: O(n³) per iteration).
   ``ratio`` = RMSE / RMSE(dpsgd) (below 1: better than DP-SGD).
2. ``streaming``: seconds and buffer bytes per step to generate the correlated noise of a
   1M-parameter model (float32, one 1000×1000 tensor) for banded C with b bands and for the
   full Toeplitz (FFT) C, each in a fresh single-threaded subprocess; memory is the ring
   buffer's size and the growth of the resident set over the run.

    python benchmarks/mf.py            # all (about 10 minutes on 2 CPU cores)
    python benchmarks/mf.py --quick    # n = 128 only, fewer ε, short streaming runs
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

import torch

import accountants
from accountants.mf_events import calibrate_mf_noise
from mechanisms.mf import (compute_sensitivity, fft_sqrt, identity, optimal_banded_toeplitz, optimal_dense,
                           rmse)
from mechanisms.mf.streaming import StreamingCorrelatedNoise
from mechanisms.mf.strategies import banded_sqrt

DELTA = 1e-6
CASES = [(128, 4), (1024, 8), (10000, 10)]  # (steps n, epochs k)
BANDS = (4, 16, 64)


def rmse_case(n: int, k: int, eps: float, strategies: dict) -> dict:
    spe = n // k
    q = 1.0 / spe
    out: dict = {}
    t = time.perf_counter()
    sigma_sgd = accountants.calibrate_noise(eps, DELTA, q, n)
    base = rmse(identity(n), 1.0, sigma_sgd)
    out["dpsgd"] = {"sigma": sigma_sgd, "rmse": base, "ratio": 1.0}
    sigma_one = calibrate_mf_noise(eps, DELTA, n)  # every non-amplified mechanism: one Gaussian(σ)
    for name, strat in strategies.items():
        if name.startswith("banded-"):
            b = strat.bands
            rate = b / spe
            sigma = calibrate_mf_noise(eps, DELTA, n, rate, b) if rate < 1 else sigma_one
            sens = strat.max_column_norm() if rate < 1 else compute_sensitivity(strat, k, spe).value
            entry = {"sigma": sigma, "sens": sens, "partition_rate": min(rate, 1.0),
                     "dpsgd_equivalent_steps": -(-n // b) if rate < 1 else None}
        else:
            schema = "fixed-epoch" if name == "multi-epoch" else "min-sep"
            s = compute_sensitivity(strat, k, spe, schema)
            sigma, sens = sigma_one, s.value
            entry = {"sigma": sigma, "sens": sens, "sens_exact": s.exact, "schema": schema}
        entry["rmse"] = rmse(strat, sens, sigma)
        entry["ratio"] = entry["rmse"] / base
        out[name] = entry
    out["seconds"] = round(time.perf_counter() - t, 2)
    return out


def build_strategies(n: int, k: int, bands: tuple[int, ...]) -> tuple[dict, dict]:
    spe = n // k
    strategies, seconds = {}, {}
    for b in sorted({b for b in bands if b <= spe} | {spe}):
        t = time.perf_counter()
        strategies[f"banded-{b}"] = optimal_banded_toeplitz(n, b)
        seconds[f"banded-{b}"] = round(time.perf_counter() - t, 3)
    strategies["fft"] = fft_sqrt(n)
    if n <= 256:
        t = time.perf_counter()
        strategies["multi-epoch"] = optimal_dense(n, k, spe)
        seconds["multi-epoch"] = round(time.perf_counter() - t, 2)
    return strategies, seconds


def current_rss() -> int:
    """Resident set size of this process in bytes (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0


def stream_one(kind: str, bands: int, steps: int, numel: int) -> dict:
    """Time ``steps`` noise rows for one 1M-parameter tensor; runs in its own process."""
    torch.set_num_threads(1)
    n = max(steps, bands)
    strategy = fft_sqrt(n) if kind == "fft" else (identity(n) if bands == 1 else banded_sqrt(n, bands))
    stream = StreamingCorrelatedNoise(strategy, seed=0)
    like = [torch.zeros(1000, numel // 1000)]
    rss0 = current_rss()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        stream.next(like)
        times.append(time.perf_counter() - t)
    rss1 = current_rss()
    tail = times[len(times) // 2:]  # ring full for banded; for fft the cost grows with t
    return {"kind": kind, "bands": strategy.bands, "steps": steps, "params": numel,
            "seconds_per_step_median_2nd_half": sorted(tail)[len(tail) // 2],
            "seconds_per_step_last": times[-1], "buffer_bytes": stream.buffer_bytes(),
            "rss_growth_bytes": rss1 - rss0}


def streaming(quick: bool) -> list[dict]:
    numel = 1_000_000
    configs = [("banded", 1, 20), ("banded", 4, 40), ("banded", 16, 60), ("banded", 64, 140),
               ("fft", 0, 64 if quick else 256)]
    if quick:
        configs = configs[:3] + configs[-1:]
    out = []
    for kind, bands, steps in configs:
        cmd = [sys.executable, __file__, "--stream-one", json.dumps([kind, bands, steps, numel])]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out.append(json.loads(res.stdout))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--stream-one", default=None)
    args = ap.parse_args()
    if args.stream_one:
        kind, bands, steps, numel = json.loads(args.stream_one)
        print(json.dumps(stream_one(kind, bands, steps, numel)))
        return
    started = time.perf_counter()
    cases = CASES[:1] if args.quick else CASES
    epsilons = (2.0, 8.0) if args.quick else (1.0, 4.0, 16.0)
    result: dict = {"delta": DELTA, "accountant": "prv", "machine": f"{platform.machine()}, "
                    f"{torch.get_num_threads()} torch threads, python {platform.python_version()}",
                    "rmse": [], "strategy_seconds": {}}
    for n, k in cases:
        strategies, seconds = build_strategies(n, k, BANDS)
        result["strategy_seconds"][str(n)] = seconds
        for eps in epsilons:
            row = {"n": n, "epochs": k, "steps_per_epoch": n // k, "eps": eps}
            row.update(rmse_case(n, k, eps, strategies))
            result["rmse"].append(row)
            print(json.dumps({"progress": [n, eps, round(time.perf_counter() - started, 1)]}), file=sys.stderr)
    result["streaming"] = streaming(args.quick)
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=1, default=lambda x: round(x, 6) if isinstance(x, float) else str(x)))


if __name__ == "__main__":
    main()
