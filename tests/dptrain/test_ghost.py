"""The ghost / book-keeping path equals the vmap engine, layer type by layer type, or refuses."""
from __future__ import annotations

import importlib.util
import pathlib
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dptrain import ClippingConfig, clip_and_sum, per_sample_grads
from dptrain import ghost
from dptrain import ghost_layers as gl
from dptrain import ghost_plan
from dptrain.ghost import ghost_clip_and_sum, ghost_norms
from dptrain.ghost_plan import ghost_supported

_spec = importlib.util.spec_from_file_location("dp_test_models", pathlib.Path(__file__).with_name("models.py"))
models = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(models)  # type: ignore[union-attr]

LOSS = nn.CrossEntropyLoss()


class SeqNet(nn.Module):
    """Embedding (padding_idx) → Linear on [B, T, d]: explicit-sized (wide) and Gram-sized (mid) → RMSNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 6, padding_idx=0)
        self.wide = nn.Linear(6, 40)  # T(in+out) > in·out → explicit per-example weight grads
        self.norm = nn.LayerNorm(40)
        self.mid = nn.Linear(40, 40)  # T(in+out) < in·out → T×T Gram trick
        self.rms = nn.RMSNorm(40)
        self.head = nn.Linear(40, 3)

    def forward(self, x):
        h = self.mid(self.norm(torch.relu(self.wide(self.emb(x)))))
        return self.head(self.rms(torch.tanh(h))).mean(1)


class ConvNet(nn.Module):
    """Conv1d, Conv2d with stride / dilation / groups / 'same' / reflect and circular padding, GroupNorm.

    c1, c2, c3 have many output positions (grouped conv backward); c4 has few (Gram trick on patches).
    """

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(4, 6, 3, padding="same", groups=2, padding_mode="reflect", dilation=2)
        self.gn = nn.GroupNorm(3, 6)
        self.c2 = nn.Conv2d(6, 6, 3, stride=2, groups=6, padding=1, padding_mode="circular")
        self.c4 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.c3 = nn.Conv1d(8, 4, 2, stride=1, padding=1)
        self.fc = nn.Linear(4 * 5, 3)

    def forward(self, x):
        h = self.c4(self.c2(torch.relu(self.gn(self.c1(x)))))  # [B, 8, 2, 2]
        return self.fc(self.c3(h.flatten(2)).flatten(1))


class Scale(nn.Module):
    """A custom module owning parameters: covered by vmap(vjp) of the module alone."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, d))
        self.b = nn.Parameter(torch.linspace(-1, 1, d))

    def forward(self, x):
        return x * self.w + torch.sin(self.b)


class Gate(nn.Module):
    """A custom module owning a parameter and a child Linear (nested recorded modules)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.gate = nn.Parameter(torch.linspace(-2, 2, d))

    def forward(self, x):
        return self.fc(x) * torch.sigmoid(self.gate) + x


class Mixed(nn.Module):
    """Linear run twice, custom modules (one nested), an in-place ReLU on a recorded output, a tied embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.fc = nn.Linear(6, 6)
        self.gate = Gate(6)
        self.scale = Scale(6)
        self.out = nn.Linear(6, 10, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):
        h = self.gate(self.fc(torch.tanh(self.fc(self.emb(x).mean(1)))))
        return self.out(F.relu(self.scale(h), inplace=True))


def cases() -> dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    idx = torch.randint(0, 20, (7, 9), generator=g)
    idx[:, :3] = idx[:, 3:6]  # duplicate indices within an example
    idx[0, -2:] = 0  # padding positions
    y3 = torch.randint(0, 3, (7,), generator=g)
    zoo = models.cases()
    return {
        "linear2d": (nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)), torch.randn(7, 5, generator=g), y3),
        "seq_linear+embedding+layernorm+rmsnorm": (SeqNet(), idx, y3),
        "conv1d+conv2d+groupnorm": (ConvNet(), torch.randn(7, 4, 8, 8, generator=g), y3),
        "mixed(custom, twice, inplace, tied)": (Mixed(), torch.randint(0, 10, (7, 4), generator=g),
                                                torch.randint(0, 10, (7,), generator=g)),
        "zoo conv2d+groupnorm": zoo["conv2d+groupnorm"],
        "zoo conv1d": zoo["conv1d"],
        "zoo embedding+layernorm": zoo["embedding+layernorm"],
        "zoo buffers+frozen": zoo["buffers+frozen"],
        "zoo tied_weights": zoo["tied_weights"],
    }


