"""The model's plan for the book-keeping path: which modules own trainable parameters, how each one's
per-example gradients are formed (a closed form, or vmap(vjp) of that module alone), and whether the
path can run at all (:func:`ghost_supported`).

A plan is a pure function of the model's structure: :func:`plan_key` lists everything
:meth:`Plan.of` reads, and :func:`current_plan` makes a model's plan again only when its key
changes (a GPT-2-sized model's plan takes ≈ 1.3 ms to make on the CPU host, its key ≈ 0.12 ms).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Collection

from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks
from torch.nn.utils import parametrize

from .engine import module_list, trainable_parameters
from .ghost_attention import is_plain_attention

#: exact classes whose forward is known to use only their own parameters
_KNOWN = {nn.Linear: "linear", nn.Conv1d: "conv", nn.Conv2d: "conv", nn.Embedding: "embedding",
          nn.EmbeddingBag: "embedding_bag", nn.LayerNorm: "norm", nn.GroupNorm: "norm", nn.RMSNorm: "norm"}


def _kind(m: nn.Module, hooks_ok: bool = False) -> str:
    """How a module's per-example gradients are formed: a closed form, or 'generic' (vmap(vjp)).

    Closed forms need the stock forward acting on the module's own ``weight`` / ``bias``
    Parameters: a forward pre-hook (old-style weight_norm), a forward hook (it may change the output,
    e.g. ``out * 2``) or other own parameters mean generic (vmap(vjp) of the module, hooks included),
    unless ``hooks_ok`` (the caller knows its pre-hooks leave the call as it is).
    A stock nn.MultiheadAttention is 'attention' (:mod:`dptrain.ghost_attention`).
    """
    if is_plain_attention(m):
        return "attention"
    own = {k for k, p in m.named_parameters(recurse=False) if p.requires_grad}
    if (m._forward_pre_hooks and not hooks_ok) or m._forward_hooks or not own <= {"weight", "bias"}:
        return "generic"  # a forward hook may change the output: the closed forms assume the layer's own
    for cls, kind in _KNOWN.items():
        if isinstance(m, cls) and type(m).forward is cls.forward:
            if kind == "conv" and type(m)._conv_forward is not cls._conv_forward:
                return "generic"
            if kind == "embedding_bag" and m.mode == "max":
                return "generic"
            return kind
    return "generic"


def _owners(model: nn.Module) -> dict[str, nn.Module]:
    """Modules owning trainable parameters; a stock MultiheadAttention also owns its out_proj's."""
    absorbed = {f"{name}.out_proj".lstrip(".") for name, m in model.named_modules() if is_plain_attention(m)}
    return {name: m for name, m in model.named_modules() if name not in absorbed
            and any(p.requires_grad for p in m.parameters(recurse=is_plain_attention(m)))}


def _own(m: nn.Module) -> dict[str, nn.Parameter]:
    """A module's own trainable parameters by local name (out_proj's included for attention)."""
    return {k: p for k, p in m.named_parameters(recurse=is_plain_attention(m)) if p.requires_grad}


@dataclass
class Plan:
    """What one call needs to know about the model, computed once (reusable while the model is unchanged)."""

    owners: dict[str, nn.Module]
    kinds: dict[str, str]
    own: dict[str, dict[str, nn.Parameter]]  # module name → its own trainable parameters
    params: dict[str, nn.Parameter]  # trainable_parameters(model)
    supported: bool  # no owner known to defeat the path (see ghost_supported)
    exact: dict[str, bool] = field(default_factory=dict)  # owner → an exact torch layer (its forward is known)
    trainable: set[int] = field(default_factory=set)  # ids of the trainable parameters
    #: a DataParallel inside: its replicas copy each module's ``__dict__``, so a forward set on an instance for
    #: the record would run the original module on every replica's input — the recorder registers hooks instead
    replicated: bool = False

    @staticmethod
    def of(model: nn.Module, lookups: Collection[nn.Module] = ()) -> "Plan":
        """The plan of ``model``. ``lookups``: Embedding / EmbeddingBag modules whose forward pre-hooks
        only write to their own weight before the stock lookup runs (the lazy-noise catch-up): they
        keep their closed form, and their ``sparse`` flag is irrelevant (their gradient is never formed)."""
        owners = _owners(model)
        own = {name: _own(m) for name, m in owners.items()}
        looks = {id(m) for m in lookups}
        kinds = {name: _kind(m, id(m) in looks) for name, m in owners.items()}
        supported = _supported({k: m for k, m in owners.items() if id(m) not in looks})
        params = trainable_parameters(model)
        exact = {name: kinds[name] == "attention" or (kinds[name] != "generic" and type(m) in _KNOWN)
                 for name, m in owners.items()}
        replicated = any(isinstance(m, nn.DataParallel) for m in model.modules())
        return Plan(owners, kinds, own, params, supported, exact, {id(p) for p in params.values()}, replicated)


