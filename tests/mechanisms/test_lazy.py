"""Lazy noise equals eager DP-SGD in distribution, row by row."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from mechanisms.lazy import LazyNoiseTable

SIGMA_C, B = 1.7, 4.0
LRS = [0.5, 0.4, 0.3, 0.2, 0.1, 0.05]  # a decaying learning-rate schedule
# rows: 0 never touched, 1 touched once (step 2), 2 every step, 3 steps {0, 4}, 4 steps {1, 2, 5}
TOUCH = {0: [], 1: [2], 2: [0, 1, 2, 3, 4, 5], 3: [0, 4], 4: [1, 2, 5]}
D = 40_000  # columns are independent trials


def grad_for(row: int, step: int) -> float:
    return 0.3 * (row + 1) - 0.1 * step


def run_lazy(seed: int, repeated: bool = False) -> torch.Tensor:
    w = torch.zeros(len(TOUCH), D, dtype=torch.float64)
    table = LazyNoiseTable(w, SIGMA_C, B, torch.Generator().manual_seed(seed))
    for t, lr in enumerate(LRS):
        rows = torch.tensor([r for r, steps in TOUCH.items() if t in steps], dtype=torch.long)
        if repeated:  # the forward pass reads the batch's rows, some twice, unsorted (the GPU path)
            table.catch_up(torch.cat([rows, rows[:1], rows.flip(0)]), repeated=True)
        else:
            table.catch_up(rows)  # the forward pass reads the batch's rows
        grads = torch.tensor([[grad_for(int(r), t)] * D for r in rows], dtype=torch.float64).reshape(-1, D)
        table.sgd_step(rows, grads, lr)
    table.flush()
    assert table.is_flushed
    return w


def eager_moments() -> tuple[np.ndarray, float]:
    mean = np.array([-sum(lr / B * grad_for(r, t) for t, lr in enumerate(LRS) if t in TOUCH[r])
                     for r in TOUCH])
    var = sum((lr * SIGMA_C / B) ** 2 for lr in LRS)  # every row gets every step's noise
    return mean, var


def run_eager(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.zeros(len(TOUCH), D, dtype=torch.float64)
    for t, lr in enumerate(LRS):
        grad = torch.tensor([[grad_for(r, t) if t in TOUCH[r] else 0.0] for r in TOUCH], dtype=torch.float64)
        w -= lr / B * (grad + SIGMA_C * torch.randn(w.shape, generator=g, dtype=torch.float64))
    return w


def run_lazy_repeated(seed: int) -> torch.Tensor:
    return run_lazy(seed, repeated=True)


@pytest.mark.parametrize("runner", [run_lazy, run_lazy_repeated, run_eager])
def test_rows_have_eager_mean_and_variance(runner):
    # Each row: D i.i.d. samples of N(mean_r, var). Per row a z-test on the mean and a
    # chi-square test on the variance, Bonferroni over 5 rows × 2 tests: total
    # false-failure probability 1e-7.
    w = runner(seed=11).numpy()
    mean, var = eager_moments()
    alpha = 1e-7 / 10
    for r in TOUCH:
        z = (w[r].mean() - mean[r]) / np.sqrt(var / D)
        assert abs(z) < stats.norm.isf(alpha / 2), (r, w[r].mean(), mean[r])
        chi = (D - 1) * w[r].var(ddof=1) / var
        assert stats.chi2.ppf(alpha / 2, D - 1) < chi < stats.chi2.isf(alpha / 2, D - 1), (r, w[r].var(), var)


def test_lazy_and_eager_samples_have_the_same_distribution():
    # two-sample Kolmogorov–Smirnov per row, Bonferroni over rows: false-failure prob. 1e-7
    lazy, eager = run_lazy(1).numpy(), run_eager(2).numpy()
    for r in TOUCH:
        assert stats.ks_2samp(lazy[r], eager[r]).pvalue > 1e-7 / len(TOUCH)


def test_missing_noise_would_be_detected():
    # a lazy table that forgets the catch-up of skipped steps has too small a variance for row 0
    w = torch.zeros(2, D, dtype=torch.float64)
    table = LazyNoiseTable(w, SIGMA_C, B, torch.Generator().manual_seed(0))
    for lr in LRS:
        table.sgd_step(torch.tensor([1]), torch.zeros(1, D, dtype=torch.float64), lr)
    _, var = eager_moments()
    assert float(w[0].var()) == 0.0  # before the flush, row 0 has none of its noise
    table.flush()
    chi = (D - 1) * float(w[0].var()) / var
    assert stats.chi2.ppf(1e-8, D - 1) < chi < stats.chi2.isf(1e-8, D - 1)


def test_state_dict_requires_flush_and_round_trips():
    w = torch.zeros(3, 2)
    table = LazyNoiseTable(w, 1.0, 2.0, torch.Generator().manual_seed(0))
    table.catch_up(torch.tensor([0]))
    table.sgd_step(torch.tensor([0]), torch.ones(1, 2), 0.1)
    with pytest.raises(RuntimeError, match="flush"):
        table.state_dict()
    table.flush()
    state = table.state_dict()
    other = LazyNoiseTable(w.clone(), 1.0, 2.0, torch.Generator().manual_seed(5))
    other.load_state_dict(state)
    assert other.step == 1 and other.is_flushed


def test_an_update_before_the_catch_up_keeps_the_owed_noise():
    # Row 0 is updated at every step but read (caught up) only before steps 2 and 4; row 1 is never
    # touched. After the flush both rows have every step's noise: z-test on the mean and chi-square
    # on the variance per row, Bonferroni over 2 rows × 2 tests: false-failure probability 1e-7.
    w = torch.zeros(2, D, dtype=torch.float64)
    table = LazyNoiseTable(w, SIGMA_C, B, torch.Generator().manual_seed(3))
    for t, lr in enumerate(LRS):
        if t in (2, 4):
            table.catch_up(torch.tensor([0]))
        table.sgd_step(torch.tensor([0, 0]), torch.full((2, D), grad_for(0, t), dtype=torch.float64), lr)
    table.flush()
    _, var = eager_moments()
    mean = [-sum(lr / B * 2 * grad_for(0, t) for t, lr in enumerate(LRS)), 0.0]  # row 0 listed twice a step
    alpha = 1e-7 / 4
    for r in (0, 1):
        z = (float(w[r].mean()) - mean[r]) / np.sqrt(var / D)
        assert abs(z) < stats.norm.isf(alpha / 2), (r, float(w[r].mean()), mean[r])
        chi = (D - 1) * float(w[r].var()) / var
        assert stats.chi2.ppf(alpha / 2, D - 1) < chi < stats.chi2.isf(alpha / 2, D - 1), (r, float(w[r].var()))


def test_a_second_flush_without_a_step_draws_nothing():
    w = torch.zeros(5, 3)
    table = LazyNoiseTable(w, 1.0, 2.0, torch.Generator().manual_seed(0))
    table.sgd_step(torch.tensor([1]), torch.ones(1, 3), 0.1)
    table.flush()
    assert table.is_flushed and bool((w != 0).all())  # every row got the step's noise
    before = w.clone()
    table.catch_up(torch.tensor([2, 4]))  # a read of up-to-date rows adds 0
    state = table.streams.generator.get_state()
    table.flush()
    assert torch.equal(w, before) and torch.equal(table.streams.generator.get_state(), state)


@pytest.mark.parametrize("source", ["default", "torch"])
def test_flush_across_parallel_noise_pieces_gives_every_row_its_variance(source):
    # a table of 6 pieces (6 × 65536 coordinates) drawn by the CPU's noise source (Philox, or
    # torch's streams) in two threads: every coordinate ~ N(0, v), v = (lr σC/B)² (χ² of the sum
    # of squares per piece, each two-sided at 1e-8: false failure < 6e-8), and no two pieces
    # repeat each other's draws
    from mechanisms.normal_streams import PIECE
    from mechanisms.rng import DeviceGenerators, cpu_torch_streams

    rows = 6 * PIECE // 64
    w = torch.zeros(rows, 64)
    noise = DeviceGenerators(17).streams("cpu") if source == "default" else cpu_torch_streams(17)
    table = LazyNoiseTable(w, SIGMA_C, B, noise)
    lr = 0.5
    table.sgd_step(torch.zeros(0, dtype=torch.long), torch.zeros(0, 64), lr)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        table.flush()
    finally:
        torch.set_num_threads(before)
    v = (lr * SIGMA_C / B) ** 2
    pieces = (w.double() ** 2 / v).reshape(6, PIECE).sum(1)
    lo, hi = stats.chi2.ppf(0.5e-8, PIECE), stats.chi2.isf(0.5e-8, PIECE)
    assert bool(((pieces > lo) & (pieces < hi)).all()), pieces
    flat = w.reshape(6, PIECE)
    assert all(not torch.equal(flat[i], flat[j]) for i in range(6) for j in range(i))
    assert table.is_flushed


def test_rebind_writes_the_pending_noise_into_the_new_tensor():
    """A table converted mid-run (model.double()): the noise still owed lands in the tensor bound now, in its
    dtype, with the summed variance; the old tensor is left alone. Chi-square, false-failure probability 1e-7."""
    old = torch.zeros(3, D)
    table = LazyNoiseTable(old, SIGMA_C, B, torch.Generator().manual_seed(0))
    for lr in LRS[:3]:
        table.sgd_step(torch.tensor([1]), torch.ones(1, D), lr)
    new = old.double()
    table.rebind(new)
    table.flush()
    assert not old[[0, 2]].any()  # the dead tensor gets nothing
    var = sum((lr * SIGMA_C / B) ** 2 for lr in LRS[:3])
    chi = float((new[[0, 2]] ** 2).sum()) / var
    assert stats.chi2.ppf(5e-8, 2 * D) < chi < stats.chi2.isf(5e-8, 2 * D), chi / (2 * D)
    with pytest.raises(ValueError, match="shape changed"):
        table.rebind(torch.zeros(4, D))
