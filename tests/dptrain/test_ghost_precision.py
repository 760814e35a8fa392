"""bf16 factors kept narrow (the CUDA fast path, run here on CPU): norms as in float32, the bound holds."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dptrain import ClippingConfig, clip_and_sum
from dptrain import ghost_precision as gp
from dptrain.ghost import ghost_clip_and_sum

LOSS = nn.CrossEntropyLoss()


class Net(nn.Module):
    """Embedding → attention block (packed in_proj) → Linear on sequences (Gram-sized and explicit) → head."""

    def __init__(self, norm_first: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 16)  # pre-norm: LayerNorm (float32 under autocast) feeds the projections
        self.enc = nn.TransformerEncoderLayer(16, 2, 48, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.wide = nn.Linear(16, 64)  # T(o+i) < o·i: Gram trick
        self.thin = nn.Linear(64, 3)  # explicit per-example products
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        return self.fc(self.thin(torch.tanh(self.wide(self.enc(self.emb(x))))).mean(1))


@pytest.fixture
def narrow_on_cpu(monkeypatch):
    monkeypatch.setattr(gp, "LOW_PRECISION_DEVICES", {"cpu", "cuda"})


def _data(b=6, t=12):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 30, (b, t), generator=g), torch.randint(0, 4, (b,), generator=g)


def test_split_error_is_within_u_squared():
    p = torch.randn(10_000, generator=torch.Generator().manual_seed(0)) * torch.logspace(-20, 20, 10_000)
    hi, lo = gp.split(p, torch.bfloat16)
    err = (hi.double() + lo.double() - p.double()).abs()
    assert bool((err <= 2.0 ** -16 * p.double().abs()).all())
    assert float(err.max()) > 0  # not trivially exact: the bound is what covers it


def test_mm32_equals_float32_product():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, 7, generator=g).bfloat16(), torch.randn(3, 7, 4, generator=g).bfloat16()
    torch.testing.assert_close(gp.mm32(a, b), a.float() @ b.float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("c", [1e-3, 1e-2, 1e3])
def test_narrow_factors_keep_each_contribution_within_c(narrow_on_cpu, c, norm_first):
    torch.manual_seed(0)
    model, (x, y) = Net(norm_first), _data()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        batch = ghost_clip_and_sum(model, LOSS, x, y, ClippingConfig(c))
        ref = clip_and_sum(model, LOSS, x, y, ClippingConfig(c), method="vmap")
        singles = [ghost_clip_and_sum(model, LOSS, x[i:i + 1], y[i:i + 1], ClippingConfig(c)) for i in range(len(y))]
    assert batch is not None and all(v.dtype == torch.float32 for v in batch.sums.values())
    for k in ref.sums:  # bf16 forward on both engines: equal up to bf16 rounding (~1 % of the largest entry)
        scale = float(ref.sums[k].abs().max())
        torch.testing.assert_close(batch.sums[k], ref.sums[k], atol=3e-2 * scale + 1e-7, rtol=5e-2)
    for one in singles:
        norm = torch.sqrt(sum(v.double().pow(2).sum() for v in one.sums.values()))
        assert float(norm) <= c * (1 + 1e-5)


def test_narrow_path_is_taken_and_margin_is_small(narrow_on_cpu, monkeypatch):
    torch.manual_seed(0)
    model, (x, y) = Net(), _data()
    calls = []
    outer_sum = gp.outer_sum
    monkeypatch.setattr(gp, "outer_sum", lambda *a: calls.append(a[0].dtype) or outer_sum(*a))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        narrow = ghost_clip_and_sum(model, LOSS, x, y, ClippingConfig(1e-2))
    monkeypatch.setattr(gp, "LOW_PRECISION_DEVICES", set())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        wide = ghost_clip_and_sum(model, LOSS, x, y, ClippingConfig(1e-2))
    assert calls and set(calls) == {torch.bfloat16}
    for k in wide.sums:  # narrow: bf16-rounded Linear inputs (as autocast multiplies them) and the margin
        scale = float(wide.sums[k].abs().max())
        torch.testing.assert_close(narrow.sums[k], wide.sums[k], rtol=2e-2, atol=2e-3 * scale)


@pytest.mark.parametrize("o,i", [(3, 5), (5, 3)])
def test_outer_sum_per_group_equals_float32_within_the_margin(o, i):
    g = torch.Generator().manual_seed(2)
    left, right = torch.randn(4, 3, 6, o, generator=g).bfloat16(), torch.randn(4, 3, 6, i, generator=g).bfloat16()
    f = torch.rand(4, generator=g)
    got = gp.outer_sum(left, right, f)
    want = torch.einsum("bgto,bgti->goi", left.double() * f.double().view(-1, 1, 1, 1), right.double())
    assert got.dtype == torch.float32 and got.shape == (3, o, i)
    bound = float((f.double() * gp.margin(left, right)).sum()) + 1e-6 * float(want.abs().max())
    assert float((got.double() - want).norm()) <= bound


def test_mm32_keeps_float64():
    a = torch.full((2, 3), 1e30, dtype=torch.float64)
    out = gp.mm32(a, a.t())
    assert out.dtype == torch.float64 and bool(torch.isfinite(out).all())


def test_sequence_outlier_overflowing_float32_is_clipped_not_dropped():
    """Gram-trick and explicit norms on [B, T, d] inputs are recomputed in float64 when float32 overflows."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 3))
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(3, 5, 4, generator=g), torch.randint(0, 3, (3,), generator=g)
    x[0] *= 1e25
    loss = lambda out, t: LOSS(out.mean(1), t)  # noqa: E731
    alone = ghost_clip_and_sum(model, loss, x[:1], y[:1], ClippingConfig(1.0))
    norm = torch.sqrt(sum(v.double().pow(2).sum() for v in alone.sums.values()))
    assert alone.clipped_count == 1 and 0.99 < float(norm) <= 1.0 + 1e-5
