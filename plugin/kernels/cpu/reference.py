"""Plain per-row Python/numpy solvers of the TV and OSCAR proxes.

Slow on purpose: one Python loop over rows around a per-row solver. They are the baseline
the compiled kernels are timed against (``scripts/bench_normalizers.py``) and an oracle in
the tests. The TV solver is a different algorithm from the compiled one (Johnson's dynamic
programming instead of Condat's direct algorithm), so agreement between the two is evidence
for both.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["oscar_ordered_prox_row", "oscar_prox_row", "prox_rows", "tv_prox_row"]


def tv_prox_row(z: Sequence[float], lam: float) -> np.ndarray:
    """``argmin_y 1/2 ||y - z||^2 + lam sum_i |y_{i+1} - y_i|`` for one row (float64).

    Johnson, "A dynamic programming algorithm for the fused lasso and L0-segmentation",
    JCGS 2013. Forward pass: the derivative of the message after eliminating ``y_1..y_k``
    is piecewise linear and increasing, clipped to [-lam, lam] outside ``[lo_k, hi_k]``; it
    is kept as a deque of knots ``(position, slope change, intercept change)`` over the
    constant ``-lam`` on the left. Backward pass: ``y_k = clip(y_{k+1}, lo_k, hi_k)``.
    """
    z = [float(v) for v in z]
    n = len(z)
    if n <= 1 or lam == 0:
        return np.array(z, dtype=np.float64)
    lo = [0.0] * n
    hi = [0.0] * n
    lo[0], hi[0] = z[0] - lam, z[0] + lam
    knots: deque[tuple[float, float, float]] = deque()
    knots.append((lo[0], 1.0, lam - z[0]))  # from -lam to (b - z0)
    knots.append((hi[0], -1.0, lam + z[0]))  # from (b - z0) to +lam
    last = 0.0
    for k in range(1, n):
        # derivative of the new message: (b - z_k) + clipped previous derivative
        target = 0.0 if k == n - 1 else -lam
        a, c = 1.0, -z[k] - lam
        while knots:
            p, da, dc = knots[0]
            if a * p + c > target:
                break
            a, c = a + da, c + dc
            knots.popleft()
        root = (target - c) / a
        if k == n - 1:
            last = root
            break
        lo[k] = root
        knots.appendleft((root, a, c + lam))
        a, c = 1.0, -z[k] + lam
        while knots:
            p, da, dc = knots[-1]
            if a * p + c < lam:
                break
            a, c = a - da, c - dc
            knots.pop()
        hi[k] = (lam - c) / a
        knots.append((hi[k], -a, lam - c))
    y = np.empty(n, dtype=np.float64)
    y[n - 1] = last
    for k in range(n - 2, -1, -1):
        y[k] = min(max(y[k + 1], lo[k]), hi[k])
    return y


def _pool_non_increasing(v: np.ndarray) -> np.ndarray:
    """Least-squares non-increasing fit of ``v`` by pool-adjacent-violators (Python loop)."""
    sums: list[float] = []
    counts: list[int] = []
    for value in v.tolist():
        sums.append(value)
        counts.append(1)
        while len(sums) > 1 and sums[-2] / counts[-2] <= sums[-1] / counts[-1]:
            s, c = sums.pop(), counts.pop()
            sums[-1] += s
            counts[-1] += c
    return np.repeat([s / c for s, c in zip(sums, counts)], counts)


def oscar_prox_row(z: Sequence[float], lam: float) -> np.ndarray:
    """prox of ``lam * sum_{i<j} max(|y_i|, |y_j|)`` for one row (float64).

    An OWL prox with weights ``lam * (n - k)`` for the k-th largest magnitude: sort the
    magnitudes, subtract the weights, pool adjacent violators for a non-increasing fit,
    clip at 0, undo the sort, restore the signs.
    """
    x = np.asarray(z, dtype=np.float64)
    n = x.shape[0]
    order = np.argsort(-np.abs(x), kind="stable")
    fit = np.maximum(_pool_non_increasing(np.abs(x)[order] - lam * (n - 1 - np.arange(n))), 0.0)
    out = np.empty(n, dtype=np.float64)
    out[order] = fit
    return np.sign(x) * out


def oscar_ordered_prox_row(z: Sequence[float], lam: float) -> np.ndarray:
    """prox of ``lam * sum_{i<j} max(y_i, y_j)`` (OSCAR without absolute values) for one row.

    Equal to OSCAR on the non-negative orthant. Sort the values, subtract the weights
    ``lam * (n - k)``, pool adjacent violators for a non-increasing fit, undo the sort.
    """
    x = np.asarray(z, dtype=np.float64)
    n = x.shape[0]
    order = np.argsort(-x, kind="stable")
    out = np.empty(n, dtype=np.float64)
    out[order] = _pool_non_increasing(x[order] - lam * (n - 1 - np.arange(n)))
    return out


def prox_rows(
    solver: Callable[[Sequence[float], float], np.ndarray],
    x: np.ndarray,
    lam: float,
    allowed: np.ndarray | None = None,
) -> np.ndarray:
    """Apply a per-row solver to each row of ``x`` (rows, d), over its allowed entries only.

    Masked positions are left out (total-variation neighbours are consecutive allowed
    positions) and get 0 in the output.
    """
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros_like(x)
    for r in range(x.shape[0]):
        if allowed is None:
            out[r] = solver(x[r], lam)
        else:
            idx = np.flatnonzero(allowed[r])
            out[r, idx] = solver(x[r, idx], lam)
    return out
