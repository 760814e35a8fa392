"""Lazy noise wired into a model: catch-up before every read, flush before anything leaves.

One :class:`mechanisms.lazy.LazyNoiseTable` per trainable ``nn.Embedding`` / ``nn.EmbeddingBag``.
Hooks keep DESIGN.md invariants 3 and 7:

* a forward pre-hook on each table catches up the rows its indices read, so a lookup never
  returns a row that lacks the noise of a step already taken;
* a forward pre-hook on the model flushes every table before a forward in eval mode
  (evaluation, tracing / export), and a state-dict pre-hook on each table flushes it before
  ``model.state_dict()`` (checkpoints, export of the weights).

Every use (catch-up, step, flush) writes into the tensor the table's Parameter holds at that
moment, in its dtype and on its device: ``model.half()``, ``.double()``, ``.to(device)`` and
``.cpu()`` give a Parameter new memory, and the pending noise follows it there.

Reading ``table.weight`` directly (not through a forward or ``state_dict``) bypasses the hooks:
call :meth:`LazyTables.flush` (or ``priv.flush()``) first.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mechanisms.lazy import LazyNoiseTable
from mechanisms.rng import DeviceGenerators


def _no_hook(*args: Any, **kwargs: Any) -> None:
    """What a lazy hook becomes in a copy or a pickle of the model (whose tables were flushed)."""
    return None


class _Hook:
    """A hook of :class:`LazyTables`. Copying or pickling the model flushes the tables first.

    ``copy.deepcopy(model)`` and ``torch.save(model)`` copy the hooks after the model's own attributes
    and before its submodules, so a model whose tables are submodules is copied flushed; a table module
    copied on its own has its weight copied before its hooks, and the hook then writes the flushed rows
    into that copy. The copy carries no lazy state (its hooks do nothing).
    """

    def __init__(self, tables: "LazyTables", fn: Any) -> None:
        self.tables, self.fn = tables, fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo: dict) -> Any:
        self.tables.flush()
        # Copying a table module itself copies its weight before its hooks: give that copy the flushed rows.
        for m in self.tables.modules.values():
            done = memo.get(id(m.weight))
            if done is not None:
                with torch.no_grad():
                    done.copy_(m.weight)
        return _no_hook

    def __reduce__(self) -> Any:
        self.tables.flush()
        return (_return_no_hook, ())


def _return_no_hook() -> Any:
    return _no_hook


class LazyTables:
    """The lazy-noise state of every table of one model, and the hooks that use it."""

    def __init__(self, model: nn.Module, tables: dict[str, nn.Module], noise_std: float,
                 expected_batch_size: float, seed: int | None) -> None:
        self.model, self.modules = model, dict(tables)
        self._rng = DeviceGenerators(seed)
        self.noise = {k: LazyNoiseTable(m.weight.data, noise_std, expected_batch_size, self._rng.streams(m.weight.device))
                      for k, m in self.modules.items()}
        self._dirty = False  # some row may lack noise of a past step
        #: catch-up without a host sync (sorted entries) — None: on a GPU; the CPU default saves draws
        self.sync_free: bool | None = None
        self._handles = [model.register_forward_pre_hook(_Hook(self, self._before_model_forward))]
        for k, m in self.modules.items():
            self._handles.append(m.register_forward_pre_hook(_Hook(self, self._catch_up_hook(k)), with_kwargs=True))
            self._handles.append(m.register_state_dict_pre_hook(_Hook(self, self._flush_hook(k))))

    @property
    def step(self) -> int:
        return next(iter(self.noise.values())).step if self.noise else 0

    def table(self, name: str) -> LazyNoiseTable:
        """``name``'s noise table, writing into the tensor its module's Parameter holds now (a dtype or
        device conversion of the model replaces that tensor; see :meth:`LazyNoiseTable.rebind`)."""
        table, weight = self.noise[name], self.modules[name].weight
        held = table.weight
        if (weight.data_ptr() != held.data_ptr() or weight.dtype != held.dtype or weight.device != held.device
                or weight.shape != held.shape):
            table.rebind(weight.data, self._rng.streams(weight.device))
        return table

    def _catch_up_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            idx = args[0] if args else kwargs.get("input")
            if isinstance(idx, torch.Tensor) and self._dirty:
                if self.sync_free if self.sync_free is not None else idx.is_cuda:
                    self.table(name).catch_up(idx.long(), repeated=True)  # sorted entries, one draw each
                else:  # torch.unique: one draw per row read, but a host sync on a GPU
                    self.table(name).catch_up(torch.unique(idx).long())
        return hook

    def _flush_hook(self, name: str):
        def hook(module: nn.Module, prefix: str, keep_vars: bool) -> None:
            if self._dirty:
                self.table(name).flush()
        return hook

    def _before_model_forward(self, module: nn.Module, args: tuple) -> None:
        if not module.training:
            self.flush()

    def sgd_step(self, rows: dict[str, tuple[torch.Tensor, torch.Tensor]], lrs: dict[str, float]) -> None:
        """One plain-SGD step of every table: the clipped sums now, every row's noise at its next read."""
        for k in self.noise:
            idx, values = rows[k]
            self.table(k).sgd_step(idx, values, lrs[k])
        self._dirty = True

    def flush(self) -> None:
        """Give every row all its pending noise: the tables then equal eager DP-SGD's."""
        if self._dirty:
            for k in self.noise:
                self.table(k).flush()
            self._dirty = False

    @property
    def is_flushed(self) -> bool:
        return all(t.is_flushed for t in self.noise.values())

    def remove_hooks(self) -> None:
        self.flush()
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def state_dict(self) -> dict[str, Any]:
        """Per-table counters after a flush (the per-row table of last updates never leaves unflushed)."""
        self.flush()
        return {k: t.state_dict() for k, t in self.noise.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self.noise) - set(state)
        if missing:
            raise ValueError(f"LazyTables.load_state_dict: checkpoint has no lazy-noise state for tables "
                             f"{sorted(missing)}; it was saved from a different model")
        # the tables of one device share one noise source: resume it once, from the first one's state
        tables = {k: self.table(k) for k in self.noise}
        first = {}
        for k, t in tables.items():
            first.setdefault(str(t.weight.device), state[k]["generator"])
        self._rng.load_state_dict(self._rng.seed, first)
        for k, t in tables.items():
            t.load_state_dict(state[k], source=self._rng.streams(t.weight.device))
        self._dirty = False
