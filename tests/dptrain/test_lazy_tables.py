"""Lazy tables in a model: reads are never stale; nothing leaves the process unflushed; resume keeps counters."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import dptrain


class Rec(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.user = nn.Embedding(50, 4)
        self.items = nn.EmbeddingBag(40, 4, mode="sum")
        self.mlp = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))

    def forward(self, x):
        return self.mlp(torch.cat([self.user(x[:, 0]), self.items(x[:, 1:])], 1))


def _run(steps=4, seed=0):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randint(0, 50, (80, 1), generator=g), torch.randint(0, 40, (80, 2), generator=g)], 1)
    model = Rec()
    priv = dptrain.make_private(model, eps=3.0, mechanism="lazy", seed=seed, accountant="rdp")
    priv.attach(TensorDataset(x, (x[:, 0] % 2).long()), batch_size=8, epochs=2,
                optimizer=torch.optim.SGD(model.parameters(), lr=0.3))
    for _ in range(steps):
        priv.step(priv.loader.batch(priv.loader.sampler.sample()))
    return model, priv


def _pending_rows(priv):
    return {k: int((t.last_step < t.step).sum()) for k, t in priv.tables.noise.items()}


def test_a_read_catches_up_exactly_the_rows_it_reads():
    model, priv = _run()
    assert all(v > 0 for v in _pending_rows(priv).values())  # untouched rows wait for their noise
    x = torch.tensor([[3, 5, 6], [7, 5, 9]])
    model(x)  # a training-mode read
    user, items = priv.tables.noise["user.weight"], priv.tables.noise["items.weight"]
    assert user.last_step[[3, 7]].tolist() == [4, 4] and items.last_step[[5, 6, 9]].tolist() == [4, 4, 4]
    read = model.user.weight[[3, 7]].detach().clone()
    priv.flush()  # the flush adds nothing to rows already read: the read saw their current value
    assert torch.equal(model.user.weight[[3, 7]], read)
    assert priv.tables.is_flushed


def test_eval_forward_and_state_dict_flush_everything():
    model, priv = _run()
    model.eval()
    model(torch.tensor([[0, 0, 0]]))
    assert priv.tables.is_flushed
    model.train()
    priv.step(priv.loader.batch(priv.loader.sampler.sample()))
    assert not priv.tables.is_flushed
    model.state_dict()  # checkpoint / export of the weights
    assert priv.tables.is_flushed
    priv.step(priv.loader.batch(priv.loader.sampler.sample()))
    model.user.state_dict()  # a table alone, too
    assert priv.tables.noise["user.weight"].is_flushed


def test_checkpoint_is_flushed_and_resume_carries_the_counters():
    model, priv = _run(steps=3, seed=4)
    state = copy.deepcopy(priv.state_dict())
    assert priv.tables.is_flushed
    assert {k: v["step"] for k, v in state["lazy_tables"].items()} == {"user.weight": 3, "items.weight": 3}
    assert "last_step" not in str(state["lazy_tables"])  # no per-row record of which rows were used
    # continue the original, and a resumed copy, for 2 steps on the same batches: same model
    model2, priv2 = _run(steps=0, seed=99)
    priv2.load_state_dict(state)
    assert priv2.steps == 3 and priv2.tables.step == 3
    priv2.loader.sampler.load_state_dict(priv.loader.sampler.state_dict())
    for _ in range(2):
        b, b2 = (p.loader.batch(p.loader.sampler.sample()) for p in (priv, priv2))
        assert all(torch.equal(u, v) for u, v in zip(b, b2))
        priv.step(b)
        priv2.step(b2)
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    assert priv2.steps == 5 and priv2.epsilon_spent() == priv.epsilon_spent()


def test_copying_or_pickling_the_model_exports_it_flushed():
    import io

    model, priv = _run()
    assert not priv.tables.is_flushed
    clone = copy.deepcopy(model)
    assert priv.tables.is_flushed  # the copy is taken after the flush
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)
    priv.step(priv.loader.batch(priv.loader.sampler.sample()))
    buf = io.BytesIO()
    torch.save(model, buf)
    assert priv.tables.is_flushed
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(loaded.user.weight, model.user.weight)
    loaded.eval()
    loaded(torch.tensor([[1, 2, 3]]))  # the copy carries no lazy state: its hooks do nothing


def test_copying_one_table_module_exports_it_flushed():
    """copy.deepcopy(model.user) copies the weight before the hooks: the hook writes the flushed rows into it
    (before: the copy had no noise on the rows never used, which showed which rows were)."""
    model, priv = _run()
    for table in (model.user, model.items):
        priv.step(priv.loader.batch(priv.loader.sampler.sample()))
        assert not priv.tables.is_flushed
        clone = copy.deepcopy(table)
        assert priv.tables.is_flushed
        assert torch.equal(clone.weight, table.weight)


# --- the model converted after lazy steps (model.double(), .half(), .to(device)) -------------------------
WIDE, LR, B = 4000, 0.5, 4  # table width (independent coordinates), lr, expected batch size (q·N = 0.2·20)
STEP_VAR = (LR * 1.0 * 1.0 / B) ** 2  # (lr σ C / B)² with σ = C = 1: one step's noise variance per coordinate
NEVER_READ = [0, 3, 4, 5]  # the steps below read rows 1 and 2 only


class Wide(nn.Module):
    """One wide table read through its lookup, and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(6, WIDE)
        self.head = nn.Linear(WIDE, 2)

    def forward(self, x):
        return self.head(self.table(x))


