"""Batch schedules whose participation pattern the MF accounting assumes.

- ``cyclic_poisson_batches`` (amplified banded MF, arXiv:2306.08153 Sec. 5, Algorithm 2): the N examples
  are split once into b̂ partitions; step t includes each example of partition t mod b̂
  independently with probability q. An example can only appear in steps of one residue
  class mod b̂, so any two of its participations are ≥ b̂ steps apart.
- ``fixed_epoch_batches`` (multi-epoch MF / FFT MF without amplification): the examples are
  cut once into b batches visited in the same order every epoch, so an example in batch r
  participates exactly at r, r + b, r + 2b, … — the fixed-epoch schema, which is also
  b-min-separated with k = ⌈n/b⌉.

Both yield LongTensors of example indices, one per step, from a seeded torch.Generator.
"""
from __future__ import annotations

from typing import Iterator

import torch


def _check(num_examples: int, groups: int, steps: int, who: str) -> None:
    if int(num_examples) != num_examples or num_examples < 1:
        raise ValueError(f"{who}: num_examples must be a positive integer, got {num_examples}")
    if int(groups) != groups or not 1 <= groups <= num_examples:
        raise ValueError(f"{who}: the number of partitions/batches must be in [1, N={num_examples}], got {groups}")
    if int(steps) != steps or steps < 0:
        raise ValueError(f"{who}: steps must be a non-negative integer, got {steps}")


def split(num_examples: int, groups: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A random partition of range(N) into ``groups`` parts of sizes ⌊N/g⌋ or ⌈N/g⌉."""
    perm = torch.randperm(num_examples, generator=generator)
    return list(torch.tensor_split(perm, groups))


def cyclic_poisson_batches(num_examples: int, partitions: int, sample_rate: float, steps: int,
                           generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Step t: Poisson(q) subsample of partition t mod b̂ (batches vary in size; may be empty)."""
    _check(num_examples, partitions, steps, "cyclic_poisson_batches")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"cyclic_poisson_batches: sample_rate must be in (0, 1] (rate within a partition), "
                         f"got {sample_rate}")
    parts = split(num_examples, partitions, generator)
    for t in range(steps):
        part = parts[t % partitions]
        keep = torch.rand(part.shape[0], generator=generator, dtype=torch.float64) < sample_rate  # exact q (float64)
        yield part[keep]


def fixed_epoch_batches(num_examples: int, steps_per_epoch: int, steps: int,
                        generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Step t: batch t mod b of one fixed random split into b batches."""
    _check(num_examples, steps_per_epoch, steps, "fixed_epoch_batches")
    parts = split(num_examples, steps_per_epoch, generator)
    for t in range(steps):
        yield parts[t % steps_per_epoch]
