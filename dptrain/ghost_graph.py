"""Recording one forward for the book-keeping path, and proving that the record covers every parameter use.

:class:`Recorder` keeps, for every call of a parameter-owning module, its (detached) inputs and
its outputs as tensors in the autograd graph; an ``nn.MultiheadAttention`` is recorded through
:func:`dptrain.ghost_attention.recording_forward` (its projections exposed). :func:`covered`
walks the autograd graph of the summed loss: every path to a trainable parameter must enter a
recorded call (whose per-example gradients the ghost rules form), otherwise the model is
refused and clipping falls back to the vmap engine.
"""
from __future__ import annotations

import functools
import types
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.nn.modules.module import (_global_backward_hooks, _global_backward_pre_hooks, _global_forward_hooks,
                                      _global_forward_pre_hooks)
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .ghost_attention import AttentionRecord, recording_forward


@dataclass(frozen=True)
class Output:
    """A recorded module output without its storage: the autograd edge that produced it and its metadata.

    The gradient with respect to the edge is the gradient with respect to the output as the module
    returned it, even if a later in-place operation (``ReLU(inplace=True)``) rewrote the tensor; and
    an output that nothing downstream saves (a Linear or conv output followed by a ReLU) is freed
    after the forward, as in a non-private step, instead of living until the clipped sums are formed.
    """

    edge: GradientEdge
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device

    @property
    def grad_fn(self) -> Any:
        return self.edge.node

    def dim(self) -> int:
        return len(self.shape)


@dataclass
class Call:
    args: tuple
    kwargs: dict
    outputs: list[torch.Tensor | Output | None]  # output leaves that require grad (not detached), or their edges
    in_nodes: set  # autograd nodes of the tensor arguments
    versions: list[tuple[torch.Tensor, int]] = field(default_factory=list)
    attention: AttentionRecord | None = None  # set for a recorded nn.MultiheadAttention call


