"""Standard normal draws for one device from torch's generators: a CUDA device's noise source, and
the CPU's where the compiled Philox kernel (:mod:`mechanisms.philox_normals`, the faster default)
is not installed. Also the :class:`NormalSource` interface both implement.

torch's CPU generator fills a tensor on one thread (≈ 3.4 ns per float32 normal here), so a CPU
device gets ``STREAMS`` generators drawn in parallel. Stream 0 is the device's generator of
:func:`mechanisms.rng.cpu_generator`; stream k ≥ 1 has its whole mt19937 state from
``SeedSequence([seed, device], spawn_key=(k,))`` — numpy's documented way to derive independent
child streams from one seed. A fill cuts the tensors, in order, into pieces of ``PIECE``
elements; piece j is drawn from stream j mod STREAMS, and each stream draws its pieces in order.
The numbers drawn depend only on (seed, stream states, the tensors' sizes), not on how many
threads draw them; up to ``torch.get_num_threads()`` threads draw the streams in parallel
(torch releases the GIL inside ``normal_``).

Privacy assumption: every coordinate is N(0, 1) and independent of every other one, which holds
when the streams are independent; they are as long as SeedSequence's children are (its design
goal: children of one seed have unrelated states). Other devices (CUDA's Philox) draw the whole
fill from the device's one generator, which is already parallel.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, Sequence

import torch

#: CPU streams per device (fixed, so a seed gives the same noise on any number of threads)
STREAMS = 8
#: elements per piece; a fill smaller than two pieces runs on the calling thread
PIECE = 1 << 16

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=STREAMS - 1, thread_name_prefix="dptrain-noise")
        return _pool


def _forget_pool_after_fork() -> None:  # a forked child has none of the parent's threads
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def pieces_by_stream(tensors: Sequence[torch.Tensor], streams: int = STREAMS,
                     piece: int = PIECE) -> list[list[torch.Tensor]]:
    """Contiguous views of ``piece`` elements (the last of each tensor shorter); view j of the
    concatenation goes to stream j mod ``streams``."""
    out: list[list[torch.Tensor]] = [[] for _ in range(streams)]
    j = 0
    for t in tensors:
        if not t.is_contiguous():
            raise ValueError(f"NormalStreams.normal_: tensors must be contiguous, got strides {t.stride()} "
                             f"for shape {tuple(t.shape)}; fill a contiguous buffer and copy it")
        flat = t.view(-1)
        for start in range(0, flat.numel(), piece):
            out[j % streams].append(flat[start:start + piece])
            j += 1
    return out


class NormalSource(Protocol):
    """What noise is drawn from: :class:`NormalStreams`, or :class:`mechanisms.philox_normals.PhiloxNormals`.

    ``noised`` and ``add_row_scaled_`` use the normals that ``normal_`` would draw for tensors of
    those shapes (the same pieces, in the same order), so they equal draw-then-combine in distribution
    and, up to rounding, in value.
    """

    def normal_(self, tensors: Sequence[torch.Tensor]) -> None: ...

    def noised(self, tensors: Sequence[torch.Tensor], noise_scale: float, scale: float = 1.0
               ) -> list[torch.Tensor]: ...

    def noised_(self, tensors: Sequence[torch.Tensor], noise_scale: float, scale: float = 1.0) -> None: ...

    def add_row_scaled_(self, table: torch.Tensor, row_scales: torch.Tensor) -> None: ...

    #: whether ``add_row_scaled_`` needs a buffer of the table's size for the noise
    BUFFERS_NOISE: bool

    def randn(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor: ...

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


def normals_like(source: NormalSource, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """New tensors shaped like ``tensors`` (same dtype and device), filled in order by one ``source.normal_``."""
    zs = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in tensors]
    source.normal_(zs)
    return zs


class NormalStreams:
    """``normal_(tensors)`` fills tensors with i.i.d. N(0, 1) for one device (see the module docstring)."""

    #: ``add_row_scaled_`` draws Z into a buffer before adding it
    BUFFERS_NOISE = True

    def __init__(self, generators: Sequence[torch.Generator]) -> None:
        if not generators:
            raise ValueError("NormalStreams: need at least one generator")
        self.generators = list(generators)
        self._scratch: torch.Tensor | None = None  # add_row_scaled_'s buffer for Z

    @property
    def generator(self) -> torch.Generator:
        """Stream 0: the device's generator (draws that are not split into pieces use it)."""
        return self.generators[0]

    @torch.no_grad()
    def normal_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Fill every tensor (contiguous) in place with independent N(0, 1) draws."""
        if len(self.generators) == 1:
            for t in tensors:
                t.normal_(generator=self.generators[0])
            return
        work = pieces_by_stream(tensors, len(self.generators))
        inference = torch.is_inference_mode_enabled()

        def draw(streams: range) -> None:
            # grad and inference modes are per thread: the workers take the caller's
            with torch.inference_mode(inference), torch.no_grad():
                for k in streams:
                    g = self.generators[k]
                    for p in work[k]:
                        p.normal_(generator=g)

        n_pieces = sum(map(len, work))
        threads = max(1, min(torch.get_num_threads(), len(self.generators), n_pieces))
        if threads == 1:
            draw(range(len(self.generators)))
            return
        ranges = [range(w, len(self.generators), threads) for w in range(threads)]
        futures = [_executor().submit(draw, r) for r in ranges[1:]]
        draw(ranges[0])
        for f in futures:
            f.result()

    def randn(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """A new ``shape`` tensor of N(0, 1) draws (:meth:`normal_` of an empty one)."""
        z = torch.empty(tuple(shape), dtype=dtype, device=device)
        self.normal_([z])
        return z

    @torch.no_grad()
    def noised(self, tensors: Sequence[torch.Tensor], noise_scale: float, scale: float = 1.0) -> list[torch.Tensor]:
        """New tensors ``scale·t + noise_scale·Z``, Z ~ N(0, I) drawn by :meth:`normal_` (in place in Z's buffer)."""
        return [z.mul_(noise_scale).add_(t, alpha=scale) for z, t in zip(normals_like(self, tensors), tensors)]

    @torch.no_grad()
    def noised_(self, tensors: Sequence[torch.Tensor], noise_scale: float, scale: float = 1.0) -> None:
        """:meth:`noised` in place: ``t ← scale·t + noise_scale·Z`` (the same Z)."""
        for t, z in zip(tensors, normals_like(self, tensors)):
            t.mul_(scale).add_(z, alpha=noise_scale)

    @torch.no_grad()
    def add_row_scaled_(self, table: torch.Tensor, row_scales: torch.Tensor) -> None:
        """``table[r] += row_scales[r]·Z[r]``, Z drawn by :meth:`normal_` into a scratch buffer that is
        kept for the next call (a fresh one would fault its pages in every time)."""
        if table.dim() != 2 or row_scales.shape != table.shape[:1]:
            raise ValueError(f"add_row_scaled_: need a [rows, dim] table and [rows] scales, got "
                             f"{tuple(table.shape)} and {tuple(row_scales.shape)}")
        scratch = self._scratch
        if (scratch is None or scratch.numel() < table.numel() or scratch.dtype != table.dtype
                or scratch.device != table.device):
            scratch = self._scratch = torch.empty(table.numel(), dtype=table.dtype, device=table.device)
        z = scratch[:table.numel()].view(table.shape)
        self.normal_([z])
        table.addcmul_(z, row_scales.to(table.dtype).unsqueeze(1))

    def state_dict(self) -> list[torch.Tensor]:
        return [g.get_state() for g in self.generators]

    def load_state_dict(self, states: Sequence[torch.Tensor]) -> None:
        if len(states) != len(self.generators):
            raise ValueError(f"NormalStreams: the checkpoint has {len(states)} stream states, this device "
                             f"uses {len(self.generators)}; it was saved by another version of dptrain")
        for g, s in zip(self.generators, states):
            g.set_state(s)
