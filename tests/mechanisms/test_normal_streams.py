"""torch's generators as parallel CPU noise streams (the CPU's source where the Philox kernel is not
built): N(0, 1), independent streams, the same numbers on any number of threads, resumable, every
bit of the seed counts, usable after a fork."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from scipy import stats

from mechanisms.normal_streams import PIECE, STREAMS, NormalStreams, pieces_by_stream
from mechanisms.rng import DeviceGenerators, cpu_generator, cpu_torch_streams

SHAPES = [(3 * PIECE + 17,), (5, 7), (2 * PIECE,), (1,)]


def _fill(streams: NormalStreams, threads: int) -> list[torch.Tensor]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = [torch.empty(s) for s in SHAPES]
        streams.normal_(out)
        return out
    finally:
        torch.set_num_threads(before)


def test_cpu_device_has_all_streams():
    assert len(cpu_torch_streams(1).generators) == STREAMS


@pytest.mark.parametrize("threads", [2, 3, STREAMS])
def test_same_numbers_whatever_the_thread_count(threads):
    one = _fill(cpu_torch_streams(11), 1)
    many = _fill(cpu_torch_streams(11), threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


def test_piece_j_comes_from_stream_j_mod_streams_in_order():
    # the documented rule, rebuilt with plain generators of the same seed
    got = _fill(cpu_torch_streams(5), 2)
    gens = [cpu_generator(5, "cpu", k) for k in range(STREAMS)]
    want = [torch.empty(s) for s in SHAPES]
    for k, pieces in enumerate(pieces_by_stream(want, STREAMS, PIECE)):
        for p in pieces:
            p.normal_(generator=gens[k])
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_draws_are_standard_normal_and_streams_uncorrelated():
    # KS and χ² of the variance over 8 pieces of 65536 (false failure < 2e-8), and every pair of
    # streams' first pieces: |r| < 6.5/sqrt(n) (each pair ~ N(0, 1/n): 28 pairs × 8e-11)
    z = torch.empty(STREAMS * PIECE)
    cpu_torch_streams(2 ** 62 - 3).normal_([z])
    x = z.double().numpy()
    assert stats.kstest(x, "norm").pvalue > 1e-8
    chi = float((x ** 2).sum())
    assert stats.chi2.ppf(0.5e-8, x.size) < chi < stats.chi2.isf(0.5e-8, x.size)
    per_stream = x.reshape(STREAMS, PIECE)
    r = np.corrcoef(per_stream)
    off = r[~np.eye(STREAMS, dtype=bool)]
    assert np.abs(off).max() < 6.5 / np.sqrt(PIECE)


def test_child_streams_use_every_bit_of_the_seed():
    for k in (1, STREAMS - 1):
        a = torch.randn(100, generator=cpu_generator(5, "cpu", k))
        b = torch.randn(100, generator=cpu_generator(5 + (1 << 40), "cpu", k))
        c = torch.randn(100, generator=cpu_generator(5, "cpu", 0))
        assert not torch.equal(a, b) and not torch.equal(a, c)


def test_state_resumes_every_stream():
    a = cpu_torch_streams(3)
    _fill(a, 2)
    state = {"cpu": a.state_dict()}  # as DeviceGenerators saves it where the Philox kernel is not built
    expected = _fill(a, 2)
    b = DeviceGenerators(999)
    b.load_state_dict(3, state)
    assert isinstance(b.streams("cpu"), NormalStreams)
    for x, y in zip(_fill(b.streams("cpu"), 2), expected):
        assert torch.equal(x, y)


def test_older_single_state_checkpoint_resumes_stream_0_and_repeats_no_other_stream():
    a = cpu_torch_streams(3)
    b = DeviceGenerators()
    b.load_state_dict(3, {"cpu": a.generator.get_state()})
    assert torch.equal(torch.randn(50, generator=b.streams("cpu").generator), torch.randn(50, generator=a.generator))
    za, zb = torch.empty(2 * PIECE), torch.empty(2 * PIECE)
    a.normal_([za])
    b.streams("cpu").normal_([zb])
    assert not torch.equal(za[PIECE:], zb[PIECE:])  # stream 1 is fresh, not the seed's


def test_fills_a_leaf_that_requires_grad_on_every_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        w = torch.zeros(4 * PIECE, requires_grad=True)
        cpu_torch_streams(2).normal_([w])  # pieces on the worker threads too
    finally:
        torch.set_num_threads(before)
    assert bool((w != 0).all()) and w.requires_grad


def test_fills_under_inference_mode_on_every_thread():
    # e.g. a lazy table flushed by an evaluation forward run under torch.inference_mode()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            z = torch.empty(4 * PIECE)  # an inference tensor: only inference-mode threads may write it
            cpu_torch_streams(3).normal_([z])
    finally:
        torch.set_num_threads(before)
    assert bool((z != 0).all())


def test_non_contiguous_tensor_is_refused():
    with pytest.raises(ValueError, match="contiguous"):
        cpu_torch_streams(0).normal_([torch.empty(8, 6).t()])


def test_single_generator_streams_fill_like_the_generator():
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    z = NormalStreams([g1]).randn((3, PIECE), torch.float32, "cpu")
    assert torch.equal(z, torch.randn((3, PIECE), generator=g2))


def test_fused_helpers_use_the_normals_normal_would_draw():
    sums = [torch.randn(3, 5), torch.randn(PIECE + 1)]
    z = [torch.empty(s.shape) for s in sums]
    cpu_torch_streams(12).normal_(z)
    for g, s, zz in zip(cpu_torch_streams(12).noised(sums, 0.7, 0.25), sums, z):
        torch.testing.assert_close(g, 0.25 * s + 0.7 * zz)
    table, scales = torch.randn(PIECE // 16, 32), torch.rand(PIECE // 16)
    zt = torch.empty(table.shape)
    cpu_torch_streams(13).normal_([zt])
    want = table + scales.unsqueeze(1) * zt
    cpu_torch_streams(13).add_row_scaled_(table, scales)
    torch.testing.assert_close(table, want)


def test_in_place_noised_matches_noised():
    sums = [torch.randn(3, 5), torch.randn(PIECE + 1)]
    want = cpu_torch_streams(21).noised(sums, 0.7, 0.25)
    got = [s.clone() for s in sums]
    cpu_torch_streams(21).noised_(got, 0.7, 0.25)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
