"""The q/k/v/mask scenarios every fast path is held to, by name (see ``test_paths_table.py``).

``CASES[name].tensors()`` returns ``(q, k, v, kwargs)`` for :func:`plugin.attention`: q (B, H, Lq, D),
k/v (B, Hkv, Lk, D/Dv) and the keyword arguments (``mask``, ``causal``) of the scenario.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Case:
    masking: str = "none"
    B: int = 2
    H: int = 4
    Hkv: int = 4
    Lq: int = 9
    Lk: int = 13
    D: int = 8
    Dv: int = 8
    dtype: torch.dtype = torch.float32

    def tensors(self, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        g = torch.Generator().manual_seed(seed)
        q = torch.randn(self.B, self.H, self.Lq, self.D, generator=g, dtype=torch.float64) * 1.5
        k = torch.randn(self.B, self.Hkv, self.Lk, self.D, generator=g, dtype=torch.float64) * 1.5
        v = torch.randn(self.B, self.Hkv, self.Lk, self.Dv, generator=g, dtype=torch.float64)
        return q.to(self.dtype), k.to(self.dtype), v.to(self.dtype), self._kwargs(g)

    def _kwargs(self, g: torch.Generator) -> dict:
        B, H, Lq, Lk = self.B, self.H, self.Lq, self.Lk
        if self.masking == "key_padding":  # right padding in one batch element, left in the other
            mask = torch.ones(B, Lk, dtype=torch.bool)
            mask[0, Lk - 4:] = False
            mask[1, :3] = False
            return {"mask": mask}
        if self.masking == "per_query":
            return {"mask": torch.rand(B, H, Lq, Lk, generator=g) > 0.3}
        if self.masking == "causal":
            return {"causal": True}
        if self.masking == "causal+padding":
            mask = torch.ones(B, 1, 1, Lk, dtype=torch.bool)
            mask[1, ..., :2] = False
            return {"mask": mask, "causal": True}
        if self.masking == "additive":
            bias = torch.randn(B, 1, Lq, Lk, generator=g, dtype=torch.float64).to(self.dtype)
            bias[..., 3] = float("-inf")
            return {"mask": bias}
        if self.masking == "fully_masked_rows":
            mask = torch.ones(B, 1, Lq, Lk, dtype=torch.bool)
            mask[0, :, 2] = False
            mask[1, :, :3] = False
            return {"mask": mask}
        assert self.masking == "none", self.masking
        return {}


CASES = {
    "plain": Case(),
    "key_padding": Case("key_padding"),
    "per_query_mask": Case("per_query"),
    "causal": Case("causal", Lq=13),
    "causal_decoding": Case("causal+padding", Lq=5),  # Lq < Lk: the queries are the last ones
    "lq_ne_lk": Case(Lq=6, Lk=17),
    "gqa": Case("key_padding", H=4, Hkv=2),
    "additive_mask": Case("additive"),
    "fully_masked_rows": Case("fully_masked_rows"),
    "value_dim": Case(Dv=5),
    "bfloat16": Case("key_padding", dtype=torch.bfloat16),
    "float16": Case(dtype=torch.float16),
    "float64": Case("key_padding", dtype=torch.float64),
}

# tolerance of a fast path (in the case's dtype) against the float64 reference path
TOLERANCE = {torch.float64: 1e-6, torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}
