"""Stream the rows of C⁻¹Z without ever holding an n × d noise matrix.

For lower-triangular C with ``bands`` diagonals, W = C⁻¹Z satisfies C W = Z, so row t is
    w_t = (z_t − Σ_{j=1}^{bands−1} C[t, t−j] · w_{t−j}) / C[t, t]
(forward substitution). Only the last bands − 1 outputs are needed: memory is
(bands − 1) × (model size) per parameter tensor, time O(bands × model size) per step.
C = I (one band) gives w_t = z_t, DP-SGD's noise; the full Toeplitz square root ("FFT
mechanism", bands = n) keeps every past output, O(t × model size) — that is the price of
its dense C⁻¹.

Randomness: z_t is drawn for all tensors at once by ``DeviceGenerators.randn_like`` (parallel
streams on the CPU), seeded like :class:`mechanisms.gaussian.GaussianMechanism`, so C = I
reproduces GaussianMechanism's noise bit for bit. The ring buffer has the tensors'
dtype (float32 models: float32 arithmetic).
"""
from __future__ import annotations

import hashlib
from typing import Any, Sequence

import torch

from ..rng import DeviceGenerators
from .strategies import Strategy


def strategy_fingerprint(strategy: Strategy) -> str:
    """Short hash of (n, coefficients): a checkpoint refuses to resume with a different C."""
    h = hashlib.sha256()
    h.update(str((strategy.n, strategy.coefficients.shape)).encode())
    h.update(strategy.coefficients.tobytes())
    return h.hexdigest()[:16]


class StreamingCorrelatedNoise:
    """Produces w_t = row t of C⁻¹Z for a list of parameter-shaped tensors, one step at a time."""

    def __init__(self, strategy: Strategy, seed: int | None = None) -> None:
        self.strategy = strategy
        self._rng = DeviceGenerators(seed)
        self.step = 0
        self.memory = min(strategy.bands, strategy.n) - 1  # past outputs kept
        self._buffers: list[torch.Tensor] | None = None  # per tensor: [memory, numel] ring

    @property
    def seed(self) -> int:
        return self._rng.seed

    def buffer_bytes(self) -> int:
        """Bytes held by the ring buffers (0 before the first step or for C = I)."""
        return sum(b.numel() * b.element_size() for b in self._buffers) if self._buffers else 0

    def _check_like(self, like: Sequence[torch.Tensor]) -> None:
        if self._buffers is None:
            if self.memory > 0:
                self._buffers = [torch.zeros((self.memory, t.numel()), dtype=t.dtype, device=t.device)
                                 for t in like]
            else:
                self._buffers = [torch.zeros((0, t.numel()), dtype=t.dtype, device=t.device) for t in like]
            return
        if len(like) != len(self._buffers) or any(
                b.shape[1] != t.numel() or b.dtype != t.dtype or b.device != t.device
                for b, t in zip(self._buffers, like)):
            raise ValueError(
                "StreamingCorrelatedNoise: the tensors changed between steps (count, size, dtype or device); "
                f"expected {[(b.shape[1], b.dtype, str(b.device)) for b in self._buffers]}. The correlated "
                "noise of one run must be drawn for the same parameters every step")

    @torch.no_grad()
    def next(self, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Noise rows w_t (shaped like ``like``) for the current step; advances the step."""
        t = self.step
        if t >= self.strategy.n:
            raise IndexError(f"StreamingCorrelatedNoise: the strategy {self.strategy.name!r} covers "
                             f"n = {self.strategy.n} steps and all were used; build a strategy for more steps")
        self._check_like(like)
        assert self._buffers is not None
        row = self.strategy.row(t)  # C[t, t], C[t, t−1], …
        m = self.memory
        used = min(t, m)  # ring slots holding outputs (all of them once the ring is full)
        weights = torch.zeros(used, dtype=torch.float64)
        if row.shape[0] > 1:  # ring position of w_{t−j} is (t − j) mod m; its weight is C[t, t−j]
            weights[(t - torch.arange(1, row.shape[0])) % m] = torch.from_numpy(row[1:].copy())
        cast: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        out = []
        for ref, buf, z in zip(like, self._buffers, self._rng.randn_like(like)):
            w = z.reshape(-1)
            if row.shape[0] > 1:
                key = (buf.device, buf.dtype)
                if key not in cast:
                    cast[key] = weights.to(device=buf.device, dtype=buf.dtype)
                w = w - cast[key] @ buf[:used]
            if row[0] != 1.0:
                w = w / float(row[0])
            if m > 0:
                buf[t % m] = w
            out.append(w.reshape(ref.shape))
        self.step += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "step": self.step, "strategy": strategy_fingerprint(self.strategy),
                "generators": self._rng.state_dict(),
                "buffers": None if self._buffers is None else [b.clone() for b in self._buffers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        fp = strategy_fingerprint(self.strategy)
        if state["strategy"] != fp:
            raise ValueError(f"StreamingCorrelatedNoise: the checkpoint was made with strategy {state['strategy']}, "
                             f"this stream uses {fp} ({self.strategy.name!r}); rebuild the same strategy "
                             "(n, bands, coefficients) before resuming")
        self._rng.load_state_dict(state["seed"], state["generators"])
        self.step = int(state["step"])
        self._buffers = None if state["buffers"] is None else [b.clone() for b in state["buffers"]]
