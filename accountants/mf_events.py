"""Privacy events of matrix-factorization (correlated-noise) mechanisms and their reductions.

A matrix mechanism releases C·G + Z', Z' ~ N(0, s² I) with s = ``noise_multiplier`` × clip
norm, where one example moves C·G by at most sens(C) × clip norm in L2 (sens from the
participation schema, :mod:`mechanisms.mf.sensitivity`). Everything the training run
outputs is post-processing of that one release, so:

- ``MatrixFactorizationEvent`` (no amplification; multi-epoch / FFT / banded MF with
  deterministic batches): the whole run is ONE Gaussian mechanism with sensitivity 1 and
  noise multiplier noise_multiplier / sensitivity (Choquette-Choo et al. 2023,
  arXiv:2211.06530, Sec. 2; Denisov et al. 2022 for adaptive streams).
- ``BandedCyclicPoissonEvent`` (amplified banded MF): C lower-triangular with at most
  b̂ bands, the data split into b̂ fixed partitions, step t Poisson-samples partition
  t mod b̂ with rate q. Choquette-Choo et al. 2023 ("(Amplified) Banded Matrix
  Factorization", arXiv:2306.08153, Sec. 5: Theorem 1 informally, Theorems 4–5
  formally): the run satisfies every privacy guarantee of DP-SGD with sampling rate q and noise multiplier
  noise_multiplier / max_i‖C[:, i]‖ run for ⌈n/b̂⌉ steps — i.e.
  SelfComposed(PoissonSampled(q, Gaussian(σ/‖C‖_col)), ⌈n/b̂⌉). (q is relative to the
  partition: expected batch = q·N/b̂.)

Each event has ``to_gaussian_event()``; every accountant of this package understands the
result. ``calibrate_mf_noise`` finds the *effective* σ (noise_multiplier / sensitivity)
for a target ε with :func:`accountants.calibrate_noise`.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from .calibration import calibrate_noise
from .epsilon import ACCOUNTANTS
from .events import DpEvent, GaussianEvent, is_rate, PoissonSampledEvent, SelfComposedEvent, register_event

MF_SCHEMAS = ("min-sep", "fixed-epoch")


def _positive(name: str, who: str, value: float) -> None:
    if not (isinstance(value, numbers.Real) and not isinstance(value, bool) and value > 0 and math.isfinite(value)):
        raise ValueError(f"{who}: {name} must be a positive finite number, got {value!r}")


def _positive_int(name: str, who: str, value: int) -> None:
    if not (isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1):
        raise ValueError(f"{who}: {name} must be an integer >= 1, got {value!r}")


def _coerce(event: DpEvent, ints: tuple[str, ...], floats: tuple[str, ...]) -> None:
    """Store plain Python numbers (numpy scalars would not serialise to JSON)."""
    for name in ints:
        object.__setattr__(event, name, int(getattr(event, name)))
    for name in floats:
        object.__setattr__(event, name, float(getattr(event, name)))


@register_event
@dataclass(frozen=True)
class MatrixFactorizationEvent(DpEvent):
    """A whole MF run without amplification: one Gaussian release of C·G.

    noise_multiplier: std of the noise added to C·G, in units of the clip norm.
    sensitivity: sens(C) for clip norm 1 under (participations, min_separation, schema).
    """

    noise_multiplier: float
    sensitivity: float
    steps: int
    participations: int = 1
    min_separation: int = 1
    schema: str = "min-sep"

    def __post_init__(self) -> None:
        who = "MatrixFactorizationEvent"
        _positive("noise_multiplier", who, self.noise_multiplier)
        _positive("sensitivity", who, self.sensitivity)
        for name in ("steps", "participations", "min_separation"):
            _positive_int(name, who, getattr(self, name))
        _coerce(self, ints=("steps", "participations", "min_separation"),
                floats=("noise_multiplier", "sensitivity"))
        if self.schema not in MF_SCHEMAS:
            raise ValueError(f"{who}: schema must be one of {MF_SCHEMAS}, got {self.schema!r}")

    @property
    def effective_noise_multiplier(self) -> float:
        return self.noise_multiplier / self.sensitivity

    def to_gaussian_event(self) -> DpEvent:
        return GaussianEvent(self.effective_noise_multiplier)


@register_event
@dataclass(frozen=True)
class BandedCyclicPoissonEvent(DpEvent):
    """Banded MF (≤ ``partitions`` bands) with cyclic Poisson sampling over ``partitions`` partitions.

    noise_multiplier: std of the noise added to C·G, in units of the clip norm.
    max_column_norm: max_i ‖C[:, i]‖ (the one-participation sensitivity).
    sample_rate: Poisson rate within the active partition.
    """

    noise_multiplier: float
    max_column_norm: float
    partitions: int
    steps: int
    sample_rate: float

    def __post_init__(self) -> None:
        who = "BandedCyclicPoissonEvent"
        _positive("noise_multiplier", who, self.noise_multiplier)
        _positive("max_column_norm", who, self.max_column_norm)
        _positive_int("partitions", who, self.partitions)
        _positive_int("steps", who, self.steps)
        if not is_rate(self.sample_rate):
            raise ValueError(f"{who}: sample_rate must be in (0, 1] (Poisson rate within a partition), "
                             f"got {self.sample_rate}")
        _coerce(self, ints=("partitions", "steps"), floats=("noise_multiplier", "max_column_norm", "sample_rate"))

    @property
    def effective_noise_multiplier(self) -> float:
        return self.noise_multiplier / self.max_column_norm

    @property
    def compositions(self) -> int:
        """⌈n / b̂⌉: how many DP-SGD steps the run is equivalent to."""
        return -(-self.steps // self.partitions)

    def to_gaussian_event(self) -> DpEvent:
        inner: DpEvent = GaussianEvent(self.effective_noise_multiplier)
        if self.sample_rate < 1:
            inner = PoissonSampledEvent(self.sample_rate, inner)
        return SelfComposedEvent(inner, self.compositions)


def calibrate_mf_noise(target_eps: float, delta: float, steps: int, sample_rate: float = 1.0,
                       partitions: int | None = None, accountant: str = "prv", rtol: float = 0.01) -> float:
    """Smallest effective σ (noise std on C·G ÷ (sensitivity × clip norm)) meeting (ε, δ).

    partitions=None: no amplification, the run is one Gaussian — ``sample_rate`` must be 1.
    partitions=b̂: amplified banded MF, DP-SGD with rate ``sample_rate`` for ⌈steps/b̂⌉ steps.
    """
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"calibrate_mf_noise: unknown accountant {accountant!r}; choose one of {ACCOUNTANTS}")
    _positive_int("steps", "calibrate_mf_noise", steps)
    if partitions is None:
        if sample_rate != 1.0:
            raise ValueError(f"calibrate_mf_noise: sample_rate={sample_rate} without partitions; MF without "
                             "cyclic Poisson partitions claims no amplification (pass sample_rate=1.0), or "
                             "give partitions=b̂ for amplified banded MF")
        return calibrate_noise(target_eps, delta, 1.0, 1, accountant=accountant, rtol=rtol)
    _positive_int("partitions", "calibrate_mf_noise", partitions)
    return calibrate_noise(target_eps, delta, sample_rate, -(-steps // partitions), accountant=accountant,
                           rtol=rtol)

