"""The one small interface every noise mechanism implements.

A mechanism receives, at step ``t``, the *sum of clipped per-example gradients*
(one tensor per trainable parameter, in ``named_parameters()`` order) and returns
the privatized sum. It also declares the privacy event of the steps it has run,
so that an accountant (which knows nothing about noise) can interpret it.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Sequence

import torch

from accountants.events import DpEvent


class NoiseMechanism(ABC):
    """Adds noise to clipped gradient sums and declares the resulting privacy event."""

    #: short name used by ``make_private(mechanism=...)`` and in reports
    name: str = "mechanism"

    @abstractmethod
    def privatize(self, clipped_sums: Sequence[torch.Tensor], step: int) -> list[torch.Tensor]:
        """Return the privatized version of ``clipped_sums`` for training step ``step`` (0-based)."""

    def privatize_mean(self, clipped_sums: Sequence[torch.Tensor], step: int, divisor: float) -> list[torch.Tensor]:
        """``privatize(clipped_sums, step)`` divided by ``divisor`` (the public expected batch size).

        Mechanisms may fuse the division into the noise (fewer passes over the parameters).
        """
        return [g / divisor for g in self.privatize(clipped_sums, step)]

    def privatize_mean_(self, clipped_sums: Sequence[torch.Tensor], step: int, divisor: float) -> list[torch.Tensor]:
        """:meth:`privatize_mean` for a caller that gives the sums up: a mechanism may write the result
        into them (no new buffers) and return them. Here: :meth:`privatize_mean`, sums untouched."""
        return self.privatize_mean(clipped_sums, step, divisor)

    @abstractmethod
    def step_event(self, sample_rate: float) -> DpEvent:
        """Privacy event of one step run with Poisson sampling rate ``sample_rate``."""

    def state_dict(self) -> dict[str, Any]:
        """Serialisable state (RNG, counters)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
