"""Structured sparse normalizers: fusedmax and oscarmax (Niculae & Blondel, NeurIPS 2017).

Both are regularized max operators
``Pi(x) = argmax_{y in simplex} y.x - gamma * Omega(y)`` whose regularizer adds a structure
penalty to ``1/2 ||y||^2``:

- fusedmax: ``Omega(y) = 1/2 ||y||^2 + lam * sum_i |y_{i+1} - y_i|`` (1-D total variation):
  neighbouring positions get equal weights, so attention falls on contiguous segments.
- oscarmax: ``Omega(y) = 1/2 ||y||^2 + lam * sum_{i<j} max(|y_i|, |y_j|)`` (OSCAR): positions
  with similar scores get equal weights, wherever they are.

Each is computed as "prox, then sparsemax": ``Pi(x) = sparsemax(prox_{lam g}(x / gamma))``,
which is exact when every subgradient of ``g`` at ``u`` is also one at the simplex projection
of ``u`` (Yu 2013, "On decomposing the proximal map"):

- fusedmax: ``g = TV``. The projection ``max(u - tau, 0)`` keeps the order of neighbours
  (or makes them equal), so the condition holds.
- oscarmax: ``g(y) = sum_k w_k y_[k]`` with ``w_k = d - k`` and ``y_[k]`` the k-th largest
  *value* (:func:`oscar_ordered_prox`). On the simplex (``y >= 0``) it equals OSCAR, and the
  projection keeps the order of values, so the condition holds. The OSCAR prox itself
  (:func:`oscar_prox`, which orders by *magnitude* and clips at 0) does not satisfy it:
  ``sparsemax(oscar_prox(x))`` differs from the argmax of the defining problem, for
  example when a score is very negative (its magnitude ranks it first) or when the prox
  shrinks every entry to 0 (the result is then uniform). For x = (1.23, 0.50, -1.95, 1.36),
  lam = 0.5, gamma = 2, the argmax is (1/3, 1/3, 0, 1/3); ``sparsemax(oscar_prox(x / 2))``
  gives (1/4, 1/4, 1/4, 1/4), whose objective is lower.

The proxes are exact and run in compiled C on the CPU (:mod:`plugin.kernels.cpu`: Condat's
direct algorithm for total variation; sort + pool-adjacent-violators for the ordered
weighted sums). The backward pass is closed form: the prox Jacobians are group-averaging
projections (see :class:`GroupedProxFunction`, :class:`OscarProxFunction`).

Masked positions are left out of the problem: total-variation neighbours are consecutive
*allowed* positions, so left/right padding and causal masks do not break the structure, and
OSCAR counts only allowed entries.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..kernels.ops import group_mean as group_mean_op
from ..kernels.ops import structured_prox
from ..registry import Param
from .base import GAMMA, check_param, finish, prepare, scaled_by_gamma, shift_by_max
from .sparsemax import SparsemaxFunction

# any finite lam >= 0 computes exactly: beyond the value at which a row is one group, the
# kernels use that value (see plugin.kernels.cpu.structured_prox)
LAM = Param("lam", 1.0, float, low=0)  # strength of the structure penalty (a finite number >= 0)

__all__ = [
    "GroupedProxFunction",
    "OscarProxFunction",
    "fused_groups",
    "fusedmax",
    "group_mean",
    "oscar_ordered_prox",
    "oscar_prox",
    "oscarmax",
    "tv_prox",
]


def group_mean(values: Tensor, groups: Tensor) -> Tensor:
    """Replace each entry by the mean of its group, row by row (last dimension).

    Parameters
    ----------
    values : Tensor (..., d), floating point.
    groups : integer Tensor (..., d) of group indices in ``[0, d)`` per row; any other index
        (``-1``) marks entries that belong to no group (their output is 0, they do not count).

    Returns
    -------
    Tensor (..., d) like ``values``. float32/float64 CPU tensors go through the compiled
    kernel (one pass per row); others through a vectorized ``index_add_``.
    """
    if values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64):
        return group_mean_op(values, groups.to(torch.int32))
    return _group_mean_torch(values, groups)


def _group_mean_torch(values: Tensor, groups: Tensor) -> Tensor:
    d = values.shape[-1]
    if values.numel() == 0:
        return torch.zeros_like(values)
    flat = values.reshape(-1, d)
    g = groups.reshape(-1, d).to(torch.int64)
    member = (g >= 0) & (g < d)
    offsets = torch.arange(flat.shape[0], device=values.device).unsqueeze(-1) * d
    index = (torch.where(member, g, torch.zeros_like(g)) + offsets).reshape(-1)
    weight = member.to(values.dtype).reshape(-1)
    sums = torch.zeros(flat.numel(), dtype=values.dtype, device=values.device)
    sums.index_add_(0, index, flat.reshape(-1) * weight)
    counts = torch.zeros_like(sums).index_add_(0, index, weight)
    mean = sums[index] / counts[index].clamp(min=1)
    return (mean * weight).reshape(values.shape)


class GroupedProxFunction(torch.autograd.Function):
    """``y = prox_{lam g}(x)`` over the last dim for ``g`` = TV (``kind="tv"``) or the ordered sum
    ``sum_k (d - k) y_[k]`` (``kind="oscar_ordered"``), over the allowed positions.

    Both solutions are constant on groups G with the group structure locally fixed:
    ``y_G = mean_G(x) + c_G`` where ``c_G`` depends on lam and on G only (for TV,
    ``lam (s_right - s_left) / |G|`` with the jump signs; for the ordered sum, minus the
    mean weight of G's ranks). So ``dy_i / dx_j = 1 / |G|`` for i, j in the same group and 0
    otherwise: the projection that averages inside groups. It is symmetric, so the backward
    pass replaces the incoming gradient by its group mean. Masked positions get zero
    gradient. With ``drop_row_shift`` the prox beyond a row's pooling point is returned without
    its per-row shift (see :func:`plugin.kernels.ops.structured_prox`).
    """

    @staticmethod
    def forward(ctx, x: Tensor, allowed: Tensor, lam: float, kind: str,
                drop_row_shift: bool = False) -> Tensor:
        y, groups = structured_prox(kind, x, allowed, lam, drop_row_shift)
        ctx.save_for_backward(groups)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None, None]:
        (groups,) = ctx.saved_tensors
        return group_mean(grad, groups), None, None, None, None


class OscarProxFunction(torch.autograd.Function):
    """``y = prox_{lam OSCAR}(x)`` over the last dim, OSCAR over the allowed entries.

    Jacobian: the entries of a group G share one magnitude,
    ``|y_i| = mean_G(|x|) - mean_G(w)`` with ``w`` the OWL weights of G's ranks, and
    ``y_i = sign(x_i) |y_i|``, so ``dy_i / dx_j = sign(x_i) sign(x_j) / |G|`` inside a group;
    entries shrunk to 0 have zero rows. Backward: average ``sign * grad`` inside each group,
    then multiply by ``sign``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, allowed: Tensor, lam: float) -> Tensor:
        y, groups = structured_prox("oscar", x, allowed, lam)
        ctx.save_for_backward(groups, torch.sign(x).to(torch.int8))
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        groups, sign = ctx.saved_tensors
        s = sign.to(grad.dtype)
        return s * group_mean(s * grad, groups), None, None


