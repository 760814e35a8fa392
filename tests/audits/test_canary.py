"""Canary audits detect a broken DP-SGD and never refute a correct one.

The audited DP-SGD is built here from ``dptrain.per_sample_grads`` with its own clipping and
noise (dptrain itself untouched), so the same loop runs correct and broken: Poisson sampling
at rate q, per-example gradients, clipping to norm 1 (or not), sum + N(0, σ²) per coordinate
with σ calibrated by the accountant for the claimed ε, SGD with momentum.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import accountants
import dptrain
import numpy as np
from scipy import optimize

from audits import (AuditResult, make_canaries, make_private_trainer, run_canary_audit, run_lira_audit,
                    split_threshold_intervals)
from dptrain.demo import digits_split

CLAIMED_EPS, DELTA, EPOCHS, BATCH = 0.5, 1e-9, 30, 128
# One-run bounds are asserted at this confidence: for a correctly implemented (ε, δ)-DP run the
# Steinke et al. (2023) bound exceeds ε with probability ≤ 1e-6 (their Thm 5.2, any seed). The
# bound's δ-term 2mδ must sit below 1e-6 for it to say anything at that level, hence δ = 1e-9.
STRICT = 1 - 1e-6


def trainer(clip: bool = True, noise_factor: float = 1.0):
    """Hand-written DP-SGD on a linear model claiming ε = CLAIMED_EPS; broken when ``clip=False``
    (per-example gradients never clipped, noise still scaled for norm 1) or ``noise_factor < 1``."""
    def train_fn(data, seed):
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        model, loss_fn = nn.Linear(64, 10), nn.CrossEntropyLoss()
        x, y = data.tensors
        n = len(x)
        q = BATCH / n
        steps = EPOCHS * round(1 / q)
        sigma = accountants.calibrate_noise(CLAIMED_EPS, DELTA, q, steps)
        opt = torch.optim.SGD(model.parameters(), lr=0.25, momentum=0.9)
        params = dict(model.named_parameters())
        for _ in range(steps):
            batch = torch.nonzero(torch.rand(n, generator=g) < q).squeeze(1)
            sums = {k: torch.zeros_like(p) for k, p in params.items()}
            if len(batch):
                grads = dptrain.per_sample_grads(model, loss_fn, x[batch], y[batch])
                norms = torch.sqrt(sum(gr.flatten(1).pow(2).sum(1) for gr in grads.values()))
                scale = torch.clamp(1.0 / (norms + 1e-12), max=1.0) if clip else torch.ones_like(norms)
                sums = {k: torch.einsum("b,b...->...", scale, grads[k]) for k in params}
            for k, p in params.items():
                p.grad = (sums[k] + noise_factor * sigma * torch.randn(p.shape, generator=g)) / BATCH
            opt.step()
        return model, CLAIMED_EPS, DELTA
    return train_fn


@pytest.fixture(scope="module")
def digits_train():
    return digits_split(0)[0]


def test_broken_dp_sgd_is_detected(digits_train):
    # unclipped ±10 canaries (gradient norm ~ 100 vs clip norm 1) are memorised: measured ε̂ at
    # confidence 1 − 1e-6 was 1.05 and 0.87 on seeds 0 and 1 (0.80 / 0.68 with ±5 canaries)
    result = run_canary_audit(trainer(clip=False), digits_train, m=200, seed=0, canary_scale=10.0,
                              confidence=STRICT)
    assert result.one_run["epsilon"] > CLAIMED_EPS
    assert result.violated and "EXCEEDS" in result.to_text()


def test_correct_dp_sgd_is_not_refuted(digits_train):
    # same loop with clipping: false-failure probability ≤ 1e-6 (STRICT); measured ε̂ = 0
    result = run_canary_audit(trainer(clip=True), digits_train, m=200, seed=0, canary_scale=10.0,
                              confidence=STRICT)
    assert result.one_run["epsilon"] <= CLAIMED_EPS


def test_make_private_run_is_not_refuted(digits_train):
    # the library's own training loop, audited the same way (false failure ≤ 1e-6)
    train_fn = make_private_trainer(eps=CLAIMED_EPS, delta=DELTA)
    result = run_canary_audit(train_fn, digits_train, m=200, seed=0, canary_scale=10.0, confidence=STRICT)
    assert result.delta == DELTA and result.theoretical_epsilon <= CLAIMED_EPS * 1.01
    assert result.one_run["epsilon"] <= result.theoretical_epsilon


def test_many_runs_audit_gives_both_intervals(digits_train, tmp_path):
    result = run_canary_audit(trainer(clip=False), digits_train, m=100, runs=3, seed=1)
    assert set(result.intervals) == {"clopper-pearson", "bayesian"}
    for lo, est, hi in result.intervals.values():
        assert 0 <= lo <= est <= hi
    assert result.to_dict()["runs"] == 3
    png = tmp_path / "roc.png"
    result.save_roc_plot(str(png))
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_canaries_are_out_of_distribution():
    c = make_canaries(50, seed=3)
    assert c.tensors[0].shape == (50, 64) and float(c.tensors[0].max()) > 1.0


def test_lira_audit_detects_the_broken_run(digits_train):
    result = run_lira_audit(trainer(clip=False), digits_train, m=200, shadows=8, seed=2)
    # under no membership signal, the AUC of 100 vs 100 canaries has sd ≈ 0.041: 0.65 is > 3.5 sd
    assert result.roc["auc"] > 0.65
    assert set(result.intervals) == {"clopper-pearson", "bayesian"}
    with pytest.raises(ValueError, match="at least 2 shadow"):
        run_lira_audit(trainer(clip=True), digits_train, m=10, shadows=1)


def test_split_threshold_intervals_on_a_known_mechanism():
    # Scores of a Gaussian mechanism that is exactly (1, 1e-5)-DP, standardised: members N(μ, 1),
    # others N(0, 1), μ = 1/σ. The threshold is picked on one half and the counts come from the
    # other, so each lower end is a valid 95 % bound on ε(α, β) ≤ 1 of that threshold test.
    mu = optimize.brentq(lambda m: accountants.delta_from_gdp(1.0, m) - 1e-5, 0.01, 5)
    rng = np.random.default_rng(0)
    is_in = rng.random(200_000) < 0.5
    scores = rng.normal(is_in * mu, 1.0)
    out = split_threshold_intervals(scores, is_in, 1e-5, np.random.default_rng(1))
    assert set(out) == {"clopper-pearson", "bayesian"}
    for method, (lo, est, hi) in out.items():
        assert 0.2 < lo < 1.0 and lo <= est <= hi, (method, lo, est, hi)


def test_verdict_uses_only_the_one_run_bound():
    # the Bayesian interval is an estimate, and Clopper–Pearson over canaries of one model treats them as
    # independent trials: neither refutes a claim; the one-run bound (valid for one training run) does
    one_run = {"epsilon": 0.1, "r": 10, "v": 6, "m": 20, "k": 5, "confidence": 0.95}
    result = AuditResult(1.0, 1e-5, one_run,
                         intervals={"clopper-pearson": (1.05, 1.2, 2.0), "bayesian": (1.1, 1.3, 1.6)})
    text = result.to_text()
    assert not result.violated and "estimate, not in the verdict" in text and "an approximation" in text
    result.one_run["epsilon"] = 1.01
    assert result.violated


def test_split_intervals_with_a_one_class_selection_half():
    # tiny audits (dptrain audit --canaries 2): a half without members or non-members has no threshold test
    scores, is_in = np.arange(4.0), np.array([True, True, False, False])
    for seed in range(8):
        out = split_threshold_intervals(scores, is_in, 1e-5, np.random.default_rng(seed))
        assert out == {} or set(out) == {"clopper-pearson", "bayesian"}


def test_several_runs_report_the_claim_of_the_run_whose_bound_decides():
    """With runs > 1 the one-run bound came from run 0 and the claimed ε and δ from the last run."""
    from torch.utils.data import TensorDataset

    def train_fn(data, seed):
        torch.manual_seed(seed)
        return nn.Linear(data.tensors[0].shape[1], 3), 1.0 + seed, 1e-5 * (1 + seed)

    g = torch.Generator().manual_seed(0)
    base = TensorDataset(torch.randn(30, 4, generator=g), torch.randint(0, 3, (30,), generator=g))
    result = run_canary_audit(train_fn, base, m=10, runs=3, seed=0)
    assert (result.theoretical_epsilon, result.delta) == (1.0, 1e-5)


def test_canaries_take_the_shape_of_image_examples():
    """An audit of a model on image-shaped data ([N, 1, 8, 8]) gets canaries of that shape (they were always
    flat: the audit failed with a shape error)."""
    x = torch.rand(40, 1, 8, 8)
    base = torch.utils.data.TensorDataset(x, torch.randint(0, 3, (40,)))
    seen = []

    def train(data, seed):
        seen.append(tuple(data.tensors[0].shape[1:]))
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * 64, 3))
        priv = dptrain.make_private(model, eps=1.0, seed=seed)
        priv.attach(data, batch_size=20, steps=2, lr=0.1)
        priv.fit()
        return model, priv.epsilon_spent(), priv.plan.delta

    result = run_canary_audit(train, base, m=8)
    assert seen == [(1, 8, 8)] and result.theoretical_epsilon <= 1.0 and result.canaries == 8
    assert make_canaries(3, (1, 2, 2)).tensors[0].shape == (3, 1, 2, 2)


def test_canaries_of_token_id_data_are_ids():
    """Integer inputs (an embedding model's token ids) get id canaries of their dtype; float ±5 canaries
    turned the merged training set into floats and the embedding lookup failed."""
    x = torch.randint(0, 20, (40, 5))
    base = torch.utils.data.TensorDataset(x, torch.randint(0, 3, (40,)))

    def train(data, seed):
        assert data.tensors[0].dtype == torch.long and int(data.tensors[0].max()) < 20
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Embedding(20, 4), nn.Flatten(), nn.Linear(20, 3))
        priv = dptrain.make_private(model, eps=1.0, seed=seed)
        priv.attach(data, batch_size=20, steps=2, lr=0.1)
        priv.fit()
        return model, priv.epsilon_spent(), priv.plan.delta

    assert run_canary_audit(train, base, m=8).canaries == 8


def test_verdict_states_its_confidence():
    """The verdict was 'the training is not as private as claimed', a certainty; it is a test at the one-run
    bound's confidence, which a correct run fails with probability up to 1 − confidence."""
    one_run = {"epsilon": 2.0, "r": 10, "v": 10, "m": 20, "k": 5, "confidence": 0.95}
    text = AuditResult(1.0, 1e-5, one_run).to_text()
    verdict = text.splitlines()[-1]
    assert "EXCEEDS" in verdict and "at 95 % confidence" in verdict
    assert "evidence that the training is less private than claimed" in verdict
    assert "not as private as claimed" not in text
    one_run["confidence"] = STRICT
    assert "at 99.9999 % confidence" in AuditResult(1.0, 1e-5, one_run).to_text().splitlines()[-1]


def test_make_private_trainer_claims_the_accountants_upper_bound(monkeypatch):
    """The verdict compares the empirical lower bound with the claimed ε; make_private_trainer's claim is the
    PRV accountant's upper bound on ε (above its estimate), so accounting error never counts against a run."""
    from torch.utils.data import TensorDataset

    made = []
    make_private = dptrain.make_private
    monkeypatch.setattr(dptrain, "make_private", lambda *a, **k: made.append(make_private(*a, **k)) or made[-1])
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 4, generator=g), torch.randint(0, 3, (64,), generator=g))
    _, claimed, delta = make_private_trainer(eps=1.0, epochs=1, batch_size=16)(data, 0)
    low, estimate, upper = made[0].ledger.epsilon_bounds(delta)
    assert claimed == upper and estimate < upper


@pytest.mark.parametrize("training", [True, False])
def test_canary_logit_confidence_keeps_the_model_mode(training):
    """canary_logit_confidence left every model in train mode (canary_scores restored it)."""
    from audits.canary import canary_logit_confidence

    model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5))
    model.train(training)
    phi = canary_logit_confidence(model, make_canaries(5, 4, n_classes=3))
    assert phi.shape == (5,) and model.training is training and model[1].training is training


def test_canary_logit_confidence_restores_the_mode_when_the_model_fails():
    from audits.canary import canary_logit_confidence

    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    model = Broken().train()
    with pytest.raises(RuntimeError, match="boom"):
        canary_logit_confidence(model, make_canaries(2, 4))
    assert model.training


@pytest.mark.parametrize("score", ["canary_scores", "canary_logit_confidence"])
def test_canary_scores_keep_each_submodule_mode(score):
    """They restored only the top-level mode (model.train(was)), switching a dropout layer the user keeps
    in eval mode back to training."""
    import audits.canary as canary

    model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5)).train()
    model[1].eval()
    getattr(canary, score)(model, make_canaries(5, 4, n_classes=3))
    assert model.training and model[0].training and not model[1].training
