"""Noise generators: every bit of the seed counts, streams reproduce and resume, draws are N(0, 1)
(the CPU's default source: Philox where the kernel is built, else torch's streams)."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
from scipy import stats

from mechanisms.rng import DeviceGenerators, _mt_layout_ok


def _draw(gens: DeviceGenerators, n: int = 1000) -> torch.Tensor:
    return gens.streams("cpu").randn((n,), torch.float32, "cpu")


def test_this_torch_has_the_expected_cpu_state_layout():
    assert _mt_layout_ok()  # else generators fall back to manual_seed (32 bits) with a warning


def test_seeds_differing_above_bit_32_give_different_noise():
    # torch's manual_seed on the CPU keeps 32 bits: these seeds would give the same stream there
    for high in (1 << 32, 1 << 40, 1 << 61):
        assert not torch.equal(_draw(DeviceGenerators(5)), _draw(DeviceGenerators(5 + high)))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5 + (1 << 40))
    assert torch.equal(torch.randn(10, generator=g1), torch.randn(10, generator=g2))  # the weakness avoided


def test_same_seed_reproduces_and_state_resumes():
    a, b = DeviceGenerators(123), DeviceGenerators(123)
    assert torch.equal(_draw(a), _draw(b))
    state = a.state_dict()
    expected = _draw(a)
    c = DeviceGenerators(999)
    c.load_state_dict(123, state)
    assert torch.equal(_draw(c), expected)


def test_entropy_seeded_generators_differ():
    assert not torch.equal(_draw(DeviceGenerators()), _draw(DeviceGenerators()))


def test_draws_are_standard_normal():
    # KS against N(0, 1) and a chi-square test of the variance, 200k draws per seed, 3 seeds:
    # false-failure probability 6 · 1e-8 < 1e-6
    for seed in (0, 1 << 33, 2 ** 62 - 1):
        z = _draw(DeviceGenerators(seed), 200_000).double()
        assert stats.kstest(z.numpy(), "norm").pvalue > 1e-8
        n = z.numel()
        chi = float((z ** 2).sum())
        assert stats.chi2.ppf(0.5e-8, n) < chi < stats.chi2.isf(0.5e-8, n)


def test_without_the_compiled_kernel_cpu_noise_comes_from_torch_streams(monkeypatch):
    from mechanisms import philox_normals
    from mechanisms.normal_streams import NormalStreams

    monkeypatch.setattr(philox_normals, "_philox", None)
    assert not philox_normals.available()
    assert isinstance(DeviceGenerators(1).streams("cpu"), NormalStreams)
    z = _draw(DeviceGenerators(1), 10_000).double()
    assert abs(float(z.mean())) < 0.06 and abs(float(z.std()) - 1) < 0.05  # 6 standard errors


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("source", ["default", "torch"])
def test_parallel_fill_works_in_a_forked_child(source):
    # the parent's worker threads (torch's OpenMP pool for Philox, the noise pool for torch's
    # streams) are not copied into a child; a fill there must still finish
    from mechanisms.normal_streams import PIECE
    from mechanisms.rng import cpu_torch_streams

    def fill() -> torch.Tensor:
        src = DeviceGenerators(8).streams("cpu") if source == "default" else cpu_torch_streams(8)
        return src.randn((4 * PIECE,), torch.float32, "cpu")

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fill()  # the parent's workers exist now
        pid = os.fork()
        if pid == 0:
            try:
                os._exit(0 if np.isfinite(fill().numpy()).all() else 1)  # no other OpenMP op in the child
            except BaseException:  # noqa: BLE001
                os._exit(2)
    finally:
        torch.set_num_threads(before)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("a parallel fill in a forked child did not finish in 60 s")


def test_derived_seeds_are_deterministic_distinct_and_62_bit():
    from mechanisms.rng import derived_seed

    seeds = [derived_seed(s, k) for s in (0, 1, 2 ** 63 + 5) for k in range(1, 4)]
    assert seeds == [derived_seed(s, k) for s in (0, 1, 2 ** 63 + 5) for k in range(1, 4)]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2 ** 62 for s in seeds)
    assert derived_seed(1, 1) not in (0, 1, 2)  # not a neighbouring seed


def cuda_generator_seed(monkeypatch, seed: int, key: str) -> int:
    """The seed ``DeviceGenerators(seed)`` gives CUDA device ``key``'s generator (a stand-in generator
    records it, so no GPU is needed)."""
    import mechanisms.rng as rng

    seen: list[int] = []

    class Recorder:
        def __init__(self, device=None) -> None:
            assert torch.device(device).type == "cuda"

        def manual_seed(self, s: int) -> "Recorder":
            seen.append(int(s))
            return self

    with monkeypatch.context() as m:
        m.setattr(rng.torch, "Generator", Recorder)
        rng.DeviceGenerators(seed).streams(key)
    assert len(seen) == 1
    return seen[0]


def test_cuda_generators_of_neighbouring_seeds_on_other_devices_differ(monkeypatch):
    """CUDA generators were seeded with seed + Σ ord(device name), and Σ ord("cuda:r") = Σ ord("cuda:0") + r:
    seed s on cuda:r drew the noise of seed s + r on cuda:0 (federated clients k and k + 1, whose seeds
    differed by 2, shared one noise stream on cuda:2 and cuda:0)."""
    seeds = {(s, r): cuda_generator_seed(monkeypatch, s, f"cuda:{r}") for s in range(1000, 1008) for r in range(4)}
    assert len(set(seeds.values())) == len(seeds)
    assert cuda_generator_seed(monkeypatch, 5, "cuda:19") != cuda_generator_seed(monkeypatch, 5, "cuda:28")  # same Σ ord
    for high in (1 << 32, 1 << 40, 1 << 61):  # every bit of the seed counts
        assert cuda_generator_seed(monkeypatch, 5, "cuda:0") != cuda_generator_seed(monkeypatch, 5 + high, "cuda:0")
    assert cuda_generator_seed(monkeypatch, 1000, "cuda:1") == cuda_generator_seed(monkeypatch, 1000, "cuda:1")
    assert all(0 <= v < 1 << 64 for v in seeds.values())
