"""Canary audits of a training procedure: one-run (Steinke et al. 2023) and many-runs.

Canaries are out-of-distribution examples (random ±scale sign images, random labels),
each included in the training set independently with probability ½. After training,
each canary is scored by −loss (members are fit better) and the scores become an
empirical lower bound on ε:
- one run: the abstaining guesser of Steinke, Nasr & Jagielski (2023) → ε̂;
- threshold tests (Jagielski et al. 2020; Nasr et al. 2021): canary scores pooled over
  runs, the threshold chosen on one half and the (tp, fp, tn, fn) counts taken on the
  other → Clopper–Pearson and Bayesian intervals. Pooling m canaries per run treats them
  as independent trials, an approximation when canaries share a model (the one-run
  bound above needs no such assumption).
- LiRA (Carlini et al. 2022) on the canaries, with shadow runs: :func:`run_lira_audit`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from .attacks import best_threshold, counts_at_threshold, lira_scores, logit_confidence, roc
from .bounds import epsilon_interval
from .one_run import one_run_audit

#: train_fn(train_set, seed) -> (trained model, claimed ε, δ); the claimed ε should be an upper bound
#: (e.g. the PRV accountant's upper end, which make_private's epsilon_spent() reports by default)
TrainFn = Callable[[TensorDataset, int], tuple[nn.Module, float, float]]


def make_canaries(m: int, n_features: int | Sequence[int] = 64, n_classes: int = 10, seed: int = 0,
                  scale: float = 5.0) -> TensorDataset:
    """m out-of-distribution canaries: random sign inputs x ∈ {−scale, +scale}^d, random labels.

    ``n_features``: d, or the shape of one example's input (e.g. (1, 8, 8) for images), which
    :func:`run_canary_audit` takes from the training data.

    A scale above the data's range (digits lie in [0, 1]) gives canaries large gradients,
    so an implementation that does not clip them lets them be memorised (and detected).
    Zero-mean signs make canaries nearly orthogonal (cosine ~ ±1/√d), so fitting one
    canary's label barely moves the others' losses; all-positive inputs (cosine ≈ 0.75)
    interfere and weaken the audit.
    """
    g = torch.Generator().manual_seed(seed)
    shape = (int(n_features),) if isinstance(n_features, (int, np.integer)) else tuple(int(k) for k in n_features)
    signs = 2.0 * torch.randint(0, 2, (m, *shape), generator=g).float() - 1.0
    return TensorDataset(scale * signs, torch.randint(0, n_classes, (m,), generator=g))


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode, then every module's own train / eval flag restored (``model.train(was)``
    would switch a submodule the user keeps in eval mode back to training)."""
    saved = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in saved:
            m.training = training


@torch.no_grad()
def canary_scores(model: nn.Module, canaries: TensorDataset) -> np.ndarray:
    """Membership score of each canary: −cross-entropy loss."""
    x, y = canaries.tensors
    with _eval_mode(model):
        losses = nn.functional.cross_entropy(model(x), y, reduction="none")
    return -losses.numpy()


