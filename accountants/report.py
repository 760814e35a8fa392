"""Budget reports: terminal text, JSON, and a PNG plot."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from .backends import gdp_mu_of
from .composition import flatten
from .gdp import gdp_mu

if TYPE_CHECKING:
    import numpy as np

    from .events import DpEvent


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (an infinite or undefined ε, an infinite μ) replaced by None
    (JSON null), so that ``json.dumps(..., allow_nan=False)`` writes strict JSON."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


#: the fields a saved report must have, with the JSON type each must be (None allowed where the field is optional)
_NUMBER, _INT, _STR = "a number", "an integer", "a string"
_REQUIRED = {"epsilon_spent": (_NUMBER, True), "delta": (_NUMBER, False), "target_epsilon": (_NUMBER, True),
             "noise_multiplier": (_NUMBER, True), "sample_rate": (_NUMBER, False), "steps": (_INT, False),
             "planned_steps": (_INT, True), "accountant": (_STR, False), "dataset_size": (_INT, True),
             "max_grad_norm": (_NUMBER, True), "mechanism": (_STR, False)}
_LISTS = ("epsilon_bounds", "epsilon_history", "warnings", "noise_schedule", "segments")


def _check_type(name: str, value: Any, kind: str, nullable: bool) -> None:
    if value is None and nullable:
        return
    ok = {_NUMBER: _is_number(value), _INT: isinstance(value, int) and not isinstance(value, bool),
          _STR: isinstance(value, str)}[kind]
    if not ok:
        raise ValueError(f"field {name!r} must be {kind}{' or null' if nullable else ''}, got {value!r}")


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
        """Strict JSON: a non-finite number (an infinite μ-GDP for a tiny σ, an infinite ε) is written as null."""
        return json.dumps(json_safe(self.to_dict()), indent=2, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BudgetReport":
        """The report ``data`` describes (as written by :meth:`to_dict` / :meth:`to_json`); ``ValueError``
        naming what is wrong when ``data`` is not a budget report."""
        if not isinstance(data, dict):
            raise ValueError(f"not a dptrain budget report (expected a JSON object, got a {type(data).__name__})")
        missing = [name for name in _REQUIRED if name not in data]
        if missing:
            raise ValueError(f"not a dptrain budget report (missing: {', '.join(missing)})")
        for name, (kind, nullable) in _REQUIRED.items():
            _check_type(name, data[name], kind, nullable)
        for name in _LISTS:
            value = data.get(name)
            if value is not None and not isinstance(value, list):
                raise ValueError(f"field {name!r} must be a list, got {value!r}")
            if name in ("epsilon_history", "noise_schedule", "segments") and value:
                if not all(isinstance(p, list) for p in value):
                    raise ValueError(f"field {name!r} must be a list of lists, got {value!r}")
        data = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if data["epsilon_spent"] is None:  # to_json writes an infinite ε as null
            data["epsilon_spent"] = math.inf
        def numbers(p):  # to_json writes an infinite ε as null
            return tuple(math.inf if v is None else v for v in p)

        if data.get("epsilon_bounds") is not None:
            data["epsilon_bounds"] = numbers(data["epsilon_bounds"])
        data["epsilon_history"] = [numbers(p) for p in data.get("epsilon_history") or []]
        data["noise_schedule"] = [tuple(p) for p in data.get("noise_schedule") or []]
        data["segments"] = [tuple(p) for p in data.get("segments") or []]
        data["warnings"] = list(data.get("warnings") or [])
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
        """The report saved at ``path``; ``ValueError`` naming the file when it is not JSON or not a report."""
        with open(path, "rb") as fh:
            raw = fh.read()
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise ValueError(f"{path} is not a JSON budget report (not UTF-8 text; a binary file?)") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not JSON ({exc})") from None
        try:
            return cls.from_dict(data)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
