"""CPU N(0, 1) noise from Philox4x32-10 and Box–Muller, about 3× faster than torch's CPU sampler.

torch's CPU ``normal_`` draws from one mt19937 stream (≈ 3.4 ns per float32 normal here, serial),
which made the noise a third of a small model's DP-SGD step and most of a lazy table's flush.
Philox4x32-10 (Salmon et al., SC'11) is a counter-based generator: block b of a stream is a keyed
bijection of the counter b, so any range of blocks can be drawn on its own, in vectorised lanes and
on any thread. The compiled kernel (``mechanisms/_philox.c``, ≈ 1.1 ns per normal on one core)
turns each block's four 32-bit words into four normals by Box–Muller; the exact mapping from
words to normals is in that file's header.

A stream is (key: 64 bits, stream words: 64 bits), both derived from (seed, device name) by
``SeedSequence``, plus ``next_block``, the first block not yet used. A fill cuts the tensors, in
order, into pieces of ``PIECE`` elements (the last of each tensor shorter); piece j starts at
block ``next_block + j·PIECE/4``, and ``next_block`` then moves past every piece. The numbers
therefore depend only on (seed, position, sizes), not on the number of threads that draw them;
pieces are drawn in parallel on up to ``torch.get_num_threads()`` OpenMP threads — torch's own
pool, so the draw runs on workers that are already awake instead of competing with them. The
vectorised logf / sinf / cosf may round differently on CPUs of different vector width, so one seed
reproduces its noise to the last bit only on the same kind of CPU.

The kernel is compiled with -ffast-math but linked without it, so loading it leaves the process's
floating-point mode (denormals) as it was.

Privacy assumption: Philox4x32-10's words are indistinguishable from independent uniform words
for the purpose at hand (it passes TestU01's BigCrush, and distinct counters never repeat within
the 2^64 blocks of a stream), so every coordinate is an independent N(0, 1) draw, with tails cut at
6.66σ (u ≥ 2^-32; torch's float32 sampler cuts at 5.77σ).
"""
from __future__ import annotations

import os
import threading
from array import array
from typing import Sequence

import numpy as np
import torch

from .normal_streams import normals_like

try:  # built by `pip install` when a C compiler is present (optional extension, see pyproject.toml)
    from . import _philox
except ImportError:  # pragma: no cover - exercised only on machines without the compiled kernel
    _philox = None

#: the state's format name (a checkpoint records it)
KIND = "philox4x32-10"
#: elements per piece (a multiple of the kernel's 4·LANES outputs per group of blocks)
PIECE = 1 << 16
#: the most threads one fill uses
MAX_THREADS = 8
#: set in a forked child: GNU OpenMP's thread pool does not survive fork (a parallel region there
#: waits for the parent's workers forever), so a child draws on its own thread
_in_forked_child = False


def _forked() -> None:
    global _in_forked_child
    _in_forked_child = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)


def _openmp_runtimes() -> int:
    """How many GNU OpenMP runtimes this process has loaded (Linux; 1 if it cannot tell). The kernel
    links ``libgomp.so.1``, which resolves to the copy torch already loaded unless torch's copy was
    renamed (some wheels bundle ``libgomp-<hash>.so.1``): then two thread pools would compete for
    the cores, so the kernel draws on one thread."""
    try:
        with open("/proc/self/maps") as f:
            return max(1, len({line.split()[-1] for line in f if "libgomp" in line}))
    except OSError:
        return 1


_SHARED_POOL = _philox is not None and _openmp_runtimes() == 1

_U64 = (1 << 64) - 1


def available() -> bool:
    """Whether the compiled kernel is installed (otherwise CPU noise uses torch's generators)."""
    return _philox is not None


def philox4x32_10(counter: Sequence[int], key: Sequence[int]) -> tuple[int, int, int, int]:
    """One Philox4x32-10 block: four 32-bit counter words and two key words → four output words."""
    _require()
    return _philox.philox4x32_10(*counter, *key)


