"""Private click-through-rate model: a DLRM-style recommender trained with lazy table noise.

Synthetic clicks (no download): users and items with hidden latent factors, item popularity
following a Zipf law (a few items take most impressions), an item category, a history of recently
viewed categories, and a few dense features. The model follows DLRM (Naumov et al. 2019): a bottom
MLP on the dense features, four tables (user, item, category: nn.Embedding; category history:
nn.EmbeddingBag), pairwise dot-product interactions, a top MLP. It is trained once without privacy
and once through ``dptrain.make_private(model, eps=3, mechanism="lazy")`` — tables by plain SGD
with lazy noise, dense layers by Adam — and the test AUC (sklearn) of both is printed as one JSON
object, next to the AUC of the true click probabilities.

    python examples/private_recommender.py                      # ~1-2 minutes on 2 CPU cores
    python examples/private_recommender.py --items 10000000 --users 1000000 --dim 16
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import Dataset

import dptrain

N_DENSE, N_CATEGORIES, HISTORY = 4, 1000, 3


def zipf_ids(n: int, rows: int, s: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` draws of ids 0..rows-1 with P(id = r) ∝ 1/(r+1)^s (id 0 the most popular)."""
    cdf = np.cumsum(1.0 / np.arange(1, rows + 1, dtype=np.float64) ** s)
    return np.searchsorted(cdf, rng.random(n) * cdf[-1]).astype(np.int64)


def synthetic_clicks(n: int, users: int, items: int, seed: int = 0) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """Click log with a known click probability (returned for the oracle AUC)."""
    rng = np.random.default_rng(seed)
    k = 4
    user = zipf_ids(n, users, 0.6, rng)
    item = zipf_ids(n, items, 1.05, rng)
    cat = (item * 7919) % N_CATEGORIES
    hist = (cat[:, None] + rng.integers(-3, 4, (n, HISTORY))) % N_CATEGORIES  # related categories
    dense = rng.standard_normal((n, N_DENSE)).astype(np.float32)
    # latent factors only for the ids that occur (a 10M-row table needs no 10M×k array here)
    u_ids, u_inv = np.unique(user, return_inverse=True)
    i_ids, i_inv = np.unique(item, return_inverse=True)
    u_lat = rng.standard_normal((u_ids.size, k))
    i_lat = rng.standard_normal((i_ids.size, k))
    cat_bias = rng.normal(0, 0.8, N_CATEGORIES)
    logit = (0.6 * (u_lat[u_inv] * i_lat[i_inv]).sum(1) + cat_bias[cat] + dense @ np.array([0.8, -0.5, 0.3, 0.0])
             - 0.25 * np.log1p(item) + 0.2)
    p = 1 / (1 + np.exp(-logit))
    clicks = (rng.random(n) < p).astype(np.int64)
    ids = np.stack([user, item, cat], 1)
    data = {"ids": torch.from_numpy(ids), "hist": torch.from_numpy(hist.astype(np.int64)),
            "dense": torch.from_numpy(dense), "y": torch.from_numpy(clicks)}
    return data, p


class Clicks(Dataset):
    """Examples ((ids, hist, dense), click)."""

    def __init__(self, data: dict[str, torch.Tensor], index: np.ndarray) -> None:
        self.ids, self.hist, self.dense = (data[k][index] for k in ("ids", "hist", "dense"))
        self.y = data["y"][index]

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __getitem__(self, i: int):
        return (self.ids[i], self.hist[i], self.dense[i]), self.y[i]

    def take(self, idx: torch.Tensor):
        return (self.ids[idx], self.hist[idx], self.dense[idx]), self.y[idx]


