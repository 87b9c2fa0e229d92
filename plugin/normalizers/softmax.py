"""softmax(x / gamma): the regularized max with the negative-entropy regularizer."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import GAMMA, check_param, finish, prepare, scaled_by_gamma


def softmax(scores: Tensor, dim: int = -1, mask: Tensor | None = None, gamma: float = 1.0) -> Tensor:
    """Masked softmax of ``scores / gamma`` along ``dim``.

    Parameters
    ----------
    scores : Tensor of any shape, float16/bfloat16/float32/float64.
    dim : the dimension that is normalized.
    mask : bool tensor broadcastable to ``scores``, True where attending is allowed.
        ``-inf`` scores count as masked. A row with no allowed entry gives zeros.
    gamma : temperature, a number >= 1e-6; the row maximum is subtracted before dividing.

    Returns a tensor of the shape and dtype of ``scores``.
    """
    gamma = check_param(GAMMA, gamma, "softmax")
    z, allowed, dim, invalid = prepare(scores, dim, mask, "softmax")
    # Masked entries get a finite fill so that a fully masked row stays finite (no NaN);
    # torch.where routes no gradient to them.
    fill = torch.finfo(z.dtype).min
    p = torch.softmax(torch.where(allowed, scaled_by_gamma(z, allowed, gamma), fill), dim=-1)
    p = torch.where(allowed, p, torch.zeros_like(p))
    return finish(p, dim, scores.dtype, invalid)