def _require() -> None:
    if _philox is None:
        raise RuntimeError("mechanisms.philox_normals: the compiled Philox kernel (mechanisms/_philox.c) is not "
                           "installed; reinstall dptrain where a C compiler is available (pip install -e .)")


def _check(tensors: Sequence[torch.Tensor]) -> None:
    for t in tensors:
        if not t.is_cpu:
            raise ValueError(f"PhiloxNormals draws CPU noise; got a tensor on {t.device}")
        if not t.is_contiguous():
            raise ValueError(f"PhiloxNormals: tensors must be contiguous, got strides {t.stride()} for shape "
                             f"{tuple(t.shape)}; fill a contiguous buffer and copy it")


def stream_words(seed: int, device_key: str) -> tuple[int, int]:
    """(key, stream) of a device's stream: 128 bits from ``SeedSequence([seed, Σ ord(device)],
    spawn_key=(KIND's tag,))``, so every bit of the seed counts."""
    tag = int.from_bytes(b"phlx", "little")
    words = np.random.SeedSequence([int(seed) % (1 << 64), sum(map(ord, device_key))],
                                   spawn_key=(tag,)).generate_state(2, np.uint64)
    return int(words[0]), int(words[1])


class PhiloxNormals:
    """``normal_(tensors)`` fills CPU tensors with i.i.d. N(0, 1) draws from one Philox stream
    (see the module docstring); same interface as :class:`mechanisms.normal_streams.NormalStreams`."""

    #: ``add_row_scaled_`` adds Z as it draws it: no buffer
    BUFFERS_NOISE = False

    def __init__(self, key: int, stream: int, next_block: int = 0) -> None:
        _require()
        self.key, self.stream, self.next_block = int(key) & _U64, int(stream) & _U64, int(next_block)
        self._lock = threading.Lock()  # fills from several threads reserve disjoint blocks

    @classmethod
    def from_seed(cls, seed: int, device_key: str = "cpu") -> "PhiloxNormals":
        return cls(*stream_words(seed, device_key))

    def _jobs(self, outs: Sequence[torch.Tensor], srcs: Sequence[int] | None,
              row_scales: tuple[int, int] | None = None) -> tuple[array, int, int]:
        """The kernel's jobs for a fill of float32 ``outs``, one a tensor: (flat uint64 rows, 9 a job — out,
        src, scales, col0, row_len, n, first_block, stream, key; the number of jobs; the number of pieces).

        The kernel cuts every tensor into pieces of ``PIECE`` elements (the last shorter): piece j of the
        fill starts at block ``next_block + j·PIECE/4``, so a tensor starts at the block after its
        predecessor's last piece; ``next_block`` moves past them all. ``srcs``: per tensor the data pointer
        of the source the kernel adds (times alpha), or None (none); ``row_scales``: (address of float32
        scales, row length) — one scale a row of the single tensor."""
        q, stream, key, step, pieces = array("Q"), self.stream, self.key, PIECE // 4, 0
        scales, dim = (0, 1) if row_scales is None else row_scales
        with self._lock:
            block = self.next_block
            for i, t in enumerate(outs):
                n = t.numel()
                q.extend((t.data_ptr(), 0 if srcs is None else srcs[i], scales, 0, dim, n, block & _U64, stream,
                          key))
                k = -(-n // PIECE)
                block += k * step
                pieces += k
            self.next_block = block
        return q, len(outs), pieces

    def _run(self, q: array, jobs: int, pieces: int, alpha: float, scale: float) -> None:
        """The kernel on every job of :meth:`_jobs` (floats ``(alpha, scale)`` for all) in one call, cut into
        its ``PIECE``-element pieces, on up to ``torch.get_num_threads()`` OpenMP threads: torch's own pool,
        whose idle workers are spinning right after an operator; one thread a piece at most (a fill of a few
        thousand normals is over before a parallel region would start)."""
        if not jobs:
            return
        f = array("d", (float(alpha), float(scale))) * jobs
        threads = 1 if _in_forked_child or not _SHARED_POOL else max(1, min(torch.get_num_threads(), MAX_THREADS,
                                                                            pieces))
        _philox.normal_axpy_jobs(q.buffer_info()[0], f.buffer_info()[0], jobs, threads, PIECE)

    @torch.no_grad()
    def normal_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Fill every tensor (CPU, contiguous) in place with independent N(0, 1) draws."""
        _check(tensors)
        bufs = [t if t.dtype == torch.float32 else torch.empty(t.shape, dtype=torch.float32) for t in tensors]
        self._run(*self._jobs(bufs, None), 0.0, 1.0)
        for t, buf in zip(tensors, bufs):
            if buf is not t:
                t.copy_(buf)

    def noised(self, tensors: Sequence[torch.Tensor], noise_scale: float, scale: float = 1.0) -> list[torch.Tensor]:
        """New tensors ``scale·t + noise_scale·Z`` (Z the normals :meth:`normal_` would draw), in one
        pass over each tensor; float32 tensors only take the fused path."""
        _check(tensors)
        outs = [torch.empty(t.shape, dtype=t.dtype) for t in tensors]
        self._noised_into(outs, tensors, noise_scale, scale)
        return outs

    def noised_(self, tensors: Sequence[torch.Tensor], noise_scale: float, scale: float = 1.0) -> None:
        """:meth:`noised` in place: ``t ← scale·t + noise_scale·Z``, the same numbers, no new buffer."""
        _check(tensors)
        self._noised_into(tensors, tensors, noise_scale, scale)

    def _noised_into(self, outs: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor], noise_scale: float,
                     scale: float) -> None:
        if any(t.dtype != torch.float32 for t in srcs):
            with torch.no_grad():
                for o, z, t in zip(outs, normals_like(self, srcs), srcs):
                    o.copy_(z.mul_(noise_scale).add_(t, alpha=scale))
            return
        # float32: the kernel writes through the data pointers (no autograd)
        self._run(*self._jobs(outs, [t.data_ptr() for t in srcs]), scale, noise_scale)

    @torch.no_grad()
    def add_row_scaled_(self, table: torch.Tensor, row_scales: torch.Tensor) -> None:
        """``table[r] += row_scales[r]·Z[r]`` in place for a 2-D table (Z the normals :meth:`normal_`
        would draw for it), in one pass and with no buffer for Z when the table is float32."""
        _check([table])
        if table.dim() != 2 or row_scales.shape != table.shape[:1]:
            raise ValueError(f"add_row_scaled_: need a [rows, dim] table and [rows] scales, got "
                             f"{tuple(table.shape)} and {tuple(row_scales.shape)}")
        if table.dtype != torch.float32:
            z = torch.empty(table.shape, dtype=table.dtype)
            self.normal_([z])
            table.addcmul_(z, row_scales.to(table.dtype).unsqueeze(1))
            return
        if table.numel() == 0:  # nothing to draw (the kernel takes rows of at least one element)
            return
        scales = row_scales.to(torch.float32).contiguous()
        dim, base = table.shape[1], scales.data_ptr()
        self._run(*self._jobs([table], [table.data_ptr()], row_scales=(base, dim)), 1.0, 1.0)

    def randn(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """A new ``shape`` tensor of N(0, 1) draws (:meth:`normal_` of an empty one)."""
        z = torch.empty(tuple(shape), dtype=dtype, device=device)
        self.normal_([z])
        return z

    def __getstate__(self) -> dict:  # pickle / deepcopy: everything but the lock
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def state_dict(self) -> dict[str, object]:
        return {"kind": KIND, "key": self.key, "stream": self.stream, "next_block": self.next_block}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("kind") != KIND:
            raise ValueError(f"PhiloxNormals: not a {KIND} state: {type(state).__name__}; it was saved by "
                             "another noise source (torch's generators) and resumes with that one")
        self.key, self.stream, self.next_block = int(state["key"]), int(state["stream"]), int(state["next_block"])
