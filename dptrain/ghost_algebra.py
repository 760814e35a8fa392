"""Algebra on the factored per-example gradients of :mod:`dptrain.ghost_layers`: norms, masking, clipped sums.

For the terms of one parameter (merged by :func:`dptrain.ghost_layers.merge`):

* :func:`sq_norms` — ‖G_i‖² per example without forming G_i where a factored form is cheaper:
  ‖a_i‖²‖b_i‖² for T = 1 (Goodfellow 2015), the T×T Gram trick Σ_{t,s}(L_it·L_is)(R_it·R_is) or the
  explicit L_iᵀR_i for sequences, whichever is cheaper (Li et al. 2022; Bu et al. 2023), conv
  per-example gradients by one grouped backward, embedding rows by their segment sums, and the exact
  cross term of an Outer + Rows pair (a tied embedding). float32 arithmetic (float64 for a float64 model),
  float64 results; :func:`sq_norms_bounded` adds each example's rounding bound
  (:mod:`dptrain.ghost_rounding`), and :func:`refine` recomputes in float64 an example whose float32 norm
  overflowed (so an exploding example is clipped, not dropped) or is uncertain (its pieces cancel).
* :func:`margins` — the rounding bound of the bf16 split sums, added to the norm (CUDA autocast).
* :func:`drop_examples` and :func:`clipped_sum` — Σ_i f_i G_i from the factors: (f ⊙ L)ᵀ R, an
  index_add of f-scaled rows, a conv weight gradient of f-scaled output grads, or Σ_i f_i P_i.

Privacy assumption: example i's factors depend on example i alone (``make_private`` checks the
batched pass against per-example runs on a probe batch), so with f_i = min(1, C/‖G_i‖) each
example's contribution to the sum is at most C (up to the rounding bound of
:mod:`dptrain.ghost_rounding`: C·(1 + 2⁻⁷)^½ under worst-case float32 rounding).
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch

from . import ghost_precision as gp
from . import ghost_rounding as gr_
from .ghost_layers import Conv, Dense, Outer, Term
from .ghost_precision import norm as _norm
from .ghost_precision import sq as _sq
from .ghost_rows import Rows
from .ghost_rows import ROWS_GRAM_MAX_T
from .ghost_rows import rows_sq as _rows_sq
from .ghost_rows import segment_sums as _segment_sums

#: element budget for intermediates ([B, T, T] Gram matrices or [B, o, i] explicit gradients)
_BLOCK_ELEMENTS = 1 << 24

# ---------------------------------------------------------------- norms


def _slices(batch: int, per_example: int):
    step = max(1, _BLOCK_ELEMENTS // max(per_example, 1))
    return [slice(s, s + step) for s in range(0, batch, step)]


def _layout(x: torch.Tensor) -> tuple:
    """What identifies a tensor's contents while the tensor is held: its memory and layout (a cache entry holds
    x, so its memory is not freed and reused by another tensor while the cache lives)."""
    return (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x.device)


class RowNorms:
    """‖x_i‖ per row of [B, n] tensors, each tensor's once per clipping pass: a Linear's bias
    gradient is its weight's left factor (the output gradient), so their norms are one computation."""

    def __init__(self) -> None:
        self._done: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # Keyed by :func:`_layout` (a temporary reshape copy cannot take a held tensor's key)
        key = _layout(x)
        hit = self._done.get(key)
        if hit is None:
            hit = self._done[key] = (x, _norm(x))
        return hit[1]


Bounded = tuple[torch.Tensor, "gr_.Bound | None"]


def _token_norms(x: torch.Tensor) -> torch.Tensor:
    """‖x_{b,g,t}‖ over the last dim, [B, G·T] (float32 arithmetic or wider)."""
    return torch.linalg.vector_norm(x, dim=3, dtype=gp.wide_dtype(x)).reshape(x.shape[0], -1)


def _mass(term: Outer) -> torch.Tensor:
    """S_i = Σ_{g,t} ‖L_igt‖‖R_igt‖ ≥ ‖G_i‖ (float64 [B])."""
    return (_token_norms(term.left) * _token_norms(term.right)).sum(1).double()


def _rows_mass(term: Rows) -> torch.Tensor:
    """S_i = Σ_t ‖R_it‖ ≥ ‖G_i‖ of a table's rows (float64 [B])."""
    b, t, d = term.right.shape
    return _norm(term.right.reshape(b * t, d)).reshape(b, t).sum(1).double()


