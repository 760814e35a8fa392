"""Streamed rows of C⁻¹Z equal the dense solve C W = Z for the same Z, also across a checkpoint."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.linalg import solve_triangular

from mechanisms.mf.optimize import optimal_banded_toeplitz, optimal_dense
from mechanisms.mf.strategies import banded_sqrt, fft_sqrt, identity
from mechanisms.mf.streaming import StreamingCorrelatedNoise
from mechanisms.rng import DeviceGenerators

SHAPES = [(3, 4), (5,)]


def white_noise(seed: int, n: int, dtype=torch.float64) -> list[np.ndarray]:
    """Z as the stream draws it: per step, one ``randn_like`` of all tensors from the CPU's noise streams."""
    gens = DeviceGenerators(seed)
    like = [torch.zeros(shape, dtype=dtype) for shape in SHAPES]
    per_tensor = [[] for _ in SHAPES]
    for _ in range(n):
        for i, z in enumerate(gens.randn_like(like)):
            per_tensor[i].append(z.reshape(-1).numpy())
    return [np.stack(z) for z in per_tensor]  # each [n, numel]


STRATEGIES = {
    "identity": lambda n: identity(n),
    "banded-sqrt": lambda n: banded_sqrt(n, 4),
    "banded-opt": lambda n: optimal_banded_toeplitz(n, 3),
    "banded-dense": lambda n: optimal_dense(n, bands=3),
    "multi-epoch": lambda n: optimal_dense(n, 3),
    "fft": lambda n: fft_sqrt(n),
}


@pytest.mark.parametrize("kind", sorted(STRATEGIES))
def test_stream_equals_dense_inverse_including_after_checkpoint(kind):
    n, seed = 12, 7
    strategy = STRATEGIES[kind](n)
    like = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    stream = StreamingCorrelatedNoise(strategy, seed=seed)
    rows = [stream.next(like) for _ in range(5)]
    state = stream.state_dict()
    resumed = StreamingCorrelatedNoise(strategy, seed=123)  # fresh object, other seed: state must win
    resumed.load_state_dict(state)
    rows += [resumed.next(like) for _ in range(n - 5)]
    # the original continues identically too
    cont = stream.next(like)
    torch.testing.assert_close(cont, rows[5], rtol=0, atol=0)
    c = strategy.dense()
    for i, z in enumerate(white_noise(seed, n)):
        want = solve_triangular(c, z, lower=True)  # W = C⁻¹ Z
        got = np.stack([r[i].reshape(-1).numpy() for r in rows])
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert rows[0][0].shape == SHAPES[0] and rows[0][1].shape == SHAPES[1]


def test_memory_is_bands_minus_one_rows_per_tensor():
    n = 50
    like = [torch.zeros(100, 10), torch.zeros(7)]
    for bands in (1, 2, 8):
        stream = StreamingCorrelatedNoise(banded_sqrt(n, bands), seed=0)
        stream.next(like)
        assert stream.buffer_bytes() == (bands - 1) * (1000 + 7) * 4
    stream = StreamingCorrelatedNoise(fft_sqrt(n), seed=0)  # full Toeplitz: every past row
    stream.next(like)
    assert stream.buffer_bytes() == (n - 1) * 1007 * 4


def test_errors_name_the_problem():
    stream = StreamingCorrelatedNoise(banded_sqrt(2, 2), seed=0)
    stream.next([torch.zeros(3)])
    with pytest.raises(ValueError, match="tensors changed"):
        stream.next([torch.zeros(4)])
    stream.next([torch.zeros(3)])
    with pytest.raises(IndexError, match="covers n = 2"):
        stream.next([torch.zeros(3)])
    other = StreamingCorrelatedNoise(banded_sqrt(2, 1), seed=0)
    with pytest.raises(ValueError, match="strategy"):
        other.load_state_dict(stream.state_dict())


def test_seed_is_random_when_not_given():
    assert StreamingCorrelatedNoise(identity(3)).seed != StreamingCorrelatedNoise(identity(3)).seed
