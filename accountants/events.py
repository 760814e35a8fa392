"""Privacy events: immutable descriptions of what a mechanism released.

Modelled on Google's dp_accounting ``DpEvent``: a mechanism *declares* its event,
an accountant *interprets* it. Nothing about noise lives in an accountant and
nothing about accounting lives in a mechanism.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import Any


def whole_count(count: Any, what: str) -> int:
    """``count`` as an int, if it is a whole number ≥ 0 (a fractional or NaN count of releases is an error)."""
    try:
        ok = count >= 0 and int(count) == count
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok or isinstance(count, bool):
        raise ValueError(f"{what} must be a whole number >= 0 (releases are counted), got {count!r}")
    return int(count)


def is_rate(value: Any) -> bool:
    """Whether ``value`` is a sampling rate: a real number in (0, 1], not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 < value <= 1


def _finite_sigma(value: Any, what: str) -> None:
    if not (isinstance(value, numbers.Real) and 0 < value < math.inf):
        raise ValueError(f"{what}: noise_multiplier must be a positive finite number, got {value!r}; "
                         "σ = 0 has no finite privacy guarantee, and a release with σ = inf reveals nothing (leave it out).")


@dataclass(frozen=True)
class DpEvent:
    """Base class of all privacy events."""


@dataclass(frozen=True)
class GaussianEvent(DpEvent):
    """Gaussian mechanism with L2 sensitivity 1 and noise std ``noise_multiplier``."""

    noise_multiplier: float

    def __post_init__(self) -> None:
        _finite_sigma(self.noise_multiplier, "GaussianEvent")
        object.__setattr__(self, "noise_multiplier", float(self.noise_multiplier))


@dataclass(frozen=True)
class PoissonSampledEvent(DpEvent):
    """``event`` applied to a Poisson subsample: each record included w.p. ``sample_rate``."""

    sample_rate: float
    event: DpEvent

    def __post_init__(self) -> None:
        if not is_rate(self.sample_rate):
            raise ValueError(
                f"PoissonSampledEvent: sample_rate must be in (0, 1], got {self.sample_rate}."
            )
        object.__setattr__(self, "sample_rate", float(self.sample_rate))


@dataclass(frozen=True)
class SelfComposedEvent(DpEvent):
    """``event`` repeated ``count`` times (adaptive composition)."""

    event: DpEvent
    count: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "count", whole_count(self.count, "SelfComposedEvent: count"))


@dataclass(frozen=True)
class ComposedEvent(DpEvent):
    """Adaptive composition of heterogeneous events, in order."""

    events: tuple[DpEvent, ...]

    def __post_init__(self) -> None:
        events = tuple(self.events) if isinstance(self.events, (list, tuple)) else None
        if events is None or not all(isinstance(e, DpEvent) for e in events):
            raise ValueError(f"ComposedEvent: events must be a sequence of DpEvents, got {self.events!r}")
        object.__setattr__(self, "events", events)


@dataclass(frozen=True)
class NoOpEvent(DpEvent):
    """A step that touched no private data (e.g. evaluation on public data)."""


_EVENT_TYPES: dict[str, type[DpEvent]] = {}


def register_event(cls: type[DpEvent]) -> type[DpEvent]:
    """Register an event class so that it round-trips through :func:`event_to_dict`."""
    _EVENT_TYPES[cls.__name__] = cls
    return cls


for _cls in (GaussianEvent, PoissonSampledEvent, SelfComposedEvent, ComposedEvent, NoOpEvent):
    register_event(_cls)


def event_to_dict(event: DpEvent) -> dict[str, Any]:
    """Serialise an event tree to plain JSON-compatible data."""
    out: dict[str, Any] = {"type": type(event).__name__}
    for f in fields(event):
        value = getattr(event, f.name)
        if isinstance(value, DpEvent):
            value = event_to_dict(value)
        elif isinstance(value, tuple) and all(isinstance(v, DpEvent) for v in value):
            value = [event_to_dict(v) for v in value]
        elif hasattr(value, "item") and not isinstance(value, (list, tuple, dict)):  # numpy / torch scalar
            value = value.item()
        out[f.name] = value
    return out


def event_from_dict(data: dict[str, Any]) -> DpEvent:
    """Inverse of :func:`event_to_dict`."""
    data = dict(data)
    name = data.pop("type")
    if name not in _EVENT_TYPES:
        raise ValueError(f"unknown privacy event type {name!r}; known: {sorted(_EVENT_TYPES)}")
    cls = _EVENT_TYPES[name]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and "type" in value:
            value = event_from_dict(value)
        elif isinstance(value, list) and all(isinstance(v, dict) and "type" in v for v in value):
            value = tuple(event_from_dict(v) for v in value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)
