"""Poisson subsampling (the sampling that DP-SGD's accounting assumes).

Each of the N examples joins a step's batch independently with probability q, so the
batch size is Binomial(N, q) and may be 0. The sampling rate the accountant uses is the
``q`` this sampler actually draws with — never inferred from a loader's length.
"""
from __future__ import annotations

import secrets
from collections import deque
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset, default_collate

from mechanisms.rng import cpu_generator


class PoissonSampler:
    """Yields index tensors: each index in ``range(n)`` included independently w.p. ``q``."""

    def __init__(self, n: int, sample_rate: float, steps: int, seed: int | None = None) -> None:
        if n <= 0:
            raise ValueError(f"PoissonSampler: the dataset is empty (n={n}); DP training needs data")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"PoissonSampler: sample_rate must be in (0, 1], got {sample_rate}")
        if steps < 1:
            raise ValueError(f"PoissonSampler: steps must be >= 1, got {steps}")
        self.n, self.sample_rate, self.steps = int(n), float(sample_rate), int(steps)
        self.generator = cpu_generator(seed)  # every bit of the seed counts (torch's manual_seed keeps 32)
        self.on_draw: Callable[[int], None] | None = None  # set by the PoissonLoader that owns this sampler

    def __len__(self) -> int:
        return self.steps

    def sample(self) -> torch.Tensor:
        """One batch of indices (sorted, possibly empty)."""
        # float64 uniforms: float32 ones are multiples of 2^-24, so u < q would hold w.p. ⌈q·2^24⌉/2^24 > q
        mask = torch.rand(self.n, generator=self.generator, dtype=torch.float64) < self.sample_rate
        return announce(self, torch.nonzero(mask, as_tuple=False).flatten())

    def __iter__(self) -> Iterator[torch.Tensor]:
        for _ in range(self.steps):
            yield self.sample()

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "sample_rate": self.sample_rate, "steps": self.steps,
                "rng": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["n"]) != self.n or float(state["sample_rate"]) != self.sample_rate:
            raise ValueError(
                f"PoissonSampler: checkpoint was made for n={state['n']}, q={state['sample_rate']}, "
                f"but this sampler has n={self.n}, q={self.sample_rate}; attach the same dataset and batch size")
        self.generator.set_state(state["rng"])


