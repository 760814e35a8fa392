"""make_private with lazy table noise trains the eager DP-SGD model, and refuses what would break that."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn
from torch.utils.data import TensorDataset

import accountants
import dptrain
from accountants.events import GaussianEvent, PoissonSampledEvent
from dptrain.lazy import LazyPrivateTraining
from dptrain.private import PrivacyConfig, PrivateTraining

D = 4000  # table width: columns are independent trials (the noise is i.i.d. per coordinate)
SIGMA, C, N, BATCH = 1.0, 2.0, 10, 4  # expected batch B = q·N = 4
LR0, DECAY = 0.5, 0.8  # lr_t = 0.5 · 0.8^t (LambdaLR)
# rows read at each step: 0 never, 1 once (step 2), 2 every step, 3 at {0, 4}, 4 at {1, 2, 5}, 5 twice at step 3
BATCHES = [[2, 3], [2, 4], [1, 2, 4], [2, 5, 5], [2, 3], [2, 4]]
V = torch.linspace(-1, 1, D, dtype=torch.float64) * (0.5 / torch.linspace(-1, 1, D, dtype=torch.float64).norm())


class Linear(nn.Module):
    """out_i = ⟨table[x_i], v⟩ + b: the table gradient of an example is v (norm 0.5), b's is 1 — never clipped."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(6, D).double()
        nn.init.zeros_(self.table.weight)
        self.shift = nn.Linear(1, 1).double()
        self.shift.weight.requires_grad_(False)
        nn.init.ones_(self.shift.weight)
        self.register_buffer("v", V.clone())

    def forward(self, x):
        return self.shift((self.table(x) @ self.v)[:, None])


def _loss(out, target):
    return out.sum()


def _chosen(priv, n: int):
    """The first n examples as a batch, recorded as drawn (internal: a fixed batch for a deterministic test)."""
    priv.loader._record_drawn(n)
    return priv.loader.batch(torch.arange(n))


def _train(lazy: bool, seed: int, device: str = "cpu") -> tuple[np.ndarray, object]:
    model = Linear().to(device)
    config = PrivacyConfig(None, 0.05, C, "lazy" if lazy else "dpsgd", "rdp", "flat", SIGMA, None, seed)
    priv = (LazyPrivateTraining if lazy else PrivateTraining)(model, config)
    opt = torch.optim.SGD(model.parameters(), lr=LR0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: DECAY ** t)
    ds = TensorDataset(torch.arange(N), torch.zeros(N))
    priv.attach(ds, batch_size=BATCH, steps=len(BATCHES), optimizer=opt, loss_fn=_loss)
    for rows in BATCHES:  # fixed batches, the same for both runs: recorded as drawn (internal)
        priv.loader._record_drawn(len(rows))
        priv.step(torch.tensor(rows), torch.zeros(len(rows)))
        sched.step()
    if lazy:  # rows 0 and 1 are brought up to date by a read, the others by the checkpoint's flush
        model(torch.tensor([0, 1], device=device))
        assert priv.tables.noise["table.weight"].last_step[[0, 1]].tolist() == [6, 6]
        assert not priv.tables.is_flushed
    w = priv.state_dict()["model"]["table.weight"].cpu().numpy().copy()
    return w, priv


def _expected() -> tuple[np.ndarray, float]:
    lrs = [LR0 * DECAY ** t for t in range(len(BATCHES))]
    counts = np.array([[b.count(r) for b in BATCHES] for r in range(6)])
    mean = -(counts * np.array(lrs)[None]).sum(1)[:, None] / BATCH * V.numpy()[None]
    var = sum((lr * SIGMA * C / BATCH) ** 2 for lr in lrs)  # every row gets every step's noise
    return mean, var


CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                          reason="needs a CUDA device")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("lazy", [True, False])
def test_rows_have_the_eager_mean_and_variance(lazy, device):
    # Per row (never / once / every step / twice in a batch, with an lr schedule): D = 4000 independent
    # coordinates of N(mean, var) after subtracting the known mean. z-test on the mean and chi-square
    # on the variance, Bonferroni over 6 rows × 2 tests: false-failure probability 1e-7.
    w, _ = _train(lazy, seed=5, device=device)
    mean, var = _expected()
    alpha = 1e-7 / 12
    for r in range(6):
        z = (w[r] - mean[r]).mean() / np.sqrt(var / D)
        assert abs(z) < stats.norm.isf(alpha / 2), (r, z)
        chi = ((w[r] - mean[r]) ** 2).sum() / var
        assert stats.chi2.ppf(alpha / 2, D) < chi < stats.chi2.isf(alpha / 2, D), (r, chi / D)


def test_lazy_and_eager_rows_have_the_same_distribution():
    # two-sample Kolmogorov–Smirnov per row on standardised residuals; Bonferroni over 6 rows: 1e-7
    lazy, _ = _train(True, seed=1)
    eager, _ = _train(False, seed=2)
    mean, _ = _expected()
    for r in range(6):
        assert stats.ks_2samp(lazy[r] - mean[r], eager[r] - mean[r]).pvalue > 1e-7 / 6, r


