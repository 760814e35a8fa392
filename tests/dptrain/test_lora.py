"""LoRA adapters: the adapted map, freezing, coverage by the fast path, make_private on adapters only."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import dptrain
from dptrain.clipping import ClippingConfig, clip_and_sum
from dptrain.lora import LoRALinear, add_lora, lora_layers, merge_lora


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))


def test_adapter_is_base_plus_scaled_low_rank_product():
    torch.manual_seed(0)
    base = nn.Linear(7, 5)
    layer = LoRALinear(base, rank=2, scaling=0.5)
    x = torch.randn(4, 7)
    torch.testing.assert_close(layer(x), base(x))  # B = 0 at init: the base model's function
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    w = base.weight + 0.5 * layer.lora_B.weight @ layer.lora_A.weight
    torch.testing.assert_close(layer(x), x @ w.T + base.bias)
    torch.testing.assert_close(layer.merged()(x), layer(x))
    assert not base.weight.requires_grad and not base.bias.requires_grad
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(7, 5), rank=6)


def test_add_lora_freezes_everything_but_the_adapters_and_skips_attention_out_proj():
    enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    model = nn.Sequential(enc, nn.Flatten(), nn.Linear(8 * 3, 4))
    names = add_lora(model, rank=2, seed=0)
    assert sorted(names) == ["0.linear1", "0.linear2", "2"]
    assert isinstance(enc.self_attn.out_proj, nn.Linear) and not isinstance(enc.self_attn.out_proj, LoRALinear)
    trainable = [k for k, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in trainable)
    assert len(lora_layers(model)) == 3
    x = torch.randn(2, 3, 8)
    before = model(x)
    merge_lora(model)
    torch.testing.assert_close(model(x), before)
    with pytest.raises(ValueError, match="no nn.Linear named"):
        add_lora(_mlp(), rank=2, target=["nope"])


def test_fast_path_covers_adapters_and_equals_per_example_gradients():
    model = _mlp()
    add_lora(model, rank=2, seed=1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_()
    x, y = torch.randn(9, 6), torch.randint(0, 3, (9,))
    fast = clip_and_sum(model, nn.CrossEntropyLoss(), x, y, ClippingConfig(0.1), method="fast")
    ref = clip_and_sum(model, nn.CrossEntropyLoss(), x, y, ClippingConfig(0.1), method="vmap")
    assert set(fast.sums) == {k for k, p in model.named_parameters() if p.requires_grad}
    for k in ref.sums:
        torch.testing.assert_close(fast.sums[k], ref.sums[k], atol=1e-6, rtol=1e-5)
    # each example's clipped contribution to the adapters has norm <= C
    grads = dptrain.per_sample_grads(model, nn.CrossEntropyLoss(), x, y)
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))
    per_example = torch.clamp(0.1 / (norms + 1e-6), max=1.0) * norms
    assert per_example.max() <= 0.1 + 1e-6


def test_make_private_trains_only_the_adapters():
    model = _mlp()
    add_lora(model, rank=2, seed=0)
    frozen = {k: p.detach().clone() for k, p in model.named_parameters() if not p.requires_grad}
    adapters = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 6, generator=g)
    data = TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())
    priv = dptrain.make_private(model, eps=2.0, seed=0, accountant="rdp")
    params = [p for p in model.parameters() if p.requires_grad]
    priv.attach(data, batch_size=30, epochs=2, optimizer=torch.optim.SGD(params, lr=0.5))
    priv.fit()
    assert priv.epsilon_spent() <= 2.0
    for k, p in model.named_parameters():
        if k in frozen:
            assert torch.equal(p, frozen[k]), f"frozen {k} changed"
        else:
            assert not torch.equal(p, adapters[k]), f"adapter {k} did not train"


def test_an_adapted_encoder_layer_runs_in_eval_mode_with_its_adapters():
    """nn.TransformerEncoderLayer's inference fast path reads linear1.weight: it raised AttributeError on an
    adapted layer; the merged weight W + s·B A gives the train-mode output."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    add_lora(layer, rank=2)
    for lin in (layer.linear1, layer.linear2):
        nn.init.normal_(lin.lora_B.weight)
    x = torch.randn(3, 5, 16)
    want = layer(x)
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)


def test_add_lora_leaves_a_model_with_nothing_to_adapt_as_it_was_and_merge_keeps_layers_frozen():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    add_lora(model, rank=1)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    with pytest.raises(ValueError, match="no nn.Linear layer to adapt"):
        add_lora(model, rank=1)  # already adapted: it froze the adapters before failing
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable
    with pytest.raises(ValueError, match="bare nn.Linear"):
        add_lora(nn.Linear(4, 2), rank=1)
    merge_lora(model)
    assert not any(p.requires_grad for p in model.parameters())  # merged layers were trainable again
