"""The dataset-order fingerprint of MF checkpoints (dptrain/fingerprint.py)."""
from __future__ import annotations

import torch

from dptrain.fingerprint import order_fingerprint


class _Indexed:
    """A dataset of n examples that refuses any index outside range(n) (no data held)."""

    def __init__(self, n: int) -> None:
        self.n, self.read = n, []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        self.read.append(i)
        return torch.tensor([float(i)]), i % 3


def test_indices_stay_inside_datasets_beyond_float32s_integers():
    """float32 linspace rounded n − 1 up to n for about half the sizes past 2^24 (IndexError at save)."""
    for n in (16_777_220, 30_000_001, 5, 1):
        data = _Indexed(n)
        order_fingerprint(data, n)
        assert data.read and max(data.read) == n - 1 and min(data.read) == 0


def test_the_fingerprint_sees_a_reordering():
    x, y = torch.arange(100.0).unsqueeze(1), torch.arange(100) % 3
    same = order_fingerprint(torch.utils.data.TensorDataset(x, y), 100)
    assert same == order_fingerprint(torch.utils.data.TensorDataset(x.clone(), y.clone()), 100)
    perm = torch.randperm(100, generator=torch.Generator().manual_seed(0))
    assert same != order_fingerprint(torch.utils.data.TensorDataset(x[perm], y[perm]), 100)