def test_same_event_and_epsilon_as_eager_dpsgd():
    _, lazy = _train(True, seed=3)
    _, eager = _train(False, seed=3)
    event = PoissonSampledEvent(BATCH / N, GaussianEvent(SIGMA))
    assert lazy.ledger.state_dict() == eager.ledger.state_dict()
    assert lazy._step_event(0) == event and lazy.steps == len(BATCHES)
    rep = lazy.report()
    assert (rep.noise_multiplier, rep.sample_rate, rep.mechanism) == (SIGMA, BATCH / N, "lazy")
    assert rep.epsilon_spent == pytest.approx(accountants.epsilon(SIGMA, BATCH / N, len(BATCHES), 0.05,
                                                                  accountant="rdp"))


class Rec(nn.Module):
    """A small recommender: a user table, an item bag and an MLP."""

    def __init__(self, users: int = 30, **table_kwargs) -> None:
        super().__init__()
        self.user = nn.Embedding(users, 4, **table_kwargs)
        self.items = nn.EmbeddingBag(20, 4, mode="mean")
        self.mlp = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))

    def forward(self, x):
        return self.mlp(torch.cat([self.user(x[:, 0]), self.items(x[:, 1:])], 1))


def _rec_data(n=60, users=30):
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randint(0, users, (n, 1), generator=g), torch.randint(0, 20, (n, 3), generator=g)], 1)
    return TensorDataset(x, (x[:, 1] % 2).long())


def _attach(model, mechanism="lazy", **kw):
    priv = dptrain.make_private(model, eps=3.0, mechanism=mechanism, seed=0, accountant="rdp")
    priv.attach(_rec_data(users=model.user.num_embeddings), batch_size=10, epochs=1, **kw)
    return priv


def _tables(m):
    return [m.user.weight, m.items.weight]


def _dense(m):
    return list(m.mlp.parameters())


@pytest.mark.parametrize("make_opt,match", [
    (lambda m: torch.optim.Adam(m.parameters()), "Adam, whose update of a row depends"),
    (lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), "momentum"),
    (lambda m: torch.optim.SGD(m.parameters(), lr=0.1, weight_decay=1e-4), "weight_decay"),
    (lambda m: torch.optim.SGD(_dense(m), lr=0.1), "user.weight is not in the optimizer"),
])
def test_optimizers_that_break_equivalence_are_refused(make_opt, match):
    model = Rec()
    with pytest.raises(dptrain.PrivacyConfigError, match=match):
        _attach(model, optimizer=make_opt(model))


@pytest.mark.parametrize("kwargs,match,error", [
    ({"max_norm": 1.0}, "max_norm", dptrain.UnsupportedModuleError),  # by validate (it writes rows in forward)
    ({"scale_grad_by_freq": True}, "scale_grad_by_freq", dptrain.PrivacyConfigError)])
