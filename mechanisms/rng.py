"""Per-device random generators for noise, seeded from one seed and checkpointable.

Noise is drawn on the device of the tensor it is added to; each device gets its own source, so a
run reproduces its noise from (seed, source states). The CPU's is a Philox stream drawn by the
compiled kernel (:mod:`mechanisms.philox_normals`), or, where that kernel is not installed,
:data:`~mechanisms.normal_streams.STREAMS` torch generators drawn in parallel
(:mod:`mechanisms.normal_streams`); a CUDA device's is its ``torch.Generator`` (Philox). The seed
defaults to 62 bits from the OS's entropy.

Seed entropy: torch's CPU generator (mt19937) keeps only the low 32 bits of ``manual_seed``, so
2^32 seeds would cover every CPU noise stream. Here a CPU generator's whole 624-word state is
expanded from (seed, device name) by numpy's ``SeedSequence`` instead, so every bit of the seed
counts. CUDA generators (Philox) take a 64-bit seed, likewise drawn from a ``SeedSequence`` of
(seed, device name) (:func:`cuda_seed`): an affine ``seed + offset(device)`` would give seed s on
``cuda:r`` the stream of seed s + 1 on ``cuda:r-1``, so runs with neighbouring seeds (e.g. one per
client) on different devices would share their noise.
"""
from __future__ import annotations

import functools
import secrets
import warnings
from typing import Callable, Sequence

import numpy as np
import torch

from . import philox_normals
from .normal_streams import STREAMS, NormalSource, NormalStreams, normals_like
from .philox_normals import PhiloxNormals

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


def cpu_state(seed: int, device_key: str = "cpu", stream: int = 0) -> torch.Tensor | None:
    """A CPU generator state whose 624 mt19937 words come from ``SeedSequence([seed, Σ ord(key)])``
    (stream 0) or from its child ``SeedSequence([seed, Σ ord(key)], spawn_key=(stream,))``.

    None if this torch's state layout is not the expected one (the caller then falls back to
    ``manual_seed``, which uses 32 bits of the seed).
    """
    if not _mt_layout_ok():
        return None
    g = torch.Generator()
    g.manual_seed(0)  # a valid state to fill: left = 1 (words are used from the next draw), no cached normal
    state = g.get_state().clone()
    seed64 = int(seed) % (1 << 64)
    spawn_key = (int(stream),) if stream else ()
    words = np.random.SeedSequence([seed64, _device_offset(device_key)], spawn_key=spawn_key).generate_state(
        _MT_WORDS, np.uint32).astype("<u8")
    if not words.any():  # the all-zero state never leaves zero (probability 2^-19968)
        words[0] = 1
    state[_MT_OFFSET:_MT_OFFSET + 8 * _MT_WORDS] = torch.from_numpy(words.view(np.uint8))
    state[:8] = torch.from_numpy(np.array([seed64], dtype="<u8").view(np.uint8))
    return state


#: spawn-key tag of a CUDA generator's seed (the CPU's Philox stream has its own, "phlx")
_CUDA_TAG = int.from_bytes(b"cuda", "little")


def cuda_seed(seed: int, device_key: str) -> int:
    """The 64-bit seed of CUDA device ``device_key``'s generator for ``seed``: the first word of
    ``SeedSequence([seed, Σ ord(key)], spawn_key=(tag, *the key's bytes))``. Every bit of the seed
    counts, and distinct (seed, device) pairs give unrelated seeds (the key's bytes also tell apart
    names with the same Σ ord, e.g. ``cuda:19`` and ``cuda:28``)."""
    words = np.random.SeedSequence([int(seed) % (1 << 64), _device_offset(device_key)],
                                   spawn_key=(_CUDA_TAG, *device_key.encode())).generate_state(1, np.uint64)
    return int(words[0])


def derived_seed(seed: int, label: int) -> int:
    """A 62-bit seed for the independent family of streams ``label`` of ``seed``: the first words of
    ``SeedSequence(seed, spawn_key=(label,))``. Distinct labels (e.g. the k-th attach of a run) give
    streams that share no draws with each other or with ``seed``'s own, where ``seed + k`` would give
    a neighbouring seed's streams."""
    words = np.random.SeedSequence(int(seed) % (1 << 64), spawn_key=(int(label),)).generate_state(2, np.uint64)
    return int(words[0]) >> 2


def cpu_generator(seed: int | None = None, device_key: str = "cpu", stream: int = 0) -> torch.Generator:
    """A CPU ``torch.Generator`` whose whole mt19937 state comes from ``seed`` (:func:`cpu_state`);
    ``seed=None``: 62 bits from the OS's entropy. Use it for every stream a guarantee relies on
    (noise, Poisson sampling)."""
    seed = int(seed) if seed is not None else secrets.randbits(62)
    g = torch.Generator()
    state = cpu_state(seed, device_key, stream)
    if state is None:
        if stream:
            raise RuntimeError("mechanisms.rng: unexpected torch CPU generator layout; a child stream "
                               f"(stream={stream}) needs it — use stream 0")
        warnings.warn("mechanisms.rng: unexpected torch CPU generator layout; seeding with manual_seed, "
                      "which keeps only 32 bits of the seed", RuntimeWarning)
        g.manual_seed(seed + _device_offset(device_key))
    else:
        g.set_state(state)
    return g


