"""The fast path's model plan: cached while the model's structure is unchanged, made again when it changes."""
from __future__ import annotations

import torch
from torch import nn

from dptrain import ghost_plan
from dptrain.ghost import ghost_clip_and_sum

LOSS = nn.CrossEntropyLoss()


def test_the_cached_plan_is_reused_and_follows_changes_to_the_model():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 3))
    x, y = torch.randint(0, 10, (6, 2)), torch.randint(0, 3, (6,))
    assert ghost_plan.current_plan(model) is ghost_plan.current_plan(model)
    assert ghost_clip_and_sum(model, LOSS, x, y, 1.0) is not None
    model[0].max_norm = 1.0  # the lookup now renormalizes rows in place: not on the fast path
    assert ghost_clip_and_sum(model, LOSS, x, y, 1.0) is None
    model[0].max_norm = None
    model[2].bias.requires_grad_(False)
    got = ghost_clip_and_sum(model, LOSS, x, y, 1.0)
    assert got is not None and set(got.sums) == {"0.weight", "2.weight"}
    model[2] = nn.Linear(8, 3)  # a new module
    assert set(ghost_clip_and_sum(model, LOSS, x, y, 1.0).sums) == {"0.weight", "2.weight", "2.bias"}
