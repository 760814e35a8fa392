"""Server-side aggregation: clipping of client updates, noise once, averaging, FedSVD.

DP-FedAvg (McMahan et al. 2018, Alg. 1, fixed-denominator estimator): with client updates
Δ_k, clip norm S, noise multiplier σ, client sampling rate p over K clients,

    Δ̄ = ( Σ_{k sampled} Δ_k · min(1, S / ‖Δ_k‖) + N(0, σ² S² I) ) / (p K),

one Gaussian mechanism of sensitivity S on a Poisson sample of clients per round.
Without client-level noise (example-level DP, or none) Δ̄ is the plain mean over the clients
that took part (their number is public).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from mechanisms import GaussianMechanism
from mechanisms.fedsvd import svd_refactor

from ..lora import LoRALinear
from .comm import LocalComm

_EPS = 1e-12


def clip_update(update: Mapping[str, torch.Tensor], max_norm: float) -> dict[str, torch.Tensor]:
    """Δ · min(1, S / ‖Δ‖₂), ‖·‖ over all tensors together (norm in float64); non-finite → 0."""
    sq = sum(torch.linalg.vector_norm(t, dtype=torch.float64) ** 2 for t in update.values())
    norm = float(torch.sqrt(torch.as_tensor(sq)))
    if not torch.isfinite(torch.tensor(norm)):
        return {k: torch.zeros_like(t) for k, t in update.items()}
    factor = min(1.0, max_norm / (norm + _EPS))
    return {k: t * factor for k, t in update.items()}


def server_noise(sums: Sequence[torch.Tensor], mechanism: GaussianMechanism | None, comm: LocalComm,
                 round_index: int) -> list[torch.Tensor]:
    """The (all-reduced) sum plus N(0, σ²S²) drawn on rank 0 only, then broadcast to every rank.

    Noise is added exactly once per round whatever the number of ranks (DESIGN.md invariant 3).
    """
    out = [s.clone() for s in sums]
    if mechanism is None or mechanism.noise_multiplier == 0:
        return out
    if comm.rank == 0:
        out = mechanism.privatize(out, round_index)
    comm.broadcast(out)
    return out


def fedsvd_refactor_model(model: nn.Module, comm: LocalComm) -> None:
    """Re-factorise every adapter (B, A) ← (U_r Σ_r, V_rᵀ) of B A (mechanisms.fedsvd); rank 0's wins."""
    for layer in model.modules():
        if isinstance(layer, LoRALinear):
            b, a = layer.lora_B.weight, layer.lora_A.weight
            new_b, new_a = svd_refactor(b.detach(), a.detach())
            with torch.no_grad():
                b.copy_(new_b)
                a.copy_(new_a)
            comm.broadcast([b.data, a.data])


def orthonormalize_adapters(model: nn.Module) -> None:
    """A = Rᵀ Qᵀ (QR of Aᵀ) → A' = Qᵀ (orthonormal rows, same row space), B' = B Rᵀ: B'A' = B A."""
    for layer in model.modules():
        if isinstance(layer, LoRALinear):
            b, a = layer.lora_B.weight, layer.lora_A.weight
            q, r = torch.linalg.qr(a.detach().double().T, mode="reduced")
            with torch.no_grad():
                b.copy_((b.detach().double() @ r.T).to(b))
                a.copy_(q.T.to(a))