def test_tables_that_break_equivalence_are_refused(kwargs, match, error):
    model = Rec(**kwargs)
    with pytest.raises(error, match=match):
        _attach(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


def test_adam_on_dense_layers_with_sgd_tables_trains_and_refuses_a_stray_table_step():
    model = Rec()
    table_opt = torch.optim.SGD(_tables(model), lr=0.5)
    priv = _attach(model, optimizer=torch.optim.Adam(_dense(model), lr=1e-2), table_optimizer=table_opt)
    before = [t.detach().clone() for t in _tables(model)] + [p.detach().clone() for p in _dense(model)]
    losses = priv.fit()
    assert priv.lazy and len(losses) == priv.plan.planned_steps and priv.epsilon_spent() <= 3.0
    priv.flush()
    after = _tables(model) + _dense(model)
    assert all(not torch.equal(a, b) for a, b in zip(before, after))  # every row got its noise
    with pytest.raises(dptrain.PrivacyError, match="cannot step on its own"):
        table_opt.step()


def test_lazy_is_chosen_automatically_for_a_large_table_under_plain_sgd():
    from dptrain.lazy import AUTO_MIN_ROWS

    big = Rec(users=AUTO_MIN_ROWS)
    priv = _attach(big, mechanism="dpsgd", optimizer=torch.optim.SGD(big.parameters(), lr=0.1))
    assert isinstance(priv, LazyPrivateTraining) and priv.lazy
    priv.step(*priv.loader.batch(priv.loader.sampler.sample()))
    assert priv.report().mechanism == "dpsgd"  # the same mechanism, noise written lazily
    small = Rec()
    assert type(dptrain.make_private(small, eps=3.0)) is PrivateTraining
    # Adam on the big table: eager dense noise, with a warning saying why
    other = Rec(users=AUTO_MIN_ROWS)
    with pytest.warns(UserWarning, match="dense noise on every row"):
        priv = _attach(other, mechanism="dpsgd", optimizer=torch.optim.Adam(other.parameters()))
    assert not priv.lazy


def test_explicit_lazy_needs_a_table():
    with pytest.raises(dptrain.PrivacyConfigError, match="no trainable nn.Embedding"):
        dptrain.make_private(nn.Linear(3, 2), eps=3.0, mechanism="lazy")


def test_a_weight_shared_by_two_table_modules_is_refused():
    model = Rec()
    model.items.weight = model.user.weight = nn.Parameter(torch.randn(30, 4))
    model.items.num_embeddings = 30
    with pytest.raises(dptrain.PrivacyConfigError, match="shares its weight with"):
        _attach(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


def test_an_inference_mode_evaluation_flushes_a_table_drawn_by_several_streams():
    # 40,000 × 4 rows: the flush's block spans several noise pieces, drawn on two threads; the
    # evaluation forward runs under torch.inference_mode, as evaluation loops often do
    model = Rec(users=40_000)
    priv = _attach(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    init = model.user.weight.detach().clone()
    priv.step(*priv.loader.batch(priv.loader.sampler.sample()))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model.eval()
        with torch.inference_mode():
            model(torch.zeros(2, 4, dtype=torch.long))
    finally:
        torch.set_num_threads(before)
    assert priv.tables.is_flushed
    assert bool((model.user.weight != init).all())  # every row got its noise


@pytest.mark.parametrize("edit,match", [
    # OneCycleLR cycles the group's momentum (0.85–0.95) unless cycle_momentum=False
    (lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=10), "cycle_momentum=False"),
    (lambda opt: opt.param_groups[0].update(weight_decay=0.1), "weight_decay"),
    (lambda opt: opt.param_groups[0].update(maximize=True), "maximize"),
], ids=["onecycle", "weight_decay", "maximize"])
def test_a_table_group_that_leaves_plain_sgd_after_attach_is_refused_before_the_step(edit, match):
    """Eager SGD would apply momentum / weight decay / maximize to every row; lazy noise cannot, so the
    step is refused (before: the change was ignored and lazy no longer equalled eager)."""
    model = Rec()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    priv = _attach(model, optimizer=opt)
    priv.step(*_chosen(priv, 5))
    edit(opt)
    priv.flush()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(dptrain.PrivacyConfigError, match=match):
        priv.step(*_chosen(priv, 5))
    assert priv.steps == 1 and priv.tables.step == 1  # nothing changed
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_onecycle_without_momentum_cycling_trains_lazily():
    model = Rec()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    priv = _attach(model, optimizer=opt)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=10, cycle_momentum=False)
    for _ in range(3):
        priv.step(*_chosen(priv, 5))
        sched.step()
    assert priv.lazy and priv.tables.step == 3


def test_reattaching_switches_between_lazy_and_eager_consistently():
    """Before: an automatically lazy run re-attached with Adam fell back to eager noise but kept lazy=True
    with no tables, and its next step failed. The switch happens with every row flushed, and the one ledger
    records the same step event under both."""
    from dptrain.lazy import AUTO_MIN_ROWS

    model = Rec(users=AUTO_MIN_ROWS)

    def attach(optimizer):
        priv.attach(_rec_data(users=AUTO_MIN_ROWS), batch_size=10, epochs=1, optimizer=optimizer)

    priv = _attach(model, mechanism="dpsgd", optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    init = model.user.weight.detach().clone()
    priv.step(*_chosen(priv, 5))
    assert priv.lazy and not priv.tables.is_flushed
    with pytest.warns(UserWarning, match="dense noise on every row"):
        attach(torch.optim.Adam(model.parameters()))
    assert not priv.lazy and priv.tables is None and priv.table_optimizer is None
    # flushed at the switch: every row has step 1's noise (per row: one coordinate's tiny draw may round away)
    assert bool((model.user.weight != init).any(1).all())
    assert not model._forward_pre_hooks and not model.user._forward_pre_hooks  # no lazy hooks left
    priv.step(*_chosen(priv, 5))
    attach(torch.optim.SGD(model.parameters(), lr=0.1))  # and back to lazy
    assert priv.lazy and priv.tables.step == 0
    priv.step(*_chosen(priv, 5))
    # one Poisson-sampled Gaussian step per attach, each σ calibrated to the budget the earlier ones left
    sigmas = [e.event.noise_multiplier for e, _ in priv.ledger.entries]
    assert priv.steps == 3 and len(sigmas) == 3 and sigmas == sorted(sigmas)
    assert priv.epsilon_spent() <= priv.config.eps


def test_a_scheduler_on_the_table_optimizer_sees_the_lazy_steps():
    """A lazy step updates the tables itself (not through the table optimizer's step()), so torch's scheduler
    on that optimizer warned "lr_scheduler.step() before optimizer.step()" at every step."""
    import warnings
    model = Rec()
    tables = torch.optim.SGD(_tables(model), lr=0.1)
    dense = torch.optim.Adam(_dense(model))
    priv = dptrain.make_private(model, eps=3.0, mechanism="lazy", seed=1)
    priv.attach(_rec_data(), batch_size=10, epochs=1, optimizer=dense, table_optimizer=tables)
    assert priv.lazy
    schedule = torch.optim.lr_scheduler.StepLR(tables, 1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        priv.step(*_chosen(priv, 5))
        schedule.step()
    assert tables.param_groups[0]["lr"] == pytest.approx(0.05)
