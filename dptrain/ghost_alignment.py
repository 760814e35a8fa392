"""Are the rows of every recorded output the batch's examples? A check of the book-keeping path.

The ghost rules read row r (dim 0) of a recorded layer's input and output gradient as example r's.
A layer whose first dimension only happens to equal the batch size breaks that silently: a
learned position table looked up with ``arange(S)`` and broadcast over the batch, a time-major
``[S, B, E]`` Linear (``nn.TransformerEncoderLayer(batch_first=False)``) when S = B, rows permuted
inside ``forward``. Row r then mixes several examples, and clipping it does not bound any one
example's influence.

Check (once per model structure and input signature — shapes, dtypes, device, training flag,
autocast — since the row structure of a forward is a function of those): with distinct
per-example weights w_i, the gradient of Σ_i w_i ℓ_i at each recorded output must equal the
gradient of Σ_i ℓ_i with row r scaled by w_r. If rows are examples (ℓ_i depends on row i of each
recorded output only) the two agree; a row fed by several examples, or by another example,
gets a different weight. The weights are powers of two, so in exact row-wise arithmetic the two
are equal to the last bit (a product or a sum scaled by 2^k rounds like the unscaled one);
the tolerance covers reductions that run in a different order (CUDA atomics). Two summaries
per row are compared (max |g_r| and Σ |g_r|), so the weighted gradients are freed before the
main backward: the check costs one more backward, not more peak memory.

Assumption: a forward's row structure is the same for all batches with one signature (no
data-dependent permutation of examples inside ``forward``); the attach probe of
:class:`dptrain.private.PrivateTraining` compares the batched pass against per-example runs.
"""
from __future__ import annotations

import weakref
from typing import Sequence

import torch
from torch import nn

#: weights 2^k, k = 0 … LEVELS − 1 (any two rows in a batch of two or more get different weights)
LEVELS = 8
#: largest relative deviation allowed between a row summary of the weighted gradient and the scaled plain one
RTOL = 1e-3
#: verdicts kept per model before the oldest are forgotten (re-checked when next seen)
MAX_SIGNATURES = 4096

_VERDICTS: "weakref.WeakKeyDictionary[nn.Module, tuple[object, dict[tuple, bool]]]" = weakref.WeakKeyDictionary()


def signature(model: nn.Module, xs: Sequence[torch.Tensor], y: torch.Tensor) -> tuple:
    """What a forward's row structure may depend on besides the model's structure."""
    device = xs[0].device.type if xs else y.device.type
    return (tuple((tuple(x.shape), x.dtype, x.device) for x in xs), tuple(y.shape), y.dtype, model.training,
            torch.is_autocast_enabled(device))


def verdict(model: nn.Module, plan: object, key: tuple) -> bool | None:
    """The stored result of the check for ``key`` under ``plan`` (None: not checked yet)."""
    hit = _VERDICTS.get(model)
    if hit is None or hit[0] is not plan:
        return None
    return hit[1].get(key)


def remember(model: nn.Module, plan: object, key: tuple, ok: bool) -> None:
    hit = _VERDICTS.get(model)
    if hit is None or hit[0] is not plan:
        hit = _VERDICTS[model] = (plan, {})
    table = hit[1]
    if len(table) >= MAX_SIGNATURES:
        table.pop(next(iter(table)))
    table[key] = ok


def example_weights(b: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """w_i = 2^{σ(i) mod LEVELS} for a random permutation σ (fixed seed: the same weights every run)."""
    gen = torch.Generator().manual_seed(b)
    k = torch.randperm(b, generator=gen) % LEVELS
    return torch.pow(2.0, k.to(torch.float64)).to(device=device, dtype=dtype)


def row_summaries(g: torch.Tensor | None, b: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(max |g_r|, Σ |g_r|) per row r of a batch-sized gradient (float32), or None for other shapes.

    Both scale exactly with a power-of-two factor on the row (same reduction order, no rounding of a
    scaled product), and both change when a row takes in another example's weight.
    """
    if g is None or g.dim() == 0 or g.shape[0] != b:
        return None
    rows = g.reshape(b, -1).abs().float()
    return rows.amax(1), rows.sum(1)


def weighted_summaries(losses: torch.Tensor, w: torch.Tensor, wrt: list, b: int) -> list:
    """:func:`row_summaries` of ∂(Σ_i w_i ℓ_i)/∂ each of ``wrt`` (tensors or gradient edges), keeping the
    graph for the main backward. Only the summaries are kept, so the check adds no gradient-sized memory
    to the step's peak (the weighted gradients are freed before the main backward forms its own)."""
    shaped = w.view(-1, *[1] * (losses.dim() - 1)) if losses.dim() > 1 else w
    grads = torch.autograd.grad((losses * shaped).sum(), wrt, allow_unused=True, retain_graph=True)
    return [row_summaries(g, b) for g in grads]


def rows_are_examples(plain: Sequence[torch.Tensor | None], weighted: Sequence, w: torch.Tensor,
                      b: int) -> bool | None:
    """True if every weighted gradient's row summaries are its plain gradient's scaled by w_r (within RTOL),
    False if one is not. Rows with a non-finite summary (an example whose gradient is not finite) are
    left out if they are the same rows in both; None (inconclusive) if they are not, or if no row is finite.

    ``weighted``: per output, :func:`row_summaries` of the weighted gradient (None: no gradient, or not
    batch-sized). Outputs whose plain gradient is not batch-sized are skipped: the ghost rules refuse them.
    """
    wf = w.float()
    for g, sw in zip(plain, weighted):
        sp = row_summaries(g, b)
        if sp is None:  # no gradient (then none with weights either), or not batch-sized
            if g is None and sw is not None:
                return False
            continue
        if sw is None:
            return False
        want = torch.stack([s * wf for s in sp], 1)  # [b, 2]
        got = torch.stack(list(sw), 1)
        finite = torch.isfinite(want).all(1)
        if not bool(torch.equal(finite, torch.isfinite(got).all(1))):
            return None  # e.g. a huge row that overflowed when scaled
        if not bool(finite.all()):  # an example's non-finite gradient: compare the other rows
            if not bool(finite.any()):
                return None
            want, got = want[finite], got[finite]
        if not bool(((got - want).abs() <= RTOL * want.abs()).all()):
            return False
    return True
