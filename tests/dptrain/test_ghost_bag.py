"""nn.EmbeddingBag on the book-keeping path: sparse-row per-example gradients equal the reference engines."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dptrain import ClippingConfig, clip_and_sum
from dptrain.ghost import ghost_clip_and_sum
from dptrain.ghost_plan import _kind

LOSS = nn.CrossEntropyLoss()


class BagNet(nn.Module):
    def __init__(self, mode: str, padding_idx: int | None, weighted: bool, flat: bool) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(15, 4, mode=mode, padding_idx=padding_idx)
        self.fc = nn.Linear(4, 3)
        self.weighted, self.flat = weighted, flat

    def forward(self, x):
        w = (x.float() * 0.1 + 0.5) if self.weighted else None
        if self.flat:  # 1-D indices + offsets, as recommenders feed variable-length bags
            offsets = torch.arange(0, x.numel(), x.shape[1])
            e = self.bag(x.reshape(-1), offsets, per_sample_weights=None if w is None else w.reshape(-1))
        else:
            e = self.bag(x, per_sample_weights=w)
        return self.fc(torch.tanh(e))


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 15, (6, 5), generator=g)
    x[:, 0] = x[:, 1]  # a row twice in one bag
    x[0, :] = 3  # a bag made only of the padding index (when padding_idx=3)
    return x, torch.randint(0, 3, (6,), generator=g)


CASES = [("sum", None, False, False), ("sum", 3, True, False), ("mean", None, False, False),
         ("mean", 3, False, False), ("sum", 3, True, True), ("mean", 3, False, True), ("mean", None, False, True)]


@pytest.mark.parametrize("mode,padding_idx,weighted,flat", CASES)
@pytest.mark.parametrize("clip", [1e-2, 1e6])
def test_embedding_bag_rows_equal_reference(mode, padding_idx, weighted, flat, clip):
    torch.manual_seed(1)
    model = BagNet(mode, padding_idx, weighted, flat)
    assert _kind(model.bag) == "embedding_bag"  # the sparse-row form, not the generic vmap fallback
    x, y = _data()
    fast = ghost_clip_and_sum(model, LOSS, x, y, ClippingConfig(clip))
    # vmap needs batch-first inputs to the layer; the flat form is checked one example at a time
    ref = clip_and_sum(model, LOSS, x, y, ClippingConfig(clip), method="loop" if flat else "vmap")
    assert fast is not None and fast.clipped_count == ref.clipped_count
    for k in ref.sums:
        torch.testing.assert_close(fast.sums[k], ref.sums[k], atol=1e-5, rtol=1e-4, msg=k)


def test_max_mode_takes_the_generic_path_and_still_matches():
    torch.manual_seed(1)
    model = BagNet("max", None, False, False)
    assert _kind(model.bag) == "generic"
    x, y = _data()
    fast = ghost_clip_and_sum(model, LOSS, x, y, ClippingConfig(0.05))
    ref = clip_and_sum(model, LOSS, x, y, ClippingConfig(0.05), method="vmap")
    assert fast is not None
    for k in ref.sums:
        torch.testing.assert_close(fast.sums[k], ref.sums[k], atol=1e-5, rtol=1e-4)
