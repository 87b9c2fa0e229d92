"""Llama with a chosen attention and positional scheme: ``SparseLlamaConfig``, ``SparseLlamaForCausalLM``.

A decoder-only family for length-extrapolation work. ``decoder_attn`` is the spec of the causal
self-attention (any spec of the core registry, learned parameters included), and ``positions``
the positional scheme:

- ``"rope"``: Llama's rotary embedding (the stock model);
- ``"nope"``: none; the causal mask is the only source of order (the rotation is the identity:
  the model ignores ``position_ids``);
- ``"alibi"``: none, and the ALiBi bias ``-m_h (i - j)`` added to every head's scores
  (:class:`plugin.positions.ALiBiAttentionMechanism`; slopes of the ALiBi paper).

Both fields are written to ``config.json``; ``from_pretrained`` (this class or
``AutoModelForCausalLM``) rebuilds the same model. Neither scheme adds parameters, so the state
dict is the stock Llama's; a stock Llama checkpoint loads into any of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaAttention

from plugin.positions import ALiBiAttentionMechanism, check_positions

from . import compat
from .attention import MECHANISM_ATTRIBUTE
from .sparse import SparseAttentionConfigMixin, SparseAttentionModelMixin

LLAMA_POSITIONS = ("rope", "nope", "alibi")
"""The values of ``SparseLlamaConfig.positions``."""


@dataclass(init=False, repr=False, eq=False, kw_only=True)
class SparseLlamaConfig(SparseAttentionConfigMixin, LlamaConfig):
    """:class:`transformers.LlamaConfig` with ``decoder_attn`` (a spec string) and ``positions``
    (``"rope"``, ``"nope"`` or ``"alibi"``; see :mod:`hf_models.llama`)."""

    model_type = "sparse_llama"
    positions: str = "rope"

    def __post_init__(self, **kwargs: Any) -> None:
        check_positions(self.positions, LLAMA_POSITIONS, "positions")
        super().__post_init__(**kwargs)


class NoRotation(nn.Module):
    """Stands in for Llama's rotary embedding: ``cos = 1``, ``sin = 0``, so queries and keys pass unrotated."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim

    def forward(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        shape = (*position_ids.shape, self.head_dim)
        return (torch.ones(shape, dtype=x.dtype, device=x.device), torch.zeros(shape, dtype=x.dtype, device=x.device))


class SparseLlamaForCausalLM(SparseAttentionModelMixin, LlamaForCausalLM):
    """:class:`transformers.LlamaForCausalLM` whose self-attention runs ``config.decoder_attn``
    with the positional scheme ``config.positions`` (``"rope"``, ``"nope"`` or ``"alibi"``)."""

    config_class = SparseLlamaConfig
    _attention_module_classes = (LlamaAttention,)

    def __init__(self, config: SparseLlamaConfig, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        if config.positions != "rope":
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            self.model.rotary_emb = NoRotation(head_dim)

    def _attach_attention_mechanisms(self, roles: tuple[str, ...] = ("encoder", "decoder", "cross")) -> None:
        super()._attach_attention_mechanisms(roles)
        if getattr(self.config, "positions", "rope") != "alibi":
            return
        for _, module, role in self.attention_modules():
            if role not in roles:
                continue
            old = getattr(module, MECHANISM_ATTRIBUTE)
            schedule = str(old.schedule) if old.schedule is not None else None
            with torch.device("cpu"):
                mech = ALiBiAttentionMechanism(old.spec, num_heads=compat.attention_heads(module), role=role,
                                               schedule=schedule)
            reference = next(module.parameters(), None)
            if reference is not None:
                mech = mech.to(device=reference.device, dtype=reference.dtype)
            setattr(module, MECHANISM_ATTRIBUTE, mech)


def register_auto_classes() -> None:
    """Register ``sparse_llama`` with ``AutoConfig`` and ``AutoModelForCausalLM`` (idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register(SparseLlamaConfig.model_type, SparseLlamaConfig, exist_ok=True)
    AutoModelForCausalLM.register(SparseLlamaConfig, SparseLlamaForCausalLM, exist_ok=True)


register_auto_classes()
