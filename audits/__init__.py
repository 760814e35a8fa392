"""Empirical privacy: membership-inference attacks, canary audits and ε lower bounds.

The canary audits (which train models, so need torch) are imported on first use (PEP 562): the
bounds and attack statistics load with numpy and scipy alone.
"""
from __future__ import annotations

import importlib
from typing import Any

from .attacks import (RocResult, best_threshold, counts_at_threshold, lira_scores, logit_confidence,
                      loss_threshold_scores, roc)
from .bounds import (METHODS, bayesian_lower_bound, bayesian_posterior_cdf, clopper_pearson, clopper_pearson_lower_bound,
                     eps_from_rates, epsilon_interval, epsilon_lower_bound)
from .one_run import abstaining_guesses, one_run_audit, one_run_epsilon, one_run_p_value

__all__ = [
    "epsilon_lower_bound", "epsilon_interval", "eps_from_rates", "clopper_pearson", "clopper_pearson_lower_bound",
    "bayesian_posterior_cdf", "bayesian_lower_bound", "METHODS",
    "one_run_epsilon", "one_run_p_value", "one_run_audit", "abstaining_guesses",
    "roc", "RocResult", "loss_threshold_scores", "lira_scores", "logit_confidence", "counts_at_threshold",
    "best_threshold", "make_canaries", "run_canary_audit", "run_lira_audit", "split_threshold_intervals",
    "make_private_trainer", "quick_audit", "AuditResult",
]


_CANARY = ("AuditResult", "make_canaries", "make_private_trainer", "quick_audit", "run_canary_audit",
           "run_lira_audit", "split_threshold_intervals")


def __getattr__(name: str) -> Any:
    """The canary-audit names from :mod:`audits.canary`, imported on first use."""
    if name in _CANARY:
        value = getattr(importlib.import_module(".canary", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'audits' has no attribute {name!r}")
