"""What a private run is asked for (:class:`PrivacyConfig`, checked on creation) and what
``attach`` fixes (:class:`TrainingPlan`), with the names ``make_private`` accepts."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import accountants

from .adaptive import ADAPTIVE_CLIPPINGS, adaptive_settings
from .errors import PrivacyConfigError

MF_MECHANISMS = ("banded-mf", "multi-epoch-mf", "fft-mf")
MECHANISMS = ("dpsgd", "lazy") + MF_MECHANISMS
ACCOUNTANTS = accountants.ACCOUNTANTS  # ("prv", "pld", "rdp", "gdp")
CLIPPINGS = ("flat", "per-layer") + ADAPTIVE_CLIPPINGS


#: per-example gradient engines make_private can be told to use (clip_and_sum's method)
ENGINES = ("auto", "vmap", "loop")


def _is_number(value: Any) -> bool:
    """A real number (int, float, NumPy scalar, 0-d tensor); not a string or bool."""
    if isinstance(value, (str, bytes, bool)):
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


@dataclass(frozen=True)
class PrivacyConfig:
    """What the user asked for (``make_private`` arguments)."""

    eps: float | None
    delta: float | None
    max_grad_norm: float
    mechanism: str
    accountant: str
    clipping: Any  # a name in CLIPPINGS, or adaptive settings (dptrain.adaptive.QuantileClipping, RLDPSettings)
    noise_multiplier: float | None
    chunk_size: int | None
    seed: int | None
    bands: int | None = None
    engine: str = "auto"  # clip_and_sum's method: "auto" (fast path where it covers the model), "vmap", "loop"

    def __post_init__(self) -> None:
        for name in ("eps", "delta", "max_grad_norm", "noise_multiplier"):
            value = getattr(self, name)
            if value is not None and not _is_number(value):
                raise PrivacyConfigError(f"make_private: {name} must be a number, got {value!r} "
                                         f"({type(value).__name__})")
        if self.chunk_size is not None and (int(self.chunk_size) != self.chunk_size or self.chunk_size < 1):
            raise PrivacyConfigError(f"make_private: chunk_size must be a positive integer or None, got {self.chunk_size}")
        if self.engine not in ENGINES:
            raise PrivacyConfigError(f"make_private: unknown engine {self.engine!r}; choose one of {ENGINES}")
        if self.engine != "auto" and self.mechanism == "lazy":
            raise PrivacyConfigError("make_private: mechanism='lazy' has its own sparse clipping; engine= applies "
                                     "to the dense mechanisms")
        if self.eps is None and self.noise_multiplier is None:
            raise PrivacyConfigError("make_private: give a target eps (e.g. eps=3) or a noise_multiplier")
        if self.eps is not None and not (self.eps > 0 and math.isfinite(self.eps)):
            raise PrivacyConfigError(f"make_private: eps must be a positive finite number, got {self.eps}; "
                                     "typical values are 1 to 10")
        if self.delta is not None and not 0 < self.delta < 1:
            raise PrivacyConfigError(f"make_private: delta must be in (0, 1), got {self.delta}; "
                                     "leave it None for the default 1/N^1.1")
        if not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise PrivacyConfigError(f"make_private: max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise PrivacyConfigError(f"make_private: noise_multiplier must be > 0, got {self.noise_multiplier}")
        if self.bands is not None and self.mechanism != "banded-mf":
            raise PrivacyConfigError(f"make_private: bands={self.bands} applies to mechanism='banded-mf' only, "
                                     f"not {self.mechanism!r}")
        adaptive = adaptive_settings(self.clipping) is not None
        if adaptive and self.mechanism != "dpsgd":
            raise PrivacyConfigError(f"make_private: clipping={self.clipping!r} works with mechanism='dpsgd' only, "
                                     f"not {self.mechanism!r} (a correlated-noise stream fixes its noise in advance)")
        for value, allowed, what in ((self.mechanism, MECHANISMS, "mechanism"),
                                     (self.accountant, ACCOUNTANTS, "accountant"),
                                     (self.clipping, CLIPPINGS, "clipping")):
            if not (what == "clipping" and adaptive) and value not in allowed:
                raise PrivacyConfigError(f"make_private: unknown {what} {value!r}; choose one of {allowed}")


@dataclass(frozen=True)
class TrainingPlan:
    """What ``attach`` fixed: data size, sampling rate, steps, δ and the calibrated σ."""

    dataset_size: int
    sample_rate: float
    steps_per_epoch: int
    planned_steps: int
    delta: float
    noise_multiplier: float
    planned_epsilon: float  # the run's ε when this plan ends (with the steps of earlier attaches)


def default_delta(n: int) -> float:
    """δ = 1/N^1.1: below 1/N, so that releasing one record in the clear is not allowed."""
    return 1.0 / n ** 1.1



#: the largest δ the default 1/N^1.1 gives without a warning; reached at N ≈ 533 privacy units. With fewer
#: units (a federated run over 10 clients: δ = 0.079) each unit could be published in the clear with
#: probability δ and the run still meet "ε at δ", so such a default is warned about, with its numbers, on
#: stderr and in the run's report.
DEFAULT_DELTA_CAP = 1e-3


def weak_default_delta(delta: float, n: int, units: str = "examples") -> str | None:
    """A warning when ``delta`` is the default 1/N^1.1 for N = ``n`` units and exceeds
    :data:`DEFAULT_DELTA_CAP`; None otherwise."""
    if n < 1 or delta != default_delta(n) or delta <= DEFAULT_DELTA_CAP:
        return None
    some = 1 - (1 - delta) ** n
    return (f"δ = {delta:.3g} is the default 1/N^1.1 for only N = {n} {units}: a weak guarantee (each of the "
            f"{units} could be released in the clear with probability δ, at least one of them with probability "
            f"{some:.0%}, and the run still meet its ε); pass delta= explicitly (e.g. delta=1e-5) or use more {units}")


def resolve_delta(delta: float | None, n: int, who: str, units: str = "examples", private: bool = True,
                  stacklevel: int = 3) -> float:
    """The run's δ: the user's ``delta`` (warned about when ≥ 1/N), else the default 1/N^1.1 for N = ``n``
    privacy units, warned about (:func:`weak_default_delta`) when it exceeds :data:`DEFAULT_DELTA_CAP`.
    ``private=False`` (a run without noise, ε = ∞): δ is only recorded, nothing is warned about."""
    import warnings

    if delta is not None:
        delta = float(delta)
        if not 0 < delta < 1:
            raise PrivacyConfigError(f"{who}: delta must be in (0, 1), got {delta}")
        if private and n >= 1 and delta >= 1 / n:
            warnings.warn(f"{who}: delta={delta:g} is >= 1/N = {1 / n:g} (N = {n} {units}): such a δ allows "
                          f"leaking a whole unit; use delta < 1/N", stacklevel=stacklevel)
        return delta
    default = default_delta(max(n, 1))
    note = weak_default_delta(default, n, units) if private else None
    if note is not None:
        warnings.warn(f"{who}: {note}", stacklevel=stacklevel)
    return default
