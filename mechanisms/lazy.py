"""Lazy noise for embedding tables (LazyDP: Lim et al., ASPLOS 2024).

Eager DP-SGD with plain SGD adds to every row v of a table, at every step t,
    Δ_t = −lr_t / B · N(0, σ²C² I)        (B: expected batch size, C: clip norm)
whether or not the batch touched row v. A row that no forward pass reads between steps
s and t can instead receive the sum of those steps' noise in one draw,
    N(0, Σ_{u=s}^{t−1} (lr_u σ C / B)² I),
just before it is next read — the sum of independent Gaussians is Gaussian with the
summed variance, so every row has the same distribution as under eager DP-SGD.

Conditions of equivalence (enforced by the caller, :mod:`dptrain.lazy`): the table is
read only through embedding lookups (so "not in the batch" means "not read"), it is
updated by plain SGD (no momentum, no weight decay, no adaptive optimizer: those make
an untouched row's update depend on its history), and the learning rate of every step
is known when that step runs (any schedule works: lr_t is recorded as it is used).
Everything that leaves the process is flushed first (DESIGN.md invariant 7).

State: per-row ``last_step`` (the step up to which the row has its noise) and the running
prefix sum of per-step variances. Memory: one int64 per row plus one float64 per step.
A flush draws its noise in blocks of rows, so its temporary memory stays bounded.

Every row's noise is deferred, the touched rows' included: step t adds only the clipped sums
−lr_t/B · Σ_i clip(g_i) to the rows the batch touched, and its noise N(0, (lr_t σC/B)² I)
becomes pending for every row. Additions commute, so the update of a row that still owes noise
is exact; what matters is that a read sees all the noise of the steps before it, which the
catch-up before every read (and the flush) guarantees. One draw per row read, none per
update, no data-dependent branch (no host synchronisation on a GPU).
"""
from __future__ import annotations

from typing import Any

import torch

from .normal_streams import NormalSource, NormalStreams
from .rng import source_from_state

#: bytes of temporaries per block of :meth:`LazyNoiseTable.flush` (the owed variances, and the
#: noise itself where the source draws it into a buffer before adding it). On the CPU 16 MB blocks
#: reuse the allocator's memory from the second block on, where 64 MB ones faulted fresh pages in
#: every block of a process's first flush (0.59 s against 0.47 s at 10M rows); a GPU's caching
#: allocator has no such cost, and larger blocks mean fewer kernel launches.
FLUSH_BLOCK_BYTES = {"cpu": 16 << 20, "cuda": 64 << 20}
#: a flush's temporaries per row besides the noise: the gathered cumulative variance and the owed
#: variance (float64), and the scale as the table's dtype
_FLUSH_ROW_BYTES = 24