def plan_key(model: nn.Module, modules: list[nn.Module] | None = None) -> tuple:
    """What :meth:`Plan.of` reads from a model: while the key is unchanged, a plan of it stays valid.

    Global forward hooks; per module: identity, class, an instance-level ``forward``, training flag, forward
    pre-hooks and hooks, its own parameters (identity, requires_grad), and the settings that decide its path (an
    Embedding's / EmbeddingBag's max_norm, sparse, scale_grad_by_freq and mode; whether a BatchNorm
    tracks running statistics). ``modules``: :func:`~dptrain.engine.module_list` of ``model`` if the caller
    has just made it.
    """
    out: list = [tuple(_global_forward_hooks), tuple(_global_forward_pre_hooks)]
    for m in module_list(model) if modules is None else modules:
        out += (id(m), type(m), "forward" in m.__dict__, m.training, tuple(m._forward_pre_hooks),
                tuple(m._forward_hooks))
        for p in m._parameters.values():
            if p is not None:
                out += (id(p), p.requires_grad)
        if isinstance(m, _LOOKUPS):
            out += (m.max_norm, m.sparse, m.scale_grad_by_freq, getattr(m, "mode", None))
        elif isinstance(m, _BATCH_NORM):
            out.append(m.running_mean is None)
    return tuple(out)


_LOOKUPS, _BATCH_NORM = (nn.Embedding, nn.EmbeddingBag), nn.modules.batchnorm._BatchNorm


_PLANS: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, Plan]]" = weakref.WeakKeyDictionary()


def current_plan(model: nn.Module, modules: list[nn.Module] | None = None) -> Plan:
    """:meth:`Plan.of` ``model``, made again only when :func:`plan_key` changes (a GPT-2-sized model's
    plan takes ≈ 1.3 ms to make on the CPU host, its key ≈ 0.12 ms). ``modules`` as for :func:`plan_key`."""
    key = plan_key(model, modules)
    hit = _PLANS.get(model)
    if hit is None or hit[0] != key:
        hit = _PLANS[model] = (key, Plan.of(model))
    return hit[1]


def ghost_supported(model: nn.Module) -> bool:
    """Cheap structural check: no module that is known to defeat the ghost path.

    Refused: recurrent layers (flat weights, no vmap rule), a MultiheadAttention subclass with
    its own forward (its out_proj weight is used outside out_proj's forward), Embedding with max_norm / sparse /
    scale_grad_by_freq, parametrized modules, BatchNorm using batch statistics (mixes examples).
    True does not guarantee coverage: :func:`ghost_clip_and_sum` also checks the autograd
    graph at run time and may still return None.
    """
    return _supported(_owners(model))


def _supported(owners: dict[str, nn.Module]) -> bool:
    if _global_forward_hooks or _global_forward_pre_hooks:  # they act on every module, the recorder's view too
        return False
    for m in owners.values():
        if isinstance(m, nn.RNNBase) or parametrize.is_parametrized(m):
            return False
        if isinstance(m, nn.MultiheadAttention) and not is_plain_attention(m):
            return False
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and (m.max_norm is not None or m.sparse
                                                                or m.scale_grad_by_freq):
            return False
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None):
            return False  # batch statistics mix examples
    return True
