"""Adaptive clipping against tuned fixed clipping, at equal ε.

Two tasks, each at ε ∈ {1, 3, 8} (δ = 1/N^1.1, PRV accountant, Poisson sampling):

- ``digits``: scikit-learn's digits (80/20 split), MLP 64-64-10, expected batch 128, 30 epochs
  (330 steps), SGD lr 0.25 momentum 0.9;
- ``transformer``: synthetic token sequences (length 12, vocabulary 12; label 1 iff token 1
  occurs more often than token 2), a one-layer nn.TransformerEncoder (d = 16, 2 heads, mean
  pooling), 2000 training / 1000 test sequences, expected batch 100, 15 epochs (300 steps), Adam lr 3e-3.

Methods: ``fixed`` clipping at each C in a grid (the best final accuracy is the tuned baseline),
``quantile`` (Andrew et al. 2021: median, η = 0.2, count noise n̄/20, initial C = 1),
``rldp`` (SAC controller, defaults of :class:`mechanisms.rldp.RLDPSettings`, initial √ΣC_g² = 1).
Test accuracy is evaluated every ``EVAL_EVERY`` steps; "steps to baseline" is the first
evaluation at which a method reaches the tuned fixed baseline's final accuracy (as a fraction of
the planned steps; null if never). Controller overhead: median wall time per step minus that of
fixed clipping in the same process (one thread). Prints one JSON object.

    python benchmarks/adaptive_clipping.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch
from torch import nn
from torch.utils.data import TensorDataset

import dptrain
from dptrain.demo import digits_split

EPSILONS = (1.0, 3.0, 8.0)
FIXED_CLIPS = (0.1, 0.3, 1.0)
EVAL_EVERY = 10


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 12, d: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=True), num_layers=1,
            enable_nested_tensor=False)
        self.head = nn.Linear(d, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(1))


def sequences(n: int, seed: int, length: int = 12, vocab: int = 12) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (n, length), generator=g)
    y = ((x == 1).sum(1) > (x == 2).sum(1)).long()
    return TensorDataset(x, y)


def task(name: str, seed: int):
    """(train set, test set, model factory, optimizer factory, batch size, epochs)."""
    if name == "digits":
        train, test = digits_split(0)
        return (train, test, lambda: nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)),
                lambda p: torch.optim.SGD(p, lr=0.25, momentum=0.9), 128, 30)
    return (sequences(2000, 1), sequences(1000, 2), TinyTransformer,
            lambda p: torch.optim.Adam(p, lr=3e-3), 100, 15)


def accuracy(model: nn.Module, data: TensorDataset) -> float:
    x, y = data.tensors
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def run(name: str, eps: float, clipping: str, clip: float, seed: int) -> dict:
    train, test, make_model, make_opt, batch, epochs = task(name, seed)
    torch.manual_seed(seed)
    model = make_model()
    priv = dptrain.make_private(model, eps=eps, max_grad_norm=clip, clipping=clipping, seed=seed)
    priv.attach(train, batch_size=batch, epochs=epochs, optimizer=make_opt(model.parameters()))
    curve, times = [], []
    for t in range(priv.plan.planned_steps):
        x, y = priv.loader.batch(priv.loader.sampler.sample())
        start = time.perf_counter()
        priv.step(x, y)
        times.append(time.perf_counter() - start)
        if (t + 1) % EVAL_EVERY == 0 or t + 1 == priv.plan.planned_steps:
            curve.append((t + 1, accuracy(model, test)))
    out = {"final_accuracy": curve[-1][1], "curve": curve, "epsilon_spent": priv.epsilon_spent(),
           "median_step_ms": 1e3 * statistics.median(times), "steps": priv.steps,
           "planned_noise_multiplier": priv.plan.noise_multiplier}
    if priv.adaptive is not None:
        sig = [r["noise_multiplier"] for r in priv.adaptive.history]
        sens = [r["sensitivity"] for r in priv.adaptive.history]
        out.update(noise_multiplier_range=[min(sig), max(sig)], clip_first_last=[sens[0], sens[-1]])
        if priv.adaptive.guard is not None:
            out["guard_refreshes"] = priv.adaptive.guard.refreshes
    return out


def steps_to_reach(curve: list, target: float) -> int | None:
    return next((t for t, acc in curve if acc >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="one task, ε = 3, two fixed clips")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="There is a performance drop")  # functorch SDPA fallback
    tasks = ("digits",) if args.quick else ("digits", "transformer")
    epsilons = (3.0,) if args.quick else EPSILONS
    clips = (0.3, 1.0) if args.quick else FIXED_CLIPS
    t0 = time.time()
    results: dict = {}
    for name in tasks:
        for eps in epsilons:
            row: dict = {"fixed": {c: run(name, eps, "flat", c, args.seed) for c in clips}}
            best_c = max(clips, key=lambda c: row["fixed"][c]["final_accuracy"])
            base = row["fixed"][best_c]
            row["quantile"] = run(name, eps, "quantile", 1.0, args.seed)
            row["rldp"] = run(name, eps, "rldp", 1.0, args.seed)
            planned = base["steps"]
            summary = {"tuned_fixed_clip": best_c, "baseline_final_accuracy": base["final_accuracy"]}
            for m in ("fixed", "quantile", "rldp"):
                r = base if m == "fixed" else row[m]
                reach = steps_to_reach(r["curve"], base["final_accuracy"])
                summary[m] = {"final_accuracy": r["final_accuracy"], "steps_to_baseline": reach,
                              "fraction_of_steps": None if reach is None else reach / planned,
                              "epsilon_spent": r["epsilon_spent"]}
            fixed_ms = row["fixed"][1.0]["median_step_ms"]
            for m in ("quantile", "rldp"):
                summary[m]["overhead_ms_per_step"] = row[m]["median_step_ms"] - fixed_ms
                summary[m]["overhead_relative"] = row[m]["median_step_ms"] / fixed_ms - 1
            summary["fixed_ms_per_step"] = fixed_ms
            results.setdefault(name, {})[str(eps)] = {"summary": summary, "runs": {
                "fixed": {str(c): {k: v for k, v in r.items() if k != "curve"} for c, r in row["fixed"].items()},
                "quantile": row["quantile"], "rldp": row["rldp"]}}
    print(json.dumps({"benchmark": "adaptive_clipping", "seed": args.seed, "eval_every": EVAL_EVERY,
                      "seconds": time.time() - t0, "torch_threads": 1, "results": results}))


if __name__ == "__main__":
    main()