def _prox_input(x: Tensor, lam: float, mask: Tensor | None, name: str) -> tuple[Tensor, Tensor, float, Tensor]:
    lam = check_param(LAM, lam, name)
    z, allowed, _, invalid = prepare(x, -1, mask, name)
    return torch.where(allowed, z, torch.zeros_like(z)), allowed, lam, invalid


def tv_prox(x: Tensor, lam: float, mask: Tensor | None = None) -> Tensor:
    """Exact prox of 1-D total variation over the last dimension, batched over the others.

    ``argmin_y 1/2 ||y - x||^2 + lam * sum_i |y_{i+1} - y_i|``, computed by Condat's direct
    algorithm in C, one row per loop iteration; differentiable (group-mean Jacobian).

    Parameters
    ----------
    x : Tensor (..., d), float16/bfloat16/float32/float64 (half precision is computed in
        float32). CUDA tensors are copied to the CPU and back (no GPU kernel yet).
    lam : float >= 0.
    mask : bool Tensor broadcastable to ``x``, True where the position exists; ``-inf``
        entries count as masked. Masked positions are skipped (the neighbours of a position
        are the previous and next allowed ones) and get 0.

    Returns
    -------
    Tensor (..., d) in the dtype of ``x``: piecewise constant along allowed positions.
    """
    z, allowed, lam, invalid = _prox_input(x, lam, mask, "tv_prox")
    return finish(GroupedProxFunction.apply(z, allowed, lam, "tv"), -1, x.dtype, invalid)


