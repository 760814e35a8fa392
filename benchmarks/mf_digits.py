"""Test accuracy on digits at equal ε: DP-SGD vs matrix-factorization mechanisms.

Linear model, expected batch 128 (N/11 per step), SGD with momentum, 30 epochs, clip 1,
δ = 1/N^1.1, σ calibrated per mechanism to the same ε; three seeds per configuration.
``dpsgd`` is Poisson-sampled DP-SGD (amplified); ``dpsgd-fixed-epoch`` is DP-SGD in the
no-amplification regime the MF papers compare against: the same fixed-epoch batches as
``fft-mf`` / ``multi-epoch-mf``, C = identity (independent noise), sensitivity √k for k
epochs, the same σ as ``fft-mf`` (so the same ε: one Gaussian release of C·G).
Prints one JSON object (median accuracy and spent ε per mechanism and ε).

    python benchmarks/mf_digits.py
"""
from __future__ import annotations

import json
import statistics
import time

import torch
from torch import nn

import dptrain
from dptrain.demo import accuracy, digits_split
from mechanisms.mf.mechanism import MatrixFactorizationMechanism
from mechanisms.mf.strategies import identity

MECHANISMS = ("dpsgd", "banded-mf", "multi-epoch-mf", "fft-mf", "dpsgd-fixed-epoch")


def identity_noise(priv: dptrain.PrivateTraining, seed: int) -> None:
    """Swap the fft-mf mechanism of ``priv`` for C = identity under the same plan and σ."""
    old = priv.mechanism
    new = MatrixFactorizationMechanism(identity(old.strategy.n), old.noise_multiplier, old.max_grad_norm,
                                       participations=old.participations, min_separation=old.min_separation,
                                       schema=old.schema, seed=seed, name=old.name)
    new.plan = old.plan
    priv.mechanism = priv.optimizer.mechanism = new


def run(mechanism: str, eps: float, seed: int, epochs: int = 30) -> tuple[float, float]:
    train, test = digits_split(0)
    torch.manual_seed(seed)
    model = nn.Linear(64, 10)
    fixed_epoch_dpsgd = mechanism == "dpsgd-fixed-epoch"
    priv = dptrain.make_private(model, eps=eps, mechanism="fft-mf" if fixed_epoch_dpsgd else mechanism, seed=seed)
    priv.attach(train, batch_size=128, epochs=epochs,
                optimizer=torch.optim.SGD(model.parameters(), lr=0.25, momentum=0.9))
    if fixed_epoch_dpsgd:
        identity_noise(priv, seed)
    priv.fit()
    return accuracy(model, test), priv.epsilon_spent()


def main() -> None:
    out = {}
    for eps in (1.0, 3.0, 8.0):
        for mech in MECHANISMS:
            t = time.perf_counter()
            results = [run(mech, eps, seed) for seed in range(3)]
            out[f"eps={eps:g}/{mech}"] = {"median_accuracy": statistics.median(a for a, _ in results),
                                         "accuracies": [a for a, _ in results],
                                         "epsilon_spent": results[0][1], "seconds": time.perf_counter() - t}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
