"""Rounding bounds of the book-keeping path's norms, and which examples they leave uncertain.

The fast path clips example i by f_i = min(1, C/Ñ_i), where Ñ_i is ‖G_i‖ computed in float32 from the
factors, and adds f_i G_i inside a fused product (L ⊙ f)ᵀR over the whole batch. Privacy needs the
contribution f_i‖G_i‖ ≤ C, i.e. Ñ_i not much below the norm of what the fused sum adds. Where G_i is a
sum of many per-token (per-position) pieces that cancel, float32 loses that: the T×T Gram trick
Σ_{t,s}(L_t·L_s)(R_t·R_s) of two token rows that cancel can come out as 0 for a true norm of 5, and
the example then enters the sum unclipped.

Bounds (Higham, "Accuracy and Stability of Numerical Algorithms", §3.1: a dot product of length n in
any order has error ≤ γ_n Σ|x_k y_k|, γ_n = nu/(1 − nu), u the unit roundoff), with n_t = ‖L_t‖,
m_t = ‖R_t‖ and the mass S_i = Σ_t n_t m_t ≥ ‖G_i‖ (triangle inequality):

* Gram trick, A = LLᵀ and B = RRᵀ in float32, |A − Ã| ≤ γ_o n nᵀ, |B − B̃| ≤ γ_i m mᵀ elementwise,
  Σ A∘B summed in float64 after one float32 product:
  |‖G‖² − Ñ²| ≤ γ_o nᵀ|B̃|n + γ_i mᵀ|Ã|m + 2γ_oγ_i S² + 2u nᵀ|B̃|n
  (weighting by the computed |B̃| keeps the bound near Ñ² when tokens do not cancel);
* the fused sum adds example i's T pieces with error ≤ γ_T S_i (its share of the batch product),
  a sum formed explicitly per example the same.

A squared-norm bound E_i gives ‖G_i‖ ≤ (Ñ_i² + E_i)^½ + γ_T S_i; :func:`fused` turns that into
one bound on ‖G_i‖² − Ñ_i². An example is *uncertain* when that bound exceeds TAU·max(Ñ_i², C²):
it is then recomputed in float64 (:mod:`dptrain.ghost_algebra`), where the same bound, added to the
norm, is tiny unless its pieces cancel to 1e-13. Certified examples contribute at most
C·(1 + TAU)^½ ≈ 1.004 C under worst-case float32 rounding (typical rounding is orders of magnitude
below the worst case: the norms then agree with the vmap engine's to float32 precision).
Terms whose per-example gradient is formed explicitly and summed as formed (Dense, a kept explicit
Outer or conv gradient) and single-token Outer terms (‖a‖‖b‖, no cancellation) have relative
errors only (≈ γ of a pairwise sum of squares, far below TAU) and carry no bound.

Not covered: the rounding of the batch sum itself across examples (Σ_i f_i G_i in float32), which
every float32 DP-SGD implementation shares.
"""
from __future__ import annotations

import math

import torch

#: an example whose rounding bound exceeds TAU·max(Ñ², C²) is recomputed in float64
TAU = 2.0 ** -7
#: relative error allowance of float32 sums of non-negative terms (norms, masses): pairwise sums of up to 2^60 terms
_REL = 64 * 2.0 ** -24


def unit(dtype: torch.dtype) -> float:
    """Unit roundoff of the arithmetic for factors of ``dtype`` (narrow factors accumulate in float32)."""
    return 2.0 ** -53 if dtype == torch.float64 else 2.0 ** -24


def gamma(n: int, u: float) -> float:
    """γ_n = nu / (1 − nu); inf when nu ≥ 1/2 (no useful bound)."""
    nu = n * u
    return nu / (1.0 - nu) if nu < 0.5 else math.inf


def fused(sq: torch.Tensor, mass: torch.Tensor, n: int, u: float, sq_err: torch.Tensor | None = None
          ) -> torch.Tensor:
    """Bound on ‖G‖² − Ñ² (float64 [B]) for a computed Ñ² = ``sq``, a squared-norm error ``sq_err`` and a
    norm error γ_n·``mass`` (the fused sum's, or an explicit sum's): ((Ñ²(1+rel) + E)^½ + γ_n S)² − Ñ²."""
    inner = sq * (1.0 + _REL) if sq_err is None else sq * (1.0 + _REL) + sq_err
    return (inner.sqrt() + gamma(n, u) * mass * (1.0 + _REL)).square() - sq


def gram(gl: torch.Tensor, gr: torch.Tensor, nl: torch.Tensor, nr: torch.Tensor, o: int, i: int, u: float
         ) -> torch.Tensor:
    """The Gram trick's squared-norm error bound per row of [n, T, T] Gram matrices ``gl`` = LLᵀ, ``gr`` = RRᵀ
    and [n, T] token norms ``nl``, ``nr`` (float64 [n]; see the module docstring)."""
    g_o, g_i = gamma(o, u), gamma(i, u)
    q_l = (torch.bmm(gr.abs(), nl.unsqueeze(2)).squeeze(2) * nl).sum(1).double()
    q_r = (torch.bmm(gl.abs(), nr.unsqueeze(2)).squeeze(2) * nr).sum(1).double()
    s = (nl * nr).sum(1).double()
    return ((g_o + 2 * u) * q_l + g_i * q_r + 2 * g_o * g_i * s.square()) * (1.0 + _REL)


def uncertain(sq: torch.Tensor, bound: torch.Tensor, c: float) -> torch.Tensor:
    """Examples whose bound leaves the clipped contribution above C·(1 + TAU)^½ possible (bool [B]);
    a non-finite bound is uncertain, a non-finite norm is handled by the caller."""
    return ~(bound <= TAU * torch.clamp(sq, min=c * c))
