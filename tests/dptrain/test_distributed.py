"""Data-parallel DP-SGD (2 gloo processes on localhost) equals the single-process run.

The two ranks run tests/dptrain/distributed_worker.py; this test compares their outputs with
the same computations done here in one process.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from scipy import stats
from torch import nn

import dptrain

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from ranks import free_port, run_ranks  # noqa: E402
import distributed_worker as worker  # noqa: E402

WORLD = 2


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(HERE / "distributed_worker.py", WORLD, tmp_path_factory.mktemp("ddp"))


def test_same_clipped_sum_as_one_process(ranks):
    x, y = worker.data().tensors
    ref = dptrain.clip_and_sum(worker.model(0), nn.CrossEntropyLoss(), x[:20], y[:20], worker.CLIP)
    for r in ranks:
        for k, v in ref.sums.items():
            torch.testing.assert_close(r["clipped_sum"][k], v, atol=1e-6, rtol=1e-5)


def test_noise_added_once_with_stated_std(ranks):
    a, b = ranks[0]["noise"], ranks[1]["noise"]
    assert torch.equal(a, b)  # every rank holds the same release
    n = a.numel()
    stat = float((a.double() ** 2).sum())  # ~ σ² χ²_n with σ = 1 if noise was added once
    # two-sided, false-failure probability 1e-7; noise added on both ranks gives stat ≈ 2n, far outside
    assert stats.chi2.ppf(0.5e-7, n) < stat < stats.chi2.isf(0.5e-7, n)
    assert stats.chi2.isf(0.5e-7, n) < 1.9 * n  # the test would reject variance 2


@pytest.fixture(scope="module")
def single():
    return worker.train(model_seed=0)


def test_global_poisson_batches_partition_the_single_process_batches(ranks, single):
    _, drawn = single
    for step, full in enumerate(drawn):
        shards = [r["drawn"][step] for r in ranks]
        for rank, s in enumerate(shards):
            assert bool((s % WORLD == rank).all())
        assert torch.equal(torch.sort(torch.cat(shards)).values, full)  # each sampled example on exactly one rank


def test_same_model_and_epsilon_as_one_process(ranks, single):
    single, _ = single
    for r in ranks:
        for k, v in single.model.state_dict().items():
            torch.testing.assert_close(r["params"][k], v, atol=1e-5, rtol=1e-5)
        assert r["epsilon"] == single.epsilon_spent()
        rep = single.report(history_points=2).to_dict()
        assert r["report"] == rep


def test_checkpoint_written_by_rank0_only_and_resumable(ranks):
    assert [r["saves"] for r in ranks] == [1, 0]
    assert all(r["resumed_steps"] == worker.STEPS for r in ranks)


def test_diff2_across_ranks_equals_simulated_clients(ranks):
    single = worker.diff2_run(worker.diff2_clients(), model_seed=0)
    for r in ranks:
        for k, v in single.model.state_dict().items():
            torch.testing.assert_close(r["diff2_params"][k], v, atol=1e-5, rtol=1e-5)
        assert r["diff2_epsilon"] == single.epsilon_spent()


def test_ranks_that_disagree_on_the_plan_are_refused(ranks):
    """A federated clip norm (rank 1 clipped at 100 under noise for 1), a DIFF2 level, a DP-SGD target ε that
    differ between ranks ran (or crashed in a collective later) instead of being refused."""
    for r in ranks:
        assert r["refused"] == {"federated clip norm": True, "diff2 level": True, "dpsgd target eps": True}


def test_distributed_true_without_process_group_is_refused():
    priv = dptrain.make_private(worker.model(0), noise_multiplier=1.0, eps=None, distributed=True)
    with pytest.raises(dptrain.PrivacyConfigError, match="init_process_group"):
        priv.attach(worker.data(), batch_size=8, steps=2)


def test_mechanisms_without_a_distributed_path_are_refused():
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        table = nn.Sequential(nn.Embedding(50, 4), nn.Flatten(), nn.Linear(8, 2))
        ids = torch.utils.data.TensorDataset(torch.randint(0, 50, (40, 2)), torch.randint(0, 2, (40,)))
        for net, data, kwargs in ((worker.model(0), worker.data(), dict(mechanism="banded-mf")),
                                  (table, ids, dict(mechanism="lazy"))):
            priv = dptrain.make_private(net, eps=3.0, distributed=True, **kwargs)
            with pytest.raises(dptrain.PrivacyConfigError, match="distributed training supports"):
                priv.attach(data, batch_size=8, steps=4, optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
    finally:
        dist.destroy_process_group()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nccl_rank_on_gpu_equals_the_single_process_gpu_run(tmp_path):
    # One NCCL rank (the machines here have one GPU): clipping on the GPU, the all-reduce and the
    # rank-0 noise through NCCL give the model and ε of the same run without a process group.
    out = run_ranks(HERE / "nccl_worker.py", 1, tmp_path)[0]
    assert out["nccl"]["device"].startswith("cuda") and out["noise_device"].startswith("cuda")
    for k, v in out["single"]["params"].items():
        torch.testing.assert_close(out["nccl"]["params"][k], v, atol=1e-5, rtol=1e-5)
    assert out["nccl"]["epsilon"] == out["single"]["epsilon"]
    n = out["noise"].numel()
    stat = float((out["noise"].double() ** 2).sum())  # σ = 1: ~ χ²_n; false-failure probability 1e-7
    assert stats.chi2.ppf(0.5e-7, n) < stat < stats.chi2.isf(0.5e-7, n)
