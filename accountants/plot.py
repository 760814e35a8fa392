"""PNG plot of a budget report: trade-off curve (ours, GDP, random guessing) and ε over steps."""
from __future__ import annotations

import numpy as np

from .gdp import gaussian_tradeoff
from .report import BudgetReport


def save_report_plot(report: BudgetReport, path: str) -> None:
    """Write a two-panel PNG for ``report`` to ``path`` (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    alphas = np.linspace(0.0, 1.0, 201)
    if report.steps > 0:
        a, b = report.tradeoff_curve(alphas)  # the composition of the steps taken (segments, σ schedule)
        left.plot(a, b, label="this run (PRV, numerical)", lw=2)
        left.plot(alphas, gaussian_tradeoff(alphas, report.gdp_mu), "--", label=f"GDP-CLT μ={report.gdp_mu:.3f}")
    left.plot(alphas, 1 - alphas, ":", color="grey", label="random guessing")
    left.set(xlabel="type I error α (false positive rate)", ylabel="type II error β",
             title="trade-off curve (higher is more private)", xlim=(0, 1), ylim=(0, 1))
    left.legend(loc="lower left", fontsize=8)
    if report.epsilon_history:
        t, e = zip(*report.epsilon_history)
        right.plot(t, e, marker="o", label=f"ε spent ({report.accountant})")
    if report.target_epsilon is not None:
        right.axhline(report.target_epsilon, color="red", ls="--", label="target ε")
    right.set(xlabel="step", ylabel=f"ε at δ={report.delta:.2g}", title="privacy spent over training")
    right.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
