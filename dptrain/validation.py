"""Reject modules that break per-example independence, and fix them.

DP-SGD's guarantee assumes example i's gradient depends only on example i. BatchNorm
in training mode normalises with statistics of the whole batch (and keeps running
statistics of it), so one example changes every other example's gradient — the clip
no longer bounds its influence. GroupNorm / LayerNorm normalise within an example.
"""
from __future__ import annotations

import copy

import torch
from opacus.validators import batch_norm as _opacus_batch_norm
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from .errors import UnsupportedModuleError

_BATCH_NORMS = (nn.modules.batchnorm._BatchNorm,)
#: lookups whose max_norm writes to their weight in forward
_LOOKUPS = (nn.Embedding, nn.EmbeddingBag)


def _problem(module: nn.Module) -> str | None:
    if isinstance(module, _BATCH_NORMS):
        return (f"{type(module).__name__} mixes examples through batch statistics; "
                "use GroupNorm: dptrain.fix(model) replaces it")
    if isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.track_running_stats:
        return (f"{type(module).__name__}(track_running_stats=True) accumulates statistics across examples; "
                "set track_running_stats=False, or dptrain.fix(model) does it")
    if isinstance(module, _LOOKUPS) and module.max_norm is not None:
        return (f"{type(module).__name__}(max_norm={module.max_norm}) renormalises the rows a batch looks up, in "
                "place, during forward (frozen or not): the released weight would show which rows the private "
                "examples used, without noise. Set max_norm=None; renormalise the table once before training "
                "(with torch.no_grad(): w.copy_(torch.renorm(w, 2, 0, max_norm))) or bound the rows outside the "
                "model")
    return None


def _stateless_batch_norm(module: nn.Module) -> bool:
    """A BatchNorm without running statistics: it mixes the examples of one forward, and keeps nothing."""
    return isinstance(module, _BATCH_NORMS) and getattr(module, "running_mean", None) is None


def find_problems(model: nn.Module, mixing_allowed: bool = False) -> list[tuple[str, str]]:
    """``(qualified module name, explanation)`` for every module incompatible with DP-SGD. ``mixing_allowed``:
    the privacy unit is a whole forward's batch (client-level DP), so a BatchNorm without running statistics,
    which only mixes the examples of that batch, is not a problem."""
    out = []
    for name, module in model.named_modules():
        msg = None if mixing_allowed and _stateless_batch_norm(module) else _problem(module)
        if msg is not None:
            out.append((name or "<model>", msg))
    return out


def validate(model: nn.Module, mixing_allowed: bool = False) -> None:
    """Raise :class:`UnsupportedModuleError` naming each module that breaks per-example independence (with
    ``mixing_allowed``, for a unit that is a whole batch: each module that keeps statistics of the data or
    writes to its weights)."""
    problems = find_problems(model, mixing_allowed)
    if problems:
        lines = "\n".join(f"  - {name}: {msg}" for name, msg in problems)
        named = {name for name, _ in problems}
        fixable = sum(not isinstance(m, _LOOKUPS) for name, m in model.named_modules() if (name or "<model>") in named)
        fix_line = "" if not fixable else "\nFix: model = dptrain.fix(model)" + (
            "; the lookups as said above" if fixable < len(problems) else "")
        raise UnsupportedModuleError(
            f"model has {len(problems)} module(s) incompatible with differentially private training:\n{lines}"
            + fix_line)


def _placed_like(new: nn.Module, old: nn.Module) -> nn.Module:
    """``new`` on the device and in the dtype of ``old``'s affine weight or running mean (if it has either)."""
    like = old.weight if old.affine else old.running_mean
    return new if like is None else new.to(device=like.device, dtype=like.dtype)


def _with_affine(new: nn.Module, old: nn.Module) -> nn.Module:
    """``new`` (a GroupNorm over the same C channels) with ``old``'s learned per-channel weight and bias, frozen
    where they were frozen."""
    if old.affine:
        with torch.no_grad():
            new.weight.copy_(old.weight)
            new.bias.copy_(old.bias)
        new.weight.requires_grad_(old.weight.requires_grad)
        new.bias.requires_grad_(old.bias.requires_grad)
    return new


def _fixed(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.BatchNorm1d):
        # its input may be [B, C] (after a Linear): opacus' GroupNorm(min(32, C), C) would normalise groups of
        # one or two values there (all zeros for C ≤ 32); one group normalises over all features of an example
        return _with_affine(_placed_like(nn.GroupNorm(1, module.num_features, eps=module.eps,
                                                      affine=module.affine), module), module)
    if isinstance(module, _BATCH_NORMS):
        return _with_affine(_placed_like(_opacus_batch_norm.fix(module), module), module)
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        # opacus' fixer clears track_running_stats but keeps the running buffers, which the functional form
        # then still updates in place (the vmap engine refuses that): a fresh layer without them
        fresh = _placed_like(type(module)(module.num_features, eps=module.eps, momentum=module.momentum,
                                          affine=module.affine, track_running_stats=False), module)
        if module.affine:
            fresh.load_state_dict({"weight": module.weight.detach(), "bias": module.bias.detach()})
        return fresh
    return module


def fix(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with BatchNorm → GroupNorm and InstanceNorm without running stats.

    BatchNorm2d/3d → GroupNorm with min(32, C) groups (opacus' fixer); BatchNorm1d → GroupNorm(1, C),
    which is valid on [B, C] inputs too; a BatchNorm's learned weight and bias (per channel) are kept, its
    running statistics are not (GroupNorm normalises each example by its own statistics). InstanceNorm → the
    same layer with track_running_stats=False and no running buffers. The original model is not modified.
    Lazy modules must have run one forward first (their parameters do not exist before it).
    """
    lazy = [name or "<model>" for name, m in model.named_modules()
            if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params()]
    if lazy:
        raise UnsupportedModuleError(
            f"fix: the model has lazy modules whose parameters are not created yet ({', '.join(lazy)}); they "
            "cannot be copied. Run one forward on an example batch first (model(x)), which materialises them, "
            "then call dptrain.fix(model).")
    model = copy.deepcopy(model)
    if _problem(model) is not None:
        return _fixed(model)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if _problem(child) is not None:
                setattr(module, child_name, _fixed(child))
    validate(model)
    return model
