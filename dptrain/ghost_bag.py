"""Per-example gradients of ``nn.EmbeddingBag`` (modes 'sum' and 'mean') as sparse rows.

Bag i with entries (idx_ij, w_ij) outputs y_i = Σ_j w_ij · W[idx_ij] (mode 'sum': w_ij is the
per-sample weight, or 1; mode 'mean': w_ij = 1 / (number of entries of bag i that are not
``padding_idx``)); entries equal to ``padding_idx`` are left out. With g_i = ∂ℓ_i/∂y_i the
per-example gradient of the table is Σ_j e_{idx_ij} (w_ij g_i)ᵀ — a :class:`ghost_layers.Rows`
term with T = the longest bag (shorter bags padded with zero rows). Mode 'max' is not handled
here (the generic vmap path takes it).
"""
from __future__ import annotations

import torch
from torch import nn

from .ghost_rows import Rows


def _padded_bags(m: nn.EmbeddingBag, idx: torch.Tensor, offsets: torch.Tensor | None,
                 weights: torch.Tensor | None, b: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Bags as [B, T] indices and [B, T] weights (per-sample weights or 1)."""
    if idx.dim() == 2:
        if offsets is not None or idx.shape[0] != b:
            return None
        w = torch.ones(idx.shape, device=idx.device) if weights is None else weights.float()
        return idx, w.reshape(idx.shape)
    if idx.dim() != 1 or offsets is None:
        return None
    starts = offsets[:-1] if m.include_last_offset else offsets
    if starts.numel() != b:
        return None
    n = idx.numel()
    ends = offsets[1:] if m.include_last_offset else torch.cat([offsets[1:], offsets.new_tensor([n])])
    lengths = (ends - starts).long()
    t = max(1, int(lengths.max())) if b else 1
    bag = torch.repeat_interleave(torch.arange(b, device=idx.device), lengths)
    pos = torch.arange(n, device=idx.device) - starts.long()[bag]
    out_idx = torch.zeros(b, t, dtype=torch.long, device=idx.device)
    out_w = torch.zeros(b, t, device=idx.device)
    out_idx[bag, pos] = idx.long()
    out_w[bag, pos] = 1.0 if weights is None else weights.float()
    return out_idx, out_w


def embedding_bag_terms(m: nn.EmbeddingBag, args: tuple, kwargs: dict, g: torch.Tensor, b: int
                        ) -> dict[str, Rows] | None:
    """The Rows term of one recorded EmbeddingBag call (None if the call's form is not understood)."""
    if m.mode not in ("sum", "mean") or not args:
        return None
    names = ("input", "offsets", "per_sample_weights")
    given = dict(zip(names, args))
    given.update(kwargs)
    bags = _padded_bags(m, given["input"], given.get("offsets"), given.get("per_sample_weights"), b)
    if bags is None or g.dim() != 2 or g.shape[0] != b:
        return None
    idx, w = bags
    if m.padding_idx is not None:
        w = w * (idx != m.padding_idx).to(w.dtype)
    if m.mode == "mean":
        count = (w != 0).sum(1, keepdim=True).clamp_min(1).to(w.dtype) if given.get("per_sample_weights") is None \
            else None
        if count is None:
            return None  # torch allows per_sample_weights with mode='sum' only
        w = w / count
    return {"weight": Rows(idx, w.unsqueeze(-1) * g.unsqueeze(1), m.num_embeddings)}
