"""Per-device random generators for noise, seeded from one seed and checkpointable.

Noise is drawn on the device of the tensor it is added to; each device gets its own
``torch.Generator``, so a run reproduces its noise from (seed, generator states). The seed
defaults to 62 bits from the OS's entropy.

Seed entropy: torch's CPU generator (mt19937) keeps only the low 32 bits of ``manual_seed``, so
2^32 seeds would cover every CPU noise stream. Here a CPU generator's whole 624-word state is
expanded from (seed, device name) by numpy's ``SeedSequence`` instead, so every bit of the seed
counts. CUDA generators (Philox) take a 64-bit seed: ``seed + Σ ord(device name)``.
"""
from __future__ import annotations

import functools
import secrets
import warnings

import numpy as np
import torch

#: byte offset and count of the 624 mt19937 words (stored as uint64) in a CPU generator's state
_MT_OFFSET, _MT_WORDS = 24, 624


def _device_offset(device_key: str) -> int:
    """Σ ord(device name): what separates one seed's streams on different devices."""
    return sum(map(ord, device_key))


@functools.lru_cache(maxsize=1)
def _mt_layout_ok() -> bool:
    """Whether this torch's CPU generator state holds mt19937's words where :func:`cpu_state` writes them."""
    g = torch.Generator()
    g.manual_seed(12345)
    state = g.get_state()
    words = state[_MT_OFFSET:_MT_OFFSET + 16].numpy().view("<u8")
    return state.numel() >= _MT_OFFSET + 8 * _MT_WORDS and words.tolist() == [12345, 2003863422]


def cpu_state(seed: int, device_key: str = "cpu") -> torch.Tensor | None:
    """A CPU generator state whose 624 mt19937 words come from ``SeedSequence([seed, Σ ord(key)])``.

    None if this torch's state layout is not the expected one (the caller then falls back to
    ``manual_seed``, which uses 32 bits of the seed).
    """
    if not _mt_layout_ok():
        return None
    g = torch.Generator()
    g.manual_seed(0)  # a valid state to fill: left = 1 (words are used from the next draw), no cached normal
    state = g.get_state().clone()
    seed64 = int(seed) % (1 << 64)
    words = np.random.SeedSequence([seed64, _device_offset(device_key)]).generate_state(
        _MT_WORDS, np.uint32).astype("<u8")
    if not words.any():  # the all-zero state never leaves zero (probability 2^-19968)
        words[0] = 1
    state[_MT_OFFSET:_MT_OFFSET + 8 * _MT_WORDS] = torch.from_numpy(words.view(np.uint8))
    state[:8] = torch.from_numpy(np.array([seed64], dtype="<u8").view(np.uint8))
    return state


def cpu_generator(seed: int | None = None, device_key: str = "cpu") -> torch.Generator:
    """A CPU ``torch.Generator`` whose whole mt19937 state comes from ``seed`` (:func:`cpu_state`);
    ``seed=None``: 62 bits from the OS's entropy. Use it for every stream a guarantee relies on
    (noise, Poisson sampling)."""
    seed = int(seed) if seed is not None else secrets.randbits(62)
    g = torch.Generator()
    state = cpu_state(seed, device_key)
    if state is None:
        warnings.warn("mechanisms.rng: unexpected torch CPU generator layout; seeding with manual_seed, "
                      "which keeps only 32 bits of the seed", RuntimeWarning)
        g.manual_seed(seed + _device_offset(device_key))
    else:
        g.set_state(state)
    return g


class DeviceGenerators:
    """``get(device)`` returns that device's generator (created on first use)."""

    def __init__(self, seed: int | None = None) -> None:
        self.seed = int(seed) if seed is not None else secrets.randbits(62)
        self._generators: dict[str, torch.Generator] = {}

    def get(self, device: torch.device | str) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            device = torch.device(key)
            if device.type == "cpu":
                g = cpu_generator(self.seed, key)
            else:
                g = torch.Generator(device=device)
                g.manual_seed(self.seed + _device_offset(key))
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
