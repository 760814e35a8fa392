"""Per-example gradients with torch.func.

For a model f_θ and per-example loss ℓ, returns g_i = ∇_θ ℓ(f_θ(x_i), y_i) for every
example i of the batch, computed as ``vmap(grad(ℓ ∘ functional_call))`` over the batch
dimension (Horace He & Richard Zou, functorch). Chunking bounds memory at
``chunk_size × n_params`` floats. Models that torch.func cannot batch (GRU / RNN
kernels) use an exact per-example ``autograd.grad`` loop instead; both return the same
numbers.

Privacy assumption: example i's gradient depends on (x_i, y_i) and the parameters only.
Modules that mix examples (BatchNorm in training mode) break this and are rejected
by :func:`dptrain.validate`.
"""
from __future__ import annotations

import copy
from typing import Callable, Iterator, Sequence, Union

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

Inputs = Union[torch.Tensor, Sequence[torch.Tensor]]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: modules whose kernels have no vmap batching rule; they go through the loop path
_LOOP_MODULES: tuple[type[nn.Module], ...] = (nn.RNNBase, nn.RNNCellBase)


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters that receive gradients, keyed by ``named_parameters()`` name.

    Tied weights appear once (under their first name), as in ``named_parameters()``.
    """
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def module_list(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` (each once, ``model`` first), as ``list(model.modules())`` has them but in
    breadth-first order and in a fraction of its time (no names are formed): the per-step checks walk it."""
    out, seen = [model], {id(model)}
    for m in out:  # grows while it is walked
        children = m._modules
        if children:
            for child in children.values():
                if child is not None and id(child) not in seen:
                    seen.add(id(child))
                    out.append(child)
    return out


def choose_method(model: nn.Module) -> str:
    """``"vmap"`` unless the model holds a module without vmap support (then ``"loop"``)."""
    return "loop" if any(isinstance(m, _LOOP_MODULES) for m in model.modules()) else "vmap"


def _as_tuple(inputs: Inputs) -> tuple[torch.Tensor, ...]:
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, dict) or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TypeError(f"inputs must be a tensor or a tuple / list of tensors (the model is called as "
                        f"model(*inputs)), got a {type(inputs).__name__}; wrap the model so that its forward "
                        "takes tensors")
    return tuple(inputs)


def batch_size_of(inputs: Inputs) -> int:
    """Number of examples (size of dim 0) in ``inputs``."""
    return int(_as_tuple(inputs)[0].shape[0])