def oscar_prox(x: Tensor, lam: float, mask: Tensor | None = None) -> Tensor:
    """Exact prox of the OSCAR penalty over the last dimension, batched over the others.

    ``argmin_y 1/2 ||y - x||^2 + lam * sum_{i<j} max(|y_i|, |y_j|)``: the ordered weighted
    L1 prox with weights ``lam * (d - k)`` for the k-th largest magnitude, d the number of
    allowed entries of the row (sort + pool-adjacent-violators in C); differentiable.

    Parameters
    ----------
    x : Tensor (..., d), float16/bfloat16/float32/float64 (half precision is computed in
        float32). CUDA tensors are copied to the CPU and back (no GPU kernel yet).
    lam : float >= 0.
    mask : bool Tensor broadcastable to ``x`` (True = the entry exists); ``-inf`` entries
        count as masked. Masked entries take no part and get 0.

    Returns
    -------
    Tensor (..., d) in the dtype of ``x``: entries of similar magnitude share one magnitude.
    """
    z, allowed, lam, invalid = _prox_input(x, lam, mask, "oscar_prox")
    return finish(OscarProxFunction.apply(z, allowed, lam), -1, x.dtype, invalid)


def oscar_ordered_prox(x: Tensor, lam: float, mask: Tensor | None = None) -> Tensor:
    """Exact prox of OSCAR without absolute values, over the last dimension, batched.

    ``argmin_y 1/2 ||y - x||^2 + lam * sum_{i<j} max(y_i, y_j)``; the penalty is
    ``sum_k lam (d - k) y_[k]`` with ``y_[k]`` the k-th largest value and d the number of
    allowed entries. It equals OSCAR for ``y >= 0``, and it is the prox behind
    :func:`oscarmax`. The solution keeps the order of ``x``; entries are pooled into groups
    of equal value by pool-adjacent-violators (in C); differentiable (group-mean Jacobian).
    ``prox(x + c) = prox(x) + c``.

    Parameters
    ----------
    x, lam, mask : as in :func:`oscar_prox`.

    Returns
    -------
    Tensor (..., d) in the dtype of ``x``; 0 at masked entries.
    """
    z, allowed, lam, invalid = _prox_input(x, lam, mask, "oscar_ordered_prox")
    return finish(GroupedProxFunction.apply(z, allowed, lam, "oscar_ordered"), -1, x.dtype, invalid)


def fused_groups(y: Tensor, mask: Tensor | None = None) -> Tensor:
    """Fused groups of ``y`` along the last dimension: runs of equal values among consecutive allowed positions.

    Parameters
    ----------
    y : Tensor (..., d).
    mask : bool Tensor broadcastable to ``y`` (True = allowed), or None. ``-inf`` entries
        count as masked.

    Returns
    -------
    int64 Tensor (..., d): per row, the group index (0, 1, ...) of each allowed position,
    in order; -1 at masked positions.
    """
    allowed = y != float("-inf")
    if mask is not None:
        allowed = allowed & mask.expand(y.shape)
    d = y.shape[-1]
    position = torch.arange(d, device=y.device).expand(y.shape)
    # index of the previous allowed position (-1 if none): running max of allowed indices, shifted
    last = torch.where(allowed, position, torch.full_like(position, -1)).cummax(-1).values
    previous = torch.cat([torch.full_like(last[..., :1], -1), last[..., :-1]], dim=-1)
    prev_value = torch.gather(y, -1, previous.clamp(min=0))
    starts = allowed & ((previous < 0) | (y != prev_value))
    groups = starts.to(torch.int64).cumsum(-1) - 1
    return torch.where(allowed, groups, torch.full_like(groups, -1))


