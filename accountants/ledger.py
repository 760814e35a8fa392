"""The privacy ledger: the history of a run's events, in order.

Thin state: a list of (event, count) entries, consecutive equal events merged. Its ε is
the ε of the adaptive composition of everything recorded, so runs whose σ or q changes
between steps (adaptive mechanisms) are accounted exactly as composed.
"""
from __future__ import annotations

from typing import Any

from .epsilon import check_delta, epsilon_bounds, epsilon_of_event
from .events import ComposedEvent, DpEvent, SelfComposedEvent, event_from_dict, event_to_dict, whole_count


class PrivacyLedger:
    """Records mechanism events; answers ε spent (and ε if one more event were recorded)."""

    def __init__(self) -> None:
        self.entries: list[list[Any]] = []  # [event, count]

    def record(self, event: DpEvent, count: int = 1) -> None:
        count = whole_count(count, "PrivacyLedger.record: count")
        if count == 0:
            return
        if self.entries and self.entries[-1][0] == event:
            self.entries[-1][1] += int(count)
        else:
            self.entries.append([event, int(count)])

    @property
    def steps(self) -> int:
        """Total number of recorded events (counting repeats)."""
        return sum(n for _, n in self.entries)

    def composed(self, extra: tuple[DpEvent, int] | None = None) -> DpEvent:
        parts = [SelfComposedEvent(e, n) for e, n in self.entries]
        if extra is not None:
            parts.append(SelfComposedEvent(extra[0], extra[1]))
        return parts[0] if len(parts) == 1 else ComposedEvent(tuple(parts))

    def prefix(self, steps: int) -> DpEvent:
        """The composed event of the first ``steps`` recorded steps."""
        return ComposedEvent(tuple(SelfComposedEvent(e, n) for e, n in self.first(steps).entries))

    def first(self, steps: int) -> "PrivacyLedger":
        """A ledger of the first ``steps`` recorded steps."""
        out, left = PrivacyLedger(), int(steps)
        for e, n in self.entries:
            if left <= 0:
                break
            out.entries.append([e, min(n, left)])
            left -= n
        return out

    def extends(self, other: "PrivacyLedger") -> bool:
        """Whether this ledger's steps begin with all of ``other``'s, in order (``other`` continued)."""
        last = len(other.entries) - 1
        for i, (event, count) in enumerate(other.entries):
            if i >= len(self.entries) or self.entries[i][0] != event:
                return False
            mine = self.entries[i][1]
            if mine < count or (i < last and mine != count):
                return False
        return True

    def segments(self) -> list[tuple[int, int, float, float]]:
        """(first step, last step, σ, q), 1-based, of each run of equal Poisson-sampled Gaussian steps in
        order; empty if some recorded event is not one such step (a correlated-noise mechanism's)."""
        from .composition import flatten

        out, start = [], 1
        for event, count in self.entries:
            flat = flatten(event)
            if len(flat) != 1 or flat[0][1] != 1:
                return []
            (q, sigma), _ = flat[0]
            out.append((start, start + count - 1, sigma, q))
            start += count
        return out

    def epsilon(self, delta: float, accountant: str = "prv") -> float:
        check_delta(delta)
        if not self.entries:
            return 0.0
        return epsilon_of_event(self.composed(), delta, accountant)

    def epsilon_bounds(self, delta: float) -> tuple[float, float, float]:
        check_delta(delta)
        if not self.entries:
            return (0.0, 0.0, 0.0)
        return epsilon_bounds(self.composed(), delta)

    def epsilon_if(self, event: DpEvent, delta: float, accountant: str = "prv", count: int = 1) -> float:
        """ε as if ``event`` were recorded ``count`` more times."""
        return epsilon_of_event(self.composed((event, count)), delta, accountant)

    def state_dict(self) -> dict[str, Any]:
        return {"entries": [[event_to_dict(e), n] for e, n in self.entries]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.entries = [[event_from_dict(e), whole_count(n, "PrivacyLedger.load_state_dict: count")]
                        for e, n in state["entries"]]
