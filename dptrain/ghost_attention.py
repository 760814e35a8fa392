"""Book-keeping rule for ``nn.MultiheadAttention``: its four projections as recorded Linear maps.

MultiheadAttention computes q = x_q W_qᵀ + b_q, k = x_k W_kᵀ + b_k, v = x_v W_vᵀ + b_v (rows of
``in_proj_weight``, or ``q/k/v_proj_weight`` when kdim / vdim differ), optionally appends the
learned token ``bias_k`` / ``bias_v`` to k / v, attends per head, softmax(q kᵀ/√d_h + mask) v,
and maps the concatenated heads z through out_proj: y = z W_oᵀ + b_o. Every parameter
therefore enters through a Linear map of a recorded input, or as an appended token, so its
per-example gradient is Σ_t (∂ℓ_i/∂proj_it) input_itᵀ (an :class:`~dptrain.ghost_layers.Outer`
term, normed by the Gram trick or explicitly) or a row of ∂ℓ_i/∂k (a
:class:`~dptrain.ghost_layers.Dense` term).

torch's forward applies ``out_proj.weight`` and the packed projection functionally, so no
forward hook sees them. While the book-keeping path records one forward, the module's
``forward`` is shadowed (on the instance, restored afterwards) by :func:`recording_forward`,
which computes the same function as ``nn.MultiheadAttention.forward`` (masks, ``batch_first``,
``need_weights`` / ``average_attn_weights``, ``is_causal``, ``add_bias_kv``, ``add_zero_attn``,
dropout) with the projections as explicit tensors whose gradients are then taken. The model's
parameters, buffers and class are never changed. Equality with the vmap engine (which runs
torch's own forward one example at a time) is tested.

Privacy assumption: as for every ghost rule, example i's outputs depend on example i's inputs
only (a 3-D attention mask is per example; batch dimension = examples).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .ghost_layers import Dense, Outer, Term
from .ghost_precision import narrow, wide_dtype, widen


def is_plain_attention(m: nn.Module) -> bool:
    """An nn.MultiheadAttention whose forward and parameters are torch's own (the rule applies)."""
    if not isinstance(m, nn.MultiheadAttention) or type(m).forward is not nn.MultiheadAttention.forward:
        return False
    if "forward" in m.__dict__ or m._forward_pre_hooks or not isinstance(m.out_proj, nn.Linear):
        return False
    own = {k for k, _ in m.named_parameters()}
    known = {"in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight",
             "bias_k", "bias_v", "out_proj.weight", "out_proj.bias"}
    return own <= known and not m.out_proj._parameters.keys() - {"weight", "bias"}


@dataclass
class AttentionRecord:
    """What one recorded call keeps: inputs of the projections (batch first, detached) and layout."""

    query: torch.Tensor  # [B, L, E_q]
    key: torch.Tensor  # [B, S, kdim]
    value: torch.Tensor  # [B, S, vdim]
    heads_out: torch.Tensor  # [B, L, E]: input of out_proj
    packed: bool  # one projection of one input (self-attention with in_proj_weight)
    source_len: int  # S, before bias_k / zero-attention tokens


def _mask_for_heads(mask: torch.Tensor, b: int, heads: int) -> torch.Tensor:
    """[L, S] → [1, 1, L, S]; [B·H, L, S] → [B, H, L, S] (torch's batch-major head order)."""
    return mask.unsqueeze(0).unsqueeze(0) if mask.dim() == 2 else mask.view(b, heads, *mask.shape[1:])


