"""Step time and peak memory: non-private vs dptrain vs Opacus (hooks, ghost).

Prints one JSON object. Each (model, mode) runs in its own subprocess so that peak memory
(ru_maxrss on CPU, torch.cuda.max_memory_allocated on GPU) belongs to that mode alone.
Ratios are to the non-private step measured in the same invocation; times are medians.

    python benchmarks/engine.py [--models mlp cnn transformer] [--repeats 7] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings

import torch
from torch import nn

MODES = ("nonprivate", "dptrain", "opacus-hooks", "opacus-ghost")


class Transformer(nn.Module):
    """Token + learned position Embedding, TransformerEncoderLayer(s), mean pool, linear head.

    Positions are looked up with batched indices ([B, T], as GPT-2's position table) so that
    the table's per-example gradients are rows of a per-example lookup.
    """

    def __init__(self, vocab: int = 1000, d: int = 128, heads: int = 4, layers: int = 1, seq: int = 64) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq, d)
        self.enc = nn.ModuleList(nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True)
                                 for _ in range(layers))
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        positions = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        h = self.emb(x) + self.pos(positions)
        for layer in self.enc:
            h = layer(h)
        return self.head(h.mean(1))


def build(name: str, batch: int, device: str):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
        x, y = torch.randn(batch, 784, generator=g), torch.randint(0, 10, (batch,), generator=g)
    elif name == "cnn":
        model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                              nn.Linear(32 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, 10))
        x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
    elif name == "transformer":
        model = Transformer()
        x, y = torch.randint(0, 1000, (batch, 64), generator=g), torch.randint(0, 2, (batch,), generator=g)
    elif name == "gpt2small":  # GPT-2-small-sized: 12 layers, d=768, 12 heads, vocab 50257, seq 256
        model = Transformer(vocab=50257, d=768, heads=12, layers=12, seq=256)
        x, y = torch.randint(0, 50257, (batch, 256), generator=g), torch.randint(0, 2, (batch,), generator=g)
    else:
        raise SystemExit(f"unknown model {name}")
    return model.to(device), x.to(device), y.to(device)


def make_step(mode: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int | None):
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    if mode == "nonprivate":
        def step():
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        return step
    data = torch.utils.data.TensorDataset(x.cpu(), y.cpu())
    if mode == "dptrain":
        import dptrain

        priv = dptrain.make_private(model, eps=None, noise_multiplier=1.0, chunk_size=chunk, seed=0)
        priv.attach(data, batch_size=max(1, len(y) // 4), steps=1000, optimizer=opt, loss_fn=loss_fn)
        return lambda: priv.step(x, y)
    from opacus import PrivacyEngine

    loader = torch.utils.data.DataLoader(data, batch_size=len(y))
    engine = PrivacyEngine()
    gmode = mode.split("-")[1]
    out = engine.make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0,
                              max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode=gmode,
                              criterion=loss_fn)
    pmodel, popt = out[0], out[1]
    crit = out[2] if gmode == "ghost" else loss_fn

    def step():
        popt.zero_grad()
        crit(pmodel(x), y).backward()
        popt.step()
    return step


def run_one(name: str, mode: str, batch: int, repeats: int, device: str, chunk: int | None) -> dict:
    warnings.filterwarnings("ignore")
    model, x, y = build(name, batch, device)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    try:
        step = make_step(mode, model, x, y, chunk)
        step()  # warm-up (and compile caches)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            step()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    except Exception as exc:  # noqa: BLE001 - reported, e.g. Opacus refusing a layer
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    out = {"median_s": statistics.median(times), "times_s": times,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "rss_before_mb": rss0}
    if device == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["mlp", "cnn", "transformer"])
    p.add_argument("--modes", nargs="+", default=list(MODES))
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="cpu")
    p.add_argument("--chunk", type=int, default=None, help="dptrain chunk_size (virtual-step size)")
    p.add_argument("--one", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(run_one(a.one[0], a.one[1], a.batch, a.repeats, a.device, a.chunk)))
        return
    result = {"machine": {"device": a.device, "threads": torch.get_num_threads(), "torch": torch.__version__,
                          "cuda": torch.cuda.get_device_name(0) if a.device == "cuda" else None,
                          "cpus": os.cpu_count()},
              "batch": a.batch, "repeats": a.repeats, "models": {}}
    for name in a.models:
        entry = {}
        for mode in a.modes:
            cmd = [sys.executable, __file__, "--one", name, mode, "--batch", str(a.batch), "--repeats",
                   str(a.repeats), "--device", a.device] + (["--chunk", str(a.chunk)] if a.chunk else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            try:
                entry[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
            except (IndexError, json.JSONDecodeError):
                entry[mode] = {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}
        base = entry.get("nonprivate", {}).get("median_s")
        for mode, r in entry.items():
            if base and "median_s" in r:
                r["ratio_to_nonprivate"] = r["median_s"] / base
        result["models"][name] = entry
        print(json.dumps({name: {m: r.get("ratio_to_nonprivate", r.get("error")) for m, r in entry.items()}}),
              file=sys.stderr)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
