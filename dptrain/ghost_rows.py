"""Embedding tables on the book-keeping path: per-example gradients as sparse rows.

Example i's gradient of a [V, d] table is Σ_t e_{idx_it} R_itᵀ (row idx_it receives R_it; rows read
several times add up). Its squared norm: ‖R_i0‖² for one read; for two reads ‖R_i0 + R_i1‖² if they
hit one row, else ‖R_i0‖² + ‖R_i1‖²; for T ≤ ROWS_GRAM_MAX_T the T×T Gram matrix masked to equal
indices, Σ_{t,s} [idx_it = idx_is] (R_it·R_is); beyond that a segment sum of the rows sharing an index
inside one example. Clipped sums Σ_i f_i G_i are segment sums of f-scaled rows (the embedding
backward kernel).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .ghost_precision import norm, sq


@dataclass
class Rows:
    """Per-example gradient of a [V, d] table: row idx[b, t] receives right[b, t]."""

    idx: torch.Tensor  # [B, T] long
    right: torch.Tensor  # [B, T, d]
    num_rows: int


def embedding_terms(m: nn.Embedding, idx: torch.Tensor, g: torch.Tensor) -> dict[str, Rows]:
    b = g.shape[0]
    idx = idx.reshape(b, -1)
    right = g.reshape(b, -1, g.shape[-1])
    if m.padding_idx is not None:  # the padding row never receives a gradient
        right = right * (idx != m.padding_idx).unsqueeze(-1).to(right.dtype)
    return {"weight": Rows(idx, right, m.num_embeddings)}


def segment_sums(rows: torch.Tensor, keys: torch.Tensor, count: int) -> torch.Tensor:
    """Σ of the rows sharing a key (keys in [0, count)): the embedding backward kernel, [count, d]."""
    return torch.ops.aten.embedding_dense_backward(rows, keys, count, -1, False)


#: longest T for which an embedding's per-example norm uses the T×T Gram matrix (no sort)
ROWS_GRAM_MAX_T = 16


def rows_sq(term: Rows, gram_max_t: int = ROWS_GRAM_MAX_T) -> torch.Tensor:
    """‖Σ_t e_{idx_t} R_tᵀ‖² per example: directly for T ≤ 2, Σ_{t,s} [idx_t = idx_s] (R_t·R_s) for T up to
    ROWS_GRAM_MAX_T, else a segment sum.

    Longer T: each example's indices are sorted; positions with equal neighbours share a segment
    (ids over the whole batch, at most B·T of them, so no shape depends on the data: no host
    sync); rows are summed per segment by the embedding backward kernel and the squared segment
    norms added to their example.
    """
    b, t, d = term.right.shape
    if t == 1:
        return sq(term.right)
    if t == 2:  # ‖R_0 + R_1‖² where both entries read one row, else ‖R_0‖² + ‖R_1‖²
        together = norm(term.right[:, 0] + term.right[:, 1])
        apart = norm(term.right.reshape(b, 2 * d))
        return torch.where(term.idx[:, 0] == term.idx[:, 1], together, apart).double().square()
    if t <= gram_max_t:
        right = term.right
        gram = torch.matmul(right, right.transpose(1, 2))
        same = term.idx.unsqueeze(2) == term.idx.unsqueeze(1)
        return torch.where(same, gram, 0.0).sum((1, 2), dtype=torch.float64).clamp_min(0.0)  # rounding: negatives
    ordered, order = torch.sort(term.idx, dim=1)
    new = torch.ones_like(ordered, dtype=torch.bool)
    new[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    seg = torch.cumsum(new.reshape(-1), 0) - 1  # segment id of each sorted position
    base = torch.arange(b, device=order.device).unsqueeze(1) * t
    where = (order + base).reshape(-1)  # flat position of each sorted entry
    ids = torch.empty_like(seg).scatter_(0, where, seg)  # segment id of each original position
    sums = segment_sums(term.right.reshape(-1, d), ids, b * t)
    example = torch.zeros_like(seg).scatter_(0, seg, base.expand(b, t).reshape(-1) // t)
    out = torch.zeros(b, dtype=torch.float64, device=sums.device)
    return out.index_add_(0, example, sq(sums))  # unused segment ids: zero rows, added to example 0