class Recorder:
    """Forward hooks that record every call of the parameter-owning modules.

    Modules of kind ``"attention"`` get their ``forward`` shadowed on the instance for the
    duration of the ``with`` block (deleted again on exit) by the recording re-expression. An exact
    torch layer (``exact[name]``) that torch would call without running any hook (none of its own, no
    global one, no ``forward`` of the instance's) gets the same hook called by a shadowing ``forward``
    instead of being registered: the same record, without torch's hook dispatch on every call.
    """

    def __init__(self, owners: dict[str, nn.Module], kinds: dict[str, str], copies: bool,
                 exact: dict[str, bool] | None = None) -> None:
        self.owners, self.kinds, self.copies = owners, kinds, copies
        self.exact = {} if exact is None else exact
        self.calls: dict[str, list[Call]] = {name: [] for name in owners}
        self.handles: list = []
        self.shadowed: list[nn.Module] = []
        self.active = False  # inside the ``with`` block: a shadowing forward records only then

    def __enter__(self) -> "Recorder":
        self.active = True
        plain = not (_global_forward_hooks or _global_forward_pre_hooks or _global_backward_hooks
                     or _global_backward_pre_hooks)
        for name, m in self.owners.items():
            if self.kinds[name] == "attention":
                m.forward = functools.partial(recording_forward, m, self._sink(name), self.copies)
                self.shadowed.append(m)
            elif plain and self.exact.get(name, False) and _hookless(m):
                m.__dict__["forward"] = _hooked_forward(m, self._hook(name), self)  # a plain attribute (as setattr makes it)
                self.shadowed.append(m)
            else:
                self.handles.append(m.register_forward_hook(self._hook(name), with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        self.active = False
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for m in self.shadowed:
            m.__dict__.pop("forward", None)
        self.shadowed.clear()

    def _sink(self, name: str):
        def sink(outputs: list[torch.Tensor], record: AttentionRecord, inputs: tuple) -> None:
            call = Call((), {}, list(outputs), {t.grad_fn for t in inputs if t.grad_fn is not None},
                        attention=record)
            kept = [record.query, record.key, record.value, record.heads_out]
            call.versions = [(t, t._version) for t in kept + list(outputs)]
            self.calls[name].append(call)
        return sink

    def _hook(self, name: str):
        calls = self.calls[name]

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if (not self.copies and not kwargs and len(args) == 1 and type(args[0]) is torch.Tensor
                    and type(output) is torch.Tensor and output.grad_fn is not None):  # one tensor in, one out
                a = args[0]
                kept = a.detach()
                out = Output(get_gradient_edge(output), output.shape, output.dtype, output.device)
                call = Call((kept,), {}, [out], set() if a.grad_fn is None else {a.grad_fn})
                call.versions = [(kept, kept._version)]
                calls.append(call)
                return None
            single = isinstance(output, torch.Tensor)
            leaves, spec = ([output], None) if single else tree_flatten(output)
            outs = [t if isinstance(t, torch.Tensor) and t.requires_grad else None for t in leaves]
            if all(t is None for t in outs):
                return None  # run without grad: contributes nothing
            flat = not kwargs and all(isinstance(a, torch.Tensor) for a in args)
            ins = list(args) if flat else [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            keep = (lambda t: t.detach().clone()) if self.copies else (lambda t: t.detach())
            if flat:
                args_d, kwargs_d = tuple(keep(a) for a in args), {}
            else:
                args_d, kwargs_d = tree_map(lambda t: keep(t) if isinstance(t, torch.Tensor) else t, (args, kwargs))
            call = Call(args_d, kwargs_d, outs, {t.grad_fn for t in ins if t.grad_fn is not None})
            kept = list(args_d) if flat else [t for t in tree_flatten((args_d, kwargs_d))[0]
                                              if isinstance(t, torch.Tensor)]
            call.versions = [(t, t._version) for t in kept + [t for t in outs if t is not None]]
            self.calls[name].append(call)
            if self.copies:  # downstream in-place ops then modify a copy, not the recorded output
                if single:
                    return output.clone()
                return tree_unflatten([t.clone() if isinstance(t, torch.Tensor) else t for t in leaves], spec)
            return None
        return hook

    def modified_in_place(self) -> bool:
        return any(t._version != v for calls in self.calls.values() for c in calls for t, v in c.versions)


def _hookless(m: nn.Module) -> bool:
    """torch calls ``m`` without running a hook, and ``m.forward`` is its class's (none set on the instance)."""
    return not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                or "forward" in m.__dict__)


def _hooked_forward(m: nn.Module, hook: Callable, recorder: "Recorder") -> Callable:
    """``m``'s forward followed by ``hook(m, args, kwargs, output)`` (whose non-None result replaces the
    output), as torch runs a forward hook registered with ``with_kwargs=True`` on a module with no other hook.

    A method bound to ``m``: a deep copy of ``m`` made while it is shadowed carries it bound to the copy, which
    then runs its own forward with its own weights and records nothing; so does any call after the record
    (a callable kept from inside the forward)."""
    def recorded(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        output = type(self).forward(self, *args, **kwargs)
        if self is not m or not recorder.active:
            return output
        replaced = hook(m, args, kwargs, output)
        return output if replaced is None else replaced
    return types.MethodType(recorded, m)


def _walk(starts, jumps: dict, stops: set) -> set[int]:
    """ids of the variables of AccumulateGrad nodes reachable from ``starts``.

    A recorded module call is skipped from its output node straight to its input nodes
    (``jumps``); the walk ends at ``stops``.
    """
    found: set[int] = set()
    seen: set = set()
    stack = list(starts)
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node in stops:
            continue
        if node in jumps:
            stack.extend(jumps[node])
            continue
        nxt = node.next_functions
        if nxt:
            stack.extend([n for n, _ in nxt])
        else:  # a leaf: an AccumulateGrad node (the only kind with a variable) or a node with no inputs to reach
            var = getattr(node, "variable", None)
            if var is not None:
                found.add(id(var))
    return found


def covered(loss: torch.Tensor, rec: Recorder, exact: dict[str, bool], trainable: set[int]) -> bool:
    """Every use of a trainable parameter lies inside its own module's recorded forward.

    The graph outside the recorded calls must reach no trainable parameter, and the inside of
    a call of a module other than an exact torch layer (``exact[name]``: its forward is known)
    only its own.
    """
    jumps: dict = {}
    for calls in rec.calls.values():
        for c in calls:
            for t in c.outputs:
                if t is not None and t.grad_fn is not None:
                    jumps.setdefault(t.grad_fn, set()).update(c.in_nodes)
    if _walk([loss.grad_fn], jumps, set()) & trainable:
        return False
    for name, calls in rec.calls.items():
        if exact[name]:
            continue  # exact torch class: its forward only touches its own parameters
        own = {id(p) for p in rec.owners[name].parameters(recurse=False)}
        for c in calls:
            starts = {t.grad_fn for t in c.outputs if t is not None}
            inner = {k: v for k, v in jumps.items() if k not in starts}
            if (_walk(starts, inner, c.in_nodes) & trainable) - own:
                return False
    return True
