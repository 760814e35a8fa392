"""Budget reports: terminal text, JSON, and a PNG plot."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from .backends import gdp_mu_of
from .composition import flatten
from .gdp import gdp_mu

if TYPE_CHECKING:
    import numpy as np

    from .events import DpEvent


@dataclass
class BudgetReport:
    """What a private run spent, and with which parameters."""

    epsilon_spent: float
    delta: float
    target_epsilon: float | None
    noise_multiplier: float
    sample_rate: float
    steps: int
    planned_steps: int | None
    accountant: str
    dataset_size: int | None
    max_grad_norm: float | None
    mechanism: str
    epsilon_bounds: tuple[float, float, float] | None = None
    epsilon_history: list[tuple[int, float]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: runs whose σ varies per step (adaptive clipping): (first step, last step, σ), 1-based
    noise_schedule: list[tuple[int, int, float]] = field(default_factory=list)
    #: how the clip norm was chosen, when it was not fixed
    clipping: str | None = None
    #: the ledger's runs of equal steps: (first step, last step, σ, q), 1-based; more than one after a
    #: re-attach with another plan (``noise_multiplier`` and ``sample_rate`` are then the last plan's)
    segments: list[tuple[int, int, float, float]] = field(default_factory=list)
    #: steps taken before the current plan's attach (``planned_steps`` counts from there; 0: one plan)
    plan_start: int = 0
    #: the ledger's flattened events, [q, σ, count] of Gaussian steps: what ε is computed from (a
    #: matrix-factorization run is one Gaussian, or ⌈T/b̂⌉ sampled ones); empty: use the fields above
    composition: list[list[float]] = field(default_factory=list)

    @property
    def mixed(self) -> bool:
        """Whether the steps taken had more than one (σ, q)."""
        return len({(s, q) for _, _, s, q in self.segments}) > 1

    @property
    def gdp_mu(self) -> float:
        """CLT μ-GDP of the steps taken (Dong, Roth & Su 2019); μ² = Σ_t q_t²(e^{1/σ_t²} − 1) adds over
        the ledger's events (see :meth:`run_event`)."""
        if self.steps == 0:
            return gdp_mu(self.noise_multiplier, self.sample_rate, 0)
        return gdp_mu_of(flatten(self.run_event()))

    def run_event(self) -> "DpEvent":
        """The composition of the steps taken: the ledger's flattened events, else its segments, else the σ
        schedule (at the plan's q), else ``steps`` steps of the plan's (σ, q)."""
        from .composition import poisson_gaussian
        from .events import ComposedEvent

        if self.composition:
            runs = [(s, q, n) for q, s, n in self.composition]
        elif self.segments:
            runs = [(s, q, b - a + 1) for a, b, s, q in self.segments]
        elif self.noise_schedule:
            runs = [(s, self.sample_rate, b - a + 1) for a, b, s in self.noise_schedule]
        else:
            runs = [(self.noise_multiplier, self.sample_rate, self.steps)]
        return ComposedEvent(tuple(poisson_gaussian(s, q, n) for s, q, n in runs))

    def tradeoff_curve(self, alphas: "np.ndarray | None" = None) -> "tuple[np.ndarray, np.ndarray] | None":
        """(α, β(α)): the numerical trade-off curve (a lower bound) of the steps taken, None before the first."""
        from .tradeoff import tradeoff_of_event

        return tradeoff_of_event(self.run_event(), alphas) if self.steps > 0 else None

    def to_text(self) -> str:
        target = "none" if self.target_epsilon is None else f"{self.target_epsilon:g}"
        planned = "" if self.planned_steps is None else f" of {self.planned_steps} planned"
        mixed = "mixed, see segments; last plan " if self.mixed else ""
        if self.plan_start and self.planned_steps is not None:
            planned = (f" in total; {self.steps - self.plan_start} of {self.planned_steps} planned since the last "
                       f"attach (at step {self.plan_start})")
        elif self.mixed and self.planned_steps is not None:
            planned = f" (the last plan: {self.planned_steps} steps)"
        rows = [
            ("ε spent", f"{self.epsilon_spent:.4f}  (target {target}, {self.accountant} accountant)"),
            ("δ", f"{self.delta:.3g}"),
            ("noise multiplier σ", f"{mixed}{self.noise_multiplier:.4f}"),
            ("sample rate q", f"{mixed}{self.sample_rate:.5g}"
             + (f"  (N = {self.dataset_size})" if self.dataset_size else "")),
            ("steps", f"{self.steps}{planned}"),
            ("clip norm C", "n/a" if self.max_grad_norm is None else f"{self.max_grad_norm:g}"),
            ("mechanism", self.mechanism),
            ("neighbours", "add or remove one example; N is public (each step's sum is divided by q·N)"),
            ("μ-GDP (CLT)", f"{self.gdp_mu:.4f}"),
        ]
        if self.clipping is not None:
            rows.append(("clipping", self.clipping))
        if self.mixed:
            rows.append(("segments", "; ".join(f"steps {a}–{b}: σ {s:.4f}, q {q:.5g}" for a, b, s, q in self.segments)))
        if len(self.noise_schedule) > 1:
            sig = [s for _, _, s in self.noise_schedule]
            shown = ", ".join(f"{a}–{b}: {s:.3f}" for a, b, s in self.noise_schedule[:8])
            more = f", … ({len(sig)} ranges)" if len(sig) > 8 else ""
            rows.append(("σ per step", f"{min(sig):.4f} to {max(sig):.4f}; steps {shown}{more}"))
        if self.epsilon_bounds is not None:
            lo, est, up = self.epsilon_bounds
            rows.append(("PRV ε bounds", f"lower {lo:.4f}, estimate {est:.4f}, upper {up:.4f}"))
        width = max(len(k) for k, _ in rows)
        lines = ["privacy budget report"] + [f"  {k:<{width}}  {v}" for k, v in rows]
        notes = list(self.warnings)
        if self.accountant == "gdp":
            notes.append("the gdp accountant's ε is a CLT approximation (optimistic for few steps), not a guarantee")
        lines += [f"  warning: {w}" for w in notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The fields, with ``gdp_mu`` and ``guarantee`` (what the ε is: a bound, or for gdp an approximation;
        the wording of ``dptrain epsilon --json``)."""
        from .cli import GUARANTEE

        out = asdict(self)
        out["gdp_mu"] = self.gdp_mu
        out["guarantee"] = GUARANTEE.get(self.accountant)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BudgetReport":
        data = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if data.get("epsilon_bounds") is not None:
            data["epsilon_bounds"] = tuple(data["epsilon_bounds"])
        data["epsilon_history"] = [tuple(p) for p in data.get("epsilon_history", [])]
        data["noise_schedule"] = [tuple(p) for p in data.get("noise_schedule", [])]
        data["segments"] = [tuple(p) for p in data.get("segments", [])]
        return cls(**data)

    def save(self, path: str) -> None:
        with open(path, "w") as fh:
            fh.write(self.to_json())

    def save_plot(self, path: str) -> None:
        """PNG: trade-off curve (numerical, GDP, random guessing) and ε over steps."""
        from .plot import save_report_plot

        save_report_plot(self, path)

    @classmethod
    def load(cls, path: str) -> "BudgetReport":
        with open(path) as fh:
            return cls.from_dict(json.load(fh))
