"""FedSVD re-factorisation of a LoRA pair (Lee et al. 2025, "FedSVD: Adaptive Orthogonalization
for Private Federated Learning with LoRA", arXiv:2505.12805, Sec. 3).

After the server has averaged the clients' B (A was fixed during the round), it forms
M = B̄ A (out × in, rank ≤ r) and takes its SVD M = U Σ Vᵀ. The new pair is

    A' = V_rᵀ            (top-r right singular vectors: orthonormal rows, A' A'ᵀ = I_r)
    B' = U_r Σ_r         (the rest of the SVD),

so B' A' = M exactly (M has rank ≤ r) and the adapted model is unchanged by the
re-factorisation; only the parametrisation the next round's clients train (B) changes.

Computed without forming the out × in SVD: B = Q R (thin QR, Q out × r), R A = U' Σ Vᵀ
(an r × in SVD), U = Q U'. Cost O(r² (in + out)), in float64.

Privacy: the re-factorisation is post-processing of the privatized average of B; it adds
no privacy cost and no event.
"""
from __future__ import annotations

import torch


def svd_refactor(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B', A') with B' A' = B A, A' with orthonormal rows (top-r right singular vectors of B A).

    ``b``: out × r, ``a``: r × in, r ≤ min(out, in). Returned in the inputs' dtype and device.
    Singular values are in decreasing order (column j of B' has norm σ_j).
    """
    if b.dim() != 2 or a.dim() != 2 or b.shape[1] != a.shape[0]:
        raise ValueError(f"svd_refactor: need B (out × r) and A (r × in), got B {tuple(b.shape)}, A {tuple(a.shape)}")
    r = a.shape[0]
    if r > min(b.shape[0], a.shape[1]):
        raise ValueError(f"svd_refactor: rank r={r} exceeds min(out, in)={min(b.shape[0], a.shape[1])}")
    if not (torch.isfinite(b).all() and torch.isfinite(a).all()):
        raise ValueError("svd_refactor: B or A has non-finite entries; the round's update diverged "
                         "(lower the learning rate or the clip norm)")
    q, rr = torch.linalg.qr(b.double(), mode="reduced")  # q: out × r
    u, s, vh = torch.linalg.svd(rr @ a.double(), full_matrices=False)  # u: r × r, vh: r × in
    new_a = vh[:r]
    new_b = (q @ u[:, :r]) * s[:r]
    return new_b.to(b), new_a.to(a)
