"""``dptrain demo``: private vs non-private classification of scikit-learn's digits.

Data: the 1,797 8×8 handwritten digits bundled with scikit-learn (no download), split
80/20 (seeded), features scaled to [0, 1]. Model: a linear classifier (64 → 10), as in
Opacus' tutorials. Private run: make_private(model, eps=3), Poisson sampling with
expected batch 128, 30 epochs, σ calibrated by the PRV accountant.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from .private import make_private


@dataclass
class DemoResult:
    private_accuracy: float
    nonprivate_accuracy: float
    report: Any  # accountants.BudgetReport
    seconds: float
    audit: Any = None
    extra: dict = field(default_factory=dict)

    def to_text(self) -> str:
        lines = [
            "dptrain demo: digits (scikit-learn), linear classifier",
            f"  test accuracy, private (ε={self.report.target_epsilon}): {self.private_accuracy:.4f}",
            f"  test accuracy, non-private:            {self.nonprivate_accuracy:.4f}",
            f"  training time:                         {self.seconds:.1f} s",
            "",
            self.report.to_text(),
        ]
        if self.audit is not None:
            lines += ["", self.audit.to_text()]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        out = {"private_accuracy": self.private_accuracy, "nonprivate_accuracy": self.nonprivate_accuracy,
               "seconds": self.seconds, "report": self.report.to_dict()}
        if self.audit is not None:
            out["audit"] = self.audit.to_dict()
        return out

    def to_json(self) -> str:
        """Strict JSON: an infinite or undefined ε (an audit with no errors) is written as null."""
        from audits.cli import json_safe

        return json.dumps(json_safe(self.to_dict()), indent=2, allow_nan=False)


def digits_split(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Train / test ``TensorDataset``s of the digits data (80/20, stratified, seeded)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    as_ds = lambda a, b: TensorDataset(torch.tensor(a, dtype=torch.float32), torch.tensor(b))  # noqa: E731
    return as_ds(xtr, ytr), as_ds(xte, yte)


def linear_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(64, 10)


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset) -> float:
    x, y = data.tensors
    return float((model(x).argmax(1) == y).float().mean())


def train_nonprivate(train: TensorDataset, epochs: int = 30, batch_size: int = 128, lr: float = 0.5,
                     seed: int = 0) -> nn.Module:
    model = linear_model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    loader = torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    return model


def train_private(train: TensorDataset, eps: float = 3.0, epochs: int = 30, batch_size: int = 128,
                  lr: float = 0.25, max_grad_norm: float = 1.0, seed: int | None = 0,
                  accountant: str = "prv"):
    """Private training with make_private; returns (model, PrivateTraining)."""
    model = linear_model(0 if seed is None else seed)
    priv = make_private(model, eps=eps, max_grad_norm=max_grad_norm, accountant=accountant, seed=seed)
    priv.attach(train, batch_size=batch_size, epochs=epochs,
                optimizer=torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9))
    priv.fit()
    return model, priv


def run_demo(eps: float = 3.0, epochs: int = 30, seed: int = 0, audit: bool = True) -> DemoResult:
    train, test = digits_split(seed)
    start = time.perf_counter()
    model, priv = train_private(train, eps=eps, epochs=epochs, seed=seed)
    seconds = time.perf_counter() - start
    baseline = train_nonprivate(train, epochs=epochs, seed=seed)
    result = DemoResult(accuracy(model, test), accuracy(baseline, test), priv.report(), seconds)
    if audit:
        import audits

        result.audit = audits.quick_audit(eps=eps, seed=seed)
    return result
