"""Per-layer algebra of the ghost / book-keeping path: per-example gradients in factored form.

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

Several terms of one parameter (a module run several times, a tied weight) are merged along T;
an Outer + Rows pair (an embedding tied to an output projection) gets its exact cross term.
Clipped sums Σ_i f_i G_i are formed from the factors: (f ⊙ L)ᵀ R, index_add of f-scaled rows,
or Σ_i f_i P_i. All algebra runs in float32 (under autocast too; on CUDA the bf16 factors of an
Outer term stay bf16 and enter products with float32 results, :mod:`dptrain.ghost_precision`);
squared norms are returned in float64, and an example whose float32 norm overflows is
recomputed in float64, so that an exploding example is clipped rather than dropped.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import ghost_precision as gp
from .ghost_precision import norm as _norm
from .ghost_precision import sq as _sq
from .ghost_rows import Rows
from .ghost_rows import rows_sq as _rows_sq
from .ghost_rows import segment_sums as _segment_sums

#: element budget for intermediates ([B, T, T] Gram matrices or [B, o, i] explicit gradients)
_BLOCK_ELEMENTS = 1 << 24


@dataclass
class Outer:
    """Per-example gradient Σ_t left[b, g, t]ᵀ ⊗ right[b, g, t], reshaped to the parameter."""

    left: torch.Tensor  # [B, G, T, o]
    right: torch.Tensor  # [B, G, T, i]
    explicit: torch.Tensor | None = None  # [B, G, o, i] when the norm pass formed it


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
        shape = (n * self.weight_shape[0], *self.weight_shape[1:])
        wgrad = torch.nn.grad.conv1d_weight if spatial == 1 else torch.nn.grad.conv2d_weight
        out = wgrad(a.reshape(1, -1, *a.shape[2:]), shape, g.reshape(1, -1, *g.shape[2:]),
                    self.stride, self.padding, self.dilation, self.groups * n)
        return out.reshape(n, *self.weight_shape)

    def _windows_matmul(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        n, c, spatial = a.shape[0], a.shape[1], a.dim() - 2
        if any(self.padding):
            a = F.pad(a, [p for p in reversed(self.padding) for _ in range(2)])
        k, out = self.weight_shape[2:], g.shape[2:]
        st = a.stride()
        view = a.as_strided((n, c, *k, *out), (st[0], st[1], *(st[2 + d] * self.dilation[d] for d in range(spatial)),
                                               *(st[2 + d] * self.stride[d] for d in range(spatial))))
        patches = view.reshape(n, c * k.numel(), out.numel())  # one copy: [n, C_in·k, T]
        per = torch.bmm(g.reshape(n, g.shape[1], -1), patches.transpose(1, 2))
        return per.reshape(n, *self.weight_shape)

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
    bias = left.reshape(b, -1).float() if left.shape[2] == 1 else left.sum((1, 2), dtype=torch.float32)
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
    cots = [torch.zeros_like(outputs[j]) if grads[j] is None else grads[j] for j in live]
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
        per = torch.einsum("bgto,bgti->bgoi", term.left.float(), term.right.float())
        return per.reshape(per.shape[0], *shape)
    if isinstance(term, Conv):
        return term.per_example()
    b, t, d = term.right.shape
    out = term.right.new_zeros(b * term.num_rows, d)
    rows = (term.idx + term.num_rows * torch.arange(b, device=term.idx.device)[:, None]).reshape(-1)
    return out.index_add_(0, rows, term.right.reshape(-1, d)).reshape(b, *shape)


def merge(terms: Sequence[Term], shape: torch.Size) -> list[Term]:
    """One Outer, one Rows, one Outer + one Rows, or one Dense: same total per-example gradient."""
    outers = [t for t in terms if isinstance(t, Outer)]
    rows = [t for t in terms if isinstance(t, Rows)]
    dense = [t for t in terms if isinstance(t, (Dense, Conv))]
    if len(terms) == 1:
        return list(terms)
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


# ---------------------------------------------------------------- norms


def _slices(batch: int, per_example: int):
    step = max(1, _BLOCK_ELEMENTS // max(per_example, 1))
    return [slice(s, s + step) for s in range(0, batch, step)]


def _outer_sq(term: Outer) -> torch.Tensor:
    left, right = term.left, term.right
    b, groups, t, o = left.shape
    i = right.shape[3]
    if t == 1 and groups == 1:  # ‖a_i‖²‖b_i‖² (a float32 overflow of the product is refined like any other)
        return (_norm(left.reshape(b, o)) * _norm(right.reshape(b, i))).double().square()
    if t == 1:
        return (_sq(left, 2) * _sq(right, 2)).sum(1)
    keep = b * groups * o * i <= _BLOCK_ELEMENTS
    if t * o * i * (1 if keep else 2) < t * t * (o + i):  # explicit L_iᵀR_i beats the T×T Gram trick
        parts = [gp.mm32(left[s].transpose(2, 3).reshape(-1, o, t), right[s].reshape(-1, t, i)).reshape(-1, groups, o, i)
                 for s in _slices(b, groups * o * i)]
        per = torch.cat(parts) if len(parts) > 1 else parts[0]
        if keep:
            term.explicit = per  # reused by the clipped sum
        return _sq(per)
    out = []
    for s in _slices(b, groups * t * t):
        ls, rs = left[s].reshape(-1, t, o), right[s].reshape(-1, t, i)
        gl = gp.mm32(ls, ls.transpose(1, 2)).reshape(-1, 1, groups * t * t)
        gr = gp.mm32(rs, rs.transpose(1, 2)).reshape(-1, groups * t * t, 1)
        out.append(torch.bmm(gl, gr).reshape(-1).double())  # Σ_{g,t,s} gl·gr per example
    return torch.cat(out).clamp_min(0.0)  # rounding can leave a tiny negative value


def _conv_sq(term: Conv) -> torch.Tensor:
    b, size = term.a.shape[0], term.weight_shape.numel()
    parts = [term.per_example(s) for s in _slices(b, size)]
    if b * size <= _BLOCK_ELEMENTS:
        term.explicit = torch.cat(parts) if len(parts) > 1 else parts[0]
    return torch.cat([_sq(p) for p in parts])


def _cross(outer: Outer, rows: Rows) -> torch.Tensor:
    """⟨Σ_t L_t R_tᵀ, Σ_s e_{idx_s} Q_sᵀ⟩ = Σ_{t,s} L_t[idx_s] (R_t·Q_s), per example."""
    left, right = outer.left[:, 0].float(), outer.right[:, 0].float()  # [B, T, V], [B, T, d]
    b, t = left.shape[:2]
    out = []
    for s in _slices(b, t * rows.idx.shape[1]):
        picked = left[s].gather(2, rows.idx[s].unsqueeze(1).expand(-1, t, -1))
        dots = torch.matmul(right[s], rows.right[s].transpose(1, 2))
        out.append((picked.double() * dots.double()).sum((1, 2)))
    return torch.cat(out)


def _select(term: Term, keep: torch.Tensor, dtype: torch.dtype) -> Term:
    """The examples ``keep`` of a term, cast to ``dtype``."""
    if isinstance(term, Outer):
        return Outer(term.left[keep].to(dtype), term.right[keep].to(dtype))
    if isinstance(term, Conv):
        return replace(term, a=term.a[keep].to(dtype), g=term.g[keep].to(dtype), explicit=None)
    if isinstance(term, Rows):
        return Rows(term.idx[keep], term.right[keep].to(dtype), term.num_rows)
    return Dense(term.grads[keep].to(dtype))


def sq_norms(terms: list[Term]) -> torch.Tensor:
    """‖Σ_terms G_i‖² per example (float64 result, float32 arithmetic) for merged terms."""
    total = None
    for term in terms:
        if isinstance(term, Outer):
            part = _outer_sq(term)
        elif isinstance(term, Conv):
            part = _conv_sq(term)
        elif isinstance(term, Rows):
            part = _rows_sq(term)
        else:
            part = _sq(term.grads)
        total = part if total is None else total + part
    if len(terms) == 2:
        total = total + 2 * _cross(terms[0], terms[1])  # type: ignore[arg-type]
    assert total is not None
    return total


def _split_sum(t: Term) -> bool:
    """Whether :func:`clipped_sum` forms ``t``'s sum from narrow factors split in two
    (:func:`dptrain.ghost_precision.outer_sum`) — exactly the terms :func:`margins` covers."""
    return isinstance(t, Outer) and t.explicit is None and gp.narrow(t.left) and t.left.dtype == t.right.dtype


def margins(terms: list[Term]) -> torch.Tensor | None:
    """Per example (float64 [B]), the bound over f_i on the rounding error that :func:`clipped_sum` adds
    with narrow factors (:func:`dptrain.ghost_precision.margin`); None when it adds none.

    Call after :func:`sq_norms` (which may form the float32 per-example gradients instead).
    """
    total = None
    for t in terms:
        if _split_sum(t):
            part = gp.margin(t.left, t.right)
            total = part if total is None else total + part
    return total


def refine(terms: list[Term], sq: torch.Tensor) -> torch.Tensor:
    """Recompute non-finite entries of :func:`sq_norms` from float64 copies of the factors.

    An outlier whose float32 arithmetic overflows gets its true (finite) norm and is clipped;
    only truly non-finite gradients stay non-finite (and are then dropped).
    """
    bad = ~torch.isfinite(sq)
    if bool(bad.any()):
        sq = sq.clone()
        sq[bad] = sq_norms([_select(t, bad, torch.float64) for t in terms])
    return sq


# ---------------------------------------------------------------- masking and clipped sums


def _zero(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return torch.where(keep.view(-1, *[1] * (x.dim() - 1)), x, torch.zeros((), dtype=x.dtype, device=x.device))


def drop_examples(terms: list[Term], keep: torch.Tensor) -> list[Term]:
    """Zero the contribution of examples with ``keep[i] = False`` (non-finite gradients)."""
    out: list[Term] = []
    for t in terms:
        if isinstance(t, Outer):
            ex = None if t.explicit is None else _zero(t.explicit, keep)
            out.append(Outer(_zero(t.left, keep), _zero(t.right, keep), ex))
        elif isinstance(t, Conv):
            ex = None if t.explicit is None else _zero(t.explicit, keep)
            out.append(replace(t, a=_zero(t.a, keep), g=_zero(t.g, keep), explicit=ex))
        elif isinstance(t, Rows):
            out.append(replace(t, right=_zero(t.right, keep)))
        else:
            out.append(Dense(_zero(t.grads, keep)))
    return out


def _weighted_sum(f: torch.Tensor, per: torch.Tensor) -> torch.Tensor:
    """Σ_i f_i per[i] (flattened)."""
    return torch.mv(per.reshape(per.shape[0], -1).t(), f.to(per.dtype))


def clipped_sum(terms: list[Term], f: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Σ_i f_i G_i without forming G_i (f: float32 [B])."""
    total = None
    for t in terms:
        if isinstance(t, (Outer, Conv)) and t.explicit is not None:
            part = _weighted_sum(f, t.explicit)
        elif isinstance(t, Conv):
            part = t.weighted(f)
        elif _split_sum(t):
            part = gp.outer_sum(t.left, t.right, f)
        elif isinstance(t, Outer):
            left, right = t.left.float(), t.right.float()
            if left.shape[3] <= right.shape[3]:  # scale the smaller factor
                left = left * f.view(-1, 1, 1, 1)
            else:
                right = right * f.view(-1, 1, 1, 1)
            if left.shape[1] == 1:
                part = left.reshape(-1, left.shape[3]).t() @ right.reshape(-1, right.shape[3])
            else:
                part = torch.einsum("bgto,bgti->goi", left, right)
        elif isinstance(t, Rows):
            d = t.right.shape[2]
            part = _segment_sums((t.right * f.view(-1, 1, 1)).reshape(-1, d), t.idx.reshape(-1), t.num_rows)
        else:
            part = _weighted_sum(f, t.grads)
        part = part.reshape(shape)
        total = part if total is None else total + part
    assert total is not None
    return total