def assert_same(got, ref, atol=1e-5):
    assert got is not None and got.batch_size == ref.batch_size
    assert got.clipped_count == ref.clipped_count
    assert got.loss_sum == pytest.approx(ref.loss_sum, rel=1e-5, abs=1e-6, nan_ok=True)
    assert set(got.sums) == set(ref.sums)
    for k in ref.sums:
        torch.testing.assert_close(got.sums[k], ref.sums[k], atol=atol, rtol=1e-4, msg=k)


@pytest.mark.parametrize("name", list(cases()))
@pytest.mark.parametrize("clip", [1e-3, 0.3, 1e6])
@pytest.mark.parametrize("batch", [0, 1, 7])
def test_clipped_sums_equal_vmap(name, clip, batch):
    model, x, y = cases()[name]
    x, y = x[:batch], y[:batch]
    assert ghost_supported(model)
    got = ghost_clip_and_sum(model, LOSS, x, y, ClippingConfig(clip))
    assert_same(got, clip_and_sum(model, LOSS, x, y, ClippingConfig(clip), method="vmap"))
    if clip == 1e-3:
        assert got.clipped_count == len(y)  # everything clipped
    if clip == 1e6:
        assert got.clipped_count == 0  # nothing clipped


@pytest.mark.parametrize("name", list(cases()))
def test_per_example_norms_equal_vmap(name):
    model, x, y = cases()[name]
    norms = ghost_norms(model, LOSS, x, y)
    grads = per_sample_grads(model, LOSS, x, y, method="vmap")
    assert norms is not None and set(norms) == set(grads)
    for k, g in grads.items():
        want = torch.linalg.vector_norm(g.flatten(1), dim=1, dtype=torch.float64)
        torch.testing.assert_close(norms[k], want, atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.parametrize("chunk", [None, 1, 3])
def test_per_layer_thresholds_and_chunks(chunk):
    for name in ("conv1d+conv2d+groupnorm", "mixed(custom, twice, inplace, tied)"):
        model, x, y = cases()[name]
        config = ClippingConfig.per_layer(model, 0.3)
        got = ghost_clip_and_sum(model, LOSS, x, y, config, chunk_size=chunk)
        assert_same(got, clip_and_sum(model, LOSS, x, y, config, method="vmap"))


def test_conv_chooses_grouped_backward_or_gram_by_shape():
    model, x, _ = cases()["conv1d+conv2d+groupnorm"]
    wide = gl.conv_terms(model.c1, x, model.c1(x))["weight"]
    h = model.c2(torch.relu(model.gn(model.c1(x))))
    narrow = gl.conv_terms(model.c4, h, model.c4(h))["weight"]
    assert isinstance(wide, gl.Conv) and isinstance(narrow, gl.Outer)


def test_old_style_weight_norm_goes_through_vmap_vjp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.weight_norm(nn.Linear(5, 6)), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(7, 5), torch.randint(0, 3, (7,))
    assert {k for k, _ in model[0].named_parameters()} == {"bias", "weight_g", "weight_v"}
    for clip in (1e-3, 1e6):
        assert_same(ghost_clip_and_sum(model, LOSS, x, y, clip), clip_and_sum(model, LOSS, x, y, clip, method="vmap"))


def test_batchnorm_in_eval_mode_goes_through_vmap_vjp_and_training_mode_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 3))
    x, y = torch.randn(7, 2, 4, 4), torch.randint(0, 3, (7,))
    model(x)  # moves the running statistics away from (0, 1)
    assert not ghost_supported(model)
    model.eval()
    assert_same(ghost_clip_and_sum(model, LOSS, x, y, 0.1), clip_and_sum(model, LOSS, x, y, 0.1, method="vmap"))


@pytest.mark.parametrize("kwargs", [{}, {"reduction": "sum"}, {"ignore_index": 3},
                                    {"ignore_index": 3, "label_smoothing": 0.1},
                                    {"reduction": "sum", "ignore_index": 3, "label_smoothing": 0.2}])
