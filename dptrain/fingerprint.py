"""A cheap fingerprint of a dataset's order, so that a resumed schedule meets the same examples.

Correlated-noise (MF) runs assign examples to batches by *index* (a fixed split into epochs, or
cyclic Poisson partitions), and their accounting assumes each example stays in its partition:
at most k participations, at least b steps apart. A checkpoint replays that schedule by index,
so a dataset of the same size in another order (a fresh ``random_split``, a reshuffled list)
would move real examples between partitions and break the assumption silently. The
fingerprint hashes the examples at ``count`` indices spread over the dataset; it differs, with
overwhelming probability, when the examples at those indices differ.

Inputs and targets are hashed separately, and a part that hashes differently on two reads
(random augmentation in ``__getitem__``) is left out, so such a dataset is checked by its
targets alone rather than refused on resume.
"""
from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from .sampling import as_pair

#: examples read for a fingerprint (at indices spread evenly over the dataset)
FINGERPRINT_EXAMPLES = 32


def _feed(h: "hashlib._Hash", value: Any) -> None:
    """Add ``value`` (tensors, arrays, numbers, strings, and tuples / lists / dicts of them) to ``h``;
    other objects contribute their type only (their repr may hold a memory address)."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, np.ndarray):
        h.update(f"A{value.dtype}{value.shape}".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, (tuple, list)):
        h.update(f"L{len(value)}".encode())
        for v in value:
            _feed(h, v)
    elif isinstance(value, dict):
        h.update(f"D{len(value)}".encode())
        for k in sorted(value, key=repr):
            _feed(h, k)
            _feed(h, value[k])
    elif value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        h.update(repr(value).encode())
    elif callable(getattr(value, "tobytes", None)):  # e.g. a PIL image
        h.update(type(value).__qualname__.encode() + value.tobytes())
    else:
        h.update(type(value).__qualname__.encode())


def _read(dataset: Any, n: int, count: int) -> dict[str, str]:
    """SHA-256 of the inputs and of the targets of the examples at ``count`` indices spread over ``range(n)``."""
    k = min(count, n)  # integer spacing: float32 linspace rounds n − 1 up to n past 2^24 examples
    indices = sorted({(j * (n - 1)) // max(k - 1, 1) for j in range(k)})
    parts = {"inputs": hashlib.sha256(), "targets": hashlib.sha256()}
    for i in indices:
        example = as_pair(dataset[i])
        inputs, target = example if isinstance(example, (tuple, list)) and len(example) == 2 else (example, None)
        _feed(parts["inputs"], (i, inputs))
        _feed(parts["targets"], (i, target))
    return {k: h.hexdigest() for k, h in parts.items()}


def order_fingerprint(dataset: Any, n: int, count: int = FINGERPRINT_EXAMPLES) -> dict[str, str]:
    """Hashes of the examples at fixed indices (inputs and targets apart), read twice; a part that
    differs between the two reads (random augmentation) is left out."""
    first, second = _read(dataset, n, count), _read(dataset, n, count)
    return {k: v for k, v in first.items() if second[k] == v}


def fingerprints_differ(saved: dict[str, str], mine: dict[str, str]) -> list[str]:
    """The parts (``inputs``, ``targets``) both fingerprints hold and that differ."""
    return sorted(k for k in saved if k in mine and saved[k] != mine[k])
