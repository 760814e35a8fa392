"""nn.MultiheadAttention on the book-keeping path equals the vmap engine (torch's own forward, one example at a time)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dptrain import ClippingConfig, clip_and_sum
from dptrain.ghost import ghost_clip_and_sum, ghost_norms
from dptrain.ghost_plan import ghost_supported
from dptrain.ghost_attention import is_plain_attention

LOSS = nn.CrossEntropyLoss()
E, HEADS = 8, 2


def causal(x: torch.Tensor, src: int) -> torch.Tensor:
    return torch.ones(x.shape[1], src, dtype=torch.bool, device=x.device).triu(1)


def per_example_float(x: torch.Tensor, src: int) -> torch.Tensor:
    """A [B·H, L, S] additive mask computed from each example's own tokens."""
    return (-(x[:, :, None] + x[:, None, :src]).float() / 10).repeat_interleave(HEADS, 0)


class AttentionModel(nn.Module):
    """Embedding → MultiheadAttention (self- or cross-attention, any options) → mean → Linear."""

    def __init__(self, cross: bool = False, batch_first: bool = True, need_weights: bool = False, mask=None,
                 padding_mask: bool = False, is_causal: bool = False, **mha) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, E)
        self.att = nn.MultiheadAttention(E, HEADS, batch_first=batch_first, dropout=0.25, **mha)
        self.to_k = nn.Linear(E, mha.get("kdim") or E)
        self.to_v = nn.Linear(E, mha.get("vdim") or E)
        self.fc = nn.Linear(E, 3)
        self.cross, self.need_weights, self.mask = cross, need_weights, mask
        self.padding_mask, self.is_causal = padding_mask, is_causal

    def forward(self, x):
        e = self.emb(x)
        layout = (lambda t: t) if self.att.batch_first else (lambda t: t.transpose(0, 1))
        if self.cross:
            q, k, v = layout(e), layout(self.to_k(e[:, :-1])), layout(self.to_v(e[:, :-1]))
        else:
            q = k = v = layout(e)  # one tensor: torch's packed self-attention projection
        src = x.shape[1] - 1 if self.cross else x.shape[1]
        kwargs = {"need_weights": self.need_weights, "is_causal": self.is_causal}
        if self.padding_mask:
            kwargs["key_padding_mask"] = x[:, :src] == 0
        if self.mask is not None:
            kwargs["attn_mask"] = self.mask(x, src)
        a, w = self.att(q, k, v, **kwargs)
        if not self.att.batch_first:
            a = a.transpose(0, 1)
        out = self.fc(a.mean(1))
        return out if w is None else out + w.flatten(1).sum(1, keepdim=True)


CONFIGS = {
    "self": {},
    "seq_first": {"batch_first": False},
    "no_bias": {"bias": False},
    "cross_packed": {"cross": True},
    "cross_kdim_vdim_seq_first": {"cross": True, "batch_first": False, "kdim": 5, "vdim": 7},
    "bias_kv+zero_attn": {"add_bias_kv": True, "add_zero_attn": True},
    "weights": {"need_weights": True},
    "weights+padding_mask": {"need_weights": True, "padding_mask": True},
    "causal_hint": {"mask": causal, "is_causal": True},
    "causal+padding_mask": {"mask": causal, "padding_mask": True},
    "float_3d_mask": {"mask": per_example_float},
    "cross+everything": {"cross": True, "add_bias_kv": True, "add_zero_attn": True, "padding_mask": True,
                         "mask": causal, "kdim": 6},
}


def data(batch: int = 5):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 20, (batch, 6), generator=g)
    x[0, 4:] = 0  # padded positions
    return x, torch.randint(0, 3, (batch,), generator=g)


def build(cfg: dict) -> AttentionModel:
    torch.manual_seed(0)
    return AttentionModel(**cfg).eval()  # dropout off: both engines see the same function


def assert_same(fast, ref, atol=1e-5):
    assert fast is not None
    assert fast.batch_size == ref.batch_size and fast.clipped_count == ref.clipped_count
    for k in ref.sums:
        torch.testing.assert_close(fast.sums[k], ref.sums[k], atol=atol, rtol=1e-4, msg=k)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("clip", [1e-3, 1e6])
def test_attention_equals_vmap(name, clip):
    model = build(CONFIGS[name])
    x, y = data()
    assert is_plain_attention(model.att) and ghost_supported(model)
    fast = ghost_clip_and_sum(model, LOSS, x, y, ClippingConfig(clip))
    ref = clip_and_sum(model, LOSS, x, y, ClippingConfig(clip), method="vmap")
    assert_same(fast, ref)
    assert "forward" not in model.att.__dict__  # the instance is left as it was


