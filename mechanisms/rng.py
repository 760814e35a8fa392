"""Per-device random generators for noise, seeded from one seed and checkpointable.

Noise is drawn on the device of the tensor it is added to; each device gets its own
``torch.Generator`` seeded with ``seed + Σ ord(device name)``, so a run reproduces its noise
from (seed, generator states). The seed defaults to 62 bits from the OS's entropy.
"""
from __future__ import annotations

import secrets

import torch


class DeviceGenerators:
    """``get(device)`` returns that device's generator (created on first use)."""

    def __init__(self, seed: int | None = None) -> None:
        self.seed = int(seed) if seed is not None else secrets.randbits(62)
        self._generators: dict[str, torch.Generator] = {}

    def get(self, device: torch.device | str) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            g = torch.Generator(device=torch.device(key))
            g.manual_seed(self.seed + sum(map(ord, key)))
            self._generators[key] = g
        return self._generators[key]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: g.get_state() for k, g in self._generators.items()}

    def load_state_dict(self, seed: int, states: dict[str, torch.Tensor]) -> None:
        self.seed, self._generators = int(seed), {}
        for key, st in states.items():
            g = torch.Generator(device=torch.device(key))
            g.set_state(st)
            self._generators[key] = g
