"""DP-SGD with lazy noise for embedding tables (LazyDP: Lim et al., ASPLOS 2024).

``make_private(model, mechanism="lazy")`` — or ``mechanism="dpsgd"`` when a table has at least
:data:`AUTO_MIN_ROWS` rows — trains exactly the DP-SGD model: one Poisson-sampled Gaussian step
per batch with noise N(0, σ²C²) on every coordinate, dense and table alike, and the same event
recorded in the ledger. What changes is when the table noise is written:

* per-example gradients are clipped under one flat norm over dense layers and tables, the
  table part computed from the rows each example read (:mod:`dptrain.lazy_clip`);
* dense parameters get their noise through :class:`dptrain.DPOptimizer` with any torch optimizer;
* each table is updated by plain SGD, row v at step t by −lr_t/B · (clipped sum_v + N(0, σ²C² I)):
  the clipped sums are added at the step, and every row's noise is deferred until the row is next
  read or flushed and then drawn at once with the summed variance (:mod:`mechanisms.lazy`).

Conditions of equivalence, enforced here: the table is in a ``torch.optim.SGD`` param group with
momentum = 0, weight_decay = 0 and maximize = False (momentum, weight decay and adaptive
optimizers update an untouched row by an amount that depends on its history, so skipped noise
cannot be summed into one draw); the table is read only by its own lookups (``max_norm`` —
a data-dependent write on read — and ``scale_grad_by_freq`` — a batch-dependent gradient — are
refused); the learning rate of each step is read from the param group as the step runs, so any
schedule (``torch.optim.lr_scheduler``) is exact, and the group is checked to be plain SGD at every
step (a scheduler that cycles momentum, or a setting edited after attach, is refused).
``EmbeddingBag(mode="max")`` is refused.

Limitation, not detected: a forward that reads a table's weight other than through the table's own
lookup *without* gradient (``self.emb.weight.detach()``, a ``torch.no_grad()`` nearest-neighbour
search over the rows) sees rows that still lack their deferred noise, so its output — and the dense
gradients computed from it — differ from eager DP-SGD's. (Such a read *with* gradient is refused.)
Train such a model eagerly — ``make_private(..., mechanism="dpsgd", engine="vmap")``, which never
switches to lazy noise — or read the rows through the lookup.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from .errors import PrivacyConfigError, PrivacyError
from .lazy_clip import TABLE_TYPES, LazyPlans, SparseClippedBatch, sparse_clip_and_sum, table_parameters
from .lazy_tables import LazyTables
from .optimizer import DPOptimizer
from .private import PrivateTraining, _unpack
from .run_probe import TRAIN_MODE_MIXING, mixes_in_training_mode, modes_restored, probe_tolerance

#: under mechanism="dpsgd", a table with at least this many rows switches training to lazy noise
AUTO_MIN_ROWS = 100_000


def wants_lazy(model: nn.Module) -> bool:
    """True if ``model`` has a trainable Embedding / EmbeddingBag with ≥ :data:`AUTO_MIN_ROWS` rows."""
    return any(m.num_embeddings >= AUTO_MIN_ROWS for m in table_parameters(model).values())


def table_problems(tables: dict[str, nn.Module]) -> list[str]:
    """Why lazy noise would not be exact for these tables (empty if it is)."""
    out = []
    first: dict[int, str] = {}
    for name, m in tables.items():
        other = first.setdefault(id(m.weight), name)
        if other != name:
            out.append(f"{name}: shares its weight with {other}; lazy noise needs one lookup module per table "
                       "(call the same module twice instead of two modules with one weight)")
        if m.max_norm is not None:
            out.append(f"{name}: max_norm={m.max_norm} renormalises rows in place when they are read; "
                       "set max_norm=None")
        if m.scale_grad_by_freq:
            out.append(f"{name}: scale_grad_by_freq=True scales a row's gradient by its frequency in the whole "
                       "batch (examples then depend on each other); set it to False")
        if isinstance(m, nn.EmbeddingBag) and m.mode == "max":
            out.append(f"{name}: EmbeddingBag(mode='max') is not supported by the lazy path; use 'sum' or 'mean'")
    return out


def optimizer_problems(optimizer: torch.optim.Optimizer, tables: dict[str, nn.Parameter]) -> list[str]:
    """Why ``optimizer`` is not plain SGD on every table (empty if it is)."""
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    out = []
    for name, p in tables.items():
        g = groups.get(id(p))
        if g is None:
            out.append(f"{name} is not in the optimizer; add it (plain torch.optim.SGD) or pass table_optimizer=")
        elif type(optimizer) is not torch.optim.SGD:
            out.append(f"{name} is updated by {type(optimizer).__name__}, whose update of a row depends on that "
                       "row's history (moment estimates), so skipped noise cannot be caught up in one draw; "
                       "train the tables with torch.optim.SGD(momentum=0, weight_decay=0), e.g. "
                       "attach(..., optimizer=Adam(dense params), table_optimizer=SGD(table params, lr))")
        else:
            out += sgd_group_problems(name, g)
    return out


def sgd_group_problems(name: str, group: dict[str, Any]) -> list[str]:
    """Why the SGD param group holding table ``name`` is not plain SGD, θ ← θ − lr·g (empty if it is).

    Checked at attach and again before every step: a scheduler (``OneCycleLR``, ``CyclicLR``) or a
    user may change a group's settings at any time. ``nesterov`` and ``dampening`` only act through
    momentum, so with momentum = 0 they leave the update plain.
    """
    bad = {k: group.get(k) for k in ("momentum", "weight_decay") if group.get(k)}
    if group.get("maximize"):
        bad["maximize"] = True
    if not bad:
        return []
    hint = (" (a scheduler that cycles momentum sets it: pass cycle_momentum=False to OneCycleLR / CyclicLR)"
            if "momentum" in bad else "")
    return [f"{name} is in an SGD param group with {bad}: momentum and weight decay move rows the batch did not "
            "touch by history-dependent amounts (their skipped noise cannot be drawn at once), and the lazy step "
            "of a table is θ ← θ − lr·g; use momentum=0, weight_decay=0, maximize=False for the tables "
            f"(a separate param group or table_optimizer=){hint}"]


class LazyPrivateTraining(PrivateTraining):
    """:class:`PrivateTraining` whose embedding tables get lazy noise (same model distribution)."""

    def __init__(self, model: nn.Module, config: Any) -> None:
        super().__init__(model, config)
        self.table_modules = table_parameters(model)
        self.explicit = config.mechanism == "lazy"
        if self.explicit and not self.table_modules:
            raise PrivacyConfigError("make_private(mechanism='lazy'): the model has no trainable nn.Embedding or "
                                     "nn.EmbeddingBag; use mechanism='dpsgd'")
        self.lazy = False  # decided at attach, once the optimizer is known
        self.tables: LazyTables | None = None
        self.table_optimizer: torch.optim.Optimizer | None = None
        self._table_arg: torch.optim.Optimizer | None = None
        self._rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._has_dense = False
        self._table_hook: Any = None  # the table optimizer's refusal to step on its own
        self._plans = LazyPlans(model)

    def attach(self, dataset: Any, batch_size: int | None = 128, epochs: float | None = 10,
               optimizer: torch.optim.Optimizer | None = None, loss_fn: Any = None,
               sample_rate: float | None = None, steps: int | None = None, lr: float | None = None,
               table_optimizer: torch.optim.Optimizer | None = None) -> Any:
        """As :meth:`PrivateTraining.attach`; ``table_optimizer``: a plain SGD holding the tables
        (its learning rate, and any scheduler on it, sets the tables' steps) when ``optimizer`` is
        not plain SGD. With neither given, the tables get SGD(lr) and the rest SGD(lr, momentum=0.9).

        Attaching again decides lazy or eager afresh, so a run may switch between them: both record the
        same Poisson-sampled Gaussian step in the one ledger, and the switch happens with every row
        flushed, i.e. holding all its noise as under eager DP-SGD. All or nothing: the earlier attachment's
        table hooks stay (no-ops, nothing pending) until the new attach has succeeded, and come back whole
        if it fails.
        """
        old_tables, old_hook = self.tables, self._table_hook
        if old_tables is not None:
            old_tables.flush()

        def attach() -> Any:
            self._table_arg, self.tables, self.lazy, self._table_hook = table_optimizer, None, False, None
            self.table_optimizer, self._has_dense, self._rows = None, False, {}
            return PrivateTraining._attach(self, dataset, batch_size, epochs, optimizer, loss_fn, sample_rate,
                                           steps, lr)
        loader = self._all_or_nothing(attach)
        if old_tables is not None:
            old_tables.remove_hooks()
        if old_hook is not None:
            old_hook.remove()
        return loader

    def _undo_attach(self, snapshot: dict[str, Any]) -> None:
        if self.tables is not None and self.tables is not snapshot.get("tables"):
            self.tables.remove_hooks()
        if self._table_hook is not None and self._table_hook is not snapshot.get("_table_hook"):
            self._table_hook.remove()
        super()._undo_attach(snapshot)

    # ------------------------------------------------------------------ setup
    def _private_optimizer(self, optimizer: torch.optim.Optimizer | None, lr: float | None,
                           mechanism: Any, expected_batch: float) -> DPOptimizer:
        tables = {k: m.weight for k, m in self.table_modules.items()}
        dense = [p for k, p in self._trainable().items() if k not in tables]
        table_opt = self._table_arg
        if optimizer is None and table_opt is None and lr is not None:
            table_opt = torch.optim.SGD(list(tables.values()), lr=lr)
            optimizer = torch.optim.SGD(dense, lr=lr, momentum=0.9) if dense else table_opt
        holder = table_opt if table_opt is not None else optimizer
        problems = table_problems(self.table_modules)
        if mechanism is not self.mechanism:
            problems.append("data-parallel (torch.distributed) training: lazy noise runs in one process")
        if holder is None:
            problems.append("no optimizer and no lr: give lr= (tables then use plain SGD) or an SGD optimizer")
        else:
            problems += optimizer_problems(holder, tables)
        if problems:
            if self.explicit:
                raise PrivacyConfigError("mechanism='lazy' needs plain SGD on lookup-only tables:\n  - "
                                         + "\n  - ".join(problems) + "\n(or use mechanism='dpsgd')")
            warnings.warn("embedding tables are trained with dense noise on every row (slow for large tables), "
                          "because lazy noise would not be exact here:\n  - " + "\n  - ".join(problems),
                          stacklevel=6)
            if optimizer is None and table_opt is not None:
                raise PrivacyConfigError("table_optimizer= is for the lazy path; pass one optimizer for all "
                                         "parameters under mechanism='dpsgd'")
            return super()._private_optimizer(optimizer, lr, mechanism, expected_batch)
        assert holder is not None and self.mechanism is not None
        self.lazy, self.table_optimizer, self._has_dense = True, holder, bool(dense)
        if table_opt is not None and table_opt is not optimizer:
            self._table_hook = table_opt.register_step_pre_hook(self._refuse_table_step)
        dense_opt = optimizer if optimizer is not None else holder
        self.tables = LazyTables(self.model, self.table_modules, self.mechanism.noise_std, expected_batch,
                                 self._seed(7919))
        wrapped = DPOptimizer(dense_opt, dense if dense else list(tables.values()), self.mechanism, expected_batch)
        wrapped.on_public_step = (self._before_public_step, self._after_public_step)
        return wrapped

    def _before_public_step(self) -> None:
        if self.lazy:
            raise PrivacyError("with lazy tables, step with priv.step(x, y): the step needs more than the "
                               "optimizer (the tables)")
        super()._before_public_step()

    def _trainable(self) -> dict[str, nn.Parameter]:
        from .engine import trainable_parameters
        return trainable_parameters(self.model)

    @staticmethod
    def _refuse_table_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        raise PrivacyError("the table optimizer of a lazy private run cannot step on its own (that would apply a "
                           "non-private update); use priv.step(x, y)")

    def _probe(self, dataset: Any) -> None:
        """Lazy path: the batched book-keeping pass must give each example the gradient it gets alone (in eval
        mode), and its values in training mode must not mix examples (:func:`mixes_in_training_mode`)."""
        if not self.lazy:
            return super()._probe(dataset)
        assert self.loader is not None and self.clipping is not None
        x, y = _unpack(self.loader.batch(torch.arange(min(4, len(dataset)))))
        x, y = self._to_device(x, y)
        with modes_restored(self.model):
            self.model.eval()
            together = sparse_clip_and_sum(self.model, self.loss_fn, x, y, self.clipping)
            alone = [sparse_clip_and_sum(self.model, self.loss_fn, _index(x, i), y[i:i + 1], self.clipping)
                     for i in range(int(y.shape[0]))]
        rtol = probe_tolerance(self.model, 1e-3)
        for name, value in together.dense.items():
            if not torch.allclose(sum(a.dense[name] for a in alone), value, atol=0.1 * rtol, rtol=rtol):
                raise _mixing_error(name)
        for name, (rows, vals) in together.rows.items():
            ref = torch.zeros_like(vals)
            for a in alone:
                r, v = a.rows[name]
                ref.index_add_(0, torch.searchsorted(rows, r), v)
            if not torch.allclose(ref, vals, atol=0.1 * rtol, rtol=rtol):
                raise _mixing_error(name)
        if mixes_in_training_mode(self.model, self.loss_fn, x, y, probe_tolerance(self.model, 1e-4)):
            from .errors import UnsupportedModuleError
            raise UnsupportedModuleError(TRAIN_MODE_MIXING)  # the batched book-keeping forward would mix them

    # ------------------------------------------------------------------ training
    def backward(self, inputs: Any, targets: torch.Tensor) -> float:
        if not self.lazy:
            return super().backward(inputs, targets)
        self._require_attached()
        assert self.clipping is not None
        plan = self._plans.get()
        params = plan[0].params
        self._check_trainable(plan[0].trainable, params)
        with self._drawn_batch(inputs, targets):
            inputs, targets = self._to_device(inputs, targets, params=params)
            batch: SparseClippedBatch = sparse_clip_and_sum(self.model, self.loss_fn, inputs, targets, self.clipping,
                                                            chunk_size=self.config.chunk_size, plan=plan,
                                                            coalesce=False)
        for name, g in batch.dense.items():
            params[name].grad = g
        self._rows = batch.rows
        return batch.mean_loss

    def table_lrs(self) -> dict[str, float]:
        """The learning rate each table gets at this step, read from its SGD param group — which must
        still be plain SGD (:func:`sgd_group_problems`): lazy noise sums skipped steps of θ ← θ − lr·g."""
        assert self.table_optimizer is not None
        groups = {id(p): g for g in self.table_optimizer.param_groups for p in g["params"]}
        problems, lrs = [], {}
        for k, m in self.table_modules.items():
            g = groups.get(id(m.weight))
            if g is None:
                problems.append(f"{k} is no longer in the table optimizer (its Parameter was replaced after "
                                "attach); call priv.attach(...) again with an optimizer that holds it")
            else:
                problems += sgd_group_problems(k, g)
                lrs[k] = float(g["lr"])
        if problems:
            raise PrivacyConfigError("lazy tables need plain SGD at every step; since attach:\n  - "
                                     + "\n  - ".join(problems) + "\n(no step was taken)")
        return lrs

    def step(self, inputs: Any, targets: torch.Tensor | None = None) -> float:
        if not self.lazy:
            return super().step(inputs, targets)
        self._require_attached()
        if targets is None:
            inputs, targets = _unpack(inputs)
        lrs = self.table_lrs()  # before anything changes: the groups may have left plain SGD since attach
        self.check_budget()
        assert self.optimizer is not None and self.tables is not None
        self.optimizer.zero_grad()
        loss = self.backward(inputs, targets)
        if self._has_dense:
            self.optimizer._apply_step()
        else:
            self.optimizer.count_step()
        self.tables.sgd_step(self._rows, lrs)
        if self.table_optimizer is not None:  # its step was taken here: for a scheduler built on it
            self.table_optimizer._opt_called = True  # type: ignore[attr-defined]
        self._rows = {}
        self.ledger.record(self._step_event(self.steps))
        return loss

    # ------------------------------------------------------------------ flush & state
    def flush(self) -> None:
        """Give every table row its pending noise (done by itself before eval forwards and state_dict)."""
        if self.tables is not None:
            self.tables.flush()

    def state_dict(self) -> dict[str, Any]:
        """As :meth:`PrivateTraining.state_dict`, flushed, with the lazy counters (and table optimizer)."""
        self.flush()
        state = super().state_dict()
        if self.lazy:
            assert self.tables is not None and self.table_optimizer is not None
            state["lazy_tables"] = self.tables.state_dict()
            state["table_optimizer"] = self.table_optimizer.state_dict()
        return state

    def _use_sigma(self, sigma: float) -> None:
        super()._use_sigma(sigma)
        if self.tables is not None:  # the tables' deferred noise is drawn at the same σ·C
            for table in self.tables.noise.values():
                table.noise_std = self.mechanism.noise_std

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.lazy:
            assert self.tables is not None and self.table_optimizer is not None
            if "lazy_tables" not in state:
                raise PrivacyConfigError("load_state_dict: the checkpoint has no lazy-noise counters (it was saved "
                                         "by an eager run); resume it with mechanism='dpsgd'")
            self.tables.load_state_dict(state["lazy_tables"])
            self.table_optimizer.load_state_dict(state["table_optimizer"])


def _index(x: Any, i: int) -> Any:
    if isinstance(x, torch.Tensor):
        return x[i:i + 1]
    return type(x)(_index(v, i) for v in x)


def _mixing_error(name: str) -> PrivacyError:
    from .errors import UnsupportedModuleError
    return UnsupportedModuleError(
        f"the model's forward mixes examples within a batch (parameter {name!r} gets a different clipped "
        "gradient when examples are processed together than one by one), so per-example clipping would not "
        "bound each example's influence. Remove batch-level operations from forward().")


__all__ = ["LazyPrivateTraining", "AUTO_MIN_ROWS", "wants_lazy", "table_problems", "optimizer_problems",
           "sgd_group_problems", "TABLE_TYPES"]
