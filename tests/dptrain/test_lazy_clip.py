"""Sparse clipping for the lazy path: one flat norm over tables and dense layers, each example bounded by C."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dptrain import ClippingConfig, UnsupportedModuleError, clip_and_sum
from dptrain.lazy_clip import sparse_clip_and_sum, table_parameters

LOSS = nn.CrossEntropyLoss()


class Mixed(nn.Module):
    """Two tables (one Embedding with padding, one EmbeddingBag) feeding an MLP."""

    def __init__(self, sparse: bool = False) -> None:
        super().__init__()
        self.user = nn.Embedding(40, 6, padding_idx=0, sparse=sparse)
        self.items = nn.EmbeddingBag(50, 6, mode="sum")
        self.mlp = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x):
        return self.mlp(torch.cat([self.user(x[:, 0]), self.items(x[:, 1:])], 1))


def _batch(b=9):
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randint(0, 40, (b, 1), generator=g), torch.randint(0, 50, (b, 4), generator=g)], 1)
    x[1, 0] = 0  # the padding row
    x[2, 1:3] = 7  # a row twice in one bag
    x[3] = x[4]  # two examples reading the same rows
    return x, torch.randint(0, 3, (b,), generator=g)


def _dense_table(rows: torch.Tensor, vals: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return torch.zeros(shape).index_add_(0, rows, vals)


@pytest.mark.parametrize("clip", [1e-3, 0.3, 1e6])
def test_sparse_sums_equal_the_vmap_engine(clip):
    torch.manual_seed(0)
    model, (x, y) = Mixed(), _batch()
    got = sparse_clip_and_sum(model, LOSS, x, y, ClippingConfig(clip))
    ref = clip_and_sum(model, LOSS, x, y, ClippingConfig(clip), method="vmap")
    params = dict(model.named_parameters())
    assert set(got.rows) == {"user.weight", "items.weight"} == set(table_parameters(model))
    for k, v in ref.sums.items():
        mine = _dense_table(*got.rows[k], params[k].shape) if k in got.rows else got.dense[k]
        torch.testing.assert_close(mine, v, atol=1e-6, rtol=1e-4, msg=k)
    assert got.clipped_count == ref.clipped_count and got.batch_size == 9
    for k, (rows, _) in got.rows.items():  # only rows the batch read, each once
        assert rows.numel() == torch.unique(rows).numel() and rows.numel() < params[k].shape[0]


def test_each_example_contribution_is_bounded_by_the_clip_norm():
    # flat clipping over tables and MLP together: ‖clip(g_i)‖ ≤ C for every example
    torch.manual_seed(0)
    model, (x, y) = Mixed(), _batch()
    with torch.no_grad():
        model.user.weight.mul_(50)  # large gradients everywhere: every example is clipped
    c = 0.25
    for i in range(len(y)):
        one = sparse_clip_and_sum(model, LOSS, x[i:i + 1], y[i:i + 1], ClippingConfig(c))
        sq = sum(float(v.double().square().sum()) for v in one.dense.values())
        sq += sum(float(vals.double().square().sum()) for _, vals in one.rows.values())
        assert one.clipped_count == 1 and sq ** 0.5 <= c * (1 + 1e-5)


def test_sparse_flag_is_irrelevant_and_per_layer_thresholds_apply():
    torch.manual_seed(0)
    dense_model = Mixed()
    sparse_model = Mixed(sparse=True)
    sparse_model.load_state_dict(dense_model.state_dict())
    x, y = _batch()
    th = {k: 0.1 for k, _ in dense_model.named_parameters()}
    a = sparse_clip_and_sum(dense_model, LOSS, x, y, ClippingConfig(1.0, th))
    b = sparse_clip_and_sum(sparse_model, LOSS, x, y, ClippingConfig(1.0, th))
    ref = clip_and_sum(dense_model, LOSS, x, y, ClippingConfig(1.0, th), method="vmap")
    for k, (rows, vals) in b.rows.items():
        torch.testing.assert_close(vals, a.rows[k][1])
        torch.testing.assert_close(_dense_table(rows, vals, ref.sums[k].shape), ref.sums[k], atol=1e-6, rtol=1e-4)


def test_a_table_tied_to_an_output_layer_is_refused():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.out = nn.Linear(4, 10, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, x):
            return self.out(self.emb(x))

    with pytest.raises(UnsupportedModuleError, match="emb.weight.*outside its own lookups"):
        sparse_clip_and_sum(Tied(), LOSS, torch.tensor([1, 2]), torch.tensor([3, 4]), ClippingConfig(1.0))


def test_plan_is_reused_until_the_model_changes():
    from dptrain.lazy_clip import LazyPlans

    model = Mixed()
    plans = LazyPlans(model)
    first, tables = plans.get()
    assert plans.get()[0] is first and set(tables) == {"user.weight", "items.weight"}
    model.mlp[0].weight.requires_grad_(False)  # a frozen layer: a new plan without it
    second, _ = plans.get()
    assert second is not first and "mlp.0.weight" not in second.params
    handle = model.mlp[2].register_forward_pre_hook(lambda m, a: None)  # its closed form no longer applies
    third, _ = plans.get()
    assert third is not second and third.kinds["mlp.2"] == "generic"
    handle.remove()
    model.mlp[0] = nn.Linear(12, 16)  # a replaced module
    assert plans.get()[0] is not third and "mlp.0.weight" in plans.get()[0].params
