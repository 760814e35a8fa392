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

Each term k gives ‖G_k‖ ≤ (Ñ_k² + E_k)^½ + c_k (c_k = γ_T S_k); :class:`Bound` collects Σ E_k and
Σ c_k² over the terms of all parameters and :func:`excess` turns them into one bound on
‖G_i‖² − Ñ_i² (Cauchy–Schwarz over the terms). An example is *uncertain* when that bound exceeds TAU·max(Ñ_i², C²):
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
from dataclasses import dataclass, field

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


@dataclass
class Bound:
    """Error pieces of a sum of squared norms Ñ² = Σ_k Ñ_k² (terms k of one or several parameters), float64 [B]:
    ``sq_err`` = Σ_k E_k (errors on squared norms, ‖G_k‖² ≤ Ñ_k² + E_k) and ``norm_err2`` = Σ_k c_k²
    (errors on norms: what the fused sum adds differs from G_k by at most c_k). Accumulated in place;
    Gram terms leave their raw sums q = (nᵀ|B̃|n, mᵀ|Ã|m, S) [3, B] with their coefficients in ``grams``,
    weighted in one product for all of them by :func:`excess` (a handful of tensor operations per clipping
    pass, not per layer: on a GPU the per-layer launches are what a step would wait for)."""

    sq_err: torch.Tensor | None = None
    norm_err2: torch.Tensor | None = None
    grams: list = field(default_factory=list)  # [(q [3, B] float32, (a, b, c, d))]: E = a q0 + b q1 + c q2², c² = d q2²

    def add_sq(self, e: torch.Tensor) -> None:
        self.sq_err = e if self.sq_err is None else self.sq_err.add_(e)

    def add_norm(self, c: torch.Tensor, scale: float) -> None:
        """A norm error of ``scale``·``c``."""
        c2 = c.square().mul_(scale * scale)
        self.norm_err2 = c2 if self.norm_err2 is None else self.norm_err2.add_(c2)

    def merge(self, other: "Bound | None") -> "Bound":
        """Add ``other``'s pieces (``other`` is not used afterwards: its tensors may be taken over)."""
        if other is not None:
            if other.sq_err is not None:
                self.add_sq(other.sq_err)
            if other.norm_err2 is not None:
                self.norm_err2 = other.norm_err2 if self.norm_err2 is None else self.norm_err2.add_(other.norm_err2)
            self.grams += other.grams
        return self

    def scale_norm(self, k: float) -> "Bound":
        """Multiply the norm errors' squares by ``k`` (k = 2 for two terms of one parameter: their errors
        add on one gradient, (c_1 + c_2)² ≤ 2(c_1² + c_2²), where Cauchy–Schwarz across parameters would
        take c_1² + c_2²)."""
        if self.norm_err2 is not None:
            self.norm_err2 = self.norm_err2 * k
        self.grams = [(q, (a, b, c, d * k)) for q, (a, b, c, d) in self.grams]
        return self

    def empty(self) -> bool:
        return self.sq_err is None and self.norm_err2 is None and not self.grams


#: coefficient matrices of :func:`excess` by (device, coefficients): made once, not copied to the device every step
_COEFFICIENTS: dict[tuple, torch.Tensor] = {}


def _coefficients(coefs: tuple, device: torch.device) -> torch.Tensor:
    key = (str(device), coefs)
    hit = _COEFFICIENTS.get(key)
    if hit is None:
        if len(_COEFFICIENTS) > 256:
            _COEFFICIENTS.clear()
        hit = _COEFFICIENTS[key] = torch.tensor(coefs, dtype=torch.float64, device=device)  # [K, 4]
    return hit


