"""A private step on the fast path reads nothing back from the device but one transfer per chunk.

CUDA is not needed to see a host synchronisation: ``.item()`` / ``float(t)`` / ``bool(t)`` /
``int(t)`` all dispatch ``aten::_local_scalar_dense`` (``bool`` through ``aten::is_nonzero``),
and data-dependent shapes (``nonzero``, ``unique``, boolean indexing) dispatch their own ops,
on CPU as on CUDA; the profiler sees them. The one allowed read-back (finiteness flag and loss
sum together) is a ``Tensor.tolist`` call, counted by wrapping it.
"""
from __future__ import annotations

import collections

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import dptrain
from dptrain.clipping import ClippedBatch

#: operators that wait for the device (scalar read-back or an output shape known only on the device)
SYNC_OPS = ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero", "aten::_unique2",
            "aten::unique_dim", "aten::unique_consecutive", "aten::masked_select", "aten::equal")


class Net(nn.Module):
    """Embedding with repeated indices, multi-head attention, LayerNorm, Conv1d and Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 8, padding_idx=0)
        self.att = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.conv = nn.Conv1d(8, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.emb(x)
        h = self.norm(h + self.att(h, h, h, need_weights=False)[0])
        return self.fc(torch.relu(self.conv(h.transpose(1, 2))).mean(2))


def _counts(fn) -> tuple[dict[str, int], int]:
    calls = 0
    tolist = torch.Tensor.tolist

    def counted(self, *args, **kwargs):
        nonlocal calls
        calls += 1
        return tolist(self, *args, **kwargs)

    torch.Tensor.tolist = counted  # type: ignore[method-assign]
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn()
    finally:
        torch.Tensor.tolist = tolist  # type: ignore[method-assign]
    ops = collections.Counter()
    for e in prof.key_averages():
        if e.key in SYNC_OPS:
            ops[e.key] += e.count
    return dict(ops), calls


@pytest.mark.parametrize("clipping", ["flat", "per-layer"])
def test_fast_path_step_has_one_read_back(clipping):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 12, (40, 6), generator=g)
    x[:, :2] = x[:, 2:4]  # repeated rows within an example
    y = torch.randint(0, 3, (40,), generator=g)
    model = Net()
    priv = dptrain.make_private(model, eps=None, noise_multiplier=1.0, clipping=clipping, seed=0)
    priv.attach(TensorDataset(x, y), batch_size=10, steps=10, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    for _ in range(2):  # fixed batches (internal: recorded as drawn)
        priv.loader._record_drawn(10)
    priv.step(x[:10], y[:10])
    ops, read_backs = _counts(lambda: priv.step(x[10:20], y[10:20]))
    assert ops == {} and read_backs == 1


def test_statistics_are_read_back_lazily_and_once():
    batch = ClippedBatch({}, 4, torch.tensor(2.0), torch.tensor(3), {"a": torch.tensor(1), "b": 2})
    ops, read_backs = _counts(lambda: (batch.mean_loss, batch.loss_sum))
    assert read_backs == 1 and not ops.get("aten::_local_scalar_dense")
    ops, read_backs = _counts(lambda: (batch.clipped_count, batch.unclipped, batch.clipped_count))
    assert read_backs == 1 and not ops.get("aten::_local_scalar_dense")
    assert (batch.loss_sum, batch.mean_loss, batch.clipped_count, batch.unclipped) == (2.0, 0.5, 3, {"a": 1, "b": 2})
    assert isinstance(batch.clipped_count, int) and isinstance(batch.loss_sum, float)


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_lazy_step_without_host_sync_but_one_read_back_per_chunk(chunk_size):
    # the lazy path as it runs on a GPU (catch-up by sorting, not torch.unique): nothing waits for
    # the device but the one read-back per chunk (finiteness flag and loss sum)
    class Rec(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Embedding(1000, 8)
            self.fc = nn.Linear(16, 2)

        def forward(self, x):
            return self.fc(self.table(x).flatten(1))

    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 1000, (40, 2), generator=g), torch.randint(0, 2, (40,), generator=g)
    x[:5, 1] = x[:5, 0]  # a row read twice by one example
    model = Rec()
    priv = dptrain.make_private(model, eps=None, noise_multiplier=1.0, mechanism="lazy", seed=0,
                                chunk_size=chunk_size)
    priv.attach(TensorDataset(x, y), batch_size=8, steps=10, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    priv.tables.sync_free = True
    for _ in range(2):  # fixed batches (internal: recorded as drawn)
        priv.loader._record_drawn(8)
    priv.step(x[:8], y[:8])
    ops, read_backs = _counts(lambda: priv.step(x[8:16], y[8:16]))
    assert ops == {} and read_backs == (1 if chunk_size is None else 2)