def announce(sampler: Any, indices: torch.Tensor) -> torch.Tensor:
    """``indices``, after telling the loader that owns ``sampler`` (its ``on_draw``) how many rows it drew."""
    if sampler.on_draw is not None:
        sampler.on_draw(int(indices.shape[0]))
    return indices


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` (a tensor, or tuples / lists of them) moved to ``device``; other values unchanged."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def as_pair(batch: Any) -> Any:
    """A collated batch of examples with k > 2 parts ``(x_1, …, x_{k-1}, y)`` as ``((x_1, …, x_{k-1}), y)``.

    The last part is the target and the others the model's inputs (called as ``model(x_1, …)``), as
    for ``TensorDataset(x1, x2, y)``; batches of other shapes are returned unchanged.
    """
    if isinstance(batch, (tuple, list)) and len(batch) > 2:
        return tuple(batch[:-1]), batch[-1]
    return batch


def _empty_like(example: Any) -> Any:
    """A zero-length batch with the structure of one collated example."""
    if isinstance(example, torch.Tensor):
        return example.new_empty((0, *example.shape))
    if isinstance(example, np.ndarray):
        return torch.from_numpy(np.empty((0, *example.shape), dtype=example.dtype))
    if isinstance(example, (bool, int, float)):  # as default_collate: bool, int64, float64
        return torch.empty(0, dtype=torch.bool if isinstance(example, bool) else
                           torch.int64 if isinstance(example, int) else torch.float64)
    if isinstance(example, (tuple, list)):
        return [_empty_like(e) for e in example]  # default_collate gives a list for tuples and lists
    if isinstance(example, dict):
        return {k: _empty_like(v) for k, v in example.items()}
    raise TypeError(f"cannot build an empty batch for examples of type {type(example).__name__}")


class PoissonLoader:
    """Iterates ``steps_per_epoch`` Poisson-sampled batches of ``dataset`` per pass.

    Tensor datasets (``TensorDataset``) are indexed in one gather; other datasets are
    collated with ``default_collate``. Empty batches keep the structure (zero rows). Examples
    of more than two parts (``TensorDataset(x1, x2, y)``) give ``((x1, x2), y)`` (:func:`as_pair`).

    The loader records the row count of every batch its sampler draws (``iter(loader)`` or
    ``loader.sampler.sample()``), so that a training step can check it runs on one of them
    (:meth:`take`): the accountant's q is the rate of *these* draws, not of any other batch.
    """

    #: drawn batches remembered (a longer backlog of unused draws is given up, oldest first)
    BACKLOG = 1024

    def __init__(self, dataset: Dataset, sampler: PoissonSampler, steps_per_epoch: int) -> None:
        self.dataset, self.sampler, self.steps_per_epoch = dataset, sampler, int(steps_per_epoch)
        self._drawn: deque[int] = deque(maxlen=self.BACKLOG)  # row counts of drawn, unused batches, in order
        sampler.on_draw = self._record_drawn
        if isinstance(sampler, ScheduleSampler):
            sampler.before_draw = self._refuse_drawing_ahead
        self._empty = as_pair(_empty_like(dataset[0]))
        # one gather for a plain TensorDataset; a subclass may transform in __getitem__, so it is called
        self._tensors = getattr(dataset, "tensors", None) if type(dataset).__getitem__ is TensorDataset.__getitem__ \
            else None

    @property
    def sample_rate(self) -> float:
        return self.sampler.sample_rate

    def __len__(self) -> int:
        return self.steps_per_epoch

    def batch(self, indices: torch.Tensor) -> Any:
        """The examples at ``indices``, collated."""
        if indices.numel() == 0:
            return self._empty
        if self._tensors is not None:
            return as_pair(tuple(t[indices] for t in self._tensors))
        return as_pair(default_collate([self.dataset[int(i)] for i in indices]))

    def __iter__(self) -> Iterator[Any]:
        for _ in range(self.steps_per_epoch):
            yield self.batch(self.sampler.sample())

    def _record_drawn(self, rows: int) -> None:
        """Record a batch of ``rows`` rows drawn by this loader's sampler. Internal: the sampler calls it; a
        caller that itself builds batches with this loader's Poisson rate (a timing benchmark) may too."""
        self._drawn.append(int(rows))

    def _refuse_drawing_ahead(self) -> None:
        """A schedule's batches are stepped on in order: its sensitivity assumes step t trains on batch t (an
        example's steps at least b̂ apart); drawing batch t + 1 before stepping on batch t would let a step skip."""
        if self._drawn:
            from .errors import PrivacyError
            raise PrivacyError(
                "a correlated-noise run steps on its schedule's batches in order: step on the batch drawn last "
                "(priv.step) before drawing the next one. Its sensitivity assumes step t trains on the schedule's "
                "batch t; skipping one would bring an example's steps closer than the schedule allows.")

    def find(self, rows: int) -> int | None:
        """Position of the oldest drawn, unused batch with ``rows`` rows (None if there is none); :meth:`use`
        it once the step has succeeded. A schedule (:class:`ScheduleSampler`, the correlated-noise
        mechanisms) is used in order, without skipping: its sensitivity assumes step t trains on the
        schedule's batch t (an example's steps at least b̂ apart), which a skipped draw would shift."""
        in_order = isinstance(self.sampler, ScheduleSampler)
        for i, drawn in enumerate(self._drawn):
            if in_order and i > 0:
                return None
            if drawn == rows:
                return i
        return None

    def use(self, position: int) -> None:
        """Use up the drawn batch at ``position`` (of :meth:`find`); the unused ones drawn before it are given
        up (skipping a Poisson draw spends nothing). A batch is used at most once."""
        for _ in range(position + 1):
            self._drawn.popleft()

    def pending(self) -> int:
        """Drawn batches no step has used yet."""
        return len(self._drawn)


class ScheduleSampler:
    """Batches from a seeded schedule (e.g. cyclic Poisson or fixed epoch order for MF mechanisms).

    ``schedule(generator)`` yields index tensors. The state is (seed, steps drawn), so a
    checkpoint resumes the same schedule by replaying it to the same position.
    """

    def __init__(self, schedule, sample_rate: float, steps: int, seed: int | None = None) -> None:
        self.schedule, self.sample_rate, self.steps = schedule, float(sample_rate), int(steps)
        self.seed = int(seed) if seed is not None else secrets.randbits(62)
        self.drawn = 0
        self.on_draw: Callable[[int], None] | None = None  # set by the PoissonLoader that owns this sampler
        self.before_draw: Callable[[], None] | None = None  # likewise
        self._restart()

    def _restart(self) -> None:
        self._it = iter(self.schedule(cpu_generator(self.seed)))

    def __len__(self) -> int:
        return self.steps

    def sample(self) -> torch.Tensor:
        if self.before_draw is not None:  # the owning loader: no draw ahead of the steps (the schedule is in order)
            self.before_draw()
        try:
            batch = next(self._it)
        except StopIteration:
            raise RuntimeError(f"ScheduleSampler: the schedule has only {self.steps} steps; the mechanism was "
                               "planned for that many") from None
        self.drawn += 1
        return announce(self, batch)

    def __iter__(self) -> Iterator[torch.Tensor]:
        """The remaining batches of the schedule (as :class:`PoissonSampler` iterates its steps)."""
        for _ in range(self.steps - self.drawn):
            yield self.sample()

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "drawn": self.drawn, "sample_rate": self.sample_rate}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed, self.drawn = int(state["seed"]), 0
        self._restart()
        for _ in range(int(state["drawn"])):  # replayed to the position, not drawn for training
            next(self._it)
            self.drawn += 1


def unpack_batch(batch: Any) -> tuple[Any, torch.Tensor]:
    """(inputs, targets) of a batch: ``(x, y)``, or ``(x1, …, xk, y)`` with the inputs as a tuple."""
    batch = as_pair(batch)
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ValueError("a batch must be (inputs, targets) or (input_1, ..., input_k, targets); got "
                     f"{type(batch).__name__} of length {len(batch) if hasattr(batch, '__len__') else '?'}")

