"""The per-step state guard: a forward over private data must leave the model's buffers and parameters alone."""
from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import dptrain
from dptrain.errors import UnsupportedModuleError

_spec = importlib.util.spec_from_file_location("dp_test_models", pathlib.Path(__file__).with_name("models.py"))
models = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(models)  # type: ignore[union-attr]
BufferNet = models.BufferNet  # a registered buffer that forward only reads, and a frozen parameter


def _data(n=120, d=5, seed=0, outlier=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    if outlier is not None:
        x[17] = outlier
    return TensorDataset(x, (x[:, 0] > 0).long())


class _Observer(nn.Module):
    """Keeps the largest |x| seen in training (as a quantisation observer does): in place, or by assignment
    in every mode."""

    def __init__(self, assign: bool = False) -> None:
        super().__init__()
        self.assign = assign
        self.register_buffer("max_abs", torch.zeros(()))

    def forward(self, x):
        if self.assign:
            self.max_abs = torch.maximum(self.max_abs, x.detach().abs().amax())
        elif self.training:
            with torch.no_grad():
                self.max_abs.copy_(torch.maximum(self.max_abs, x.abs().amax()))
        return x


class _Seq(nn.Module):
    """[B, 5] → a GRU over 5 steps of width 1 (so the loop engine is chosen) or a Linear."""

    def __init__(self, rnn: bool) -> None:
        super().__init__()
        self.rnn = nn.GRU(1, 4, batch_first=True) if rnn else None
        self.fc = nn.Linear(4 if rnn else 5, 2)

    def forward(self, x):
        if self.rnn is not None:
            return self.fc(self.rnn(x.unsqueeze(-1))[0][:, -1])
        return self.fc(x)


def _attached(model, engine="auto", clipping="flat", data=None):
    priv = dptrain.make_private(model, eps=1.0, seed=0, engine=engine, clipping=clipping)
    priv.attach(_data() if data is None else data, batch_size=24, epochs=1,
                optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    return priv


@pytest.mark.parametrize("engine, rnn, clipping", [("auto", False, "flat"), ("auto", True, "flat"),
                                                   ("loop", False, "flat"), ("vmap", False, "flat"),
                                                   ("auto", False, "quantile")])
def test_a_buffer_updated_in_forward_is_refused_at_the_step_and_restored(engine, rnn, clipping):
    """An observer's max |x| would have been released in state_dict un-noised (1234.5, the outlier record)."""
    torch.manual_seed(0)
    model = nn.Sequential(_Observer(), _Seq(rnn))
    priv = dptrain.make_private(model, eps=1.0, seed=0, engine=engine, clipping=clipping)
    with pytest.raises(UnsupportedModuleError) as info:  # at attach (the probe's training-mode check, engine
        priv.attach(_data(outlier=1234.5), batch_size=24, epochs=1,  # "auto") or at the first step
                    optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
        for x, y in priv.loader:
            priv.step(x, y)
    if engine != "vmap":  # torch.func refuses the in-place update of a captured tensor itself
        assert "module '0' (_Observer): buffer 'max_abs'" in str(info.value)
        assert "dptrain.fix(model)" in str(info.value)
    assert model.state_dict()["0.max_abs"].item() == 0.0
    assert priv.steps == 0


def test_a_buffer_reassigned_in_forward_is_refused_at_attach_and_restored():
    torch.manual_seed(0)
    model = nn.Sequential(_Observer(assign=True), nn.Linear(5, 2))
    buffer = model[0].max_abs
    priv = dptrain.make_private(model, eps=1.0, seed=0)
    with pytest.raises(UnsupportedModuleError, match="buffer 'max_abs' was reassigned"):
        priv.attach(_data(outlier=1234.5), batch_size=24, epochs=1)
    assert model[0].max_abs is buffer and buffer.item() == 0.0
    assert priv.plan is None  # the attach was undone


class _NewBuffer(nn.Module):
    def forward(self, x):
        if self.training and not hasattr(self, "seen"):
            self.register_buffer("seen", x.detach().mean(0))
        return x


@pytest.mark.parametrize("engine", ["auto", "vmap"])
def test_a_buffer_registered_in_forward_is_refused_and_removed(engine):
    model = nn.Sequential(_NewBuffer(), nn.Linear(5, 2))
    priv = dptrain.make_private(model, eps=1.0, seed=0, engine=engine)
    with pytest.raises(UnsupportedModuleError, match="buffer 'seen' was registered"):  # attach ("auto": the
        priv.attach(_data(), batch_size=24, epochs=1)  # probe's training-mode check) or the first step
        priv.step(*next(iter(priv.loader)))
    assert "0.seen" not in model.state_dict()


class _Clamp(nn.Module):
    """Clamps its weight in place in training forwards (data-dependently: only when the input is large)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        if self.training and bool(x.abs().max() > 100):
            with torch.no_grad():
                self.fc.weight.clamp_(-0.01, 0.01)
        return self.fc(x)


@pytest.mark.parametrize("engine", ["auto", "loop"])
def test_a_parameter_written_in_forward_is_refused(engine):
    model = _Clamp()
    priv = _attached(model, engine, data=_data(outlier=1234.5))
    with pytest.raises(UnsupportedModuleError, match=r"module 'fc' \(Linear\): parameter 'weight' was changed in "
                                                     r"place(.|\n)*could not be undone"):
        for x, y in priv.loader:
            priv.step(x, y)


def test_a_model_whose_buffers_only_are_read_trains_and_copies_them_once():
    torch.manual_seed(0)
    model = BufferNet()
    priv = _attached(model)
    before = {k: v.clone() for k, v in model.state_dict().items() if k == "scale"}
    copies = []
    for x, y in priv.loader:
        priv.step(x, y)
        copies.append({k: id(c) for k, (_, _, c) in priv._saved_buffers.items()})
    assert priv.steps > 1 and all(c == copies[0] for c in copies)  # no copy after the first
    assert torch.equal(model.scale, before["scale"])


class _Lookup(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.e, self.g, self.h = nn.Embedding(50, 8), nn.GRU(8, 8, batch_first=True), nn.Linear(8, 2)
        with torch.no_grad():
            self.e.weight.mul_(10)  # rows of norm ≈ 28

    def forward(self, x):
        return self.h(self.g(self.e(x))[0][:, -1])


def test_an_embedding_given_max_norm_after_attach_is_refused_at_the_step_on_the_loop_engine():
    """validate refuses max_norm; set after attach, the loop engine's forward renormalised the rows the batch
    looked up, in the weight that is released."""
    torch.manual_seed(0)
    model = _Lookup()
    x = torch.randint(0, 25, (120, 3))
    priv = _attached(model, data=TensorDataset(x, (x[:, 0] > 12).long()))
    model.e.max_norm = 1.0
    with pytest.raises(UnsupportedModuleError, match=r"module 'e' \(Embedding\): parameter 'weight' was changed"):
        priv.step(*next(iter(priv.loader)))
    assert priv.steps == 0


class _InferenceBuffer(nn.Module):
    """A constant buffer made under torch.inference_mode() (it has no version counter)."""

    def __init__(self) -> None:
        super().__init__()
        with torch.inference_mode():
            self.register_buffer("scale", torch.full((5,), 0.5))
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        return self.fc(x * self.scale)


def test_a_buffer_made_in_inference_mode_is_read_without_a_version_counter():
    """Reading its _version raised 'Inference tensors do not track version counter' at every attach."""
    model = _InferenceBuffer()
    priv = _attached(model)
    priv.step(*next(iter(priv.loader)))
    assert priv.steps == 1


class _CachedMask(nn.Module):
    """Builds a constant on first use inside forward (as lazily cached causal masks are)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 2)
        self.register_buffer("mask", None)

    def forward(self, x):
        if self.mask is None:
            self.mask = torch.ones(5)
        return self.fc(x * self.mask)


def test_a_constant_cached_on_first_use_is_refused_with_the_workaround():
    model = _CachedMask()
    priv = dptrain.make_private(model, eps=1.0, seed=0)
    with pytest.raises(UnsupportedModuleError, match="run the model once on a dummy batch before make_private"):
        priv.attach(_data(), batch_size=24, epochs=1)
    model(torch.zeros(2, 5))  # the workaround: the cache exists before the private passes
    priv = _attached(model)
    priv.step(*next(iter(priv.loader)))


class _DataEma(nn.Module):
    """A running average kept through .data (a VQ-VAE codebook's idiom): no version change."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("ema", torch.zeros(5))
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        if self.training:
            self.ema.data.mul_(0.9).add_(0.1 * x.detach().mean(0))
        return self.fc(x)


@pytest.mark.parametrize("engine", ["auto", "vmap"])
def test_a_buffer_written_through_data_is_refused_and_put_back(engine):
    """A write through .data moves no version counter: training ran and the buffer kept a statistic of the
    private data. The attach probe and the first step after an attach compare the buffers' values too."""
    model = _DataEma()
    priv = dptrain.make_private(model, eps=1.0, seed=0, engine=engine)
    # (vmap: torch.func refuses the write itself)
    with pytest.raises(UnsupportedModuleError, match=r"buffer 'ema' was changed through \.data|forward wrote in place"):
        priv.attach(_data(), batch_size=24, epochs=1)
        priv.step(*next(iter(priv.loader)))
    assert float(model.ema.abs().max()) == 0.0


def test_buffers_changed_by_the_user_between_steps_are_not_taken_for_a_write():
    model = BufferNet()
    priv = _attached(model)
    priv.step(*next(iter(priv.loader)))
    model.scale.data.mul_(2)  # outside the private passes: the user's change
    priv.step(*next(iter(priv.loader)))
    priv.attach(_data(), batch_size=24, epochs=1, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    model.scale.data.mul_(2)
    priv.step(*next(iter(priv.loader)))  # the first step after an attach compares values with fresh copies
    assert priv.steps == 3


def test_the_state_guard_sees_each_kind_of_change_also_beside_an_inference_buffer():
    """The guard's check compares (module, kind, name, tensor, version) lists: a parameter or buffer swapped for
    another tensor, a buffer moved to the parameters, and an in-place write are each refused (and undone where
    possible), with or without a buffer made under inference mode (no version counter) in the model."""
    from dptrain.run_guards import StateGuard

    def model(inference_buffer):
        m = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
        m[1].register_buffer("stat", torch.zeros(2))
        if inference_buffer:
            with torch.inference_mode():
                m[0].register_buffer("table", torch.ones(2))
        return m

    def swap_weight(m):
        m[0].weight = nn.Parameter(m[0].weight.detach().clone())

    def swap_buffer(m):
        m[1].stat = torch.zeros(2)

    def buffer_to_parameter(m):
        t = m[1]._buffers.pop("stat")
        m[1]._parameters["stat"] = t

    def write_in_place(m):
        m[1].stat.add_(1.0)

    for inference_buffer in (False, True):
        for change in (swap_weight, swap_buffer, buffer_to_parameter, write_in_place):
            m = model(inference_buffer)
            weight, stat = m[0].weight, m[1].stat
            guard = StateGuard(m, "step")
            guard.check()  # nothing changed yet
            change(m)
            with pytest.raises(UnsupportedModuleError):
                guard.check()
            assert m[0].weight is weight and m[1]._buffers.get("stat") is stat and float(stat.abs().sum()) == 0.0
