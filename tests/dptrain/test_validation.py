"""BatchNorm and other cross-example modules are rejected with a message naming the fix."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import dptrain


def _bn_model():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 2))


def test_batchnorm_is_rejected_with_module_name_and_fix():
    with pytest.raises(dptrain.UnsupportedModuleError) as err:
        dptrain.validate(_bn_model())
    assert "1" in str(err.value) and "BatchNorm2d" in str(err.value) and "dptrain.fix(model)" in str(err.value)


def test_make_private_rejects_batchnorm_before_any_step():
    with pytest.raises(dptrain.UnsupportedModuleError, match="GroupNorm"):
        dptrain.make_private(_bn_model(), eps=3)


def test_fix_replaces_batchnorm_and_keeps_original():
    model = _bn_model()
    fixed = dptrain.fix(model)
    assert isinstance(model[1], nn.BatchNorm2d)
    assert isinstance(fixed[1], nn.GroupNorm)
    dptrain.validate(fixed)
    assert fixed(torch.randn(2, 3, 6, 6)).shape == (2, 2)


def test_fix_handles_a_bare_batchnorm_and_instance_norm_with_running_stats():
    assert isinstance(dptrain.fix(nn.BatchNorm1d(4)), nn.GroupNorm)
    m = nn.Sequential(nn.InstanceNorm1d(4, track_running_stats=True))
    with pytest.raises(dptrain.UnsupportedModuleError):
        dptrain.validate(m)
    dptrain.validate(dptrain.fix(m))


def test_supported_models_validate():
    dptrain.validate(nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3), nn.GroupNorm(1, 3)))
    dptrain.validate(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True))
    dptrain.validate(nn.LSTM(3, 3))


def test_fixed_models_train_privately():
    """fix() made BatchNorm1d after a Linear a GroupNorm(16, 16) (groups of one value: output 0, refused at
    attach), and kept InstanceNorm's running buffers (updated in place: refused by the vmap engine)."""
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(0)
    cases = [
        (nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)), torch.randn(60, 8, generator=g)),
        (nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4, affine=True, track_running_stats=True), nn.Flatten(),
                       nn.Linear(144, 3)), torch.randn(60, 3, 8, 8, generator=g)),
    ]
    for model, x in cases:
        fixed = dptrain.fix(model)
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) or getattr(m, "running_mean", None) is not None
                       for m in fixed.modules())
        priv = dptrain.make_private(fixed, eps=1.0, seed=0)
        priv.attach(TensorDataset(x, torch.randint(0, 3, (60,), generator=g)), batch_size=20, epochs=1)
        priv.fit()
        assert priv.steps == priv.plan.planned_steps


@pytest.mark.parametrize("lookup", [nn.Embedding(50, 8, max_norm=1.0), nn.EmbeddingBag(50, 8, max_norm=1.0)])
@pytest.mark.parametrize("frozen", [False, True])
def test_a_lookup_with_max_norm_is_refused_with_the_fix(lookup, frozen):
    """max_norm renormalises the looked-up rows of the weight in place in forward (frozen or not): on the loop
    engine (a model with an RNN) the released weight showed which rows a private batch used."""
    lookup.weight.requires_grad_(not frozen)
    model = nn.Sequential(lookup, nn.GRU(8, 8, batch_first=True)) if isinstance(lookup, nn.Embedding) else \
        nn.Sequential(lookup, nn.Linear(8, 3))
    for check in (dptrain.validate, lambda m: dptrain.make_private(m, eps=1.0)):
        with pytest.raises(dptrain.UnsupportedModuleError, match=r"max_norm=1\.0\) renormalises(.|\n)*max_norm=None") as err:
            check(model)
        assert "dptrain.fix" not in str(err.value)  # fix() does not change it


@pytest.mark.parametrize("norm, shape", [(nn.BatchNorm1d(4), (2, 4)), (nn.BatchNorm2d(4), (2, 4, 3, 3)),
                                         (nn.BatchNorm3d(4), (2, 4, 2, 2, 2))])
def test_fix_keeps_the_learned_affine_weight_and_bias(norm, shape):
    """A pretrained BatchNorm's weight 5 became GroupNorm's 1: fix silently re-initialised the layer."""
    with torch.no_grad():
        norm.weight.fill_(5.0)
        norm.bias.copy_(torch.arange(4.0))
    fixed = dptrain.fix(nn.Sequential(norm.double()))
    assert isinstance(fixed[0], nn.GroupNorm) and fixed[0].weight.dtype == torch.float64
    assert torch.equal(fixed[0].weight, norm.weight) and torch.equal(fixed[0].bias, norm.bias)
    assert fixed(torch.randn(*shape, dtype=torch.float64)).shape == shape


def test_fix_of_an_uninitialised_lazy_batchnorm_says_to_run_a_forward_first():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LazyBatchNorm2d())
    with pytest.raises(dptrain.UnsupportedModuleError, match=r"lazy modules(.|\n)*\(1\)(.|\n)*one forward"):
        dptrain.fix(model)
    model(torch.randn(2, 3, 5, 5))
    assert isinstance(dptrain.fix(model)[1], nn.GroupNorm)


def test_fix_keeps_a_frozen_batchnorm_frozen():
    """fix() copied the affine values but made a frozen BatchNorm's replacement trainable."""
    bn = nn.BatchNorm1d(4)
    bn.requires_grad_(False)
    fixed = dptrain.fix(nn.Sequential(nn.Linear(3, 4), bn))
    assert not fixed[1].weight.requires_grad and not fixed[1].bias.requires_grad
    assert fixed[0].weight.requires_grad
