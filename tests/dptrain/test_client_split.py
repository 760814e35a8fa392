"""label_skew_split: a seeded partition with the stated label skew."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from dptrain.client_split import label_skew_split

DIGITS = load_digits().target


def assert_partition(parts: list[np.ndarray], n: int) -> None:
    allidx = np.concatenate(parts)
    assert len(allidx) == n and np.array_equal(np.sort(allidx), np.arange(n))  # each index exactly once


@pytest.mark.parametrize("k", [1, 2, 3])
def test_classes_per_client_partition_and_skew(k):
    parts = label_skew_split(DIGITS, 10, classes_per_client=k, seed=0)
    assert len(parts) == 10
    assert_partition(parts, len(DIGITS))
    for p in parts:
        assert len(np.unique(DIGITS[p])) == k  # exactly k labels per client
    # every label held by n·k/L clients, its examples split near-evenly among them
    for c in range(10):
        counts = [np.sum(DIGITS[p] == c) for p in parts if np.any(DIGITS[p] == c)]
        assert len(counts) == k and max(counts) - min(counts) <= 1


def test_seeded_and_seed_matters():
    a = label_skew_split(DIGITS, 10, seed=3)
    b = label_skew_split(DIGITS, 10, seed=3)
    c = label_skew_split(DIGITS, 10, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_dirichlet_partition_min_size_and_alpha_controls_skew():
    skewed = label_skew_split(DIGITS, 10, alpha=0.1, seed=0, min_size=5)
    iid = label_skew_split(DIGITS, 10, alpha=1000.0, seed=0)
    for parts in (skewed, iid):
        assert_partition(parts, len(DIGITS))
    assert min(len(p) for p in skewed) >= 5

    def mean_labels_covering_90pct(parts):
        out = []
        for p in parts:
            freq = np.sort(np.bincount(DIGITS[p], minlength=10))[::-1] / len(p)
            out.append(int(np.searchsorted(np.cumsum(freq), 0.9) + 1))
        return np.mean(out)

    assert mean_labels_covering_90pct(skewed) <= 4 < 8 <= mean_labels_covering_90pct(iid)


def test_bad_input_errors_name_the_fix():
    with pytest.raises(ValueError, match="classes_per_client"):
        label_skew_split(DIGITS, 3, classes_per_client=2)  # 6 slots < 10 labels
    with pytest.raises(ValueError, match="n_clients"):
        label_skew_split(DIGITS, 0)
    with pytest.raises(ValueError, match="alpha"):
        label_skew_split(DIGITS, 10, alpha=0.0)
    with pytest.raises(ValueError, match="one-dimensional"):
        label_skew_split(DIGITS.reshape(-1, 1), 10)