def _outer_sq(term: Outer, norms: RowNorms, bound: bool = False) -> Bounded:
    """(‖G_i‖², its rounding bound or None: :mod:`dptrain.ghost_rounding`)."""
    left, right = term.left, term.right
    b, groups, t, o = left.shape
    i = right.shape[3]
    u = gr_.unit(left.dtype)
    if t == 1 and groups == 1:  # ‖a_i‖²‖b_i‖² (a float32 overflow of the product is refined like any other)
        return (norms(left.reshape(b, o)) * norms(right.reshape(b, i))).double().square(), None
    if t == 1:
        return (_sq(left, 2) * _sq(right, 2)).sum(1), None
    keep = b * groups * o * i <= _BLOCK_ELEMENTS
    if t * o * i * (1 if keep else 2) < t * t * (o + i):  # explicit L_iᵀR_i beats the T×T Gram trick
        parts = [gp.mm32(left[s].transpose(2, 3).reshape(-1, o, t), right[s].reshape(-1, t, i)).reshape(-1, groups, o, i)
                 for s in _slices(b, groups * o * i)]
        per = torch.cat(parts) if len(parts) > 1 else parts[0]
        sq = _sq(per)
        if keep:
            term.explicit = per  # reused by the clipped sum: the contribution is f_i times this very tensor
            return sq, None
        if not bound:
            return sq, None
        # the norm of a float32 sum over T, and the fused sum's own rounding: 2T terms' worth
        out_bound = gr_.Bound()
        out_bound.add_norm(_mass(term), gr_.gamma(2 * t, u))
        return sq, out_bound
    out, raw = [], []
    for s in _slices(b, groups * t * t):
        ls, rs = left[s].reshape(-1, t, o), right[s].reshape(-1, t, i)
        gl, gr = gp.mm32(ls, ls.transpose(1, 2)), gp.mm32(rs, rs.transpose(1, 2))  # [n·G, T, T]
        n = gl.shape[0] // groups
        out.append((gl * gr).reshape(n, -1).sum(1, dtype=torch.float64))  # Σ_{g,t,s} gl·gr per example
        if bound:  # token norms from the Gram diagonals: no further pass over the factors
            raw.append(gr_.gram(gl, gr, groups))
    sq = torch.cat(out).clamp_min(0.0)  # rounding can leave a negative value
    if not bound:
        return sq, None
    q = raw[0] if len(raw) == 1 else torch.cat(raw, 1)
    return sq, gr_.Bound(grams=[(q, gr_.gram_coefficients(o, i, t, u))])


def _conv_sq(term: Conv, bound: bool = False) -> Bounded:
    b, size = term.a.shape[0], term.weight_shape.numel()
    parts = [term.per_example(s) for s in _slices(b, size)]
    sq = torch.cat([_sq(p) for p in parts])
    if b * size <= _BLOCK_ELEMENTS:
        term.explicit = torch.cat(parts) if len(parts) > 1 else parts[0]
        return sq, None
    if not bound:
        return sq, None
    # Σ_p ‖g_p‖‖patch_p‖ ≤ ‖g_i‖·‖patches_i‖ ≤ ‖g_i‖‖a_i‖√k: an input entry is in at most k = Π kernel patches
    k = term.weight_shape[2:].numel()
    mass = (_norm(term.g.reshape(b, -1)).double() * _norm(term.a.reshape(b, -1)).double()) * math.sqrt(k)
    out = gr_.Bound()
    out.add_norm(mass, gr_.gamma(2 * term.g[0, 0].numel(), gr_.unit(term.g.dtype)))
    return sq, out


def _rows_bounded(term: Rows, bound: bool) -> Bounded:
    """:func:`dptrain.ghost_rows.rows_sq` and its bound: sums over the T reads (the norm's and the fused
    index_add's, 2T terms), plus for the Gram path the float32 dot products of length d over S². float64
    rows (a recomputation) take the segment sums: their error is γ_T S on the norm, not γ_d S² on its square."""
    wide = term.right.dtype == torch.float64
    gram_max_t = 2 if wide else ROWS_GRAM_MAX_T
    sq = _rows_sq(term, gram_max_t)
    b, t, d = term.right.shape
    if not bound or t == 1:
        return sq, None
    mass = _rows_mass(term)
    u = gr_.unit(term.right.dtype)
    out = gr_.Bound()
    if 2 < t <= gram_max_t:
        out.add_sq(gr_.gamma(d, u) * mass.square())
    out.add_norm(mass, gr_.gamma(2 * t, u))
    return sq, out


