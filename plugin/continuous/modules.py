"""Continuous attention modules (Martins et al. 2020).

- :class:`ContinuousContext`: the registry's continuous variants (``continuous_softmax``,
  ``continuous_sparsemax``, ``continuous_entmax15``). ``forward(probs, v, mask)`` places the
  density by the mean and variance of the discrete attention ``probs`` over the key positions
  and returns the continuous context ``E_p[v(t)]`` (and the density at the keys).
- :class:`ContinuousAttention`: a stand-alone attention layer over a sequence (1-D) or a grid
  (2-D), with the density's location and scale predicted from the query or taken from the
  moments of a discrete attention, optionally summed with the discrete context.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..normalizers.contract import check_output
from .basis import (
    DEFAULT_WIDTHS,
    DEFAULT_WIDTHS_2D,
    ValueRegression,
    gaussian_basis_1d,
    gaussian_basis_2d,
    grid_positions,
    key_positions,
    parse_widths,
    ridge_operator,
)
from .density import check_alpha, inv2, scale_from_variance, support_radius
from .expectations import DEFAULT_NUM_ANGLES, evaluate_basis, expected_basis

__all__ = ["ContinuousAttention", "ContinuousContext", "ContinuousOutput"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
DEFAULT_MIN_VAR = 1e-4


class ContinuousOutput(NamedTuple):
    """What a continuous attention computed.

    context : (..., Lq, D) the context vectors.
    weights : (..., Lq, L) or (B, Lq, H, W): the density at the value positions, normalized to
        sum 1 over the existing positions (exact zeros outside the support for alpha > 1).
    mu : (..., Lq) or (..., Lq, 2): the density's location.
    sigma_sq : (..., Lq) or (..., Lq, 2, 2): its canonical scale (the variance for alpha = 1).
    probs : the discrete attention that placed the density (None when the query placed it).
    """

    context: Tensor
    weights: Tensor
    mu: Tensor
    sigma_sq: Tensor
    probs: Tensor | None = None


def _check_positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a number > 0, got {value!r}")
    return float(value)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def _in_param_dtype(layer: nn.Linear, x: Tensor) -> Tensor:
    """Apply a learned projection in its own dtype (half layers stay half); return in the dtype of ``x``."""
    return layer(x.to(layer.weight.dtype)).to(x.dtype)


class ContinuousContext(nn.Module):
    """Continuous context placed by the moments of a discrete attention distribution.

    The keys of a row sit at ``t = (rank + 1/2) / n`` on [0, 1], where ``rank`` counts the
    allowed keys before them and ``n`` the allowed keys of the row (so padding on either side
    and per-query masks are handled). The density has the mean and the variance (floored at
    ``min_var``) of ``probs`` over these positions; the values are regressed on the basis
    (ridge, ``penalty``) and the context is ``E_p[v(t)] = B E_p[psi(t)]``.

    Parameters
    ----------
    alpha : 1 (continuous softmax), 1.5 (continuous entmax-1.5) or 2 (continuous sparsemax).
    basis : number of Gaussian basis functions (a multiple of the number of widths).
    widths : their standard deviations ('0.1/0.5', a number, or a sequence); each width gets
        ``basis / len(widths)`` centres on a uniform grid over [0, 1].
    penalty : ridge penalty of the value regression, > 0.
    min_var : floor of the variance taken from ``probs``, > 0.
    """

    def __init__(
        self,
        alpha: float = 1.0,
        basis: int = 64,
        widths: Any = DEFAULT_WIDTHS,
        penalty: float = 0.01,
        min_var: float = DEFAULT_MIN_VAR,
    ) -> None:
        super().__init__()
        self.alpha = check_alpha(alpha)
        self.basis_mu, self.basis_sigma = gaussian_basis_1d(basis, widths)
        self.regression = ValueRegression(self.basis_mu, self.basis_sigma, penalty)
        self.min_var = _check_positive("min_var", min_var)
        if self.min_var > 1:  # a density over [0, 1] has variance <= 1/4; larger floors overflow the scale
            raise ValueError(f"min_var must lie in (0, 1], got {min_var!r}")
        self.widths = parse_widths(widths)

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha:g}, basis={self.basis_mu.shape[0]}, widths={self.widths}, "
            f"penalty={self.regression.penalty:g}, min_var={self.min_var:g}"
        )

    def forward(self, probs: Tensor, v: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Continuous context of discrete attention ``probs``.

        Parameters
        ----------
        probs : (B, H, Lq, Lk) discrete attention probabilities (zeros at masked keys).
        v : (B, H, Lk, D) values.
        mask : None or bool broadcastable to (B, H, Lq, Lk), True where the key exists.

        Returns
        -------
        ``(context, weights)``: (B, H, Lq, D) and (B, H, Lq, Lk) (see :class:`ContinuousOutput`).
        A row without allowed keys gives zeros.
        """
        out = self.density_context(probs, v, mask)
        return out.context, out.weights

    def density_context(self, probs: Tensor, v: Tensor, mask: Tensor | None = None) -> ContinuousOutput:
        """Like :meth:`forward`, also returning the density's ``mu`` and ``sigma_sq`` (B, H, Lq)."""
        if not isinstance(probs, Tensor) or probs.dim() != 4 or not probs.is_floating_point():
            raise ValueError(f"{self._name()}: probs must be a 4-D floating tensor (B, H, Lq, Lk)")
        B, H, Lq, Lk = probs.shape
        if not isinstance(v, Tensor) or v.dim() != 4 or tuple(v.shape[:3]) != (B, H, Lk):
            got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"{self._name()}: v must be (B, H, Lk, D) = ({B}, {H}, {Lk}, D), got {got}")
        work = _work_dtype(torch.promote_types(probs.dtype, v.dtype))
        p, values = probs.to(work), v.to(work)
        allowed = self.reduce_mask(mask, (B, H, Lq, Lk), p.device)
        counts = allowed.sum(-1)  # (b, h, q)
        rank = allowed.cumsum(-1) - 1
        t = self.key_positions(allowed, work)
        p = torch.where(allowed, p, 0.0)
        mass = p.sum(-1).clamp(min=torch.finfo(work).tiny)
        mu = (p * t).sum(-1) / mass
        var = (p * (t - mu[..., None]) ** 2).sum(-1) / mass
        sigma_sq = scale_from_variance(var.clamp(min=self.min_var), self.alpha)
        e = expected_basis(mu, sigma_sq, self.basis_mu, self.basis_sigma, self.alpha, validate=False)
        if allowed.shape[2] == 1:  # the mask depends on batch (and head) and key only: one regression per length
            context = e @ (self.operators(counts, rank, allowed, work) @ values)
        else:
            context = self._row_weights(e, counts, rank, allowed) @ values
        weights = self.density_at(t, allowed, mu, sigma_sq)
        dtype = v.dtype
        return ContinuousOutput(context.to(dtype), weights.to(dtype), mu, sigma_sq, probs)

    def context_from_moments(self, mean: Tensor, var: Tensor, v: Tensor, allowed: Tensor) -> Tensor:
        """The continuous context from the moments of the key positions, for a per-key mask.

        This is what :meth:`forward` computes after the moments, for callers that computed
        the moments themselves (the fast attention paths take them from one fused attention
        call with the positions appended to the values).

        Parameters
        ----------
        mean, var : (B, H, Lq) mean and variance of the position ``t`` under the discrete
            attention (``t = (rank + 1/2) / n`` over the allowed keys; see the class docstring).
        v : (B, Hkv, Lk, D) values; ``Hkv`` divides ``H`` (query head ``h`` reads value head
            ``h // (H // Hkv)``).
        allowed : bool (b, h, 1, Lk) with b in (1, B) and h in (1, Hkv): the existing keys,
            the same for every query.

        Returns the (B, H, Lq, D) context (zeros for rows without an allowed key).
        """
        B, H, Lq = mean.shape
        Hkv = v.shape[1]
        if allowed.dim() != 4 or allowed.shape[2] != 1 or allowed.shape[1] not in (1, Hkv):
            raise ValueError(f"{self._name()}: allowed must be (b, 1 or Hkv, 1, Lk), got {tuple(allowed.shape)}")
        counts = allowed.sum(-1)
        rank = allowed.cumsum(-1) - 1
        sigma_sq = scale_from_variance(var.clamp(min=self.min_var), self.alpha)
        e = expected_basis(mean, sigma_sq, self.basis_mu, self.basis_sigma, self.alpha, validate=False)
        coef = self.operators(counts, rank, allowed, v.dtype) @ v  # (B, Hkv, J, D)
        J = e.shape[-1]
        return (e.reshape(B, Hkv, H // Hkv, Lq, J) @ coef.unsqueeze(2)).reshape(B, H, Lq, -1)

    def _name(self) -> str:
        return {1.0: "continuous_softmax", 1.5: "continuous_entmax15", 2.0: "continuous_sparsemax"}[self.alpha]

    def key_positions(self, allowed: Tensor, dtype: torch.dtype) -> Tensor:
        """The keys' positions on [0, 1]: ``t = (rank + 1/2) / n`` over the allowed keys of each row (0 elsewhere)."""
        return key_positions(allowed, dtype)

    def reduce_mask(self, mask: Tensor | None, shape: tuple[int, int, int, int], device: Any) -> Tensor:
        """The mask as a 4-D bool tensor with the batch/head/query dimensions kept only where it varies.

        ``mask`` is None or bool broadcastable to ``shape`` = (B, H, Lq, Lk), True where the key exists.
        """
        if mask is None:
            return torch.ones(1, 1, 1, shape[3], dtype=torch.bool, device=device)
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise ValueError(f"{self._name()}: mask must be a bool tensor (True = key exists) or None")
        try:
            ok = mask.dim() <= 4 and torch.broadcast_shapes(mask.shape, shape) == torch.Size(shape)
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"{self._name()}: mask {tuple(mask.shape)} is not broadcastable to probs {shape}")
        m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
        m = m.expand(*m.shape[:3], shape[3])
        compiling = torch.compiler.is_compiling()  # no host sync in a graph: narrow broadcast dimensions only
        for dim in (2, 1, 0):
            if m.shape[dim] > 1 and (
                m.stride(dim) == 0 or not compiling and bool((m == m.narrow(dim, 0, 1)).all())
            ):
                m = m.narrow(dim, 0, 1)
        return m.contiguous()

    def operators(self, counts: Tensor, rank: Tensor, allowed: Tensor, dtype: torch.dtype) -> Tensor:
        """Regression operators scattered to the key positions: (b, h, J, Lk) for a (b, h, 1, Lk) mask.

        ``operators @ values`` gives the basis coefficients ``B^T`` (b, h, J, D) of every row,
        each fitted on its own allowed keys only.
        """
        b, h, _, lk = allowed.shape
        if torch.compiler.is_compiling():
            return self._operators_in_graph(allowed, dtype)
        counts, rank, allowed = counts.reshape(-1), rank.reshape(-1, lk), allowed.reshape(-1, lk)
        lengths = torch.unique(counts)
        n_max = int(lengths[-1])
        J = self.basis_mu.shape[0]
        if n_max == 0:
            return torch.zeros(b, h, J, lk, dtype=dtype, device=allowed.device)
        stack = torch.stack([self._padded_operator(int(n), n_max, allowed.device, dtype) for n in lengths.tolist()])
        ops = stack[torch.searchsorted(lengths, counts)]  # (rows, J, n_max)
        index = rank.clamp(0, n_max - 1)[:, None, :].expand(-1, J, -1)
        ops = ops.gather(-1, index) * allowed[:, None, :].to(dtype)
        return ops.reshape(b, h, J, lk)

    def _operators_in_graph(self, allowed: Tensor, dtype: torch.dtype) -> Tensor:
        """:meth:`operators` without data-dependent shapes or a cache, for ``torch.compile``.

        Each row's ridge regression is solved directly, batched over the rows: the basis at the
        row's positions ``(rank + 1/2) / n`` with zero columns at its masked keys gives the same
        Gram matrix ``F F^T + penalty I`` as its ``n`` allowed keys alone, so the solution is the
        operator of length ``n`` scattered to the allowed keys (and zero at the others), as in
        the eager path. Computed in float64, like the cached operators; no recompilation per
        sequence length.
        """
        b, h, _, lk = allowed.shape
        rows = allowed.reshape(-1, lk)
        f64 = torch.float64
        t = key_positions(rows, f64)
        basis_mu = self.basis_mu.to(device=allowed.device, dtype=f64)
        basis_sigma = self.basis_sigma.to(device=allowed.device, dtype=f64)
        f = (evaluate_basis(t, basis_mu, basis_sigma) * rows[..., None].to(f64)).transpose(-1, -2)  # (rows, J, lk)
        ops = ridge_operator(f, self.regression.penalty)
        return ops.to(dtype).reshape(b, h, f.shape[1], lk)

    def _padded_operator(self, n: int, n_max: int, device: Any, dtype: torch.dtype) -> Tensor:
        if n == 0:
            return torch.zeros(self.basis_mu.shape[0], n_max, device=device, dtype=dtype)
        return F.pad(self.regression.sequence(n, device, dtype), (0, n_max - n))

    def _row_weights(self, e: Tensor, counts: Tensor, rank: Tensor, allowed: Tensor) -> Tensor:
        """Per-row masks: the effective key weights ``w[row, l] = E_p[psi] . R_n[:, rank_l]`` (B, H, Lq, Lk).

        Rows are grouped by their number of allowed keys; one matrix product per distinct count.
        """
        B, H, Lq, J = e.shape
        b, h, _, lk = allowed.shape
        eb, eh = B // b, H // h
        rows = e.reshape(b, eb, h, eh, Lq, J).permute(0, 2, 4, 1, 3, 5).reshape(b * h * Lq, eb * eh, J)
        counts, rank, allowed = counts.reshape(-1), rank.reshape(-1, lk), allowed.reshape(-1, lk)
        lengths = torch.unique(counts)
        n_max = max(int(lengths[-1]), 1)
        parts, order = [], []
        for n in lengths.tolist():
            sel = (counts == n).nonzero().squeeze(1)
            if n == 0:
                part = rows.new_zeros(sel.shape[0], eb * eh, n_max)
            else:
                part = F.pad(rows[sel] @ self.regression.sequence(n, e.device, e.dtype), (0, n_max - n))
            parts.append(part)
            order.append(sel)
        u = torch.cat(parts)[torch.argsort(torch.cat(order))]  # (rows, eb * eh, n_max), by row again
        index = rank.clamp(0, n_max - 1)[:, None, :].expand(-1, eb * eh, -1)
        w = u.gather(-1, index) * allowed[:, None, :].to(e.dtype)
        return w.reshape(b, h, Lq, eb, eh, lk).permute(0, 3, 1, 4, 2, 5).reshape(B, H, Lq, lk)

    def density_at(self, t: Tensor, allowed: Tensor, mu: Tensor, sigma_sq: Tensor) -> Tensor:
        """The density at positions ``t`` normalized over the allowed ones (zeros for rows without any)."""
        x = t - mu[..., None]
        if self.alpha == 1.0:
            logits = -0.5 * x * x / sigma_sq[..., None]
            fill = torch.finfo(logits.dtype).min
            w = torch.softmax(torch.where(allowed, logits, fill), -1)
            return torch.where(allowed, w, 0.0)
        a = support_radius(sigma_sq, self.alpha)[..., None]
        gap = torch.clamp(a * a - x * x, min=0)
        if self.alpha == 1.5:
            gap = gap * gap
        gap = torch.where(allowed, gap, 0.0)
        return gap / gap.sum(-1, keepdim=True).clamp(min=torch.finfo(gap.dtype).tiny)


class ContinuousAttention(nn.Module):
    """Continuous attention over a sequence (1-D) or a grid (2-D) (Martins et al. 2020).

    Parameters
    ----------
    query_dim : size of the query vectors.
    alpha : 1 (continuous softmax), 1.5 (continuous entmax-1.5) or 2 (continuous sparsemax).
    ndim : 1 (values (B, L, D) on [0, 1]) or 2 (values (B, H, W, D) on the unit square).
    location : ``"query"``: a linear head on the query gives the location and the spread
        (1-D: ``mu = sigmoid(w1.q)``, ``variance = softplus(w2.q) + min_var``; 2-D: a mean in the
        unit square and a covariance ``L L^T + min_var I`` from a Cholesky head).
        ``"attention"``: a discrete attention (``normalizer``) of the query over the values
        places the density by its mean and (co)variance, as in the paper.
    normalizer : discrete spec for ``location="attention"`` (``"softmax"``, ``"sparsemax"``, ...).
    combine : add the discrete context to the continuous one (the paper's combination; needs
        ``location="attention"``).
    value_dim : size of the values; needed for ``location="attention"`` (key projection).
    attn_dim : size of the query/key projections of the discrete attention (default value_dim).
    basis : number of Gaussian basis functions (1-D default 64; 2-D default 100, a square grid
        per width).
    widths : basis standard deviations (1-D default 0.1 and 0.5; 2-D default 0.1).
    penalty : ridge penalty of the value regression.
    min_var : floor of the variance (added to the covariance diagonal in 2-D).
    num_angles : angular nodes of the 2-D quadrature (alpha = 1.5, 2).

    ``forward(query, values, mask=None)`` returns a :class:`ContinuousOutput`.
    """

    def __init__(
        self,
        query_dim: int,
        alpha: float = 1.0,
        ndim: int = 1,
        location: str = "query",
        normalizer: str = "softmax",
        combine: bool = False,
        value_dim: int | None = None,
        attn_dim: int | None = None,
        basis: int | None = None,
        widths: Any = None,
        penalty: float = 0.01,
        min_var: float = DEFAULT_MIN_VAR,
        num_angles: int = DEFAULT_NUM_ANGLES,
    ) -> None:
        super().__init__()
        self.alpha = check_alpha(alpha)
        if ndim not in (1, 2):
            raise ValueError(f"ndim must be 1 (sequence) or 2 (grid), got {ndim!r}")
        if location not in ("query", "attention"):
            raise ValueError(f"location must be 'query' or 'attention', got {location!r}")
        if combine and location != "attention":
            raise ValueError("combine=True sums the discrete and continuous contexts: it needs location='attention'")
        if isinstance(num_angles, bool) or not isinstance(num_angles, int) or num_angles < 8:
            raise ValueError(f"num_angles must be an integer >= 8, got {num_angles!r}")
        self.ndim, self.location, self.combine, self.num_angles = ndim, location, bool(combine), num_angles
        self.min_var = _check_positive("min_var", min_var)
        if ndim == 1:
            self.context_module = ContinuousContext(
                self.alpha, 64 if basis is None else basis, DEFAULT_WIDTHS if widths is None else widths, penalty,
                min_var,
            )
            self.basis_mu, self.basis_sigma = self.context_module.basis_mu, self.context_module.basis_sigma
        else:
            values = parse_widths(DEFAULT_WIDTHS_2D if widths is None else widths)
            total = 100 if basis is None else basis
            per = total // len(values) if isinstance(total, int) and not isinstance(total, bool) else 0
            grid = math.isqrt(per) if per > 0 else 0
            if grid < 1 or grid * grid * len(values) != total:
                raise ValueError(
                    f"basis must be len(widths) x a square number in 2-D (a grid of centres per width), got {basis!r}"
                )
            self.basis_mu, self.basis_sigma = gaussian_basis_2d(grid, values)
            self.regression = ValueRegression(self.basis_mu, self.basis_sigma, penalty)
        if location == "query":
            out = 2 if ndim == 1 else 5
            self.location_head = nn.Linear(query_dim, out)
            with torch.no_grad():
                self.location_head.weight.mul_(0.1)
                self.location_head.bias.zero_()
                spread = math.log(math.expm1(0.1 if ndim == 2 else 0.02))  # initial std ~0.14-0.3
                self.location_head.bias[1 if ndim == 1 else 2] = spread
                if ndim == 2:
                    self.location_head.bias[4] = spread
        else:
            if value_dim is None:
                raise ValueError("value_dim is needed for location='attention' (the key projection)")
            from ..normalizers.base import build_normalizer
            from ..registry import parse_spec

            parts = parse_spec(normalizer)
            if len(parts) != 1 or parts[0].kind != "discrete":
                raise ValueError(
                    f"normalizer must be a discrete spec such as 'softmax' or 'sparsemax', got {normalizer!r}"
                )
            self.normalizer = build_normalizer(parts[0].variant, 1, parts[0].params)
            self.normalizer_name = parts[0].name  # errors name it
            dim = value_dim if attn_dim is None else attn_dim
            self.query_proj = nn.Linear(query_dim, dim, bias=False)
            self.key_proj = nn.Linear(value_dim, dim, bias=False)

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha:g}, ndim={self.ndim}, location={self.location!r}, combine={self.combine}, "
            f"basis={self.basis_mu.shape[0]}"
        )

    def forward(self, query: Tensor, values: Tensor, mask: Tensor | None = None) -> ContinuousOutput:
        """Attend from each query to the values.

        Parameters
        ----------
        query : (B, Lq, query_dim).
        values : (B, L, D) when ``ndim=1``; (B, H, W, D) when ``ndim=2``.
        mask : 1-D only: None or bool (B, L), True at real positions (padding on either side).

        Returns
        -------
        :class:`ContinuousOutput` with ``context`` (B, Lq, D), ``mu`` (B, Lq) / (B, Lq, 2),
        ``sigma_sq`` (B, Lq) / (B, Lq, 2, 2), ``weights`` (B, Lq, L) / (B, Lq, H, W) and the
        discrete ``probs`` (B, Lq, L) / (B, Lq, H, W) for ``location="attention"``.
        """
        if not isinstance(query, Tensor) or query.dim() != 3:
            raise ValueError(f"query must be (B, Lq, query_dim), got {tuple(getattr(query, 'shape', ()))}")
        want = 3 if self.ndim == 1 else 4
        if not isinstance(values, Tensor) or values.dim() != want or values.shape[0] != query.shape[0]:
            layout = "(B, L, D)" if self.ndim == 1 else "(B, H, W, D)"
            raise ValueError(f"values must be {layout} with B = {query.shape[0]}, got {tuple(values.shape)}")
        work = _work_dtype(torch.promote_types(query.dtype, values.dtype))
        q, v = query.to(work), values.to(work)
        out = self._forward_1d(q, v, mask) if self.ndim == 1 else self._forward_2d(q, v, mask)
        return out._replace(context=out.context.to(values.dtype))

    def _scores(self, q: Tensor, v: Tensor) -> Tensor:
        keys = _in_param_dtype(self.key_proj, v)
        return _in_param_dtype(self.query_proj, q) @ keys.transpose(-1, -2) / math.sqrt(self.query_proj.out_features)

    # -- 1-D

    def _forward_1d(self, q: Tensor, v: Tensor, mask: Tensor | None) -> ContinuousOutput:
        B, L, _ = v.shape
        if mask is not None and (not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != (B, L)):
            raise ValueError(f"mask must be a bool tensor (B, L) = ({B}, {L}), True at real positions")
        ctx = self.context_module
        if self.location == "attention":
            scores = self._scores(q, v)
            key_mask = None if mask is None else mask[:, None, :]
            probs = check_output(self.normalizer(scores, dim=-1, mask=key_mask), scores, key_mask,
                                 self.normalizer_name).to(q.dtype)
            out = ctx.density_context(probs[:, None], v[:, None], None if mask is None else mask[:, None, None, :])
            context = out.context[:, 0]
            if self.combine:
                context = context + probs @ v
            return ContinuousOutput(context, out.weights[:, 0], out.mu[:, 0], out.sigma_sq[:, 0], probs)
        head = _in_param_dtype(self.location_head, q)
        mu = torch.sigmoid(head[..., 0])
        var = F.softplus(head[..., 1]) + self.min_var
        sigma_sq = scale_from_variance(var, self.alpha)
        allowed = ctx.reduce_mask(None if mask is None else mask[:, None, None, :], (B, 1, 1, L), q.device)
        counts = allowed.sum(-1)
        rank = allowed.cumsum(-1) - 1
        t = ctx.key_positions(allowed, q.dtype)
        coef = (ctx.operators(counts, rank, allowed, q.dtype) @ v[:, None])[:, 0]  # (B, J, D)
        e = expected_basis(mu, sigma_sq, self.basis_mu, self.basis_sigma, self.alpha, validate=False)
        weights = ctx.density_at(t[:, 0], allowed[:, 0], mu, sigma_sq)  # (B, Lq, L)
        return ContinuousOutput(e @ coef, weights, mu, sigma_sq, None)

    # -- 2-D

    def _forward_2d(self, q: Tensor, v: Tensor, mask: Tensor | None) -> ContinuousOutput:
        if mask is not None:
            raise ValueError("mask is not supported for 2-D values: the grid (B, H, W, D) is taken as complete")
        B, Hg, Wg, D = v.shape
        flat = v.reshape(B, Hg * Wg, D)
        positions = grid_positions(Hg, Wg, q.dtype, q.device)  # (P, 2)
        eye = torch.eye(2, dtype=q.dtype, device=q.device)
        probs = None
        if self.location == "attention":
            scores = self._scores(q, flat)
            probs = check_output(self.normalizer(scores, dim=-1), scores, None, self.normalizer_name)
            probs = probs.to(q.dtype)  # (B, Lq, P)
            mu = probs @ positions
            diff = positions - mu[..., None, :]  # (B, Lq, P, 2)
            cov = (probs[..., None, None] * diff[..., :, None] * diff[..., None, :]).sum(-3)
        else:
            head = _in_param_dtype(self.location_head, q)
            mu = torch.sigmoid(head[..., :2])
            l00, l10, l11 = F.softplus(head[..., 2]), head[..., 3], F.softplus(head[..., 4])
            chol = torch.stack([torch.stack([l00, torch.zeros_like(l00)], -1), torch.stack([l10, l11], -1)], -2)
            cov = chol @ chol.transpose(-1, -2)
        cov = cov + self.min_var * eye
        sigma_sq = scale_from_variance(cov, self.alpha, ndim=2)
        e = expected_basis(mu, sigma_sq, self.basis_mu, self.basis_sigma, self.alpha, self.num_angles, validate=False)
        coef = self.regression.grid(Hg, Wg, q.device, q.dtype) @ flat  # (B, J, D)
        context = e @ coef
        if self.combine:
            assert probs is not None  # combine needs location='attention' (checked in __init__), which sets probs
            context = context + probs @ flat
        weights = self._grid_density(positions, mu, sigma_sq).reshape(B, -1, Hg, Wg)
        if probs is not None:
            probs = probs.reshape(B, -1, Hg, Wg)
        return ContinuousOutput(context, weights, mu, sigma_sq, probs)

    def _grid_density(self, positions: Tensor, mu: Tensor, sigma_sq: Tensor) -> Tensor:
        x = positions - mu[..., None, :]  # (B, Lq, P, 2)
        prec = inv2(sigma_sq)[..., None, :, :]
        quad = (x[..., None, :] @ prec @ x[..., :, None])[..., 0, 0]
        if self.alpha == 1.0:
            return torch.softmax(-0.5 * quad, -1)
        r = support_radius(sigma_sq, self.alpha, 2)[..., None]
        gap = torch.clamp(r * r - quad, min=0)
        if self.alpha == 1.5:
            gap = gap * gap
        return gap / gap.sum(-1, keepdim=True).clamp(min=torch.finfo(gap.dtype).tiny)

