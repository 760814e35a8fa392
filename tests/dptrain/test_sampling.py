"""Poisson sampling: batch sizes follow Binomial(N, q); empty batches keep their structure."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from torch.utils.data import TensorDataset

from dptrain import PoissonLoader, PoissonSampler


def binomial_gof_rejects(sizes: np.ndarray, n: int, q: float) -> bool:
    """Chi-square goodness of fit of batch sizes to Binomial(n, q); tails pooled.

    Rejects with false-failure probability 1e-7 when the sizes really are binomial.
    """
    k = np.arange(0, n + 1)
    p = stats.binom.pmf(k, n, q)
    lo, hi = int(stats.binom.ppf(0.005, n, q)), int(stats.binom.ppf(0.995, n, q))
    expected = np.concatenate([[p[:lo].sum()], p[lo:hi + 1], [p[hi + 1:].sum()]]) * len(sizes)
    observed = np.concatenate([[np.sum(sizes < lo)], [np.sum(sizes == v) for v in range(lo, hi + 1)],
                               [np.sum(sizes > hi)]])
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    return chi2 > stats.chi2.isf(1e-7, len(expected) - 1)


def test_batch_sizes_follow_binomial():
    n, q, steps = 500, 0.03, 4000
    sizes = np.array([len(b) for b in PoissonSampler(n, q, steps, seed=0)])
    assert not binomial_gof_rejects(sizes, n, q)
    # the same test rejects fixed-size batches (what a shuffling loader gives)
    assert binomial_gof_rejects(np.full(steps, 15), n, q)
    # each index is included independently: inclusion frequency of every index ~ q
    counts = np.zeros(n)
    for b in PoissonSampler(n, q, steps, seed=1):
        counts[b.numpy()] += 1
    z = (counts - steps * q) / np.sqrt(steps * q * (1 - q))
    assert np.abs(z).max() < stats.norm.isf(1e-7 / (2 * n))  # Bonferroni over n indices


def test_empty_batches_keep_structure():
    ds = TensorDataset(torch.randn(10, 3, 2), torch.arange(10))
    loader = PoissonLoader(ds, PoissonSampler(10, 1e-9, 5, seed=0), 5)
    x, y = next(iter(loader))
    assert x.shape == (0, 3, 2) and y.shape == (0,) and y.dtype == torch.long


def test_state_dict_resumes_the_same_batches():
    s = PoissonSampler(100, 0.1, 10, seed=4)
    s.sample()
    state = s.state_dict()
    want = [s.sample() for _ in range(3)]
    s2 = PoissonSampler(100, 0.1, 10, seed=0)
    s2.load_state_dict(state)
    got = [s2.sample() for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(want, got))


@pytest.mark.parametrize("n,q,steps", [(0, 0.1, 1), (10, 0.0, 1), (10, 1.5, 1), (10, 0.1, 0)])
def test_bad_arguments(n, q, steps):
    with pytest.raises(ValueError):
        PoissonSampler(n, q, steps)


def test_sampler_seeds_differing_above_bit_32_draw_different_batches():
    # torch's manual_seed on the CPU keeps 32 bits; the sampler's whole generator state follows the seed
    a = PoissonSampler(1000, 0.1, 3, seed=11)
    b = PoissonSampler(1000, 0.1, 3, seed=11 + (1 << 40))
    c = PoissonSampler(1000, 0.1, 3, seed=11)
    first = a.sample()
    assert torch.equal(first, c.sample())
    assert not torch.equal(first, b.sample())


def test_inclusion_rate_is_q_not_q_rounded_up_to_float32_uniforms():
    """float32 uniforms are multiples of 2^-24: u < 2^-30 held w.p. 2^-24, 64× the accounted rate
    (12.5 inclusions expected here instead of 0.2)."""
    from dptrain.sampling import PoissonSampler

    sampler = PoissonSampler(1 << 20, 2.0 ** -30, 200, seed=1)
    assert sum(len(sampler.sample()) for _ in range(200)) <= 2


def test_loader_calls_a_tensor_dataset_subclass_and_handles_numpy_examples():
    import numpy as np
    from torch.utils.data import Dataset, TensorDataset

    from dptrain.sampling import PoissonLoader, PoissonSampler

    class Transformed(TensorDataset):  # its own __getitem__: the raw tensors were gathered instead
        def __getitem__(self, i):
            x, y = super().__getitem__(i)
            return x * 0 + 100.0, y

    ds = Transformed(torch.arange(10.0).view(10, 1), torch.arange(10))
    x, y = PoissonLoader(ds, PoissonSampler(10, 0.5, 1, seed=0), 1).batch(torch.tensor([0, 3, 5]))
    assert torch.equal(x, torch.full((3, 1), 100.0)) and torch.equal(y, torch.tensor([0, 3, 5]))

    class Arrays(Dataset):  # numpy examples: attach failed building the empty batch
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return np.full(4, float(i), dtype=np.float32), i % 2, 0.5

    loader = PoissonLoader(Arrays(), PoissonSampler(8, 0.5, 1, seed=0), 1)
    empty, full = loader.batch(torch.tensor([], dtype=torch.long)), loader.batch(torch.tensor([1, 2]))
    empty, full = [*empty[0], empty[1]], [*full[0], full[1]]  # three parts: ((x, i % 2), 0.5)
    assert [t.dtype for t in empty] == [t.dtype for t in full] == [torch.float32, torch.int64, torch.float64]
    assert empty[0].shape == (0, 4) and full[0].shape == (2, 4)


def test_schedule_sampler_iterates_its_remaining_batches():
    from dptrain.sampling import ScheduleSampler

    def schedule(g):
        for step in range(4):
            yield torch.tensor([step])

    sampler = ScheduleSampler(schedule, 0.25, 4, seed=0)
    sampler.sample()
    assert [int(b) for b in sampler] == [1, 2, 3]  # was: TypeError, not iterable


def test_loader_records_the_batches_its_sampler_draws():
    loader = PoissonLoader(TensorDataset(torch.randn(50, 2)), PoissonSampler(50, 0.2, 10, seed=0), 5)

    def take(rows):  # what a step does with a batch of ``rows`` rows: find a drawn one, use it up
        position = loader.find(rows)
        if position is None:
            return False
        loader.use(position)
        return True

    sizes = [len(loader.sampler.sample()), len(next(iter(loader))[0])]
    loader.batch(torch.arange(7))  # indices not drawn by the sampler: not recorded
    assert not take(7) or 7 in sizes
    assert take(sizes[1]) and not take(sizes[0])  # the later one used: the earlier given up


def test_examples_of_more_than_two_parts_are_inputs_then_target():
    """TensorDataset(x1, x2, y) gave 3-tuples that priv.step refused ("a batch must be (inputs, targets)")."""
    x1, x2, y = torch.randn(50, 3), torch.randn(50, 2), torch.arange(50)
    idx = torch.tensor([1, 4, 7])

    class Triples(torch.utils.data.Dataset):
        def __len__(self):
            return 50

        def __getitem__(self, i):
            return x1[i], x2[i], y[i]

    for data in (TensorDataset(x1, x2, y), Triples()):
        loader = PoissonLoader(data, PoissonSampler(50, 0.2, 3, seed=0), 5)
        (a, b), t = loader.batch(idx)
        assert torch.equal(a, x1[idx]) and torch.equal(b, x2[idx]) and torch.equal(t, y[idx])
        (a, b), t = loader.batch(torch.tensor([], dtype=torch.long))
        assert a.shape == (0, 3) and b.shape == (0, 2) and t.shape == (0,)
    two = PoissonLoader(TensorDataset(x1, y), PoissonSampler(50, 0.2, 3, seed=0), 5)
    a, t = two.batch(idx)
    assert torch.equal(a, x1[idx]) and torch.equal(t, y[idx])
