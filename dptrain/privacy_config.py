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
