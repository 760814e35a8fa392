"""LazyDP benchmark: step time and peak memory of private training with a large embedding table.

Model: one nn.Embedding table (rows × 64) read twice per example (Zipf(1.05) ids), the two rows
concatenated into an MLP 128-64-2; cross-entropy. Modes, each (rows, batch, mode) in its own
subprocess so that peak RSS (ru_maxrss) is that mode's alone:

* ``nonprivate``: sparse=True table, plain SGD (the baseline the issue names);
* ``eager``: dptrain's eager DP-SGD — book-keeping clipping, then N(0, σ²C²) on every coordinate of
  every parameter (the dense [rows, 64] table gradient and noise), SGD;
* ``opacus-ghost``: Opacus 1.6 ``grad_sample_mode="ghost"``;
* ``eager-noise-floor``: only drawing N(0, σ²C²) for every table coordinate and adding it in place —
  a lower bound on any eager dense-noise step, measurable where the full eager step does not fit;
* ``lazy``: ``make_private(mechanism="lazy")`` — noise of untouched rows deferred; the flush at the
  end of an epoch of N examples is timed alone and amortised over the N / batch steps of that epoch
  (the median of ``FLUSHES`` flushes, each after one more step, so that every row owes noise; the
  first one is reported too, as ``first_flush_s``).

A config whose estimated memory passes ``--max-gb`` is skipped (reported, not run). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings

import numpy as np
import torch
from torch import nn

DIM = 64
MODES = ("nonprivate", "eager", "eager-noise-floor", "opacus-ghost", "lazy")
#: lazy flushes timed per configuration (their median is amortised)
FLUSHES = 3
#: estimated peak memory per mode, in table sizes (rows × 64 × 4 bytes), from the 1M-row runs + 0.6 GB
TABLE_COPIES = {"nonprivate": 1.3, "lazy": 1.5, "eager": 5.4, "opacus-ghost": 5.4, "eager-noise-floor": 2.2}


class TableMLP(nn.Module):
    def __init__(self, rows: int, sparse: bool) -> None:
        super().__init__()
        self.table = nn.Embedding(rows, DIM, sparse=sparse)
        self.mlp = nn.Sequential(nn.Linear(2 * DIM, 64), nn.ReLU(), nn.Linear(64, 2))

    def forward(self, x):
        return self.mlp(self.table(x).flatten(1))


@functools.lru_cache(maxsize=2)
def _zipf_cdf(rows: int) -> np.ndarray:
    return np.cumsum(1.0 / np.arange(1, rows + 1, dtype=np.float64) ** 1.05)


def zipf_ids(shape: tuple[int, ...], rows: int, rng: np.random.Generator) -> torch.Tensor:
    cdf = _zipf_cdf(rows)
    return torch.from_numpy(np.searchsorted(cdf, rng.random(shape) * cdf[-1]).astype(np.int64))


def make_batches(rows: int, batch: int, n: int, rng: np.random.Generator, device: str
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` batches of Zipf ids [batch, 2] and random 0/1 labels."""
    return [(zipf_ids((batch, 2), rows, rng).to(device), torch.from_numpy(rng.integers(0, 2, batch)).to(device))
            for _ in range(n)]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _no_extra(*_: object) -> dict:
    return {}