def _cross(outer: Outer, rows: Rows) -> torch.Tensor:
    """⟨Σ_t L_t R_tᵀ, Σ_s e_{idx_s} Q_sᵀ⟩ = Σ_{t,s} L_t[idx_s] (R_t·Q_s), per example."""
    left, right = outer.left[:, 0].float(), outer.right[:, 0].float()  # [B, T, V], [B, T, d]
    b, t = left.shape[:2]
    out = []
    for s in _slices(b, t * rows.idx.shape[1]):
        picked = left[s].gather(2, rows.idx[s].unsqueeze(1).expand(-1, t, -1))
        dots = torch.matmul(right[s], rows.right[s].transpose(1, 2))
        out.append((picked.double() * dots.double()).sum((1, 2)))
    return torch.cat(out)


def _select(term: Term, keep: torch.Tensor, dtype: torch.dtype) -> Term:
    """The examples ``keep`` of a term, cast to ``dtype``."""
    if isinstance(term, Outer):
        return Outer(term.left[keep].to(dtype), term.right[keep].to(dtype))
    if isinstance(term, Conv):
        return replace(term, a=term.a[keep].to(dtype), g=term.g[keep].to(dtype), explicit=None)
    if isinstance(term, Rows):
        return Rows(term.idx[keep], term.right[keep].to(dtype), term.num_rows)
    return Dense(term.grads[keep].to(dtype))


def sq_norms(terms: list[Term], norms: RowNorms | None = None) -> torch.Tensor:
    """‖Σ_terms G_i‖² per example (float64 result, float32 arithmetic) for merged terms; ``norms``
    shares row norms between the calls of one clipping pass."""
    return sq_norms_bounded(terms, norms, bound=False)[0]


def sq_norms_bounded(terms: list[Term], norms: RowNorms | None = None, bound: bool = True) -> Bounded:
    """:func:`sq_norms` and, with ``bound``, the pieces of a bound on ‖G_i‖² − (the computed value) that covers
    what the clipped sum adds for example i (:class:`dptrain.ghost_rounding.Bound`, combined by
    :func:`~dptrain.ghost_rounding.excess`; None where every term's error is relative only)."""
    norms = norms if norms is not None else RowNorms()
    total, err = None, gr_.Bound() if bound else None
    for term in terms:
        if isinstance(term, Outer):
            part, e = _outer_sq(term, norms, bound)
        elif isinstance(term, Conv):
            part, e = _conv_sq(term, bound)
        elif isinstance(term, Rows):
            part, e = _rows_bounded(term, bound)
        else:
            part, e = norms(term.grads.reshape(term.grads.shape[0], -1)).double().square(), None
        total = part if total is None else total + part
        if err is not None:
            err.merge(e if e is None or len(terms) == 1 else e.scale_norm(float(len(terms))))
    if len(terms) == 2:
        total = total + 2 * _cross(terms[0], terms[1])  # type: ignore[arg-type]
        if bound:  # dot products R_t·Q_s of length d, weighted by |L_t[idx_s]| ≤ ‖L_t‖: ≤ γ_d S_outer S_rows
            outer, rows = terms
            d = rows.right.shape[2]  # type: ignore[union-attr]
            err.add_sq(2 * gr_.gamma(d + 2, gr_.unit(rows.right.dtype)) * _mass(outer) * _rows_mass(rows))  # type: ignore
    assert total is not None
    if err is not None and err.empty():
        err = None  # relative errors only
    return total, err


def _is_single(terms: list[Term]) -> bool:
    """One product of row norms gives ‖G_i‖: a single Outer with T = 1 and one group, or a single Dense."""
    if len(terms) != 1:
        return False
    t = terms[0]
    if isinstance(t, Dense):
        return True
    if not isinstance(t, Outer):
        return False
    shape = t.left.shape
    return shape[1] == 1 and shape[2] == 1


def _single_norm(t: Term, norms: RowNorms) -> torch.Tensor:
    """‖G_i‖ (float32 [B]) of a term :func:`_is_single` accepts: ‖a_i‖‖b_i‖, or a Dense's row norms."""
    if isinstance(t, Dense):
        g = t.grads
        return norms(g if g.dim() == 2 else g.reshape(g.shape[0], -1))
    b = t.left.shape[0]  # type: ignore[union-attr]
    return norms(t.left.reshape(b, -1)) * norms(t.right.reshape(b, -1))  # type: ignore[union-attr]


def _row_norm(terms: list[Term], norms: RowNorms) -> torch.Tensor | None:
    """‖G_i‖ (float32 [B]) when one product of row norms gives it (:func:`_is_single`); else None."""
    return _single_norm(terms[0], norms) if _is_single(terms) else None