def _gram_pieces(bound: Bound) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_k E_k and Σ_k c_k² (float64 [B]) of the Gram terms in ``bound.grams``."""
    q = torch.stack([g[0] for g in bound.grams]).double()  # [K, 3, B]
    w = _coefficients(tuple(g[1] for g in bound.grams), q.device)  # [K, 4]
    s2 = q[:, 2].square()  # [K, B]
    e = torch.einsum("kj,kjb->b", w[:, :2], q[:, :2]) + torch.einsum("k,kb->b", w[:, 2], s2)
    return e, torch.einsum("k,kb->b", w[:, 3], s2)


def excess(sq: torch.Tensor, bound: Bound) -> torch.Tensor:
    """Upper bound on ‖G‖² − Ñ² (float64 [B]) for ‖G_k‖ ≤ (Ñ_k² + E_k)^½ + c_k per term:
    Σ_k ((Ñ_k² + E_k)^½ + c_k)² ≤ Ñ² + E + 2 (Σc_k²)^½ (Ñ² + E)^½ + Σc_k² (Cauchy–Schwarz), E = Σ_k E_k,
    with the relative error of the float32 sums of squares (_REL) on Ñ²."""
    sq_err, norm_err2 = bound.sq_err, bound.norm_err2
    if bound.grams:
        e, c2 = _gram_pieces(bound)
        sq_err = e if sq_err is None else sq_err + e
        norm_err2 = c2 if norm_err2 is None else norm_err2 + c2
    inner = sq * (1.0 + _REL) if sq_err is None else sq * (1.0 + _REL) + sq_err
    out = inner - sq
    if norm_err2 is not None:
        out = out + 2.0 * (norm_err2 * inner).sqrt() + norm_err2
    return out


def gram(gl: torch.Tensor, gr: torch.Tensor, groups: int) -> torch.Tensor:
    """The Gram trick's raw sums q = (nᵀ|B̃|n, mᵀ|Ã|m, S = Σ_t n_t m_t) per example, [3, n] float32, for
    [n·G, T, T] Gram matrices ``gl`` = LLᵀ, ``gr`` = RRᵀ; :func:`gram_coefficients` weights them.

    The token norms n_t, m_t come from the diagonals (‖L_t‖² computed as a sum of o squares): no further
    pass over the factors."""
    both = torch.stack([gr, gl])  # [2, n, T, T]: both sides in one set of operations (fewer launches)
    norms = both.diagonal(dim1=2, dim2=3).sqrt()  # [2, n, T]: (m, n); sums of squares, never negative
    w = norms.flip(0)  # |B̃| is weighted by n, |Ã| by m
    weighted = both.abs_().mul_(w.unsqueeze(3)).mul_(w.unsqueeze(2)).sum((2, 3))  # [2, n]: nᵀ|B̃|n, mᵀ|Ã|m
    q = torch.cat([weighted, norms.prod(0).sum(1, keepdim=True).T])
    return q.reshape(3, -1, groups).sum(2) if groups > 1 else q


def gram_coefficients(o: int, i: int, t: int, u: float) -> tuple[float, float, float, float]:
    """(a, b, c, d) with E = a q0 + b q1 + c q2² and c_k² = d q2² (see the module docstring):
    E = (γ_o + 2u) nᵀ|B̃|n + γ_i mᵀ|Ã|m + 2γ_oγ_i S², and the fused sum's γ_T S. The diagonal norms'
    relative error (≤ γ_o, γ_i on the squares) widens them by (1 + γ), folded in here, and the float32
    sums of q by (1 + _REL)."""
    g_o, g_i = gamma(o, u), gamma(i, u)
    w_o, w_i, r = (1.0 + g_o) ** 2, (1.0 + g_i) ** 2, (1.0 + _REL) ** 2
    c = gamma(t, u) * (1.0 + g_o) * (1.0 + g_i) * (1.0 + _REL)
    return ((g_o + 2 * u) * w_o * r, g_i * w_i * r, 2 * g_o * g_i * w_o * w_i * r, c * c)


def uncertain(sq: torch.Tensor, bound: Bound, c: float) -> torch.Tensor:
    """Examples whose bound leaves the clipped contribution above C·(1 + TAU)^½ possible (bool [B]);
    a non-finite bound is uncertain, a non-finite norm is handled by the caller."""
    return ~(excess(sq, bound) <= TAU * torch.clamp(sq, min=c * c))
