"""Per-layer rules of the ghost / book-keeping path: per-example gradients in factored form.

A parameter's per-example gradient is kept as a list of *terms*, never as a [B, *shape] tensor
unless that is the cheap choice:

* :class:`Outer` — Σ_t L_it R_itᵀ per group (Linear: L = output grads, R = inputs; a Conv with
  few output positions: the same over unfolded patches, one block per group). Norm² by the Gram trick
  Σ_{t,s}(L_it·L_is)(R_it·R_is) (cost T²(o+i)) or by forming L_iᵀR_i (cost T·o·i), whichever is
  cheaper (Li et al. 2022 'ghost clipping'; Bu et al. 2023 'book-keeping', mixed choice);
  ‖a_i‖²‖b_i‖² when T = 1 (Goodfellow 2015).
* :class:`Conv` — a Conv with many output positions: its per-example weight gradients are
  small, formed by one convolution backward with the batch folded into the groups
  (Rochette et al. 2019); the clipped sum is a conv weight-gradient of f-scaled output grads.
* :class:`~dptrain.ghost_rows.Rows` — Σ_t e_{idx_it} R_itᵀ, the sparse rows of an Embedding
  gradient (its algebra in :mod:`dptrain.ghost_rows`).
* :class:`Dense` — explicit per-example gradients (biases, LayerNorm/GroupNorm/RMSNorm affine
  parameters, the vmap(vjp) fallback); small.

Several terms of one parameter (a module run several times, a tied weight) are merged along T
(:func:`merge`). Their norms and clipped sums are in :mod:`dptrain.ghost_algebra`. Terms are
float32 (under autocast too), except that on CUDA the bf16 factors of an Outer term stay bf16
(:mod:`dptrain.ghost_precision`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import ghost_precision as gp
from .ghost_rows import Rows


@dataclass
class Outer:
    """Per-example gradient Σ_t left[b, g, t]ᵀ ⊗ right[b, g, t], reshaped to the parameter."""

    left: torch.Tensor  # [B, G, T, o]
    right: torch.Tensor  # [B, G, T, i]
    explicit: torch.Tensor | None = None  # [B, G, o, i] when the norm pass formed it


#: CPU bytes of one block's patches in :meth:`Conv._windows_matmul` (copy and product stay in the cache)
PATCH_BLOCK_BYTES = 2 << 20
#: CPU bytes of one block's im2col workspace on the grouped-conv path (fewer, larger kernel calls)
GROUPED_BLOCK_BYTES = 8 << 20


def _block(device: torch.device, n: int, per_example_bytes: int, budget: int) -> int:
    """Examples per block of a conv's per-example weight gradients: on the CPU so that the block's patches
    (its im2col) take ≈ ``budget`` bytes. A whole batch's are tens of MB (a CIFAR batch's second conv: 38 MB),
    and glibc maps anything over 32 MB afresh, page by page, at every step (11,000 page faults a step, 14 ms
    of 57, on the benchmark CNN); a block's stay in the allocator's heap. Elsewhere, the whole batch."""
    if device.type != "cpu":
        return max(n, 1)
    return max(1, budget // max(per_example_bytes, 1))


@dataclass
class Conv:
    """Per-example conv weight gradient ∂ℓ_i/∂W = conv_weight_grad(a_i, g_i) (input already padded)."""

    a: torch.Tensor  # [B, C_in, *spatial]
    g: torch.Tensor  # [B, C_out, *spatial_out]
    weight_shape: torch.Size
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int
    explicit: torch.Tensor | None = None  # [B, *weight_shape] when the norm pass kept it

    def per_example(self, s: slice = slice(None)) -> torch.Tensor:
        """[n, *weight_shape]: a grouped-conv backward with the batch folded into the groups, or, for
        few input channels per filter (C_in·k ≤ 32, groups = 1), Σ_t g_it p_itᵀ as one batched matmul
        over a strided window view of the input — the grouped-conv kernel is up to ~13× slower there
        on a 2-thread CPU (CIFAR's first 3→16 conv)."""
        a, g = self.a[s], self.g[s]
        n, spatial = a.shape[0], a.dim() - 2
        if self.groups == 1 and self.weight_shape[1:].numel() <= 32:
            return self._windows_matmul(a, g)
        wgrad = torch.nn.grad.conv1d_weight if spatial == 1 else torch.nn.grad.conv2d_weight
        per = torch.empty((n, *self.weight_shape), dtype=torch.promote_types(g.dtype, a.dtype), device=g.device)
        im2col = self.weight_shape[1:].numel() * self.groups * g.shape[2:].numel() * a.element_size()  # an example's
        block = _block(a.device, n, im2col, GROUPED_BLOCK_BYTES)
        for j in range(0, n, block):
            aj, gj = a[j:j + block], g[j:j + block]
            m = aj.shape[0]
            per[j:j + m] = wgrad(aj.reshape(1, -1, *a.shape[2:]), (m * self.weight_shape[0], *self.weight_shape[1:]),
                                 gj.reshape(1, -1, *g.shape[2:]), self.stride, self.padding, self.dilation,
                                 self.groups * m).reshape(m, *self.weight_shape)
        return per

    def _windows_matmul(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The patches [n, C_in·k, T] are copied out of the window view a block of examples at a time
        (:func:`_block`): a CIFAR-sized first conv's patches are 28 MB for 256 examples."""
        n, c, spatial = a.shape[0], a.shape[1], a.dim() - 2
        if any(self.padding):
            a = F.pad(a, [p for p in reversed(self.padding) for _ in range(2)])
        k, out = self.weight_shape[2:], g.shape[2:]
        st = a.stride()
        view = a.as_strided((n, c, *k, *out), (st[0], st[1], *(st[2 + d] * self.dilation[d] for d in range(spatial)),
                                               *(st[2 + d] * self.stride[d] for d in range(spatial))))
        ck, t = c * k.numel(), out.numel()
        gg = g.reshape(n, g.shape[1], t)
        per = torch.empty((n, ck, g.shape[1]), dtype=torch.promote_types(g.dtype, a.dtype), device=g.device)
        block = _block(a.device, n, ck * t * a.element_size(), PATCH_BLOCK_BYTES)
        for s in range(0, n, block):
            patches = view[s:s + block].reshape(-1, ck, t)  # a copy: [block, C_in·k, T]
            # P_i G_iᵀ, [C_in·k, C_out] (a third faster than G_i P_iᵀ on the CPU for these shapes)
            torch.bmm(patches, gg[s:s + block].transpose(1, 2), out=per[s:s + block])
        return per.transpose(1, 2).reshape(n, *self.weight_shape)

    def weighted(self, f: torch.Tensor) -> torch.Tensor:
        wgrad = torch.nn.grad.conv1d_weight if self.a.dim() == 3 else torch.nn.grad.conv2d_weight
        g = self.g * f.view(-1, *[1] * (self.g.dim() - 1))
        return wgrad(self.a, self.weight_shape, g, self.stride, self.padding, self.dilation, self.groups)


@dataclass
class Dense:
    grads: torch.Tensor  # [B, *shape]


Term = Union[Outer, Conv, Rows, Dense]


# ---------------------------------------------------------------- per-module builders


def _conv_pads(m: nn.Module, spatial: int) -> list[int] | None:
    """F.pad list (last dim first) for the conv's padding, or None for symmetric int padding."""
    if isinstance(m.padding, str):
        if m.padding == "valid":
            return [0] * (2 * spatial)
        pads: list[int] = []
        for d, k in zip(reversed(m.dilation), reversed(m.kernel_size)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return pads
    if m.padding_mode != "zeros":
        return [p for p in reversed(m.padding) for _ in range(2)]
    return None


def _patches(m: nn.Module, a: torch.Tensor, padding: tuple) -> torch.Tensor:
    """Conv input → patches [B, C_in·k, L] (the conv is a Linear layer over the L positions)."""
    if a.dim() == 3:
        return F.unfold(a.unsqueeze(2), (1, m.kernel_size[0]), dilation=(1, m.dilation[0]),
                        padding=(0, padding[0]), stride=(1, m.stride[0]))
    return F.unfold(a, m.kernel_size, dilation=m.dilation, padding=padding, stride=m.stride)


def linear_terms(m: nn.Linear, a: torch.Tensor, g: torch.Tensor) -> dict[str, Term]:
    b = g.shape[0]
    right = a.reshape(b, 1, -1, a.shape[-1])
    left = g.reshape(b, 1, -1, g.shape[-1])
    bias = gp.widen(left.reshape(b, -1)) if left.shape[2] == 1 else left.sum((1, 2), dtype=gp.wide_dtype(left))
    return {"weight": Outer(left, right), "bias": Dense(bias)}


def conv_terms(m: nn.Module, a: torch.Tensor, g: torch.Tensor) -> dict[str, Term]:
    """Conv1d / Conv2d: Gram trick on patches when T²(o+i) < T·o·i, else grouped conv backward."""
    b, groups, spatial = g.shape[0], m.groups, a.dim() - 2
    pads = _conv_pads(m, spatial)
    padding = tuple(m.padding) if pads is None else (0,) * spatial
    if pads is not None and any(pads):
        a = F.pad(a, pads, mode="constant" if m.padding_mode == "zeros" else m.padding_mode)
    bias = Dense(g.sum(tuple(range(2, g.dim()))))
    t = g[0, 0].numel()
    o, i = g.shape[1] // groups, m.weight[0].numel()
    if t * (o + i) < o * i:
        p = _patches(m, a, padding)  # [B, C_in·k, L]
        right = p.reshape(b, groups, p.shape[1] // groups, p.shape[2]).transpose(2, 3)
        left = g.reshape(b, groups, o, -1).transpose(2, 3)
        return {"weight": Outer(left, right), "bias": bias}
    term = Conv(a, g, m.weight.shape, tuple(m.stride), padding, tuple(m.dilation), groups)
    return {"weight": term, "bias": bias}


def norm_terms(m: nn.Module, a: torch.Tensor, g: torch.Tensor) -> dict[str, Term]:
    """LayerNorm / RMSNorm / GroupNorm: ∂ℓ_i/∂γ = Σ g ⊙ x̂ and ∂ℓ_i/∂β = Σ g over the other dims."""
    if isinstance(m, nn.GroupNorm):
        xhat = F.group_norm(a, m.num_groups, None, None, m.eps)
        red = tuple(range(2, g.dim()))
    else:
        shape = tuple(m.normalized_shape)
        if isinstance(m, nn.LayerNorm):
            xhat = F.layer_norm(a, shape, None, None, m.eps)
        else:
            xhat = F.rms_norm(a, shape, None, m.eps)
        red = tuple(range(1, g.dim() - len(shape)))
    gw, gb = g * xhat, g
    if red:
        gw, gb = gw.sum(red), gb.sum(red)
    return {"weight": Dense(gw), "bias": Dense(gb)}


def generic_grads(m: nn.Module, names: list[str], args: tuple, kwargs: dict, outputs: list, grads: list, b: int
                  ) -> dict[str, torch.Tensor] | None:
    """Per-example grads of ``m``'s own parameters: vmap over examples of vjp(functional_call).

    Tensor arguments whose first dimension is the batch size are taken as batched, the others
    as constants; the caller checks Σ_i of the result against the batch gradient.
    """
    leaves, spec = tree_flatten((args, kwargs))
    batched = [isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == b for t in leaves]
    live = [j for j, t in enumerate(outputs) if t is not None]
    if any(outputs[j].dim() == 0 or outputs[j].shape[0] != b for j in live):
        return None
    cots = [torch.zeros(outputs[j].shape, dtype=outputs[j].dtype, device=outputs[j].device) if grads[j] is None
            else grads[j] for j in live]
    params = {k: getattr(m, k).detach() for k in names}

    def one(cot: list[torch.Tensor], *xs: torch.Tensor) -> dict[str, torch.Tensor]:
        it = iter(xs)
        full = [next(it).unsqueeze(0) if flag else leaf for flag, leaf in zip(batched, leaves)]
        one_args, one_kwargs = tree_unflatten(full, spec)

        def fwd(p: dict[str, torch.Tensor]) -> list[torch.Tensor]:
            res = tree_flatten(functional_call(m, p, one_args, one_kwargs))[0]
            return [res[j] for j in live]

        _, pull = vjp(fwd, params)
        return pull([c.unsqueeze(0) for c in cot])[0]

    xs = [leaf for flag, leaf in zip(batched, leaves) if flag]
    try:
        with torch.no_grad():  # the transforms still differentiate; no graph is kept outside them
            return vmap(one, randomness="error")(cots, *xs)
    except (RuntimeError, ValueError, TypeError, IndexError):
        return None  # randomness inside the module, an op without a batching rule, shape mismatch



# ---------------------------------------------------------------- merging terms of one parameter


def _to_dense(term: Term, shape: torch.Size) -> torch.Tensor:
    if isinstance(term, Dense):
        return term.grads
    if isinstance(term, Outer):
        per = torch.einsum("bgto,bgti->bgoi", gp.widen(term.left), gp.widen(term.right))
        return per.reshape(per.shape[0], *shape)
    if isinstance(term, Conv):
        return term.per_example()
    b, t, d = term.right.shape
    out = term.right.new_zeros(b * term.num_rows, d)
    rows = (term.idx + term.num_rows * torch.arange(b, device=term.idx.device)[:, None]).reshape(-1)
    return out.index_add_(0, rows, term.right.reshape(-1, d)).reshape(b, *shape)


def merge(terms: Sequence[Term], shape: torch.Size) -> list[Term]:
    """One Outer, one Rows, one Outer + one Rows, or one Dense: same total per-example gradient."""
    if len(terms) == 1:
        return list(terms)
    outers = [t for t in terms if isinstance(t, Outer)]
    rows = [t for t in terms if isinstance(t, Rows)]
    dense = [t for t in terms if isinstance(t, (Dense, Conv))]
    same_blocks = len({(t.left.shape[1], t.left.shape[3], t.right.shape[3]) for t in outers}) <= 1
    if dense or not same_blocks or (outers and rows and outers[0].left.shape[1] != 1):
        return [Dense(sum(_to_dense(t, shape) for t in terms))]
    out: list[Term] = []
    if outers:
        out.append(outers[0] if len(outers) == 1 else
                   Outer(torch.cat([t.left for t in outers], 2), torch.cat([t.right for t in outers], 2)))
    if rows:
        out.append(rows[0] if len(rows) == 1 else
                   Rows(torch.cat([t.idx for t in rows], 1), torch.cat([t.right for t in rows], 1), rows[0].num_rows))
    return out