def make_step(mode: str, rows: int, batch: int, examples: int, device: str = "cpu"):
    """(step(x, y), after()) for one mode; ``after`` returns extra figures (the lazy flush)."""
    torch.manual_seed(0)
    model = TableMLP(rows, sparse=mode == "nonprivate").to(device)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    if mode == "nonprivate":
        def step(x, y):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        return step, _no_extra
    if mode == "eager-noise-floor":
        g = torch.Generator(device=device).manual_seed(0)
        w = model.table.weight

        @torch.no_grad()
        def step(x, y):
            w.add_(torch.randn(w.shape, generator=g, device=w.device), alpha=-0.05 / batch)
        return step, _no_extra
    if mode == "eager":
        from dptrain import ClippingConfig, DPOptimizer
        from dptrain.ghost import ghost_clip_and_sum
        from mechanisms import GaussianMechanism

        params = dict(model.named_parameters())
        dp = DPOptimizer(opt, list(params.values()), GaussianMechanism(1.0, 1.0, seed=0), float(batch))

        def step(x, y):
            dp.zero_grad()
            sums = ghost_clip_and_sum(model, loss_fn, x, y, ClippingConfig(1.0)).sums
            for k, p in params.items():
                p.grad = sums[k]
            dp.step()
        return step, _no_extra
    if mode == "lazy":
        import dptrain

        data = torch.utils.data.TensorDataset(torch.zeros(examples, 2, dtype=torch.long),
                                              torch.zeros(examples, dtype=torch.long))
        priv = dptrain.make_private(model, eps=None, noise_multiplier=1.0, mechanism="lazy", seed=0,
                                     accountant="rdp")
        priv.attach(data, batch_size=batch, steps=10_000, optimizer=opt)

        def private_step(x, y):  # fixed timing batches, recorded as drawn (internal); their ε is not reported
            priv.loader._record_drawn(len(y))
            return priv.step(x, y)

        def after(x, y):
            flushes = []
            for i in range(FLUSHES):
                if i:
                    private_step(x, y)  # every row owes this step's noise again
                _sync(device)
                t = time.perf_counter()
                priv.flush()
                _sync(device)
                flushes.append(time.perf_counter() - t)
            flush = statistics.median(flushes)
            return {"flush_s": flush, "first_flush_s": flushes[0], "flushes_s": flushes,
                    "steps_per_epoch": examples / batch, "flush_per_step_s": flush / (examples / batch)}
        return private_step, after
    from opacus import PrivacyEngine

    data = torch.utils.data.TensorDataset(torch.zeros(batch, 2, dtype=torch.long), torch.zeros(batch, dtype=torch.long))
    loader = torch.utils.data.DataLoader(data, batch_size=batch)
    out = PrivacyEngine().make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0,
                                       max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode="ghost",
                                       criterion=loss_fn)
    pmodel, popt, crit = out[0], out[1], out[2]

    def step(x, y):
        popt.zero_grad()
        crit(pmodel(x), y).backward()
        popt.step()
    return step, _no_extra