def iter_chunks(inputs: Inputs, targets: torch.Tensor, chunk_size: int | None
                ) -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
    """Split a batch into consecutive chunks of at most ``chunk_size`` examples."""
    xs = _as_tuple(inputs)
    n = int(targets.shape[0])
    if chunk_size is not None and (int(chunk_size) != chunk_size or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer (examples per chunk) or None, got {chunk_size}")
    bad = [tuple(x.shape) for x in xs if x.dim() == 0 or x.shape[0] != n]
    if bad:
        raise ValueError(f"every input must have one row per target ({n} targets), got inputs of shapes {bad}")
    step = n if not chunk_size or chunk_size >= n else chunk_size
    if step == n:  # one chunk: the batch as it is (no slicing)
        if n:
            yield xs, targets
        return
    for start in range(0, n, max(step, 1)):
        yield tuple(x[start:start + step] for x in xs), targets[start:start + step]


PerExample = tuple[dict[str, torch.Tensor], torch.Tensor]


class WeightedPositionMean:
    """ℓ = Σ_t w_{y_t} ℓ_t / #{t : y_t not ignored} over one example's positions t (class-index targets);
    class-probability targets as ``loss_fn`` gives them (their 'mean' divides by the positions already)."""

    def __init__(self, loss_fn: nn.Module) -> None:
        self.loss_fn = loss_fn
        self.summed = copy.copy(loss_fn)  # shares the weight tensor
        self.summed.reduction = "sum"

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.is_floating_point():
            return self.loss_fn(output, target)
        counted = (target != self.loss_fn.ignore_index).sum().clamp_min(1)
        return self.summed(output, target) / counted


def example_loss_fn(loss_fn: LossFn) -> LossFn:
    """The loss of a batch of one as the per-example loss ℓ_i, with class weights kept.

    A weighted ``nn.CrossEntropyLoss`` / ``nn.NLLLoss`` with reduction='mean' divides by Σ w_{y} over the
    batch (and positions); over a batch of one with one position that cancels the example's own weight
    (ℓ_i = w_y·ℓ / w_y), so the weights would silently do nothing. Such a loss is evaluated as
    ℓ_i = Σ_t w_{y_it}·ℓ_it / (its positions not ignored): w_{y_i}·ℓ_i for [B, C] logits, the unweighted
    mean over positions when every weight is 1 (outputs [B, C, T, …]). The batch normaliser depends on
    the other examples and is not used. Every other loss is returned as it is.
    """
    if (type(loss_fn) in (nn.CrossEntropyLoss, nn.NLLLoss) and getattr(loss_fn, "weight", None) is not None
            and loss_fn.reduction == "mean"):
        return WeightedPositionMean(loss_fn)
    return loss_fn


def _vmap_grads(model: nn.Module, loss_fn: LossFn, xs: tuple[torch.Tensor, ...],
                targets: torch.Tensor) -> PerExample:
    loss_fn = example_loss_fn(loss_fn)
    params = {k: p.detach() for k, p in trainable_parameters(model).items()}
    frozen = {k: p.detach() for k, p in model.named_parameters() if not p.requires_grad}
    constants = {**frozen, **dict(model.named_buffers())}

    def example_loss(p: dict[str, torch.Tensor], target: torch.Tensor,
                     *x: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (p, constants), tuple(xi.unsqueeze(0) for xi in x))
        return loss_fn(out, target.unsqueeze(0))

    in_dims = (None, 0) + (0,) * len(xs)
    return vmap(grad_and_value(example_loss), in_dims=in_dims, randomness="different")(
        params, targets, *xs)


def _loop_grads(model: nn.Module, loss_fn: LossFn, xs: tuple[torch.Tensor, ...],
                targets: torch.Tensor) -> PerExample:
    loss_fn = example_loss_fn(loss_fn)
    params = trainable_parameters(model)
    names, tensors = list(params), list(params.values())
    rows: list[tuple[torch.Tensor, ...]] = []
    losses = []
    for i in range(int(targets.shape[0])):
        with torch.enable_grad():  # as the vmap engine, also under torch.no_grad()
            loss = loss_fn(model(*(x[i:i + 1] for x in xs)), targets[i:i + 1])
            rows.append(torch.autograd.grad(loss, tensors, allow_unused=True))
        losses.append(loss.detach())
    out = {}
    for j, (name, p) in enumerate(zip(names, tensors)):
        out[name] = torch.stack([r[j] if r[j] is not None else torch.zeros_like(p) for r in rows])
    return out, torch.stack(losses)


def _empty_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.new_zeros((0, *p.shape)) for k, p in trainable_parameters(model).items()}


def per_sample_grads(model: nn.Module, loss_fn: LossFn, inputs: Inputs, targets: torch.Tensor,
                     chunk_size: int | None = None, method: str = "auto") -> dict[str, torch.Tensor]:
    """Per-example gradients, ``{name: Tensor[batch, *param.shape]}`` for trainable parameters.

    ``out[name][i]`` equals ``∇_name loss_fn(model(x_i[None]), y_i[None])``. ``loss_fn``
    follows torch's ``(output, target) -> scalar`` convention (mean over a batch of one; a class-weighted
    cross-entropy keeps its weight, :func:`example_loss_fn`).
    ``inputs`` is a tensor or a tuple of tensors batched on dim 0. ``chunk_size`` caps how
    many examples are processed at once (memory ∝ chunk_size × parameters).
    ``method``: ``"auto"`` (vmap unless the model holds an RNN), ``"vmap"`` or ``"loop"``.
    """
    if int(targets.shape[0]) == 0:
        return _empty_grads(model)
    parts = [grads for grads, _ in iter_per_sample_grads(model, loss_fn, inputs, targets,
                                                         chunk_size, method)]
    if len(parts) == 1:
        return parts[0]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def iter_per_sample_grads(model: nn.Module, loss_fn: LossFn, inputs: Inputs, targets: torch.Tensor,
                          chunk_size: int | None = None, method: str = "auto"
                          ) -> Iterator[PerExample]:
    """Yield ``(per-example grads, per-example losses)`` chunk by chunk (bounded memory)."""
    if method == "auto":
        method = choose_method(model)
    if method not in ("vmap", "loop"):
        raise ValueError(f"per_sample_grads: method must be 'auto', 'vmap' or 'loop', got {method!r}")
    compute = _vmap_grads if method == "vmap" else _loop_grads
    for xs, ys in iter_chunks(inputs, targets, chunk_size):
        if int(ys.shape[0]) > 0:
            yield compute(model, loss_fn, xs, ys)