@dataclass
class AuditResult:
    """Theoretical ε next to empirical lower bounds."""

    theoretical_epsilon: float
    delta: float
    one_run: dict
    intervals: dict = field(default_factory=dict)  # method -> (low, estimate, high)
    roc: dict = field(default_factory=dict)
    runs: int = 1
    canaries: int = 0
    roc_curve: tuple | None = None  # (fpr, tpr) arrays, for plotting

    @property
    def violated(self) -> bool:
        """True if the one-run lower bound (Steinke et al. 2023, valid at its confidence for one training
        run) exceeds that run's claimed ε: the claim is refuted at that confidence, i.e. a correct run is
        flagged with probability at most 1 − confidence (5 % at the default 95 %). The claimed ε should be
        an upper bound on the run's ε (make_private_trainer reports the PRV accountant's upper bound, not its
        estimate), so accounting error does not count against the run. The threshold-test intervals pool
        canaries that share a model as if independent (Clopper–Pearson) or are estimates (Bayesian),
        so they never decide the verdict."""
        return self.one_run["epsilon"] > self.theoretical_epsilon

    def to_text(self) -> str:
        lines = ["privacy audit (canaries, membership inference)",
                 f"  theoretical ε (accountant)     {self.theoretical_epsilon:.4f} at δ={self.delta:.3g}",
                 f"  empirical ε, one-run audit     ≥ {self.one_run['epsilon']:.4f}  "
                 f"({self.one_run['v']}/{self.one_run['r']} guesses right, m={self.one_run['m']} canaries, "
                 f"{100 * self.one_run.get('confidence', 0.95):.6g} %)"]
        for method, (lo, est, hi) in self.intervals.items():
            kind = ("95 %, canaries of one model taken as independent trials: an approximation, not in the verdict"
                    if method == "clopper-pearson" else "95 % credible: an estimate, not in the verdict")
            lines.append(f"  empirical ε, {method:<17} [{lo:.4f}, {hi:.4f}] (estimate {est:.4f}, {kind}, "
                         f"threshold chosen on held-out half, {self.runs} run(s))")
        if self.roc:
            lines.append(f"  attack AUC {self.roc['auc']:.3f}, TPR at FPR 1 % {self.roc['tpr_at_fpr_1%']:.3f}, "
                         f"at 0.1 % {self.roc['tpr_at_fpr_0.1%']:.3f}")
        confidence = f"{100 * self.one_run.get('confidence', 0.95):.6g} %"
        lines.append("  verdict: " + (f"EMPIRICAL ε EXCEEDS THE CLAIMED ε at {confidence} confidence "
                                      "(one-run audit): evidence that the training is less private than claimed"
                                      if self.violated else "consistent with the claimed ε (a lower bound below it)"))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"theoretical_epsilon": self.theoretical_epsilon, "delta": self.delta, "one_run": self.one_run,
                "intervals": {k: list(v) for k, v in self.intervals.items()}, "roc": self.roc,
                "runs": self.runs, "canaries": self.canaries, "violated": self.violated}

    def save_roc_plot(self, path: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        if self.roc_curve is not None:
            fpr, tpr = (np.asarray(a) for a in self.roc_curve)
            keep = (fpr > 0) & (tpr > 0)  # log axes: the ROC is a step function between its points
            ax.plot(fpr[keep], tpr[keep], drawstyle="steps-post",
                    label=f"attack (AUC {self.roc.get('auc', float('nan')):.3f})")
        ax.plot([0, 1], [0, 1], ":", color="grey", label="random guessing")
        ax.set(xscale="log", yscale="log", xlim=(1e-3, 1), ylim=(1e-3, 1), xlabel="false positive rate",
               ylabel="true positive rate", title="membership inference on canaries")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def _canaries_like(base: TensorDataset, m: int, seed: int, scale: float) -> TensorDataset:
    """Canaries with the shape and dtype of ``base``'s examples (flat features, images, …); for integer
    inputs (token ids) uniformly random ids in [0, max id] with random labels."""
    x = base.tensors[0]
    canaries = make_canaries(m, tuple(x.shape[1:]), int(base.tensors[1].max()) + 1, seed=seed, scale=scale)
    if x.is_floating_point():
        return canaries if x.dtype == torch.float32 else TensorDataset(canaries.tensors[0].to(x.dtype),
                                                                       canaries.tensors[1])
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, int(x.max()) + 1, (m, *x.shape[1:]), generator=g).to(x.dtype)
    return TensorDataset(ids, canaries.tensors[1])


def run_canary_audit(train_fn: TrainFn, base: TensorDataset, m: int = 200, runs: int = 1, seed: int = 0,
                     progress: bool = False, canary_scale: float = 5.0, confidence: float = 0.95) -> AuditResult:
    """Train ``runs`` times with m random canaries (each in w.p. ½) and audit the claim.

    ``confidence`` is that of the one-run bound (on the first run); the held-out-threshold
    intervals are at 95 %.

    Each run trains on ``base`` plus the canaries drawn in, so N = |base| + (number included)
    varies between runs, and whatever ``train_fn`` derives from N varies with it: with
    :func:`make_private_trainer`, the sample rate q = batch_size / N, the number of steps, the
    default δ = 1/N^1.1 and the σ calibrated to the target ε. Neighbouring canary sets are
    therefore trained with slightly different settings, and each run's claimed ε is computed for
    its own N, i.e. treating N as public, as Opacus-based audits do. At these sizes (m canaries,
    half of them drawn in, against |base| examples) the difference is small.
    """
    rng = np.random.default_rng(seed)
    canaries = _canaries_like(base, m, seed, canary_scale)
    all_scores, all_in = [], []
    one_run = None
    claimed = delta = float("nan")  # of the first run, whose one-run bound decides the verdict
    for run, model, included, run_eps, run_delta in _canary_runs(train_fn, base, canaries, runs, rng, seed,
                                                                 "audit runs" if progress else None):
        scores = canary_scores(model, canaries)
        all_scores.append(scores)
        all_in.append(included)
        if run == 0:
            claimed, delta = run_eps, run_delta
            one_run = one_run_audit(scores, included, delta=delta, confidence=confidence)
    scores, is_in = np.concatenate(all_scores), np.concatenate(all_in)
    result = AuditResult(claimed, delta, one_run, runs=runs, canaries=m)
    if is_in.any() and not is_in.all():  # a ROC needs both members and non-members
        r = roc(scores, is_in)
        result.roc, result.roc_curve = r.to_dict(), (r.fpr, r.tpr)
    result.intervals = split_threshold_intervals(scores, is_in, delta, rng)
    return result


def _canary_runs(train_fn: TrainFn, base: TensorDataset, canaries: TensorDataset, runs: int,
                 rng: np.random.Generator, seed: int, progress: str | None):
    """Yield (run, model, included, claimed ε, δ) for ``runs`` trainings on ``base`` plus each
    canary independently w.p. ½ (``included``: which ones); ``progress`` names a tqdm bar."""
    iterator = range(runs)
    if progress:
        from tqdm import tqdm
        iterator = tqdm(iterator, desc=progress, unit="run")
    m = len(canaries)
    for run in iterator:
        included = rng.random(m) < 0.5
        idx = torch.from_numpy(np.flatnonzero(included))
        data = TensorDataset(torch.cat([base.tensors[0], canaries.tensors[0][idx]]),
                             torch.cat([base.tensors[1], canaries.tensors[1][idx]]))
        model, claimed, delta = train_fn(data, seed + run)
        yield run, model, included, claimed, delta