def _by_device(tensors: Sequence[torch.Tensor]) -> dict[str, list[int]]:
    """Indices of ``tensors`` per device, in order."""
    if all(t.is_cpu for t in tensors):  # the common case, without a device object per tensor
        return {"cpu": list(range(len(tensors)))} if tensors else {}
    out: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        out.setdefault(t.device, []).append(i)
    return {str(d): idx for d, idx in out.items()}


def cpu_torch_streams(seed: int, device_key: str = "cpu") -> NormalStreams:
    """torch's CPU generators as noise streams: :data:`STREAMS` of :func:`cpu_generator` (one if this
    torch's state layout is not the expected one: child streams need the whole-state seeding)."""
    n = STREAMS if _mt_layout_ok() else 1
    return NormalStreams([cpu_generator(seed, device_key, k) for k in range(n)])


class DeviceGenerators:
    """``streams(device)`` returns that device's noise source (created on first use): a
    :class:`PhiloxNormals` on the CPU where the kernel is installed, else a :class:`NormalStreams`."""

    def __init__(self, seed: int | None = None) -> None:
        self.seed = int(seed) if seed is not None else secrets.randbits(62)
        self._streams: dict[str, NormalSource] = {}

    def _new(self, key: str) -> NormalSource:
        device = torch.device(key)
        if device.type == "cpu":
            if philox_normals.available():
                return PhiloxNormals.from_seed(self.seed, key)
            return cpu_torch_streams(self.seed, key)
        g = torch.Generator(device=device)
        g.manual_seed(cuda_seed(self.seed, key))
        return NormalStreams([g])

    def streams(self, device: torch.device | str) -> NormalSource:
        key = str(device)
        if key not in self._streams:
            self._streams[key] = self._new(key)
        return self._streams[key]

    def _per_device(self, tensors: Sequence[torch.Tensor],
                    draw: Callable[[NormalSource, list[torch.Tensor]], list[torch.Tensor]]) -> list[torch.Tensor]:
        """``draw(source, that device's tensors in order)`` once per device; its results back in the order of ``tensors``."""
        out: list[torch.Tensor | None] = [None] * len(tensors)
        for key, idx in _by_device(tensors).items():
            for i, z in zip(idx, draw(self.streams(key), [tensors[i] for i in idx])):
                out[i] = z
        return out  # type: ignore[return-value]

    def randn_like(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """A new contiguous N(0, I) tensor shaped like each of ``tensors`` (same device and dtype);
        each device's tensors, in their order, are filled by one ``normal_`` of its source."""
        return self._per_device(tensors, normals_like)

    def noised(self, tensors: Sequence[torch.Tensor], noise_scale: float, scale: float = 1.0) -> list[torch.Tensor]:
        """New tensors ``scale·t + noise_scale·Z``, Z ~ N(0, I) from each tensor's device's source
        (one fused pass per tensor on the CPU's Philox source); the tensors of a device, in their
        order, draw the normals that one ``normal_`` of them would."""
        return self._per_device(tensors, lambda src, ts: src.noised([t.contiguous() for t in ts], noise_scale, scale))

    def noised_(self, tensors: Sequence[torch.Tensor], noise_scale: float, scale: float = 1.0) -> None:
        """:meth:`noised` in place (contiguous tensors; the same numbers)."""
        for key, idx in _by_device(tensors).items():
            self.streams(key).noised_([tensors[i] for i in idx], noise_scale, scale)

    def state_dict(self) -> dict[str, list[torch.Tensor] | dict]:
        return {k: s.state_dict() for k, s in self._streams.items()}

    def load_state_dict(self, seed: int, states: dict[str, list[torch.Tensor] | torch.Tensor | dict]) -> None:
        """``states`` from :meth:`state_dict`; each device resumes the source its state came from
        (:func:`source_from_state`)."""
        self.seed = int(seed)
        self._streams = {key: source_from_state(st, key) for key, st in states.items()}


def source_from_state(state: list[torch.Tensor] | torch.Tensor | dict, device_key: str) -> NormalSource:
    """The noise source a saved state belongs to, at that state: a Philox state (a dict) resumes
    its stream, a list of generator states torch's streams; one generator state (an older
    checkpoint) resumes stream 0 and starts the other streams from fresh OS entropy, so no noise
    repeats."""
    source: NormalSource
    if isinstance(state, dict):
        source = PhiloxNormals(0, 0)
        source.load_state_dict(state)
    elif isinstance(state, torch.Tensor) and torch.device(device_key).type == "cpu":
        source = cpu_torch_streams(secrets.randbits(62), device_key)  # streams k >= 1 from fresh entropy
        source.generators[0].set_state(state)
    elif isinstance(state, torch.Tensor):
        source = NormalStreams([torch.Generator(device=torch.device(device_key))])
        source.generators[0].set_state(state)
    else:
        source = NormalStreams([torch.Generator(device=torch.device(device_key)) for _ in state])
        source.load_state_dict(state)
    return source
