"""The ``"sdpa"`` runner: softmax attention through ``torch.nn.functional.scaled_dot_product_attention``."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["sdpa_runner"]


def sdpa_runner(gamma: float, dropout_p: float) -> Callable[..., Tensor]:
    def run(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, bias: Tensor | None, causal: bool,
            scale: float) -> Tensor:
        if q.device.type == "cpu" and q.dtype in (torch.float16, torch.bfloat16):
            # torch's CPU SDPA backward is 4-5x slower in half precision than in float32 (measured,
            # torch 2.13): compute in float32 (also more precise), return in q's dtype
            return run(q.float(), k.float(), v.float(), mask, bias, causal, scale).to(q.dtype)
        Lq, Lk = q.shape[2], k.shape[2]
        is_causal = causal and mask is None and bias is None and Lq == Lk
        if causal and not is_causal:  # SDPA's is_causal is aligned top-left; ours bottom-right
            i = torch.arange(Lq, device=q.device).unsqueeze(-1)
            allowed_causal = torch.arange(Lk, device=q.device) <= i + (Lk - Lq)
            mask = allowed_causal if mask is None else mask & allowed_causal
        attn_mask = mask
        if bias is not None:  # softmax((q.k scale + bias) / gamma)
            bias = (bias if gamma == 1.0 else bias / gamma).to(q.dtype)
            attn_mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        valid = None
        if attn_mask is not None:
            # rows without an allowed key: attend everywhere (finite), then give zeros
            valid = attn_mask.any(-1, keepdim=True) if attn_mask.dtype == torch.bool else (
                attn_mask > float("-inf")).any(-1, keepdim=True)
            # compiled, rows are fixed up unconditionally (no host sync in the graph)
            if not torch.compiler.is_compiling() and bool(valid.all()):
                valid = None
            elif attn_mask.dtype == torch.bool:
                attn_mask = attn_mask | ~valid
            else:
                attn_mask = attn_mask.masked_fill(~valid, 0.0)
        # the fused kernels want one head size for q, k and v: zero columns change nothing
        Dq, Dv = q.shape[-1], v.shape[-1]
        if Dq < Dv:
            q, k = F.pad(q, (0, Dv - Dq)), F.pad(k, (0, Dv - Dq))
        elif Dv < Dq:
            v = F.pad(v, (0, Dq - Dv))
        B, H, Hkv = q.shape[0], q.shape[1], k.shape[1]
        packable = attn_mask is None or attn_mask.dim() <= 2 or (attn_mask.dim() == 4 and attn_mask.shape[1] in (1, H))
        if Lq == 1 and Hkv != H and packable:
            # one query (cached decoding) with grouped heads: the G = H // Hkv query heads of a group
            # are the G query rows of its key/value head (one fused call per group, no repeated keys;
            # measured 2x faster than enable_gqa, whose CPU kernels repeat k and v)
            G = H // Hkv
            if attn_mask is not None and attn_mask.dim() == 4 and attn_mask.shape[1] == H != 1:
                attn_mask = attn_mask.reshape(attn_mask.shape[0], Hkv, G, attn_mask.shape[-1])
            out = F.scaled_dot_product_attention(
                q.reshape(B, Hkv, G, q.shape[-1]), k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale / gamma,
            ).reshape(B, H, 1, -1)[..., :Dv]
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale / gamma,
                enable_gqa=Hkv != H,
            )[..., :Dv]
        return out if valid is None else out * valid.to(out.dtype)

    return run


