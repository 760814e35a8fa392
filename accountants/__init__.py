"""Privacy accounting: PRV, RDP and f-DP (μ-GDP), calibration, ledgers and budget reports.

Mechanisms declare events (:mod:`accountants.events`); accountants interpret them.
"""
from .calibration import UnreachableTargetError, calibrate_noise, calibrate_noise_after
from .composition import flatten, poisson_gaussian
from .epsilon import ACCOUNTANTS, epsilon, epsilon_bounds, epsilon_of_event
from .events import (ComposedEvent, DpEvent, GaussianEvent, NoOpEvent, PoissonSampledEvent,
                     SelfComposedEvent, event_from_dict, event_to_dict, register_event)
from .gdp import delta_from_gdp, eps_from_gdp, gaussian_tradeoff, gdp_mu
from . import mf_events  # noqa: F401 - registers the matrix-factorization events (ledgers round-trip them)
from .ledger import PrivacyLedger
from .report import BudgetReport
from .tradeoff import (ShuffledLimit, shuffled_limit, tradeoff_curve, tradeoff_of_event,
                       tradeoff_separation)

__all__ = [
    "epsilon", "epsilon_of_event", "epsilon_bounds", "calibrate_noise", "calibrate_noise_after", "UnreachableTargetError",
    "gdp_mu", "delta_from_gdp", "eps_from_gdp", "gaussian_tradeoff", "PrivacyLedger", "BudgetReport",
    "DpEvent", "GaussianEvent", "PoissonSampledEvent", "SelfComposedEvent", "ComposedEvent", "NoOpEvent",
    "event_to_dict", "event_from_dict", "register_event", "flatten", "poisson_gaussian", "ACCOUNTANTS",
    "tradeoff_curve", "tradeoff_of_event", "tradeoff_separation", "shuffled_limit", "ShuffledLimit",
]