def test_cross_entropy_shortcut_equals_vmap_of_the_loss(kwargs):
    torch.manual_seed(0)
    loss_fn = nn.CrossEntropyLoss(**kwargs)
    out, y = torch.randn(9, 5, requires_grad=True), torch.randint(0, 5, (9,))
    y[2] = 3
    got = ghost.per_example_losses(loss_fn, out, y)
    want = torch.vmap(lambda o, t: loss_fn(o[None], t[None]))(out, y)
    torch.testing.assert_close(got, want, equal_nan=True, atol=0, rtol=0)
    g_got, = torch.autograd.grad(got.sum(), out, retain_graph=True)
    g_want, = torch.autograd.grad(want.sum(), out)
    torch.testing.assert_close(g_got, g_want, equal_nan=True, atol=0, rtol=0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5))
    x = torch.randn(9, 4)
    got = ghost_clip_and_sum(model, loss_fn, x, y, 0.5)
    assert_same(got, clip_and_sum(model, loss_fn, x, y, 0.5, method="vmap"))
    want = torch.vmap(lambda o, t: loss_fn(o[None], t[None]))(model(x), y).detach()  # NaN where 'mean' ignores
    torch.testing.assert_close(got.example_losses, want, equal_nan=True, atol=1e-6, rtol=1e-6)


def test_missing_threshold_is_an_error():
    model, x, y = cases()["linear2d"]
    with pytest.raises(ValueError, match="no threshold"):
        ghost_clip_and_sum(model, LOSS, x, y, ClippingConfig(1.0, {"0.weight": 1.0}))


def test_huge_outlier_is_clipped_and_non_finite_example_dropped():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    x, y = torch.randn(4, 4), torch.tensor([1, 1, 0, 1])  # example 0: wrong class, saturated softmax
    x[0] *= 1e20  # squares overflow float32: the norm is recomputed in float64
    x[1, 0] = float("inf")
    got = ghost_clip_and_sum(model, LOSS, x, y, ClippingConfig(1.0))
    ref = clip_and_sum(model, LOSS, x, y, ClippingConfig(1.0), method="vmap")
    for k in ref.sums:
        assert torch.isfinite(got.sums[k]).all()
    assert_same(got, ref, atol=1e-4)
    # without examples 1..3, the sum is example 0 clipped to norm 1 (not overflowed, not dropped)
    assert float(sum(n.pow(2) for n in ghost_norms(model, LOSS, x[:1], y[:1]).values()).sqrt()) > 1e18
    alone = ghost_clip_and_sum(model, LOSS, x[:1], y[:1], ClippingConfig(1.0))
    total = torch.sqrt(sum(v.double().pow(2).sum() for v in alone.sums.values()))
    assert float(total) == pytest.approx(1.0, rel=1e-4)


class TransposedNorms(nn.Module):
    """Two LayerNorms whose output gradients reach them transposed (non-contiguous [B, n, n]): their norms
    are taken of temporary copies, whose memory the allocator hands from one to the next."""

    def __init__(self, n: int = 8):
        super().__init__()
        self.a, self.b, self.fc = nn.LayerNorm([n, n]), nn.LayerNorm([n, n]), nn.Linear(n, 3)

    def forward(self, x):
        return self.fc((0.01 * self.a(x).transpose(1, 2) + 100 * self.b(x).transpose(1, 2)).mean(1))


@pytest.mark.parametrize("thresholds", [False, True])
def test_row_norms_of_temporaries_are_not_mixed_up(thresholds):
    torch.manual_seed(0)
    model, x, y = TransposedNorms(), torch.randn(4, 8, 8), torch.randint(0, 3, (4,))
    names = [k for k, _ in model.named_parameters()]
    config = ClippingConfig(1.0, thresholds=dict.fromkeys(names, 0.5) if thresholds else None)
    ref = clip_and_sum(model, LOSS, x, y, config, method="vmap")
    for _ in range(3):  # the allocator's reuse need not happen on the first pass
        assert_same(ghost_clip_and_sum(model, LOSS, x, y, config), ref)


