"""Private digits classifier, the explicit loop (what `dptrain demo` does, spelled out).

Data: scikit-learn's bundled 8×8 digits (1,797 images, no download).
    python examples/digits_private.py --eps 3
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

import dptrain
from dptrain.demo import accuracy, digits_split


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--eps", type=float, default=3.0)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--hidden", type=int, default=0, help="hidden units (0: linear model)")
    p.add_argument("--save", default=None, help="write the budget report JSON here")
    a = p.parse_args()

    train, test = digits_split(seed=0)
    torch.manual_seed(0)
    model = (nn.Linear(64, 10) if a.hidden == 0
             else nn.Sequential(nn.Linear(64, a.hidden), nn.Tanh(), nn.Linear(a.hidden, 10)))
    priv = dptrain.make_private(model, eps=a.eps, max_grad_norm=1.0, seed=0)  # seeded as `dptrain demo` is
    loader = priv.attach(train, batch_size=128, epochs=a.epochs,
                         optimizer=torch.optim.SGD(model.parameters(), lr=0.25, momentum=0.9))
    for epoch in range(a.epochs):
        losses = [priv.step(x, y) for x, y in loader]
        if epoch % 10 == 9 or epoch == a.epochs - 1:
            print(f"epoch {epoch + 1:3d}  loss {sum(losses) / len(losses):.3f}  "
                  f"ε spent {priv.epsilon_spent():.3f}  test acc {accuracy(model, test):.4f}")
    report = priv.report()
    print(report.to_text())
    if a.save:
        report.save(a.save)


if __name__ == "__main__":
    main()
