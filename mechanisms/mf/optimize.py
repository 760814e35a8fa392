"""Optimised strategies: the dense multi-epoch optimum and optimised banded Toeplitz coefficients.

Dense (Choquette-Choo et al. 2023, arXiv:2211.06530, Sec. 3; Denisov et al. 2022): with
X = CᵀC, the expected error is sens² · tr(Aᵀ A X⁻¹), convex in X ≻ 0. We fix the column
norms (diag X = 1, the equal-column-norm case) and set X_ij = 0 for i ≠ j in one
participation pattern of the fixed-epoch schema (i ≡ j mod b) so that sens² = k exactly,
optionally also X_ij = 0 for |i − j| ≥ bands (then C is banded, the DP-BandMF family of
arXiv:2306.08153). We minimise f(X) = tr(Aᵀ A X⁻¹), ∇f = −X⁻¹AᵀAX⁻¹, over the free
off-diagonal entries by L-BFGS with a backtracking line search that rejects
non-positive-definite X, then take C lower-triangular with CᵀC = X ("reverse Cholesky":
C = J·chol(J X J)ᵀ·J, J the exchange matrix).

Banded Toeplitz: C with first column (1, c_1, …, c_{b−1}); for a Toeplitz workload with
first column a, A C⁻¹ has first column s = a / c (Σ_j c_j s_{m−j} = a_m) and we minimise
F(c) = ‖c‖² · Σ_m (n − m) s_m², which is ‖A C⁻¹‖_F² · (max column norm)², i.e. the error at
fixed σ both for one participation and for b-separated ones (sens² = k'·‖c‖² up to the
truncated last columns). The gradient uses the adjoint recursion: with λ = T_cᵀ⁻¹ ∂E/∂s,
∂E/∂c_j = −Σ_m λ_m s_{m−j}.
"""
from __future__ import annotations

import math
from collections import deque
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
import torch
from scipy.linalg import cholesky
from scipy.signal import lfilter

from .strategies import Strategy, from_matrix, sqrt_coefficients
from .workloads import prefix_sum

FunGrad = Callable[[torch.Tensor], "tuple[float, torch.Tensor] | None"]


def lbfgs(fun_grad: FunGrad, x0: torch.Tensor, max_iter: int = 2000, memory: int = 20,
          rtol: float = 1e-10, gtol: float = 1e-9) -> tuple[torch.Tensor, float, int]:
    """Minimise a smooth function of a float64 vector; ``fun_grad`` returns None outside its domain.

    Limited-memory BFGS (Nocedal & Wright, Alg. 7.4/7.5) with Armijo backtracking; a point
    outside the domain (e.g. a Gram matrix that is not positive definite) halves the step.
    Stops when a step improves f by less than rtol·|f| three times in a row, when
    max|∇f|·max(1, max|x|) ≤ gtol·|f|, or after ``max_iter`` iterations. Returns (x, f, iterations).
    Vector algebra stays in torch so that it shares one thread pool with the objective.
    """
    x = x0.detach().to(torch.float64).clone()
    first = fun_grad(x)
    if first is None:
        raise ValueError("lbfgs: the starting point is outside the objective's domain")
    f, g = first
    hist: deque[tuple[torch.Tensor, torch.Tensor, float]] = deque(maxlen=memory)
    small = 0
    it = 0

    def steepest() -> torch.Tensor:
        return -g / max(1.0, float(g.abs().max())) * 0.1

    for it in range(1, max_iter + 1):
        if float(g.abs().max()) * max(1.0, float(x.abs().max()) if x.numel() else 1.0) <= gtol * abs(f):
            break
        if hist:  # two-loop recursion
            q = -g
            alphas = []
            for s, y, rho in reversed(hist):
                a = rho * float(s @ q)
                alphas.append(a)
                q = q - a * y
            s, y, _ = hist[-1]
            q = q * (float(s @ y) / float(y @ y))
            for (s, y, rho), a in zip(hist, reversed(alphas)):
                q = q + s * (a - rho * float(y @ q))
            d = q
        else:
            d = steepest()
        slope = float(g @ d)
        if slope >= 0:  # not a descent direction: restart from steepest descent
            hist.clear()
            d = steepest()
            slope = float(g @ d)
        step, trial = 1.0, None
        for _ in range(60):
            trial = fun_grad(x + step * d)
            if trial is not None and trial[0] <= f + 1e-4 * step * slope:
                break
            step *= 0.5
        else:
            break  # no acceptable step: at the numerical optimum
        x_new = x + step * d
        f_new, g_new = trial
        s_vec, y_vec = x_new - x, g_new - g
        sy = float(s_vec @ y_vec)
        if sy > 1e-12 * float(torch.sqrt((s_vec @ s_vec) * (y_vec @ y_vec))):
            hist.append((s_vec, y_vec, 1.0 / sy))
        small = small + 1 if f - f_new <= rtol * abs(f) else 0
        x, f, g = x_new, f_new, g_new
        if small >= 3:
            break
    return x, float(f), it


