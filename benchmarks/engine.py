"""Step time and peak memory: non-private vs dptrain vs Opacus (hooks, ghost).

Prints one JSON object. Per model, all modes run in one subprocess with their steps
interleaved (round r times each mode once, after one untimed step), so that load from other
processes hits every mode alike; times are medians over ``--repeats`` rounds and ratios are to
the non-private step of the same run (``paired_*``: the median over rounds of each round's ratio). Wall-clock and process CPU time (all threads) are both
kept: on a machine shared with other jobs the CPU time is the steadier measure of work. Peak memory (ru_maxrss on CPU, max_memory_allocated on
CUDA) comes from a second, fresh subprocess per (model, mode); on Linux ``steps_peak_rss_mb`` is the peak
RSS of the timed steps alone (the window restarted after the warm-up step), without the imports and the
one-off setup (Opacus' and dptrain's imports, dptrain's accountant at attach) that ``peak_rss_mb`` includes. ``--amp`` runs every step
under bf16 autocast, ``--compile`` with the model torch.compile'd (not Opacus). On CUDA the default models add a GPT-2-small-sized transformer (12
layers, d 768, 12 heads, vocabulary 50257, random weights) at batch 32 × sequence 256.

    python benchmarks/engine.py [--models mlp cnn transformer] [--repeats 7] [--device cpu|cuda] [--amp]
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
MODELS = ("mlp", "cnn", "transformer", "gpt2small")


class Transformer(nn.Module):
    """Token + learned position Embedding, TransformerEncoderLayer(s), mean pool, linear head.

    Positions are looked up with batched indices ([B, T], as GPT-2's position table) so that
    the table's per-example gradients are rows of a per-example lookup. ``gpt=True``: pre-norm
    blocks with GELU and causal self-attention, as GPT-2.
    """

    def __init__(self, vocab: int = 1000, d: int = 128, heads: int = 4, layers: int = 1, seq: int = 64,
                 gpt: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq, d)
        self.enc = nn.ModuleList(nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True,
                                                            activation="gelu" if gpt else "relu", norm_first=gpt)
                                 for _ in range(layers))
        self.causal = gpt
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        t = x.shape[1]
        positions = torch.arange(t, device=x.device).expand(x.shape[0], -1)
        h = self.emb(x) + self.pos(positions)
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=x.device) if self.causal else None
        for layer in self.enc:
            h = layer(h, src_mask=mask, is_causal=self.causal)
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
        model = Transformer(vocab=50257, d=768, heads=12, layers=12, seq=256, gpt=True)
        x, y = torch.randint(0, 50257, (batch, 256), generator=g), torch.randint(0, 2, (batch,), generator=g)
    else:
        raise SystemExit(f"unknown model {name}")
    return model.to(device), x.to(device), y.to(device)


def make_step(mode: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int | None,
              compile_model: bool = False):
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    if compile_model and not mode.startswith("opacus"):
        model = torch.compile(model)
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

        def private_step():  # a fixed timing batch, recorded as drawn (internal); its ε is not reported
            priv.loader._record_drawn(len(y))
            priv.step(x, y)
        return private_step
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


def _amp(step, device: str, amp: bool):
    """The step under bf16 autocast (``--amp``); dptrain keeps its norm / sum algebra in float32."""
    if not amp:
        return step

    def wrapped():
        with torch.autocast(device, dtype=torch.bfloat16):
            step()
    return wrapped


def _reset_rss_peak() -> bool:
    """Start a new peak-RSS window (Linux: VmHWM restarts at the current RSS); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status in MB: VmHWM (the peak RSS since start or since
    :func:`_reset_rss_peak`), VmRSS (now)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise OSError(f"no {field} in /proc/self/status")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_one(name: str, mode: str, batch: int, repeats: int, device: str, chunk: int | None, amp: bool,
            compile_model: bool = False) -> dict:
    """Peak memory (and step times) of one mode alone in this process."""
    warnings.filterwarnings("ignore")
    model, x, y = build(name, batch, device)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    try:
        step = _amp(make_step(mode, model, x, y, chunk, compile_model), device, amp)
        step()  # warm-up
        _sync(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        windowed = _reset_rss_peak()  # the training steps' own peak, without imports and setup
        rss_steps0 = _status_mb("VmRSS") if windowed else None
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - t)
    except Exception as exc:  # noqa: BLE001 - reported, e.g. Opacus refusing a layer
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    out = {"alone_median_s": statistics.median(times),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_before_mb": rss0}
    if windowed:  # the peak while stepping, and how far it rose above the RSS the steps started from
        out["steps_peak_rss_mb"] = _status_mb("VmHWM")
        out["steps_rss_rise_mb"] = out["steps_peak_rss_mb"] - rss_steps0
    if device == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run_interleaved(name: str, modes: list[str], batch: int, repeats: int, device: str, chunk: int | None,
                    amp: bool, compile_model: bool = False) -> dict:
    """Step times of all modes in one process, interleaved: round r times mode 1, 2, … once each.

    Each mode has its own copy of the model (same seed); before each timed step one untimed
    step re-warms that mode's caches. Load from other processes then hits every mode alike.
    """
    warnings.filterwarnings("ignore")
    steps, out = {}, {}
    for mode in modes:
        model, x, y = build(name, batch, device)
        try:
            steps[mode] = _amp(make_step(mode, model, x, y, chunk, compile_model), device, amp)
            steps[mode]()
        except Exception as exc:  # noqa: BLE001 - reported, e.g. Opacus refusing a layer
            out[mode] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
            steps.pop(mode, None)
    times: dict[str, list[float]] = {m: [] for m in steps}
    cpu: dict[str, list[float]] = {m: [] for m in steps}
    for _ in range(repeats):
        for mode, step in steps.items():
            step()
            _sync(device)
            t, c = time.perf_counter(), time.process_time()
            step()
            _sync(device)
            times[mode].append(time.perf_counter() - t)
            cpu[mode].append(time.process_time() - c)
    for mode, ts in times.items():
        out[mode] = {"median_s": statistics.median(ts), "times_s": ts, "median_cpu_s": statistics.median(cpu[mode])}
    return out


def _paired(entry: dict) -> None:
    """Per round, the ratio of two modes' steps timed one right after the other; their median
    (``paired_ratio_to_nonprivate``, ``paired_speedup_vs_opacus_ghost``). A slow spell of the machine
    that lasts a few rounds moves the medians of the times, much less the median of the ratios."""
    def ratios(num: str, den: str) -> list[float]:
        a, b = entry.get(num, {}).get("times_s"), entry.get(den, {}).get("times_s")
        return [x / y for x, y in zip(a, b)] if a and b else []

    for mode in entry:
        if r := ratios(mode, "nonprivate"):
            entry[mode]["paired_ratio_to_nonprivate"] = statistics.median(r)
    if r := ratios("opacus-ghost", "dptrain"):
        entry["dptrain"]["paired_speedup_vs_opacus_ghost"] = statistics.median(r)


def _subprocess(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=None, choices=MODELS,
                   help="default: mlp cnn transformer, plus gpt2small (batch --gpt2-batch) on cuda")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--gpt2-batch", type=int, default=32, help="batch of the GPT-2-small-sized model (seq 256)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true", help="bf16 autocast around every mode's step")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (non-private and dptrain)")
    p.add_argument("--chunk", type=int, default=None, help="dptrain chunk_size (virtual-step size)")
    p.add_argument("--one", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    p.add_argument("--interleave", metavar="MODEL", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one or a.interleave:
        name = a.one[0] if a.one else a.interleave
        batch = a.gpt2_batch if name == "gpt2small" else a.batch
        if a.one:
            res = run_one(name, a.one[1], batch, a.repeats, a.device, a.chunk, a.amp, a.compile)
        else:
            res = run_interleaved(name, a.modes, batch, a.repeats, a.device, a.chunk, a.amp, a.compile)
        print(json.dumps(res))
        return
    models = a.models or (["mlp", "cnn", "transformer"] + (["gpt2small"] if a.device == "cuda" else []))
    result = {"machine": {"device": a.device, "threads": torch.get_num_threads(), "torch": torch.__version__,
                          "cuda": torch.cuda.get_device_name(0) if a.device == "cuda" else None,
                          "cpus": os.cpu_count(), "loadavg_start": os.getloadavg()},
              "batch": a.batch, "repeats": a.repeats, "amp_bf16": a.amp, "compile": a.compile, "models": {}}
    common = ["--batch", str(a.batch), "--gpt2-batch", str(a.gpt2_batch), "--device", a.device] + \
        (["--chunk", str(a.chunk)] if a.chunk else []) + (["--amp"] if a.amp else []) + \
        (["--compile"] if a.compile else [])
    for name in models:
        modes = [m for m in a.modes if not (name == "gpt2small" and m == "opacus-hooks")]
        entry = _subprocess(["--interleave", name, "--modes", *modes, "--repeats", str(a.repeats), *common])
        if "error" in entry and len(entry) == 1:
            entry = {m: dict(entry) for m in modes}
        for mode in modes:  # peak memory: each mode alone in a fresh process
            if "error" not in entry.get(mode, {}):
                entry[mode].update(_subprocess(["--one", name, mode, "--repeats", "2", *common]))
        for key, label in (("median_s", ""), ("median_cpu_s", "cpu_")):
            base = entry.get("nonprivate", {}).get(key)
            for mode, r in entry.items():
                if base and key in r:
                    r[f"{label}ratio_to_nonprivate"] = r[key] / base
            ghost = entry.get("opacus-ghost", {}).get(key)
            if ghost and key in entry.get("dptrain", {}):
                entry["dptrain"][f"{label}speedup_vs_opacus_ghost"] = ghost / entry["dptrain"][key]
        _paired(entry)
        result["models"][name] = entry
        print(json.dumps({name: {m: r.get("ratio_to_nonprivate", r.get("error")) for m, r in entry.items()}}),
              file=sys.stderr)
    result["machine"]["loadavg_end"] = os.getloadavg()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
