"""Per-example clipping with embedding tables kept sparse (the LazyDP training path).

The book-keeping pass of :mod:`dptrain.ghost` gives each example's gradient in factored form;
for an embedding table (``nn.Embedding`` / ``nn.EmbeddingBag`` weight) that is a set of rows
(:class:`ghost_layers.Rows`). The squared norm of example i's whole gradient is
‖g_i‖² = Σ_dense ‖g_i,p‖² + Σ_tables ‖g_i,table‖², the table part a segment sum over the rows
the example read, so one flat clip factor f_i = min(1, C/(‖g_i‖ + 1e-6)) covers the dense layers
and the tables together (per-layer thresholds work as in the ghost path). The table's clipped
sum Σ_i f_i g_i,table is returned as (unique rows touched, their summed values): no [rows, dim]
tensor is formed, so the cost is that of the batch, not of the table.

Privacy assumption: as for the ghost path — example i's gradient depends on (x_i, y_i) and the
parameters only, and a table's weight is used only through its own lookups (a table whose
weight is also used elsewhere, e.g. tied to an output layer, is refused: every row is then read
every step and the gradient is not sparse).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import ghost_layers as gl
from .clipping import ClippingConfig, _factor
from .engine import Inputs, LossFn, iter_chunks
from .errors import UnsupportedModuleError
from .ghost import _check_thresholds, _float32, _Plan, _run_chunk, _supported

TABLE_TYPES = (nn.Embedding, nn.EmbeddingBag)


@dataclass
class SparseClippedBatch:
    """Clipped sums: dense tensors for ordinary parameters, (rows, values) for tables."""

    dense: dict[str, torch.Tensor]
    rows: dict[str, tuple[torch.Tensor, torch.Tensor]]  # name → (unique rows [k], summed values [k, dim])
    batch_size: int
    loss_sum: float
    clipped_count: int

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.batch_size if self.batch_size else float("nan")


def table_parameters(model: nn.Module) -> dict[str, nn.Module]:
    """``{weight parameter name: module}`` for every trainable Embedding / EmbeddingBag."""
    return {f"{name}.weight" if name else "weight": m for name, m in model.named_modules()
            if isinstance(m, TABLE_TYPES) and m.weight.requires_grad}


def _plan_without_table_flags(model: nn.Module) -> _Plan:
    """The ghost plan for the lazy path.

    A table's ``sparse`` flag is irrelevant here (its gradient is never formed), and its forward
    pre-hooks are the lazy catch-up, which writes noise before the stock lookup runs.
    """
    plan = _Plan.of(model)
    for name, m in plan.owners.items():  # the catch-up pre-hook only writes noise: the stock forward still applies
        if type(m) is nn.Embedding or (type(m) is nn.EmbeddingBag and m.mode != "max"):
            plan.kinds[name] = "embedding" if type(m) is nn.Embedding else "embedding_bag"
    others = {k: m for k, m in plan.owners.items() if not isinstance(m, TABLE_TYPES)}
    if not _supported(others):
        raise UnsupportedModuleError(
            "the lazy embedding path needs the book-keeping (ghost) pass, which does not cover this model "
            "(a recurrent layer, nn.MultiheadAttention, a parametrized module or a BatchNorm in training mode); "
            "use mechanism='dpsgd'")
    return plan


def _sparse_rows(terms: list, f: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_i f_i G_i for Rows terms, as (unique rows, values)."""
    idx = torch.cat([t.idx.reshape(-1) for t in terms])
    vals = torch.cat([(t.right * f.view(-1, 1, 1)).reshape(-1, dim) for t in terms])
    rows, inverse = torch.unique(idx, return_inverse=True)
    return rows, vals.new_zeros(rows.numel(), dim).index_add_(0, inverse, vals)


def sparse_clip_and_sum(model: nn.Module, loss_fn: LossFn, inputs: Inputs, targets: torch.Tensor,
                        config: ClippingConfig, chunk_size: int | None = None) -> SparseClippedBatch:
    """Clipped per-example gradient sums, tables as touched rows only (see the module docstring)."""
    plan = _plan_without_table_flags(model)
    params, tables = plan.params, table_parameters(model)
    _check_thresholds(config, params)
    dense: dict[str, torch.Tensor] = {k: torch.zeros_like(p) for k, p in params.items() if k not in tables}
    parts: dict[str, list] = {k: [] for k in tables}
    n, loss_sum, clipped = 0, 0.0, 0
    for xs, y in iter_chunks(inputs, targets, chunk_size):
        b = int(y.shape[0])
        if b == 0:
            continue
        res = _run_chunk(model, plan, loss_fn, xs, y)
        if res is None:
            raise UnsupportedModuleError(
                "the lazy embedding path cannot bound each example's gradient for this model: a parameter is used "
                "outside its own module's forward, or the forward mixes examples; use mechanism='dpsgd'")
        merged, losses = res
        for k in tables:
            if any(not isinstance(t, gl.Rows) for t in merged.get(k, [])):
                raise UnsupportedModuleError(
                    f"table {k!r} is used outside its own lookups (e.g. tied to an output layer), so every row is "
                    "read at every step and lazy noise cannot apply; untie it or use mechanism='dpsgd'")
        with _float32(y.device.type):
            factors, keep, count = _factors(merged, params, config, b)
            for k, terms in merged.items():
                if not bool(keep[k].all()):  # non-finite gradient: that example contributes nothing
                    terms = gl.drop_examples(terms, keep[k])
                f = factors[k].float()
                if k in tables:
                    parts[k].append(_sparse_rows(terms, f, params[k].shape[1]))
                else:
                    dense[k] += gl.clipped_sum(terms, f, params[k].shape).to(params[k].dtype)
        n, loss_sum, clipped = n + b, loss_sum + float(losses.sum()), clipped + count
    rows = {}
    for k, p in tables.items():
        if not parts[k]:
            rows[k] = (torch.zeros(0, dtype=torch.long, device=p.weight.device),
                       p.weight.new_zeros(0, p.weight.shape[1]))
            continue
        idx = torch.cat([r for r, _ in parts[k]])
        vals = torch.cat([v for _, v in parts[k]])
        uniq, inverse = torch.unique(idx, return_inverse=True)
        rows[k] = (uniq, vals.new_zeros(uniq.numel(), vals.shape[1]).index_add_(0, inverse, vals)
                   .to(p.weight.dtype))
    return SparseClippedBatch(dense, rows, n, loss_sum, clipped)


def _factors(merged: dict[str, list], params: dict[str, nn.Parameter], config: ClippingConfig, b: int
             ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    """Clip factors per parameter (one flat factor, or per-layer), which examples to keep, and the clipped count."""
    device = next(iter(params.values())).device
    zero = torch.zeros(b, dtype=torch.float64, device=device)
    sq = {k: gl.sq_norms(t) for k, t in merged.items()}
    if not bool(torch.isfinite(sum(sq.values(), zero)).all()):
        sq = {k: gl.refine(merged[k], v) for k, v in sq.items()}
    if config.thresholds is None:
        f = _factor(torch.sqrt(sum(sq.values(), zero)), config.max_grad_norm)
        factors = dict.fromkeys(params, f)
        low = f
    else:
        factors = {k: _factor(torch.sqrt(sq.get(k, zero)), config.thresholds[k]) for k in params}
        low = torch.stack(list(factors.values())).amin(0)
    return factors, {k: v > 0 for k, v in factors.items()}, int((low < 1).sum())