@pytest.mark.parametrize("scale", [1e22, 2e22, 3e22, 3.879e22])
def test_exploding_example_never_contributes_more_than_c(scale):
    """‖g‖ ≈ 1e45: finite in float64, but C/‖g‖ is a float32 subnormal that rounds up to 2×; such an example is
    dropped (factor 0) or clipped, on both engines, never above C."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(1, 4) * scale, torch.zeros(1, 3)
    loss = nn.MSELoss(reduction="sum")
    for method in ("vmap", "fast"):
        sums = clip_and_sum(model, loss, x, y, 1.0, method=method).sums
        assert float(torch.cat([v.double().flatten() for v in sums.values()]).norm()) <= 1.0 + 1e-6, method


class OwnAttention(nn.MultiheadAttention):
    """A subclass with its own forward: torch's forward uses out_proj.weight outside out_proj."""

    def forward(self, q, k, v, **kwargs):
        return super().forward(q, k, v, **kwargs)


def _own_attention_case():
    model, x, y = models.cases()["multihead_attention"]
    model.att = OwnAttention(8, 2, batch_first=True)
    return model, x, y


@pytest.mark.parametrize("name", ["own_attention_forward", "lstm", "gru"])
def test_uncoverable_models_return_none(name, monkeypatch):
    model, x, y = _own_attention_case() if name == "own_attention_forward" else models.cases()[name]
    assert not ghost_supported(model)
    assert ghost_clip_and_sum(model, LOSS, x, y, 1.0) is None
    # the run-time checks refuse them as well, without the structural check (a fresh plan cache)
    monkeypatch.setattr(ghost_plan, "_supported", lambda owners: True)
    monkeypatch.setattr(ghost_plan, "_PLANS", weakref.WeakKeyDictionary())
    assert ghost_plan.current_plan(model).supported
    assert ghost.ghost_clip_and_sum(model, LOSS, x, y, 1.0) is None


def test_parameter_used_outside_its_module_returns_none():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return F.linear(self.fc(x), self.fc.weight)  # fc.weight used outside fc's forward

    model = Functional()
    assert ghost_supported(model)
    assert ghost_clip_and_sum(model, LOSS, torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), 1.0) is None


def test_parameter_reaching_a_module_through_its_inputs_returns_none():
    class Add(Scale):
        def forward(self, x, extra):
            return x * self.w + extra

    class ViaArgument(nn.Module):  # other.weight enters sc through an argument
        def __init__(self):
            super().__init__()
            self.fc, self.sc, self.other = nn.Linear(4, 4), Add(4), nn.Linear(4, 4)

        def forward(self, x):
            return self.sc(self.fc(x), self.other.weight.sum(0)) + self.other(x)

    class Inner(Scale):  # other.weight enters a child's input inside the module
        def __init__(self, other):
            super().__init__(4)
            self.fc, self.borrowed = nn.Linear(4, 4), [other]

        def forward(self, x):
            return self.fc(x * self.borrowed[0].weight[0]) * self.w

    class ViaChild(nn.Module):
        def __init__(self):
            super().__init__()
            self.other = nn.Linear(4, 4)
            self.inner = Inner(self.other)

        def forward(self, x):
            return self.inner(self.other(x))

    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0])
    for model in (ViaArgument(), ViaChild()):
        assert ghost_supported(model)
        assert ghost_clip_and_sum(model, LOSS, x, y, 1.0) is None


def test_randomness_inside_a_custom_module_returns_none():
    class Noisy(Scale):
        def forward(self, x):
            return F.dropout(x * self.w, 0.5, training=True)

    model = nn.Sequential(nn.Linear(3, 4), Noisy(4), nn.Linear(4, 2))
    assert ghost_clip_and_sum(model, LOSS, torch.randn(4, 3), torch.tensor([0, 1, 1, 0]), 1.0) is None


def test_misread_batched_argument_is_caught():
    class Table(Scale):
        def forward(self, x, table):
            return x * self.w + (table * self.b).sum(0)  # table is a constant that happens to have B rows

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.t = nn.Linear(4, 4), Table(4)
            self.register_buffer("table", torch.randn(5, 4))

        def forward(self, x):
            return self.t(self.fc(x), self.table)

    model = Net()
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0])
    assert ghost_clip_and_sum(model, LOSS, x, y, 1.0) is None  # per-example split would be wrong
    assert_same(ghost_clip_and_sum(model, LOSS, x[:4], y[:4], 1.0),
                clip_and_sum(model, LOSS, x[:4], y[:4], 1.0, method="vmap"))


