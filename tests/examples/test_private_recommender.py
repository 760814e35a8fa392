"""The private recommender example runs end to end at a tiny size and spends what it reports."""
from __future__ import annotations

import importlib.util
import pathlib

import numpy as np

_path = pathlib.Path(__file__).resolve().parents[2] / "examples" / "private_recommender.py"
_spec = importlib.util.spec_from_file_location("private_recommender", _path)
rec = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rec)  # type: ignore[union-attr]


def test_zipf_ids_are_power_law_popular():
    ids = rec.zipf_ids(200_000, 1000, 1.05, np.random.default_rng(0))
    counts = np.bincount(ids, minlength=1000)
    assert ids.min() >= 0 and ids.max() < 1000
    assert counts[0] > 5 * counts[9] > 0  # P(0)/P(9) = 10^1.05 ≈ 11


def test_example_trains_both_models_within_the_budget():
    out = rec.main(["--examples", "3000", "--users", "300", "--items", "1000", "--dim", "4", "--batch", "300",
                    "--epochs", "1", "--eps", "3", "--accountant", "rdp"])
    assert out["private_epsilon"] <= 3.0 and out["private_steps"] == 8
    for key in ("non_private_test_auc", "private_test_auc", "auc_true_probabilities"):
        assert 0.0 <= out[key] <= 1.0
    assert out["auc_true_probabilities"] > 0.7  # the synthetic clicks carry signal