def _prox_then_sparsemax(scores: Tensor, lam: float, gamma: float, dim: int, mask: Tensor | None, variant: str,
                         kind: str, drop_row_shift: bool = False) -> Tensor:
    """``sparsemax(prox_{lam g}(scores / gamma))`` along ``dim``, ``g`` the penalty of ``kind``.

    Both proxes commute with shifts (``prox(x + c) = prox(x) + c``): subtracting the row
    maximum changes nothing but the size of the numbers the prox works with (large scores in
    half precision).
    """
    lam = check_param(LAM, lam, variant)
    gamma = check_param(GAMMA, gamma, variant)
    z, allowed, dim, invalid = prepare(scores, dim, mask, variant)
    x, _ = shift_by_max(scaled_by_gamma(z, allowed, gamma), allowed)
    x = torch.where(allowed, x, torch.zeros_like(x))
    y = GroupedProxFunction.apply(x, allowed, lam, kind, drop_row_shift)
    p = SparsemaxFunction.apply(y, allowed)
    return finish(p, dim, scores.dtype, invalid)


def fusedmax(
    scores: Tensor, lam: float = 1.0, gamma: float = 1.0, dim: int = -1, mask: Tensor | None = None
) -> Tensor:
    """fusedmax: ``sparsemax(prox_{lam TV}(scores / gamma))`` along ``dim`` (Niculae & Blondel 2017).

    The argmax over the simplex of ``y.x - gamma (1/2 ||y||^2 + lam sum_i |y_{i+1} - y_i|)``:
    sparse, and constant on contiguous segments of positions.

    Parameters
    ----------
    scores : Tensor of any shape, float16/bfloat16/float32/float64 (half precision is
        computed in float32 and returned in the input dtype). CUDA tensors are processed on
        the CPU (copied there and back): there is no GPU kernel for the prox yet.
    lam : float >= 0, strength of the fusion; 0 gives sparsemax, a large value the uniform
        distribution over the allowed positions.
    gamma : float > 0, temperature: the scores are divided by gamma.
    dim : the dimension that is normalized.
    mask : bool tensor broadcastable to ``scores``, True where attending is allowed;
        ``-inf`` scores count as masked. Masked entries are exactly 0 with zero gradient;
        neighbours for the fusion are consecutive allowed positions; a row with no allowed
        entry gives zeros.

    Returns
    -------
    Tensor of the shape and dtype of ``scores``; rows sum to 1 over allowed entries.
    """
    return _prox_then_sparsemax(scores, lam, gamma, dim, mask, "fusedmax", "tv")


def oscarmax(
    scores: Tensor, lam: float = 1.0, gamma: float = 1.0, dim: int = -1, mask: Tensor | None = None
) -> Tensor:
    """oscarmax (Niculae & Blondel 2017): ``argmax_{y in simplex} y.x - gamma Omega(y)`` along ``dim``.

    ``Omega(y) = 1/2 ||y||^2 + lam sum_{i<j} max(|y_i|, |y_j|)`` (OSCAR): sparse, with equal
    weights on clusters of positions with similar scores (not necessarily contiguous).
    Computed exactly as ``sparsemax(oscar_ordered_prox(scores / gamma))``: on the simplex
    OSCAR equals the ordered sum of :func:`oscar_ordered_prox` (see the module docstring
    for why the OSCAR prox itself is not used). The OSCAR sum runs over the allowed entries
    of each row; masked entries would only add a constant on the simplex.

    Parameters
    ----------
    scores : Tensor of any shape, float16/bfloat16/float32/float64 (half precision is
        computed in float32 and returned in the input dtype). CUDA tensors are processed on
        the CPU (copied there and back): there is no GPU kernel for the prox yet.
    lam : float >= 0, strength of the clustering; 0 gives sparsemax, a large value the
        uniform distribution over the allowed positions.
    gamma : float > 0, temperature: the scores are divided by gamma.
    dim : the dimension that is normalized.
    mask : as in :func:`fusedmax`.

    Returns
    -------
    Tensor of the shape and dtype of ``scores``; rows sum to 1 over allowed entries.
    """
    # sparsemax ignores the per-row shift of the ordered prox beyond the pooling point
    return _prox_then_sparsemax(scores, lam, gamma, dim, mask, "oscarmax", "oscar_ordered", drop_row_shift=True)
