"""Per-example clipping with embedding tables kept sparse (the LazyDP training path).

The book-keeping pass of :mod:`dptrain.ghost` gives each example's gradient in factored form;
for an embedding table (``nn.Embedding`` / ``nn.EmbeddingBag`` weight) that is a set of rows
(:class:`ghost_layers.Rows`). The squared norm of example i's whole gradient is
‖g_i‖² = Σ_dense ‖g_i,p‖² + Σ_tables ‖g_i,table‖², the table part a segment sum over the rows
the example read, so one flat clip factor f_i = min(1, C/(‖g_i‖ + 1e-6)) covers the dense layers
and the tables together (per-layer thresholds work as in the ghost path). The table's clipped
sum Σ_i f_i g_i,table is returned as (rows touched, their summed values): no [rows, dim]
tensor is formed, so the cost is that of the batch, not of the table. The chunk loop is
:func:`dptrain.ghost.clip_chunks`; this module is its sink for tables.

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
from .clipping import ClippingConfig
from .engine import Inputs, LossFn
from .errors import UnsupportedModuleError
from .ghost import DenseSums, clip_chunks
from .ghost_plan import Plan, plan_key

TABLE_TYPES = (nn.Embedding, nn.EmbeddingBag)


@dataclass
class SparseClippedBatch:
    """Clipped sums: dense tensors for ordinary parameters, (rows, values) for tables."""

    dense: dict[str, torch.Tensor]
    #: name → (rows [k], values [k, dim]): unique sorted rows, or with ``coalesce=False`` rows that
    #: may repeat (a row's sum is then the sum of its entries, as ``index_add_`` forms it)
    rows: dict[str, tuple[torch.Tensor, torch.Tensor]]
    batch_size: int
    loss_sum: float
    clipped: int | torch.Tensor  # a device tensor until ``clipped_count`` reads it back

    @property
    def clipped_count(self) -> int:
        """Examples whose norm exceeded the threshold (private; diagnostics only): a host sync on first read."""
        if isinstance(self.clipped, torch.Tensor):
            self.clipped = int(self.clipped)
        return self.clipped

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.batch_size if self.batch_size else float("nan")


def table_parameters(model: nn.Module) -> dict[str, nn.Module]:
    """``{weight parameter name: module}`` for every trainable Embedding / EmbeddingBag."""
    return {f"{name}.weight" if name else "weight": m for name, m in model.named_modules()
            if isinstance(m, TABLE_TYPES) and m.weight.requires_grad}


def lazy_plan(model: nn.Module, tables: dict[str, nn.Module] | None = None) -> Plan:
    """The book-keeping plan for the lazy path (reusable while the model's structure is unchanged).

    A table's ``sparse`` flag is irrelevant here (its gradient is never formed), and its forward
    pre-hooks are the lazy catch-up, which writes noise before the stock lookup runs.
    """
    tables = table_parameters(model) if tables is None else tables
    plan = Plan.of(model, lookups=list(tables.values()))  # EmbeddingBag 'max' stays generic (refused)
    if not plan.supported:
        raise UnsupportedModuleError(
            "the lazy embedding path needs the book-keeping (ghost) pass, which does not cover this model "
            "(a recurrent layer, nn.MultiheadAttention, a parametrized module or a BatchNorm in training mode); "
            "use mechanism='dpsgd'")
    return plan


class LazyPlans:
    """:func:`lazy_plan` of one model and its tables, made again only when
    :func:`dptrain.ghost_plan.plan_key` changes."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self._key = model, None
        self.plan: Plan | None = None
        self.tables: dict[str, nn.Module] = {}

    def get(self) -> tuple[Plan, dict[str, nn.Module]]:
        key = plan_key(self.model)
        if key != self._key or self.plan is None:
            tables = table_parameters(self.model)
            self.plan, self.tables, self._key = lazy_plan(self.model, tables), tables, key
        return self.plan, self.tables


def sparse_clip_and_sum(model: nn.Module, loss_fn: LossFn, inputs: Inputs, targets: torch.Tensor,
                        config: ClippingConfig, chunk_size: int | None = None,
                        plan: tuple[Plan, dict[str, nn.Module]] | None = None, coalesce: bool = True
                        ) -> SparseClippedBatch:
    """Clipped per-example gradient sums, tables as touched rows only (see the module docstring).

    ``plan``: ``LazyPlans(model).get()``, if known. ``coalesce=False`` leaves repeated rows
    repeated (no sort): enough for an update by ``index_add_``.
    """
    plan, tables = plan or LazyPlans(model).get()
    dense = DenseSums(plan.params)
    parts: dict[str, list] = {k: [] for k in tables}

    def sink(k: str, terms: list, f: torch.Tensor) -> None:
        if k not in parts:
            dense(k, terms, f)
        elif all(isinstance(t, gl.Rows) for t in terms):
            parts[k] += [(t.idx.reshape(-1), (t.right * f.view(-1, 1, 1)).reshape(-1, t.right.shape[2])) for t in terms]
        else:
            raise UnsupportedModuleError(
                f"table {k!r} is used outside its own lookups (e.g. tied to an output layer), so every row is "
                "read at every step and lazy noise cannot apply; untie it or use mechanism='dpsgd'")

    totals = clip_chunks(model, plan, loss_fn, inputs, targets, config, sink, chunk_size)
    if totals is None:
        raise UnsupportedModuleError(
            "the lazy embedding path cannot bound each example's gradient for this model: a parameter is used "
            "outside its own module's forward, or the forward mixes examples; use mechanism='dpsgd'")
    out = dense.result([k for k in plan.params if k not in tables])
    rows = {k: _table_rows(parts[k], m.weight, coalesce) for k, m in tables.items()}
    return SparseClippedBatch(out, rows, totals.batch_size, totals.loss_sum, totals.count_tensors()[0])


def _table_rows(parts: list[tuple[torch.Tensor, torch.Tensor]], weight: torch.Tensor, coalesce: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """One table's (rows, values) from its parts, in the table's dtype; summed per row if ``coalesce``."""
    if not parts:
        return torch.zeros(0, dtype=torch.long, device=weight.device), weight.new_zeros(0, weight.shape[1])
    idx = parts[0][0] if len(parts) == 1 else torch.cat([r for r, _ in parts])
    vals = parts[0][1] if len(parts) == 1 else torch.cat([v for _, v in parts])
    if coalesce:
        idx, inverse = torch.unique(idx, return_inverse=True)
        vals = vals.new_zeros(idx.numel(), vals.shape[1]).index_add_(0, inverse, vals)
    return idx, vals.to(weight.dtype)
