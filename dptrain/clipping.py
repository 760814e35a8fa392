"""Per-example clipping and the clipped sum.

Flat clipping (Abadi et al. 2016): g_i ← g_i · min(1, C / ‖g_i‖₂), ‖g_i‖ over all
trainable parameters. Per-layer clipping (McMahan et al. 2018): parameter group g is
clipped at its own C_g; the concatenated contribution then has norm ≤ √(Σ_g C_g²),
which is the sensitivity the noise is scaled to (DESIGN.md invariant 6).

Examples whose gradient is not finite (inf / NaN) contribute zero: still within the bound.
Norms are computed in float64 so that huge outliers are clipped, not overflowed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping, Union

import torch
from torch import nn

from .engine import Inputs, LossFn, iter_per_sample_grads, trainable_parameters

if TYPE_CHECKING:
    from .ghost_plan import Plan

_EPS = 1e-6
#: default memory for one chunk of per-example gradients (virtual-step size is derived from it)
DEFAULT_CHUNK_BYTES = 1 << 30


@dataclass(frozen=True)
class ClippingConfig:
    """How examples are clipped.

    ``thresholds`` is ``None`` for flat clipping at ``max_grad_norm``, or a mapping from
    parameter name to its own threshold C_g (per-layer clipping).
    """

    max_grad_norm: float
    thresholds: Mapping[str, float] | None = None

    def __post_init__(self) -> None:
        if not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise ValueError(f"max_grad_norm must be a positive finite number, got {self.max_grad_norm}")
        if self.thresholds is not None:
            bad = {k: v for k, v in self.thresholds.items() if not (v > 0 and math.isfinite(v))}
            if bad:
                raise ValueError(f"per-layer clipping thresholds must be positive and finite: {bad}")

    @property
    def sensitivity(self) -> float:
        """L2 bound on one example's whole clipped contribution: C, or √(Σ_g C_g²)."""
        if self.thresholds is None:
            return float(self.max_grad_norm)
        return math.sqrt(sum(c * c for c in self.thresholds.values()))

    @staticmethod
    def per_layer(model: nn.Module, max_grad_norm: float) -> "ClippingConfig":
        """Equal split: each of the G trainable tensors gets C/√G (total sensitivity C)."""
        names = list(trainable_parameters(model))
        c = max_grad_norm / math.sqrt(len(names))
        return ClippingConfig(max_grad_norm, {n: c for n in names})


def _example_sq_norms(g: torch.Tensor) -> torch.Tensor:
    dims = tuple(range(1, g.dim()))
    if not dims:
        return g.double() ** 2
    return torch.linalg.vector_norm(g, dim=dims, dtype=torch.float64) ** 2


def clip_factors(grads: Mapping[str, torch.Tensor], config: ClippingConfig) -> dict[str, torch.Tensor]:
    """Per-example scale factors min(1, C/‖g_i‖) (0 for non-finite gradients), per parameter."""
    if not grads:
        raise ValueError("clip_factors: no per-example gradients (the model has no trainable parameters)")
    sq = {k: _example_sq_norms(g) for k, g in grads.items()}
    tiny = max(torch.finfo(g.dtype).tiny for g in grads.values())  # the factors are applied in the gradients' dtype
    if config.thresholds is None:
        norm = torch.sqrt(sum(sq.values()))
        f = _factor(norm, config.max_grad_norm, tiny=tiny)
        return {k: f for k in grads}
    missing = set(grads) - set(config.thresholds)
    if missing:
        raise ValueError(f"per-layer clipping has no threshold for parameters {sorted(missing)}; "
                         "pass one threshold per trainable parameter or use flat clipping")
    return {k: _factor(torch.sqrt(sq[k]), config.thresholds[k], tiny=torch.finfo(grads[k].dtype).tiny) for k in grads}


#: factors below float32's smallest normal number are 0: as a float32 (or bf16) subnormal, C/‖g‖ ≈ 1e-45 would
#: round to a different number (up to 2× the factor), and a gradient that large (‖g‖ > 8e37·C) is as good as
#: non-finite — the vmap engine sees it overflow and drops it
_TINY = torch.finfo(torch.float32).tiny


def _factor(norm: torch.Tensor, c: float, finite: bool = False, tiny: float = _TINY) -> torch.Tensor:
    """min(1, c/(norm + 1e-6)), and 0 where norm is not finite (c/inf = 0; NaN propagates, then → 0) or where
    the factor is below the normal range of the dtype it is applied in (``tiny``: float32's by default, the
    fast path's; the gradients' own on the vmap engine). ``finite``: the caller knows every norm is finite
    (no NaN to replace)."""
    f = (norm + _EPS).reciprocal_().mul_(c).clamp_(max=1.0)
    f = f.masked_fill_(f < tiny, 0.0)
    return f if finite else f.nan_to_num_(nan=0.0)


def clipped_sum(grads: Mapping[str, torch.Tensor], config: ClippingConfig,
                factors: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Σ_i clip(g_i) for each parameter; every example's contribution has norm ≤ sensitivity."""
    factors = clip_factors(grads, config) if factors is None else factors
    out = {}
    for k, g in grads.items():
        g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)  # always: no host sync to test for it
        out[k] = torch.tensordot(factors[k].to(g.dtype), g, dims=1)
    return out


Count = Union[int, torch.Tensor]


