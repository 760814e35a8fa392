"""Non-IID client splits of a labelled dataset for federated / distributed experiments.

``label_skew_split(labels, n_clients)`` partitions the example indices among clients so
that each client sees a skewed label mix. Two documented schemes:

* ``classes_per_client=k`` (default 2, the "pathological" split of McMahan et al. 2017,
  done without shard straddling): the L labels, in a seeded random order, are dealt to
  the clients cyclically, k consecutive labels each, so client c holds labels
  ``order[(c·k + j) mod L]`` for j < k (k distinct labels) and every label goes to
  ⌊n·k/L⌋ or ⌈n·k/L⌉ clients; each label's examples (shuffled) are then split into
  near-equal parts among the clients holding it.
* ``alpha=α`` (Hsu, Qi & Brown 2019): for each label, client proportions
  p ~ Dirichlet(α·1_n) and the label's shuffled examples are cut by p. Small α → few
  labels per client; α → ∞ → IID. Redrawn (same seeded stream) until every client holds at
  least ``min_size`` examples.

Either way the result is a partition: every index appears in exactly one client's list.
The split is a public, data-independent choice of *which* records a client holds; it
carries no privacy cost by itself (the mechanisms run on each client's records account for it).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def _as_labels(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(labels.cpu() if hasattr(labels, "cpu") else labels)
    if arr.ndim != 1:
        raise ValueError(f"label_skew_split: labels must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("label_skew_split: labels is empty; pass one label per example")
    return arr


def _deal_labels(classes: np.ndarray, n_clients: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Client c gets labels order[(c·k + j) mod L], j < k (distinct because k ≤ L)."""
    order = rng.permutation(classes)
    L = len(order)
    return [order[(c * k + np.arange(k)) % L] for c in range(n_clients)]


def label_skew_split(labels: Sequence[int] | np.ndarray, n_clients: int, *, classes_per_client: int | None = 2,
                     alpha: float | None = None, seed: int = 0, min_size: int = 1,
                     max_redraws: int = 1000) -> list[np.ndarray]:
    """Partition example indices among ``n_clients`` with a label-skewed mix (see module docstring).

    Give ``alpha`` for the Dirichlet(α) split (``classes_per_client`` is then ignored);
    otherwise each client holds ``classes_per_client`` labels. Returns one sorted int64
    index array per client; deterministic for a given ``seed``.
    """
    y = _as_labels(labels)
    if not isinstance(n_clients, (int, np.integer)) or n_clients < 1:
        raise ValueError(f"label_skew_split: n_clients must be a positive integer, got {n_clients!r}")
    if n_clients > len(y):
        raise ValueError(f"label_skew_split: n_clients={n_clients} exceeds the {len(y)} examples; "
                         "use fewer clients")
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    by_class = {c: rng.permutation(np.flatnonzero(y == c)) for c in classes}
    if alpha is not None:
        return _dirichlet_split(by_class, n_clients, float(alpha), rng, min_size, max_redraws)
    k = classes_per_client
    if k is None or not 1 <= k <= len(classes):
        raise ValueError(f"label_skew_split: classes_per_client must be in [1, {len(classes)}] (the number of "
                         f"labels), got {k}; or pass alpha= for a Dirichlet split")
    if n_clients * k < len(classes):
        raise ValueError(f"label_skew_split: {n_clients} clients × {k} labels each cannot cover all "
                         f"{len(classes)} labels; raise classes_per_client to ≥ {-(-len(classes) // n_clients)}")
    held = _deal_labels(classes, n_clients, k, rng)
    holders: dict = {c: [i for i in range(n_clients) if c in held[i]] for c in classes}
    parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
    for c, idx in by_class.items():
        for client, chunk in zip(holders[c], np.array_split(idx, len(holders[c]))):
            parts[client].append(chunk)
    out = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
    empty = [i for i, p in enumerate(out) if len(p) < min_size]
    if empty:
        raise ValueError(f"label_skew_split: clients {empty} get fewer than min_size={min_size} examples; "
                         "use fewer clients or more classes_per_client")
    return out


def _dirichlet_split(by_class: dict, n_clients: int, alpha: float, rng: np.random.Generator,
                     min_size: int, max_redraws: int) -> list[np.ndarray]:
    if not (alpha > 0 and np.isfinite(alpha)):
        raise ValueError(f"label_skew_split: alpha must be a positive finite number, got {alpha}; "
                         "0.1 is strongly skewed, 100 is nearly IID")
    for _ in range(max_redraws):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
        for idx in by_class.values():
            p = rng.dirichlet(np.full(n_clients, alpha))
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].append(chunk)
        out = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
        if min(len(p) for p in out) >= min_size:
            return out
    raise ValueError(f"label_skew_split: no Dirichlet(alpha={alpha}) draw in {max_redraws} gave every one of "
                     f"{n_clients} clients at least min_size={min_size} examples; raise alpha or lower min_size")