def split_threshold_intervals(scores: np.ndarray, is_in: np.ndarray, delta: float,
                              rng: np.random.Generator) -> dict:
    """Choose the threshold on a random half of the guesses, count on the other half,
    and give both intervals (the held-out half keeps the intervals honest)."""
    half = rng.permutation(scores.size) < scores.size // 2
    if is_in[half].all() or not is_in[half].any():  # no threshold test to choose
        return {}
    t = best_threshold(scores[half], is_in[half], delta)
    tp, fp, tn, fn = counts_at_threshold(scores[~half], is_in[~half], t)
    if tp + fn == 0 or tn + fp == 0:
        return {}
    return {method: epsilon_interval(tp, fp, tn, fn, delta=delta, method=method)
            for method in ("clopper-pearson", "bayesian")}


@torch.no_grad()
def canary_logit_confidence(model: nn.Module, canaries: TensorDataset) -> np.ndarray:
    """LiRA's statistic per canary: φ = log(p_y / (1 − p_y)) of the true label."""
    x, y = canaries.tensors
    with _eval_mode(model):
        p = torch.softmax(model(x).double(), 1).gather(1, y[:, None]).squeeze(1).numpy()
    return logit_confidence(p)


def run_lira_audit(train_fn: TrainFn, base: TensorDataset, m: int = 200, shadows: int = 8, seed: int = 0,
                   canary_scale: float = 5.0, progress: bool = False) -> AuditResult:
    """LiRA (online) on canaries: ``shadows`` shadow runs fit per-canary IN/OUT Gaussians of φ,
    one more run is attacked; its LiRA scores feed the one-run audit and the intervals."""
    if shadows < 2:
        raise ValueError(f"run_lira_audit: LiRA needs at least 2 shadow models, got {shadows}")
    rng = np.random.default_rng(seed)
    canaries = _canaries_like(base, m, seed, canary_scale)
    phis, masks = [], []
    claimed = delta = float("nan")
    for _, model, included, claimed, delta in _canary_runs(train_fn, base, canaries, shadows + 1, rng, seed,
                                                           "LiRA shadow + target runs" if progress else None):
        phis.append(canary_logit_confidence(model, canaries))
        masks.append(included)
    phi, mask = np.stack(phis[:-1]), np.stack(masks[:-1])
    scores = lira_scores(phis[-1], np.where(mask, np.nan, phi), np.where(mask, phi, np.nan))
    is_in = masks[-1]
    result = AuditResult(claimed, delta, one_run_audit(scores, is_in, delta=delta), runs=shadows + 1, canaries=m)
    r = roc(scores, is_in)
    result.roc, result.roc_curve = r.to_dict(), (r.fpr, r.tpr)
    result.intervals = split_threshold_intervals(scores, is_in, delta, rng)
    return result


def make_private_trainer(eps: float = 3.0, epochs: int = 30, hidden: int = 0, lr: float = 0.25,
                         batch_size: int = 128, delta: float | None = None) -> TrainFn:
    """A ``TrainFn`` that trains through ``dptrain.make_private`` (the public API only);
    ``delta=None`` keeps make_private's default.

    The claimed ε it returns is ``epsilon_spent()`` under the default PRV accountant, which is the
    accountant's upper bound on ε (not its point estimate). The sample rate batch_size / N, the
    steps (``epochs`` passes at that rate), the default δ = 1/N^1.1 and the calibrated σ all follow
    from N, the size of the data it is given: in a canary audit N includes the canaries drawn in,
    so they differ slightly between runs (see :func:`run_canary_audit`).
    """
    import dptrain

    def train(data: TensorDataset, seed: int) -> tuple[nn.Module, float, float]:
        torch.manual_seed(seed)
        d, k = data.tensors[0].shape[1], int(data.tensors[1].max()) + 1
        model = nn.Linear(d, k) if hidden == 0 else nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, k))
        priv = dptrain.make_private(model, eps=eps, delta=delta, seed=seed)
        priv.attach(data, batch_size=batch_size, epochs=epochs,
                    optimizer=torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9))
        priv.fit()
        return model, priv.epsilon_spent(), priv.plan.delta

    return train


def quick_audit(eps: float = 3.0, m: int = 200, runs: int = 1, seed: int = 0, epochs: int = 30,
                progress: bool = False) -> AuditResult:
    """The demo's audit: digits + m canaries, trained with make_private(ε), one-run audit."""
    from dptrain.demo import digits_split

    train, _ = digits_split(seed)
    return run_canary_audit(make_private_trainer(eps=eps, epochs=epochs), train, m=m, runs=runs, seed=seed,
                            progress=progress)
