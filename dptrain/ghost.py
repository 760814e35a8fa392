"""Ghost / book-keeping clipping: the clipped gradient sum without per-example gradients.

One forward with a recording hook on every module that owns trainable parameters (registered, or called
from a forward set on the instance for the call where torch would run no hook: :class:`Recorder`) records its
inputs a; per-example losses ℓ_i = loss_fn(out_i[None], y_i[None]) are computed exactly (vmap,
no assumption on the loss reduction) and one backward of Σ_i ℓ_i to the recorded module outputs
gives b_i = ∂ℓ_i/∂out_i (example i's loss depends on out_i only). Per parameter the per-example
gradient is then known in factored form (:mod:`dptrain.ghost_layers`): Linear / Conv via
(b, a) outer products, Embedding via sparse rows, norm layers in closed form,
nn.MultiheadAttention through its four projections (:mod:`dptrain.ghost_attention`), and any
other module by vmap(vjp) of that module alone. Flat clipping uses ‖g_i‖² = Σ_params ‖g_i,p‖²
(Goodfellow 2015; Li et al. 2022; Bu et al. 2023), factors f_i = min(1, C/(‖g_i‖ + 1e-6)) as in
:func:`dptrain.clipping.clip_factors`, and the sum Σ_i f_i g_i is formed layer by layer.

Privacy assumption (as for the vmap engine): example i's gradient depends on (x_i, y_i) and
the parameters only. The path refuses (returns ``None``) whenever it cannot prove that the
recorded calls cover every use of every trainable parameter: the autograd graph is walked and a
parameter reached outside its own module's recorded forward (a weight used functionally
elsewhere, a MultiheadAttention subclass with its own forward) makes the whole model fall back to the vmap engine.
The rules also read row r of every recorded tensor as example r's; on the first batch of each input
signature :mod:`dptrain.ghost_alignment` checks that with one more backward (a position table
broadcast over the batch, or a time-major layer whose length equals the batch size, is refused).
"""
from __future__ import annotations

import contextlib
import math
import weakref
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap
from torch.utils._pytree import tree_leaves, tree_map

from . import ghost_algebra as ga
from . import ghost_alignment as gal
from . import ghost_layers as gl
from . import ghost_rows
from . import ghost_precision as gp
from . import ghost_rounding as gr_
from .ghost_attention import attention_terms
from .ghost_bag import embedding_bag_terms
from .ghost_graph import Call, Output, Recorder, covered
from .ghost_plan import Plan, current_plan
from .clipping import ClippedBatch, ClippingConfig, _factor
from .engine import Inputs, LossFn, WeightedPositionMean, example_loss_fn, iter_chunks

#: models found to modify a recorded tensor in place: record copies for them
_NEEDS_COPIES: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def _float32(device_type: str) -> contextlib.AbstractContextManager:
    """The norm / sum algebra in true float32: autocast off, and float32 matrix products and convolutions
    without TF32 or bf16 passes (``torch.set_float32_matmul_precision('high')``, cuDNN's TF32 default), whose
    10-bit mantissa would void the rounding bounds of :mod:`dptrain.ghost_rounding` (unit roundoff 2⁻²⁴).
    The user's settings are restored afterwards; the model's own forward and backward keep them. Off CUDA,
    with the default precision and no autocast, there is nothing to change (a shared no-op context)."""
    if device_type != "cuda" and torch.get_float32_matmul_precision() == "highest" \
            and not torch.is_autocast_enabled(device_type):
        return _NOTHING_TO_CHANGE
    return _float32_settings(device_type)


_NOTHING_TO_CHANGE = contextlib.nullcontext()


@contextlib.contextmanager
def _float32_settings(device_type: str) -> Iterator[None]:
    """:func:`_float32` where a setting has to change."""
    precision, cudnn_tf32 = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    autocast = torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) \
        else contextlib.nullcontext()
    try:
        if precision != "highest":
            torch.set_float32_matmul_precision("highest")
        if cudnn_tf32 and device_type == "cuda":
            torch.backends.cudnn.allow_tf32 = False
        with autocast:
            yield
    finally:
        if precision != "highest":
            torch.set_float32_matmul_precision(precision)
        torch.backends.cudnn.allow_tf32 = cudnn_tf32


