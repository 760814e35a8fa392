"""The book-keeping path refuses a model whose recorded rows are not the batch's examples (dptrain.ghost_alignment)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dptrain import clip_and_sum
from dptrain import ghost_alignment as gal

LOSS = nn.CrossEntropyLoss()


class PositionTable(nn.Module):
    """Learned positions looked up with arange(S) and broadcast over the batch: rows are positions."""

    def __init__(self, s: int):
        super().__init__()
        self.tok, self.pos, self.fc = nn.Embedding(10, 4), nn.Embedding(s, 4), nn.Linear(4, 3)

    def forward(self, idx):
        return self.fc(torch.tanh(self.tok(idx) + self.pos(torch.arange(idx.shape[1]))).mean(1))


class TimeMajor(nn.Module):
    """A Linear run on [S, B, E] inside the model (batch still first at the input and output)."""

    def __init__(self):
        super().__init__()
        self.lin, self.fc = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.lin(x.transpose(0, 1))).transpose(0, 1).mean(1))


class TimeMajorEncoder(nn.Module):
    """The stock nn.TransformerEncoderLayer(batch_first=False)."""

    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.Embedding(7, 6), nn.Linear(6, 3)
        self.tel = nn.TransformerEncoderLayer(6, 2, 4, dropout=0.0)

    def forward(self, idx):
        return self.fc(self.tel(self.emb(idx).transpose(0, 1)).transpose(0, 1)[:, 0])


class Flipped(nn.Module):
    """Rows reversed around a Linear: row r of its input and output belongs to example B − 1 − r."""

    def __init__(self):
        super().__init__()
        self.lin, self.fc = nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.lin(x.flip(0)).flip(0)))


def _cases():
    torch.manual_seed(0)
    return [
        ("positions", PositionTable(4), torch.randint(0, 10, (4, 4))),
        ("time-major", TimeMajor(), torch.randn(4, 4, 4)),
        ("encoder", TimeMajorEncoder(), torch.randint(0, 7, (3, 3))),
        ("flipped", Flipped(), torch.randn(6, 5)),
    ]


@pytest.mark.parametrize("name,model,x", _cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_rows_that_are_not_examples_are_refused_and_auto_equals_vmap(name, model, x):
    y = torch.randint(0, 3, (x.shape[0],), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="rows"):
        clip_and_sum(model, LOSS, x, y, 0.3, method="fast")
    ref = clip_and_sum(model, LOSS, x, y, 0.3, method="vmap")
    auto = clip_and_sum(model, LOSS, x, y, 0.3)
    for k, v in ref.sums.items():
        torch.testing.assert_close(auto.sums[k], v, atol=1e-6, rtol=1e-5)


def test_each_example_contribution_stays_bounded_when_a_position_table_has_batch_size_rows():
    """Replace-one neighbours: the clipped sums differ by at most 2C (before the check: up to 3.7C)."""
    c, worst = 0.01, 0.0
    for seed in range(40):
        torch.manual_seed(seed)
        model = PositionTable(4)
        with torch.no_grad():
            model.fc.weight.mul_(20)
        x, y = torch.randint(0, 10, (4, 4)), torch.randint(0, 3, (4,))
        x2, y2 = x.clone(), y.clone()
        x2[0], y2[0] = torch.randint(0, 10, (4,)), (y[0] + 1) % 3
        a, b = clip_and_sum(model, LOSS, x, y, c).sums, clip_and_sum(model, LOSS, x2, y2, c).sums
        worst = max(worst, float(torch.cat([(a[k] - b[k]).double().flatten() for k in a]).norm()))
    assert worst <= 2 * c * (1 + 1e-5)


def test_the_check_runs_once_per_signature_and_aligned_models_keep_the_fast_path(monkeypatch):
    calls = []
    real = gal.weighted_summaries
    monkeypatch.setattr(gal, "weighted_summaries", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    for _ in range(3):
        clip_and_sum(model, LOSS, x, y, 0.5, method="fast")
    assert len(calls) == 1
    clip_and_sum(model, LOSS, x[:5], y[:5], 0.5, method="fast")  # a new batch size: checked once more
    clip_and_sum(model, LOSS, x[:5], y[:5], 0.5, method="fast")
    assert len(calls) == 2
    model[0].weight.requires_grad_(False)  # a new structure: verdicts start afresh
    clip_and_sum(model, LOSS, x, y, 0.5, method="fast")
    assert len(calls) == 3


def test_rows_are_examples_verdicts():
    g = torch.tensor([[1.0, -2.0], [0.0, 0.0], [3.0, 1.0]])
    w = torch.tensor([1.0, 2.0, 4.0])

    def verdict(plain, weighted, b=3, weights=w):
        return gal.rows_are_examples(plain, [gal.row_summaries(t, b) for t in weighted], weights, b)

    assert verdict([g], [g * w[:, None]]) is True
    assert verdict([g], [g * w.flip(0)[:, None]]) is False  # rows of other examples
    assert verdict([g], [g.sum(0, keepdim=True).expand(3, 2) + g]) is False  # rows fed by every example
    bad = g.clone()
    bad[0, 0] = float("inf")
    assert verdict([bad], [bad * w[:, None]]) is True  # the other rows are compared
    assert verdict([bad], [bad.flip(0) * w[:, None]]) is None  # inconclusive: checked later
    assert verdict([bad[:1]], [bad[:1]], 1, w[:1]) is None  # no finite row
    spread = bad * w[:, None]
    spread[2] = spread[2] + 1
    assert verdict([bad], [spread]) is False
    assert verdict([None, g], [None, g * w[:, None]]) is True
    assert verdict([None], [g]) is False
    assert verdict([g[:2]], [g[:2] * 5]) is True  # not batch-sized: the rules refuse it
    weights = gal.example_weights(64, torch.device("cpu"), torch.float32)
    assert len(set(weights.tolist())) == gal.LEVELS and set(weights.tolist()) <= {2.0 ** k for k in range(8)}


def test_make_private_attaches_a_position_table_model_and_still_refuses_one_that_mixes_examples():
    """At attach the probe (batch of 4) meets S = B = 4: not an error, the vmap engine takes the model; a
    forward that centres the batch is an error even though the fast path has refused it."""
    import dptrain
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    data = TensorDataset(torch.randint(0, 10, (64, 4)), torch.randint(0, 3, (64,)))
    priv = dptrain.make_private(PositionTable(4), eps=3.0)
    priv.attach(data, batch_size=16, epochs=1, optimizer=torch.optim.SGD(priv.model.parameters(), lr=0.1))
    x, y = data[:4]
    priv.loader._record_drawn(4)  # the probe's batch, stepped on as if drawn (internal)
    assert torch.isfinite(torch.tensor(priv.step(x, y)))

    class CentresTimeMajor(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            h = self.lin(x.transpose(0, 1)).transpose(0, 1).mean(1)
            return h - h.mean(0, keepdim=True)

    priv = dptrain.make_private(CentresTimeMajor(), eps=3.0)
    with pytest.raises(dptrain.UnsupportedModuleError, match="mixes examples"):
        priv.attach(TensorDataset(torch.randn(64, 4, 4), torch.randint(0, 3, (64,))), batch_size=16, epochs=1)
