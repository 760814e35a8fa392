"""Federated rounds across 2 gloo processes (clients split over ranks) equal the one-process run.

The two ranks run tests/dptrain/federated/federated_worker.py; this test compares their outputs
with the same runs simulated here in one process.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from scipy import stats

from dptrain.federated import DistributedComm, LocalComm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from ranks import run_ranks  # noqa: E402
import federated_worker as worker  # noqa: E402

WORLD = 2


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(HERE / "federated_worker.py", WORLD, tmp_path_factory.mktemp("fed"))


@pytest.mark.parametrize("name", list(worker.RUNS))
def test_two_ranks_equal_one_process(ranks, name):
    # Same seeds: the same clients draw the same batches and local noise on either layout, and the
    # server noise is drawn once (on rank 0). Noise added on every rank would break the equality.
    ref_params, ref_eps = worker.run(name, LocalComm(), init_seed=0)
    for r in ranks:
        params, eps = r[name]
        for k, v in ref_params.items():
            torch.testing.assert_close(params[k], v, atol=1e-5, rtol=1e-4, msg=f"{name}: {k}")
        assert eps == pytest.approx(ref_eps)


def test_report_of_an_example_level_run_on_one_rank_alone(ranks):
    """report() gathered max_k σ_k with a collective, so rank 0 alone printing it crashed (the other rank had
    left); it is now gathered when every rank takes part."""
    rep = ranks[0]["report"]
    assert rep["dp"] == "example" and rep["noise_multiplier"] == pytest.approx(0.9)
    assert rep["epsilon_spent"] == pytest.approx(ranks[1]["fedsvd-example"][1])


def test_server_noise_added_once_with_stated_std(ranks):
    a, b = ranks[0]["noise"], ranks[1]["noise"]
    assert torch.equal(a, b)  # every rank holds rank 0's release
    # n s² / (σS)² ~ χ²(n); two-sided, false-failure probability 2e-7
    n, std = a.numel(), 1.3 * 0.7
    stat = float((a.double() ** 2).sum()) / std ** 2
    assert stats.chi2.ppf(1e-7, n) < stat < stats.chi2.ppf(1 - 1e-7, n)


def test_distributed_comm_needs_a_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        DistributedComm()
