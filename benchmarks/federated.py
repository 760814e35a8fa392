"""Federated DP benchmark: accuracy vs ε for DP-FedAvg on digits and DP-LoRA / FFA-LoRA / FedSVD
on a LoRA-adapted transformer. Prints one JSON object.

    python benchmarks/federated.py [--seeds 3] [--quick]

(a) digits (sklearn), train split dealt to 10 clients by label skew (2 labels each,
    dptrain.client_split.label_skew_split); linear model; DP-FedAvg with example-level DP (local
    DP-SGD, ε per example) and with client-level DP (clipped updates, server noise, ε per client),
    ε ∈ {1, 3, 8}, plus the non-private FedAvg reference; and DIFF2 vs DP-GD (full-batch rounds,
    a 64-32-10 MLP, benchmarks/federated_diff2.py) with the hyperparameters that script chose on
    validation (``TUNED``). ``--with-diff2`` also reruns that script's search (a few minutes) and
    embeds its JSON under "diff2_search".
(b) a 1-layer nn.TransformerEncoder classifier pre-trained non-privately on a synthetic "public"
    token task, then fine-tuned with LoRA adapters (rank 4 on the feed-forward layers and the head)
    on a shifted synthetic task split over 10 clients by label skew; example-level DP;
    DP-LoRA, FFA-LoRA and FedSVD at ε ∈ {1, 3, 8}, same rounds / steps / lr / clip for all.
Accuracy on held-out test data; wall time per run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dptrain.client_split import label_skew_split  # noqa: E402
from dptrain.demo import accuracy, digits_split  # noqa: E402
from dptrain.federated import make_federated  # noqa: E402
from dptrain.lora import add_lora  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
import federated_diff2  # noqa: E402

EPSILONS = (1.0, 3.0, 8.0)
CLIENTS = 10


def split(data: TensorDataset, seed: int, classes_per_client: int) -> list[TensorDataset]:
    x, y = data.tensors
    parts = label_skew_split(y.numpy(), CLIENTS, classes_per_client=classes_per_client, seed=seed)
    return [TensorDataset(x[torch.as_tensor(p)], y[torch.as_tensor(p)]) for p in parts]


def timed_run(model: nn.Module, clients: list[TensorDataset], test: TensorDataset, **kw) -> dict:
    t0 = time.perf_counter()
    fed = make_federated(model, clients, **kw)
    calib = time.perf_counter() - t0
    fed.fit()
    rep = fed.report()
    return {"accuracy": accuracy(model, test), "epsilon_spent": rep.epsilon_spent, "delta": rep.delta,
            "noise_multiplier": rep.noise_multiplier, "wall_s": time.perf_counter() - t0, "calibration_s": calib}


# ---------------------------------------------------------------------------------- (a) digits
DIGITS = dict(rounds=30, local_steps=3, batch_size=32, lr=0.5, max_norm=1.0, accountant="pld")


def digits_runs(seeds: list[int]) -> dict:
    train, test = digits_split(0)
    clients = split(train, 0, classes_per_client=2)
    rows: dict = {"sizes": [len(c) for c in clients], "config": DIGITS, "runs": []}

    def model(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Linear(64, 10)

    for seed in seeds:
        rows["runs"].append({"dp": "none", "eps": None, "seed": seed, **timed_run(
            model(seed), clients, test, eps=None, dp="none", seed=seed, **DIGITS)})
        for dp in ("example", "client"):
            for eps in EPSILONS:
                rows["runs"].append({"dp": dp, "eps": eps, "seed": seed, **timed_run(
                    model(seed), clients, test, eps=eps, dp=dp, seed=seed, **DIGITS)})
    return rows


# ---------------------------------------------------------------------------------- (b) LoRA
VOCAB, LENGTH, CLASSES, WIDTH = 24, 12, 4, 32
LORA = dict(rounds=30, local_steps=4, batch_size=32, lr=2.0, max_norm=1.0, accountant="pld")
#: the non-private reference runs unclipped: DP-LoRA diverges there at lr 2, so it uses lr 0.5
LORA_REFERENCE_LR = 0.5


def token_task(n: int, signatures: torch.Tensor, g: torch.Generator) -> TensorDataset:
    """Random tokens with 3 tokens of class c's signature set planted at random positions; label c."""
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
    pos = torch.argsort(torch.rand(n, LENGTH, generator=g), dim=1)[:, :3]
    pick = signatures[y][torch.arange(n)[:, None], torch.randint(0, signatures.shape[1], (n, 3), generator=g)]
    x[torch.arange(n)[:, None], pos] = pick
    return TensorDataset(x, y)


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.pos = nn.Parameter(torch.randn(LENGTH, WIDTH) * 0.1)
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(WIDTH, 4, 2 * WIDTH, dropout=0.0, batch_first=True), num_layers=1,
            enable_nested_tensor=False)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x) + self.pos).mean(1))