def test_model_left_clean():
    model, x, y = cases()["mixed(custom, twice, inplace, tied)"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ghost_clip_and_sum(model, LOSS, x, y, 1.0)
    for m in model.modules():
        assert not m._forward_hooks and not m._backward_hooks
    assert all(p.grad is None for p in model.parameters())
    assert not any(v.requires_grad for v in ghost_clip_and_sum(model, LOSS, x, y, 1.0).sums.values())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_autocast_bf16_keeps_the_bound():
    model, x, y = cases()["seq_linear+embedding+layernorm+rmsnorm"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ghost_clip_and_sum(model, LOSS, x, y, ClippingConfig(1e-2))
        one = ghost_clip_and_sum(model, LOSS, x[:1], y[:1], ClippingConfig(1e-2))
    ref = ghost_clip_and_sum(model, LOSS, x, y, ClippingConfig(1e-2))
    for k, v in got.sums.items():
        assert v.dtype == torch.float32 and torch.isfinite(v).all()
        torch.testing.assert_close(v, ref.sums[k], atol=2e-3, rtol=0.1)  # bf16 activations: loose
    norm = torch.sqrt(sum(v.double().pow(2).sum() for v in one.sums.values()))
    assert float(norm) <= 1e-2 * (1 + 1e-4)  # one example's clipped contribution stays within C


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_equals_vmap():
    for name in ("seq_linear+embedding+layernorm+rmsnorm", "conv1d+conv2d+groupnorm",
                 "mixed(custom, twice, inplace, tied)"):
        model, x, y = cases()[name]
        model, x, y = model.cuda(), x.cuda(), y.cuda()
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # full float32 convolutions
            got = ghost_clip_and_sum(model, LOSS, x, y, 0.3)
            ref = clip_and_sum(model, LOSS, x, y, 0.3, method="vmap")
        assert all(v.is_cuda for v in got.sums.values())
        assert_same(got, ref, atol=1e-4)


def test_bf16_autocast_attention_and_conv_within_the_clip_norm():
    """Under bf16 autocast the factors are bf16, the norm / sum algebra float32: ‖f_i G_i‖ ≤ C still holds."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 16)
            self.enc = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
            self.conv, self.gn, self.fc = nn.Conv1d(16, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(self.gn(self.conv(self.enc(self.emb(x)).transpose(1, 2))).mean(2))

    torch.manual_seed(0)
    model, x, y = Net(), torch.randint(0, 20, (6, 10)), torch.randint(0, 3, (6,))
    c = 1e-2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        batch = ghost_clip_and_sum(model, LOSS, x, y, ClippingConfig(c))
        ref = clip_and_sum(model, LOSS, x, y, ClippingConfig(c), method="vmap")
        singles = [ghost_clip_and_sum(model, LOSS, x[i:i + 1], y[i:i + 1], ClippingConfig(c)) for i in range(6)]
    assert batch is not None and all(v.dtype == torch.float32 for v in batch.sums.values())
    for k in ref.sums:  # bf16 forward on both engines: equal up to bf16 rounding
        torch.testing.assert_close(batch.sums[k], ref.sums[k], atol=2e-4, rtol=5e-2)
    for one in singles:
        norm = torch.sqrt(sum(v.double().pow(2).sum() for v in one.sums.values()))
        assert float(norm) <= c * (1 + 1e-5)


def test_a_linears_weight_and_bias_share_one_output_gradient_norm():
    # ‖G_i‖² = ‖g_i‖²‖a_i‖² for the weight and ‖g_i‖² for the bias: two row norms per layer, not three (and one
    # float64 norm of the stacked per-parameter norms: the total)
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        norms = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket is torch.ops.aten.linalg_vector_norm:
                Count.norms += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    with Count():
        got = ghost_clip_and_sum(model, LOSS, x, y, 0.5)
    assert Count.norms == 2 * 2 + 1
    assert_same(got, clip_and_sum(model, LOSS, x, y, 0.5, method="vmap"))


def test_outputs_are_recorded_as_edges_and_freed_and_in_place_activations_need_no_copies():
    """A plain one-tensor call keeps the autograd edge of its output, not the tensor: a Linear's output
    that nothing downstream saves is freed after the forward, and ReLU(inplace=True) rewriting it
    leaves the gradient with respect to the output as the Linear returned it (no copy-mode rerun)."""
    from dptrain.ghost_graph import Output, Recorder

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(inplace=True), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    plan = ghost_plan.current_plan(model)
    with Recorder(plan.owners, plan.kinds, copies=False) as rec:
        out = model(x)
    recorded = [c.outputs[0] for calls in rec.calls.values() for c in calls]
    assert len(recorded) == 3 and all(isinstance(o, Output) for o in recorded)
    assert not rec.modified_in_place()  # the in-place ReLU rewrote an output, not a recorded input
    del out
    ghost._NEEDS_COPIES.pop(model, None)
    got = ghost_clip_and_sum(model, LOSS, x, y, ClippingConfig(0.5))
    assert model not in ghost._NEEDS_COPIES
    assert_same(got, clip_and_sum(model, LOSS, x, y, ClippingConfig(0.5), method="vmap"))

    probe = nn.Linear(5, 8)
    seen = []
    probe.register_forward_hook(lambda m, a, o: seen.append(weakref.ref(o)))
    net = nn.Sequential(probe, nn.ReLU(), nn.Linear(8, 3))  # ReLU saves its result, not the Linear's output
    with Recorder(ghost_plan.current_plan(net).owners, ghost_plan.current_plan(net).kinds, copies=False) as rec:
        loss = LOSS(net(x), y)
    assert seen[0]() is None  # freed although recorded
    assert isinstance(rec.calls["0"][0].outputs[0], Output) and loss.grad_fn is not None


def test_forward_hooks_that_change_an_output_are_taken_into_account():
    """A layer's forward hook (out * 2) made the fast path clip and sum half the true gradient; a global hook
    acts on every module, so the fast path refuses while one is registered."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    handle = model[0].register_forward_hook(lambda mod, inp, out: out * 2.0)
    for clip in (1e6, 0.5):
        assert_same(ghost_clip_and_sum(model, LOSS, x, y, ClippingConfig(clip)),
                    clip_and_sum(model, LOSS, x, y, ClippingConfig(clip), method="vmap"))
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda mod, inp, out: None)
    try:
        assert ghost_clip_and_sum(model, LOSS, x, y, ClippingConfig(1.0)) is None
    finally:
        handle.remove()
    assert ghost_clip_and_sum(model, LOSS, x, y, ClippingConfig(1.0)) is not None


class _WithAuxScalar(nn.Module):
    """Returns (logits, an auxiliary scalar of the batch): an output leaf that is not one row per example."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        out = self.fc(x)
        return out, out.sum()


def test_auto_falls_back_to_vmap_for_an_output_leaf_that_is_not_batch_sized():
    """method='auto' raised vmap's 'in_dim=0 ... Tensor of dimensionality 0' where method='vmap' worked."""
    torch.manual_seed(0)
    model, x, y = _WithAuxScalar(), torch.randn(5, 6), torch.randint(0, 3, (5,))
    ce = nn.CrossEntropyLoss()

    def loss(out, t):
        return ce(out[0], t)

    assert ghost_clip_and_sum(model, loss, x, y, ClippingConfig(1.0)) is None
    auto = clip_and_sum(model, loss, x, y, ClippingConfig(1.0), method="auto")
    ref = clip_and_sum(model, loss, x, y, ClippingConfig(1.0), method="vmap")
    for name, value in ref.sums.items():
        torch.testing.assert_close(auto.sums[name], value)


def test_hookless_layers_are_recorded_by_a_shadowing_forward_that_is_removed_after_the_call():
    """An exact layer with no hooks is recorded by a forward set on the instance for the call (torch's hook
    dispatch skipped); one with a hook of its own keeps the registered hook. Both record the same calls, and
    no instance forward is left behind, also when the forward raises."""
    from dptrain.ghost_graph import Recorder

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    model[2].register_forward_pre_hook(lambda mod, inp: None)
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    plan = ghost_plan.current_plan(model)
    with Recorder(plan.owners, plan.kinds, False, plan.exact) as rec:
        assert "forward" in model[0].__dict__ and "forward" not in model[2].__dict__
        assert not model[0]._forward_hooks and len(model[2]._forward_hooks) == 1
        model(x)
    assert [len(c) for c in rec.calls.values()] == [1, 1]
    assert all("forward" not in m.__dict__ and not m._forward_hooks for m in model)
    assert_same(ghost_clip_and_sum(model, LOSS, x, y, ClippingConfig(0.5)),
                clip_and_sum(model, LOSS, x, y, ClippingConfig(0.5), method="vmap"))
    with pytest.raises(RuntimeError):
        ghost_clip_and_sum(model, LOSS, torch.randn(6, 4), y, ClippingConfig(0.5))  # wrong width: the Linear raises
    assert all("forward" not in m.__dict__ and not m._forward_hooks for m in model)


def test_a_bias_sum_reuses_its_weights_scaled_rows_only_under_the_same_factors():
    """The bias's Σ_i f_i g_i is the column sum of the rows the weight's sum scaled (same factors object, same
    memory); other factors (per-layer clipping) or other rows get the matrix-vector product."""
    from dptrain import ghost_algebra as ga

    torch.manual_seed(0)
    b, o, i = 7, 4, 6
    g, a = torch.randn(b, 1, 1, o), torch.randn(b, 1, 1, i)
    f, f2 = torch.rand(b), torch.rand(b)
    weight, bias = gl.Outer(g, a), gl.Dense(g.reshape(b, -1))
    scaled = ga.ScaledRows()
    w_sum = ga.clipped_sum([weight], f, torch.Size([o, i]), scaled)
    torch.testing.assert_close(w_sum, (f[:, None, None] * g.reshape(b, o, 1) * a.reshape(b, 1, i)).sum(0))
    assert scaled.get(bias.grads, f) is not None and scaled.get(bias.grads, f2) is None
    assert scaled.get(bias.grads.clone(), f) is None  # other memory
    for factors in (f, f2):
        got = ga.clipped_sum([bias], factors, torch.Size([o]), scaled)
        torch.testing.assert_close(got, (factors[:, None] * g.reshape(b, o)).sum(0))


def test_a_model_inside_data_parallel_is_recorded_by_registered_hooks():
    """DataParallel's replicas copy each module's __dict__: a forward set on the instance would run the original
    module on every replica's input, so a model holding a DataParallel keeps the registered hooks."""
    from dptrain.ghost_graph import Recorder

    torch.manual_seed(0)
    net = nn.DataParallel(nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)), device_ids=[])
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    plan = ghost_plan.current_plan(net)
    assert plan.replicated and not ghost_plan.current_plan(net.module).replicated
    with Recorder(plan.owners, plan.kinds, False, None if plan.replicated else plan.exact):
        assert all("forward" not in m.__dict__ for m in net.modules())
    got = ghost_clip_and_sum(net, LOSS, x, y, ClippingConfig(0.5))
    ref = clip_and_sum(net.module, LOSS, x, y, ClippingConfig(0.5), method="vmap")  # torch.func refuses DataParallel
    assert got is not None and set(got.sums) == {f"module.{k}" for k in ref.sums}
    for k in ref.sums:
        torch.testing.assert_close(got.sums[f"module.{k}"], ref.sums[k], atol=1e-5, rtol=1e-4)