def test_average_attn_weights_false_equals_vmap():
    class PerHead(AttentionModel):
        def forward(self, x):
            q = self.emb(x)
            a, w = self.att(q, q, q, need_weights=True, average_attn_weights=False)
            assert w.shape == (x.shape[0], HEADS, x.shape[1], x.shape[1])
            return self.fc(a.mean(1)) + w[:, 1].flatten(1)[:, :3]

    torch.manual_seed(0)
    model = PerHead().eval()
    x, y = data()
    assert_same(ghost_clip_and_sum(model, LOSS, x, y, 0.1), clip_and_sum(model, LOSS, x, y, 0.1, method="vmap"))


@pytest.mark.parametrize("layer", ["encoder", "decoder"])
def test_transformer_layers_equal_vmap(layer):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, E)
            self.enc = nn.TransformerEncoderLayer(E, HEADS, 16, dropout=0.0, batch_first=True, norm_first=True)
            self.dec = nn.TransformerDecoderLayer(E, HEADS, 16, dropout=0.0, batch_first=True)
            self.fc = nn.Linear(E, 3)

        def forward(self, x):
            h = self.enc(self.emb(x), src_key_padding_mask=x == 0)
            if layer == "decoder":
                mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1] - 1)
                h = self.dec(self.emb(x[:, 1:]), h, tgt_mask=mask, tgt_is_causal=True, memory_key_padding_mask=x == 0)
            return self.fc(h.mean(1))

    torch.manual_seed(0)
    model = Net()
    x, y = data(6)
    for config in (ClippingConfig(0.05), ClippingConfig.per_layer(model, 0.05)):
        assert_same(ghost_clip_and_sum(model, LOSS, x, y, config, chunk_size=4),
                    clip_and_sum(model, LOSS, x, y, config, method="vmap"))


def test_frozen_projections_and_norms():
    """Only out_proj trainable: still on the fast path; norms equal the vmap engine's."""
    model = build({})
    for name in ("in_proj_weight", "in_proj_bias"):
        getattr(model.att, name).requires_grad_(False)
    x, y = data()
    norms = ghost_norms(model, LOSS, x, y)
    assert norms is not None and "att.out_proj.weight" in norms and "att.in_proj_weight" not in norms
    assert_same(ghost_clip_and_sum(model, LOSS, x, y, 0.1), clip_and_sum(model, LOSS, x, y, 0.1, method="vmap"))


def test_attention_called_twice_equals_vmap():
    class Twice(AttentionModel):
        def forward(self, x):
            q = self.emb(x)
            a, _ = self.att(q, q, q, need_weights=False)
            b, _ = self.att(torch.tanh(a), q, q, need_weights=False)  # second call: cross-attention form
            return self.fc(b.mean(1))

    torch.manual_seed(0)
    model = Twice().eval()
    x, y = data()
    assert_same(ghost_clip_and_sum(model, LOSS, x, y, 0.1), clip_and_sum(model, LOSS, x, y, 0.1, method="vmap"))


def test_out_proj_called_directly_falls_back():
    class Reuse(AttentionModel):
        def forward(self, x):
            return super().forward(x) + self.att.out_proj(self.emb(x)).mean(1)[:, :3]

    torch.manual_seed(0)
    model = Reuse().eval()
    x, y = data()
    assert ghost_clip_and_sum(model, LOSS, x, y, 1.0) is None  # out_proj's own call is not recorded
    assert clip_and_sum(model, LOSS, x, y, 1.0).batch_size == len(y)


def test_forward_restored_after_an_error():
    class Broken(AttentionModel):
        def forward(self, x):
            super().forward(x)
            raise KeyError("boom")

    torch.manual_seed(0)
    model = Broken().eval()
    x, y = data()
    with pytest.raises(KeyError):
        ghost_clip_and_sum(model, LOSS, x, y, 1.0)
    assert "forward" not in model.att.__dict__


def test_in_place_edit_of_the_output_is_handled():
    class InPlace(AttentionModel):
        def forward(self, x):
            q = self.emb(x)
            a, _ = self.att(q, q, q, need_weights=False)
            a.mul_(2.0)
            return self.fc(a.mean(1))

    torch.manual_seed(0)
    model = InPlace().eval()
    x, y = data()
    assert_same(ghost_clip_and_sum(model, LOSS, x, y, 0.1), clip_and_sum(model, LOSS, x, y, 0.1, method="vmap"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["self", "cross+everything", "weights+padding_mask"])
def test_cuda_equals_vmap(name):
    model = build(CONFIGS[name]).cuda()
    x, y = (t.cuda() for t in data())
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # full float32 products on both engines
    try:
        assert_same(ghost_clip_and_sum(model, LOSS, x, y, 0.1), clip_and_sum(model, LOSS, x, y, 0.1, method="vmap"),
                    atol=1e-4)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