def run_one(mode: str, rows: int, batch: int, repeats: int, examples: int, device: str = "cpu") -> dict:
    warnings.filterwarnings("ignore")
    rng = np.random.default_rng(1)
    batches = make_batches(rows, batch, repeats + 2, rng, device)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    try:
        step, after = make_step(mode, rows, batch, examples, device)
        for x, y in batches[:2]:  # warm-up
            step(x, y)
        _sync(device)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        times = []
        for x, y in batches[2:]:
            t = time.perf_counter()
            step(x, y)
            _sync(device)
            times.append(time.perf_counter() - t)
        extra = after(*batches[-1])
        if device.startswith("cuda"):
            extra["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    except Exception as exc:  # noqa: BLE001 - reported
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    return {"median_s": statistics.median(times), "times_s": times, **extra,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_before_mb": rss0}


def run_pair(rows: int, batch: int, steps: int, device: str = "cpu") -> dict:
    """Non-private and lazy steps interleaved in one process (one of each per round, same batch):
    their ratio is not at the mercy of how fast one subprocess happened to run against another."""
    warnings.filterwarnings("ignore")
    rng = np.random.default_rng(2)
    batches = make_batches(rows, batch, steps + 2, rng, device)
    try:
        runs = {m: make_step(m, rows, batch, 1_000_000, device)[0] for m in ("nonprivate", "lazy")}
        times: dict[str, list[float]] = {m: [] for m in runs}
        for i, (x, y) in enumerate(batches):
            for m, step in runs.items():
                t = time.perf_counter()
                step(x, y)
                _sync(device)
                if i >= 2:  # two warm-up rounds
                    times[m].append(time.perf_counter() - t)
    except Exception as exc:  # noqa: BLE001 - reported
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    med = {m: statistics.median(v) for m, v in times.items()}
    return {"steps": steps, "nonprivate_median_s": med["nonprivate"], "lazy_median_s": med["lazy"],
            "lazy_over_nonprivate": med["lazy"] / med["nonprivate"]}


def _run_json(cmd: list[str]) -> dict:
    """The JSON object a subprocess printed last, or its last error line."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}


def estimated_gb(mode: str, rows: int) -> float:
    return TABLE_COPIES[mode] * rows * DIM * 4 / 1e9 + 0.6


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    p.add_argument("--batches", type=int, nargs="+", default=[256, 2048])
    p.add_argument("--modes", nargs="+", default=list(MODES))
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--examples", type=int, default=1_000_000, help="epoch size N for the amortised flush")
    p.add_argument("--max-gb", type=float, default=12.0, help="skip configs estimated above this")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu or cuda (the table, the batches and the noise on it)")
    p.add_argument("--pair-steps", type=int, default=60,
                   help="steps of each mode in the interleaved non-private / lazy run (0: none)")
    p.add_argument("--one", nargs=3, metavar=("MODE", "ROWS", "BATCH"), help=argparse.SUPPRESS)
    p.add_argument("--pair", nargs=2, metavar=("ROWS", "BATCH"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.one:
        print(json.dumps(run_one(a.one[0], int(a.one[1]), int(a.one[2]), a.repeats, a.examples, a.device)))
        return
    if a.pair:
        print(json.dumps(run_pair(int(a.pair[0]), int(a.pair[1]), a.pair_steps, a.device)))
        return
    result: dict = {"machine": {"threads": torch.get_num_threads(), "torch": torch.__version__,
                                "cpus": os.cpu_count(), "device": a.device,
                                "cuda": torch.cuda.get_device_name(0) if a.device.startswith("cuda") else None},
                    "dim": DIM, "repeats": a.repeats, "examples_per_epoch": a.examples, "max_gb": a.max_gb,
                    "configs": {}}
    for rows in a.rows:
        for batch in a.batches:
            entry: dict = {}
            for mode in a.modes:
                est = estimated_gb(mode, rows)
                if est > a.max_gb:
                    entry[mode] = {"skipped": f"estimated {est:.1f} GB > --max-gb {a.max_gb}"}
                    continue
                cmd = [sys.executable, __file__, "--one", mode, str(rows), str(batch), "--repeats", str(a.repeats),
                       "--examples", str(a.examples), "--device", a.device] + (["--threads", str(a.threads)] if a.threads else [])
                entry[mode] = _run_json(cmd)
            if a.pair_steps and {"nonprivate", "lazy"} <= set(a.modes) and "median_s" in entry.get("lazy", {}):
                cmd = [sys.executable, __file__, "--pair", str(rows), str(batch), "--pair-steps", str(a.pair_steps),
                       "--device", a.device] + (["--threads", str(a.threads)] if a.threads else [])
                pair = _run_json(cmd)
                if "lazy_median_s" in pair:
                    per_step = entry["lazy"]["flush_per_step_s"]
                    pair["amortised_over_nonprivate"] = (pair["lazy_median_s"] + per_step) / pair["nonprivate_median_s"]
                entry["interleaved"] = pair
            base = entry.get("nonprivate", {}).get("median_s")
            eager = entry.get("eager", {}).get("median_s")
            lazy = entry.get("lazy", {})
            if "median_s" in lazy:
                lazy["amortised_step_s"] = lazy["median_s"] + lazy["flush_per_step_s"]
                if base:
                    lazy["amortised_over_nonprivate"] = lazy["amortised_step_s"] / base
                if eager:
                    lazy["eager_over_amortised"] = eager / lazy["amortised_step_s"]
                floor = entry.get("eager-noise-floor", {}).get("median_s")
                if floor:
                    lazy["noise_floor_over_amortised"] = floor / lazy["amortised_step_s"]
            for r in entry.values():
                if base and isinstance(r, dict) and "median_s" in r:
                    r["ratio_to_nonprivate"] = r["median_s"] / base
            result["configs"][f"{rows}x{DIM}/batch{batch}"] = entry
            print(json.dumps({f"{rows}/{batch}": {m: r.get("median_s", r.get("skipped", r.get("error")))
                                                   for m, r in entry.items()}}), file=sys.stderr)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