def test_a_copy_of_a_recorded_layer_made_in_forward_runs_its_own_weights_and_records_nothing():
    """A deep copy made while a layer's forward is shadowed carries the shadow bound to the copy: it computes
    with the copy's own weights (it ran the original's before), and a kept callable records nothing after."""
    import copy

    from dptrain.ghost_graph import Recorder

    class WithTeacher(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.out, self.cache = nn.Linear(4, 4), nn.Linear(4, 2), {}

        def forward(self, x):
            if "teacher" not in self.cache:  # an unregistered copy made during the first forward
                self.cache["teacher"] = copy.deepcopy(self.lin)
                self.cache["kept"] = self.lin.forward
            return self.out(self.lin(x))

    torch.manual_seed(0)
    model, x = WithTeacher(), torch.randn(3, 4)
    plan = ghost_plan.current_plan(model)
    with Recorder(plan.owners, plan.kinds, False, plan.exact) as rec:
        model(x)
    teacher = model.cache["teacher"]
    with torch.no_grad():
        teacher.weight.zero_()
        teacher.bias.zero_()
    assert float(teacher(x).detach().abs().max()) == 0.0
    model.cache["kept"](x)  # the shadow kept from inside the forward, called after the record
    assert [len(c) for c in rec.calls.values()] == [1, 1]
