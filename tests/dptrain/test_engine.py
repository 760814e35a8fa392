"""Per-example gradients equal a loop of single-example autograd.grad calls."""
from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch
from torch import nn

from dptrain import per_sample_grads, trainable_parameters

_spec = importlib.util.spec_from_file_location("dp_test_models", pathlib.Path(__file__).with_name("models.py"))
models = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(models)  # type: ignore[union-attr]

LOSS = nn.CrossEntropyLoss()


def reference_grads(model, x, y):
    params = trainable_parameters(model)
    rows = []
    for i in range(len(y)):
        loss = LOSS(model(x[i:i + 1]), y[i:i + 1])
        rows.append(torch.autograd.grad(loss, list(params.values()), allow_unused=True))
    return {name: torch.stack([r[j] if r[j] is not None else torch.zeros_like(p) for r in rows])
            for j, (name, p) in enumerate(params.items())}


@pytest.mark.parametrize("name", list(models.cases()))
def test_per_sample_grads_match_loop(name):
    model, x, y = models.cases()[name]
    got = per_sample_grads(model, LOSS, x, y)
    want = reference_grads(model, x, y)
    assert set(got) == set(want)
    for k in want:
        assert got[k].shape == (len(y), *trainable_parameters(model)[k].shape)
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4, msg=f"{name}: {k}")


@pytest.mark.parametrize("name", ["linear", "transformer_encoder_layer", "lstm"])
def test_vmap_and_loop_paths_agree(name):
    model, x, y = models.cases()[name]
    a = per_sample_grads(model, LOSS, x, y, method="vmap")
    b = per_sample_grads(model, LOSS, x, y, method="loop")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_frozen_parameters_are_skipped_and_buffers_used():
    model, x, y = models.cases()["buffers+frozen"]
    got = per_sample_grads(model, LOSS, x, y)
    assert set(got) == {"fc.weight", "fc.bias"}


def test_tied_weights_get_the_gradient_of_both_uses():
    model, x, y = models.cases()["tied_weights"]
    got = per_sample_grads(model, LOSS, x, y)
    assert list(got) == ["emb.weight"]  # one tensor, as in named_parameters()
    # the output projection alone would give a gradient with non-zero rows for every class;
    # the sum over both uses must match the loop (checked above) and differ from either use alone
    loss = LOSS(model(x[:1]), y[:1])
    full = torch.autograd.grad(loss, model.emb.weight)[0]
    torch.testing.assert_close(got["emb.weight"][0], full, atol=1e-5, rtol=1e-4)


def test_chunking_gives_identical_results():
    model, x, y = models.cases()["conv2d+groupnorm"]
    a = per_sample_grads(model, LOSS, x, y)
    b = per_sample_grads(model, LOSS, x, y, chunk_size=3)
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_empty_and_single_example_batches():
    model, x, y = models.cases()["linear"]
    empty = per_sample_grads(model, LOSS, x[:0], y[:0])
    assert all(v.shape[0] == 0 for v in empty.values())
    one = per_sample_grads(model, LOSS, x[:1], y[:1])
    assert all(v.shape[0] == 1 for v in one.values())


def test_dropout_masks_are_independent_per_example():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 64), nn.Dropout(0.5), nn.Linear(64, 2))
    x = torch.ones(2, 4).repeat(1, 1)
    y = torch.zeros(2, dtype=torch.long)
    g = per_sample_grads(model, LOSS, x, y)
    # identical examples, different dropout masks -> different gradients
    assert not torch.allclose(g["0.weight"][0], g["0.weight"][1])


def test_multiple_inputs():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(4, 2)

        def forward(self, u, v):
            return self.a(u) + self.b(v)

    torch.manual_seed(1)
    model = TwoInputs()
    u, v, y = torch.randn(3, 3), torch.randn(3, 4), torch.tensor([0, 1, 1])
    got = per_sample_grads(model, LOSS, (u, v), y)
    for i in range(3):
        loss = LOSS(model(u[i:i + 1], v[i:i + 1]), y[i:i + 1])
        ref = torch.autograd.grad(loss, [model.a.weight])[0]
        torch.testing.assert_close(got["a.weight"][i], ref, atol=1e-6, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", list(models.cases()))
def test_per_sample_grads_match_loop_on_cuda(name):
    model, x, y = models.cases()[name]
    model, x, y = model.cuda(), x.cuda(), y.cuda()
    got = per_sample_grads(model, LOSS, x, y)
    want = reference_grads(model, x, y)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4, msg=f"{name}: {k}")


@pytest.mark.parametrize("loss_cls", [nn.CrossEntropyLoss, nn.NLLLoss])
@pytest.mark.parametrize("method", ["vmap", "loop", "fast"])
def test_class_weights_of_a_mean_loss_are_kept_per_example(loss_cls, method):
    """Over a batch of one, a weighted 'mean' divides by the example's own weight, so the weights did nothing;
    the per-example loss is w_{y_i}·ℓ_i (the 'sum' form), on every engine."""
    from dptrain import ClippingConfig, clip_and_sum
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3), nn.LogSoftmax(-1)) if loss_cls is nn.NLLLoss else nn.Linear(5, 3)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    w = torch.tensor([1.0, 4.0, 0.25])
    weighted = clip_and_sum(model, loss_cls(weight=w), x, y, ClippingConfig(1e6), method=method).sums
    summed = clip_and_sum(model, loss_cls(weight=w, reduction="sum"), x, y, ClippingConfig(1e6), method=method).sums
    plain = clip_and_sum(model, loss_cls(), x, y, ClippingConfig(1e6), method=method).sums
    for k in weighted:
        torch.testing.assert_close(weighted[k], summed[k])
        assert not torch.allclose(weighted[k], plain[k])


@pytest.mark.parametrize("method", ["vmap", "fast"])
def test_class_weights_on_per_position_outputs_average_over_positions(method):
    """[B, C, T] logits: weights all 1 give the unweighted loss (a mean over positions, not a sum), and
    weights act per position: ℓ_i = Σ_t w_{y_it} ℓ_it / T."""
    from dptrain import ClippingConfig, clip_and_sum
    torch.manual_seed(0)
    model = nn.Conv1d(3, 5, 1)
    x, y = torch.randn(4, 3, 7), torch.randint(0, 5, (4, 7))
    big = ClippingConfig(1e6)
    ones = clip_and_sum(model, nn.CrossEntropyLoss(weight=torch.ones(5)), x, y, big, method=method).sums
    plain = clip_and_sum(model, nn.CrossEntropyLoss(), x, y, big, method=method).sums
    w = torch.tensor([1.0, 2.0, 3.0, 0.5, 1.0])
    weighted = clip_and_sum(model, nn.CrossEntropyLoss(weight=w), x, y, big, method=method).sums
    summed = clip_and_sum(model, nn.CrossEntropyLoss(weight=w, reduction="sum"), x, y, big, method=method).sums
    for k in plain:
        torch.testing.assert_close(ones[k], plain[k])
        torch.testing.assert_close(weighted[k], summed[k] / 7)