def per_example_losses(loss_fn: LossFn, output: Any, y: torch.Tensor) -> torch.Tensor:
    """ℓ_i = loss_fn(out_i[None], y_i[None]) for every i: vmap over the batch, no assumption on the reduction.

    nn.CrossEntropyLoss on [B, C] logits and class indices is evaluated directly with reduction='none'
    (the same numbers, without vmap's overhead): a batch of one has mean = sum = its own loss, except
    that 'mean' over an ignored target is 0/0 = NaN (its gradient is 0 either way). Class weights are
    kept (ℓ_i = w_{y_i}·ℓ, :func:`dptrain.engine.example_loss_fn`).
    """
    losses, undefined = _losses_and_undefined(loss_fn, output, y)
    return losses if undefined is None else torch.where(undefined, float("nan"), losses)


def _losses_and_undefined(loss_fn: LossFn, output: Any, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`per_example_losses` in two parts: the losses with the gradients they have (an ignored target's
    is 0, and its loss here 0), and the rows whose loss is 0/0 = NaN (None if none can be): marking them
    after the backward spares the graph a ``where`` (two operators a step)."""
    loss_fn = example_loss_fn(loss_fn)
    base = loss_fn.loss_fn if isinstance(loss_fn, WeightedPositionMean) else loss_fn
    if (type(base) is nn.CrossEntropyLoss and base.reduction in ("mean", "sum")
            and isinstance(output, torch.Tensor) and output.dim() == 2 and y.dim() == 1 and not y.is_floating_point()):
        losses = F.cross_entropy(output, y, weight=base.weight, reduction="none", ignore_index=base.ignore_index,
                                 label_smoothing=base.label_smoothing)
        # an ignored target under 'mean': 0/0 = NaN (gradient 0, as the batch of one's)
        return losses, (y == base.ignore_index) if base.reduction == "mean" and base.weight is None else None
    return vmap(lambda o, t: loss_fn(tree_map(lambda v: v.unsqueeze(0), o), t.unsqueeze(0)))(output, y), None


def _chunk_terms(model: nn.Module, plan: Plan, loss_fn: LossFn, xs: tuple[torch.Tensor, ...], y: torch.Tensor,
                 copies: bool) -> tuple[dict[int, list], torch.Tensor] | None | str:
    """Terms per trainable parameter (keyed by id) and per-example losses; 'copy' to rerun with copies."""
    owners, kinds = plan.owners, plan.kinds
    with Recorder(owners, kinds, copies, None if plan.replicated else plan.exact) as rec:
        output = model(*xs)
    b = int(y.shape[0])
    leaves = (output,) if type(output) is torch.Tensor else tree_leaves(output)
    if not all(isinstance(t, torch.Tensor) and t.dim() > 0 and int(t.shape[0]) == b for t in leaves):
        return None  # a leaf that is not one row per example (an auxiliary scalar): vmap forms the losses
    losses, undefined = _losses_and_undefined(loss_fn, output, y)
    if rec.modified_in_place():
        return None if copies else "copy"
    if losses.grad_fn is None or not covered(losses, rec, plan.exact, plan.trainable):
        return None
    flat = [t for calls in rec.calls.values() for c in calls for t in c.outputs if t is not None]
    generic = {id(p): p for name in owners if kinds[name] == "generic" and rec.calls[name]
               for p in plan.own[name].values()}
    wrt = [t.edge if isinstance(t, Output) else t for t in flat]
    key = gal.signature(model, xs, y)
    ok = gal.verdict(model, plan, key)
    if ok is False:
        return None
    if ok is None:  # first batch of this signature: are the recorded rows the examples? (one more backward)
        w = gal.example_weights(b, losses.device, losses.dtype)
        weighted = gal.weighted_summaries(losses, w, wrt, b)
    # ∂(Σ_i ℓ_i)/∂· as the backward of the losses against ones (no sum in the graph)
    grads = torch.autograd.grad(losses, wrt + list(generic.values()), torch.ones_like(losses), allow_unused=True)
    if ok is None:
        ok = gal.rows_are_examples(grads[:len(flat)], weighted, w, b)
        del weighted
        if ok is not None:  # None: a non-finite gradient left it open; checked again next time
            gal.remember(model, plan, key, ok)
        if not ok:
            return None
    gmap = {id(t): g for t, g in zip(flat, grads)}
    terms: dict[int, list] = {}
    with _float32(xs[0].device.type):
        for name, calls in rec.calls.items():
            m, own = owners[name], plan.own[name]
            for c in calls:
                parts = _call_terms(m, kinds[name], list(own), c, [None if t is None else gmap[id(t)]
                                                                   for t in c.outputs], b)
                if parts is None or not own.keys() <= parts.keys():
                    return None
                for k, p in own.items():
                    if k in parts:
                        terms.setdefault(id(p), []).append(parts[k])
        for p, want in zip(generic.values(), grads[len(flat):]):
            if not _sums_to(terms.get(id(p), []), want, p, b):
                return None
    losses = losses.detach()
    return terms, losses if undefined is None else losses.masked_fill(undefined, float("nan"))


def _call_terms(m: nn.Module, kind: str, names: list[str], c: Call, cg: list, b: int
                ) -> dict[str, gl.Term] | None:
    """Factored per-example gradients of one recorded call (float32; float64 for a float64 model)."""
    if kind == "attention":
        return None if c.attention is None else attention_terms(m, c.attention, c.outputs, cg, b)
    if kind == "generic":
        per = gl.generic_grads(m, names, c.args, c.kwargs, c.outputs, cg, b)
        return None if per is None else {k: gl.Dense(gp.widen(v)) for k, v in per.items()}
    if not c.args or c.outputs[0] is None:
        return None
    out = c.outputs[0]
    g = cg[0] if cg[0] is not None else torch.zeros(out.shape, device=out.device)
    if kind == "linear" and gp.narrow(g):  # bf16 output: autocast multiplied bf16(a); bf16 factors, float32 algebra
        a = c.args[0]
        return None if a.dim() == 0 or a.shape[0] != b else gl.linear_terms(m, a.to(g.dtype), g)
    g = gp.widen(g)
    if kind == "embedding_bag":
        return embedding_bag_terms(m, c.args, c.kwargs, g, b)
    a = c.args[0]
    a = a if kind == "embedding" else gp.widen(a).to(g.dtype)
    if a.dim() == 0 or a.shape[0] != b:
        return None
    return _BUILDERS[kind](m, a, g)


_BUILDERS = {"linear": gl.linear_terms, "conv": gl.conv_terms, "embedding": ghost_rows.embedding_terms,
             "norm": gl.norm_terms}


def _sums_to(terms: list, want: torch.Tensor | None, p: torch.Tensor, b: int) -> bool:
    """Σ_i of the per-example gradients equals the batch gradient (guards the vmap(vjp) fallback)."""
    want = torch.zeros_like(p, dtype=torch.float32) if want is None else want.float()
    got = ga.clipped_sum(gl.merge(terms, p.shape), torch.ones(b, device=p.device), p.shape) if terms else 0 * want
    scale = float(want.abs().max()) if want.numel() else 0.0
    return bool(torch.allclose(got, want, rtol=1e-3, atol=1e-5 * scale + 1e-7))


def _run_chunk(model: nn.Module, plan: Plan, loss_fn: LossFn, xs: tuple[torch.Tensor, ...], y: torch.Tensor
               ) -> tuple[dict[str, list], torch.Tensor] | None:
    """Merged terms per trainable parameter name, and per-example losses; None if not covered."""
    copies = _NEEDS_COPIES.get(model, False)
    res = _chunk_terms(model, plan, loss_fn, xs, y, copies)
    if res == "copy":
        _NEEDS_COPIES[model] = True
        res = _chunk_terms(model, plan, loss_fn, xs, y, True)
    if res is None or isinstance(res, str):
        return None
    terms, losses = res
    with _float32(y.device.type):
        merged = {name: gl.merge(terms[id(p)], p.shape) for name, p in plan.params.items() if id(p) in terms}
    return merged, losses


def ghost_norms(model: nn.Module, loss_fn: LossFn, inputs: Inputs, targets: torch.Tensor
                ) -> dict[str, torch.Tensor] | None:
    """Per-example gradient norms ‖∇_p ℓ_i‖ (float64 [B]) per trainable parameter, or None if not covered."""
    plan = current_plan(model)
    if not plan.supported:
        return None
    xs, y = next(iter_chunks(inputs, targets, None))
    b = int(y.shape[0])
    zero = torch.zeros(b, dtype=torch.float64, device=y.device)
    if b == 0:
        return {k: zero for k in plan.params}
    res = _run_chunk(model, plan, loss_fn, xs, y)
    if res is None:
        return None
    with _float32(y.device.type):
        return {k: _refined_sq(res[0][k]).sqrt() if k in res[0] else zero for k in plan.params}


def _refined_sq(terms: list) -> torch.Tensor:
    """‖G_i‖² per example, in float64 where the float32 value is not finite or its rounding bound is not
    small against it (:mod:`dptrain.ghost_rounding`)."""
    sq, err = ga.sq_norms_bounded(terms)
    redo = ~torch.isfinite(sq) if err is None else ~torch.isfinite(sq) | gr_.uncertain(sq, err, 0.0)
    return ga.refine(terms, sq, redo)


def _check_thresholds(config: ClippingConfig, names) -> None:
    if config.thresholds is not None:
        missing = set(names) - set(config.thresholds)
        if missing:
            raise ValueError(f"per-layer clipping has no threshold for parameters {sorted(missing)}; "
                             "pass one threshold per trainable parameter or use flat clipping")


#: receives, per chunk and parameter, the factored per-example gradients and their clip factors
Sink = Callable[[str, list, torch.Tensor], None]


class DenseSums:
    """A :data:`Sink` adding each chunk's Σ_i f_i G_i into one dense tensor per parameter."""

    def __init__(self, params: dict[str, nn.Parameter]) -> None:
        self.params, self.sums, self.scaled = params, {}, ga.ScaledRows()

    def __call__(self, k: str, terms: list, f: torch.Tensor) -> None:
        part = ga.clipped_sum(terms, f, self.params[k].shape, self.scaled)
        self.sums[k] = part if k not in self.sums else self.sums[k] + part

    def result(self, names) -> dict[str, torch.Tensor]:
        """The sums of ``names`` in their parameters' dtype (zeros for a parameter no chunk reached)."""
        self.scaled = ga.ScaledRows()  # the last scaled factor is no longer needed
        out = {}
        for k in names:
            s, p = self.sums.get(k), self.params[k]
            out[k] = torch.zeros_like(p) if s is None else s if s.dtype == p.dtype else s.to(p.dtype)
        return out


class ChunkTotals:
    """What :func:`clip_chunks` adds up over the chunks besides the clipped sums.

    The clip counts are formed from the chunks' factors only when :meth:`count_tensors` is called,
    as device tensors that :class:`dptrain.clipping.ClippedBatch` reads back when first asked for.
    """

    def __init__(self, batch_size: int, loss_sum: float, factors: list[dict[str, torch.Tensor]],
                 config: ClippingConfig, names: list[str], example_losses: torch.Tensor) -> None:
        self.batch_size, self.loss_sum, self.example_losses = batch_size, loss_sum, example_losses
        self._factors, self._config, self._names = factors, config, names

    def count_tensors(self) -> tuple[torch.Tensor | int, dict[str, torch.Tensor | int]]:
        """(examples clipped, per parameter the examples not clipped) as device tensors (0-dim), no sync."""
        if not self._factors:
            return 0, dict.fromkeys(self._names, 0)
        per_chunk = [_counts(f, self._config) for f in self._factors]
        counts = sum(per_chunk[1:], per_chunk[0])
        if counts.dim() == 0:  # flat clipping: an example not clipped is not clipped in any parameter
            return counts, dict.fromkeys(self._names, self.batch_size - counts)
        return counts[0], dict(zip(self._names, counts[1:].unbind()))


def clip_chunks(model: nn.Module, plan: Plan, loss_fn: LossFn, inputs: Inputs, targets: torch.Tensor,
                config: ClippingConfig, sink: Sink, chunk_size: int | None = None) -> ChunkTotals | None:
    """The book-keeping loop: for each chunk and each parameter p, ``sink(p's name, terms, f)``.

    ``terms`` are p's per-example gradients G_i in factored form (:mod:`dptrain.ghost_layers`; an
    example with a non-finite gradient zeroed), ``f`` the clip factors f_i (flat or per-layer; float32,
    float64 for a float64 model; a second call per chunk for the examples recomputed in float64),
    so that the sink's Σ_i f_i G_i is the chunk's clipped sum. None if the record does not cover
    the model (nothing was handed to the sink for the failing chunk). One host synchronisation per
    chunk (is every norm finite? with the chunk's loss sum); the clip counts are formed from the kept
    factors only if :meth:`ChunkTotals.count_tensors` is called.
    """
    params = plan.params
    _check_thresholds(config, params)
    n, loss_sum, losses_all, chunk_factors = 0, 0.0, [], []
    for xs, y in iter_chunks(inputs, targets, chunk_size):
        b = int(y.shape[0])
        if b == 0:
            continue
        res = _run_chunk(model, plan, loss_fn, xs, y)
        if res is None:
            return None
        merged, losses = res
        with _float32(y.device.type):
            factors, redo, chunk_loss = _clip_factors(merged, params, config, b, losses)
            for k, terms in merged.items():
                if redo is None:
                    sink(k, terms, factors[k])
                    continue
                # examples recomputed in float64 (or dropped): their sum in float64, apart from the fused one
                sink(k, ga.drop_examples(terms, ~redo), factors[k])
                wide = redo & (factors[k] > 0)
                if bool(wide.any()):
                    sink(k, ga.select(terms, wide), factors[k][wide].double())
        n += b
        loss_sum += chunk_loss
        losses_all.append(losses if losses.dim() == 1 else losses.reshape(-1))  # detached
        chunk_factors.append(factors)
    losses = losses_all[0] if len(losses_all) == 1 else torch.cat(losses_all) if losses_all else torch.zeros(0)
    return ChunkTotals(n, loss_sum, chunk_factors, config, list(params), losses)


def _clip_factors(merged: dict[str, list], params: dict[str, nn.Parameter], config: ClippingConfig, b: int,
                  losses: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, float]:
    """Clip factors per parameter (float32 [b], computed in float64), the examples recomputed in float64
    (None if none), and Σ_i ℓ_i (read back with the finiteness flag and the count of uncertain norms: the
    chunk's one host synchronisation).

    Every squared norm finite and certain means every factor is positive and every term finite: the
    fused sums add every example. An example whose float32 norm is not finite (overflow, or a non-finite
    gradient) or whose rounding bound is not small against max(norm², C²) (:mod:`dptrain.ghost_rounding`)
    is recomputed from float64 factors and clipped by its float64 norm plus that bound; the caller sums
    it in float64 apart from the fused sums (or drops it: factor 0, a truly non-finite gradient).
    Narrow (bf16) factors add their rounding bound to the norm (:func:`dptrain.ghost_algebra.margins`).
    """
    def zero() -> torch.Tensor:  # made only where needed: the flat, finite path has no use for it
        return torch.zeros(b, dtype=torch.float64, device=losses.device)

    flat = config.thresholds is None
    if flat:  # only the total is needed: its norm at once where no term carries a rounding bound
        norm, total, err = ga.flat_norms(list(merged.values()), b, losses.device)
        unsure = None if err is None else gr_.uncertain(total, err, config.max_grad_norm)
    else:
        norm = None
        norms = ga.RowNorms()
        bounded = {k: ga.sq_norms_bounded(t, norms) for k, t in merged.items()}
        sq = {k: v[0] for k, v in bounded.items()}
        total = torch.stack(list(sq.values())).sum(0) if sq else zero()
        flags = [gr_.uncertain(s, e, config.thresholds[k]) for k, (s, e) in bounded.items() if e is not None]
        unsure = None if not flags else torch.stack(flags).any(0)
    # Σ_i of the (squared) norms is finite iff every one is (they are ≥ 0, NaN and inf propagate)
    probe = norm if total is None else total
    stats = [probe.sum(), losses.sum(dtype=torch.float64)] + ([] if unsure is None else [unsure.sum().double()])
    read = torch.stack(stats).tolist()
    finite, loss_sum = math.isfinite(read[0]), read[1]
    redo = None
    if not finite or (unsure is not None and read[2] > 0):
        redo = ~torch.isfinite(probe) if unsure is None else ~torch.isfinite(probe) | unsure
        if flat:  # the recomputed examples' totals; the others' stand
            total = norm.square() if total is None else total.clone()
            total[redo] = sum(ga.wide_sq(t, redo, bounded=True) for t in merged.values())
            norm = None
        else:
            sq = {k: ga.refine(t, sq[k], redo, bounded=True) for k, t in merged.items()}
        finite = False  # factors from recomputed norms: NaN → 0 below
    extra = {k: m for k, m in ((k, ga.margins(t)) for k, t in merged.items()) if m is not None}
    # factors in the dtype the sums are formed in: float64 for a model with float64 parameters
    fdt = torch.float64 if any(p.dtype == torch.float64 for p in params.values()) else torch.float32
    tiny = torch.finfo(fdt).tiny
    if flat:
        norm = torch.sqrt(total) if norm is None else norm
        for m in extra.values():
            norm = norm + m
        f = _factor(norm, config.max_grad_norm, finite, tiny).to(fdt)
        factors = dict.fromkeys(params, f)
    else:
        norm_of = {k: torch.sqrt(v) + extra[k] if k in extra else torch.sqrt(v) for k, v in sq.items()}
        factors = {k: _factor(norm_of[k] if k in norm_of else zero(), config.thresholds[k], finite, tiny).to(fdt)
                   for k in params}
    return factors, redo, loss_sum


def _counts(factors: dict[str, torch.Tensor], config: ClippingConfig) -> torch.Tensor:
    """Flat clipping: the examples clipped (0-dim); per-layer: [examples clipped, per parameter the examples
    not clipped] (int64, on the device)."""
    if not factors:
        return torch.zeros((), dtype=torch.long)
    if config.thresholds is None:
        return (next(iter(factors.values())) < 1).sum()
    stacked = torch.stack(list(factors.values()))
    return torch.cat([(stacked.amin(0) < 1).sum().reshape(1), (stacked >= 1).sum(1)])


def ghost_clip_and_sum(model: nn.Module, loss_fn: LossFn, inputs: Inputs, targets: torch.Tensor,
                       config: ClippingConfig | float, chunk_size: int | None = None, plan: Plan | None = None
                       ) -> ClippedBatch | None:
    """Σ_i clip(∇ℓ_i) as :func:`dptrain.clipping.clip_and_sum` returns it, or None if not covered.

    Same clip factors (flat or per-layer ``config.thresholds``), same sums; memory is that of
    a non-private step on ``chunk_size`` examples (the batch runs chunk by chunk). ``plan``: the
    model's :func:`~dptrain.ghost_plan.current_plan` if the caller has just made it.
    """
    if not isinstance(config, ClippingConfig):
        config = ClippingConfig(float(config))
    plan = current_plan(model) if plan is None else plan
    if not plan.supported:
        return None
    dense = DenseSums(plan.params)
    totals = clip_chunks(model, plan, loss_fn, inputs, targets, config, dense, chunk_size)
    if totals is None:
        return None
    return ClippedBatch(dense.result(plan.params), totals.batch_size, totals.loss_sum,
                        example_losses=totals.example_losses, count_fn=totals.count_tensors)  # counted if read
