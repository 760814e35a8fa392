"""The compiled Philox4x32-10 + Box–Muller CPU sampler: known-answer blocks, the documented mapping
from blocks to normals, N(0, 1), the same numbers on any thread count, no block used twice,
resumable, every bit of the seed counts, usable after a fork."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from mechanisms import philox_normals
from mechanisms.philox_normals import KIND, PIECE, PhiloxNormals, philox4x32_10, stream_words
from mechanisms.rng import DeviceGenerators, source_from_state

pytestmark = pytest.mark.skipif(not philox_normals.available(), reason="the Philox kernel is not built")

M0, M1, W0, W1, MASK = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85, 0xFFFFFFFF
LANES = 32


def _threads(n: int):
    class _Set:
        def __enter__(self):
            self.before = torch.get_num_threads()
            torch.set_num_threads(n)

        def __exit__(self, *exc):
            torch.set_num_threads(self.before)
    return _Set()


# Random123's kat_vectors for philox4x32 with 10 rounds: counter[4], key[2] -> output[4]
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((MASK,) * 4, (MASK, MASK), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,want", KAT)
def test_known_answers(counter, key, want):
    assert philox4x32_10(counter, key) == want


def _reference_block_words(blocks: np.ndarray, stream: int, key: int) -> np.ndarray:
    """Philox4x32-10 of counters (b lo, b hi, stream lo, stream hi), in numpy uint64 arithmetic."""
    c = [blocks & MASK, blocks >> np.uint64(32), np.full_like(blocks, stream & MASK),
         np.full_like(blocks, stream >> 32)]
    k0, k1 = key & MASK, key >> 32
    for _ in range(10):
        p0, p1 = np.uint64(M0) * c[0], np.uint64(M1) * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ np.uint64(k0), p1 & np.uint64(MASK),
             (p0 >> np.uint64(32)) ^ c[3] ^ np.uint64(k1), p0 & np.uint64(MASK)]
        k0, k1 = (k0 + W0) & MASK, (k1 + W1) & MASK
    return np.stack(c)  # [4, blocks]


def _reference_normals(n: int, first_block: int, stream: int, key: int) -> np.ndarray:
    """The mapping of mechanisms/_philox.c's header: group g of LANES blocks gives
    out[g·4L + k·L + l] = normal k of block first + g·L + l. The uniforms are rounded to float32
    as the kernel rounds them; the transform is in float64."""
    groups = -(-n // (4 * LANES))
    blocks = np.uint64(first_block) + np.arange(groups * LANES, dtype=np.uint64)
    w = _reference_block_words(blocks, stream, key)

    def uniform(words: np.ndarray, shift: int, bits: int, offset: float) -> np.ndarray:
        return ((words >> np.uint64(shift)).astype(np.float32) * np.float32(2.0 ** -bits)
                + np.float32(offset)).astype(np.float64)
    u1, u2 = uniform(w[0], 1, 31, 2.0 ** -32), uniform(w[2], 1, 31, 2.0 ** -32)
    v1, v2 = uniform(w[1], 8, 24, 0.0), uniform(w[3], 8, 24, 0.0)
    r1, r2 = np.sqrt(-2 * np.log(u1)), np.sqrt(-2 * np.log(u2))
    z = np.stack([r1 * np.cos(2 * np.pi * v1), r1 * np.sin(2 * np.pi * v1),
                  r2 * np.cos(2 * np.pi * v2), r2 * np.sin(2 * np.pi * v2)])  # [4, groups·L]
    return z.reshape(4, groups, LANES).transpose(1, 0, 2).reshape(-1)[:n]


def test_fill_follows_the_documented_mapping():
    # two pieces (so the second starts PIECE/4 blocks on) and a tensor that ends mid-group;
    # float32 vector math against float64: a few ulps of |z| ≤ 6.7
    key, stream = 0x0123456789ABCDEF, 0xFEDCBA9876543210
    src = PhiloxNormals(key, stream, next_block=(1 << 32) - 7)  # the block counter crosses 2^32
    x, y = torch.empty(PIECE + 100), torch.empty(37)
    src.normal_([x, y])
    base = (1 << 32) - 7
    want_x = np.concatenate([_reference_normals(PIECE, base, stream, key),
                             _reference_normals(100, base + PIECE // 4, stream, key)])
    want_y = _reference_normals(37, base + 2 * (PIECE // 4), stream, key)
    np.testing.assert_allclose(x.numpy(), want_x, rtol=0, atol=5e-6)
    np.testing.assert_allclose(y.numpy(), want_y, rtol=0, atol=5e-6)
    assert src.next_block == base + 3 * (PIECE // 4)


def test_draws_are_standard_normal_with_tails_to_6_66_sigma():
    # 2^22 draws: KS against N(0, 1) and χ² of Σz² (each two-sided at 1e-8), the fourth moment
    # (3 ± 6 standard errors), and |z| ≤ sqrt(2·32·ln 2) = 6.66 (u ≥ 2^-32)
    z = PhiloxNormals.from_seed(2 ** 62 - 5).randn((1 << 22,), torch.float32, "cpu").double().numpy()
    n = z.size
    assert stats.kstest(z, "norm").pvalue > 1e-8
    chi = float((z ** 2).sum())
    assert stats.chi2.ppf(0.5e-8, n) < chi < stats.chi2.isf(0.5e-8, n)
    assert abs(float((z ** 4).mean()) - 3.0) < 6 * math.sqrt(96 / n)
    assert np.abs(z).max() <= math.sqrt(2 * 32 * math.log(2)) + 1e-5


def test_neighbouring_blocks_and_normals_are_uncorrelated():
    # lag-1 and lag-LANES correlations of 2^20 draws and between the four normals of a block:
    # each ~ N(0, 1/n) under independence, |r| < 6.5/sqrt(n) (false failure < 1e-9 each)
    z = PhiloxNormals.from_seed(9).randn((1 << 20,), torch.float32, "cpu").double().numpy()
    bound = 6.5 / math.sqrt(z.size)
    for lag in (1, LANES):
        assert abs(np.corrcoef(z[:-lag], z[lag:])[0, 1]) < bound
    per_block = z.reshape(-1, 4, LANES).transpose(1, 0, 2).reshape(4, -1)
    r = np.corrcoef(per_block)[~np.eye(4, dtype=bool)]
    assert np.abs(r).max() < 6.5 / math.sqrt(per_block.shape[1])


@pytest.mark.parametrize("threads", [2, 3, 8])
def test_same_numbers_whatever_the_thread_count(threads):
    shapes = [(3 * PIECE + 17,), (5, 7), (2 * PIECE,), (1,)]

    def fill(n):
        out = [torch.empty(s) for s in shapes]
        with _threads(n):
            PhiloxNormals.from_seed(11).normal_(out)
        return out
    for a, b in zip(fill(1), fill(threads)):
        assert torch.equal(a, b)


def test_consecutive_fills_use_fresh_blocks_and_the_state_resumes():
    src = PhiloxNormals.from_seed(4)
    a = src.randn((1000,), torch.float32, "cpu")
    state = src.state_dict()
    b = src.randn((1000,), torch.float32, "cpu")
    assert not torch.equal(a, b)
    again = source_from_state(state, "cpu")
    assert isinstance(again, PhiloxNormals) and state["kind"] == KIND
    assert torch.equal(again.randn((1000,), torch.float32, "cpu"), b)


def test_every_bit_of_the_seed_counts_and_devices_differ():
    base = stream_words(5, "cpu")
    for high in (1 << 32, 1 << 40, 1 << 61):
        assert stream_words(5 + high, "cpu") != base
    assert stream_words(5, "cpu:1") != base
    a = PhiloxNormals.from_seed(5).randn((100,), torch.float32, "cpu")
    assert not torch.equal(a, PhiloxNormals.from_seed(5 + (1 << 40)).randn((100,), torch.float32, "cpu"))


def test_other_dtypes_get_the_float32_draws_rounded():
    for dtype in (torch.float64, torch.bfloat16):
        got = PhiloxNormals.from_seed(6).randn((3, 50), dtype, "cpu")
        want = PhiloxNormals.from_seed(6).randn((3, 50), torch.float32, "cpu").to(dtype)
        assert got.dtype == dtype and torch.equal(got, want)


def test_cpu_default_source_and_checkpoint_round_trip():
    gens = DeviceGenerators(21)
    assert isinstance(gens.streams("cpu"), PhiloxNormals)
    gens.randn_like([torch.empty(10)])
    state = gens.state_dict()
    expected = gens.randn_like([torch.empty(70_000), torch.empty(3, dtype=torch.float64)])
    other = DeviceGenerators(1)
    other.load_state_dict(21, state)
    for x, y in zip(other.randn_like([torch.empty(70_000), torch.empty(3, dtype=torch.float64)]), expected):
        assert torch.equal(x, y)


def test_bad_input_is_refused():
    src = PhiloxNormals.from_seed(0)
    with pytest.raises(ValueError, match="contiguous"):
        src.normal_([torch.empty(8, 6).t()])
    with pytest.raises(ValueError, match="not a philox"):
        src.load_state_dict([torch.zeros(3)])
    with pytest.raises(ValueError, match="multiple of 4"):  # a piece must hold whole groups of blocks
        philox_normals._philox.normal_axpy_jobs(0, 0, 0, 1, PIECE + 4)


def test_a_job_cut_into_pieces_by_the_kernel_equals_the_job_drawn_whole():
    # the kernel's pieces (offset s: out + s, block + s/4, scale row (col0 + s + i) / row_len) give the numbers
    # of the uncut job: row-scaled, with a source, a row straddling pieces and an offset col0
    from array import array
    n, dim, col0 = 3 * PIECE + 77, 96, 5
    src_t = torch.randn(n)
    scales = torch.rand(n // dim + 2) + 0.5
    outs = [torch.empty(n), torch.empty(n)]
    for out, piece in zip(outs, (0, PIECE)):
        q = array("Q", (out.data_ptr(), src_t.data_ptr(), scales.data_ptr(), col0, dim, n, (1 << 32) - 3, 7, 11))
        f = array("d", (0.5, 2.0))
        philox_normals._philox.normal_axpy_jobs(q.buffer_info()[0], f.buffer_info()[0], 1, 2, piece)
    assert torch.equal(outs[0], outs[1])
    z = (outs[0] - 0.5 * src_t) / scales[(torch.arange(n) + col0) // dim]  # a row scale replaces the scalar one
    assert 0.9 < float(z.std()) < 1.1


def test_fills_a_leaf_that_requires_grad_and_under_inference_mode_on_every_thread():
    with _threads(2):
        w = torch.zeros(4 * PIECE, requires_grad=True)
        PhiloxNormals.from_seed(2).normal_([w])
        with torch.inference_mode():
            z = torch.empty(4 * PIECE)
            PhiloxNormals.from_seed(3).normal_([z])
    assert bool((w != 0).all()) and w.requires_grad and bool((z != 0).all())


def test_fused_noised_and_row_scaled_add_use_the_normals_normal_would_draw():
    # the fused passes consume the same pieces as normal_ and combine in float32 (one rounding + fma)
    shapes = [(3, PIECE // 2 + 5), (7,)]
    sums = [torch.randn(s) for s in shapes]
    z = [torch.empty(s) for s in shapes]
    PhiloxNormals.from_seed(12).normal_(z)
    got = PhiloxNormals.from_seed(12).noised(sums, 0.7, 0.25)
    for g, s, zz in zip(got, sums, z):
        torch.testing.assert_close(g, 0.25 * s + 0.7 * zz, rtol=1e-6, atol=1e-6)
    table = torch.randn(2 * PIECE // 64 + 3, 64)  # pieces start mid-table; rows cross no piece here
    scales = torch.rand(table.shape[0], dtype=torch.float64)
    zt = torch.empty(table.shape)
    PhiloxNormals.from_seed(13).normal_([zt])
    want = table + scales.float().unsqueeze(1) * zt
    PhiloxNormals.from_seed(13).add_row_scaled_(table, scales)
    torch.testing.assert_close(table, want, rtol=1e-6, atol=1e-6)


def test_row_scaled_add_with_rows_that_straddle_pieces():
    # dim 96 does not divide PIECE: some rows lie in two pieces; each element gets its own row's scale
    table = torch.zeros(2 * PIECE // 96 + 5, 96)
    scales = torch.arange(table.shape[0], dtype=torch.float32) + 1
    zt = torch.empty(table.shape)
    PhiloxNormals.from_seed(14).normal_([zt])
    PhiloxNormals.from_seed(14).add_row_scaled_(table, scales)
    torch.testing.assert_close(table, scales.unsqueeze(1) * zt, rtol=1e-6, atol=1e-6)


def test_a_philox_checkpoint_without_the_kernel_is_refused_with_the_fix(monkeypatch):
    state = {"cpu": PhiloxNormals.from_seed(1).state_dict()}
    monkeypatch.setattr(philox_normals, "_philox", None)
    with pytest.raises(RuntimeError, match="C compiler"):
        DeviceGenerators(0).load_state_dict(1, state)


def test_fills_from_several_threads_get_disjoint_blocks_and_copies_carry_the_position():
    import copy
    import pickle
    from concurrent.futures import ThreadPoolExecutor

    src = PhiloxNormals.from_seed(15)
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda _: src.randn((PIECE,), torch.float32, "cpu"), range(8)))
    assert src.next_block == 8 * (PIECE // 4)
    firsts = {float(o[0]) for o in outs}
    assert len(firsts) == 8  # no two fills drew the same blocks
    for clone in (copy.deepcopy(src), pickle.loads(pickle.dumps(src))):
        assert torch.equal(clone.randn((10,), torch.float32, "cpu"), copy.deepcopy(src).randn((10,), torch.float32, "cpu"))


def test_in_place_noised_gives_the_same_numbers():
    sums = [torch.randn(3, PIECE // 2 + 5), torch.randn(7, dtype=torch.float64)]
    want = PhiloxNormals.from_seed(16).noised(sums, 0.7, 0.25)
    got = [s.clone() for s in sums]
    ptrs = [g.data_ptr() for g in got]
    PhiloxNormals.from_seed(16).noised_(got, 0.7, 0.25)
    assert [g.data_ptr() for g in got] == ptrs
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_loading_the_kernel_leaves_denormals_alone():
    # a shared object linked with -ffast-math would switch flush-to-zero on for the whole process
    tiny = np.float32(1e-40)
    assert tiny * np.float32(1.0) != 0 and float(torch.tensor([1e-40]) * 1.0) != 0


def test_an_empty_table_gets_nothing_and_uses_no_blocks():
    src = PhiloxNormals.from_seed(3)
    for table in (torch.zeros(5, 0), torch.zeros(0, 4)):
        src.add_row_scaled_(table, torch.ones(table.shape[0]))
    src.normal_([torch.empty(0)])
    assert src.next_block == 0