class LazyNoiseTable:
    """Pending-noise bookkeeping for one ``[rows, dim]`` table updated by plain SGD."""

    def __init__(self, weight: torch.Tensor, noise_std: float, expected_batch_size: float,
                 noise: NormalSource | torch.Generator) -> None:
        if weight.dim() != 2:
            raise ValueError(f"LazyNoiseTable: expected a [rows, dim] table, got shape {tuple(weight.shape)}")
        if noise_std < 0 or expected_batch_size <= 0:
            raise ValueError(f"LazyNoiseTable: need noise_std >= 0 and expected_batch_size > 0, "
                             f"got {noise_std}, {expected_batch_size}")
        self.weight = weight
        self.noise_std = float(noise_std)
        self.expected_batch_size = float(expected_batch_size)
        #: where the draws come from (the device's noise source; a flush's blocks are drawn in parallel on the CPU)
        self.streams: NormalSource = NormalStreams([noise]) if isinstance(noise, torch.Generator) else noise
        self.step = 0  # number of optimizer steps taken so far
        self._total = 0.0  # Σ_{u<step} (lr_u σC/B)², the host copy of _cumvar[step]
        self._flushed_at = 0  # every row is up to date at this step (no step taken since the flush)
        self.last_step = torch.zeros(weight.shape[0], dtype=torch.long, device=weight.device)
        # _cumvar[t] = Σ_{u<t} (lr_u σC/B)², grown by doubling
        self._cumvar = torch.zeros(64, dtype=torch.float64, device=weight.device)

    def rebind(self, weight: torch.Tensor, noise: NormalSource | None = None) -> None:
        """Write into ``weight`` from now on: the table's tensor as it is now. A model's ``.half()``,
        ``.double()``, ``.to(device)`` or ``.cpu()`` gives its Parameter new memory, and noise or updates
        written into the old tensor would be lost (its rows would leave the process without their noise).

        What a row owes is kept as step counts, not values, so nothing is lost: the next catch-up or
        flush draws it in ``weight``'s dtype. On a new device the counters move with the table and
        ``noise``, that device's source, draws from then on (it must be given when the device changes).
        """
        if weight.shape != self.weight.shape:
            raise ValueError(f"LazyNoiseTable.rebind: the table's shape changed from {tuple(self.weight.shape)} to "
                             f"{tuple(weight.shape)}; its pending noise belongs to the old rows. Keep the table's "
                             "shape during a private run")
        if weight.device != self.last_step.device:
            if noise is None:
                raise ValueError(f"LazyNoiseTable.rebind: the table moved from {self.last_step.device} to "
                                 f"{weight.device}; pass the noise source of {weight.device}")
            self.last_step = self.last_step.to(weight.device)
            self._cumvar = self._cumvar.to(weight.device)
            self.streams = noise
        self.weight = weight

    def _owed_var(self, last_steps: torch.Tensor) -> torch.Tensor:
        """Σ of the step variances since each ``last_steps`` entry: _cumvar[step] − _cumvar[last]."""
        return self._total - self._cumvar.index_select(0, last_steps)

    def _pending_var(self, rows: torch.Tensor) -> torch.Tensor:
        return self._owed_var(self.last_step.index_select(0, rows))

    def _append_cumvar(self, value: float) -> None:
        if self.step + 1 >= self._cumvar.numel():
            grown = torch.zeros(2 * self._cumvar.numel(), dtype=torch.float64, device=self._cumvar.device)
            grown[: self._cumvar.numel()] = self._cumvar
            self._cumvar = grown
        self._cumvar[self.step + 1] = value

    @torch.no_grad()
    def catch_up(self, rows: torch.Tensor, repeated: bool = False) -> None:
        """Give ``rows`` (unique indices) the noise of every step they skipped.

        Row r gets sqrt(v_r)·z_r, z_r ~ N(0, I), v_r = _cumvar[step] − _cumvar[last_step[r]] ≥ 0; a row
        already up to date (v_r = 0) gets 0·z_r, so no row needs to be picked out on the host.
        ``repeated=True``: ``rows`` may repeat; they are sorted and each row's draw is scaled in at its
        first entry only (v = 0 at the others) — no host synchronisation, which ``torch.unique`` needs
        on a GPU, for one draw per entry instead of one per row.
        """
        if rows.numel() == 0:
            return
        if repeated:
            rows = torch.sort(rows.reshape(-1)).values
            var = self._pending_var(rows)
            var[1:] *= rows[1:] != rows[:-1]
        else:
            var = self._pending_var(rows)
        z = self.streams.randn((rows.numel(), self.weight.shape[1]), self.weight.dtype, self.weight.device)
        z *= var.sqrt_().to(self.weight.dtype).unsqueeze(1)
        self.weight.index_add_(0, rows, z)
        self.last_step.index_fill_(0, rows, self.step)

    @torch.no_grad()
    def sgd_step(self, rows: torch.Tensor, grad_sum_rows: torch.Tensor, lr: float) -> None:
        """Step ``t``: W[rows] −= lr/B · grad_sum_rows; this step's noise becomes pending for every row.

        ``rows`` may repeat (their values add up) and need not be caught up: the noise they owe
        stays owed (see the module docstring).
        """
        b = self.expected_batch_size
        if rows.numel():
            self.weight.index_add_(0, rows, grad_sum_rows.to(self.weight.dtype), alpha=-lr / b)
        self._total += (lr * self.noise_std / b) ** 2
        self._append_cumvar(self._total)
        self.step += 1

    @torch.no_grad()
    def flush(self) -> None:
        """Bring every row up to date (before evaluation, checkpoint or export).

        After a step every row owes at least that step's noise, so the flush draws for every row,
        block by block, and adds sqrt(v_r)·z_r in place (v_r = 0 for a row already up to date; the
        noise source's ``add_row_scaled_``, one pass and no buffer on the CPU's Philox): no scatter,
        no host sync. Nothing to do when no step was taken since the last flush.
        """
        if self._flushed_at == self.step:
            return
        rows, dim = self.weight.shape
        per_row = _FLUSH_ROW_BYTES + (dim * self.weight.element_size() if self.streams.BUFFERS_NOISE else 0)
        block_rows = max(1, FLUSH_BLOCK_BYTES.get(self.weight.device.type, FLUSH_BLOCK_BYTES["cpu"]) // per_row)
        for start in range(0, rows, block_rows):
            block = self.last_step[start:start + block_rows]
            std = self._owed_var(block).sqrt_()
            self.streams.add_row_scaled_(self.weight[start:start + block.numel()], std)
            block.fill_(self.step)
        self._flushed_at = self.step

    @property
    def is_flushed(self) -> bool:
        return bool((self.last_step == self.step).all())

    def state_dict(self) -> dict[str, Any]:
        """Counters only after a flush: ``last_step`` reveals which rows were used."""
        if not self.is_flushed:
            raise RuntimeError("LazyNoiseTable: flush() before saving; the per-row table of last updates "
                               "reveals which rows were used and must not leave the process unflushed")
        return {"step": self.step, "cumvar_last": self._total,
                "generator": self.streams.state_dict()}

    def load_state_dict(self, state: dict[str, Any], source: NormalSource | None = None) -> None:
        """Counters, and the noise source: ``source`` (already at the saved state: tables that share
        one source must go on sharing it) or, if None, one made from the saved state."""
        self.step = int(state["step"])
        self.last_step.fill_(self.step)
        self._flushed_at = self.step
        self._cumvar = torch.zeros(max(64, 2 * (self.step + 1)), dtype=torch.float64, device=self.weight.device)
        self._total = float(state["cumvar_last"])
        self._cumvar[self.step] = self._total
        if source is None:
            source = source_from_state(state["generator"], str(self.weight.device))
        self.streams = source