def total_sq_norms(params_terms: list[list[Term]], batch: int, device: torch.device) -> Bounded:
    """Σ_p ‖G_i,p‖² per example (float64 [B]) over several parameters' merged terms, and the sum of their
    rounding bounds (:func:`sq_norms_bounded`; None if no term has one): the single-factor ones
    (:func:`_row_norm`, relative errors only) stacked, widened and squared together, the others by
    :func:`sq_norms_bounded`."""
    norms = RowNorms()
    single, parts, err = [], [], None
    for terms in params_terms:
        n = _row_norm(terms, norms)
        if n is None:
            sq, e = sq_norms_bounded(terms, norms)
            parts.append(sq)
            err = e if err is None else err.merge(e)
        else:
            single.append(n)
    if single:
        parts.append(torch.stack(single).double().square().sum(0) if len(single) > 1 else single[0].double().square())
    if not parts:
        return torch.zeros(batch, dtype=torch.float64, device=device), err
    return (torch.stack(parts).sum(0) if len(parts) > 1 else parts[0]), err


def flat_norms(params_terms: list[list[Term]], batch: int, device: torch.device
               ) -> tuple[torch.Tensor | None, torch.Tensor | None, "gr_.Bound | None"]:
    """(‖G_i‖, ‖G_i‖², rounding bound) per example over several parameters' merged terms, for flat clipping.

    Where every parameter's norm is one product of row norms (:func:`_row_norm`: relative errors only, no
    bound to carry), the norm (Σ_p ‖G_i,p‖²)^½ comes from one float64 reduction of the stacked norms, and the
    squared total is None; otherwise the norm is None and the rest is :func:`total_sq_norms`'s."""
    if params_terms and all(_is_single(t) for t in params_terms):
        norms = RowNorms()
        stacked = torch.stack([_single_norm(t[0], norms) for t in params_terms], dim=1)  # [B, P]: rows contiguous
        return torch.linalg.vector_norm(stacked, dim=1, dtype=torch.float64), None, None
    total, err = total_sq_norms(params_terms, batch, device)
    return None, total, err


def _split_sum(t: Term) -> bool:
    """Whether :func:`clipped_sum` forms ``t``'s sum from narrow factors split in two
    (:func:`dptrain.ghost_precision.outer_sum`) — exactly the terms :func:`margins` covers."""
    return isinstance(t, Outer) and t.explicit is None and gp.narrow(t.left) and t.left.dtype == t.right.dtype


def margins(terms: list[Term]) -> torch.Tensor | None:
    """Per example (float64 [B]), the bound over f_i on the rounding error that :func:`clipped_sum` adds
    with narrow factors (:func:`dptrain.ghost_precision.margin`); None when it adds none.

    Call after :func:`sq_norms` (which may form the float32 per-example gradients instead).
    """
    total = None
    for t in terms:
        if type(t) is not Dense and _split_sum(t):
            part = gp.margin(t.left, t.right)
            total = part if total is None else total + part
    return total


def refine(terms: list[Term], sq: torch.Tensor, redo: torch.Tensor | None = None, bounded: bool = False
           ) -> torch.Tensor:
    """Recompute the entries ``redo`` (default: the non-finite ones) of :func:`sq_norms` from float64 copies
    of the factors; with ``bounded``, as ‖G̃_i‖² plus its float64 rounding bound (an upper bound on ‖G_i‖²,
    for clipping).

    An outlier whose float32 arithmetic overflows gets its true (finite) norm and is clipped, an example
    whose float32 norm is uncertain (:mod:`dptrain.ghost_rounding`) its float64 one; only truly non-finite
    gradients stay non-finite (and are then dropped).
    """
    bad = ~torch.isfinite(sq) if redo is None else redo
    if bool(bad.any()):
        sq = sq.clone()
        sq[bad] = wide_sq(terms, bad, bounded)
    return sq


def wide_sq(terms: list[Term], rows: torch.Tensor, bounded: bool = False) -> torch.Tensor:
    """‖G_i‖² of the examples ``rows`` (bool [B]) from float64 copies of the factors, float64 [rows.sum()];
    with ``bounded``, plus its float64 rounding bound (an upper bound on ‖G_i‖², for clipping)."""
    wide, err = sq_norms_bounded(select(terms, rows), bound=bounded)
    return wide if err is None else wide + gr_.excess(wide, err)


def select(terms: list[Term], keep: torch.Tensor) -> list[Term]:
    """The examples ``keep`` of each term, in float64 (their clipped sum then adds float64 rounding only)."""
    return [_select(t, keep, torch.float64) for t in terms]


# ---------------------------------------------------------------- masking and clipped sums