def recording_forward(m: nn.MultiheadAttention, sink: Callable[[list, AttentionRecord, tuple], None],
                      copies: bool, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                      attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                      is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """nn.MultiheadAttention.forward with the projection outputs exposed to ``sink``.

    ``sink(tensors, record, inputs)`` receives the tensors whose gradients are needed, in the
    order [projection output(s)…, k with bias_k, v with bias_v (if any), out_proj output], the
    record, and the tensor arguments. Unbatched (2-D) inputs run torch's own forward unrecorded
    (the book-keeping path then refuses the model).
    """
    if query.dim() != 3:
        return nn.MultiheadAttention.forward(m, query, key, value, key_padding_mask, need_weights, attn_mask,
                                             average_attn_weights, is_causal)
    inputs = tuple(t for t in (query, key, value, key_padding_mask, attn_mask) if isinstance(t, torch.Tensor))
    same_qkv = query is key and key is value
    if not m.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    b, tgt, e = query.shape
    src, heads, hd = key.shape[1], m.num_heads, m.head_dim
    if e != m.embed_dim:
        raise AssertionError(f"was expecting embedding dimension of {m.embed_dim}, but got {e}")
    key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                         other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                         target_type=query.dtype)
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                           "module method `generate_square_subsequent_mask` to create this mask.")
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None  # scaled_dot_product_attention applies the causal mask itself
    else:
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                      target_type=query.dtype, check_other=False)
        if key_padding_mask is not None:
            is_causal = False
    if attn_mask is not None and attn_mask.shape not in ((tgt, src), (b * heads, tgt, src)):
        raise RuntimeError(f"attn_mask of shape {tuple(attn_mask.shape)} should be {(tgt, src)} or "
                           f"{(b * heads, tgt, src)}")

    keep = (lambda t: t.detach().clone()) if copies else (lambda t: t.detach())
    bias = m.in_proj_bias
    if m._qkv_same_embed_dim:
        wq, wk, wv = m.in_proj_weight.chunk(3)
    else:
        wq, wk, wv = m.q_proj_weight, m.k_proj_weight, m.v_proj_weight
    bq, bk, bv = (None, None, None) if bias is None else bias.chunk(3)
    packed = same_qkv and m._qkv_same_embed_dim
    if packed:
        qkv = F.linear(query, m.in_proj_weight, bias)
        q, k, v = qkv.split(e, dim=-1)
        grads_of = [qkv]
    else:
        q, k, v = F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)
        grads_of = [q, k, v]
    if m.bias_k is not None and m.bias_v is not None:
        k = torch.cat([k, m.bias_k.expand(b, 1, e)], 1)
        v = torch.cat([v, m.bias_v.expand(b, 1, e)], 1)
        grads_of += [k, v]
        attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
    q, k, v = (t.unflatten(-1, (heads, hd)).transpose(1, 2) for t in (q, k, v))  # [B, H, T, hd]
    if m.add_zero_attn:
        k, v = (torch.cat([t, t.new_zeros(b, heads, 1, hd)], 2) for t in (k, v))
        attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
    mask = None if attn_mask is None else _mask_for_heads(attn_mask, b, heads)
    if key_padding_mask is not None:
        kpm = key_padding_mask.view(b, 1, 1, -1)
        mask = kpm if mask is None else mask + kpm
    dropout_p = m.dropout if m.training else 0.0
    weights = None
    if need_weights:
        if is_causal and mask is None:
            raise AssertionError("FIXME: is_causal not implemented for need_weights")
        scores = torch.matmul(q * math.sqrt(1.0 / hd), k.transpose(-2, -1))
        if mask is not None:
            scores = scores + mask
        weights = torch.softmax(scores, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        heads_out = torch.matmul(weights, v)
        if average_attn_weights:
            weights = weights.mean(dim=1)
    else:
        heads_out = F.scaled_dot_product_attention(q, k, v, mask, dropout_p, is_causal)
    z = heads_out.transpose(1, 2).reshape(b, tgt, e)
    out = F.linear(z, m.out_proj.weight, m.out_proj.bias)
    grads_of.append(out)
    record = AttentionRecord(keep(query), keep(key), keep(value), keep(z), packed, src)
    sink(grads_of, record, inputs)
    if copies:  # in-place edits downstream then act on a copy, not on the recorded output
        out = out.clone()
    return (out if m.batch_first else out.transpose(0, 1)), weights


def attention_terms(m: nn.MultiheadAttention, rec: AttentionRecord, outputs: list[torch.Tensor],
                    grads: list[torch.Tensor | None], b: int) -> dict[str, Term] | None:
    """Factored per-example gradients of every parameter of one recorded call (float32).

    ``grads`` are ∂(Σ_i ℓ_i)/∂ of the recorded tensors, in the order :func:`recording_forward`
    gave them; example i's rows are ∂ℓ_i/∂ (its loss depends on its own rows only).
    """
    if rec.query.shape[0] != b:
        return None
    g = [torch.zeros(t.shape, device=t.device) if d is None else d for t, d in zip(outputs, grads)]
    kept = (rec.query, rec.key, rec.value, rec.heads_out)
    # bf16 projection outputs: autocast multiplied bf16 inputs; keep bf16 factors (CUDA), else float32
    keep_narrow = all(narrow(d) and d.dtype == g[0].dtype for d in g)
    if not keep_narrow:
        g = [widen(d) for d in g]
    e, src = m.embed_dim, rec.source_len
    x_q, x_k, x_v, z = (t.to(g[0].dtype) for t in kept)
    terms: dict[str, Term] = {}
    if rec.packed:
        dqkv = g[0]
        dq, dk, dv = dqkv.split(e, dim=-1)
        terms["in_proj_weight"] = Outer(dqkv.unsqueeze(1), x_q.unsqueeze(1))
        rest = g[1:]
    else:
        dq, dk, dv = g[:3]
        rest = g[3:]
        if m._qkv_same_embed_dim:  # packed weight, different inputs: three row blocks (groups)
            t = max(dq.shape[1], dk.shape[1])
            pad = [F.pad(u, (0, 0, 0, t - u.shape[1])) for u in (dq, dk, dv, x_q, x_k, x_v)]
            terms["in_proj_weight"] = Outer(torch.stack(pad[:3], 1), torch.stack(pad[3:], 1))
        else:
            for name, d, x in (("q", dq, x_q), ("k", dk, x_k), ("v", dv, x_v)):
                terms[f"{name}_proj_weight"] = Outer(d.unsqueeze(1), x.unsqueeze(1))
    if m.in_proj_bias is not None:
        terms["in_proj_bias"] = Dense(torch.cat([d.sum(1, dtype=wide_dtype(d)) for d in (dq, dk, dv)], 1))
    if m.bias_k is not None:
        dk_full, dv_full = rest[0], rest[1]
        terms["bias_k"] = Dense(widen(dk_full[:, src].reshape(b, 1, 1, e)))
        terms["bias_v"] = Dense(widen(dv_full[:, src].reshape(b, 1, 1, e)))
        rest = rest[2:]
    dout = rest[0]
    terms["out_proj.weight"] = Outer(dout.unsqueeze(1), z.unsqueeze(1))
    if m.out_proj.bias is not None:
        terms["out_proj.bias"] = Dense(dout.sum(1, dtype=wide_dtype(dout)))
    return terms