def pretrain(public: TensorDataset, seed: int) -> dict:
    torch.manual_seed(seed)
    model = TinyTransformer()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = public.tensors
    g = torch.Generator().manual_seed(seed)
    for _ in range(12):
        for idx in torch.randperm(len(y), generator=g).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.state_dict()


def lora_runs(seeds: list[int]) -> dict:
    g = torch.Generator().manual_seed(1234)
    tokens = torch.randperm(VOCAB, generator=g)
    public_sig = tokens[:16].reshape(CLASSES, 4)
    # shifted task: each class keeps 2 of its public tokens and takes 2 of another class's
    private_sig = torch.cat([public_sig[:, :2], public_sig.roll(1, 0)[:, 2:]], dim=1)
    public = token_task(4000, public_sig, g)
    private_train, private_test = token_task(2000, private_sig, g), token_task(1000, private_sig, g)
    public_test = token_task(1000, public_sig, g)
    t0 = time.perf_counter()
    base = pretrain(public, 0)
    out: dict = {"pretrain_s": time.perf_counter() - t0, "config": LORA, "runs": []}

    def model(seed: int) -> nn.Module:
        net = TinyTransformer()
        net.load_state_dict(base)
        add_lora(net, rank=4, seed=seed)
        return net

    ref = TinyTransformer()
    ref.load_state_dict(base)
    out["base_public_accuracy"] = accuracy(ref, public_test)
    out["base_private_accuracy"] = accuracy(ref, private_test)
    clients = split(private_train, 0, classes_per_client=2)
    out["sizes"] = [len(c) for c in clients]
    for algorithm in ("dp-lora", "ffa-lora", "fedsvd"):  # non-private ceiling, one seed
        out["runs"].append({"algorithm": algorithm, "eps": None, "seed": 0, **timed_run(
            model(0), clients, private_test, eps=None, dp="none", algorithm=algorithm, seed=0,
            **{**LORA, "lr": LORA_REFERENCE_LR})})
    for seed in seeds:
        for algorithm in ("dp-lora", "ffa-lora", "fedsvd"):
            for eps in EPSILONS:
                out["runs"].append({"algorithm": algorithm, "eps": eps, "seed": seed, **timed_run(
                    model(seed), clients, private_test, eps=eps, dp="example", algorithm=algorithm, seed=seed,
                    **LORA)})
    return out


def diff2() -> dict | None:
    script = ROOT / "benchmarks" / "federated_diff2.py"
    if not script.exists():
        return None
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        return {"error": res.stderr[-2000:]}
    return json.loads(res.stdout)


def summarise(runs: list[dict], key: str) -> list[dict]:
    groups: dict = {}
    for r in runs:
        groups.setdefault((r[key], r["eps"]), []).append(r)
    return [{key: k[0], "eps": k[1], "median_accuracy": statistics.median(r["accuracy"] for r in rs),
             "accuracies": [round(r["accuracy"], 4) for r in rs],
             "median_wall_s": statistics.median(r["wall_s"] for r in rs)} for k, rs in groups.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one seed")
    ap.add_argument("--part", choices=("all", "digits", "diff2", "lora"), default="all")
    ap.add_argument("--with-diff2", action="store_true", help="also rerun the search of benchmarks/federated_diff2.py")
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = [0] if args.quick else list(range(args.seeds))
    t0 = time.perf_counter()
    result: dict = {"machine": {"torch": torch.__version__, "threads": torch.get_num_threads()}}
    parts: dict[str, float] = {}
    if args.part in ("all", "digits"):
        t1 = time.perf_counter()
        d = digits_runs(seeds)
        result["digits_fedavg"] = {**d, "summary": summarise(d["runs"], "dp")}
        parts["digits_fedavg"] = time.perf_counter() - t1
    if args.part in ("all", "diff2"):
        t1 = time.perf_counter()
        result["digits_diff2"] = federated_diff2.fixed(EPSILONS, tuple(seeds))
        parts["digits_diff2"] = time.perf_counter() - t1
    if args.part in ("all", "lora"):
        t1 = time.perf_counter()
        lo = lora_runs(seeds)
        result["lora_transformer"] = {**lo, "summary": summarise(lo["runs"], "algorithm")}
        parts["lora_transformer"] = time.perf_counter() - t1
    result["part_wall_s"] = parts
    if args.with_diff2:
        result["diff2_search"] = diff2()
    result["total_wall_s"] = time.perf_counter() - t0
    print(json.dumps(result))


if __name__ == "__main__":
    main()