def mlp(*sizes: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class DLRM(nn.Module):
    """Bottom MLP + tables → pairwise dot interactions → top MLP → 2 logits (no click / click)."""

    def __init__(self, users: int, items: int, dim: int) -> None:
        super().__init__()
        self.user = nn.Embedding(users, dim)
        self.item = nn.Embedding(items, dim)
        self.category = nn.Embedding(N_CATEGORIES, dim)
        self.history = nn.EmbeddingBag(N_CATEGORIES, dim, mode="mean")
        for table in (self.user, self.item, self.category, self.history):
            nn.init.normal_(table.weight, std=0.05)
        self.bottom = mlp(N_DENSE, 32, dim)
        self.top = mlp(dim + 10, 64, 2)
        self.register_buffer("pairs", torch.triu_indices(5, 5, offset=1))

    def forward(self, ids: torch.Tensor, hist: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        vecs = torch.stack([self.bottom(dense), self.user(ids[:, 0]), self.item(ids[:, 1]),
                            self.category(ids[:, 2]), self.history(hist)], 1)  # [B, 5, dim]
        dots = torch.bmm(vecs, vecs.transpose(1, 2))[:, self.pairs[0], self.pairs[1]]  # [B, 10]
        return self.top(torch.cat([vecs[:, 0], dots], 1))


def tables_and_dense(model: DLRM) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    tables = [m.weight for m in (model.user, model.item, model.category, model.history)]
    ids = {id(p) for p in tables}
    return tables, [p for p in model.parameters() if id(p) not in ids]


@torch.no_grad()
def auc(model: nn.Module, data: Clicks, batch: int = 8192) -> float:
    model.eval()  # an eval-mode forward flushes pending lazy noise first
    scores = [torch.softmax(model(*data.take(torch.arange(s, min(s + batch, len(data))))[0]), 1)[:, 1]
              for s in range(0, len(data), batch)]
    model.train()
    return float(roc_auc_score(data.y.numpy(), torch.cat(scores).numpy()))


def train_non_private(model: DLRM, train: Clicks, batch: int, epochs: float, lr_table: float, lr_dense: float,
                      seed: int) -> None:
    for table in (model.user, model.item, model.category, model.history):
        table.sparse = True  # sparse row gradients: the usual fast non-private baseline
    tables, dense = tables_and_dense(model)
    opt_t, opt_d = torch.optim.SGD(tables, lr=lr_table), torch.optim.Adam(dense, lr=lr_dense)
    g = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    steps = max(1, round(epochs * len(train) / batch))
    for _ in range(steps):
        x, y = train.take(torch.randint(0, len(train), (batch,), generator=g))
        opt_t.zero_grad()
        opt_d.zero_grad()
        loss_fn(model(*x), y).backward()
        opt_t.step()
        opt_d.step()


def train_private(model: DLRM, train: Clicks, batch: int, epochs: float, lr_table: float, lr_dense: float,
                  eps: float, seed: int, accountant: str = "prv") -> dptrain.PrivateTraining:
    tables, dense = tables_and_dense(model)
    priv = dptrain.make_private(model, eps=eps, mechanism="lazy", max_grad_norm=1.0, seed=seed,
                                 accountant=accountant)
    priv.attach(train, batch_size=batch, epochs=epochs, optimizer=torch.optim.Adam(dense, lr=lr_dense),
                table_optimizer=torch.optim.SGD(tables, lr=lr_table))
    assert priv.loader is not None
    for _ in range(priv.plan.planned_steps):  # type: ignore[union-attr]
        priv.step(*train.take(priv.loader.sampler.sample()))
    return priv


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--examples", type=int, default=100_000)
    ap.add_argument("--users", type=int, default=50_000)
    ap.add_argument("--items", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--eps", type=float, default=3.0)
    ap.add_argument("--lr-table", type=float, default=20.0)
    ap.add_argument("--lr-dense", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--accountant", default="prv")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data, p = synthetic_clicks(args.examples, args.users, args.items, args.seed)
    perm = np.random.default_rng(args.seed + 1).permutation(args.examples)
    cut = int(0.8 * args.examples)
    train, test = Clicks(data, perm[:cut]), Clicks(data, perm[cut:])
    out: dict = {"examples": args.examples, "users": args.users, "items": args.items, "dim": args.dim,
                 "batch": args.batch, "epochs": args.epochs, "click_rate": float(data["y"].float().mean()),
                 "auc_true_probabilities": float(roc_auc_score(test.y.numpy(), p[perm[cut:]]))}
    for name in ("non_private", "private"):
        torch.manual_seed(args.seed)
        model = DLRM(args.users, args.items, args.dim)
        t = time.perf_counter()
        if name == "private":
            priv = train_private(model, train, args.batch, args.epochs, args.lr_table, args.lr_dense, args.eps,
                                 args.seed, args.accountant)
            rep = priv.report()
            out["private_epsilon"], out["private_delta"] = rep.epsilon_spent, rep.delta
            out["private_noise_multiplier"], out["private_steps"] = rep.noise_multiplier, rep.steps
        else:
            train_non_private(model, train, args.batch, args.epochs, args.lr_table, args.lr_dense, args.seed)
        out[f"{name}_train_s"] = round(time.perf_counter() - t, 2)
        out[f"{name}_test_auc"] = auc(model, test)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
