"""The ghost (book-keeping) path gives the same clipped sums as the vmap engine: mixed models, all batch sizes."""
from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch
from torch import nn

from dptrain import ClippingConfig, clip_and_sum
from dptrain.ghost import ghost_clip_and_sum as fast_clip_and_sum
from dptrain.ghost_plan import ghost_supported as fast_path_supported

_spec = importlib.util.spec_from_file_location("dp_test_models", pathlib.Path(__file__).with_name("models.py"))
models = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(models)  # type: ignore[union-attr]

LOSS = nn.CrossEntropyLoss()


class SeqLinear(nn.Module):
    """Linear on sequences (3-D inputs): explicit-sized (wide, narrow) and Gram-trick-sized (mid)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 6, padding_idx=0)
        self.wide = nn.Linear(6, 40)  # T(in+out) > in·out → explicit
        self.norm = nn.LayerNorm(40)
        self.mid = nn.Linear(40, 40)  # T(in+out) < in·out → T×T Gram trick
        self.narrow = nn.Linear(40, 3)

    def forward(self, x):
        return self.narrow(torch.tanh(self.mid(self.norm(torch.relu(self.wide(self.emb(x))))))).mean(1)


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3, padding=1, dilation=1)
        self.c2 = nn.Conv2d(1, 3, 3, stride=2, padding=1)
        self.gn = nn.GroupNorm(1, 3)
        self.fc = nn.Linear(4 * 8 + 3 * 4 * 4, 3)

    def forward(self, x):
        a = self.c1(x[:, :16].reshape(-1, 2, 8)).flatten(1)
        b = self.gn(self.c2(x[:, 16:].reshape(-1, 1, 8, 8))).flatten(1)
        return self.fc(torch.cat([torch.tanh(a), b], 1))


def cases():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    idx = torch.randint(0, 20, (7, 9), generator=g)
    idx[:, :3] = idx[:, 3:6]  # duplicate indices within an example
    idx[0, -2:] = 0  # padding positions
    base = models.cases()
    return {
        "mlp": (nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)), torch.randn(7, 5, generator=g),
                torch.randint(0, 3, (7,), generator=g)),
        "seq_linear+embedding+layernorm": (SeqLinear(), idx, torch.randint(0, 3, (7,), generator=g)),
        "conv1d+conv2d+groupnorm": (Mixed(), torch.randn(7, 80, generator=g), torch.randint(0, 3, (7,), generator=g)),
        "conv2d+groupnorm(zoo)": base["conv2d+groupnorm"],
        "conv1d(zoo)": base["conv1d"],
        "embedding+layernorm(zoo)": base["embedding+layernorm"],
        "multihead_attention(zoo)": base["multihead_attention"],
        "transformer_encoder_layer(zoo)": base["transformer_encoder_layer"],
    }


@pytest.mark.parametrize("name", list(cases()))
@pytest.mark.parametrize("clip", [1e-3, 0.5, 1e6])
@pytest.mark.parametrize("batch", [0, 1, 7])
def test_fast_path_equals_vmap(name, clip, batch):
    model, x, y = cases()[name]
    x, y = x[:batch], y[:batch]
    assert fast_path_supported(model)
    fast = fast_clip_and_sum(model, LOSS, x, y, ClippingConfig(clip))
    ref = clip_and_sum(model, LOSS, x, y, ClippingConfig(clip), method="vmap")
    assert fast is not None and fast.batch_size == ref.batch_size == len(y)
    assert fast.clipped_count == ref.clipped_count
    for k in ref.sums:
        torch.testing.assert_close(fast.sums[k], ref.sums[k], atol=1e-5, rtol=1e-4, msg=f"{name} {k}")


def test_conv_per_example_gradients_in_blocks_match_vmap(monkeypatch):
    """On the CPU a conv's per-example gradients are formed a block of examples at a time. Small-C_in
    convs (patches): blocks of 5 and 2 (Conv1d, 192 bytes an example) and of 1 (Conv2d, 576 bytes); the
    grouped-conv path (Conv2d 8 → 4, 3×3: C_in·k = 72): blocks of 3, 3 and 1 (10,368 bytes an example).
    Each gives the vmap engine's sums."""
    from dptrain import ghost_layers

    monkeypatch.setattr(ghost_layers, "PATCH_BLOCK_BYTES", 1000)
    monkeypatch.setattr(ghost_layers, "GROUPED_BLOCK_BYTES", 32000)
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Conv2d(8, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    g = torch.Generator().manual_seed(1)
    for model, x, y in (cases()["conv1d+conv2d+groupnorm"],
                        (wide, torch.randn(7, 8, 6, 6, generator=g), torch.randint(0, 3, (7,), generator=g))):
        fast = fast_clip_and_sum(model, LOSS, x, y, ClippingConfig(0.5))
        ref = clip_and_sum(model, LOSS, x, y, ClippingConfig(0.5), method="vmap")
        for k in ref.sums:
            torch.testing.assert_close(fast.sums[k], ref.sums[k], atol=1e-5, rtol=1e-4, msg=k)


def test_per_layer_thresholds_and_chunks():
    model, x, y = cases()["conv1d+conv2d+groupnorm"]
    config = ClippingConfig.per_layer(model, 0.3)
    fast = fast_clip_and_sum(model, LOSS, x, y, config, chunk_size=3)
    ref = clip_and_sum(model, LOSS, x, y, config, method="vmap")
    for k in ref.sums:
        torch.testing.assert_close(fast.sums[k], ref.sums[k], atol=1e-5, rtol=1e-4)


def test_huge_outlier_is_clipped_not_overflowed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 0])
    x[0] *= 1e15
    fast = fast_clip_and_sum(model, LOSS, x, y, ClippingConfig(1.0))
    ref = clip_and_sum(model, LOSS, x, y, ClippingConfig(1.0), method="vmap")
    for k in ref.sums:
        assert torch.isfinite(fast.sums[k]).all()
        torch.testing.assert_close(fast.sums[k], ref.sums[k], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("name", ["lstm", "rnn"])
def test_uncovered_models_fall_back(name):
    model, x, y = models.cases()[name]
    assert not fast_path_supported(model)
    assert fast_clip_and_sum(model, LOSS, x, y, ClippingConfig(1.0)) is None
    with pytest.raises(ValueError, match="does not cover"):
        clip_and_sum(model, LOSS, x, y, 1.0, method="fast")
    assert clip_and_sum(model, LOSS, x, y, 1.0).batch_size == len(y)  # auto falls back to vmap


def test_tied_weights_and_module_run_twice_match_vmap():
    model, x, y = models.cases()["tied_weights"]
    fast = fast_clip_and_sum(model, LOSS, x, y, ClippingConfig(0.1))
    ref = clip_and_sum(model, LOSS, x, y, ClippingConfig(0.1), method="vmap")
    torch.testing.assert_close(fast.sums["emb.weight"], ref.sums["emb.weight"], atol=1e-5, rtol=1e-4)


def test_module_run_twice_matches_vmap():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(torch.tanh(self.fc(x)))

    model = Twice()
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    auto = clip_and_sum(model, LOSS, x, y, 1.0)
    ref = clip_and_sum(model, LOSS, x, y, 1.0, method="vmap")
    torch.testing.assert_close(auto.sums["fc.weight"], ref.sums["fc.weight"])