def _wide_run():
    torch.manual_seed(0)
    model = Wide()
    priv = dptrain.make_private(model, eps=None, noise_multiplier=1.0, max_grad_norm=1.0, mechanism="lazy", seed=0,
                                accountant="rdp")
    priv.attach(TensorDataset(torch.zeros(20, dtype=torch.long), torch.zeros(20, dtype=torch.long)), batch_size=B,
                steps=10, optimizer=torch.optim.SGD(model.parameters(), lr=LR))
    return model, priv


def _lazy_steps(priv, n):
    for _ in range(n):
        priv.loader._record_drawn(2)  # a fixed batch (rows 1, 2), stepped on as if drawn (internal)
        priv.step(torch.tensor([1, 2]), torch.tensor([0, 1]))


def _assert_noise_of_variance(residual: torch.Tensor, var: float) -> None:
    """``residual`` (never-read rows minus their earlier values) is N(0, var) per coordinate: chi-square on
    Σ residual² / var with 4·WIDE degrees of freedom, two-sided, false-failure probability 1e-7."""
    from scipy import stats

    df = residual.numel()
    chi = float((residual.double() ** 2).sum()) / var
    assert stats.chi2.ppf(5e-8, df) < chi < stats.chi2.isf(5e-8, df), chi / df


@pytest.mark.parametrize("convert", ["double", "half"])
def test_a_dtype_conversion_after_lazy_steps_exports_every_row_noised(convert):
    """model.double() / .half() give the Parameter new memory; the pending noise goes there (before: into the
    old tensor, and the exported never-read rows equalled their initial values)."""
    model, priv = _wide_run()
    dtype = getattr(torch, "float64" if convert == "double" else "float16")
    init = model.table.weight.detach().to(dtype).double()
    _lazy_steps(priv, 2)
    getattr(model, convert)()
    w = model.state_dict()["table.weight"]  # the state-dict hook flushes
    assert w.dtype == dtype and priv.tables.is_flushed
    _assert_noise_of_variance(w.double()[NEVER_READ] - init[NEVER_READ], 2 * STEP_VAR)


def test_training_goes_on_in_the_converted_table():
    model, priv = _wide_run()
    _lazy_steps(priv, 2)
    model.double()
    priv.flush()
    before = model.table.weight.detach().clone()
    _lazy_steps(priv, 2)
    assert not torch.equal(model.table.weight[1:3], before[1:3])  # the read rows got their clipped sums
    priv.flush()
    w = model.table.weight.detach()
    assert w.dtype == torch.float64
    _assert_noise_of_variance(w[NEVER_READ] - before[NEVER_READ], 2 * STEP_VAR)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_device_move_after_lazy_steps_takes_the_pending_noise_along():
    model, priv = _wide_run()
    init = model.table.weight.detach().clone()
    _lazy_steps(priv, 2)
    model.cuda()
    model.eval()
    model(torch.tensor([0], device="cuda"))  # an eval forward flushes, on the new device
    assert priv.tables.is_flushed and priv.tables.noise["table.weight"].last_step.is_cuda
    w = model.table.weight.detach().cpu()
    _assert_noise_of_variance(w[NEVER_READ] - init[NEVER_READ], 2 * STEP_VAR)
    model.train()
    before = model.table.weight.detach().clone()
    _lazy_steps(priv, 1)  # training goes on there (indices on the CPU are moved to the model's device)
    priv.flush()
    _assert_noise_of_variance((model.table.weight.detach() - before)[NEVER_READ].cpu(), STEP_VAR)