# ----------------------------------------------------------------------------- dense
def strategy_from_gram(gram: np.ndarray, name: str = "dense") -> Strategy:
    """Lower-triangular C with CᵀC = X (reverse Cholesky)."""
    x = np.asarray(gram, dtype=np.float64)
    upper = cholesky(x[::-1, ::-1], lower=False)  # J X J = Uᵀ U
    return from_matrix(upper[::-1, ::-1].copy(), name=name)  # C = J U J: lower-triangular, CᵀC = X


def gram_objective(gram: torch.Tensor, workload_t: torch.Tensor) -> tuple[float, torch.Tensor] | None:
    """f(X) = tr(Aᵀ A X⁻¹) and ∇f = −H Hᵀ, H = X⁻¹ Aᵀ (``workload_t`` = Aᵀ); None unless X ≻ 0."""
    low, info = torch.linalg.cholesky_ex(gram)
    if int(info) != 0:
        return None
    m = torch.linalg.solve_triangular(low, workload_t, upper=False)
    h = torch.linalg.solve_triangular(low.T, m, upper=True)
    return float((m * m).sum()), -(h @ h.T)


def dense_mask(n: int, steps_per_epoch: int | None = None, bands: int | None = None) -> np.ndarray:
    """Boolean n × n mask of the off-diagonal Gram entries left free by the constraints."""
    idx = np.arange(n)
    free = ~np.eye(n, dtype=bool)
    if steps_per_epoch is not None:
        free &= (idx[:, None] % steps_per_epoch) != (idx[None, :] % steps_per_epoch)
    if bands is not None:
        free &= np.abs(idx[:, None] - idx[None, :]) < bands
    return free


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch intra-op threads (None: leave as is), then restore.

    The optimisation makes thousands of small calls; on a shared 2-core machine a
    multi-threaded pool spends most of its time waiting (measured 10× slower at n = 256).
    """
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def optimal_gram(workload: np.ndarray, mask: np.ndarray, max_iter: int = 3000,
                 threads: int | None = 1) -> np.ndarray:
    """argmin tr(AᵀA X⁻¹) over X ≻ 0 with diag X = 1 and X_ij = 0 where ``mask`` is False."""
    a_t = torch.from_numpy(np.ascontiguousarray(np.asarray(workload, dtype=np.float64).T))
    n = a_t.shape[0]
    r_np, c_np = np.nonzero(np.tril(mask, -1))
    if r_np.size == 0:  # no free entry (one step per epoch, or one step): X = I is the only feasible point
        return np.eye(n)
    rows, cols = torch.from_numpy(r_np), torch.from_numpy(c_np)

    def build(theta: torch.Tensor) -> torch.Tensor:
        x = torch.eye(n, dtype=torch.float64)
        x[rows, cols] = theta
        x[cols, rows] = theta
        return x

    def fun_grad(theta: torch.Tensor) -> tuple[float, torch.Tensor] | None:
        out = gram_objective(build(theta), a_t)
        if out is None:
            return None
        f, grad = out
        return f, 2.0 * grad[rows, cols]

    with torch_threads(threads):
        theta, _, _ = lbfgs(fun_grad, torch.zeros(rows.shape[0], dtype=torch.float64), max_iter=max_iter)
    return build(theta).numpy()


def optimal_dense(n: int, participations: int = 1, steps_per_epoch: int | None = None,
                  bands: int | None = None, workload: np.ndarray | None = None,
                  max_iter: int = 3000, threads: int | None = 1) -> Strategy:
    """The multi-epoch optimal C for k participations in the fixed-epoch schema (sens = √k).

    ``steps_per_epoch`` defaults to ⌈n/k⌉; ``bands`` additionally makes C banded. Cost:
    one to two hundred L-BFGS iterations of O(n³) each (n = 256: a few seconds).
    """
    if int(participations) != participations or participations < 1:
        raise ValueError(f"optimal_dense: participations must be a positive integer, got {participations}")
    if n > 2048:
        raise ValueError(f"optimal_dense: n = {n} is too large for the O(n³) dense optimisation; "
                         "use optimal_banded_toeplitz or fft_sqrt")
    b = steps_per_epoch if steps_per_epoch is not None else -(-n // int(participations))
    a = prefix_sum(n) if workload is None else np.asarray(workload, dtype=np.float64)
    if a.shape != (n, n):
        raise ValueError(f"optimal_dense: workload must be {n} × {n}, got {a.shape}")
    gram = optimal_gram(a, dense_mask(n, b if participations > 1 else None, bands), max_iter=max_iter,
                        threads=threads)
    strategy = strategy_from_gram(gram, name="multi-epoch-opt" if bands is None else "banded-opt")
    if bands is not None:  # drop round-off outside the band
        strategy = Strategy(n, strategy.coefficients[:, :bands], name=strategy.name)
    return strategy


# ----------------------------------------------------------------------------- banded Toeplitz
def banded_toeplitz_objective(c: np.ndarray, a: np.ndarray) -> tuple[float, np.ndarray] | None:
    """F(c) = ‖c‖² Σ_m (n − m) s_m², s = a / c, and ∇F; None when the recursion diverges."""
    n = a.shape[0]
    with np.errstate(over="ignore", invalid="ignore"):
        s = lfilter([1.0], c, a)
        if not np.all(np.isfinite(s)) or np.max(np.abs(s)) > 1e150:
            return None
        w = np.arange(n, 0, -1, dtype=np.float64)
        e = float(np.dot(w, s * s))
        lam = lfilter([1.0], c, (2.0 * w * s)[::-1])[::-1]
    if not np.all(np.isfinite(lam)):
        return None
    b = c.shape[0]
    de = np.array([-float(np.dot(lam[j:], s[: n - j])) for j in range(b)])
    norm2 = float(c @ c)
    return norm2 * e, 2.0 * c * e + norm2 * de


def optimal_banded_toeplitz(n: int, bands: int, workload: np.ndarray | None = None,
                            max_iter: int = 2000) -> Strategy:
    """Banded Toeplitz C (c_0 = 1) minimising ‖c‖²·‖A C⁻¹‖_F², started at the banded square root.

    ``workload``: first column of a Toeplitz A (default prefix sums, all ones). O(n·bands)
    per evaluation, so n = 10⁴ takes about a second.
    """
    if int(bands) != bands or not 1 <= bands <= n:
        raise ValueError(f"optimal_banded_toeplitz: bands must be an integer in [1, n={n}], got {bands}")
    a = np.ones(n) if workload is None else np.asarray(workload, dtype=np.float64)
    if a.shape != (n,):
        raise ValueError(f"optimal_banded_toeplitz: workload must be the first column (length {n}) "
                         f"of a Toeplitz workload, got shape {a.shape}")
    if bands == 1:
        return Strategy(n, np.ones(1), name="banded-opt")

    def fun_grad(tail: torch.Tensor) -> tuple[float, torch.Tensor] | None:
        out = banded_toeplitz_objective(np.concatenate([[1.0], tail.numpy()]), a)
        return None if out is None else (out[0], torch.from_numpy(out[1][1:]))

    with torch_threads(1):
        tail, _, _ = lbfgs(fun_grad, torch.from_numpy(sqrt_coefficients(int(bands))[1:]), max_iter=max_iter)
    coef = np.concatenate([[1.0], tail.numpy()])
    return Strategy(n, coef / math.sqrt(float(coef @ coef)), name="banded-opt")