def _zero(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return torch.where(keep.view(-1, *[1] * (x.dim() - 1)), x, torch.zeros((), dtype=x.dtype, device=x.device))


def drop_examples(terms: list[Term], keep: torch.Tensor) -> list[Term]:
    """Zero the contribution of examples with ``keep[i] = False`` (non-finite gradients)."""
    out: list[Term] = []
    for t in terms:
        if isinstance(t, Outer):
            ex = None if t.explicit is None else _zero(t.explicit, keep)
            out.append(Outer(_zero(t.left, keep), _zero(t.right, keep), ex))
        elif isinstance(t, Conv):
            ex = None if t.explicit is None else _zero(t.explicit, keep)
            out.append(replace(t, a=_zero(t.a, keep), g=_zero(t.g, keep), explicit=ex))
        elif isinstance(t, Rows):
            out.append(replace(t, right=_zero(t.right, keep)))
        else:
            out.append(Dense(_zero(t.grads, keep)))
    return out


def _weighted_sum(f: torch.Tensor, per: torch.Tensor) -> torch.Tensor:
    """Σ_i f_i per[i] (flattened)."""
    per = per if per.dim() == 2 else per.reshape(per.shape[0], -1)
    return torch.mv(per.t(), f if f.dtype == per.dtype else f.to(per.dtype))


def _float(x: torch.Tensor) -> torch.Tensor:
    return gp.widen(x)


class ScaledRows:
    """The last f-scaled factor [B, n] that :func:`clipped_sum` formed (f_i x_i, rows of x scaled by f), kept for
    the next call: a Linear's bias gradient is its weight's left factor (the output gradient), so the bias's
    clipped sum Σ_i f_i g_i is the column sum of the rows the weight's sum scaled — cheaper than a
    matrix-vector product. The entry holds x and f, so their memory is not reused while it lives."""

    def __init__(self) -> None:
        #: (x's :func:`_layout`, x, f, f ⊙ x) of the last product kept
        self.entry: tuple[tuple, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def keep(self, x: torch.Tensor, f: torch.Tensor, scaled: torch.Tensor) -> None:
        self.entry = (_layout(x), x, f, scaled)

    def get(self, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor | None:
        """f ⊙ x if that was the last product kept (the same f object, x of the same :func:`_layout`), else None."""
        e = self.entry
        return e[3] if e is not None and e[2] is f and e[0] == _layout(x) else None


def clipped_sum(terms: list[Term], f: torch.Tensor, shape: torch.Size, scaled: ScaledRows | None = None
                ) -> torch.Tensor:
    """Σ_i f_i G_i without forming G_i (f: float32 [B]). ``scaled``: reuse of an f-scaled factor between calls
    (:class:`ScaledRows`)."""
    total = None
    for t in terms:
        if type(t) is Dense:
            hit = None if scaled is None or t.grads.dim() != 2 else scaled.get(t.grads, f)
            part = _weighted_sum(f, t.grads) if hit is None else hit.sum(0)
        elif isinstance(t, (Outer, Conv)) and t.explicit is not None:
            part = _weighted_sum(f, t.explicit)
        elif isinstance(t, Conv):
            part = t.weighted(f)
        elif _split_sum(t):
            part = gp.outer_sum(t.left, t.right, f)
        elif isinstance(t, Outer):
            left, right = _float(t.left), _float(t.right)
            b, groups, steps, o = left.shape
            i = right.shape[3]
            fs = f.unsqueeze(1) if steps == 1 else f.view(-1, 1, 1)  # scales [B, o] or [B, T, o]
            if groups == 1:  # [B·T, o]ᵀ [B·T, i], the smaller factor scaled
                left = left.reshape(b, o) if steps == 1 else left.reshape(b, steps, o)
                right = right.reshape(b, i) if steps == 1 else right.reshape(b, steps, i)
                if o <= i:
                    unscaled, left = left, left * fs
                    if scaled is not None and steps == 1:
                        scaled.keep(unscaled, f, left)
                else:
                    right = right * fs
                if steps > 1:
                    left, right = left.reshape(-1, o), right.reshape(-1, i)
                part = torch.mm(left.t(), right)
            else:
                if o <= i:  # scale the smaller factor
                    left = left * f.view(-1, 1, 1, 1)
                else:
                    right = right * f.view(-1, 1, 1, 1)
                part = torch.einsum("bgto,bgti->goi", left, right)
        elif isinstance(t, Rows):
            d = t.right.shape[2]
            part = _segment_sums((t.right * f.view(-1, 1, 1)).reshape(-1, d), t.idx.reshape(-1), t.num_rows)
        else:
            part = _weighted_sum(f, t.grads)
        part = part if part.shape == shape else part.reshape(shape)
        total = part if total is None else total + part
    assert total is not None
    return total