class ClippedBatch:
    """Result of clipping one (logical) batch.

    The statistics may be handed in as device tensors (0-dim, or 0-dim per parameter): they are
    read back to Python numbers only when first asked for, so that the clipping step itself needs
    no device→host synchronisation for them. ``count_fn`` instead of the counts: a function giving
    (clipped, unclipped) that is called only then (a DP-SGD step that never reads them skips the work).
    """

    def __init__(self, sums: dict[str, torch.Tensor], batch_size: int, loss_sum: float | torch.Tensor,
                 clipped_count: Count = 0, unclipped: Mapping[str, Count] | None = None,
                 example_losses: torch.Tensor | None = None,
                 count_fn: Callable[[], tuple[Count, Mapping[str, Count]]] | None = None) -> None:
        self.sums = sums
        self.batch_size = batch_size
        #: per-example losses (detached) — private, to be clipped and noised before use
        self.example_losses = example_losses
        self._loss_sum: float | torch.Tensor = loss_sum
        self._count_fn = count_fn
        self._counts: list[Count] | None = [clipped_count, *(unclipped or {}).values()]
        self._names = list(unclipped or {})
        self._clipped, self._unclipped = 0, {}

    @staticmethod
    def _host(values: list) -> list:
        """Python numbers of ``values``: one transfer for all the tensors among them."""
        tensors = [(j, v) for j, v in enumerate(values) if isinstance(v, torch.Tensor)]
        if tensors:
            device = tensors[0][1].device
            host = torch.stack([v.detach().reshape(()).double().to(device) for _, v in tensors]).tolist()
            values = list(values)
            for (j, _), h in zip(tensors, host):
                values[j] = h
        return values

    @property
    def loss_sum(self) -> float:
        if isinstance(self._loss_sum, torch.Tensor):
            self._loss_sum = float(self._host([self._loss_sum])[0])
        return self._loss_sum

    def _read_counts(self) -> None:
        if self._count_fn is not None:
            clipped, unclipped = self._count_fn()
            self._count_fn, self._counts, self._names = None, [clipped, *unclipped.values()], list(unclipped)
        if self._counts is not None:
            host = self._host(self._counts)
            self._clipped, self._unclipped = int(host[0]), {k: int(v) for k, v in zip(self._names, host[1:])}
            self._counts = None

    @property
    def clipped_count(self) -> int:
        """Examples whose norm exceeded the threshold (private; diagnostics only)."""
        self._read_counts()
        return self._clipped

    @property
    def unclipped(self) -> dict[str, int]:
        """Per parameter: examples with ‖g_i,p‖ within its threshold (flat: the whole norm) — private,
        to be noised before use (adaptive clipping's count, Andrew et al. 2021)."""
        self._read_counts()
        return self._unclipped

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.batch_size if self.batch_size else float("nan")


def auto_chunk_size(params, budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Examples per chunk so that one chunk's per-example gradients fit in ``budget_bytes``."""
    per_example = sum(p.numel() * p.element_size() for p in params)
    return max(1, budget_bytes // max(per_example, 1))


def clip_and_sum(model: nn.Module, loss_fn: LossFn, inputs: Inputs, targets: torch.Tensor,
                 config: ClippingConfig | float, chunk_size: int | None = None,
                 method: str = "auto", plan: "Plan | None" = None) -> ClippedBatch:
    """Clipped sum of per-example gradients over a batch, chunk by chunk.

    Memory is bounded by ``chunk_size`` examples' gradients at a time, so a large logical
    batch runs as several physical chunks ("virtual steps") with the same result.
    ``method``: ``"auto"`` uses the book-keeping fast path (:mod:`dptrain.ghost`) when it
    covers the model and the torch.func engine otherwise; ``"fast"``, ``"vmap"``, ``"loop"``
    force one. ``plan``: the model's :func:`dptrain.ghost_plan.current_plan`, when the caller has
    just made it (saves a second look at the model's structure).
    """
    if not isinstance(config, ClippingConfig):
        config = ClippingConfig(float(config))
    if method in ("auto", "fast"):
        from .ghost import ghost_clip_and_sum

        fast = ghost_clip_and_sum(model, loss_fn, inputs, targets, config, chunk_size, plan)
        if fast is not None:
            return fast
        if method == "fast":
            raise ValueError("clip_and_sum(method='fast'): the book-keeping path does not cover this model "
                             "(a parameter used outside its own module's forward, e.g. nn.LSTM or a raw "
                             "nn.Parameter in a container's forward, or a layer whose rows are not the batch's "
                             "examples, e.g. time-major or a position table broadcast over the batch); "
                             "use method='auto'")
        method = "auto"
    params = trainable_parameters(model) if plan is None else plan.params
    if chunk_size is None:
        chunk_size = auto_chunk_size(params.values())
    sums = {k: torch.zeros_like(p) for k, p in params.items()}
    n, loss_sum, clipped = 0, 0.0, 0
    unclipped: dict[str, Count] = dict.fromkeys(sums, 0)
    losses_all = []
    for grads, losses in iter_per_sample_grads(model, loss_fn, inputs, targets, chunk_size, method):
        factors = clip_factors(grads, config)
        part = clipped_sum(grads, config, factors)
        for k in sums:  # counts stay on the device: read back once, when asked for
            sums[k] += part[k]
            unclipped[k] = unclipped[k] + (factors[k] >= 1).sum()
        losses_all.append(losses.detach().reshape(-1))
        n += int(losses.shape[0])
        loss_sum = loss_sum + losses.detach().sum()
        clipped = clipped + (torch.stack([f for f in factors.values()]).amin(0) < 1).sum()
    example_losses = torch.cat(losses_all) if losses_all else torch.zeros(0)
    return ClippedBatch(sums, n, loss_sum, clipped, unclipped, example_losses)
