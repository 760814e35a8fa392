"""Low-precision (bf16 / fp16 autocast) factors of the book-keeping path, without float32 copies.

Under autocast a Linear layer's input a and output gradient b are bf16; the per-example
gradient G_i = Σ_t b_it a_itᵀ is defined by those (exactly representable) values. Products of
two bf16 numbers are exact in float32, so a matrix product with bf16 inputs, float32
accumulation and a float32 result (``torch.mm(.., out_dtype=torch.float32)`` on CUDA: the tensor
cores at bf16 speed) gives the same norms as upcasting both operands first, which is what this
module does on devices without such a kernel (the float32 path, as before).

The clipped sum Σ_i f_i G_i needs one operand scaled by f_i. In float32, P = f ⊙ b; P is
split exactly as P = H + L + r with H = bf16(P), L = bf16(P − H) (P − H is exact in float32)
and |r| ≤ u²|P| elementwise, u = 2⁻⁸ the unit roundoff of bf16 (2⁻¹¹ for fp16: the bound
below uses u = 2⁻⁸ for both). Two narrow products Hᵀa + Lᵀa then give Σ_i f_i G_i + E with
example i's share of E bounded by ‖Σ_t r_it a_itᵀ‖_F ≤ u² f_i Σ_t ‖b_it‖‖a_it‖ =: u² f_i A_i.
The clip factor is therefore computed from ‖G_i‖ + u²A_i (:func:`margin`), so that the
contribution of every example stays within C (up to float32 accumulation, as on the float32
path). With u² = 2⁻¹⁶ the extra clipping is at most a factor 1 − 1.5·10⁻⁵·A_i/‖G_i‖.
"""
from __future__ import annotations

import torch

NARROW = (torch.bfloat16, torch.float16)
#: unit roundoff bound of the narrow formats (bf16: 2⁻⁸; fp16 has a smaller one)
_U = 2.0 ** -8
#: device types whose matrix products take narrow operands with a float32 result
LOW_PRECISION_DEVICES = {"cuda"}
_OUT_DTYPE_OK: dict[str, bool] = {}


def narrow(t: torch.Tensor) -> bool:
    """Whether ``t`` is kept narrow: bf16 (float32's exponent range: the split below neither
    overflows nor underflows where float32 would not) on a device with float32-result products."""
    return t.dtype == torch.bfloat16 and t.device.type in LOW_PRECISION_DEVICES


def mm32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b (2-D or batched 3-D) with float32 accumulation and result (float64 operands stay float64).

    Narrow operands on CUDA: the out_dtype overload of mm / bmm (no operand copies); elsewhere,
    or if that overload is missing, the operands are upcast (the same numbers).
    """
    if a.dtype in NARROW and b.dtype == a.dtype and a.device.type == "cuda" and _OUT_DTYPE_OK.get("cuda", True):
        try:
            return (torch.mm if a.dim() == 2 else torch.bmm)(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            _OUT_DTYPE_OK["cuda"] = False
    if a.dtype in NARROW or b.dtype in NARROW:
        return torch.matmul(a.float(), b.float())
    return torch.matmul(a, b)  # float32 / float64 (the float64 recomputation of overflowed norms) as they are


def split(p: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, L) in ``dtype`` with H + L = p + r, |r| ≤ u²|p| elementwise (p float32)."""
    hi = p.to(dtype)
    return hi, (p - hi.float()).to(dtype)


def outer_sum(left: torch.Tensor, right: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Σ_i f_i Σ_t left_it right_itᵀ per group, [G, o, i] float32, from narrow [B, G, T, ·] factors.

    The smaller side is scaled in float32 and split into two narrow parts (see the module
    docstring); the error is covered by :func:`margin`.
    """
    b, groups, t, o = left.shape
    i = right.shape[3]
    scale_left = o <= i
    side = left if scale_left else right
    hi, lo = split(side.float() * f.view(-1, 1, 1, 1), side.dtype)
    other = right if scale_left else left

    def flat(x: torch.Tensor) -> torch.Tensor:  # [G, B·T, ·]
        return x.transpose(0, 1).reshape(groups, b * t, x.shape[3])

    o_flat = flat(other)
    parts = [mm32(flat(h).transpose(1, 2), o_flat) for h in (hi, lo)]
    out = parts[0] + parts[1]  # [G, side, other]
    return out if scale_left else out.transpose(1, 2)


def margin(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """u² A_i = u² Σ_{g,t} ‖left_igt‖ ‖right_igt‖ (float64 [B]): the bound on the split's error over f_i."""
    a = torch.linalg.vector_norm(left, dim=3, dtype=torch.float32).double()
    r = torch.linalg.vector_norm(right, dim=3, dtype=torch.float32).double()
    return (a * r).sum((1, 2)) * (_U * _U) * (1 + 1e-6)


def widen(x: torch.Tensor) -> torch.Tensor:
    """x in float32 if it is narrower; float32 and float64 as they are (a float64 model's algebra stays float64)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def wide_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype :func:`widen` gives ``x``."""
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def sq(x: torch.Tensor, lead: int = 1) -> torch.Tensor:
    """Σ x² over all but the first ``lead`` dims (float32 arithmetic or wider, float64 result)."""
    dtype = torch.float32 if x.dtype in NARROW else None
    return torch.linalg.vector_norm(x.reshape(*x.shape[:lead], -1), dim=-1, dtype=dtype).double().square()


def norm(x: torch.Tensor) -> torch.Tensor:
    """‖x_i‖ per row of a [B, n] tensor (float32 arithmetic or wider)."""
    return torch.linalg.vector_norm(x, dim=1, dtype=torch.float32 if x.dtype in NARROW else None)
