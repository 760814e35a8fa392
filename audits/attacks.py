"""Membership-inference attacks and their ROC summaries.

- Loss threshold (Yeom et al. 2018): score = −loss; members have lower loss.
- LiRA (Carlini et al. 2022, 'Membership Inference Attacks From First Principles'):
  per example, the logit-scaled confidence φ = log(p / (1 − p)) of the true class is
  modelled as Gaussian over shadow models trained with (IN) and without (OUT) the
  example. Online: score = log N(φ; μ_in, σ_in²) − log N(φ; μ_out, σ_out²);
  offline: score = −log of the one-sided OUT tail, i.e. how far φ sits above the OUT fit.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class RocResult:
    fpr: np.ndarray
    tpr: np.ndarray
    auc: float

    def tpr_at(self, fpr: float) -> float:
        """Largest TPR reachable with FPR ≤ ``fpr``."""
        ok = self.fpr <= fpr
        return float(self.tpr[ok].max()) if ok.any() else 0.0

    def to_dict(self) -> dict:
        return {"auc": self.auc, "tpr_at_fpr_0.1%": self.tpr_at(1e-3), "tpr_at_fpr_1%": self.tpr_at(1e-2)}


def _membership_labels(labels: np.ndarray, name: str, caller: str) -> np.ndarray:
    """``labels`` as a bool array: booleans or 0 / 1 only (else a ValueError naming ``caller`` and ``name``).

    The ±1 convention (−1 = not a member) is refused rather than cast: bool(−1) is True, so it would
    read every example as a member."""
    raw = np.asarray(labels)
    if raw.dtype == bool:
        return raw
    try:
        ok = np.isin(raw, (0, 1))
    except TypeError:
        ok = np.zeros(raw.shape, bool)
    if ok.all():
        return raw.astype(bool)
    if raw.dtype.kind in "iuf" and np.isin(raw, (-1, 1)).all():
        raise ValueError(f"{caller}: {name} looks like the ±1 convention (−1 = not a member), which is not "
                         f"accepted: a cast to bool makes −1 a member. Pass booleans or 0 / 1, e.g. `{name} > 0`")
    bad = raw[~ok][:5]
    raise ValueError(f"{caller}: {name} must be booleans or 0 / 1 (True / 1 = member), got values such as {bad}")


def _finite_scores(scores: np.ndarray, caller: str) -> np.ndarray:
    """``scores`` as floats, all finite (else a ValueError naming ``caller`` and how many are not)."""
    scores = np.asarray(scores, float)
    bad = ~np.isfinite(scores)
    if bad.any():
        where = np.flatnonzero(bad.ravel())
        raise ValueError(f"{caller}: {where.size} of {scores.size} scores are not finite (NaN or ±inf), at indices "
                         f"{where[:10].tolist()}{' …' if where.size > 10 else ''}; a diverged model or an infinite "
                         "loss gives no membership score (sorting would rank NaN as the most member-like)")
    return scores


def _scores_and_labels(scores: np.ndarray, is_member: np.ndarray, caller: str) -> tuple[np.ndarray, np.ndarray]:
    """1-D finite float scores and bool labels (booleans or 0 / 1) of the same length (else a ValueError
    naming ``caller``)."""
    scores, raw = np.asarray(scores, float), np.asarray(is_member)
    if scores.ndim != 1 or raw.shape != scores.shape:
        raise ValueError(f"{caller}: scores and is_member must be 1-D arrays of the same length (one label per "
                         f"score), got shapes {scores.shape} and {raw.shape}")
    return _finite_scores(scores, caller), _membership_labels(raw, "is_member", caller)


def roc(scores: np.ndarray, is_member: np.ndarray) -> RocResult:
    """ROC of the test 'member if score ≥ t' over all thresholds t (ties handled exactly)."""
    scores, is_member = _scores_and_labels(scores, is_member, "roc")
    n_in, n_out = int(is_member.sum()), int((~is_member).sum())
    if n_in == 0 or n_out == 0:
        raise ValueError("roc: need both members and non-members")
    order = np.argsort(-scores, kind="stable")
    s, m = scores[order], is_member[order]
    last_of_tie = np.r_[s[1:] != s[:-1], True]
    tp, fp = np.cumsum(m)[last_of_tie], np.cumsum(~m)[last_of_tie]
    tpr, fpr = np.r_[0.0, tp / n_in], np.r_[0.0, fp / n_out]
    return RocResult(fpr, tpr, float(np.trapezoid(tpr, fpr)))


def loss_threshold_scores(losses: np.ndarray) -> np.ndarray:
    """Membership score of the loss attack: −loss."""
    return -np.asarray(losses, float)


def logit_confidence(probs_true_class: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """φ = log(p / (1 − p)), numerically clipped."""
    p = np.clip(np.asarray(probs_true_class, float), eps, 1 - eps)
    return np.log(p) - np.log1p(-p)


def lira_scores(target_phi: np.ndarray, out_phi: np.ndarray, in_phi: np.ndarray | None = None,
                min_std: float = 1e-3, fixed_variance: bool = True) -> np.ndarray:
    """LiRA membership scores for E examples.

    ``target_phi``: [E] φ under the attacked model; ``out_phi`` / ``in_phi``: [S, E] φ under
    shadow models without / with each example (NaN where a shadow model does not apply).
    ``in_phi=None`` gives the offline attack. With few shadow models, per-example variances
    are noisy: ``fixed_variance`` uses one pooled standard deviation per side (Carlini et al.
    2022, §VI), and an example with no IN (or OUT) shadow falls back to the pooled mean shift.
    """
    out_phi = np.asarray(out_phi, float)
    if out_phi.ndim != 2 or out_phi.shape[0] < 2 or (in_phi is not None and np.asarray(in_phi).shape[0] < 2):
        raise ValueError("lira_scores: LiRA fits a Gaussian per example and needs at least 2 shadow models "
                         f"on each side (got out_phi of shape {out_phi.shape}); train more shadow models")
    target_phi = np.asarray(target_phi, float)
    shapes = [target_phi.shape, out_phi.shape[1:]] + ([] if in_phi is None else [np.shape(in_phi)[1:]])
    if target_phi.ndim != 1 or (in_phi is not None and np.ndim(in_phi) != 2) or len(set(shapes)) > 1:
        raise ValueError("lira_scores: need target_phi of shape [E] and out_phi / in_phi of shape [S, E] for the "
                         f"same E examples, got {target_phi.shape}, {out_phi.shape}"
                         + ("" if in_phi is None else f", {np.shape(in_phi)}"))
    out_mu, out_sd = _fit(out_phi, min_std, fixed_variance)
    if np.isnan(out_mu).all():
        raise ValueError("lira_scores: no example has an OUT shadow model")
    out_mu = np.where(np.isnan(out_mu), np.nanmean(out_mu), out_mu)
    if in_phi is None:
        return -stats.norm.logsf(target_phi, out_mu, out_sd)
    in_mu, in_sd = _fit(np.asarray(in_phi, float), min_std, fixed_variance)
    shift = np.nanmean(in_mu - out_mu) if np.isfinite(in_mu - out_mu).any() else 0.0
    in_mu = np.where(np.isnan(in_mu), out_mu + shift, in_mu)
    return stats.norm.logpdf(target_phi, in_mu, in_sd) - stats.norm.logpdf(target_phi, out_mu, out_sd)


def _fit(phi: np.ndarray, min_std: float, fixed_variance: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-example means (NaN where no sample) and standard deviations, ≥ ``min_std``: pooled over all
    examples, or per example where it has ≥ 2 samples and the median of those elsewhere (pooled if none)."""
    counts = np.sum(~np.isnan(phi), axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mu = np.where(counts > 0, np.nansum(phi, axis=0) / np.maximum(counts, 1), np.nan)
    resid = phi - mu
    pooled = float(np.sqrt(np.nanmean(resid ** 2))) if np.isfinite(resid).any() else 1.0
    if fixed_variance:
        return mu, np.full(phi.shape[1], max(pooled, min_std))
    ok = counts >= 2  # 0 or 1 samples give no spread (nansum of an all-NaN column is 0, not NaN)
    sd = np.sqrt(np.nansum(resid ** 2, axis=0) / np.maximum(counts, 1))
    fallback = float(np.median(sd[ok])) if ok.any() else pooled
    return mu, np.maximum(np.where(ok, sd, fallback), min_std)


def counts_at_threshold(scores: np.ndarray, is_member: np.ndarray, threshold: float) -> tuple[int, int, int, int]:
    """(tp, fp, tn, fn) of the guess 'member if score ≥ threshold'."""
    scores, is_member = _scores_and_labels(scores, is_member, "counts_at_threshold")
    guess = scores >= threshold
    return (int(np.sum(guess & is_member)), int(np.sum(guess & ~is_member)),
            int(np.sum(~guess & ~is_member)), int(np.sum(~guess & is_member)))


def best_threshold(scores: np.ndarray, is_member: np.ndarray, delta: float = 0.0,
                   confidence: float = 0.95, max_candidates: int = 2000) -> float:
    """Threshold whose test 'member if score ≥ t' has the largest Clopper–Pearson lower bound on ε
    on this (selection) data. Maximising the bound, not the point estimate, avoids extreme
    thresholds whose few counts look private-breaking by chance. Candidates: the distinct
    scores, thinned to at most ``max_candidates`` evenly spaced order statistics. Vectorised."""
    from .bounds import clopper_pearson_lower_bound

    scores, is_member = _scores_and_labels(scores, is_member, "best_threshold")
    if is_member.all() or not is_member.any():
        raise ValueError(f"best_threshold: need both members and non-members, got {int(is_member.sum())} members "
                         f"of {is_member.size} scores")
    order = np.argsort(-scores, kind="stable")
    s, m = scores[order], is_member[order]
    last_of_tie = np.r_[s[1:] != s[:-1], True]
    idx = np.flatnonzero(last_of_tie)
    if idx.size > max_candidates:
        idx = idx[np.unique(np.linspace(0, idx.size - 1, max_candidates).round().astype(int))]
    tp, fp = np.cumsum(m)[idx], np.cumsum(~m)[idx]  # guessed 'member': the top idx + 1 scores
    fn, tn = m.sum() - tp, (~m).sum() - fp
    lows = clopper_pearson_lower_bound(tp, fp, tn, fn, delta, confidence)
    return float(s[idx[int(np.argmax(lows))]])
