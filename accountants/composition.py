"""Flatten an event tree into (sample rate, noise multiplier) → count.

Every accountant here interprets the same flattened form: a multiset of
Poisson-sampled Gaussian mechanisms (q = 1 means no subsampling), composed adaptively.
Events of other mechanisms reduce to these through a ``to_gaussian_event()`` method.
"""
from __future__ import annotations

from collections import Counter
from functools import lru_cache

from .events import (ComposedEvent, DpEvent, GaussianEvent, NoOpEvent, PoissonSampledEvent,
                     SelfComposedEvent)

#: ((sample_rate, noise_multiplier), count) pairs, sorted: hashable, order-free
Flat = tuple[tuple[tuple[float, float], int], ...]


@lru_cache(maxsize=4096)
def flatten(event: DpEvent) -> Flat:
    """The composition ``event`` describes, as counts of (q, σ) Gaussian steps."""
    counts: Counter[tuple[float, float]] = Counter()
    _collect(event, 1, counts)
    return tuple(sorted((k, v) for k, v in counts.items() if v > 0))


def _collect(event: DpEvent, times: int, counts: Counter) -> None:
    if isinstance(event, NoOpEvent):
        return
    if isinstance(event, GaussianEvent):
        counts[(1.0, float(event.noise_multiplier))] += times
    elif isinstance(event, PoissonSampledEvent):
        inner = event.event
        if isinstance(inner, SelfComposedEvent) and inner.count == 0:
            return  # nothing released
        if isinstance(inner, SelfComposedEvent) and isinstance(inner.event, GaussianEvent):
            # q-sampling of T Gaussian releases at once = one Gaussian with σ/√T on the sample
            inner = GaussianEvent(inner.event.noise_multiplier / inner.count ** 0.5)
        if not isinstance(inner, GaussianEvent):
            raise NotImplementedError(
                f"accountants: Poisson sampling of {type(inner).__name__} is not supported; "
                "only a GaussianEvent (or a SelfComposedEvent of one) can be Poisson-sampled")
        counts[(float(event.sample_rate), float(inner.noise_multiplier))] += times
    elif isinstance(event, SelfComposedEvent):
        _collect(event.event, times * event.count, counts)
    elif isinstance(event, ComposedEvent):
        for e in event.events:
            _collect(e, times, counts)
    elif hasattr(event, "to_gaussian_event"):
        _collect(event.to_gaussian_event(), times, counts)
    else:
        raise NotImplementedError(f"accountants: no accounting rule for {type(event).__name__}; "
                                  "give it a to_gaussian_event() reduction")


def poisson_gaussian(noise_multiplier: float, sample_rate: float, steps: int) -> DpEvent:
    """T steps of DP-SGD: SelfComposed(PoissonSampled(q, Gaussian(σ)), T); the events check σ, q ∈ (0, 1]
    and T (a whole number ≥ 0)."""
    inner: DpEvent = GaussianEvent(noise_multiplier)
    if sample_rate != 1:
        inner = PoissonSampledEvent(sample_rate, inner)
    return SelfComposedEvent(inner, steps)
