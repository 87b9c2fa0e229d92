"""Gaussian basis functions and the ridge regression of values on them (Martins et al. 2020, section 3).

The values ``V`` (n x D) at positions ``t_1..t_n`` are represented as ``v(t) = B psi(t)`` with
``B^T = (F F^T + penalty I)^-1 F V``, ``F = [psi(t_1) ... psi(t_n)]`` (J x n). The operator
``R = (F F^T + penalty I)^-1 F`` (J x n) depends only on the layout (the sequence length, or the
grid), so it is computed once in float64 and cached per layout, device and dtype.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .expectations import evaluate_basis

__all__ = [
    "DEFAULT_WIDTHS",
    "DEFAULT_WIDTHS_2D",
    "ValueRegression",
    "gaussian_basis_1d",
    "gaussian_basis_2d",
    "grid_positions",
    "parse_widths",
    "sequence_positions",
]

DEFAULT_WIDTHS = (0.1, 0.5)
DEFAULT_WIDTHS_2D = (0.1,)


def parse_widths(widths: Any, name: str = "widths") -> tuple[float, ...]:
    """Basis standard deviations from a number, a sequence of numbers, or a '/'-separated string ('0.1/0.5')."""
    if isinstance(widths, str):
        parts = [p.strip() for p in widths.split("/") if p.strip()]
        try:
            values = tuple(float(p) for p in parts)
        except ValueError:
            raise ValueError(f"{name}: {widths!r} is not a '/'-separated list of numbers (e.g. '0.1/0.5')") from None
    elif isinstance(widths, (int, float)) and not isinstance(widths, bool):
        values = (float(widths),)
    elif isinstance(widths, Sequence) and all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in widths):
        values = tuple(float(w) for w in widths)
    else:
        raise ValueError(f"{name} must be a number, a sequence of numbers or a string like '0.1/0.5', got {widths!r}")
    if not values or not all(math.isfinite(w) and w > 0 for w in values):
        raise ValueError(f"{name} must be one or more numbers > 0, got {widths!r}")
    return values


def gaussian_basis_1d(num: int = 64, widths: Any = DEFAULT_WIDTHS) -> tuple[Tensor, Tensor]:
    """``num`` Gaussian RBFs on [0, 1]: for each width, ``num / len(widths)`` centres on ``linspace(0, 1)``.

    Returns ``(basis_mu, basis_sigma)``, both (num,) float64.
    """
    values = parse_widths(widths)
    if isinstance(num, bool) or not isinstance(num, int) or num < len(values) or num % len(values):
        raise ValueError(
            f"basis must be a positive multiple of the number of widths ({len(values)}: {values}), got {num!r}"
        )
    per = num // len(values)
    # on the CPU whatever the default device (a meta-device model init must still get real tables)
    f64, cpu = torch.float64, "cpu"
    centres = torch.linspace(0, 1, per, dtype=f64, device=cpu) if per > 1 else torch.full((1,), 0.5, dtype=f64,
                                                                                           device=cpu)
    mu = centres.repeat(len(values))
    sigma = torch.tensor(values, dtype=f64, device=cpu).repeat_interleave(per)
    return mu, sigma


def gaussian_basis_2d(grid: int = 10, widths: Any = DEFAULT_WIDTHS_2D) -> tuple[Tensor, Tensor]:
    """Isotropic Gaussian RBFs on the unit square: a ``grid x grid`` lattice of centres per width.

    Returns ``(basis_mu, basis_sigma)``: (grid^2 * len(widths), 2) and (grid^2 * len(widths),), float64.
    """
    values = parse_widths(widths)
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise ValueError(f"grid must be an integer >= 1, got {grid!r}")
    f64, cpu = torch.float64, "cpu"
    axis = torch.linspace(0, 1, grid, dtype=f64, device=cpu) if grid > 1 else torch.full((1,), 0.5, dtype=f64,
                                                                                         device=cpu)
    centres = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    mu = centres.repeat(len(values), 1)
    sigma = torch.tensor(values, dtype=f64, device=cpu).repeat_interleave(centres.shape[0])
    return mu, sigma


def key_positions(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """The position convention of every 1-D layout: ``t = (rank + 1/2) / n`` along the last dimension.

    ``allowed`` (bool, True = the key exists): ``rank`` counts the existing keys before each key
    and ``n`` those of its row, so padding on either side and per-query masks are handled. Keys
    that do not exist get 0.
    """
    counts = allowed.sum(-1, keepdim=True).clamp(min=1)
    rank = allowed.cumsum(-1) - 1
    return torch.where(allowed, (rank.to(dtype) + 0.5) / counts.to(dtype), 0.0)


def sequence_positions(n: int, dtype: torch.dtype = torch.float64, device: Any = None) -> Tensor:
    """``t_l = (l + 1/2) / n`` for l = 0..n-1 (:func:`key_positions` of ``n`` existing keys)."""
    return key_positions(torch.ones(n, dtype=torch.bool, device=device), dtype)


def grid_positions(height: int, width: int, dtype: torch.dtype = torch.float64, device: Any = None) -> Tensor:
    """Cell centres of a ``height x width`` grid over the unit square, row-major: (height * width, 2).

    Coordinate 0 runs along the height (rows), coordinate 1 along the width (columns).
    """
    rows = sequence_positions(height, dtype, device)
    cols = sequence_positions(width, dtype, device)
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij"), -1).reshape(-1, 2)


def ridge_operator(f: Tensor, penalty: float) -> Tensor:
    """``(F F^T + penalty I)^-1 F`` for ``f`` (..., J, n) in float64, stable for every penalty > 0.

    From the SVD ``F = U S V^T``: ``U diag(s / (s^2 + penalty)) V^T``. Forming ``F F^T`` and
    factoring it (Cholesky) fails for a penalty below the rounding of ``F F^T`` (about 1e-16
    times its largest eigenvalue), since ``F F^T`` is singular whenever J > n. Singular values
    below ``eps * max(J, n) * s_max`` are rounding (as in ``numpy.linalg.lstsq``) and count as
    0, so a tiny penalty gives the minimum-norm least-squares operator instead of amplified noise.
    """
    u, sv, vh = torch.linalg.svd(f, full_matrices=False)
    cutoff = sv.amax(-1, keepdim=True) * (torch.finfo(f.dtype).eps * max(f.shape[-2:]))
    scale = torch.where(sv > cutoff, sv / (sv * sv + penalty), torch.zeros_like(sv))
    return u @ (scale[..., None] * vh)


class ValueRegression:
    """Ridge-regression operators ``R = (F F^T + penalty I)^-1 F`` (J x n), cached per layout.

    Parameters
    ----------
    basis_mu, basis_sigma : the basis ((J,) / (J, 2) centres, (J,) widths).
    penalty : ridge penalty > 0.
    max_cache_bytes : the cache drops its least recently used operators beyond this size.
    """

    def __init__(self, basis_mu: Tensor, basis_sigma: Tensor, penalty: float, max_cache_bytes: int = 64 << 20) -> None:
        if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not penalty > 0 or not math.isfinite(
            penalty
        ):
            raise ValueError(f"penalty must be a number > 0 (the ridge penalty), got {penalty!r}")
        self.basis_mu = basis_mu.detach().to("cpu", torch.float64)
        self.basis_sigma = basis_sigma.detach().to("cpu", torch.float64)
        self.penalty = float(penalty)
        self.max_cache_bytes = max_cache_bytes
        self._cache: OrderedDict[tuple, Tensor] = OrderedDict()
        self._bytes = 0

    @property
    def num_basis(self) -> int:
        return self.basis_sigma.shape[0]

    def solve(self, positions: Tensor) -> Tensor:
        """The operator for arbitrary positions ((n,) in 1-D, (n, 2) in 2-D), in float64 on the CPU."""
        positions = positions.to("cpu", torch.float64)
        if positions.shape[0] == 0:
            return torch.zeros(self.num_basis, 0, dtype=torch.float64, device="cpu")
        f = evaluate_basis(positions, self.basis_mu, self.basis_sigma).T  # (J, n)
        return ridge_operator(f, self.penalty)

    def sequence(self, n: int, device: Any, dtype: torch.dtype) -> Tensor:
        """Operator (J, n) for a sequence of ``n`` positions ``(l + 1/2) / n``."""
        return self._get(("sequence", n), lambda: sequence_positions(n, device="cpu"), device, dtype)

    def grid(self, height: int, width: int, device: Any, dtype: torch.dtype) -> Tensor:
        """Operator (J, height * width) for the cell centres of a grid (row-major)."""
        return self._get(("grid", height, width), lambda: grid_positions(height, width, device="cpu"), device, dtype)

    def _get(self, layout: tuple, positions, device: Any, dtype: torch.dtype) -> Tensor:
        key = layout + (str(torch.device(device)), dtype)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        op = self.solve(positions()).to(device=device, dtype=dtype)
        size = op.numel() * op.element_size()
        self._cache[key] = op
        self._bytes += size
        while self._bytes > self.max_cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._bytes -= old.numel() * old.element_size()
        return op
